//! Embedded SQLite backend: one file, WAL, `synchronous=FULL`, versioned
//! migrations. A write returns only after its transaction committed, so an
//! acknowledged message survives `kill -9` of the controller.
//!
//! Two connections: a writer (every write is serialised through it; the
//! ingest batcher amortises the commit over many messages) and a reader, so
//! queries from the security team never wait behind a commit's fsync (WAL
//! readers see the last committed state). A third connection checkpoints the
//! WAL in the background ([`checkpoint`]).

mod checkpoint;
mod evidence;
mod outbox;
pub mod replica;

use std::{
    collections::{HashMap, hash_map::Entry},
    path::Path,
    sync::{LazyLock, Mutex},
};

use exfilguard_proto::v1::{
    Block, Detection, EvidenceItem, EvidenceRecord, FlowReport, Incident, IncidentEventKind,
    IncidentState, Node, PolicyAction, SetCap, Severity, Talker, TimelineEntry, Unblock, Workload,
};
use prost::Message;
use rusqlite::{Connection, OptionalExtension, Transaction, config::DbConfig, params};
use sha2::{Digest, Sha256};

use super::{
    AgentInfo, Cursor, Effect, EgressPoint, IncidentFilter, IncidentPage, Ingest, IngestOutcome,
    Payload, Store,
};
use crate::{
    Error, Result,
    alerts::Transition,
    correlate::{ResponsePolicy, is_active, new_incident_id, workload_key},
    evidence::NewEvidence,
    json,
};

/// How often the checkpoint thread copies WAL frames into the database file.
/// Against checkpoints inside the commit (every 4000 pages), 250 ms lowered
/// the ingest p99 under 500 agents from 36.5-47.1 ms to 26.0-30.5 ms
/// (BENCHMARKS.md); 100 ms and 1000 ms did no better.
const CHECKPOINT_INTERVAL: std::time::Duration = std::time::Duration::from_millis(250);

/// WAL pages at which the writer checkpoints itself (see [`checkpoint`]).
const WAL_AUTOCHECKPOINT_PAGES: i64 = 16_000;

/// 72 hours, the GDPR Art. 33 notification window.
const NOTIFICATION_WINDOW_MS: u64 = 72 * 3600 * 1000;

/// Schema migrations, applied in order; `PRAGMA user_version` records how many ran.
/// Never edit a released one: append a new one.
const MIGRATIONS: &[&str] = &[
    // 1: agents, incidents with timeline and evidence, egress aggregates.
    r#"
    CREATE TABLE agents (
        node TEXT PRIMARY KEY,
        agent_version TEXT NOT NULL,
        kernel_release TEXT NOT NULL,
        first_seen_ms INTEGER NOT NULL,
        last_seen_ms INTEGER NOT NULL,
        last_seq INTEGER NOT NULL DEFAULT 0,
        lag_ms INTEGER NOT NULL DEFAULT 0,
        dropped_flow_reports INTEGER NOT NULL DEFAULT 0,
        dropped_detections INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE incidents (
        id TEXT PRIMARY KEY,
        workload_key TEXT NOT NULL,
        node TEXT NOT NULL,
        namespace TEXT NOT NULL,
        workload BLOB NOT NULL,
        state INTEGER NOT NULL,
        severity INTEGER NOT NULL,
        kind INTEGER NOT NULL,
        action INTEGER NOT NULL,
        opened_ms INTEGER NOT NULL,
        updated_ms INTEGER NOT NULL,
        detection_count INTEGER NOT NULL,
        bytes_estimate INTEGER NOT NULL,
        summary TEXT NOT NULL,
        acknowledged_by TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX incidents_active ON incidents(workload_key) WHERE state IN (1, 2);
    CREATE INDEX incidents_newest ON incidents(opened_ms DESC, id DESC);
    CREATE TABLE timeline (
        n INTEGER PRIMARY KEY AUTOINCREMENT,
        incident_id TEXT NOT NULL REFERENCES incidents(id),
        at_ms INTEGER NOT NULL,
        actor TEXT NOT NULL,
        cause TEXT NOT NULL,
        state INTEGER NOT NULL
    );
    CREATE INDEX timeline_incident ON timeline(incident_id, n);
    CREATE TABLE detections (
        node TEXT NOT NULL,
        seq INTEGER NOT NULL,
        incident_id TEXT NOT NULL REFERENCES incidents(id),
        detection_id TEXT NOT NULL,
        json TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        stored_ms INTEGER NOT NULL,
        PRIMARY KEY (node, seq)
    );
    CREATE INDEX detections_incident ON detections(incident_id);
    CREATE TABLE egress (
        node TEXT NOT NULL,
        seq INTEGER NOT NULL,
        window_end_ms INTEGER NOT NULL,
        workload_key TEXT NOT NULL,
        namespace TEXT NOT NULL,
        workload BLOB NOT NULL,
        external_bytes INTEGER NOT NULL,
        internal_bytes INTEGER NOT NULL
    );
    CREATE INDEX egress_window ON egress(window_end_ms);
    "#,
    // 2: the alert outbox.
    outbox::MIGRATION,
    // 3: find the incident an agent's episode (detection_id) belongs to.
    r#"
    CREATE INDEX detections_episode ON detections(node, detection_id);
    "#,
    // 4: evidence items per incident, append-only.
    evidence::MIGRATION,
];

/// The SQLite store.
pub struct SqliteStore {
    writer: Mutex<Connection>,
    reader: Mutex<Connection>,
    /// Copies WAL frames into the database file off the commit path.
    _checkpointer: checkpoint::Checkpointer,
}

/// A node's place in one ingest batch.
struct NodeProgress<'a> {
    /// Highest sequence number stored before this batch.
    before: u64,
    /// The newest message of this batch stored for the node.
    stored: Option<&'a Ingest>,
}

impl NodeProgress<'_> {
    /// Highest sequence number stored, counting this batch so far.
    fn last_seq(&self) -> u64 {
        self.stored.map_or(self.before, |m| m.seq)
    }
}

fn open(path: &Path) -> Result<Connection> {
    let conn = Connection::open(path).map_err(Error::store("open"))?;
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(Error::store("busy_timeout"))?;
    // WAL: readers do not block the writer. FULL: a commit is on disk before
    // it returns, which is the promise behind every Ack.
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(Error::store("journal_mode"))?;
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(Error::store("synchronous"))?;
    // The writer checkpoints only when the WAL reaches 16000 pages (64 MiB):
    // that lets the WAL start over from its beginning, and it copies only the
    // frames since the checkpoint thread's last pass ([`checkpoint`]).
    conn.pragma_update(None, "wal_autocheckpoint", WAL_AUTOCHECKPOINT_PAGES)
        .map_err(Error::store("wal_autocheckpoint"))?;
    conn.pragma_update(None, "foreign_keys", "ON")
        .map_err(Error::store("foreign_keys"))?;
    // 16 MiB of page cache instead of SQLite's 2 MiB default: the indexes
    // keyed by node take inserts at one leaf per node, and those leaves stay
    // cached (misses are reads from the OS page cache). Not more: SQLite scans
    // the whole cache's hash table at every commit, which at 64 MiB was 8 % of
    // the controller's CPU under 500 agents.
    conn.pragma_update(None, "cache_size", -16_384)
        .map_err(Error::store("cache_size"))?;
    // Every statement of the ingest path stays prepared (rusqlite keeps 16 by
    // default; the ingest path alone uses more, and parsing SQL per detection
    // was a sixth of the writer's time).
    conn.set_prepared_statement_cache_capacity(64);
    // Plans must not depend on bound values: otherwise SQLite 3.54 re-prepares
    // every cached `... ORDER BY ... LIMIT` statement on each new binding
    // (the per-detection incident lookups), which cost as much as parsing.
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)
        .map_err(Error::store("query planner stability"))?;
    Ok(conn)
}

