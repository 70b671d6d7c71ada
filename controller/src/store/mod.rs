//! The store interface: everything the controller keeps, behind one trait.
//!
//! This issue builds the embedded SQLite backend ([`sqlite::SqliteStore`]);
//! the Kubernetes-API backend (ExfilIncident resources) implements the same
//! trait later. Every write method is one transaction: when it returns `Ok`
//! the change is durable, which is what lets the gateway acknowledge.

pub mod kube;
pub mod sqlite;

use exfilguard_proto::v1::{
    Block, Detection, EvidenceItem, FlowReport, Incident, IncidentEventKind, IncidentState, Node,
    SetCap, Talker, Unblock, Workload,
};

use crate::{Error, Result, alerts::Alert, correlate::ResponsePolicy, evidence::NewEvidence};

/// What an agent said about itself in Hello.
#[derive(Debug, Clone, Default)]
pub struct AgentInfo {
    /// Node name.
    pub node: String,
    /// Agent version.
    pub agent_version: String,
    /// Kernel release.
    pub kernel_release: String,
    /// Cumulative FlowReports its journal dropped.
    pub dropped_flow_reports: u64,
    /// Cumulative Detections its journal dropped.
    pub dropped_detections: u64,
}

/// A stored message's content.
#[derive(Debug, Clone)]
pub enum Payload {
    /// Per-workload egress aggregates.
    Flow(FlowReport),
    /// A detection (correlated into an incident).
    Detection(Box<Detection>),
}

/// One sequenced agent message to store.
#[derive(Debug, Clone)]
pub struct Ingest {
    /// Node it came from.
    pub node: String,
    /// Its per-agent sequence number (> 0).
    pub seq: u64,
    /// When the agent sent it (Unix ms).
    pub sent_at_ms: u64,
    /// When the controller received it (Unix ms).
    pub received_ms: u64,
    /// The content.
    pub payload: Payload,
}

/// A consequence of a committed write, for the hub to fan out.
#[derive(Debug, Clone)]
pub enum Effect {
    /// An incident changed.
    Incident {
        /// What kind of change.
        kind: IncidentEventKind,
        /// The incident after the change (with timeline).
        incident: Box<Incident>,
    },
    /// Containment: send this Block to the node's agent.
    Block {
        /// The node.
        node: String,
        /// The command.
        block: Box<Block>,
    },
    /// Release: send this Unblock to the node's agent.
    Unblock {
        /// The node.
        node: String,
        /// The command.
        unblock: Unblock,
    },
    /// Throttle (or lift a throttle): send this SetCap to the node's agent.
    SetCap {
        /// The node.
        node: String,
        /// The command.
        set_cap: SetCap,
    },
    /// Cluster containment of the incident's pod (NetworkPolicy, quarantine
    /// label, Event); only acted on when the controller runs in a cluster.
    Lockdown {
        /// The incident.
        incident_id: String,
        /// Its workload (namespace, pod, cgroup path).
        workload: Box<Workload>,
        /// Policy `dry-run`: record what would be done, change nothing.
        dry_run: bool,
    },
    /// Undo the cluster containment of a released incident's pod.
    Release {
        /// The incident.
        incident_id: String,
        /// Its workload.
        workload: Box<Workload>,
        /// Who released it.
        by: String,
        /// Why.
        reason: String,
    },
}

/// What happened to one ingested message.
#[derive(Debug, Clone)]
pub enum IngestOutcome {
    /// Newly stored; these effects follow from it.
    Stored(Vec<Effect>),
    /// Its sequence number was already stored (a resend): nothing changed.
    Duplicate,
}

/// Filters and paging for incident listings.
#[derive(Debug, Clone, Default)]
pub struct IncidentFilter {
    /// Only this state.
    pub state: Option<IncidentState>,
    /// Only this namespace.
    pub namespace: Option<String>,
    /// Only opened at or after (Unix ms).
    pub since_ms: u64,
    /// Page size (already clamped).
    pub limit: u32,
    /// Continue after this cursor (from a previous page).
    pub after: Option<Cursor>,
}

