//! An incident as one self-contained record, for replicas that share state
//! through the Kubernetes API ([`crate::store::kube`]).
//!
//! [`export`] reads every row of an incident (the incident, its timeline,
//! detection records, evidence items, alerts and their deliveries) in a
//! canonical order; [`merge`] folds a record from another replica into this
//! store. The merge is a join: timeline, detections and evidence are
//! append-only sets (union), counters take the larger value, a delivery that
//! finished beats one still pending, and the state moves only forward. So two
//! replicas that merge each other's records end up with the same rows, in
//! whatever order they merged, and merging a record twice changes nothing.

use std::collections::{HashMap, HashSet};

use exfilguard_proto::v1::{
    Block, Incident, IncidentEventKind, IncidentState, PolicyAction, SetCap, Unblock,
};
use rusqlite::{Connection, OptionalExtension, Transaction, params};
use serde::{Deserialize, Serialize};

use crate::{Error, Result, store::Effect};

/// Every row of one incident.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IncidentRecord {
    /// The incident row.
    pub incident: IncidentRow,
    /// Timeline entries, oldest first.
    pub timeline: Vec<TimelineRow>,
    /// Detection records (also the cross-replica de-duplication of resends).
    pub detections: Vec<DetectionRow>,
    /// Evidence items, oldest capture first.
    pub evidence: Vec<EvidenceRow>,
    /// Alerts of its transitions, with their deliveries.
    pub alerts: Vec<AlertRow>,
}

/// The `incidents` row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IncidentRow {
    /// Incident id.
    pub id: String,
    /// Correlation key of its workload.
    pub workload_key: String,
    /// Node.
    pub node: String,
    /// Namespace.
    pub namespace: String,
    /// The workload, protobuf-encoded, base64.
    pub workload: String,
    /// `IncidentState` value.
    pub state: i32,
    /// `Severity` value.
    pub severity: i32,
    /// `DetectionKind` value.
    pub kind: i32,
    /// `PolicyAction` value.
    pub action: i32,
    /// Opened (Unix ms).
    pub opened_ms: u64,
    /// Last change (Unix ms).
    pub updated_ms: u64,
    /// Detections correlated into it.
    pub detection_count: u64,
    /// Largest bytes estimate.
    pub bytes_estimate: u64,
    /// Latest summary.
    pub summary: String,
    /// Who acknowledged it.
    pub acknowledged_by: String,
}

/// A timeline entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TimelineRow {
    /// When (Unix ms).
    pub at_ms: u64,
    /// Who.
    pub actor: String,
    /// What.
    pub cause: String,
    /// The state it left the incident in.
    pub state: i32,
}

/// A detection record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DetectionRow {
    /// Node that sent it.
    pub node: String,
    /// Its sequence number there.
    pub seq: u64,
    /// The agent's episode id.
    pub detection_id: String,
    /// Canonical JSON.
    pub json: String,
    /// SHA-256 of `json`.
    pub sha256: String,
    /// Stored (Unix ms).
    pub stored_ms: u64,
}

/// An evidence item.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvidenceRow {
    /// Kind (`pod`, `flows`, ...).
    pub kind: String,
    /// Captured (Unix ms).
    pub captured_ms: u64,
    /// Media type of the content.
    pub media_type: String,
    /// Where it came from.
    pub source: String,
    /// The stored content, base64.
    pub content: String,
    /// Stored size.
    pub size: u64,
    /// SHA-256 of the stored content.
    pub sha256: String,
    /// Truncation note, if any.
    pub note: String,
    /// Size before truncation.
    pub original_size: u64,
    /// SHA-256 before truncation.
    pub original_sha256: String,
}

/// One transition's alert.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlertRow {
    /// Transition (`opened`, `contained`, ...).
    pub transition: String,
    /// When (Unix ms).
    pub at_ms: u64,
    /// The alert, JSON.
    pub alert: String,
    /// Fanned out to sinks.
    pub routed: bool,
    /// One per sink.
    pub deliveries: Vec<DeliveryRow>,
}

/// One (alert, sink) delivery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryRow {
    /// Sink name.
    pub sink: String,
    /// 0 pending, 1 delivered, 2 failed.
    pub state: i32,
    /// Attempts made.
    pub attempts: u32,
    /// Next attempt (Unix ms).
    pub next_attempt_ms: u64,
    /// Last failure.
    pub last_error: String,
    /// Finished (Unix ms), 0 while pending.
    pub done_ms: u64,
}

/// What a merge changed here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergeOutcome {
    /// State before (`None`: the incident was new here).
    pub before: Option<i32>,
    /// State after.
    pub after: i32,
    /// Some row was added or changed.
    pub changed: bool,
    /// The newest throttle among the timeline entries new here, as
    /// `(bytes, window_seconds)` (`(0, 0)`: lifted): the cap for the agent.
    pub throttle: Option<(u64, u32)>,
}

