//! exfilguard controller daemon: `serve` the gRPC API, or make a development PKI with `certs`.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use exfilguard_controller::{
    certs,
    config::FileConfig,
    correlate::{ResponsePolicy, default_protected_namespaces},
    gateway::GatewayLimits,
    k8s::{DnsEndpoint, LockdownOptions, lease},
    metrics::{self, Metrics},
    server::{self, KubeDuties, ServerConfig, TlsFiles},
};
use exfilguard_proto::v1::PolicyAction;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "exfilguard-controller",
    version,
    about = "exfilguard cluster controller"
)]
struct Cli {
    /// Log as JSON lines.
    #[arg(long, global = true, env = "EXFILGUARD_LOG_JSON")]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve AgentGateway, Incidents, health and reflection.
    Serve(Box<Serve>),
    /// Write a development CA and controller, agent, viewer and responder certificates.
    ///
    /// Reuses DIR/ca.pem and DIR/ca-key.pem when present.
    /// Example: exfilguard-controller certs --out ./pki --node node-a --node node-b
    Certs {
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// DNS names / IP addresses of the controller's certificate.
        #[arg(long = "host", default_values = ["localhost", "127.0.0.1", "::1"])]
        hosts: Vec<String>,
        /// Nodes to issue agent certificates for (agent-<node>.pem).
        #[arg(long = "node")]
        nodes: Vec<String>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Action {
    Alert,
    Lockdown,
    DryRun,
}

impl From<Action> for PolicyAction {
    fn from(a: Action) -> Self {
        match a {
            Action::Alert => PolicyAction::Alert,
            Action::Lockdown => PolicyAction::Lockdown,
            Action::DryRun => PolicyAction::DryRun,
        }
    }
}

/// One of the controller's Kubernetes duties.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Duty {
    /// Quarantine pods (label, NetworkPolicy, Event).
    Containment,
    /// Capture each new incident's pod, owner and Events as evidence.
    Evidence,
    /// Reconcile ExfilPolicy objects into the agents' policy (needs the CRD).
    Exfilpolicies,
    /// Keep incidents in ExfilIncident objects shared by every controller
    /// replica (needs the CRD).
    Incidents,
}

/// Whether to talk to the Kubernetes API.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Kubernetes {
    /// In a pod (KUBERNETES_SERVICE_HOST) or with KUBECONFIG set: on; else off.
    Auto,
    /// Required: fail to start without a working client.
    On,
    /// Standalone: containment is the agents' in-kernel Block alone.
    Off,
}

/// Whether to elect a leader among controller replicas on a Lease.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LeaderElect {
    /// On whenever the Kubernetes API is used.
    Auto,
    /// Required: fail to start without the Kubernetes API.
    On,
    /// A single replica that always leads.
    Off,
}