/// Runs the migrations `conn` has not seen yet, each in its own transaction.
fn migrate(conn: &mut Connection) -> Result<()> {
    let applied: usize = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(Error::store("read schema version"))?;
    if applied > MIGRATIONS.len() {
        return Err(Error::FailedPrecondition(format!(
            "store schema version {applied} is newer than this controller knows ({}); refusing to touch it",
            MIGRATIONS.len()
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(applied) {
        let tx = conn
            .transaction()
            .map_err(Error::store("begin migration"))?;
        tx.execute_batch(sql).map_err(Error::store("migrate"))?;
        tx.pragma_update(None, "user_version", i + 1)
            .map_err(Error::store("set schema version"))?;
        tx.commit().map_err(Error::store("commit migration"))?;
        tracing::info!(version = i + 1, "store schema migrated");
    }
    Ok(())
}

fn not_found(id: &str) -> Error {
    Error::NotFound {
        kind: "incident",
        id: id.to_string(),
    }
}

const INCIDENT_COLUMNS: &str = "id, node, workload, state, severity, kind, action, opened_ms, updated_ms, \
     detection_count, bytes_estimate, summary, acknowledged_by";

fn incident_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Incident> {
    let blob: Vec<u8> = row.get(2)?;
    let opened: u64 = row.get(7)?;
    Ok(Incident {
        id: row.get(0)?,
        node: row.get(1)?,
        // Written by this store from a validated message; a decode failure
        // means corruption, and an empty workload is the honest rendering.
        workload: Workload::decode(blob.as_slice()).ok(),
        state: row.get(3)?,
        severity: row.get(4)?,
        kind: row.get(5)?,
        action: row.get(6)?,
        opened_at_unix_ms: opened,
        updated_at_unix_ms: row.get(8)?,
        detection_count: row.get(9)?,
        bytes_estimate: row.get(10)?,
        summary: row.get(11)?,
        acknowledged_by: row.get(12)?,
        notification_deadline_unix_ms: opened + NOTIFICATION_WINDOW_MS,
        timeline: Vec::new(),
        evidence: Vec::new(),
    })
}

/// One incident by id; built once, as it runs several times per detection.
static LOAD_INCIDENT: LazyLock<String> =
    LazyLock::new(|| format!("SELECT {INCIDENT_COLUMNS} FROM incidents WHERE id = ?1"));

fn load_incident(conn: &Connection, id: &str) -> Result<Option<Incident>> {
    conn.prepare_cached(&LOAD_INCIDENT)
        .and_then(|mut s| s.query_row([id], incident_from_row).optional())
        .map_err(Error::store("load incident"))
}

fn load_timeline(conn: &Connection, id: &str) -> Result<Vec<TimelineEntry>> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT at_ms, actor, cause, state FROM timeline WHERE incident_id = ?1 ORDER BY n",
        )
        .map_err(Error::store("timeline"))?;
    let rows = stmt
        .query_map([id], |r| {
            Ok(TimelineEntry {
                at_unix_ms: r.get(0)?,
                actor: r.get(1)?,
                cause: r.get(2)?,
                state: r.get(3)?,
            })
        })
        .map_err(Error::store("timeline"))?;
    rows.collect::<rusqlite::Result<_>>()
        .map_err(Error::store("timeline"))
}

fn load_evidence(conn: &Connection, id: &str) -> Result<Vec<EvidenceRecord>> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT detection_id, seq, json, sha256, stored_ms FROM detections WHERE incident_id = ?1 ORDER BY stored_ms, node, seq",
        )
        .map_err(Error::store("evidence"))?;
    let rows = stmt
        .query_map([id], |r| {
            Ok(EvidenceRecord {
                detection_id: r.get(0)?,
                seq: r.get(1)?,
                json: r.get(2)?,
                sha256: r.get(3)?,
                stored_at_unix_ms: r.get(4)?,
            })
        })
        .map_err(Error::store("evidence"))?;
    rows.collect::<rusqlite::Result<_>>()
        .map_err(Error::store("evidence"))
}

/// The open or contained incident of a workload, if any.
const ACTIVE_INCIDENT: &str = "SELECT id, state FROM incidents WHERE workload_key = ?1 AND state IN (1, 2) ORDER BY opened_ms DESC LIMIT 1";

/// The newest `?2` timeline entries of incident `?1`, newest first.
const TIMELINE_TAIL: &str = "SELECT at_ms, actor, cause, state FROM timeline WHERE incident_id = ?1 ORDER BY n DESC LIMIT ?2";

/// Timeline entries carried by a change event: the newest few. Loading the
/// whole timeline per detection would make a long episode quadratic; watchers
/// that want all of it call GetIncident.
const EVENT_TIMELINE_TAIL: u32 = 8;

fn load_timeline_tail(conn: &Connection, id: &str, tail: u32) -> Result<Vec<TimelineEntry>> {
    // Newest first, then reversed: the index walks backwards from the end.
    let mut stmt = conn
        .prepare_cached(TIMELINE_TAIL)
        .map_err(Error::store("timeline"))?;
    let rows = stmt
        .query_map(params![id, tail], |r| {
            Ok(TimelineEntry {
                at_unix_ms: r.get(0)?,
                actor: r.get(1)?,
                cause: r.get(2)?,
                state: r.get(3)?,
            })
        })
        .map_err(Error::store("timeline"))?;
    let mut entries = rows
        .collect::<rusqlite::Result<Vec<_>>>()
        .map_err(Error::store("timeline"))?;
    entries.reverse();
    Ok(entries)
}

fn with_timeline(conn: &Connection, mut incident: Incident) -> Result<Incident> {
    incident.timeline = load_timeline(conn, &incident.id)?;
    Ok(incident)
}

fn add_timeline(
    tx: &Transaction<'_>,
    id: &str,
    at_ms: u64,
    actor: &str,
    cause: &str,
    state: i32,
) -> Result<()> {
    tx.prepare_cached("INSERT INTO timeline (incident_id, at_ms, actor, cause, state) VALUES (?1, ?2, ?3, ?4, ?5)")
        .and_then(|mut s| s.execute(params![id, at_ms, actor, cause, state]))
        .map_err(Error::store("timeline entry"))?;
    Ok(())
}

fn set_state(tx: &Transaction<'_>, id: &str, state: IncidentState, now_ms: u64) -> Result<()> {
    tx.prepare_cached("UPDATE incidents SET state = ?2, updated_ms = ?3 WHERE id = ?1")
        .and_then(|mut s| s.execute(params![id, state as i32, now_ms]))
        .map_err(Error::store("set state"))?;
    Ok(())
}

/// Applies the policy's action to an open incident; returns the commands
/// to send: the agent's in-kernel Block (when the workload has a cgroup id)
/// and the cluster lockdown of its pod (when the controller runs in a
/// cluster and the workload is a pod).
fn respond(
    tx: &Transaction<'_>,
    incident: &str,
    node: &str,
    workload: &Workload,
    action: PolicyAction,
    policy: &ResponsePolicy,
    now_ms: u64,
) -> Result<Vec<Effect>> {
    let open = IncidentState::Open as i32;
    let contains = matches!(action, PolicyAction::Lockdown | PolicyAction::DryRun);
    if contains && policy.is_protected(&workload.namespace) {
        add_timeline(
            tx,
            incident,
            now_ms,
            "controller",
            &format!(
                "{} refused: namespace {} is on the protected list; not contained (alert only)",
                if action == PolicyAction::DryRun {
                    "dry-run: lockdown"
                } else {
                    "lockdown"
                },
                workload.namespace
            ),
            open,
        )?;
        return Ok(Vec::new());
    }
    let in_cluster = policy.cluster_containment && !workload.pod.is_empty();
    let cluster = |dry_run| Effect::Lockdown {
        incident_id: incident.to_string(),
        workload: Box::new(workload.clone()),
        dry_run,
    };
    match action {
        PolicyAction::Lockdown if workload.cgroup_id != 0 || in_cluster => {
            set_state(tx, incident, IncidentState::Contained, now_ms)?;
            let mut effects = Vec::new();
            let mut done = Vec::new();
            if workload.cgroup_id != 0 {
                done.push(format!(
                    "in-kernel Block of cgroup {} sent to the agent on {node}",
                    workload.cgroup_id
                ));
                effects.push(Effect::Block {
                    node: node.to_string(),
                    block: Box::new(Block {
                        incident_id: incident.to_string(),
                        cgroup_id: workload.cgroup_id,
                        workload: Some(workload.clone()),
                        remote_cidrs: Vec::new(),
                        reason: format!("incident {incident}: policy action lockdown"),
                    }),
                });
            }
            if in_cluster {
                done.push(format!(
                    "NetworkPolicy and quarantine label requested for pod {}/{}",
                    workload.namespace, workload.pod
                ));
                effects.push(cluster(false));
            }
            add_timeline(
                tx,
                incident,
                now_ms,
                "controller",
                &format!("lockdown: {}", done.join("; ")),
                IncidentState::Contained as i32,
            )?;
            Ok(effects)
        }
        PolicyAction::Lockdown => {
            add_timeline(
                tx,
                incident,
                now_ms,
                "controller",
                "lockdown requested, but the agent reported no cgroup id for the workload: not contained",
                open,
            )?;
            Ok(Vec::new())
        }
        PolicyAction::DryRun => {
            add_timeline(
                tx,
                incident,
                now_ms,
                "controller",
                "dry-run: lockdown would have blocked the workload's egress",
                open,
            )?;
            Ok(if in_cluster {
                vec![cluster(true)]
            } else {
                Vec::new()
            })
        }
        PolicyAction::Alert | PolicyAction::Unspecified => Ok(Vec::new()),
    }
}