/// The cap a throttle timeline entry (written by the store's `throttle`)
/// put in force; `(0, 0)` for a lift.
fn throttle_of(cause: &str) -> Option<(u64, u32)> {
    if cause.starts_with("throttle lifted:") {
        return Some((0, 0));
    }
    let rest = cause.strip_prefix("throttle: in-kernel cap of ")?;
    let (bytes, rest) = rest.split_once(" bytes per ")?;
    let (window, _) = rest.split_once(" s sent to the agent on ")?;
    Some((bytes.parse().ok()?, window.parse().ok()?))
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

fn encode(bytes: &[u8]) -> String {
    use base64::Engine as _;
    b64().encode(bytes)
}

fn decode(what: &str, text: &str) -> Result<Vec<u8>> {
    use base64::Engine as _;
    b64()
        .decode(text)
        .map_err(|e| Error::InvalidArgument(format!("incident record: {what} is not base64: {e}")))
}

/// Reads every row of incident `id`; `None` if there is no such incident.
pub fn export(conn: &Connection, id: &str) -> Result<Option<IncidentRecord>> {
    let incident = conn
        .query_row(
            "SELECT id, workload_key, node, namespace, workload, state, severity, kind, action,
                opened_ms, updated_ms, detection_count, bytes_estimate, summary, acknowledged_by
             FROM incidents WHERE id = ?1",
            [id],
            |r| {
                let workload: Vec<u8> = r.get(4)?;
                Ok(IncidentRow {
                    id: r.get(0)?,
                    workload_key: r.get(1)?,
                    node: r.get(2)?,
                    namespace: r.get(3)?,
                    workload: encode(&workload),
                    state: r.get(5)?,
                    severity: r.get(6)?,
                    kind: r.get(7)?,
                    action: r.get(8)?,
                    opened_ms: r.get(9)?,
                    updated_ms: r.get(10)?,
                    detection_count: r.get(11)?,
                    bytes_estimate: r.get(12)?,
                    summary: r.get(13)?,
                    acknowledged_by: r.get(14)?,
                })
            },
        )
        .optional()
        .map_err(Error::store("export incident"))?;
    let Some(incident) = incident else {
        return Ok(None);
    };
    let timeline = rows(
        conn,
        "SELECT at_ms, actor, cause, state FROM timeline WHERE incident_id = ?1
         ORDER BY at_ms, actor, cause, state",
        id,
        timeline_row,
    )?;
    let detections = rows(
        conn,
        "SELECT node, seq, detection_id, json, sha256, stored_ms FROM detections
         WHERE incident_id = ?1 ORDER BY node, seq",
        id,
        |r| {
            Ok(DetectionRow {
                node: r.get(0)?,
                seq: r.get(1)?,
                detection_id: r.get(2)?,
                json: r.get(3)?,
                sha256: r.get(4)?,
                stored_ms: r.get(5)?,
            })
        },
    )?;
    let evidence = rows(
        conn,
        "SELECT kind, captured_ms, media_type, source, content, size, sha256, note,
            original_size, original_sha256
         FROM evidence WHERE incident_id = ?1 ORDER BY captured_ms, kind, sha256",
        id,
        |r| {
            let content: Vec<u8> = r.get(4)?;
            Ok(EvidenceRow {
                kind: r.get(0)?,
                captured_ms: r.get(1)?,
                media_type: r.get(2)?,
                source: r.get(3)?,
                content: encode(&content),
                size: r.get(5)?,
                sha256: r.get(6)?,
                note: r.get(7)?,
                original_size: r.get(8)?,
                original_sha256: r.get(9)?,
            })
        },
    )?;
    let events = rows(
        conn,
        // In the order they were recorded: a merge inserts them in this
        // order, and the dispatcher sends an incident's alerts in row order.
        "SELECT id, transition, at_ms, alert, routed FROM alert_events WHERE incident_id = ?1
         ORDER BY at_ms, id",
        id,
        |r| {
            Ok((
                r.get::<_, i64>(0)?,
                AlertRow {
                    transition: r.get(1)?,
                    at_ms: r.get(2)?,
                    alert: r.get(3)?,
                    routed: r.get::<_, i64>(4)? != 0,
                    deliveries: Vec::new(),
                },
            ))
        },
    )?;
    let mut alerts = Vec::with_capacity(events.len());
    for (event_id, mut alert) in events {
        let mut stmt = conn
            .prepare_cached(
                "SELECT sink, state, attempts, next_attempt_ms, last_error, done_ms
                 FROM alert_outbox WHERE event_id = ?1 ORDER BY sink",
            )
            .map_err(Error::store("export deliveries"))?;
        alert.deliveries = stmt
            .query_map([event_id], |r| {
                Ok(DeliveryRow {
                    sink: r.get(0)?,
                    state: r.get(1)?,
                    attempts: r.get(2)?,
                    next_attempt_ms: r.get(3)?,
                    last_error: r.get(4)?,
                    done_ms: r.get(5)?,
                })
            })
            .map_err(Error::store("export deliveries"))?
            .collect::<rusqlite::Result<_>>()
            .map_err(Error::store("export deliveries"))?;
        alerts.push(alert);
    }
    Ok(Some(IncidentRecord {
        incident,
        timeline,
        detections,
        evidence,
        alerts,
    }))
}

/// A timeline row from `SELECT at_ms, actor, cause, state`.
fn timeline_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<TimelineRow> {
    Ok(TimelineRow {
        at_ms: r.get(0)?,
        actor: r.get(1)?,
        cause: r.get(2)?,
        state: r.get(3)?,
    })
}

fn rows<T>(
    conn: &Connection,
    sql: &str,
    id: &str,
    f: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> Result<Vec<T>> {
    let mut stmt = conn
        .prepare_cached(sql)
        .map_err(Error::store("export incident"))?;
    stmt.query_map([id], f)
        .map_err(Error::store("export incident"))?
        .collect::<rusqlite::Result<_>>()
        .map_err(Error::store("export incident"))
}

/// Where a state stands in the only order incidents move in: open, then
/// contained, then closed. Released sorts after resolved so that a replica
/// that resolved an open incident while another contained it ends released:
/// the containment is lifted rather than left behind.
fn rank(state: i32) -> u8 {
    match IncidentState::try_from(state) {
        Ok(IncidentState::Open) => 1,
        Ok(IncidentState::Contained) => 2,
        Ok(IncidentState::Resolved) => 3,
        Ok(IncidentState::Released) => 4,
        _ => 0,
    }
}

/// The state two replicas' views of an incident join to.
pub fn join_state(a: i32, b: i32) -> i32 {
    let contained = IncidentState::Contained as i32;
    let resolved = IncidentState::Resolved as i32;
    let released = IncidentState::Released as i32;
    // Resolved on one side, contained on the other: the workload is blocked
    // somewhere, so the join is released (and the caller sends the Unblock).
    if (a == resolved && (b == contained || b == released))
        || (b == resolved && (a == contained || a == released))
    {
        return released;
    }
    if rank(a) >= rank(b) { a } else { b }
}

fn changed(n: usize) -> bool {
    n > 0
}

/// Folds `record` into this store (one transaction, the caller's).
pub fn merge(tx: &Transaction<'_>, record: &IncidentRecord) -> Result<MergeOutcome> {
    let r = &record.incident;
    let workload = decode("workload", &r.workload)?;
    let err = Error::store("merge incident");
    let before: Option<i32> = tx
        .query_row(
            "SELECT state FROM incidents WHERE id = ?1",
            [&r.id],
            |row| row.get(0),
        )
        .optional()
        .map_err(Error::store("merge incident"))?;
    let mut any = false;
    let after = match before {
        None => {
            tx.execute(
                "INSERT INTO incidents (id, workload_key, node, namespace, workload, state, severity, kind,
                    action, opened_ms, updated_ms, detection_count, bytes_estimate, summary, acknowledged_by)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
                params![
                    r.id,
                    r.workload_key,
                    r.node,
                    r.namespace,
                    workload,
                    r.state,
                    r.severity,
                    r.kind,
                    r.action,
                    r.opened_ms,
                    r.updated_ms,
                    r.detection_count,
                    r.bytes_estimate,
                    r.summary,
                    r.acknowledged_by
                ],
            )
            .map_err(err)?;
            any = true;
            r.state
        }
        Some(local) => {
            let state = join_state(local, r.state);
            // Each column joins on its own: larger counters, the summary of
            // the later update (ties broken by text, so both sides agree),
            // and an acknowledgement once anyone made one.
            any |= changed(
                tx.execute(
                    "UPDATE incidents SET
                        state = ?2,
                        summary = CASE WHEN ?3 > updated_ms OR (?3 = updated_ms AND ?4 > summary)
                                  THEN ?4 ELSE summary END,
                        updated_ms = MAX(updated_ms, ?3),
                        detection_count = MAX(detection_count, ?5),
                        bytes_estimate = MAX(bytes_estimate, ?6),
                        severity = MAX(severity, ?7),
                        acknowledged_by = CASE WHEN ?8 > acknowledged_by THEN ?8 ELSE acknowledged_by END
                     WHERE id = ?1 AND (state != ?2 OR updated_ms < ?3
                        OR (updated_ms = ?3 AND summary < ?4) OR detection_count < ?5
                        OR bytes_estimate < ?6 OR severity < ?7 OR acknowledged_by < ?8)",
                    params![
                        r.id,
                        state,
                        r.updated_ms,
                        r.summary,
                        r.detection_count,
                        r.bytes_estimate,
                        r.severity,
                        r.acknowledged_by
                    ],
                )
                .map_err(Error::store("merge incident"))?,
            );
            state
        }
    };
    let added = merge_timeline(tx, &r.id, &record.timeline)?;
    any |= !added.is_empty();
    let throttle = added
        .iter()
        .filter_map(|e| Some((e.at_ms, throttle_of(&e.cause)?)))
        .max_by_key(|(at, _)| *at)
        .map(|(_, cap)| cap);
    // Each node's highest stored number moves past its merged detections,
    // so the agent's resend of one here (it moved before the other
    // replica's Ack reached it) is a duplicate, as on the replica that
    // stored it. One update per node, not per detection.
    let mut highest: HashMap<&str, u64> = HashMap::new();
    for d in &record.detections {
        let seq = highest.entry(&d.node).or_default();
        *seq = (*seq).max(d.seq);
    }
    for (node, seq) in highest {
        tx.prepare_cached("UPDATE agents SET last_seq = MAX(last_seq, ?2) WHERE node = ?1")
            .and_then(|mut s| s.execute(params![node, seq]))
            .map_err(Error::store("merge detections"))?;
    }
    for d in &record.detections {
        any |= changed(
            tx.prepare_cached(
                "INSERT OR IGNORE INTO detections (node, seq, incident_id, detection_id, json, sha256, stored_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )
            .and_then(|mut s| {
                s.execute(params![d.node, d.seq, r.id, d.detection_id, d.json, d.sha256, d.stored_ms])
            })
            .map_err(Error::store("merge detections"))?,
        );
    }
    for e in &record.evidence {
        let exists: bool = tx
            .prepare_cached(
                "SELECT EXISTS(SELECT 1 FROM evidence WHERE incident_id = ?1 AND kind = ?2
                    AND captured_ms = ?3 AND sha256 = ?4)",
            )
            .and_then(|mut s| {
                s.query_row(params![r.id, e.kind, e.captured_ms, e.sha256], |row| {
                    row.get(0)
                })
            })
            .map_err(Error::store("merge evidence"))?;
        if exists {
            continue;
        }
        let content = decode("evidence content", &e.content)?;
        tx.prepare_cached(
            "INSERT INTO evidence (incident_id, kind, captured_ms, media_type, source, content, size,
                sha256, note, original_size, original_sha256)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        )
        .and_then(|mut s| {
            s.execute(params![
                r.id,
                e.kind,
                e.captured_ms,
                e.media_type,
                e.source,
                content,
                e.size,
                e.sha256,
                e.note,
                e.original_size,
                e.original_sha256
            ])
        })
        .map_err(Error::store("merge evidence"))?;
        any = true;
    }
    for a in &record.alerts {
        any |= merge_alert(tx, &r.id, a)?;
    }
    Ok(MergeOutcome {
        before,
        after,
        changed: any,
        throttle,
    })
}