#[derive(clap::Args)]
struct Serve {
    /// Address to listen on.
    #[arg(long, env = "EXFILGUARD_LISTEN", default_value = "0.0.0.0:7443")]
    listen: SocketAddr,
    /// Write the bound address here once listening (useful with port 0).
    #[arg(long)]
    addr_file: Option<PathBuf>,
    /// SQLite store.
    #[arg(
        long,
        env = "EXFILGUARD_DB",
        default_value = "/var/lib/exfilguard/controller.db"
    )]
    db: PathBuf,
    /// Controller certificate (PEM).
    #[arg(
        long,
        env = "EXFILGUARD_TLS_CERT",
        required_unless_present = "insecure"
    )]
    cert: Option<PathBuf>,
    /// Controller private key (PEM).
    #[arg(long, env = "EXFILGUARD_TLS_KEY", required_unless_present = "insecure")]
    key: Option<PathBuf>,
    /// CA of agent and client certificates (PEM).
    #[arg(
        long,
        env = "EXFILGUARD_CLIENT_CA",
        required_unless_present = "insecure"
    )]
    client_ca: Option<PathBuf>,
    /// Plain text, no authentication. For local experiments only.
    #[arg(long, conflicts_with_all = ["cert", "key", "client_ca"])]
    insecure: bool,
    /// Largest gRPC message, bytes.
    #[arg(long, default_value_t = 4 << 20)]
    max_message_bytes: usize,
    /// Most agent streams at once.
    #[arg(long, default_value_t = 10_000)]
    max_agents: usize,
    /// Most concurrent HTTP/2 streams per connection.
    #[arg(long, default_value_t = 64)]
    max_streams_per_connection: u32,
    /// Response to critical detections.
    #[arg(long, value_enum, default_value = "lockdown")]
    critical_action: Action,
    /// Response to high detections.
    #[arg(long, value_enum, default_value = "alert")]
    high_action: Action,
    /// Detector policy (YAML) pushed to every agent and re-read on SIGHUP:
    /// volume_threshold_bytes, volume_window, action, internal_cidrs,
    /// allow_cidrs, allow_domains, egress_proxy_cidrs, hard_cap {bytes, window}.
    #[arg(long, env = "EXFILGUARD_AGENT_POLICY")]
    agent_policy: Option<PathBuf>,
    /// Config file (YAML) with the alert sinks; see the `config` module docs.
    #[arg(long, env = "EXFILGUARD_CONFIG")]
    config: Option<PathBuf>,
    /// Use the Kubernetes API to quarantine pods (label, NetworkPolicy, Event).
    #[arg(
        long,
        value_enum,
        env = "EXFILGUARD_KUBERNETES",
        default_value = "auto"
    )]
    kubernetes: Kubernetes,
    /// Namespace never contained (repeat; replaces the default list
    /// kube-system, kube-public, kube-node-lease).
    #[arg(
        long = "protected-namespace",
        env = "EXFILGUARD_PROTECTED_NAMESPACES",
        value_delimiter = ','
    )]
    protected_namespaces: Vec<String>,
    /// What to do through the Kubernetes API (comma-separated).
    #[arg(
        long,
        value_enum,
        env = "EXFILGUARD_KUBERNETES_DUTIES",
        value_delimiter = ',',
        default_value = "containment,evidence,exfilpolicies,incidents"
    )]
    kubernetes_duties: Vec<Duty>,
    /// Namespace of the controller's own objects (ExfilIncidents, the
    /// leader-election Lease); in a pod, the pod's namespace from the
    /// downward API.
    #[arg(long, env = "POD_NAMESPACE", default_value = lease::DEFAULT_NAMESPACE)]
    namespace: String,
    /// Let a locked-down pod still reach cluster DNS (kube-system pods
    /// labelled k8s-app=kube-dns). Off by default: DNS is an exfiltration path.
    #[arg(long, env = "EXFILGUARD_LOCKDOWN_KEEP_DNS")]
    lockdown_keep_dns: bool,
    /// A CIDR a locked-down pod may still reach (repeat), e.g. a log collector.
    #[arg(
        long = "lockdown-keep-cidr",
        env = "EXFILGUARD_LOCKDOWN_KEEP_CIDRS",
        value_delimiter = ','
    )]
    lockdown_keep_cidrs: Vec<String>,
    /// Elect one leader among controller replicas on a coordination.k8s.io
    /// Lease: only the leader contains pods, sends alerts, captures evidence
    /// and writes ExfilPolicy status.
    #[arg(
        long,
        value_enum,
        env = "EXFILGUARD_LEADER_ELECT",
        default_value = "auto"
    )]
    leader_elect: LeaderElect,
    /// Name of the Lease.
    #[arg(long, env = "EXFILGUARD_LEASE_NAME", default_value = lease::DEFAULT_NAME)]
    lease_name: String,
    /// How long the Lease holds without renewal (e.g. 15s); the leader
    /// renews every third of it, the others look every 2/15 of it.
    #[arg(long, env = "EXFILGUARD_LEASE_DURATION", default_value = "15s", value_parser = parse_lease_duration)]
    lease_duration: std::time::Duration,
    /// Serve Prometheus `/metrics` (ingest latency, messages, agent
    /// streams) and `/healthz` here, e.g. 0.0.0.0:9465. Off when absent.
    #[arg(long, env = "EXFILGUARD_METRICS_ADDR")]
    metrics_addr: Option<SocketAddr>,
    /// Write the metrics endpoint's bound address here (useful with port 0).
    #[arg(long, requires = "metrics_addr")]
    metrics_addr_file: Option<PathBuf>,
    /// How long per-window egress aggregates (TopTalkers, the reports'
    /// egress chart) are kept, e.g. 30d; incidents and evidence are kept
    /// regardless.
    #[arg(long, env = "EXFILGUARD_EGRESS_RETENTION", default_value = "30d", value_parser = parse_retention)]
    egress_retention: std::time::Duration,
}

/// A duration of at least `min` seconds; `why` says what less would break.
fn parse_at_least(s: &str, min: u64, why: &str) -> Result<std::time::Duration, String> {
    let d = exfilguard_policy::parse_duration(s)?;
    if d < std::time::Duration::from_secs(min) {
        return Err(format!("{s}: {why}"));
    }
    Ok(d)
}

fn parse_retention(s: &str) -> Result<std::time::Duration, String> {
    parse_at_least(
        s,
        3600,
        "keep egress aggregates at least 1h (TopTalkers looks back that far by default)",
    )
}

fn parse_lease_duration(s: &str) -> Result<std::time::Duration, String> {
    parse_at_least(s, 3, "a lease under 3s leaves no room to renew")
}