impl SqliteStore {
    /// Opens (creating and migrating if needed) the store at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let mut writer = open(path)?;
        migrate(&mut writer)?;
        let reader = open(path)?;
        let checkpointer = checkpoint::Checkpointer::start(open(path)?, path, CHECKPOINT_INTERVAL)?;
        Ok(Self {
            writer: Mutex::new(writer),
            reader: Mutex::new(reader),
            _checkpointer: checkpointer,
        })
    }

    fn writer(&self) -> Result<std::sync::MutexGuard<'_, Connection>> {
        self.writer
            .lock()
            .map_err(|_| Error::Unavailable("store writer poisoned by an earlier panic".into()))
    }

    fn reader(&self) -> Result<std::sync::MutexGuard<'_, Connection>> {
        self.reader
            .lock()
            .map_err(|_| Error::Unavailable("store reader poisoned by an earlier panic".into()))
    }

    fn store_flow(tx: &Transaction<'_>, msg: &Ingest, report: &FlowReport) -> Result<()> {
        let mut stmt = tx
            .prepare_cached(
                "INSERT INTO egress (node, seq, window_end_ms, workload_key, namespace, workload, external_bytes, internal_bytes)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )
            .map_err(Error::store("egress"))?;
        for w in &report.workloads {
            let workload = w.workload.clone().unwrap_or_default();
            stmt.execute(params![
                msg.node,
                msg.seq,
                report.window_end_unix_ms,
                workload_key(&msg.node, &workload),
                workload.namespace,
                workload.encode_to_vec(),
                w.external_bytes,
                w.internal_bytes
            ])
            .map_err(Error::store("egress"))?;
        }
        Ok(())
    }

    fn store_detection(
        tx: &Transaction<'_>,
        msg: &Ingest,
        d: &Detection,
        policy: &ResponsePolicy,
    ) -> Result<Vec<Effect>> {
        let now = msg.received_ms;
        let workload = d.workload.clone().unwrap_or_default();
        let key = workload_key(&msg.node, &workload);
        let action = policy.action_for(d);
        let active: Option<(String, i32)> = tx
            .prepare_cached(ACTIVE_INCIDENT)
            .and_then(|mut s| {
                s.query_row([&key], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()
            })
            .map_err(Error::store("find incident"))?;
        let actor = format!("agent:{}", msg.node);
        let cause = format!(
            "detection {} ({}): {}",
            d.detection_id,
            json::kind(d.kind).as_str().unwrap_or("?"),
            d.summary
        );
        let mut effects = Vec::new();
        // An update of an episode whose incident a responder already released
        // (or resolved) stays with that incident: releasing a false positive
        // must not re-open and re-contain it on the episode's next update.
        let released = if active.is_none() && !d.detection_id.is_empty() {
            tx.prepare_cached(
                "SELECT i.id, i.state FROM detections d JOIN incidents i ON i.id = d.incident_id
                 WHERE d.node = ?1 AND d.detection_id = ?2 AND i.state NOT IN (1, 2)
                 ORDER BY d.seq DESC LIMIT 1",
            )
            .and_then(|mut s| {
                s.query_row(params![msg.node, d.detection_id], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, i32>(1)?))
                })
                .optional()
            })
            .map_err(Error::store("find episode"))?
        } else {
            None
        };
        let (id, kind, state) = match active.or(released) {
            Some((id, state)) => {
                // Updates of one episode repeat its cumulative bytes: keep
                // the largest estimate rather than summing repeats.
                tx.prepare_cached(
                    "UPDATE incidents SET updated_ms = ?2, detection_count = detection_count + 1,
                        bytes_estimate = MAX(bytes_estimate, ?3), severity = MAX(severity, ?4), summary = ?5
                     WHERE id = ?1",
                )
                .and_then(|mut s| {
                    s.execute(params![id, now, d.bytes_estimate, d.severity, d.summary])
                })
                .map_err(Error::store("update incident"))?;
                let entry = if is_active(state) {
                    cause.clone()
                } else {
                    format!(
                        "{cause} (the episode goes on after the incident was closed; not re-contained)"
                    )
                };
                add_timeline(tx, &id, now, &actor, &entry, state)?;
                (id, IncidentEventKind::Updated, state)
            }
            None => {
                let mut rng = rand::rng();
                let mut id = new_incident_id(now, &mut rng);
                // Two incidents in the same second share the prefix; re-roll the suffix on a clash.
                while load_incident(tx, &id)?.is_some() {
                    id = new_incident_id(now, &mut rng);
                }
                tx.prepare_cached(
                    "INSERT INTO incidents (id, workload_key, node, namespace, workload, state, severity, kind, action,
                        opened_ms, updated_ms, detection_count, bytes_estimate, summary)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?10, 1, ?11, ?12)",
                )
                .and_then(|mut s| s.execute(params![
                        id,
                        key,
                        msg.node,
                        workload.namespace,
                        workload.encode_to_vec(),
                        IncidentState::Open as i32,
                        d.severity,
                        d.kind,
                        action as i32,
                        now,
                        d.bytes_estimate,
                        d.summary
                    ]))
                .map_err(Error::store("insert incident"))?;
                add_timeline(
                    tx,
                    &id,
                    now,
                    &actor,
                    &format!("opened: {cause}"),
                    IncidentState::Open as i32,
                )?;
                // The opening detection's facts as items of their own (the
                // full record of every detection is kept below as well).
                for item in crate::evidence::from_detection(&msg.node, d, now) {
                    evidence::insert(tx, &id, &item)?;
                }
                (id, IncidentEventKind::Opened, IncidentState::Open as i32)
            }
        };
        // Containment follows the first detection that asks for it while the
        // incident is still open; a contained incident is not re-contained.
        if state == IncidentState::Open as i32 {
            effects.extend(respond(tx, &id, &msg.node, &workload, action, policy, now)?);
        }
        Self::record_alerts(tx, &id, kind, state, now, &actor, &cause)?;
        let canonical = json::detection(&msg.node, msg.seq, d).to_string();
        let sha = Sha256::digest(canonical.as_bytes());
        let sha_hex: String = sha.iter().map(|b| format!("{b:02x}")).collect();
        tx.prepare_cached(
            "INSERT INTO detections (node, seq, incident_id, detection_id, json, sha256, stored_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )
        .and_then(|mut s| s.execute(params![msg.node, msg.seq, id, d.detection_id, canonical, sha_hex, now]))
        .map_err(Error::store("insert detection"))?;
        let incident = load_incident(tx, &id)?.ok_or_else(|| not_found(&id))?;
        effects.insert(
            0,
            Effect::Incident {
                kind,
                incident: Box::new(Incident {
                    timeline: load_timeline_tail(tx, &id, EVENT_TIMELINE_TAIL)?,
                    ..incident
                }),
            },
        );
        Ok(effects)
    }
}