/// Adds the entries this store lacks; returns them.
fn merge_timeline<'a>(
    tx: &Transaction<'_>,
    id: &str,
    entries: &'a [TimelineRow],
) -> Result<Vec<&'a TimelineRow>> {
    if entries.is_empty() {
        return Ok(Vec::new());
    }
    let mut stmt = tx
        .prepare_cached("SELECT at_ms, actor, cause, state FROM timeline WHERE incident_id = ?1")
        .map_err(Error::store("merge timeline"))?;
    let have: HashSet<TimelineRow> = stmt
        .query_map([id], timeline_row)
        .map_err(Error::store("merge timeline"))?
        .collect::<rusqlite::Result<_>>()
        .map_err(Error::store("merge timeline"))?;
    let mut added = Vec::new();
    for e in entries.iter().filter(|e| !have.contains(e)) {
        super::add_timeline(tx, id, e.at_ms, &e.actor, &e.cause, e.state)?;
        added.push(e);
    }
    Ok(added)
}

fn merge_alert(tx: &Transaction<'_>, id: &str, a: &AlertRow) -> Result<bool> {
    let err = || Error::store("merge alert");
    let mut any = changed(
        tx.prepare_cached(
            "INSERT OR IGNORE INTO alert_events (incident_id, transition, at_ms, alert, routed)
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )
        .and_then(|mut s| s.execute(params![id, a.transition, a.at_ms, a.alert, a.routed as i64]))
        .map_err(err())?,
    );
    let (event_id, routed): (i64, i64) = tx
        .query_row(
            "SELECT id, routed FROM alert_events WHERE incident_id = ?1 AND transition = ?2",
            params![id, a.transition],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .map_err(err())?;
    if a.routed && routed == 0 {
        tx.execute(
            "UPDATE alert_events SET routed = 1 WHERE id = ?1",
            [event_id],
        )
        .map_err(err())?;
        any = true;
    }
    for d in &a.deliveries {
        any |= changed(
            tx.prepare_cached(
                "INSERT OR IGNORE INTO alert_outbox (event_id, incident_id, sink, state, attempts,
                    next_attempt_ms, last_error, done_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )
            .and_then(|mut s| {
                s.execute(params![
                    event_id,
                    id,
                    d.sink,
                    d.state,
                    d.attempts,
                    d.next_attempt_ms,
                    d.last_error,
                    d.done_ms
                ])
            })
            .map_err(err())?,
        );
        // A finished delivery beats a pending one; otherwise the side that
        // tried more often knows more.
        any |= changed(
            tx.prepare_cached(
                "UPDATE alert_outbox SET
                    last_error = CASE WHEN ?2 > attempts OR (?2 = attempts AND ?5 > last_error)
                                 THEN ?5 ELSE last_error END,
                    state = MAX(state, ?1),
                    attempts = MAX(attempts, ?2),
                    next_attempt_ms = MAX(next_attempt_ms, ?3),
                    done_ms = MAX(done_ms, ?4)
                 WHERE event_id = ?6 AND sink = ?7 AND (state < ?1 OR attempts < ?2
                    OR next_attempt_ms < ?3 OR done_ms < ?4 OR (attempts = ?2 AND last_error < ?5))",
            )
            .and_then(|mut s| {
                s.execute(params![
                    d.state,
                    d.attempts,
                    d.next_attempt_ms,
                    d.done_ms,
                    d.last_error,
                    event_id,
                    d.sink
                ])
            })
            .map_err(err())?,
        );
    }
    Ok(any)
}

/// The commands a merge calls for on this replica: the incident's change for
/// watchers, and, when its state moved here, the Block or Unblock for the
/// node's agent (sent only if that agent is connected to this replica) and
/// the cluster lockdown or release (carried out by the leader).
fn effects(tx: &Transaction<'_>, outcome: &MergeOutcome, id: &str) -> Result<Vec<Effect>> {
    if !outcome.changed {
        return Ok(Vec::new());
    }
    let incident = super::load_incident(tx, id)?.ok_or_else(|| super::not_found(id))?;
    let workload = incident.workload.clone().unwrap_or_default();
    let contained = IncidentState::Contained as i32;
    let released = IncidentState::Released as i32;
    let open = IncidentState::Open as i32;
    let kind = match outcome.before {
        None => IncidentEventKind::Opened,
        Some(s) if s != outcome.after => IncidentEventKind::StateChanged,
        Some(_) => IncidentEventKind::Updated,
    };
    let mut out = vec![Effect::Incident {
        kind,
        incident: Box::new(Incident {
            timeline: super::load_timeline_tail(tx, id, super::EVENT_TIMELINE_TAIL)?,
            ..incident.clone()
        }),
    }];
    let was_contained = outcome.before == Some(contained);
    if outcome.after == contained && !was_contained {
        if workload.cgroup_id != 0 {
            out.push(Effect::Block {
                node: incident.node.clone(),
                block: Box::new(Block {
                    incident_id: id.to_string(),
                    cgroup_id: workload.cgroup_id,
                    workload: Some(workload.clone()),
                    remote_cidrs: Vec::new(),
                    reason: format!("incident {id}: policy action lockdown"),
                }),
            });
        }
        if !workload.pod.is_empty() {
            out.push(Effect::Lockdown {
                incident_id: id.to_string(),
                workload: Box::new(workload.clone()),
                dry_run: false,
            });
        }
    } else if outcome.before.is_none()
        && outcome.after == open
        && incident.action == PolicyAction::DryRun as i32
        && !workload.pod.is_empty()
    {
        out.push(Effect::Lockdown {
            incident_id: id.to_string(),
            workload: Box::new(workload.clone()),
            dry_run: true,
        });
    }
    // A responder throttled (or lifted) on another replica: the cap goes to
    // the agent if it is connected here.
    if let Some((bytes, window_seconds)) = outcome.throttle
        && workload.cgroup_id != 0
    {
        out.push(Effect::SetCap {
            node: incident.node.clone(),
            set_cap: SetCap {
                cgroup_id: workload.cgroup_id,
                bytes,
                window_seconds,
                reason: format!("incident {id}: throttled on another controller replica"),
                incident_id: id.to_string(),
            },
        });
    }
    // Released here by this merge: lift what was in force. A replica that
    // saw the incident contained sent (or re-sends) the Block, so each
    // undoes it.
    if outcome.after == released && outcome.before.is_some_and(|s| s != released) {
        let (by, reason) = tx
            .query_row(
                "SELECT actor, cause FROM timeline WHERE incident_id = ?1 AND state = ?2
                 ORDER BY at_ms DESC, n DESC LIMIT 1",
                params![id, released],
                |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)),
            )
            .optional()
            .map_err(Error::store("release cause"))?
            .unwrap_or_else(|| ("controller".into(), "released".into()));
        out.push(Effect::Unblock {
            node: incident.node.clone(),
            unblock: Unblock {
                incident_id: id.to_string(),
                cgroup_id: workload.cgroup_id,
                reason: format!("released by {by}: {reason}"),
            },
        });
        if !workload.pod.is_empty() {
            out.push(Effect::Release {
                incident_id: id.to_string(),
                workload: Box::new(workload),
                by,
                reason,
            });
        }
    }
    Ok(out)
}

