//! `AgentGateway.Connect`: one bidirectional stream per node.
//!
//! Protocol checks happen here, before anything reaches the store: Hello
//! first and once, the certificate's node is the Hello's node, one stream per
//! node, sequence numbers that only grow and do not leap, enums the contract
//! knows. A violation ends that stream with a status and touches nothing else.

use std::{collections::HashMap, pin::Pin, sync::Arc, time::Duration};

use exfilguard_proto::v1::{
    Ack, AckStatus, AgentMessage, Capability, ControllerMessage, FlowReport, Hello, Welcome,
    agent_gateway_server::AgentGateway, agent_message, controller_message,
};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Code, Request, Response, Status, Streaming};

use crate::{
    Error, Result, VERSION,
    auth::{self, AuthMode, Role},
    correlate::{validate_destination, validate_detection, validate_workload},
    hub::{CommandReceiver, Hub},
    ingest::{Ingestor, Stored},
    metrics::StreamGuard,
    store::{AgentInfo, Ingest, Payload, Store},
    time::now_ms,
};

/// Largest forward jump of a sequence number accepted on a stream. Gaps are
/// legitimate (the agent's journal drops FlowReports when full), but a leap
/// past this is a lie that would make every later real message look like a
/// duplicate.
pub const MAX_SEQ_JUMP: u64 = 1 << 20;
/// Most workloads in one FlowReport.
const MAX_FLOW_WORKLOADS: usize = 4096;
/// Most destinations per workload in a FlowReport.
const MAX_DESTINATIONS: usize = 64;
/// Longest node name (a DNS subdomain).
const MAX_NODE_NAME: usize = 253;

/// Gateway limits.
#[derive(Debug, Clone, Copy)]
pub struct GatewayLimits {
    /// Most agent streams at once.
    pub max_streams: usize,
    /// Time an agent has to send Hello.
    pub hello_timeout: Duration,
    /// Largest message in bytes (reported in Welcome).
    pub max_message_bytes: usize,
}

impl Default for GatewayLimits {
    fn default() -> Self {
        Self {
            max_streams: 10_000,
            hello_timeout: Duration::from_secs(10),
            max_message_bytes: 4 << 20,
        }
    }
}

/// The AgentGateway service.
pub struct Gateway {
    mode: AuthMode,
    store: Arc<dyn Store>,
    hub: Arc<Hub>,
    ingestor: Ingestor,
    streams: Arc<Semaphore>,
    limits: GatewayLimits,
}

impl Gateway {
    /// A gateway over `store`, delivering commands through `hub`.
    pub fn new(
        mode: AuthMode,
        store: Arc<dyn Store>,
        hub: Arc<Hub>,
        ingestor: Ingestor,
        limits: GatewayLimits,
    ) -> Self {
        Self {
            mode,
            store,
            hub,
            ingestor,
            streams: Arc::new(Semaphore::new(limits.max_streams)),
            limits,
        }
    }
}

/// A decode failure inside a stream comes up as INTERNAL from tonic; to the
/// agent it is its own malformed message.
fn inbound_error(status: Status) -> Status {
    if status.code() == Code::Internal {
        Status::invalid_argument(format!("malformed message: {}", status.message()))
    } else {
        status
    }
}

fn validate_hello(msg: &AgentMessage) -> Result<&Hello> {
    let Some(agent_message::Payload::Hello(hello)) = &msg.payload else {
        return Err(Error::FailedPrecondition(
            "the first message on a stream must be Hello".into(),
        ));
    };
    if msg.seq != 0 {
        return Err(Error::InvalidArgument(
            "Hello carries seq 0 (it is not stored)".into(),
        ));
    }
    let name = &hello.node_name;
    if name.is_empty()
        || name.len() > MAX_NODE_NAME
        || name.chars().any(|c| c.is_control() || c.is_whitespace())
    {
        return Err(Error::InvalidArgument(format!(
            "Hello.node_name {name:?} is not a node name"
        )));
    }
    if let Some(bad) = hello
        .capabilities
        .iter()
        .find(|c| Capability::try_from(**c).is_err())
    {
        return Err(Error::InvalidArgument(format!(
            "Hello.capabilities: unknown value {bad}"
        )));
    }
    if hello.agent_version.len() > 256 || hello.kernel_release.len() > 256 {
        return Err(Error::InvalidArgument(
            "Hello.agent_version / kernel_release too long".into(),
        ));
    }
    Ok(hello)
}

