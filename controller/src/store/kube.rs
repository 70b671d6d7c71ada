//! The Kubernetes-API store backend: incidents (timeline, evidence, alerts
//! and their deliveries) live in `ExfilIncident` objects, so every
//! controller replica sees the same incidents and `kubectl get exfilincidents`
//! lists them.
//!
//! Each replica keeps a working copy in its own SQLite file (which also holds
//! what is per replica: its agents' sequence numbers and flow reports). A
//! write commits there first (correlation and the outbox stay one SQLite
//! transaction), then the incident's whole record is written to its object's
//! status with the `resourceVersion` last seen (optimistic concurrency). A
//! conflict means another replica changed it meanwhile: its record is merged
//! in (see [`replica`]) and the write tried again. A watch merges what the
//! other replicas write; a merge that moves an incident's state produces the
//! commands for this replica, so a Block for an agent connected here goes
//! out here, whichever replica contained the incident.
//!
//! A write waits for the API server at most [`PUBLISH_TIMEOUT`]; one it does
//! not take (unreachable, refused, too slow) is kept and retried in the
//! background. The local commit already happened, so the agent's Ack and the
//! responder's answer go out all the same.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    io::{Read as _, Write as _},
    sync::{Arc, Mutex},
    time::Duration,
};

use base64::Engine as _;
use exfilguard_proto::v1::{
    Block, EvidenceItem, Incident, IncidentEventKind, IncidentState, Node, Talker, Workload,
};
use futures::StreamExt as _;
use kube::{
    Api,
    api::{ObjectMeta, PostParams},
    runtime::{WatchStreamExt as _, watcher},
};
use prost::Message as _;
use tokio::{
    runtime::Handle,
    sync::{Notify, mpsc},
    task::JoinHandle,
};

use super::{
    AgentInfo, Delivery, DeliveryStatus, Effect, EgressPoint, IncidentFilter, IncidentPage, Ingest,
    IngestOutcome, Outbox, Store, UnroutedAlert,
    sqlite::{
        SqliteStore,
        replica::{IncidentRecord, MergeOutcome},
    },
};
use crate::{
    Error, Result,
    correlate::ResponsePolicy,
    evidence::NewEvidence,
    json,
    k8s::{
        FIELD_MANAGER,
        crd::{
            DeliveryEntry, EvidenceDigest, ExfilIncident, ExfilIncidentSpec, ExfilIncidentStatus,
            IncidentWorkload, TimelineEntry,
        },
    },
    time::rfc3339,
};

/// Most bytes of `status.record` (base64 of the gzipped record): etcd takes
/// objects up to 1.5 MiB, and the readable summary needs room too. Evidence
/// items are left out, largest first, until the record fits.
pub const RECORD_BUDGET: usize = 768 * 1024;

/// Largest record a replica accepts after decompression (a bad object must
/// not exhaust memory).
const MAX_RECORD_JSON: u64 = 64 * 1024 * 1024;

/// Timeline entries in the readable summary.
const TIMELINE_TAIL: usize = 20;

/// Writes of one incident before giving up on a burst of conflicts (the
/// record is kept and written again later).
const WRITE_ATTEMPTS: u32 = 5;

/// How long a write may hold up the caller (ingest, a responder's request)
/// before it is left to the background retry.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(3);

/// How often writes the API server did not take are tried again.
const REPUBLISH_EVERY: Duration = Duration::from_secs(2);

/// The object name of an incident: its id in lower case
/// (`EXFIL-20261122-140312-7f3a` → `exfil-20261122-140312-7f3a`).
pub fn object_name(incident_id: &str) -> String {
    incident_id.to_ascii_lowercase()
}

/// Incidents in `ExfilIncident` objects, with a local SQLite working copy.
pub struct KubeStore {
    local: SqliteStore,
    api: Api<ExfilIncident>,
    rt: Handle,
    /// Last `resourceVersion` seen of each incident's object.
    versions: Mutex<HashMap<String, String>>,
    /// Incidents whose last write did not reach the API server.
    dirty: Mutex<BTreeSet<String>>,
    wake: Notify,
    effects: mpsc::UnboundedSender<Vec<Effect>>,
}