impl SqliteStore {
    /// Records the alerts of what this detection changed: the opening, and a
    /// containment it caused (same transaction, so none can be lost).
    fn record_alerts(
        tx: &Transaction<'_>,
        id: &str,
        kind: IncidentEventKind,
        state_before: i32,
        now: u64,
        actor: &str,
        cause: &str,
    ) -> Result<()> {
        if kind == IncidentEventKind::Opened {
            outbox::record(
                tx,
                id,
                Transition::Opened,
                now,
                actor,
                &format!("opened: {cause}"),
            )?;
        }
        // Only an open incident can have just been contained: skip the read otherwise.
        if state_before != IncidentState::Open as i32 {
            return Ok(());
        }
        let state_after = load_incident(tx, id)?.map_or(state_before, |i| i.state);
        if state_after == IncidentState::Contained as i32 {
            outbox::record(
                tx,
                id,
                Transition::Contained,
                now,
                "controller",
                "lockdown: the workload's egress is blocked",
            )?;
        }
        Ok(())
    }
}

impl Store for SqliteStore {
    fn hellos(&self, agents: &[AgentInfo], now_ms: u64) -> Result<Vec<u64>> {
        let mut conn = self.writer()?;
        let tx = conn.transaction().map_err(Error::store("begin"))?;
        let mut last = Vec::with_capacity(agents.len());
        for info in agents {
            let seq = tx.prepare_cached(
                // The highest stored number counts detections another replica
                // stored too (merged in, see replica::merge), so their resends
                // are recognised like any other.
                "INSERT INTO agents (node, agent_version, kernel_release, first_seen_ms, last_seen_ms, dropped_flow_reports, dropped_detections, last_seq)
                 VALUES (?1, ?2, ?3, ?4, ?4, ?5, ?6, COALESCE((SELECT MAX(seq) FROM detections WHERE node = ?1), 0))
                 ON CONFLICT(node) DO UPDATE SET agent_version = ?2, kernel_release = ?3, last_seen_ms = ?4,
                    dropped_flow_reports = ?5, dropped_detections = ?6, last_seq = MAX(last_seq, excluded.last_seq)
                 RETURNING last_seq",
            )
            .and_then(|mut s| {
                s.query_row(params![info.node, info.agent_version, info.kernel_release, now_ms, info.dropped_flow_reports, info.dropped_detections], |r| r.get(0))
            })
            .map_err(Error::store("hello"))?;
            last.push(seq);
        }
        tx.commit().map_err(Error::store("commit"))?;
        Ok(last)
    }

    fn ingest(&self, batch: &[Ingest], policy: &ResponsePolicy) -> Result<Vec<IngestOutcome>> {
        let mut conn = self.writer()?;
        let tx = conn.transaction().map_err(Error::store("begin"))?;
        let mut outcomes = Vec::with_capacity(batch.len());
        // Each node's row is read once and written once per batch, not per
        // message: a batch holds several messages of most streams.
        let mut nodes: HashMap<&str, NodeProgress> = HashMap::new();
        for msg in batch {
            let progress = match nodes.entry(&msg.node) {
                Entry::Occupied(e) => e.into_mut(),
                Entry::Vacant(e) => {
                    let last: Option<u64> = tx
                        .prepare_cached("SELECT last_seq FROM agents WHERE node = ?1")
                        .and_then(|mut s| s.query_row([&msg.node], |r| r.get(0)).optional())
                        .map_err(Error::store("last seq"))?;
                    let Some(last_seq) = last else {
                        return Err(Error::FailedPrecondition(format!(
                            "node {} has not said Hello",
                            msg.node
                        )));
                    };
                    e.insert(NodeProgress {
                        before: last_seq,
                        stored: None,
                    })
                }
            };
            // Sequence numbers only grow per agent, so anything at or below the
            // highest stored one is a resend of something already stored.
            if msg.seq <= progress.last_seq() {
                outcomes.push(IngestOutcome::Duplicate);
                continue;
            }
            let effects = match &msg.payload {
                Payload::Flow(report) => {
                    Self::store_flow(&tx, msg, report)?;
                    Vec::new()
                }
                Payload::Detection(d) => Self::store_detection(&tx, msg, d, policy)?,
            };
            progress.stored = Some(msg);
            outcomes.push(IngestOutcome::Stored(effects));
        }
        for (node, progress) in &nodes {
            let Some(last) = progress.stored else {
                continue;
            };
            tx.prepare_cached(
                "UPDATE agents SET last_seq = ?2, last_seen_ms = ?3, lag_ms = ?4 WHERE node = ?1",
            )
            .and_then(|mut s| {
                s.execute(params![
                    node,
                    last.seq,
                    last.received_ms,
                    last.received_ms.saturating_sub(last.sent_at_ms)
                ])
            })
            .map_err(Error::store("advance seq"))?;
        }
        tx.commit().map_err(Error::store("commit"))?;
        Ok(outcomes)
    }

    fn list_incidents(&self, filter: &IncidentFilter) -> Result<IncidentPage> {
        let conn = self.reader()?;
        let mut sql = format!("SELECT {INCIDENT_COLUMNS} FROM incidents WHERE opened_ms >= ?1");
        let mut args: Vec<rusqlite::types::Value> = vec![(filter.since_ms as i64).into()];
        if let Some(state) = filter.state {
            args.push((state as i64).into());
            sql += &format!(" AND state = ?{}", args.len());
        }
        if let Some(ns) = &filter.namespace {
            args.push(ns.clone().into());
            sql += &format!(" AND namespace = ?{}", args.len());
        }
        if let Some(after) = &filter.after {
            args.push((after.opened_ms as i64).into());
            args.push(after.id.clone().into());
            sql += &format!(
                " AND (opened_ms, id) < (?{}, ?{})",
                args.len() - 1,
                args.len()
            );
        }
        // One extra row tells whether there is a next page.
        args.push((i64::from(filter.limit) + 1).into());
        sql += &format!(" ORDER BY opened_ms DESC, id DESC LIMIT ?{}", args.len());
        let mut stmt = conn.prepare(&sql).map_err(Error::store("list incidents"))?;
        let mut incidents = stmt
            .query_map(rusqlite::params_from_iter(args), incident_from_row)
            .map_err(Error::store("list incidents"))?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(Error::store("list incidents"))?;
        let next = if incidents.len() > filter.limit as usize {
            incidents.truncate(filter.limit as usize);
            incidents.last().map(|i| Cursor {
                opened_ms: i.opened_at_unix_ms,
                id: i.id.clone(),
            })
        } else {
            None
        };
        Ok(IncidentPage { incidents, next })
    }

    fn get_incident(&self, id: &str) -> Result<Incident> {
        let conn = self.reader()?;
        let incident = load_incident(&conn, id)?.ok_or_else(|| not_found(id))?;
        let mut incident = with_timeline(&conn, incident)?;
        incident.evidence = load_evidence(&conn, id)?;
        Ok(incident)
    }

    fn acknowledge(&self, id: &str, actor: &str, note: &str, now_ms: u64) -> Result<Incident> {
        let mut conn = self.writer()?;
        let tx = conn.transaction().map_err(Error::store("begin"))?;
        let incident = load_incident(&tx, id)?.ok_or_else(|| not_found(id))?;
        if !is_active(incident.state) {
            return Err(Error::FailedPrecondition(format!(
                "incident {id} is {}; only open or contained incidents can be acknowledged",
                json::state(incident.state).as_str().unwrap_or("closed")
            )));
        }
        tx.execute(
            "UPDATE incidents SET acknowledged_by = ?2, updated_ms = ?3 WHERE id = ?1",
            params![id, actor, now_ms],
        )
        .map_err(Error::store("acknowledge"))?;
        let cause = if note.is_empty() {
            "acknowledged".to_string()
        } else {
            format!("acknowledged: {note}")
        };
        add_timeline(&tx, id, now_ms, actor, &cause, incident.state)?;
        let incident = load_incident(&tx, id)?.ok_or_else(|| not_found(id))?;
        let incident = with_timeline(&tx, incident)?;
        tx.commit().map_err(Error::store("commit"))?;
        Ok(incident)
    }