fn validate_flow(report: &FlowReport) -> Result<()> {
    if report.workloads.len() > MAX_FLOW_WORKLOADS {
        return Err(Error::InvalidArgument(format!(
            "FlowReport has more than {MAX_FLOW_WORKLOADS} workloads"
        )));
    }
    for (i, w) in report.workloads.iter().enumerate() {
        let workload = w
            .workload
            .as_ref()
            .ok_or_else(|| Error::InvalidArgument(format!("workloads[{i}].workload is missing")))?;
        validate_workload(&format!("workloads[{i}].workload"), workload)?;
        if w.top_destinations.len() > MAX_DESTINATIONS {
            return Err(Error::InvalidArgument(format!(
                "workloads[{i}] has more than {MAX_DESTINATIONS} destinations"
            )));
        }
        for (j, d) in w.top_destinations.iter().enumerate() {
            validate_destination(&format!("workloads[{i}].top_destinations[{j}]"), d)?;
        }
    }
    Ok(())
}

type Outbound = mpsc::Sender<Result<ControllerMessage, Status>>;

/// A command the agent has not acknowledged yet.
struct PendingCommand {
    incident_id: String,
    what: &'static str,
}

/// One accepted stream.
struct Session {
    node: String,
    store: Arc<dyn Store>,
    ingestor: Ingestor,
    out: Outbound,
    acks: mpsc::Sender<(u64, oneshot::Receiver<Result<Stored>>)>,
    /// Highest sequence number seen on this stream (0: none yet).
    last_seq: u64,
    /// Highest sequence number stored when the stream opened.
    stored_at_hello: u64,
    next_command: u64,
    pending: HashMap<u64, PendingCommand>,
}

impl Session {
    async fn send(&self, seq: u64, payload: controller_message::Payload) -> bool {
        self.out
            .send(Ok(ControllerMessage {
                seq,
                payload: Some(payload),
            }))
            .await
            .is_ok()
    }

    async fn command(&mut self, payload: controller_message::Payload) -> bool {
        self.next_command += 1;
        let seq = self.next_command;
        let pending = match &payload {
            controller_message::Payload::Block(b) => Some(PendingCommand {
                incident_id: b.incident_id.clone(),
                what: "Block",
            }),
            controller_message::Payload::Unblock(u) => Some(PendingCommand {
                incident_id: u.incident_id.clone(),
                what: "Unblock",
            }),
            // Not tied to an incident: the answer is logged, not put on a timeline.
            controller_message::Payload::PolicyUpdate(_) => Some(PendingCommand {
                incident_id: String::new(),
                what: "PolicyUpdate",
            }),
            controller_message::Payload::SetCap(c) => Some(PendingCommand {
                incident_id: c.incident_id.clone(),
                what: if c.bytes == 0 {
                    "cap removal"
                } else {
                    "SetCap"
                },
            }),
            _ => None,
        };
        if let Some(p) = pending {
            self.pending.insert(seq, p);
        }
        self.send(seq, payload).await
    }

    /// Handles one message after Hello; an error ends the stream.
    async fn handle(&mut self, msg: AgentMessage) -> Result<()> {
        let received_ms = now_ms();
        let payload = match msg.payload {
            None => return Err(Error::InvalidArgument("message has no payload".into())),
            Some(agent_message::Payload::Hello(_)) => {
                return Err(Error::FailedPrecondition(
                    "replayed Hello: a stream says Hello exactly once".into(),
                ));
            }
            Some(agent_message::Payload::Ack(ack)) => return self.command_ack(msg.seq, ack).await,
            Some(agent_message::Payload::FlowReport(report)) => {
                validate_flow(&report)?;
                Payload::Flow(report)
            }
            Some(agent_message::Payload::Detection(d)) => {
                validate_detection(&d)?;
                Payload::Detection(Box::new(d))
            }
        };
        if msg.seq == 0 {
            return Err(Error::InvalidArgument(
                "FlowReport and Detection need a sequence number > 0".into(),
            ));
        }
        if self.last_seq > 0 && msg.seq <= self.last_seq {
            return Err(Error::InvalidArgument(format!(
                "sequence number {} does not increase (previous on this stream {})",
                msg.seq, self.last_seq
            )));
        }
        let high_water = self.last_seq.max(self.stored_at_hello);
        if msg.seq > high_water.saturating_add(MAX_SEQ_JUMP) {
            return Err(Error::InvalidArgument(format!(
                "sequence number {} leaps more than {MAX_SEQ_JUMP} past {high_water}: refused as a lie",
                msg.seq
            )));
        }
        self.last_seq = msg.seq;
        let rx = self
            .ingestor
            .submit(Ingest {
                node: self.node.clone(),
                seq: msg.seq,
                sent_at_ms: msg.sent_at_unix_ms,
                received_ms,
                payload,
            })
            .await?;
        self.acks
            .send((msg.seq, rx))
            .await
            .map_err(|_| Error::Unavailable("stream closed".into()))
    }