impl KubeStore {
    /// A store over `local` that keeps incidents in `namespace`. Blocking
    /// methods run the API calls on `rt` (call them from blocking threads,
    /// as every caller of [`Store`] does). The receiver gets the commands
    /// that merging other replicas' writes calls for; hand them to the hub.
    pub fn new(
        local: SqliteStore,
        client: kube::Client,
        namespace: &str,
        rt: Handle,
    ) -> (Arc<Self>, mpsc::UnboundedReceiver<Vec<Effect>>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let store = Arc::new(Self {
            local,
            api: Api::namespaced(client, namespace),
            rt,
            versions: Mutex::new(HashMap::new()),
            dirty: Mutex::new(BTreeSet::new()),
            wake: Notify::new(),
            effects: tx,
        });
        (store, rx)
    }

    /// Follows the other replicas' writes and retries writes that failed,
    /// until the task is aborted.
    pub fn spawn(self: &Arc<Self>) -> JoinHandle<()> {
        let store = self.clone();
        // One task, so aborting it stops both.
        tokio::spawn(async move {
            tokio::select! {
                () = store.clone().follow() => {}
                () = store.clone().republish() => {}
            }
        })
    }

    /// This replica's record of incident `id` (what it would write).
    pub fn local_record(&self, id: &str) -> Result<IncidentRecord> {
        self.local
            .export_incident(id)?
            .map(|r| trim(r).0)
            .ok_or_else(|| Error::NotFound {
                kind: "incident",
                id: id.to_string(),
            })
    }

    /// Incidents whose record still has to reach the API server.
    pub fn pending_writes(&self) -> usize {
        self.dirty.lock().map_or(0, |d| d.len())
    }