    fn release(
        &self,
        id: &str,
        actor: &str,
        reason: &str,
        now_ms: u64,
    ) -> Result<(Incident, Vec<Effect>)> {
        let mut conn = self.writer()?;
        let tx = conn.transaction().map_err(Error::store("begin"))?;
        let incident = load_incident(&tx, id)?.ok_or_else(|| not_found(id))?;
        let mut effects = Vec::new();
        let to = match IncidentState::try_from(incident.state) {
            Ok(IncidentState::Contained) => {
                let cgroup_id = incident.workload.as_ref().map_or(0, |w| w.cgroup_id);
                effects.push(Effect::Unblock {
                    node: incident.node.clone(),
                    unblock: Unblock {
                        incident_id: id.to_string(),
                        cgroup_id,
                        reason: format!("released by {actor}: {reason}"),
                    },
                });
                // Undone in the cluster too when it was locked down there;
                // a controller without a cluster ignores it.
                if let Some(w) = incident.workload.as_ref().filter(|w| !w.pod.is_empty()) {
                    effects.push(Effect::Release {
                        incident_id: id.to_string(),
                        workload: Box::new(w.clone()),
                        by: actor.to_string(),
                        reason: reason.to_string(),
                    });
                }
                IncidentState::Released
            }
            Ok(IncidentState::Open) => IncidentState::Resolved,
            _ => {
                return Err(Error::FailedPrecondition(format!(
                    "incident {id} is already {}",
                    json::state(incident.state).as_str().unwrap_or("closed")
                )));
            }
        };
        // A throttle still in force goes with the release.
        let throttled: Option<String> = tx
            .query_row(
                "SELECT cause FROM timeline WHERE incident_id = ?1 AND cause LIKE 'throttle%'
                 ORDER BY n DESC LIMIT 1",
                [id],
                |r| r.get(0),
            )
            .optional()
            .map_err(Error::store("throttle state"))?;
        let cgroup_id = incident.workload.as_ref().map_or(0, |w| w.cgroup_id);
        if throttled.is_some_and(|c| c.starts_with("throttle:")) && cgroup_id != 0 {
            effects.push(Effect::SetCap {
                node: incident.node.clone(),
                set_cap: SetCap {
                    cgroup_id,
                    bytes: 0,
                    window_seconds: 0,
                    reason: format!("incident {id} released by {actor}: {reason}"),
                    incident_id: id.to_string(),
                },
            });
        }
        set_state(&tx, id, to, now_ms)?;
        let verb = if to == IncidentState::Released {
            "released (Unblock sent to the agent)"
        } else {
            "resolved"
        };
        add_timeline(
            &tx,
            id,
            now_ms,
            actor,
            &format!("{verb}: {reason}"),
            to as i32,
        )?;
        let transition = if to == IncidentState::Released {
            Transition::Released
        } else {
            Transition::Resolved
        };
        outbox::record(&tx, id, transition, now_ms, actor, reason)?;
        let incident = load_incident(&tx, id)?.ok_or_else(|| not_found(id))?;
        let incident = with_timeline(&tx, incident)?;
        tx.commit().map_err(Error::store("commit"))?;
        effects.insert(
            0,
            Effect::Incident {
                kind: IncidentEventKind::StateChanged,
                incident: Box::new(incident.clone()),
            },
        );
        Ok((incident, effects))
    }

    fn throttle(
        &self,
        id: &str,
        actor: &str,
        bytes: u64,
        window_seconds: u32,
        reason: &str,
        now_ms: u64,
    ) -> Result<(Incident, Vec<Effect>)> {
        let mut conn = self.writer()?;
        let tx = conn.transaction().map_err(Error::store("begin"))?;
        let incident = load_incident(&tx, id)?.ok_or_else(|| not_found(id))?;
        if !is_active(incident.state) {
            return Err(Error::FailedPrecondition(format!(
                "incident {id} is {}: only an open or contained incident can be throttled",
                json::state(incident.state).as_str().unwrap_or("closed")
            )));
        }
        let cgroup_id = incident.workload.as_ref().map_or(0, |w| w.cgroup_id);
        if cgroup_id == 0 {
            return Err(Error::FailedPrecondition(format!(
                "incident {id}: the agent reported no cgroup id for the workload; nothing to cap"
            )));
        }
        let what = if bytes == 0 {
            format!(
                "throttle lifted: in-kernel cap removal sent to the agent on {}",
                incident.node
            )
        } else {
            format!(
                "throttle: in-kernel cap of {bytes} bytes per {window_seconds} s sent to the agent on {}",
                incident.node
            )
        };
        add_timeline(
            &tx,
            id,
            now_ms,
            actor,
            &format!("{what}: {reason}"),
            incident.state,
        )?;
        tx.execute(
            "UPDATE incidents SET updated_ms = ?2 WHERE id = ?1",
            params![id, now_ms],
        )
        .map_err(Error::store("throttle"))?;
        let incident = load_incident(&tx, id)?.ok_or_else(|| not_found(id))?;
        let incident = with_timeline(&tx, incident)?;
        tx.commit().map_err(Error::store("commit"))?;
        let effects = vec![
            Effect::Incident {
                kind: IncidentEventKind::Updated,
                incident: Box::new(incident.clone()),
            },
            Effect::SetCap {
                node: incident.node.clone(),
                set_cap: SetCap {
                    cgroup_id,
                    bytes,
                    window_seconds,
                    reason: format!("incident {id}: {reason}"),
                    incident_id: id.to_string(),
                },
            },
        ];
        Ok((incident, effects))
    }

    fn add_evidence(&self, id: &str, item: &NewEvidence) -> Result<EvidenceItem> {
        let mut conn = self.writer()?;
        let tx = conn.transaction().map_err(Error::store("begin"))?;
        load_incident(&tx, id)?.ok_or_else(|| not_found(id))?;
        let stored = evidence::insert(&tx, id, item)?;
        tx.commit().map_err(Error::store("commit"))?;
        Ok(stored)
    }

    fn evidence(&self, id: &str) -> Result<Vec<EvidenceItem>> {
        let conn = self.reader()?;
        load_incident(&conn, id)?.ok_or_else(|| not_found(id))?;
        evidence::load(&conn, id)
    }

    fn note(&self, id: &str, actor: &str, cause: &str, now_ms: u64) -> Result<()> {
        let mut conn = self.writer()?;
        let tx = conn.transaction().map_err(Error::store("begin"))?;
        let incident = load_incident(&tx, id)?.ok_or_else(|| not_found(id))?;
        add_timeline(&tx, id, now_ms, actor, cause, incident.state)?;
        tx.commit().map_err(Error::store("commit"))
    }

    fn blocks_for(&self, node: &str) -> Result<Vec<Block>> {
        let conn = self.reader()?;
        let mut stmt = conn
            .prepare_cached(&format!(
                "SELECT {INCIDENT_COLUMNS} FROM incidents WHERE node = ?1 AND state = ?2"
            ))
            .map_err(Error::store("blocks"))?;
        let incidents = stmt
            .query_map(
                params![node, IncidentState::Contained as i32],
                incident_from_row,
            )
            .map_err(Error::store("blocks"))?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(Error::store("blocks"))?;
        Ok(incidents
            .into_iter()
            .filter_map(|i| {
                let w = i.workload?;
                Some(Block {
                    cgroup_id: w.cgroup_id,
                    reason: format!("incident {} is contained (re-sent on reconnect)", i.id),
                    incident_id: i.id,
                    workload: Some(w),
                    remote_cidrs: Vec::new(),
                })
            })
            .collect())
    }

    fn top_talkers(
        &self,
        since_ms: u64,
        limit: u32,
        namespace: Option<&str>,
    ) -> Result<Vec<Talker>> {
        let conn = self.reader()?;
        let mut stmt = conn
            .prepare_cached(
                "SELECT node, MAX(workload), SUM(external_bytes), SUM(internal_bytes) FROM egress
                 WHERE window_end_ms >= ?1 AND (?2 IS NULL OR namespace = ?2)
                 GROUP BY workload_key ORDER BY SUM(external_bytes) DESC LIMIT ?3",
            )
            .map_err(Error::store("top talkers"))?;
        let rows = stmt
            .query_map(params![since_ms, namespace, limit], |r| {
                let blob: Vec<u8> = r.get(1)?;
                Ok(Talker {
                    node: r.get(0)?,
                    workload: Workload::decode(blob.as_slice()).ok(),
                    external_bytes: r.get(2)?,
                    internal_bytes: r.get(3)?,
                })
            })
            .map_err(Error::store("top talkers"))?;
        rows.collect::<rusqlite::Result<_>>()
            .map_err(Error::store("top talkers"))
    }

