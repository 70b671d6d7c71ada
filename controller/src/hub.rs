//! Fan-out after commit: incident events to watchers, commands to the
//! connected agents. Nothing here is durable; the store is, and what the hub
//! could not deliver (an agent that is not connected) is re-derived from the
//! store when the agent reconnects.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
};

use exfilguard_proto::v1::{IncidentEvent, PolicyUpdate, controller_message};
use tokio::sync::{broadcast, mpsc};

use crate::{
    Error, Result,
    store::{Effect, Store},
    time::now_ms,
};

/// Commands queued for one node's stream.
pub type CommandReceiver = mpsc::UnboundedReceiver<controller_message::Payload>;

struct Connection {
    id: u64,
    commands: mpsc::UnboundedSender<controller_message::Payload>,
}

/// Connected agents and incident watchers.
pub struct Hub {
    nodes: Mutex<HashMap<String, Connection>>,
    next_id: AtomicU64,
    events: broadcast::Sender<IncidentEvent>,
    /// The detector policy every agent gets (none: agents keep their own).
    policy: Mutex<Option<PolicyUpdate>>,
    /// Cluster containment ([`crate::k8s::respond`]), when running in a cluster.
    cluster: OnceLock<mpsc::UnboundedSender<Effect>>,
    /// Replicas share incidents: an agent away from this replica is
    /// connected to another, which sends its commands.
    replicated: std::sync::atomic::AtomicBool,
}

/// A node's registration; unregisters when dropped (the stream ended).
pub struct Registration {
    hub: Arc<Hub>,
    node: String,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Ok(mut nodes) = self.hub.nodes.lock()
            && nodes.get(&self.node).is_some_and(|c| c.id == self.id)
        {
            nodes.remove(&self.node);
        }
    }
}

impl Hub {
    /// A hub whose watchers may lag `watch_buffer` events before they are told they missed some.
    pub fn new(watch_buffer: usize) -> Arc<Self> {
        let (events, _) = broadcast::channel(watch_buffer.max(1));
        Arc::new(Self {
            nodes: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            events,
            policy: Mutex::new(None),
            cluster: OnceLock::new(),
            replicated: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Routes cluster effects (lockdown and release of pods) to `responder`;
    /// without one they are dropped, since there is no cluster to act on.
    pub fn set_cluster(&self, responder: mpsc::UnboundedSender<Effect>) {
        if self.cluster.set(responder).is_err() {
            tracing::warn!("a cluster responder is already connected; keeping the first");
        }
    }

    /// Marks the incidents as shared with other replicas: a command for an
    /// agent not connected here is left to the replica it is connected to
    /// (which gets it from the shared incident), without a timeline note.
    pub fn set_replicated(&self) {
        self.replicated.store(true, Ordering::Relaxed);
    }

    fn replicated(&self) -> bool {
        self.replicated.load(Ordering::Relaxed)
    }

    /// Registers `node`'s stream; ALREADY_EXISTS if it has one.
    pub fn register(self: &Arc<Self>, node: &str) -> Result<(Registration, CommandReceiver)> {
        let mut nodes = self
            .nodes
            .lock()
            .map_err(|_| Error::Unavailable("hub poisoned".into()))?;
        if let Some(existing) = nodes.get(node)
            && !existing.commands.is_closed()
        {
            return Err(Error::AlreadyExists(format!(
                "node {node} already has an open stream"
            )));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        nodes.insert(node.to_string(), Connection { id, commands: tx });
        Ok((
            Registration {
                hub: self.clone(),
                node: node.to_string(),
                id,
            },
            rx,
        ))
    }

    /// Whether `node` has a stream open here.
    pub fn is_connected(&self, node: &str) -> bool {
        self.nodes
            .lock()
            .map(|n| n.get(node).is_some_and(|c| !c.commands.is_closed()))
            .unwrap_or(false)
    }

    /// Queues a command for `node`; false if it is not connected.
    pub fn send(&self, node: &str, command: controller_message::Payload) -> bool {
        self.nodes
            .lock()
            .ok()
            .and_then(|n| n.get(node).map(|c| c.commands.send(command).is_ok()))
            .unwrap_or(false)
    }

    /// The agent policy in force, sent to each agent after Welcome.
    pub fn policy(&self) -> Option<PolicyUpdate> {
        self.policy.lock().ok().and_then(|p| p.clone())
    }

    /// Replaces the agent policy and sends it to every connected agent;
    /// returns how many were sent it (the others get it when they connect).
    pub fn set_policy(&self, update: PolicyUpdate) -> usize {
        if let Ok(mut p) = self.policy.lock() {
            *p = Some(update.clone());
        }
        let Ok(nodes) = self.nodes.lock() else {
            return 0;
        };
        nodes
            .values()
            .filter(|c| {
                c.commands
                    .send(controller_message::Payload::PolicyUpdate(update.clone()))
                    .is_ok()
            })
            .count()
    }

    /// Subscribes to incident events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<IncidentEvent> {
        self.events.subscribe()
    }

    /// Delivers committed effects: events to watchers, commands to agents. A
    /// command for a node that is not connected is noted in the incident's
    /// timeline; it is re-sent from the store when the agent reconnects.
    pub fn apply(&self, store: &dyn Store, effects: Vec<Effect>) {
        for effect in effects {
            match effect {
                Effect::Incident { kind, mut incident } => {
                    incident.evidence.clear();
                    // No watcher is not an error.
                    let _ = self.events.send(IncidentEvent {
                        kind: kind as i32,
                        incident: Some(*incident),
                    });
                }
                Effect::Block { node, block } => {
                    let id = block.incident_id.clone();
                    if !self.send(&node, controller_message::Payload::Block(*block))
                        && !self.replicated()
                    {
                        self.note(store, &id, &format!("agent on {node} is not connected; the Block is sent when it reconnects"));
                    }
                }
                Effect::SetCap { node, set_cap } => {
                    let id = set_cap.incident_id.clone();
                    if !self.send(&node, controller_message::Payload::SetCap(set_cap))
                        && !self.replicated()
                    {
                        self.note(store, &id, &format!("agent on {node} is not connected; the cap was not sent (send it again once the node is back)"));
                    }
                }
                Effect::Unblock { node, unblock } => {
                    let id = unblock.incident_id.clone();
                    if !self.send(&node, controller_message::Payload::Unblock(unblock))
                        && !self.replicated()
                    {
                        self.note(store, &id, &format!("agent on {node} is not connected; it drops the Block when it reconnects (no longer re-sent)"));
                    }
                }
                cluster @ (Effect::Lockdown { .. } | Effect::Release { .. }) => {
                    if let Some(responder) = self.cluster.get()
                        && responder.send(cluster).is_err()
                    {
                        tracing::error!(
                            "the cluster responder stopped; containment in the cluster is not carried out"
                        );
                    }
                }
            }
        }
    }

    fn note(&self, store: &dyn Store, incident: &str, cause: &str) {
        if let Err(e) = store.note(incident, "controller", cause, now_ms()) {
            tracing::warn!(incident, error = %e, "could not record timeline note");
        }
    }
}
