//! Wires the services to a listener: mTLS (or `--insecure`), limits, health
//! and reflection, graceful shutdown.

use std::{future::Future, path::PathBuf, sync::Arc, time::Duration};

use exfilguard_proto::v1::{
    PolicyUpdate, agent_gateway_server::AgentGatewayServer, incidents_server::IncidentsServer,
};
use tokio::net::TcpListener;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig, server::TcpIncoming};

use crate::{
    Error, Result,
    alerts::Dispatcher,
    api::IncidentsApi,
    auth::AuthMode,
    config::FileConfig,
    correlate::ResponsePolicy,
    gateway::{Gateway, GatewayLimits},
    hub::Hub,
    ingest::Ingestor,
    k8s::{
        Containment, ContainmentConfig, LockdownOptions,
        lease::{self, Leader, LeaseConfig, LeaseGuard},
        respond::{self, Responder},
    },
    metrics::Metrics,
    store::{Store, kube::KubeStore, sqlite::SqliteStore},
};

/// HTTP/2 receive window per stream: ~600 agent messages in flight, far
/// more than a stream needs at full speed on a LAN.
const STREAM_WINDOW: u32 = 64 * 1024;
/// HTTP/2 receive window per connection (a client may hold a few streams).
const CONNECTION_WINDOW: u32 = 256 * 1024;

/// Certificate files for mutual TLS.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The controller's certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// CA that signs agent and client certificates (PEM).
    pub client_ca: PathBuf,
}

/// Everything the server needs.
#[derive(Clone)]
pub struct ServerConfig {
    /// TLS files; `None` only with `--insecure`.
    pub tls: Option<TlsFiles>,
    /// SQLite file.
    pub db: PathBuf,
    /// Gateway limits (message size, streams).
    pub limits: GatewayLimits,
    /// Most concurrent HTTP/2 streams per connection (one agent needs one).
    pub max_streams_per_connection: u32,
    /// Response policy.
    pub policy: ResponsePolicy,
    /// Detector policy pushed to every agent (`--agent-policy`), re-read on SIGHUP.
    pub agent_policy: Option<PathBuf>,
    /// Settings from the config file: alert sinks (none: transitions are
    /// recorded in the outbox, not sent) and the reports' time zone.
    pub file: FileConfig,
    /// The Kubernetes API (`None`: standalone, where containment is the
    /// agent's in-kernel Block alone). With it, a lockdown also quarantines
    /// the pod (label, NetworkPolicy, Event), and each new incident's pod,
    /// owner chain and Events are captured into its evidence, and
    /// ExfilPolicy objects are reconciled into the agent policy on top of
    /// `agent_policy`.
    pub kube: Option<kube::Client>,
    /// What a cluster lockdown still lets the pod reach (DNS, CIDRs).
    pub lockdown: LockdownOptions,
    /// Which of the Kubernetes duties this controller takes on.
    pub duties: KubeDuties,
    /// Namespace of the controller's own objects (`ExfilIncident`s).
    pub namespace: String,
    /// Leader election among replicas on this Lease (needs `kube`); `None`:
    /// this controller is always the leader (a single replica).
    pub leader_election: Option<LeaseConfig>,
    /// Where the ingest path records its metrics (served on `/metrics` by
    /// whoever holds the other handle).
    pub metrics: Arc<Metrics>,
    /// How long egress aggregates (TopTalkers, the reports' chart) are kept.
    pub egress_retention: Duration,
}

impl ServerConfig {
    /// A standalone controller on `db` (mTLS with `tls`, plain text with
    /// `None`): default limits and response policy, no agent policy file,
    /// no alert sinks, no Kubernetes.
    pub fn new(db: PathBuf, tls: Option<TlsFiles>) -> Self {
        Self {
            tls,
            db,
            limits: GatewayLimits::default(),
            max_streams_per_connection: 64,
            policy: ResponsePolicy::default(),
            agent_policy: None,
            file: FileConfig::default(),
            kube: None,
            lockdown: LockdownOptions::default(),
            duties: KubeDuties::default(),
            namespace: lease::DEFAULT_NAMESPACE.into(),
            leader_election: None,
            metrics: Arc::new(Metrics::new()),
            egress_retention: crate::retention::DEFAULT_EGRESS_RETENTION,
        }
    }
}