impl super::SqliteStore {
    /// Every row of incident `id` (`None` if unknown), for other replicas.
    pub fn export_incident(&self, id: &str) -> Result<Option<IncidentRecord>> {
        let conn = self.reader()?;
        export(&conn, id)
    }

    /// Folds another replica's record of an incident into this store, in one
    /// transaction; returns what changed and the effects it calls for here.
    pub fn merge_incident(&self, record: &IncidentRecord) -> Result<(MergeOutcome, Vec<Effect>)> {
        let mut conn = self.writer()?;
        let tx = conn.transaction().map_err(Error::store("begin"))?;
        let outcome = merge(&tx, record)?;
        let effects = effects(&tx, &outcome, &record.incident.id)?;
        tx.commit().map_err(Error::store("commit"))?;
        Ok((outcome, effects))
    }

    /// The incident an outbox row belongs to.
    pub fn incident_of_delivery(&self, delivery: i64) -> Result<Option<String>> {
        let conn = self.reader()?;
        conn.query_row(
            "SELECT incident_id FROM alert_outbox WHERE id = ?1",
            [delivery],
            |r| r.get(0),
        )
        .optional()
        .map_err(Error::store("delivery incident"))
    }

    /// The incident a recorded alert belongs to.
    pub fn incident_of_alert(&self, event_id: i64) -> Result<Option<String>> {
        let conn = self.reader()?;
        conn.query_row(
            "SELECT incident_id FROM alert_events WHERE id = ?1",
            [event_id],
            |r| r.get(0),
        )
        .optional()
        .map_err(Error::store("alert incident"))
    }

