//! The stream client: one task that keeps the node's stream to the
//! controller open and drains the journal into it.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use exfilguard_proto::v1::{
    Ack, AckStatus, AgentMessage, Capability, Detection, FlowReport, Hello,
    agent_gateway_client::AgentGatewayClient, agent_message, controller_message,
};
use prost::Message;
use tokio::{
    sync::{Notify, mpsc, watch},
    task::JoinHandle,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::clock::unix_now_ms as now_ms;

use super::{
    backoff::Backoff,
    journal::{Drops, Entry, Journal, JournalError, Kind},
};

/// Certificate files for mutual TLS.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// CA that signed the controller's certificate.
    pub ca: PathBuf,
    /// This agent's certificate (role agent, naming this node).
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
    /// Name to verify in the controller's certificate (default: the endpoint's host).
    pub server_name: Option<String>,
}

/// Stream settings.
#[derive(Debug, Clone)]
pub struct StreamConfig {
    /// Controller endpoint, `https://host:port` (`http://` only without TLS).
    pub endpoint: String,
    /// Mutual TLS; `None` means plain text (a controller started with `--insecure`).
    pub tls: Option<TlsFiles>,
    /// This node's name (must match the certificate).
    pub node_name: String,
    /// Agent version for Hello.
    pub agent_version: String,
    /// Kernel release for Hello.
    pub kernel_release: String,
    /// What this agent can do.
    pub capabilities: Vec<Capability>,
    /// Journal directory.
    pub journal_dir: PathBuf,
    /// Journal size limit in bytes.
    pub journal_max_bytes: u64,
    /// First reconnect delay cap.
    pub backoff_initial: Duration,
    /// Largest reconnect delay cap.
    pub backoff_max: Duration,
    /// Largest gRPC message.
    pub max_message_bytes: usize,
}

impl StreamConfig {
    /// Defaults for everything but where to connect and who we are.
    pub fn new(
        endpoint: impl Into<String>,
        node_name: impl Into<String>,
        journal_dir: impl Into<PathBuf>,
    ) -> Self {
        Self {
            endpoint: endpoint.into(),
            tls: None,
            node_name: node_name.into(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            kernel_release: String::new(),
            capabilities: Vec::new(),
            journal_dir: journal_dir.into(),
            journal_max_bytes: 64 << 20,
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            max_message_bytes: 4 << 20,
        }
    }
}

/// Stream failures visible to producers.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The journal failed (disk full, permissions).
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// The stream task is gone.
    #[error("the stream client has stopped")]
    Stopped,
}

/// A command from the controller, to apply and then acknowledge.
#[derive(Debug, Clone)]
pub struct Command {
    /// The controller's sequence number for it (quote it in the ack).
    pub seq: u64,
    /// Block, Unblock, SetCap or PolicyUpdate.
    pub payload: controller_message::Payload,
}

/// Counters for metrics and tests.
#[derive(Debug, Clone, Default)]
pub struct StreamStats {
    /// A stream is open and welcomed.
    pub connected: bool,
    /// Streams opened so far.
    pub connects: u64,
    /// Messages sent (resends included).
    pub sent: u64,
    /// Messages the controller acknowledged as newly stored.
    pub acked: u64,
    /// Messages the controller acknowledged as already stored.
    pub duplicates: u64,
    /// Messages waiting for an acknowledgement (in the journal).
    pub pending: usize,
    /// Journal drops.
    pub drops: Drops,
    /// Why the last stream ended (empty if none did).
    pub last_error: String,
}

struct Shared {
    journal: Mutex<Journal>,
    notify: Notify,
    stats: Mutex<StreamStats>,
}

impl Shared {
    fn stats(&self, f: impl FnOnce(&mut StreamStats)) {
        if let Ok(mut s) = self.stats.lock() {
            f(&mut s);
        }
    }

    fn journal<T>(&self, f: impl FnOnce(&mut Journal) -> T) -> Result<T, String> {
        let mut j = self
            .journal
            .lock()
            .map_err(|_| "journal lock poisoned".to_string())?;
        let out = f(&mut j);
        let (pending, drops) = (j.len(), j.drops());
        drop(j);
        self.stats(|s| {
            s.pending = pending;
            s.drops = drops;
        });
        Ok(out)
    }
}