    async fn follow(self: Arc<Self>) {
        let mut events = watcher(self.api.clone(), watcher::Config::default())
            .default_backoff()
            .boxed();
        let mut listed: HashSet<String> = HashSet::new();
        while let Some(ev) = events.next().await {
            let (obj, listing) = match ev {
                Ok(watcher::Event::Apply(o)) => (o, false),
                Ok(watcher::Event::InitApply(o)) => (o, true),
                Ok(watcher::Event::Init) => {
                    listed.clear();
                    continue;
                }
                Ok(watcher::Event::InitDone) => {
                    // Incidents this replica holds that the API server does
                    // not (written while it was unreachable): write them.
                    let store = self.clone();
                    let listed = std::mem::take(&mut listed);
                    let missing = tokio::task::spawn_blocking(move || {
                        store.local.incident_ids().map(|ids| {
                            ids.into_iter()
                                .filter(|id| !listed.contains(id))
                                .collect::<Vec<_>>()
                        })
                    })
                    .await;
                    match missing {
                        Ok(Ok(ids)) if !ids.is_empty() => {
                            tracing::info!(
                                count = ids.len(),
                                "incidents not yet in the API server; writing them"
                            );
                            self.mark_dirty(ids);
                        }
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => tracing::error!(error = %e, "cannot list local incidents"),
                        Err(e) => tracing::error!(error = %e, "incident listing task failed"),
                    }
                    continue;
                }
                Ok(watcher::Event::Delete(o)) => {
                    // Deleted by a person: this replica keeps its copy and
                    // does not write it back unless it changes again.
                    if let Ok(mut v) = self.versions.lock() {
                        v.remove(&o.spec.incident_id);
                    }
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "ExfilIncident watch failed; retrying with backoff");
                    continue;
                }
            };
            listed.insert(obj.spec.incident_id.clone());
            let store = self.clone();
            let done = tokio::task::spawn_blocking(move || store.import(&obj, listing)).await;
            match done {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "ExfilIncident not merged"),
                Err(e) => tracing::error!(error = %e, "ExfilIncident merge task failed"),
            }
        }
    }

    async fn republish(self: Arc<Self>) {
        loop {
            tokio::select! {
                () = self.wake.notified() => {}
                () = tokio::time::sleep(REPUBLISH_EVERY) => {}
            }
            let ids: Vec<String> = match self.dirty.lock() {
                Ok(mut d) => std::mem::take(&mut *d).into_iter().collect(),
                Err(_) => return,
            };
            let mut ids = ids.into_iter();
            while let Some(id) = ids.next() {
                if let Err(e) = self.write(&id).await {
                    tracing::warn!(incident = %id, error = %e, "incident not written to the API server; retrying");
                    // Back off until the next round: put them back without
                    // waking ourselves.
                    if let Ok(mut d) = self.dirty.lock() {
                        d.insert(id);
                        d.extend(ids);
                    }
                    break;
                }
            }
        }
    }

    fn mark_dirty(&self, ids: impl IntoIterator<Item = String>) {
        if let Ok(mut d) = self.dirty.lock() {
            d.extend(ids);
        }
        self.wake.notify_one();
    }

    /// Merges another replica's write (one watch event). Our own writes come
    /// back with the version we already have and are skipped. `listing`: the
    /// object comes from a (re-)list, where incidents new to this replica
    /// are old news: they are not announced as opened (no evidence capture
    /// or watcher event for each), while state changes still command.
    pub fn import(&self, obj: &ExfilIncident, listing: bool) -> Result<()> {
        let id = &obj.spec.incident_id;
        let rv = obj.metadata.resource_version.clone().unwrap_or_default();
        if self
            .versions
            .lock()
            .map_err(|_| poisoned())?
            .get(id)
            .is_some_and(|v| *v == rv)
        {
            return Ok(());
        }
        if !self.absorb(obj, listing)? {
            // We know more than the object says: write it back.
            self.mark_dirty([id.clone()]);
        }
        Ok(())
    }

    /// Merges `obj` into the working copy and remembers its version; true
    /// when the object already holds everything this replica knows.
    fn absorb(&self, obj: &ExfilIncident, listing: bool) -> Result<bool> {
        let id = obj.spec.incident_id.clone();
        let rv = obj.metadata.resource_version.clone().unwrap_or_default();
        let record = match obj.status.as_ref().filter(|s| !s.record.is_empty()) {
            Some(status) => decode_record(&status.record)?,
            None => {
                // Created but its status not written yet (the writer died
                // between the two calls): ours, if we have it, goes in.
                self.remember(&id, rv)?;
                return Ok(self.local.export_incident(&id)?.is_none());
            }
        };
        if object_name(&record.incident.id) != obj.metadata.name.clone().unwrap_or_default() {
            return Err(Error::InvalidArgument(format!(
                "ExfilIncident {:?} carries the record of incident {}",
                obj.metadata.name, record.incident.id
            )));
        }
        let (outcome, mut effects): (MergeOutcome, Vec<Effect>) =
            self.local.merge_incident(&record)?;
        if listing {
            effects.retain(|e| {
                !matches!(e, Effect::Incident { kind, .. } if *kind == IncidentEventKind::Opened)
            });
        }
        if outcome.changed {
            tracing::debug!(incident = %id, before = ?outcome.before, after = outcome.after, "merged another replica's write");
        }
        if !effects.is_empty() && self.effects.send(effects).is_err() {
            tracing::warn!(incident = %id, "nobody takes the merged incident's commands");
        }
        self.remember(&id, rv)?;
        let mine = self
            .local
            .export_incident(&id)?
            .ok_or_else(|| Error::Unavailable(format!("incident {id} vanished after a merge")))?;
        let omitted = obj.status.as_ref().map_or(&[][..], |s| &s.evidence[..]);
        Ok(covers(&record, omitted, &mine))
    }

    fn remember(&self, id: &str, rv: String) -> Result<()> {
        self.versions
            .lock()
            .map_err(|_| poisoned())?
            .insert(id.to_string(), rv);
        Ok(())
    }

    /// Writes `id`'s record to its object, merging and retrying on conflicts.
    async fn write(&self, id: &str) -> Result<()> {
        let name = object_name(id);
        let pp = PostParams {
            field_manager: Some(FIELD_MANAGER.to_string()),
            ..Default::default()
        };
        for _ in 0..WRITE_ATTEMPTS {
            let Some(record) = self.local.export_incident(id)? else {
                return Ok(());
            };
            let mut obj = to_object(record)?;
            let known = self
                .versions
                .lock()
                .map_err(|_| poisoned())?
                .get(id)
                .cloned();
            let written = match known {
                Some(rv) => {
                    obj.metadata.resource_version = Some(rv);
                    self.api.replace_status(&name, &pp, &obj).await
                }
                None => match self.api.create(&pp, &obj).await {
                    // The status is a subresource: create drops it, so it
                    // is written right after, on the version just made.
                    Ok(created) => {
                        obj.metadata.resource_version = created.metadata.resource_version;
                        self.api.replace_status(&name, &pp, &obj).await
                    }
                    Err(e) => Err(e),
                },
            };
            match written {
                Ok(o) => {
                    self.remember(id, o.metadata.resource_version.unwrap_or_default())?;
                    return Ok(());
                }
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    // Someone else wrote it (or created it first): take in
                    // what they wrote, then write the join.
                    match self
                        .api
                        .get_opt(&name)
                        .await
                        .map_err(api("get exfilincident"))?
                    {
                        Some(remote) => {
                            self.absorb(&remote, false)?;
                        }
                        None => {
                            self.versions.lock().map_err(|_| poisoned())?.remove(id);
                        }
                    }
                }
                Err(kube::Error::Api(s)) if s.code == 404 => {
                    // Deleted under us: create it again.
                    self.versions.lock().map_err(|_| poisoned())?.remove(id);
                }
                Err(e) => return Err(api("write exfilincident")(e)),
            }
        }
        Err(Error::Unavailable(format!(
            "ExfilIncident {name}: still conflicting after {WRITE_ATTEMPTS} attempts"
        )))
    }

    /// Writes the incidents now; what the API server does not take is kept
    /// for the background retry.
    fn publish(&self, ids: impl IntoIterator<Item = String>) {
        let ids: BTreeSet<String> = ids.into_iter().collect();
        for id in ids {
            // A hung API server must not hold up ingest and the agents' Acks.
            let write = async {
                tokio::time::timeout(PUBLISH_TIMEOUT, self.write(&id))
                    .await
                    .unwrap_or_else(|_| {
                        Err(Error::Unavailable(format!(
                            "no answer from the API server within {PUBLISH_TIMEOUT:?}"
                        )))
                    })
            };
            if let Err(e) = self.rt.block_on(write) {
                tracing::warn!(incident = %id, error = %e, "incident not written to the API server yet; retrying in the background");
                self.mark_dirty([id]);
            }
        }
    }
}