/// Position in the newest-first incident order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    /// `opened_at` of the last incident on the previous page.
    pub opened_ms: u64,
    /// Its id (tie-break).
    pub id: String,
}

impl Cursor {
    /// Opaque page token.
    pub fn encode(&self) -> String {
        format!("{}:{}", self.opened_ms, self.id)
    }

    /// Parses a page token.
    pub fn decode(token: &str) -> Option<Cursor> {
        let (ms, id) = token.split_once(':')?;
        Some(Cursor {
            opened_ms: ms.parse().ok()?,
            id: id.to_string(),
        })
    }
}

/// A page of incidents.
#[derive(Debug, Clone, Default)]
pub struct IncidentPage {
    /// Incidents (no timeline, no evidence).
    pub incidents: Vec<Incident>,
    /// Cursor of the next page, if there is one.
    pub next: Option<Cursor>,
}

/// One flow-report window of a workload's egress (summed over its reports).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EgressPoint {
    /// Window end (Unix ms).
    pub window_end_ms: u64,
    /// Bytes to destinations outside the cluster.
    pub external_bytes: u64,
    /// Bytes to destinations inside the cluster.
    pub internal_bytes: u64,
}

/// An incident transition's alert that has not been routed to sinks yet.
#[derive(Debug, Clone)]
pub struct UnroutedAlert {
    /// Its row.
    pub event_id: i64,
    /// The alert.
    pub alert: Alert,
}

/// One (alert, sink) row of the outbox that is due for an attempt.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Its row.
    pub id: i64,
    /// The sink's configured name.
    pub sink: String,
    /// Attempts made so far.
    pub attempts: u32,
    /// The alert; `None` if its stored record no longer parses (then the
    /// delivery can only fail, which the timeline records).
    pub alert: Option<Alert>,
    /// The incident it belongs to.
    pub incident_id: String,
    /// Its transition (`opened`, ...), for timeline entries.
    pub transition: String,
}

/// Where an outbox row stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryState {
    /// Waiting for an attempt.
    Pending,
    /// The sink took it.
    Delivered,
    /// Given up (attempts exhausted or refused).
    Failed,
}

/// An outbox row as reported to people and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryStatus {
    /// The sink's name.
    pub sink: String,
    /// The transition.
    pub transition: String,
    /// Where it stands.
    pub state: DeliveryState,
    /// Attempts made.
    pub attempts: u32,
    /// The last failure, empty if none.
    pub last_error: String,
}

/// The durable alert outbox: every incident transition's alert is written in
/// the transition's own transaction, then fanned out to one row per sink,
/// each retried until the sink takes it or it is given up.
pub trait Outbox: Send + Sync {
    /// Alerts not yet fanned out to sinks, oldest first.
    fn unrouted_alerts(&self, limit: u32) -> Result<Vec<UnroutedAlert>>;
    /// For each `(event_id, sinks)`: creates one outbox row per sink
    /// (idempotent) and marks the alert routed; one transaction for all.
    fn route_alerts(&self, routes: &[(i64, Vec<String>)], now_ms: u64) -> Result<()>;
    /// Pending rows due at `now_ms`, at most one per (incident, sink) and
    /// always its oldest, so a sink sees an incident's transitions in order.
    fn due_deliveries(&self, now_ms: u64, limit: u32) -> Result<Vec<Delivery>>;
    /// When the next pending row is due, if any.
    fn next_delivery_ms(&self) -> Result<Option<u64>>;
    /// The sink took it: the row is done and the incident's timeline says so.
    fn delivered(
        &self,
        delivery: &Delivery,
        attempts: u32,
        detail: &str,
        now_ms: u64,
    ) -> Result<()>;
    /// The attempt failed; try again at `next_ms`.
    fn retry_later(&self, id: i64, attempts: u32, next_ms: u64, error: &str) -> Result<()>;
    /// Given up: the row is done and the incident's timeline says why.
    fn delivery_failed(
        &self,
        delivery: &Delivery,
        attempts: u32,
        error: &str,
        now_ms: u64,
    ) -> Result<()>;
    /// Every outbox row of an incident, in creation order.
    fn deliveries(&self, incident_id: &str) -> Result<Vec<DeliveryStatus>>;
}

