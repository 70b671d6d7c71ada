//! Wires the services to a listener: mTLS (or `--insecure`), limits, health
//! and reflection, graceful shutdown.

use std::{future::Future, path::PathBuf, sync::Arc, time::Duration};

use exfilguard_proto::v1::{
    PolicyUpdate, agent_gateway_server::AgentGatewayServer, incidents_server::IncidentsServer,
};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

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
    store::{Store, sqlite::SqliteStore},
};

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
    /// Kubernetes API client (`--kubernetes`); with one, ExfilPolicy objects
    /// are reconciled into the agent policy on top of `agent_policy`.
    pub kube: Option<kube::Client>,
    /// Settings from the config file: alert sinks (none: transitions are
    /// recorded in the outbox, not sent) and the reports' time zone.
    pub file: FileConfig,
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

/// Puts the agent policy in force: the file alone, or, with a Kubernetes
/// client, the file as the default under the ExfilPolicy objects (the
/// reconciler pushes; agents that connect before its first list get the
/// file's policy). Returns the reconciler's task, if one runs.
fn start_agent_policy(
    config: &ServerConfig,
    hub: &Arc<Hub>,
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
    match &config.kube {
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
    let store: Arc<dyn Store> = tokio::task::spawn_blocking(move || SqliteStore::open(&db))
        .await
        .map_err(|e| Error::Unavailable(format!("store task: {e}")))?
        .map(Arc::new)?;
    let hub = Hub::new(1024);
    // Stops with the server, however `serve` returns.
    let _reconciler = AbortOnDrop(start_agent_policy(&config, &hub)?);
    let ingestor = Ingestor::start(store.clone(), hub.clone(), config.policy, 16 * 1024)?;
    // Picks up what a previous run left pending, then follows the hub.
    let dispatcher = Dispatcher::start(store.clone(), &config.file.alerts, Some(&hub))
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
        .tcp_nodelay(true);
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
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await
        .map_err(|e| Error::Unavailable(format!("server: {e}")));
    dispatcher.shutdown().await;
    served
}