fn poisoned() -> Error {
    Error::Unavailable("incident store lock poisoned by an earlier panic".into())
}

fn api(op: &'static str) -> impl Fn(kube::Error) -> Error {
    move |e| Error::Unavailable(format!("kubernetes {op}: {e}"))
}

/// Whether `remote` holds every row of `mine` (after both were merged, the
/// incident rows are equal when it does). Evidence the writer left out of
/// the record for its size (listed `omitted` in `digests`) counts as held:
/// writing it again would leave it out again.
fn covers(remote: &IncidentRecord, digests: &[EvidenceDigest], mine: &IncidentRecord) -> bool {
    if remote.incident != mine.incident {
        return false;
    }
    let omitted: HashSet<_> = digests
        .iter()
        .filter(|d| d.omitted)
        .map(|d| (&d.kind, &d.sha256))
        .collect();
    let timeline: HashSet<_> = remote.timeline.iter().collect();
    let detections: HashSet<_> = remote.detections.iter().map(|d| (&d.node, d.seq)).collect();
    let evidence: HashSet<_> = remote
        .evidence
        .iter()
        .map(|e| (&e.kind, e.captured_ms, &e.sha256))
        .collect();
    mine.timeline.iter().all(|t| timeline.contains(t))
        && mine
            .detections
            .iter()
            .all(|d| detections.contains(&(&d.node, d.seq)))
        && mine.evidence.iter().all(|e| {
            evidence.contains(&(&e.kind, e.captured_ms, &e.sha256))
                || omitted.contains(&(&e.kind, &e.sha256))
        })
        && mine.alerts.iter().all(|a| {
            remote.alerts.iter().any(|r| {
                r.transition == a.transition
                    && (r.routed || !a.routed)
                    && a.deliveries.iter().all(|d| r.deliveries.contains(d))
            })
        })
}