/// The controller's Kubernetes duties, each on by default; switching one
/// off leaves the others (and the agents' in-kernel response) as they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KubeDuties {
    /// Quarantine pods: label, NetworkPolicy, Event.
    pub containment: bool,
    /// Capture each new incident's pod, owner chain and Events as evidence.
    pub evidence: bool,
    /// Reconcile ExfilPolicy objects into the agents' policy (needs the CRD).
    pub exfilpolicies: bool,
    /// Keep incidents in `ExfilIncident` objects, shared by every replica
    /// (needs the CRD); off: each replica has only its SQLite file.
    pub incidents: bool,
}

impl Default for KubeDuties {
    fn default() -> Self {
        Self {
            containment: true,
            evidence: true,
            exfilpolicies: true,
            incidents: true,
        }
    }
}

impl std::fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // kube::Client is not Debug; say only whether there is one.
        f.debug_struct("ServerConfig")
            .field("tls", &self.tls)
            .field("db", &self.db)
            .field("limits", &self.limits)
            .field(
                "max_streams_per_connection",
                &self.max_streams_per_connection,
            )
            .field("policy", &self.policy)
            .field("agent_policy", &self.agent_policy)
            .field("file", &self.file)
            .field("kube", &self.kube.is_some())
            .field("lockdown", &self.lockdown)
            .field("duties", &self.duties)
            .field("namespace", &self.namespace)
            .field("leader_election", &self.leader_election)
            .finish()
    }
}

fn read(path: &PathBuf) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| Error::Io {
        path: path.display().to_string(),
        source,
    })
}

/// Re-reads the agent policy on SIGHUP and hands it to `apply`; a bad file
/// is refused and the policy in force stays.
fn spawn_policy_reload(path: PathBuf, apply: impl Fn(PolicyUpdate) + Send + 'static) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "no SIGHUP handler: the agent policy is not reloadable");
            return;
        }
    };
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            match crate::node_policy::load(&path) {
                Ok(update) => {
                    tracing::info!(version = update.version, "agent policy reloaded");
                    apply(update);
                }
                Err(e) => {
                    tracing::error!(error = %e, "agent policy rejected; the previous one stays in force");
                }
            }
        }
    });
}

/// The listener's connections with Nagle off. The builder's `tcp_nodelay`
/// only reaches sockets tonic binds itself, not a listener handed in: with
/// Nagle on, a Block written right after an Ack waited for the agent's
/// delayed ACK (≈ 40 ms, measured by `examples/lockdown_bench.rs`).
fn incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// Puts the agent policy in force: the file alone, or, with a Kubernetes
/// client, the file as the default under the ExfilPolicy objects (the
/// reconciler pushes; agents that connect before its first list get the
/// file's policy). Returns the reconciler's task, if one runs.
fn start_agent_policy(
    config: &ServerConfig,
    hub: &Arc<Hub>,
    leader: &Leader,
) -> Result<Option<tokio::task::JoinHandle<()>>> {
    let default = match &config.agent_policy {
        Some(path) => {
            let update = crate::node_policy::load(path)?;
            tracing::info!(path = %path.display(), version = update.version, "agent policy loaded");
            hub.set_policy(update.clone());
            Some(update)
        }
        None => None,
    };
    match config.kube.as_ref().filter(|_| config.duties.exfilpolicies) {
        Some(client) => {
            let (tx, rx) = tokio::sync::watch::channel(default);
            if let Some(path) = &config.agent_policy {
                spawn_policy_reload(path.clone(), move |u| {
                    tx.send_replace(Some(u));
                });
            }
            // Without a file the sender is dropped here: the reconciler keeps
            // reading the (absent) default.
            tracing::info!("ExfilPolicy reconciler started");
            Ok(Some(crate::k8s::policy_reconciler::spawn(
                client.clone(),
                hub.clone(),
                rx,
                leader.clone(),
            )))
        }
        None => {
            if let Some(path) = &config.agent_policy {
                let hub = hub.clone();
                spawn_policy_reload(path.clone(), move |u| {
                    let version = u.version;
                    let agents = hub.set_policy(u);
                    tracing::info!(version, agents, "agent policy pushed");
                });
            }
            Ok(None)
        }
    }
}