    async fn command_ack(&mut self, seq: u64, ack: Ack) -> Result<()> {
        if seq != 0 {
            return Err(Error::InvalidArgument(
                "Ack carries seq 0 (it is not stored)".into(),
            ));
        }
        let status = AckStatus::try_from(ack.status).map_err(|_| {
            Error::InvalidArgument(format!("Ack.status: unknown value {}", ack.status))
        })?;
        let Some(pending) = self.pending.remove(&ack.seq) else {
            return Err(Error::InvalidArgument(format!(
                "Ack for command {} that was never sent or already acknowledged",
                ack.seq
            )));
        };
        let cause = match status {
            AckStatus::Ok | AckStatus::Duplicate => {
                format!("in-kernel {} applied on {}", pending.what, self.node)
            }
            _ => format!(
                "agent could not apply {}: {}",
                pending.what,
                ack.detail.chars().take(512).collect::<String>()
            ),
        };
        if pending.incident_id.is_empty() {
            if matches!(status, AckStatus::Ok | AckStatus::Duplicate) {
                tracing::info!(node = %self.node, what = pending.what, detail = %ack.detail, "agent applied command");
            } else {
                tracing::warn!(node = %self.node, what = pending.what, detail = %ack.detail, "agent could not apply command");
            }
            return Ok(());
        }
        let store = self.store.clone();
        let actor = format!("agent:{}", self.node);
        tokio::task::spawn_blocking(move || {
            store.note(&pending.incident_id, &actor, &cause, now_ms())
        })
        .await
        .map_err(|e| Error::Unavailable(format!("store task: {e}")))?
    }
}

/// Sends Acks in sequence order as their commits complete.
async fn forward_acks(
    mut pending: mpsc::Receiver<(u64, oneshot::Receiver<Result<Stored>>)>,
    out: Outbound,
) {
    while let Some((seq, rx)) = pending.recv().await {
        let ack = match rx.await {
            Ok(Ok(Stored::New)) => Ack {
                seq,
                status: AckStatus::Ok as i32,
                detail: String::new(),
            },
            Ok(Ok(Stored::Duplicate)) => Ack {
                seq,
                status: AckStatus::Duplicate as i32,
                detail: String::new(),
            },
            Ok(Err(e)) => {
                // Not stored: end the stream without acking, so the agent keeps
                // the message and resends it on its next stream.
                let _ = out.send(Err(Status::from(e))).await;
                return;
            }
            Err(_) => return,
        };
        let msg = ControllerMessage {
            seq: 0,
            payload: Some(controller_message::Payload::Ack(ack)),
        };
        if out.send(Ok(msg)).await.is_err() {
            return;
        }
    }
}