    fn list_nodes(&self) -> Result<Vec<Node>> {
        let conn = self.reader()?;
        let mut stmt = conn
            .prepare_cached(
                "SELECT node, agent_version, kernel_release, last_seen_ms, last_seq, lag_ms, dropped_flow_reports, dropped_detections
                 FROM agents ORDER BY node",
            )
            .map_err(Error::store("nodes"))?;
        let rows = stmt
            .query_map([], |r| {
                Ok(Node {
                    name: r.get(0)?,
                    agent_version: r.get(1)?,
                    kernel_release: r.get(2)?,
                    connected: false,
                    last_seen_unix_ms: r.get(3)?,
                    last_seq: r.get(4)?,
                    lag_ms: r.get(5)?,
                    dropped_flow_reports: r.get(6)?,
                    dropped_detections: r.get(7)?,
                })
            })
            .map_err(Error::store("nodes"))?;
        rows.collect::<rusqlite::Result<_>>()
            .map_err(Error::store("nodes"))
    }

    fn egress_series(
        &self,
        workload_key: &str,
        from_ms: u64,
        to_ms: u64,
    ) -> Result<Vec<EgressPoint>> {
        let conn = self.reader()?;
        let mut stmt = conn
            .prepare_cached(
                "SELECT window_end_ms, SUM(external_bytes), SUM(internal_bytes) FROM egress
                 WHERE window_end_ms BETWEEN ?1 AND ?2 AND workload_key = ?3
                 GROUP BY window_end_ms ORDER BY window_end_ms LIMIT 10000",
            )
            .map_err(Error::store("egress series"))?;
        let rows = stmt
            .query_map(params![from_ms, to_ms, workload_key], |r| {
                Ok(EgressPoint {
                    window_end_ms: r.get(0)?,
                    external_bytes: r.get(1)?,
                    internal_bytes: r.get(2)?,
                })
            })
            .map_err(Error::store("egress series"))?;
        rows.collect::<rusqlite::Result<_>>()
            .map_err(Error::store("egress series"))
    }

    fn prune_egress(&self, before_ms: u64, limit: u32) -> Result<u64> {
        let conn = self.writer()?;
        let mut stmt = conn
            .prepare_cached(
                "DELETE FROM egress WHERE rowid IN
                 (SELECT rowid FROM egress WHERE window_end_ms < ?1 ORDER BY window_end_ms LIMIT ?2)",
            )
            .map_err(Error::store("prune egress"))?;
        let deleted = stmt
            .execute(params![before_ms, limit])
            .map_err(Error::store("prune egress"))?;
        Ok(deleted as u64)
    }
}

/// Severity ordering used by `MAX(severity)` relies on the enum's numbers growing with badness.
const _: () = assert!(
    (Severity::Low as i32) < (Severity::High as i32)
        && (Severity::High as i32) < (Severity::Critical as i32)
);

#[cfg(test)]
mod tests {
    use exfilguard_proto::v1::{DetectionKind, Evidence};

    use super::*;