/// Everything the controller persists.
pub trait Store: Outbox + Send + Sync {
    /// Records the Hellos of several agents in one transaction (a fleet
    /// reconnecting after a controller restart costs one commit, not one per
    /// node); returns each node's highest stored sequence number, in order.
    fn hellos(&self, agents: &[AgentInfo], now_ms: u64) -> Result<Vec<u64>>;
    /// Records one Hello; returns the highest sequence number stored for the node.
    fn hello(&self, info: &AgentInfo, now_ms: u64) -> Result<u64> {
        self.hellos(std::slice::from_ref(info), now_ms)?
            .pop()
            .ok_or_else(|| Error::Unavailable("the store answered no Hello".into()))
    }
    /// Stores a batch of agent messages in one transaction, de-duplicating by
    /// (node, seq) and correlating detections into incidents.
    fn ingest(&self, batch: &[Ingest], policy: &ResponsePolicy) -> Result<Vec<IngestOutcome>>;
    /// Incidents, newest first.
    fn list_incidents(&self, filter: &IncidentFilter) -> Result<IncidentPage>;
    /// One incident with timeline and evidence.
    fn get_incident(&self, id: &str) -> Result<Incident>;
    /// A responder acknowledged the incident.
    fn acknowledge(&self, id: &str, actor: &str, note: &str, now_ms: u64) -> Result<Incident>;
    /// A responder released the incident: contained → released (with an Unblock
    /// effect), open → resolved.
    fn release(
        &self,
        id: &str,
        actor: &str,
        reason: &str,
        now_ms: u64,
    ) -> Result<(Incident, Vec<Effect>)>;
    /// A responder capped the incident workload's external egress (`bytes`
    /// per `window_seconds`; 0 lifts it): a timeline entry and a SetCap
    /// effect. The incident's state does not change.
    fn throttle(
        &self,
        id: &str,
        actor: &str,
        bytes: u64,
        window_seconds: u32,
        reason: &str,
        now_ms: u64,
    ) -> Result<(Incident, Vec<Effect>)>;
    /// Appends an item to the incident's evidence, bounded and hashed as
    /// [`crate::evidence::bound`] says; items are never changed or removed
    /// afterwards. NOT_FOUND for an unknown incident.
    fn add_evidence(&self, id: &str, item: &NewEvidence) -> Result<EvidenceItem>;
    /// Every evidence item of the incident, its detection records included,
    /// oldest capture first. NOT_FOUND for an unknown incident.
    fn evidence(&self, id: &str) -> Result<Vec<EvidenceItem>>;
    /// Appends a timeline entry without changing state (e.g. "Block applied by agent").
    fn note(&self, id: &str, actor: &str, cause: &str, now_ms: u64) -> Result<()>;
    /// Blocks that should be in force on `node` (contained incidents), to
    /// re-send when its agent reconnects.
    fn blocks_for(&self, node: &str) -> Result<Vec<Block>>;
    /// External egress by workload since `since_ms`, largest first.
    fn top_talkers(
        &self,
        since_ms: u64,
        limit: u32,
        namespace: Option<&str>,
    ) -> Result<Vec<Talker>>;
    /// Known agents (`connected` left false; the hub knows who is connected).
    fn list_nodes(&self) -> Result<Vec<Node>>;
    /// A workload's egress per window ending in `[from_ms, to_ms]`, oldest first
    /// (for the report's chart). `workload_key` as [`crate::correlate::workload_key`].
    fn egress_series(
        &self,
        workload_key: &str,
        from_ms: u64,
        to_ms: u64,
    ) -> Result<Vec<EgressPoint>>;
    /// Deletes at most `limit` egress aggregates whose window ended before
    /// `before_ms`, oldest first; returns how many it deleted.
    fn prune_egress(&self, before_ms: u64, limit: u32) -> Result<u64>;
}