    /// Ids of every incident, for a full re-publish.
    pub fn incident_ids(&self) -> Result<Vec<String>> {
        let conn = self.reader()?;
        let mut stmt = conn
            .prepare("SELECT id FROM incidents ORDER BY opened_ms")
            .map_err(Error::store("incident ids"))?;
        stmt.query_map([], |r| r.get(0))
            .map_err(Error::store("incident ids"))?
            .collect::<rusqlite::Result<_>>()
            .map_err(Error::store("incident ids"))
    }
}

#[cfg(test)]
mod tests {
    use exfilguard_proto::v1::{Detection, DetectionKind, Severity, Workload};

    use super::*;
    use crate::{
        correlate::ResponsePolicy,
        store::{
            AgentInfo, Delivery, DeliveryState, Ingest, IngestOutcome, Outbox as _, Payload,
            Store as _, sqlite::SqliteStore,
        },
    };

    fn open() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("c.db")).unwrap();
        (dir, store)
    }

    fn lockdown() -> ResponsePolicy {
        ResponsePolicy {
            critical: PolicyAction::Lockdown,
            high: PolicyAction::Lockdown,
            cluster_containment: true,
            ..Default::default()
        }
    }

    fn hello(store: &SqliteStore, node: &str) -> u64 {
        store
            .hello(
                &AgentInfo {
                    node: node.into(),
                    ..Default::default()
                },
                1,
            )
            .unwrap()
    }

    /// n1 (or `node`) says Hello, then sends detection `seq`.
    fn detect(store: &SqliteStore, node: &str, seq: u64) -> Vec<IngestOutcome> {
        hello(store, node);
        send(store, node, seq)
    }

    /// Detection `seq` on a stream that already said Hello.
    fn send(store: &SqliteStore, node: &str, seq: u64) -> Vec<IngestOutcome> {
        let msg = Ingest {
            node: node.into(),
            seq,
            sent_at_ms: 1_000,
            received_ms: 1_795_356_192_000 + seq,
            payload: Payload::Detection(Box::new(Detection {
                detection_id: "d1".into(),
                kind: DetectionKind::Volume as i32,
                severity: Severity::High as i32,
                workload: Some(Workload {
                    namespace: "shop".into(),
                    pod: "db-0".into(),
                    cgroup_id: 7,
                    ..Default::default()
                }),
                summary: format!("{seq} MB out"),
                bytes_estimate: 100 * seq,
                ..Default::default()
            })),
        };
        store.ingest(&[msg], &lockdown()).unwrap()
    }

    fn opened_id(out: &[IngestOutcome]) -> String {
        match &out[0] {
            IngestOutcome::Stored(effects) => match &effects[0] {
                Effect::Incident { incident, .. } => incident.id.clone(),
                e => panic!("first effect {e:?}"),
            },
            IngestOutcome::Duplicate => panic!("duplicate"),
        }
    }

    /// Merges each side's record into the other until neither changes.
    fn sync(a: &SqliteStore, b: &SqliteStore, id: &str) {
        for _ in 0..2 {
            let ra = a.export_incident(id).unwrap().unwrap();
            b.merge_incident(&ra).unwrap();
            let rb = b.export_incident(id).unwrap().unwrap();
            a.merge_incident(&rb).unwrap();
        }
    }

    #[test]
    fn a_record_recreates_the_incident_on_another_replica_with_its_commands() {
        let (_da, a) = open();
        let (_db, b) = open();
        let id = opened_id(&detect(&a, "n1", 1));
        a.add_evidence(
            &id,
            &crate::evidence::NewEvidence {
                kind: "pod".into(),
                captured_ms: 5,
                media_type: "application/json".into(),
                source: "test".into(),
                content: b"{\"pod\":1}".to_vec(),
            },
        )
        .unwrap();
        let record = a.export_incident(&id).unwrap().unwrap();
        let (outcome, effects) = b.merge_incident(&record).unwrap();
        assert_eq!(outcome.before, None);
        assert_eq!(outcome.after, IncidentState::Contained as i32);
        let kinds: Vec<&str> = effects
            .iter()
            .map(|e| match e {
                Effect::Incident { kind, .. } => kind.as_str_name(),
                Effect::Block { node, block } => {
                    assert_eq!((node.as_str(), block.cgroup_id), ("n1", 7));
                    "block"
                }
                Effect::Lockdown { dry_run, .. } => {
                    assert!(!dry_run);
                    "lockdown"
                }
                e => panic!("unexpected {e:?}"),
            })
            .collect();
        assert_eq!(kinds, ["INCIDENT_EVENT_KIND_OPENED", "block", "lockdown"]);
        // Same rows on both sides, evidence and hashes included.
        assert_eq!(b.export_incident(&id).unwrap().unwrap(), record);
        assert_eq!(b.get_incident(&id).unwrap(), a.get_incident(&id).unwrap());
        // The same items under the same names (items captured in the same
        // millisecond may be listed in another order).
        let sorted = |s: &SqliteStore| {
            let mut items = s.evidence(&id).unwrap();
            items.sort_by(|x, y| x.item_id.cmp(&y.item_id));
            items
        };
        assert!(sorted(&b) == sorted(&a), "evidence differs");
        assert_eq!(b.blocks_for("n1").unwrap().len(), 1);
        // Merging it again changes nothing and commands nothing.
        let (again, effects) = b.merge_incident(&record).unwrap();
        assert!(!again.changed);
        assert!(effects.is_empty());
    }

    #[test]
    fn a_detection_merged_after_the_agent_said_hello_is_a_resend_too() {
        let (_da, a) = open();
        let (_db, b) = open();
        // n1 says Hello to b before a's record of seq 1 arrives, then
        // resends seq 1 on that stream.
        assert_eq!(hello(&b, "n1"), 0);
        let id = opened_id(&detect(&a, "n1", 1));
        b.merge_incident(&a.export_incident(&id).unwrap().unwrap())
            .unwrap();
        let out = send(&b, "n1", 1);
        assert!(matches!(out[0], IngestOutcome::Duplicate));
        assert_eq!(b.get_incident(&id).unwrap().detection_count, 1);
    }

    #[test]
    fn a_detection_another_replica_stored_is_a_resend_here() {
        let (_da, a) = open();
        let (_db, b) = open();
        let id = opened_id(&detect(&a, "n1", 1));
        b.merge_incident(&a.export_incident(&id).unwrap().unwrap())
            .unwrap();
        // The agent moved to b before a's Ack reached it: its Hello learns
        // seq 1 is stored, and a resend of it is a duplicate.
        assert_eq!(hello(&b, "n1"), 1);
        let out = send(&b, "n1", 1);
        assert!(matches!(out[0], IngestOutcome::Duplicate));
        assert_eq!(b.get_incident(&id).unwrap().detection_count, 1);
        // Its next detection updates the same incident.
        let out = detect(&b, "n1", 2);
        assert_eq!(opened_id(&out), id);
    }

    #[test]
    fn concurrent_changes_on_two_replicas_join_to_the_same_rows() {
        let (_da, a) = open();
        let (_db, b) = open();
        let id = opened_id(&detect(&a, "n1", 1));
        sync(&a, &b, &id);
        // Meanwhile: a acknowledges and takes another detection, b releases.
        a.acknowledge(&id, "alice", "looking", 1_795_356_193_000)
            .unwrap();
        detect(&a, "n1", 2);
        b.release(&id, "bob", "backup job", 1_795_356_194_000)
            .unwrap();
        let rb = b.export_incident(&id).unwrap().unwrap();
        let (outcome, effects) = a.merge_incident(&rb).unwrap();
        assert_eq!(outcome.before, Some(IncidentState::Contained as i32));
        assert_eq!(outcome.after, IncidentState::Released as i32);
        assert!(
            effects
                .iter()
                .any(|e| matches!(e, Effect::Unblock { node, unblock }
                if node == "n1" && unblock.cgroup_id == 7 && unblock.reason.contains("bob"))),
            "{effects:?}"
        );
        assert!(
            effects
                .iter()
                .any(|e| matches!(e, Effect::Release { by, .. } if by == "bob")),
            "{effects:?}"
        );
        sync(&a, &b, &id);
        let (ra, rb) = (
            a.export_incident(&id).unwrap().unwrap(),
            b.export_incident(&id).unwrap().unwrap(),
        );
        assert_eq!(ra, rb);
        assert_eq!(ra.incident.acknowledged_by, "alice");
        assert_eq!(ra.incident.detection_count, 2);
        assert_eq!(ra.incident.bytes_estimate, 200);
        assert_eq!(ra.incident.state, IncidentState::Released as i32);
        let causes: Vec<&str> = ra.timeline.iter().map(|t| t.cause.as_str()).collect();
        assert!(
            causes.iter().any(|c| c.starts_with("acknowledged")),
            "{causes:?}"
        );
        assert!(
            causes.iter().any(|c| c.starts_with("released")),
            "{causes:?}"
        );
        assert!(b.blocks_for("n1").unwrap().is_empty());
    }

    #[test]
    fn deliveries_made_by_one_replica_are_done_on_the_other() {
        let (_da, a) = open();
        let (_db, b) = open();
        let id = opened_id(&detect(&a, "n1", 1));
        sync(&a, &b, &id);
        // b leads: it routes both alerts (opened, contained) and delivers one.
        let unrouted = b.unrouted_alerts(10).unwrap();
        assert_eq!(unrouted.len(), 2);
        let routes: Vec<(i64, Vec<String>)> = unrouted
            .iter()
            .map(|u| (u.event_id, vec!["pager".to_string()]))
            .collect();
        b.route_alerts(&routes, 10).unwrap();
        let due: Vec<Delivery> = b.due_deliveries(10, 10).unwrap();
        b.delivered(&due[0], 1, "HTTP 202", 11).unwrap();
        b.retry_later(due[0].id + 1, 1, 5_000, "HTTP 503").unwrap();
        sync(&a, &b, &id);
        assert!(a.unrouted_alerts(10).unwrap().is_empty());
        let states: Vec<(DeliveryState, u32)> = a
            .deliveries(&id)
            .unwrap()
            .iter()
            .map(|d| (d.state, d.attempts))
            .collect();
        assert_eq!(
            states,
            [(DeliveryState::Delivered, 1), (DeliveryState::Pending, 1)]
        );
        // a takes over: only the pending one is due, and not before b said.
        assert!(a.due_deliveries(4_999, 10).unwrap().is_empty());
        assert_eq!(a.due_deliveries(5_000, 10).unwrap().len(), 1);
    }

    #[test]
    fn a_throttle_made_on_another_replica_caps_the_agent_here() {
        let (_da, a) = open();
        let (_db, b) = open();
        let id = opened_id(&detect(&a, "n1", 1));
        sync(&a, &b, &id);
        a.throttle(
            &id,
            "alice",
            1_000_000,
            600,
            "slow it down",
            1_795_356_300_000,
        )
        .unwrap();
        let (_, effects) = b
            .merge_incident(&a.export_incident(&id).unwrap().unwrap())
            .unwrap();
        assert!(
            effects
                .iter()
                .any(|e| matches!(e, Effect::SetCap { node, set_cap }
                if node == "n1" && set_cap.cgroup_id == 7 && set_cap.bytes == 1_000_000
                    && set_cap.window_seconds == 600)),
            "{effects:?}"
        );
        a.throttle(&id, "alice", 0, 0, "enough", 1_795_356_301_000)
            .unwrap();
        let (_, effects) = b
            .merge_incident(&a.export_incident(&id).unwrap().unwrap())
            .unwrap();
        assert!(
            effects
                .iter()
                .any(|e| matches!(e, Effect::SetCap { set_cap, .. } if set_cap.bytes == 0)),
            "{effects:?}"
        );
        assert_eq!(
            throttle_of("acknowledged: throttle: in-kernel cap of"),
            None
        );
    }

    #[test]
    fn states_join_forward_and_a_containment_is_never_left_behind() {
        let [open, contained, released, resolved] = [
            IncidentState::Open,
            IncidentState::Contained,
            IncidentState::Released,
            IncidentState::Resolved,
        ]
        .map(|s| s as i32);
        assert_eq!(join_state(open, contained), contained);
        assert_eq!(join_state(contained, open), contained);
        assert_eq!(join_state(contained, released), released);
        assert_eq!(join_state(open, resolved), resolved);
        assert_eq!(join_state(resolved, contained), released);
        assert_eq!(join_state(released, resolved), released);
        assert_eq!(join_state(resolved, resolved), resolved);
    }

    #[test]
    fn a_record_that_is_not_one_is_refused_and_changes_nothing() {
        let (_da, a) = open();
        let id = opened_id(&detect(&a, "n1", 1));
        let mut record = a.export_incident(&id).unwrap().unwrap();
        record.incident.id = "EXFIL-20260101-000000-beef".into();
        record.incident.workload = "%%% not base64".into();
        assert!(a.merge_incident(&record).is_err());
        assert!(
            a.export_incident("EXFIL-20260101-000000-beef")
                .unwrap()
                .is_none()
        );
    }
}