/// The record as it goes into an object: gzip, base64, and evidence items
/// left out (largest first) until it fits [`RECORD_BUDGET`]. Returns the
/// record as written, the encoded text, and what was left out.
fn trim(mut record: IncidentRecord) -> (IncidentRecord, String, Vec<EvidenceDigest>) {
    let mut omitted = Vec::new();
    loop {
        let text = encode_record(&record);
        if text.len() <= RECORD_BUDGET || record.evidence.is_empty() {
            return (record, text, omitted);
        }
        let largest = record
            .evidence
            .iter()
            .enumerate()
            .max_by(|(_, a), (_, b)| {
                (a.content.len(), &a.sha256).cmp(&(b.content.len(), &b.sha256))
            })
            .map(|(i, _)| i)
            .unwrap_or(0);
        let e = record.evidence.remove(largest);
        omitted.push(EvidenceDigest {
            kind: e.kind,
            sha256: e.sha256,
            captured: rfc3339(e.captured_ms),
            size: e.size,
            omitted: true,
        });
    }
}

fn encode_record(record: &IncidentRecord) -> String {
    // Serializing plain data to a Vec cannot fail; an empty record would be
    // refused by every reader rather than misread.
    let json = serde_json::to_vec(record).unwrap_or_default();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let zipped = gz
        .write_all(&json)
        .and_then(|()| gz.finish())
        .unwrap_or_default();
    base64::engine::general_purpose::STANDARD.encode(zipped)
}

/// Reads `status.record`.
pub fn decode_record(text: &str) -> Result<IncidentRecord> {
    let bad = |what: String| Error::InvalidArgument(format!("ExfilIncident record: {what}"));
    let zipped = base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|e| bad(format!("not base64: {e}")))?;
    let mut json = Vec::new();
    flate2::read::GzDecoder::new(zipped.as_slice())
        .take(MAX_RECORD_JSON + 1)
        .read_to_end(&mut json)
        .map_err(|e| bad(format!("not gzip: {e}")))?;
    if json.len() as u64 > MAX_RECORD_JSON {
        return Err(bad(format!("larger than {MAX_RECORD_JSON} bytes")));
    }
    serde_json::from_slice(&json).map_err(|e| bad(format!("not an incident record: {e}")))
}

fn state_name(state: i32) -> crate::k8s::crd::IncidentState {
    use crate::k8s::crd::IncidentState as S;
    match IncidentState::try_from(state) {
        Ok(IncidentState::Contained) => S::Contained,
        Ok(IncidentState::Released) => S::Released,
        Ok(IncidentState::Resolved) => S::Resolved,
        _ => S::Open,
    }
}

fn name_of(v: serde_json::Value) -> String {
    v.as_str().unwrap_or("unspecified").to_string()
}