/// The Kubernetes client `mode` asks for; `None` when standalone.
async fn kube_client(mode: Kubernetes) -> anyhow::Result<Option<kube::Client>> {
    let present = |k: &str| std::env::var_os(k).is_some_and(|v| !v.is_empty());
    let wanted = match mode {
        Kubernetes::Off => false,
        Kubernetes::On => true,
        Kubernetes::Auto => present("KUBERNETES_SERVICE_HOST") || present("KUBECONFIG"),
    };
    if !wanted {
        tracing::info!(
            "standalone: no Kubernetes API (containment is the agents' in-kernel Block)"
        );
        return Ok(None);
    }
    let client = kube::Client::try_default()
        .await
        .context("Kubernetes client (in-cluster service account or KUBECONFIG)")?;
    // Fail at start, not at the first incident, when the API is unreachable.
    let version = client
        .apiserver_version()
        .await
        .context("reach the Kubernetes API server")?;
    tracing::info!(version = %version.git_version, "Kubernetes API reachable");
    Ok(Some(client))
}

fn init_tracing(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colours only for a person at a terminal, not in files and pipes.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "no SIGTERM handler; stop with SIGINT");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}

/// Writes `addr` to `path`, then renames, so a reader never sees half an address.
fn write_addr(path: &Path, addr: SocketAddr) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, addr.to_string()).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("write {}", path.display()))
}

async fn serve(args: Serve) -> anyhow::Result<()> {
    let tls = match (args.insecure, args.cert, args.key, args.client_ca) {
        (true, ..) => None,
        (false, Some(cert), Some(key), Some(client_ca)) => Some(TlsFiles {
            cert,
            key,
            client_ca,
        }),
        _ => bail!("--cert, --key and --client-ca are required (or --insecure)"),
    };
    let file = match &args.config {
        Some(path) => FileConfig::load(path).context("controller config")?,
        None => FileConfig::default(),
    };
    if let Some(parent) = args.db.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| format!("create {}", parent.display()))?;
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listen on {}", args.listen))?;
    if let Some(path) = &args.addr_file {
        write_addr(path, listener.local_addr()?)?;
    }
    let metrics = Arc::new(Metrics::new());
    if let Some(addr) = args.metrics_addr {
        let bound = metrics::serve(addr, metrics.clone())
            .await
            .with_context(|| format!("metrics: listen on {addr}"))?;
        tracing::info!(%bound, "Prometheus metrics on /metrics");
        if let Some(path) = &args.metrics_addr_file {
            write_addr(path, bound)?;
        }
    }
    for cidr in &args.lockdown_keep_cidrs {
        cidr.parse::<ipnet::IpNet>()
            .with_context(|| format!("--lockdown-keep-cidr {cidr:?} is not a CIDR"))?;
    }
    let kube = kube_client(args.kubernetes).await?;
    let leader_election = match (args.leader_elect, &kube) {
        (LeaderElect::Off, _) => None,
        (LeaderElect::On, None) => {
            bail!("--leader-elect=on needs the Kubernetes API (--kubernetes)")
        }
        (_, None) => None,
        (_, Some(_)) => {
            // Checked when the election starts (lease::spawn).
            let mut c = lease::LeaseConfig::new(args.namespace.clone())
                .with_lease_duration(args.lease_duration);
            c.name = args.lease_name;
            Some(c)
        }
    };
    let protected_namespaces = if args.protected_namespaces.is_empty() {
        default_protected_namespaces()
    } else {
        args.protected_namespaces
    };
    let config = ServerConfig {
        tls,
        db: args.db,
        limits: GatewayLimits {
            max_message_bytes: args.max_message_bytes,
            max_streams: args.max_agents,
            ..Default::default()
        },
        max_streams_per_connection: args.max_streams_per_connection,
        policy: ResponsePolicy {
            critical: args.critical_action.into(),
            high: args.high_action.into(),
            low: PolicyAction::Alert,
            protected_namespaces,
            cluster_containment: kube.is_some()
                && args.kubernetes_duties.contains(&Duty::Containment),
        },
        agent_policy: args.agent_policy,
        file,
        kube,
        lockdown: LockdownOptions {
            dry_run: false,
            allow_dns: args.lockdown_keep_dns.then(DnsEndpoint::kube_dns),
            allow_cidrs: args.lockdown_keep_cidrs,
        },
        duties: KubeDuties {
            containment: args.kubernetes_duties.contains(&Duty::Containment),
            evidence: args.kubernetes_duties.contains(&Duty::Evidence),
            exfilpolicies: args.kubernetes_duties.contains(&Duty::Exfilpolicies),
            incidents: args.kubernetes_duties.contains(&Duty::Incidents),
        },
        namespace: args.namespace,
        leader_election,
        metrics,
        egress_retention: args.egress_retention,
    };
    server::serve(config, listener, shutdown_signal())
        .await
        .context("controller")
}

/// jemalloc, not glibc's malloc: see controller/Cargo.toml.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_tracing(cli.log_json);
    match cli.command {
        Command::Serve(args) => serve(*args).await,
        Command::Certs { out, hosts, nodes } => {
            let pki = certs::write_dev_pki(&out, &hosts, &nodes).context("write certificates")?;
            println!("wrote development PKI to {}", pki.dir.display());
            Ok(())
        }
    }
}