    fn open_temp() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("c.db")).unwrap();
        (dir, store)
    }

    fn hello(store: &SqliteStore, node: &str) -> u64 {
        store
            .hello(
                &AgentInfo {
                    node: node.into(),
                    agent_version: "0.1.0".into(),
                    ..Default::default()
                },
                1,
            )
            .unwrap()
    }

    fn detection(node: &str, seq: u64, pod: &str, severity: Severity, cgroup_id: u64) -> Ingest {
        Ingest {
            node: node.into(),
            seq,
            sent_at_ms: 1_000,
            received_ms: 1_795_356_192_000 + seq,
            payload: Payload::Detection(Box::new(Detection {
                detection_id: format!("d{seq}"),
                kind: DetectionKind::Volume as i32,
                severity: severity as i32,
                workload: Some(Workload {
                    namespace: "shop".into(),
                    pod: pod.into(),
                    cgroup_id,
                    ..Default::default()
                }),
                summary: format!("{seq} MB out"),
                bytes_estimate: 100,
                evidence: Some(Evidence {
                    registered_domain: "evil.example".into(),
                    ..Default::default()
                }),
                ..Default::default()
            })),
        }
    }

    #[test]
    fn committed_frames_reach_the_database_file_without_an_inline_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        let store = SqliteStore::open(&path).unwrap();
        hello(&store, "n1");
        let file_len = || std::fs::metadata(&path).unwrap().len();
        let before = file_len();
        // Far fewer WAL pages than `wal_autocheckpoint`: the writer never
        // checkpoints them itself, so only the background thread can.
        let batch: Vec<Ingest> = (1..=200)
            .map(|seq| detection("n1", seq, &format!("db-{seq}"), Severity::High, seq))
            .collect();
        store.ingest(&batch, &ResponsePolicy::default()).unwrap();
        let deadline = std::time::Instant::now() + CHECKPOINT_INTERVAL * 40;
        while file_len() <= before && std::time::Instant::now() < deadline {
            std::thread::sleep(CHECKPOINT_INTERVAL / 4);
        }
        assert!(
            file_len() > before,
            "the database file stayed at {before} bytes"
        );
        // Stopping the thread with the store must not hang.
        drop(store);
        let reopened = SqliteStore::open(&path).unwrap();
        assert_eq!(reopened.list_nodes().unwrap()[0].last_seq, 200);
    }

    #[test]
    fn hellos_are_answered_in_order_in_one_call() {
        let (_dir, store) = open_temp();
        hello(&store, "n1");
        store
            .ingest(
                &[detection("n1", 7, "db-0", Severity::High, 7)],
                &ResponsePolicy::default(),
            )
            .unwrap();
        let infos: Vec<AgentInfo> = ["n2", "n1", "n3"]
            .iter()
            .map(|n| AgentInfo {
                node: n.to_string(),
                agent_version: "0.2.0".into(),
                ..Default::default()
            })
            .collect();
        assert_eq!(store.hellos(&infos, 5).unwrap(), vec![0, 7, 0]);
        let nodes = store.list_nodes().unwrap();
        assert_eq!(nodes.len(), 3);
        assert!(nodes.iter().all(|n| n.agent_version == "0.2.0"));
    }

    #[test]
    fn ingest_statements_stay_prepared_across_bindings() {
        let (_dir, store) = open_temp();
        hello(&store, "n1");
        let policy = ResponsePolicy::default();
        // One episode updated again and again: the incident lookups run per detection.
        for seq in 1..=6 {
            store
                .ingest(&[detection("n1", seq, "db-0", Severity::High, 7)], &policy)
                .unwrap();
        }
        let conn = store.writer().unwrap();
        for sql in [ACTIVE_INCIDENT, TIMELINE_TAIL] {
            let stmt = conn.prepare_cached(sql).unwrap();
            assert_eq!(
                stmt.get_status(rusqlite::StatementStatus::RePrepare),
                0,
                "re-prepared per binding: {sql}"
            );
        }
    }

    #[test]
    fn detections_correlate_into_one_incident_per_episode_and_dedupe() {
        let (_dir, store) = open_temp();
        assert_eq!(hello(&store, "n1"), 0);
        let policy = ResponsePolicy::default();
        let out = store
            .ingest(
                &[
                    detection("n1", 1, "db-0", Severity::High, 7),
                    detection("n1", 2, "db-0", Severity::High, 7),
                ],
                &policy,
            )
            .unwrap();
        assert!(matches!(out[0], IngestOutcome::Stored(_)));
        // Resend of both plus one new: two duplicates, one stored.
        let out = store
            .ingest(
                &[
                    detection("n1", 1, "db-0", Severity::High, 7),
                    detection("n1", 2, "db-0", Severity::High, 7),
                    detection("n1", 3, "web-1", Severity::High, 8),
                ],
                &policy,
            )
            .unwrap();
        assert!(
            matches!(out[0], IngestOutcome::Duplicate)
                && matches!(out[1], IngestOutcome::Duplicate)
        );
        assert!(matches!(out[2], IngestOutcome::Stored(_)));
        let page = store
            .list_incidents(&IncidentFilter {
                limit: 10,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(page.incidents.len(), 2);
        let db = page
            .incidents
            .iter()
            .find(|i| i.workload.as_ref().unwrap().pod == "db-0")
            .unwrap();
        assert_eq!(db.detection_count, 2);
        let full = store.get_incident(&db.id).unwrap();
        assert_eq!(full.evidence.len(), 2);
        assert_eq!(full.evidence[0].sha256.len(), 64);
        assert_eq!(hello(&store, "n1"), 3);
    }

    /// Ingests one critical detection for `ns/pod` and returns its effects
    /// and the incident (with timeline) it opened.
    fn contain(
        store: &SqliteStore,
        policy: &ResponsePolicy,
        seq: u64,
        ns: &str,
        pod: &str,
        cgroup_id: u64,
    ) -> (Vec<Effect>, Incident) {
        let mut msg = detection("n1", seq, pod, Severity::Critical, cgroup_id);
        if let Payload::Detection(d) = &mut msg.payload {
            d.workload.as_mut().unwrap().namespace = ns.into();
        }
        let out = store.ingest(&[msg], policy).unwrap();
        let Some(IngestOutcome::Stored(effects)) = out.into_iter().next() else {
            panic!("not stored");
        };
        let Some(Effect::Incident { incident, .. }) = effects.first() else {
            panic!("no incident effect: {effects:?}");
        };
        let full = store.get_incident(&incident.id).unwrap();
        (effects, full)
    }

    fn last_cause(i: &Incident) -> &str {
        &i.timeline.last().unwrap().cause
    }

    #[test]
    fn cluster_lockdown_goes_with_the_block_and_alone_without_a_cgroup() {
        let (_dir, store) = open_temp();
        hello(&store, "n1");
        let policy = ResponsePolicy {
            cluster_containment: true,
            ..Default::default()
        };
        let (effects, incident) = contain(&store, &policy, 1, "shop", "db-0", 42);
        assert_eq!(incident.state, IncidentState::Contained as i32);
        assert!(matches!(&effects[1], Effect::Block { block, .. } if block.cgroup_id == 42));
        assert!(matches!(&effects[2],
            Effect::Lockdown { incident_id, workload, dry_run: false }
                if *incident_id == incident.id && workload.pod == "db-0"));
        assert_eq!(
            last_cause(&incident),
            "lockdown: in-kernel Block of cgroup 42 sent to the agent on n1; \
             NetworkPolicy and quarantine label requested for pod shop/db-0"
        );
        // No cgroup id from the agent: the NetworkPolicy alone contains.
        let (effects, incident) = contain(&store, &policy, 2, "shop", "web-1", 0);
        assert_eq!(incident.state, IncidentState::Contained as i32);
        assert_eq!(effects.len(), 2, "{effects:?}");
        assert!(matches!(
            &effects[1],
            Effect::Lockdown { dry_run: false, .. }
        ));
        // Release undoes both.
        let (_, effects) = store
            .release(&incident.id, "alice", "false positive", 5)
            .unwrap();
        assert!(matches!(&effects[2],
            Effect::Release { workload, by, reason, .. }
                if workload.pod == "web-1" && by == "alice" && reason == "false positive"));
    }

    #[test]
    fn standalone_lockdown_has_no_cluster_effect() {
        let (_dir, store) = open_temp();
        hello(&store, "n1");
        let policy = ResponsePolicy::default();
        let (effects, incident) = contain(&store, &policy, 1, "shop", "db-0", 42);
        assert_eq!(effects.len(), 2, "{effects:?}");
        assert!(matches!(&effects[1], Effect::Block { .. }));
        let (effects, incident2) = contain(&store, &policy, 2, "shop", "web-1", 0);
        assert_eq!(effects.len(), 1, "{effects:?}");
        assert_eq!(incident2.state, IncidentState::Open as i32);
        assert!(last_cause(&incident2).contains("no cgroup id"));
        assert_eq!(incident.state, IncidentState::Contained as i32);
    }

    #[test]
    fn protected_namespaces_are_never_contained() {
        let (_dir, store) = open_temp();
        hello(&store, "n1");
        for (i, action) in [PolicyAction::Lockdown, PolicyAction::DryRun]
            .into_iter()
            .enumerate()
        {
            let policy = ResponsePolicy {
                critical: action,
                cluster_containment: true,
                ..Default::default()
            };
            let pod = format!("coredns-{i}");
            let (effects, incident) =
                contain(&store, &policy, i as u64 + 1, "kube-system", &pod, 42);
            assert_eq!(effects.len(), 1, "{action:?}: {effects:?}");
            assert_eq!(incident.state, IncidentState::Open as i32);
            assert!(
                last_cause(&incident)
                    .contains("namespace kube-system is on the protected list; not contained"),
                "{}",
                last_cause(&incident)
            );
        }
        // The same pod name elsewhere is contained.
        let policy = ResponsePolicy::default();
        let (_, incident) = contain(&store, &policy, 9, "shop", "coredns-0", 42);
        assert_eq!(incident.state, IncidentState::Contained as i32);
    }

    #[test]
    fn dry_run_in_a_cluster_asks_for_a_plan_and_changes_nothing() {
        let (_dir, store) = open_temp();
        hello(&store, "n1");
        let policy = ResponsePolicy {
            critical: PolicyAction::DryRun,
            cluster_containment: true,
            ..Default::default()
        };
        let (effects, incident) = contain(&store, &policy, 1, "shop", "db-0", 42);
        assert_eq!(incident.state, IncidentState::Open as i32);
        assert_eq!(effects.len(), 2, "{effects:?}");
        assert!(matches!(
            &effects[1],
            Effect::Lockdown { dry_run: true, .. }
        ));
    }

    #[test]
    fn throttle_sends_a_cap_keeps_the_state_and_release_lifts_it() {
        let (_dir, store) = open_temp();
        hello(&store, "n1");
        store
            .ingest(
                &[detection("n1", 1, "db-0", Severity::High, 42)],
                &ResponsePolicy::default(),
            )
            .unwrap();
        let id = store
            .list_incidents(&IncidentFilter {
                limit: 1,
                ..Default::default()
            })
            .unwrap()
            .incidents[0]
            .id
            .clone();
        let (incident, effects) = store
            .throttle(&id, "alice", 1_000_000, 60, "slow it down", 10)
            .unwrap();
        assert_eq!(incident.state, IncidentState::Open as i32);
        assert!(effects.iter().any(|e| matches!(e,
            Effect::SetCap { node, set_cap } if node == "n1" && set_cap.cgroup_id == 42
                && set_cap.bytes == 1_000_000 && set_cap.window_seconds == 60 && set_cap.incident_id == id)));
        let (_, effects) = store.release(&id, "alice", "done", 11).unwrap();
        assert!(
            effects
                .iter()
                .any(|e| matches!(e, Effect::SetCap { set_cap, .. } if set_cap.bytes == 0)),
            "release lifts the throttle: {effects:?}"
        );
        // A closed incident cannot be throttled.
        assert!(matches!(
            store
                .throttle(&id, "alice", 5, 60, "again", 12)
                .unwrap_err(),
            Error::FailedPrecondition(_)
        ));
    }

    #[test]
    fn critical_detection_contains_and_release_unblocks() {
        let (_dir, store) = open_temp();
        hello(&store, "n1");
        let out = store
            .ingest(
                &[detection("n1", 1, "db-0", Severity::Critical, 42)],
                &ResponsePolicy::default(),
            )
            .unwrap();
        let IngestOutcome::Stored(effects) = &out[0] else {
            panic!("not stored")
        };
        let block = effects
            .iter()
            .find_map(|e| match e {
                Effect::Block { node, block } => {
                    Some((node.clone(), block.cgroup_id, block.incident_id.clone()))
                }
                _ => None,
            })
            .expect("a Block effect");
        assert_eq!((block.0.as_str(), block.1), ("n1", 42));
        let incident = store.get_incident(&block.2).unwrap();
        assert_eq!(incident.state, IncidentState::Contained as i32);
        assert_eq!(store.blocks_for("n1").unwrap().len(), 1);
        let (released, effects) = store
            .release(&block.2, "alice (responder)", "false positive", 5)
            .unwrap();
        assert_eq!(released.state, IncidentState::Released as i32);
        assert!(
            effects
                .iter()
                .any(|e| matches!(e, Effect::Unblock { unblock, .. } if unblock.cgroup_id == 42))
        );
        assert!(store.blocks_for("n1").unwrap().is_empty());
        let again = store.release(&block.2, "alice", "again", 6).unwrap_err();
        assert!(matches!(again, Error::FailedPrecondition(_)), "{again}");
        assert!(matches!(
            store.get_incident("EXFIL-nope").unwrap_err(),
            Error::NotFound { .. }
        ));
        // The same episode (detection id) going on after the release stays
        // with the released incident: not re-opened, not re-contained.
        let mut update = detection("n1", 2, "db-0", Severity::Critical, 42);
        if let Payload::Detection(d) = &mut update.payload {
            d.detection_id = "d1".into();
            d.bytes_estimate = 300;
        }
        let out = store.ingest(&[update], &ResponsePolicy::default()).unwrap();
        let IngestOutcome::Stored(effects) = &out[0] else {
            panic!("not stored")
        };
        assert!(
            !effects.iter().any(|e| matches!(e, Effect::Block { .. })),
            "re-contained a released episode: {effects:?}"
        );
        let after = store.get_incident(&block.2).unwrap();
        assert_eq!(after.state, IncidentState::Released as i32);
        assert_eq!((after.detection_count, after.bytes_estimate), (2, 300));
        // A new detection after release opens a new episode.
        store
            .ingest(
                &[detection("n1", 3, "db-0", Severity::High, 42)],
                &ResponsePolicy::default(),
            )
            .unwrap();
        let page = store
            .list_incidents(&IncidentFilter {
                limit: 10,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(page.incidents.len(), 2);
        let timeline = store.get_incident(&block.2).unwrap().timeline;
        let causes: Vec<&str> = timeline.iter().map(|t| t.cause.as_str()).collect();
        assert!(causes[0].starts_with("opened: detection d1"), "{causes:?}");
        assert!(
            causes.iter().any(|c| c.starts_with("lockdown:")),
            "{causes:?}"
        );
        assert!(causes[2].contains("false positive"), "{causes:?}");
        assert!(causes[3].contains("not re-contained"), "{causes:?}");
    }

    #[test]
    fn paging_and_reopen_keep_everything() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        {
            let store = SqliteStore::open(&path).unwrap();
            hello(&store, "n1");
            let batch: Vec<Ingest> = (1..=7)
                .map(|s| detection("n1", s, &format!("p{s}"), Severity::Low, 0))
                .collect();
            store.ingest(&batch, &ResponsePolicy::default()).unwrap();
        }
        let store = SqliteStore::open(&path).unwrap();
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let page = store
                .list_incidents(&IncidentFilter {
                    limit: 3,
                    after,
                    ..Default::default()
                })
                .unwrap();
            seen.extend(page.incidents.into_iter().map(|i| i.id));
            match page.next {
                Some(c) => after = Some(c),
                None => break,
            }
        }
        assert_eq!(seen.len(), 7);
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 7);
        let filtered = store
            .list_incidents(&IncidentFilter {
                limit: 10,
                namespace: Some("other".into()),
                ..Default::default()
            })
            .unwrap();
        assert!(filtered.incidents.is_empty());
    }

    #[test]
    fn change_events_carry_only_the_newest_timeline_entries() {
        let (_dir, store) = open_temp();
        hello(&store, "n1");
        let batch: Vec<Ingest> = (1..=20)
            .map(|s| detection("n1", s, "db-0", Severity::High, 7))
            .collect();
        let outcomes = store.ingest(&batch, &ResponsePolicy::default()).unwrap();
        let Some(IngestOutcome::Stored(effects)) = outcomes.last() else {
            panic!("not stored")
        };
        let Some(Effect::Incident { incident, .. }) = effects.first() else {
            panic!("no incident effect")
        };
        assert_eq!(incident.timeline.len(), EVENT_TIMELINE_TAIL as usize);
        assert!(
            incident
                .timeline
                .last()
                .unwrap()
                .cause
                .contains("detection d20"),
            "{:?}",
            incident.timeline
        );
        // GetIncident still has all of it.
        assert_eq!(store.get_incident(&incident.id).unwrap().timeline.len(), 20);
    }

    #[test]
    fn evidence_items_keep_their_hashes_across_a_restart_and_cannot_be_changed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        let big = vec![b'{'; crate::evidence::MAX_ITEM_BYTES + 1000];
        let (id, pod_item) = {
            let store = SqliteStore::open(&path).unwrap();
            hello(&store, "n1");
            store
                .ingest(
                    &[detection("n1", 1, "db-0", Severity::High, 7)],
                    &ResponsePolicy::default(),
                )
                .unwrap();
            let id = store
                .list_incidents(&IncidentFilter {
                    limit: 1,
                    ..Default::default()
                })
                .unwrap()
                .incidents[0]
                .id
                .clone();
            let pod_item = store
                .add_evidence(
                    &id,
                    &NewEvidence {
                        kind: "pod".into(),
                        media_type: "application/json".into(),
                        source: "kubernetes-api GET /api/v1/namespaces/shop/pods/db-0".into(),
                        captured_ms: 1_795_356_193_000,
                        content: br#"{"kind":"Pod"}"#.to_vec(),
                    },
                )
                .unwrap();
            store
                .add_evidence(
                    &id,
                    &NewEvidence {
                        kind: "pod_events".into(),
                        media_type: "application/json".into(),
                        source: "test".into(),
                        captured_ms: 1_795_356_194_000,
                        content: big.clone(),
                    },
                )
                .unwrap();
            // Unknown incident: NOT_FOUND, nothing stored.
            assert!(matches!(
                store.add_evidence(
                    "EXFIL-nope",
                    &NewEvidence {
                        kind: "pod".into(),
                        media_type: "x".into(),
                        source: "x".into(),
                        captured_ms: 1,
                        content: vec![],
                    }
                ),
                Err(Error::NotFound { .. })
            ));
            assert!(matches!(
                store.evidence("EXFIL-nope"),
                Err(Error::NotFound { .. })
            ));
            (id, pod_item)
        };
        let store = SqliteStore::open(&path).unwrap();
        let items = store.evidence(&id).unwrap();
        let kinds: Vec<&str> = items.iter().map(|i| i.kind.as_str()).collect();
        // Opening detection's items (same capture time: record first), then the pod's.
        assert_eq!(
            kinds,
            [
                "detection",
                "workload",
                "flows",
                "dns_samples",
                "pod",
                "pod_events"
            ]
        );
        for item in &items {
            assert_eq!(
                item.sha256,
                crate::evidence::sha256_hex(&item.content),
                "{}",
                item.kind
            );
            assert_eq!(item.size, item.content.len() as u64);
        }
        assert_eq!(items[0].item_id, "detection/n1/1");
        assert_eq!(items[0].source, "agent:n1");
        // The detection record is the same bytes GetIncident shows.
        let record = &store.get_incident(&id).unwrap().evidence[0];
        assert_eq!(items[0].content, record.json.as_bytes());
        assert_eq!(items[0].sha256, record.sha256);
        assert_eq!(items[4], pod_item);
        let truncated = &items[5];
        assert_eq!(truncated.size as usize, crate::evidence::MAX_ITEM_BYTES);
        assert_eq!(truncated.original_size as usize, big.len());
        assert_eq!(truncated.original_sha256, crate::evidence::sha256_hex(&big));
        assert!(
            truncated.note.starts_with("truncated:"),
            "{}",
            truncated.note
        );
        // Append-only, even for someone with a SQL prompt on the live schema.
        let conn = Connection::open(&path).unwrap();
        for sql in [
            "UPDATE evidence SET content = x'00'",
            "DELETE FROM evidence",
            "UPDATE detections SET json = '{}'",
            "DELETE FROM detections",
        ] {
            let err = conn.execute(sql, []).unwrap_err();
            assert!(err.to_string().contains("append-only"), "{sql}: {err}");
        }
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        drop(SqliteStore::open(&path).unwrap());
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", 99)
            .unwrap();
        assert!(matches!(
            SqliteStore::open(&path),
            Err(Error::FailedPrecondition(_))
        ));
    }
}