/// The object for an incident's record.
pub fn to_object(record: IncidentRecord) -> Result<ExfilIncident> {
    let (record, text, omitted) = trim(record);
    let r = &record.incident;
    let workload = base64::engine::general_purpose::STANDARD
        .decode(&r.workload)
        .ok()
        .and_then(|b| Workload::decode(b.as_slice()).ok())
        .unwrap_or_default();
    let spec = ExfilIncidentSpec {
        incident_id: r.id.clone(),
        severity: name_of(json::severity(r.severity)),
        rule: name_of(json::kind(r.kind)),
        workload: IncidentWorkload {
            namespace: workload.namespace.clone(),
            pod: workload.pod.clone(),
            node: r.node.clone(),
            cgroup_path: Some(workload.cgroup_path.clone()).filter(|p| !p.is_empty()),
        },
        first_seen: rfc3339(r.opened_ms),
    };
    let skip = record.timeline.len().saturating_sub(TIMELINE_TAIL);
    let mut evidence: Vec<EvidenceDigest> = record
        .evidence
        .iter()
        .map(|e| EvidenceDigest {
            kind: e.kind.clone(),
            sha256: e.sha256.clone(),
            captured: rfc3339(e.captured_ms),
            size: e.size,
            omitted: false,
        })
        .collect();
    evidence.extend(omitted);
    let status = ExfilIncidentStatus {
        state: state_name(r.state),
        severity: name_of(json::severity(r.severity)),
        summary: r.summary.clone(),
        last_seen: Some(rfc3339(r.updated_ms)),
        bytes: r.bytes_estimate,
        detections: r.detection_count,
        acknowledged_by: r.acknowledged_by.clone(),
        timeline: record
            .timeline
            .iter()
            .skip(skip)
            .map(|t| TimelineEntry {
                at: rfc3339(t.at_ms),
                state: name_of(json::state(t.state)),
                message: t.cause.clone(),
                actor: t.actor.clone(),
            })
            .collect(),
        deliveries: record
            .alerts
            .iter()
            .flat_map(|a| {
                a.deliveries.iter().map(|d| DeliveryEntry {
                    transition: a.transition.clone(),
                    sink: d.sink.clone(),
                    state: match d.state {
                        0 => "pending",
                        1 => "delivered",
                        _ => "failed",
                    }
                    .to_string(),
                    attempts: d.attempts,
                    last_error: d.last_error.clone(),
                })
            })
            .collect(),
        evidence,
        record: text,
    };
    let mut obj = ExfilIncident::new(&object_name(&r.id), spec);
    obj.metadata = ObjectMeta {
        name: Some(object_name(&r.id)),
        ..Default::default()
    };
    obj.status = Some(status);
    Ok(obj)
}

fn ids_of(effects: &[Effect]) -> impl Iterator<Item = String> + '_ {
    effects.iter().filter_map(|e| match e {
        Effect::Incident { incident, .. } => Some(incident.id.clone()),
        _ => None,
    })
}

impl Outbox for KubeStore {
    fn unrouted_alerts(&self, limit: u32) -> Result<Vec<UnroutedAlert>> {
        self.local.unrouted_alerts(limit)
    }

    fn route_alerts(&self, routes: &[(i64, Vec<String>)], now_ms: u64) -> Result<()> {
        let mut ids = Vec::new();
        for (event, _) in routes {
            ids.extend(self.local.incident_of_alert(*event)?);
        }
        self.local.route_alerts(routes, now_ms)?;
        self.publish(ids);
        Ok(())
    }

    fn due_deliveries(&self, now_ms: u64, limit: u32) -> Result<Vec<Delivery>> {
        self.local.due_deliveries(now_ms, limit)
    }

    fn next_delivery_ms(&self) -> Result<Option<u64>> {
        self.local.next_delivery_ms()
    }

    fn delivered(
        &self,
        delivery: &Delivery,
        attempts: u32,
        detail: &str,
        now_ms: u64,
    ) -> Result<()> {
        self.local.delivered(delivery, attempts, detail, now_ms)?;
        self.publish([delivery.incident_id.clone()]);
        Ok(())
    }

    fn retry_later(&self, id: i64, attempts: u32, next_ms: u64, error: &str) -> Result<()> {
        self.local.retry_later(id, attempts, next_ms, error)?;
        self.publish(self.local.incident_of_delivery(id)?);
        Ok(())
    }

    fn delivery_failed(
        &self,
        delivery: &Delivery,
        attempts: u32,
        error: &str,
        now_ms: u64,
    ) -> Result<()> {
        self.local
            .delivery_failed(delivery, attempts, error, now_ms)?;
        self.publish([delivery.incident_id.clone()]);
        Ok(())
    }

    fn deliveries(&self, incident_id: &str) -> Result<Vec<DeliveryStatus>> {
        self.local.deliveries(incident_id)
    }
}

impl Store for KubeStore {
    fn hellos(&self, agents: &[AgentInfo], now_ms: u64) -> Result<Vec<u64>> {
        self.local.hellos(agents, now_ms)
    }