/// Aborts a background task when dropped.
struct AbortOnDrop(Option<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(t) = &self.0 {
            t.abort();
        }
    }
}

/// The store: the SQLite file alone, or, when incidents are kept in the
/// cluster, the SQLite file as this replica's working copy under the
/// `ExfilIncident` objects (with the task that follows the other replicas).
fn open_store(
    config: &ServerConfig,
    local: SqliteStore,
    hub: &Arc<Hub>,
) -> (Arc<dyn Store>, Vec<AbortOnDrop>) {
    let Some(client) = config.kube.as_ref().filter(|_| config.duties.incidents) else {
        return (Arc::new(local), Vec::new());
    };
    let (kube_store, mut merged) = KubeStore::new(
        local,
        client.clone(),
        &config.namespace,
        tokio::runtime::Handle::current(),
    );
    // An agent is connected to one replica; the others skip its commands
    // quietly instead of noting that it is away.
    hub.set_replicated();
    let store: Arc<dyn Store> = kube_store.clone();
    let (pump_store, pump_hub) = (store.clone(), hub.clone());
    let pump = tokio::spawn(async move {
        while let Some(effects) = merged.recv().await {
            let (store, hub) = (pump_store.clone(), pump_hub.clone());
            let _ = tokio::task::spawn_blocking(move || hub.apply(store.as_ref(), effects)).await;
        }
    });
    let follow = kube_store.spawn();
    tracing::info!(namespace = %config.namespace, "incidents kept in ExfilIncident objects");
    (
        store,
        vec![AbortOnDrop(Some(pump)), AbortOnDrop(Some(follow))],
    )
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    config: ServerConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let mode = if config.tls.is_some() {
        AuthMode::MutualTls
    } else {
        AuthMode::Insecure
    };
    let db = config.db.clone();
    let local = tokio::task::spawn_blocking(move || SqliteStore::open(&db))
        .await
        .map_err(|e| Error::Unavailable(format!("store task: {e}")))??;
    let hub = Hub::new(1024);
    let (store, _replication) = open_store(&config, local, &hub);
    let (leader, election) = start_leader_election(&config)?;
    // Stops with the server, however `serve` returns.
    let _reconciler = AbortOnDrop(start_agent_policy(&config, &hub, &leader)?);
    let mut policy = config.policy.clone();
    policy.cluster_containment = config.kube.is_some() && config.duties.containment;
    let mut _responder = AbortOnDrop(None);
    let mut _leading = AbortOnDrop(None);
    if let Some(client) = config.kube.as_ref().filter(|_| config.duties.containment) {
        let containment = Containment::new(
            client.clone(),
            ContainmentConfig {
                protected_namespaces: policy.protected_namespaces.clone(),
                ..Default::default()
            },
        );
        let responder = Responder::new(
            containment,
            store.clone(),
            hub.clone(),
            config.lockdown.clone(),
            respond::RETRY,
        )
        .with_leader(leader.clone());
        _responder = AbortOnDrop(Some(responder.clone().start()));
        // Puts back what a restart or a failover interrupted; in the
        // background, so the API server being slow does not hold up the agents.
        _leading = AbortOnDrop(Some(responder.follow_leadership()));
        tracing::info!(protected = ?policy.protected_namespaces, "kubernetes containment on");
    }
    if let Some(client) = config.kube.as_ref().filter(|_| config.duties.evidence) {
        // Subscribed before ingest starts, so no opened incident is missed.
        crate::evidence::capture::Capturer::new(
            store.clone(),
            client.clone(),
            crate::evidence::capture::RETRY,
        )
        .with_leader(leader.clone())
        .spawn(hub.subscribe());
    }
    let _pruner = AbortOnDrop(Some(crate::retention::spawn_egress_pruner(
        store.clone(),
        config.egress_retention,
    )));
    let ingestor = Ingestor::start(
        store.clone(),
        hub.clone(),
        policy,
        16 * 1024,
        config.metrics.clone(),
    )?;
    // Picks up what a previous run left pending, then follows the hub.
    let dispatcher =
        Dispatcher::start_with_leader(store.clone(), &config.file.alerts, Some(&hub), leader)
            .map_err(|e| Error::InvalidArgument(format!("alert configuration: {e}")))?;
    let max_msg = config.limits.max_message_bytes;

    let gateway = AgentGatewayServer::new(Gateway::new(
        mode,
        store.clone(),
        hub.clone(),
        ingestor,
        config.limits,
    ))
    .max_decoding_message_size(max_msg)
    .max_encoding_message_size(max_msg);
    let zone = crate::report::parse_zone(&config.file.reports.time_zone)
        .map_err(|e| Error::InvalidArgument(format!("reports.time_zone: {e}")))?;
    let incidents =
        IncidentsServer::new(IncidentsApi::new(mode, store, hub).with_report_zone(zone))
            .max_decoding_message_size(max_msg)
            .max_encoding_message_size(max_msg);

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<AgentGatewayServer<Gateway>>().await;
    health.set_serving::<IncidentsServer<IncidentsApi>>().await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(exfilguard_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .map_err(|e| Error::Unavailable(format!("reflection: {e}")))?;
    // v1alpha too: grpcurl falls back to it and Python's grpcio-reflection
    // client speaks only v1alpha.
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(|e| Error::Unavailable(format!("reflection: {e}")))?;

    let mut builder = Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .max_concurrent_streams(Some(config.max_streams_per_connection))
        // What a stream may send before the controller has read it. hyper's
        // 1 MiB default let 500 agents park ~500 MB in this process during a
        // burst; with these windows what the store has not taken yet waits
        // in the agents' journals instead.
        .initial_stream_window_size(Some(STREAM_WINDOW))
        .initial_connection_window_size(Some(CONNECTION_WINDOW));
    if let Some(tls) = &config.tls {
        let identity = Identity::from_pem(read(&tls.cert)?, read(&tls.key)?);
        // Client certificates are optional at the TLS layer so that a caller
        // without one reaches us and gets a clear UNAUTHENTICATED status (and
        // health probes work); every exfilguard method requires one.
        let tls_config = ServerTlsConfig::new()
            .identity(identity)
            .client_ca_root(Certificate::from_pem(read(&tls.client_ca)?))
            .client_auth_optional(true);
        builder = builder
            .tls_config(tls_config)
            .map_err(|e| Error::Certificate(format!("TLS configuration: {e}")))?;
    } else {
        tracing::warn!(
            "--insecure: plain-text gRPC, no authentication; every caller may do everything"
        );
    }
    let local = listener.local_addr().map_err(|source| Error::Io {
        path: "listener".into(),
        source,
    })?;
    tracing::info!(%local, tls = config.tls.is_some(), "controller listening");
    let served = builder
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(gateway)
        .add_service(incidents)
        .serve_with_incoming_shutdown(incoming(listener), shutdown)
        .await
        .map_err(|e| Error::Unavailable(format!("server: {e}")));
    dispatcher.shutdown().await;
    if let Some(election) = election {
        // Hands the lease to another replica now rather than at expiry.
        election.shutdown().await;
    }
    served
}

/// Starts leader election when configured and there is a Kubernetes API;
/// otherwise this controller is always the leader.
fn start_leader_election(config: &ServerConfig) -> Result<(Leader, Option<LeaseGuard>)> {
    match (&config.kube, &config.leader_election) {
        (Some(client), Some(lease_config)) => {
            tracing::info!(lease = %lease_config.name, namespace = %lease_config.namespace,
                identity = %lease_config.identity, "leader election on");
            let (leader, guard) = lease::spawn(client.clone(), lease_config.clone())
                .map_err(|e| Error::InvalidArgument(e.to_string()))?;
            Ok((leader, Some(guard)))
        }
        _ => Ok((Leader::always(), None)),
    }
}