async fn run_session(
    mut session: Session,
    mut inbound: Streaming<AgentMessage>,
    mut commands: CommandReceiver,
    registration: crate::hub::Registration,
    permit: (tokio::sync::OwnedSemaphorePermit, StreamGuard),
) {
    let ending = loop {
        tokio::select! {
            msg = inbound.message() => match msg {
                Ok(Some(msg)) => {
                    if let Err(e) = session.handle(msg).await {
                        tracing::warn!(node = %session.node, error = %e, "agent stream refused");
                        break Some(Status::from(e));
                    }
                }
                Ok(None) => break None,
                Err(status) => {
                    let status = inbound_error(status);
                    if status.code() == Code::InvalidArgument {
                        tracing::warn!(node = %session.node, %status, "agent stream refused");
                    } else {
                        // The agent went away (restart, network): routine.
                        tracing::info!(node = %session.node, status = %status.message(), "agent stream ended");
                    }
                    break Some(status);
                }
            },
            Some(command) = commands.recv() => {
                if !session.command(command).await {
                    break None;
                }
            }
        }
    };
    // Unregister before the agent hears the status, so a reconnect right
    // after it is not refused as a second stream.
    drop(commands);
    drop(registration);
    drop(permit);
    if let Some(status) = ending {
        let _ = session.out.send(Err(status)).await;
    }
}

type ConnectStream = Pin<Box<dyn Stream<Item = Result<ControllerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl AgentGateway for Gateway {
    type ConnectStream = ConnectStream;

    async fn connect(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<ConnectStream>, Status> {
        let caller = auth::caller(self.mode, &request)?;
        if let Some(id) = &caller
            && id.role != Role::Agent
        {
            return Err(Error::PermissionDenied(format!(
                "certificate {:?} has role {}; only agent certificates may connect as agents",
                id.name, id.role
            ))
            .into());
        }
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(self.limits.hello_timeout, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no Hello within the timeout"))?
            .map_err(inbound_error)?
            .ok_or_else(|| Status::cancelled("stream closed before Hello"))?;
        let hello = validate_hello(&first)?;
        if let Some(cert_node) = caller.as_ref().and_then(|c| c.node.as_deref())
            && cert_node != hello.node_name
        {
            return Err(Error::PermissionDenied(format!(
                "certificate is for node {cert_node:?}; it cannot speak for {:?}",
                hello.node_name
            ))
            .into());
        }
        let permit = self.streams.clone().try_acquire_owned().map_err(|_| {
            Error::ResourceExhausted(format!("at most {} agent streams", self.limits.max_streams))
        })?;
        let permit = (permit, self.ingestor.metrics().agent_stream());
        let (registration, commands) = self.hub.register(&hello.node_name)?;
        let info = AgentInfo {
            node: hello.node_name.clone(),
            agent_version: hello.agent_version.clone(),
            kernel_release: hello.kernel_release.clone(),
            dropped_flow_reports: hello.dropped_flow_reports,
            dropped_detections: hello.dropped_detections,
        };
        let node = info.node.clone();
        let last_stored = self.ingestor.hello(info).await?;
        let store = self.store.clone();
        let blocks_node = node.clone();
        let blocks = tokio::task::spawn_blocking(move || store.blocks_for(&blocks_node))
            .await
            .map_err(|e| Status::internal(format!("store task: {e}")))??;
        tracing::info!(%node, version = %hello.agent_version, last_stored, "agent connected");

        let (out, out_rx) = mpsc::channel(1024);
        let (acks, acks_rx) = mpsc::channel(4096);
        tokio::spawn(forward_acks(acks_rx, out.clone()));
        let mut session = Session {
            node,
            store: self.store.clone(),
            ingestor: self.ingestor.clone(),
            out,
            acks,
            // Resends start at or below the stored high-water mark (acked as
            // duplicates); monotonicity is checked from the stream's first message.
            last_seq: 0,
            stored_at_hello: last_stored,
            next_command: 0,
            pending: HashMap::new(),
        };
        let welcome = Welcome {
            controller_version: VERSION.to_string(),
            last_stored_seq: last_stored,
            max_message_bytes: u32::try_from(self.limits.max_message_bytes).unwrap_or(u32::MAX),
        };
        session
            .send(0, controller_message::Payload::Welcome(welcome))
            .await;
        // Containment survives a reconnect (or a controller restart): the
        // agent re-applies every Block its node should have.
        for block in blocks {
            session
                .command(controller_message::Payload::Block(block))
                .await;
        }
        if let Some(policy) = self.hub.policy() {
            session
                .command(controller_message::Payload::PolicyUpdate(policy))
                .await;
        }
        tokio::spawn(run_session(
            session,
            inbound,
            commands,
            registration,
            permit,
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(out_rx))))
    }
}