    fn ingest(&self, batch: &[Ingest], policy: &ResponsePolicy) -> Result<Vec<IngestOutcome>> {
        let outcomes = self.local.ingest(batch, policy)?;
        let ids: Vec<String> = outcomes
            .iter()
            .flat_map(|o| match o {
                IngestOutcome::Stored(effects) => ids_of(effects).collect(),
                IngestOutcome::Duplicate => Vec::new(),
            })
            .collect();
        self.publish(ids);
        Ok(outcomes)
    }

    fn list_incidents(&self, filter: &IncidentFilter) -> Result<IncidentPage> {
        self.local.list_incidents(filter)
    }

    fn get_incident(&self, id: &str) -> Result<Incident> {
        self.local.get_incident(id)
    }

    fn acknowledge(&self, id: &str, actor: &str, note: &str, now_ms: u64) -> Result<Incident> {
        let incident = self.local.acknowledge(id, actor, note, now_ms)?;
        self.publish([id.to_string()]);
        Ok(incident)
    }

    fn release(
        &self,
        id: &str,
        actor: &str,
        reason: &str,
        now_ms: u64,
    ) -> Result<(Incident, Vec<Effect>)> {
        let out = self.local.release(id, actor, reason, now_ms)?;
        self.publish([id.to_string()]);
        Ok(out)
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
        let out = self
            .local
            .throttle(id, actor, bytes, window_seconds, reason, now_ms)?;
        self.publish([id.to_string()]);
        Ok(out)
    }

    fn add_evidence(&self, id: &str, item: &NewEvidence) -> Result<EvidenceItem> {
        let stored = self.local.add_evidence(id, item)?;
        self.publish([id.to_string()]);
        Ok(stored)
    }

    fn evidence(&self, id: &str) -> Result<Vec<EvidenceItem>> {
        self.local.evidence(id)
    }

    fn note(&self, id: &str, actor: &str, cause: &str, now_ms: u64) -> Result<()> {
        self.local.note(id, actor, cause, now_ms)?;
        self.publish([id.to_string()]);
        Ok(())
    }

    fn blocks_for(&self, node: &str) -> Result<Vec<Block>> {
        self.local.blocks_for(node)
    }

    fn top_talkers(
        &self,
        since_ms: u64,
        limit: u32,
        namespace: Option<&str>,
    ) -> Result<Vec<Talker>> {
        self.local.top_talkers(since_ms, limit, namespace)
    }

    fn list_nodes(&self) -> Result<Vec<Node>> {
        self.local.list_nodes()
    }

    fn egress_series(
        &self,
        workload_key: &str,
        from_ms: u64,
        to_ms: u64,
    ) -> Result<Vec<EgressPoint>> {
        self.local.egress_series(workload_key, from_ms, to_ms)
    }