/// Handle to the running stream client.
pub struct StreamHandle {
    shared: Arc<Shared>,
    commands: Mutex<Option<mpsc::Receiver<Command>>>,
    command_acks: mpsc::UnboundedSender<Ack>,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl StreamHandle {
    /// Opens the journal and starts the stream task (needs a Tokio runtime).
    pub fn start(config: StreamConfig) -> Result<Self, StreamError> {
        let journal = Journal::open(&config.journal_dir, config.journal_max_bytes)?;
        let stats = StreamStats {
            pending: journal.len(),
            drops: journal.drops(),
            ..Default::default()
        };
        let shared = Arc::new(Shared {
            journal: Mutex::new(journal),
            notify: Notify::new(),
            stats: Mutex::new(stats),
        });
        let (command_tx, command_rx) = mpsc::channel(1024);
        let (ack_tx, ack_rx) = mpsc::unbounded_channel();
        let (shutdown, shutdown_rx) = watch::channel(false);
        let task = tokio::spawn(run(config, shared.clone(), command_tx, ack_rx, shutdown_rx));
        Ok(Self {
            shared,
            commands: Mutex::new(Some(command_rx)),
            command_acks: ack_tx,
            shutdown,
            task,
        })
    }

    async fn append(&self, kind: Kind, payload: Vec<u8>) -> Result<u64, StreamError> {
        let shared = self.shared.clone();
        let seq = tokio::task::spawn_blocking(move || {
            let mut j = shared.journal.lock().map_err(|_| StreamError::Stopped)?;
            let seq = j.append(kind, now_ms(), payload)?;
            let (pending, drops) = (j.len(), j.drops());
            drop(j);
            shared.stats(|s| {
                s.pending = pending;
                s.drops = drops;
            });
            Ok::<_, StreamError>(seq)
        })
        .await
        .map_err(|_| StreamError::Stopped)??;
        self.shared.notify.notify_one();
        Ok(seq)
    }

    /// Journals a FlowReport for sending; returns its sequence number.
    pub async fn send_flow_report(&self, report: FlowReport) -> Result<u64, StreamError> {
        self.append(Kind::Flow, report.encode_to_vec()).await
    }

    /// Journals a Detection for sending; returns its sequence number.
    pub async fn send_detection(&self, detection: Detection) -> Result<u64, StreamError> {
        self.append(Kind::Detection, detection.encode_to_vec())
            .await
    }

    /// The controller's commands (once; later calls get `None`).
    pub fn commands(&self) -> Option<mpsc::Receiver<Command>> {
        self.commands.lock().ok().and_then(|mut c| c.take())
    }

    /// Answers a command on the current stream. If the stream has been
    /// replaced meanwhile the answer is dropped: the controller re-sends what
    /// should be in force when the agent reconnects.
    pub fn ack_command(&self, seq: u64, status: AckStatus, detail: impl Into<String>) {
        let _ = self.command_acks.send(Ack {
            seq,
            status: status as i32,
            detail: detail.into(),
        });
    }

    /// Current counters.
    pub fn stats(&self) -> StreamStats {
        self.shared
            .stats
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    /// Closes the stream and waits for the task (the journal keeps what is unacknowledged).
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
    }
}

async fn run(
    config: StreamConfig,
    shared: Arc<Shared>,
    commands: mpsc::Sender<Command>,
    mut acks: mpsc::UnboundedReceiver<Ack>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new(config.backoff_initial, config.backoff_max);
    loop {
        let result = session(
            &config,
            &shared,
            &commands,
            &mut acks,
            &mut shutdown,
            &mut backoff,
        )
        .await;
        shared.stats(|s| s.connected = false);
        if *shutdown.borrow() {
            return;
        }
        if let Err(e) = result {
            tracing::warn!(error = %e, endpoint = %config.endpoint, "controller stream ended");
            shared.stats(|s| s.last_error = e);
        }
        let delay = backoff.next_delay();
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.changed() => return,
        }
    }
}

async fn channel(config: &StreamConfig) -> Result<Channel, String> {
    let mut endpoint = Endpoint::from_shared(config.endpoint.clone())
        .map_err(|e| format!("endpoint {:?}: {e}", config.endpoint))?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10))
        .tcp_nodelay(true);
    if let Some(tls) = &config.tls {
        let read = |p: &PathBuf| std::fs::read(p).map_err(|e| format!("read {}: {e}", p.display()));
        let mut tls_config = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(&tls.ca)?))
            .identity(Identity::from_pem(read(&tls.cert)?, read(&tls.key)?));
        if let Some(name) = &tls.server_name {
            tls_config = tls_config.domain_name(name.clone());
        }
        endpoint = endpoint
            .tls_config(tls_config)
            .map_err(|e| format!("TLS configuration: {e}"))?;
    }
    endpoint.connect().await.map_err(|e| {
        let mut text = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            text = format!("{text}: {s}");
            source = s.source();
        }
        format!("connect {}: {text}", config.endpoint)
    })
}

fn to_message(entry: &Entry) -> Option<AgentMessage> {
    let payload = match entry.kind {
        Kind::Flow => {
            agent_message::Payload::FlowReport(FlowReport::decode(entry.payload.as_slice()).ok()?)
        }
        Kind::Detection => {
            agent_message::Payload::Detection(Detection::decode(entry.payload.as_slice()).ok()?)
        }
    };
    Some(AgentMessage {
        seq: entry.seq,
        sent_at_unix_ms: now_ms(),
        payload: Some(payload),
    })
}

/// Sends journal entries in order as they appear.
async fn pump(shared: Arc<Shared>, out: mpsc::Sender<AgentMessage>) {
    let mut last_sent = 0;
    loop {
        let Ok(batch) = shared.journal(|j| j.pending_after(last_sent, 128)) else {
            return;
        };
        if batch.is_empty() {
            // A notify_one() before this await leaves a permit, so no append is missed.
            shared.notify.notified().await;
            continue;
        }
        for entry in batch {
            last_sent = entry.seq;
            let Some(msg) = to_message(&entry) else {
                // Checksummed on disk, so this is a bug, not corruption; do not wedge the stream on it.
                tracing::error!(seq = entry.seq, "undecodable journal entry; discarding");
                let _ = shared.journal(|j| j.ack(entry.seq));
                continue;
            };
            if out.send(msg).await.is_err() {
                return;
            }
            shared.stats(|s| s.sent += 1);
        }
    }
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn session(
    config: &StreamConfig,
    shared: &Arc<Shared>,
    commands: &mpsc::Sender<Command>,
    acks: &mut mpsc::UnboundedReceiver<Ack>,
    shutdown: &mut watch::Receiver<bool>,
    backoff: &mut Backoff,
) -> Result<(), String> {
    let channel = channel(config).await?;
    let mut client = AgentGatewayClient::new(channel)
        .max_decoding_message_size(config.max_message_bytes)
        .max_encoding_message_size(config.max_message_bytes);
    let (out, out_rx) = mpsc::channel(256);
    let (high_seq, drops) = shared.journal(|j| (j.high_seq(), j.drops()))?;
    let hello = Hello {
        node_name: config.node_name.clone(),
        agent_version: config.agent_version.clone(),
        kernel_release: config.kernel_release.clone(),
        capabilities: config.capabilities.iter().map(|c| *c as i32).collect(),
        dropped_flow_reports: drops.flow_reports,
        dropped_detections: drops.detections,
        last_seq: high_seq,
    };
    out.send(AgentMessage {
        seq: 0,
        sent_at_unix_ms: now_ms(),
        payload: Some(agent_message::Payload::Hello(hello)),
    })
    .await
    .map_err(|_| "stream closed before Hello".to_string())?;
    let status = |s: tonic::Status| {
        format!(
            "controller refused the stream: {:?}: {}",
            s.code(),
            s.message()
        )
    };
    let mut inbound = client
        .connect(ReceiverStream::new(out_rx))
        .await
        .map_err(status)?
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), inbound.message())
        .await
        .map_err(|_| "no Welcome from the controller".to_string())?
        .map_err(status)?
        .ok_or("controller closed the stream before Welcome")?;
    let Some(controller_message::Payload::Welcome(welcome)) = first.payload else {
        return Err("controller's first message was not Welcome".into());
    };
    let last_stored = welcome.last_stored_seq;
    shared
        .journal(|j| -> Result<(), JournalError> {
            if j.high_seq() < last_stored {
                // The controller has more of this node than the journal ever
                // issued: the journal was lost. Renumber instead of being ignored as duplicates.
                j.rebase(last_stored)
            } else {
                j.ack_through(last_stored).map(|_| ())
            }
        })?
        .map_err(|e| e.to_string())?;
    backoff.reset();
    shared.stats(|s| {
        s.connected = true;
        s.connects += 1;
    });
    tracing::info!(endpoint = %config.endpoint, last_stored, "controller stream open");
    // Answers meant for a previous stream are void on this one.
    while acks.try_recv().is_ok() {}
    let _pump = AbortOnDrop(tokio::spawn(pump(shared.clone(), out.clone())));
    loop {
        tokio::select! {
            msg = inbound.message() => match msg {
                Ok(Some(msg)) => handle(shared, commands, msg).await?,
                Ok(None) => return Err("controller closed the stream".into()),
                Err(s) => return Err(status(s)),
            },
            Some(ack) = acks.recv() => {
                let msg = AgentMessage { seq: 0, sent_at_unix_ms: now_ms(), payload: Some(agent_message::Payload::Ack(ack)) };
                out.send(msg).await.map_err(|_| "stream closed".to_string())?;
            }
            _ = shutdown.changed() => return Ok(()),
        }
    }
}

async fn handle(
    shared: &Arc<Shared>,
    commands: &mpsc::Sender<Command>,
    msg: exfilguard_proto::v1::ControllerMessage,
) -> Result<(), String> {
    match msg.payload {
        Some(controller_message::Payload::Ack(ack)) => {
            shared
                .journal(|j| j.ack(ack.seq))?
                .map_err(|e| e.to_string())?;
            let duplicate = ack.status == AckStatus::Duplicate as i32;
            shared.stats(|s| {
                if duplicate {
                    s.duplicates += 1
                } else {
                    s.acked += 1
                }
            });
        }
        Some(controller_message::Payload::Welcome(_)) => {
            tracing::warn!("second Welcome on one stream; ignored")
        }
        Some(payload) => {
            commands
                .send(Command {
                    seq: msg.seq,
                    payload,
                })
                .await
                .map_err(|_| "command receiver dropped".to_string())?;
        }
        None => tracing::warn!("controller message without payload; ignored"),
    }
    Ok(())
}