    fn prune_egress(&self, before_ms: u64, limit: u32) -> Result<u64> {
        // Egress stays in each replica's own file; it is not replicated.
        self.local.prune_egress(before_ms, limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::replica::{EvidenceRow, IncidentRow};

    fn record(evidence: Vec<EvidenceRow>) -> IncidentRecord {
        IncidentRecord {
            incident: IncidentRow {
                id: "EXFIL-20261122-140312-7f3a".into(),
                workload_key: "shop/db-0".into(),
                node: "n1".into(),
                namespace: "shop".into(),
                workload: String::new(),
                state: IncidentState::Contained as i32,
                severity: 3,
                kind: 1,
                action: 2,
                opened_ms: 1_795_356_192_000,
                updated_ms: 1_795_356_192_000,
                detection_count: 1,
                bytes_estimate: 3,
                summary: "s".into(),
                acknowledged_by: String::new(),
            },
            timeline: Vec::new(),
            detections: Vec::new(),
            evidence,
            alerts: Vec::new(),
        }
    }

    /// An item whose content does not compress (pseudo-random bytes).
    fn item(kind: &str, bytes: usize, seed: u64) -> EvidenceRow {
        let mut x = seed | 1;
        let content: Vec<u8> = (0..bytes)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        EvidenceRow {
            kind: kind.into(),
            captured_ms: seed,
            media_type: "application/octet-stream".into(),
            source: "test".into(),
            content: base64::engine::general_purpose::STANDARD.encode(&content),
            size: bytes as u64,
            sha256: format!("{seed:064x}"),
            note: String::new(),
            original_size: bytes as u64,
            original_sha256: format!("{seed:064x}"),
        }
    }

    #[test]
    fn a_record_round_trips_through_an_object() {
        let r = record(vec![item("pod", 1000, 1)]);
        let obj = to_object(r.clone()).unwrap();
        assert_eq!(
            obj.metadata.name.as_deref(),
            Some("exfil-20261122-140312-7f3a")
        );
        let status = obj.status.unwrap();
        assert_eq!(status.state, crate::k8s::crd::IncidentState::Contained);
        assert_eq!(decode_record(&status.record).unwrap(), r);
        assert_eq!(status.evidence.len(), 1);
        assert!(!status.evidence[0].omitted);
    }

    /// Three items of ~300 KiB that do not compress: only one fits the budget.
    fn oversized() -> IncidentRecord {
        record(vec![
            item("pod", 300 * 1024, 1),
            item("events", 310 * 1024, 2),
            item("flows", 290 * 1024, 3),
        ])
    }

    #[test]
    fn evidence_past_the_budget_is_left_out_largest_first_and_listed() {
        let obj = to_object(oversized()).unwrap();
        let status = obj.status.unwrap();
        assert!(
            status.record.len() <= RECORD_BUDGET,
            "{}",
            status.record.len()
        );
        let kept = decode_record(&status.record).unwrap();
        let kinds: Vec<&str> = kept.evidence.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds, ["flows"]);
        let omitted: Vec<(&str, bool)> = status
            .evidence
            .iter()
            .map(|e| (e.kind.as_str(), e.omitted))
            .collect();
        assert_eq!(omitted, [("flows", false), ("events", true), ("pod", true)]);
        // The object as a whole stays well under etcd's 1.5 MiB.
        let size = serde_json::to_vec(&status).unwrap().len();
        assert!(size < 1024 * 1024, "{size}");
    }

    #[test]
    fn a_bad_record_is_a_clear_error() {
        for (text, want) in [
            ("%%%", "not base64"),
            ("aGVsbG8=", "not gzip"),
            (encode_record(&record(vec![])).as_str(), ""),
        ] {
            let got = decode_record(text);
            if want.is_empty() {
                assert!(got.is_ok());
            } else {
                let e = got.unwrap_err().to_string();
                assert!(e.contains(want), "{e}");
            }
        }
        // Valid gzip of something that is not a record.
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(b"{\"x\":1}").unwrap();
        let text = base64::engine::general_purpose::STANDARD.encode(gz.finish().unwrap());
        let e = decode_record(&text).unwrap_err().to_string();
        assert!(e.contains("not an incident record"), "{e}");
        // A gzip bomb stops at the limit instead of filling memory.
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..(MAX_RECORD_JSON >> 20) + 1 {
            gz.write_all(&zeros).unwrap();
        }
        let text = base64::engine::general_purpose::STANDARD.encode(gz.finish().unwrap());
        let e = decode_record(&text).unwrap_err().to_string();
        assert!(e.contains("larger than"), "{e}");
    }

    #[test]
    fn covers_needs_every_row_of_ours() {
        let mut ours = record(vec![item("pod", 10, 1)]);
        let theirs = ours.clone();
        assert!(covers(&theirs, &[], &ours));
        ours.timeline
            .push(crate::store::sqlite::replica::TimelineRow {
                at_ms: 1,
                actor: "alice".into(),
                cause: "note".into(),
                state: 2,
            });
        assert!(!covers(&theirs, &[], &ours));
        assert!(covers(&ours, &[], &theirs));
    }

    #[test]
    fn evidence_left_out_for_size_counts_as_held() {
        let ours = oversized();
        let status = to_object(ours.clone()).unwrap().status.unwrap();
        let theirs = decode_record(&status.record).unwrap();
        assert!(theirs.evidence.len() < ours.evidence.len());
        assert!(covers(&theirs, &status.evidence, &ours));
        assert!(!covers(&theirs, &[], &ours));
    }
}
