//! `exfilguard-agent`: the node daemon.
use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use exfilguard_agent::{
    analyze,
    cidr::IpNet,
    clock,
    datapath::{self, Datapath, DatapathConfig, Event},
    detect::{Detection, Phase},
    engine::Engine,
    flows::FlowTracker,
    metrics::Metrics,
    pods::{self, PodCache},
    policy::Policy,
    stream::{StreamConfig, StreamHandle, TlsFiles},
    telemetry, uplink,
};
use exfilguard_proto::v1::{self as pb, AckStatus, Capability};
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
};

/// exfilguard node agent: counts egress per workload in the kernel, watches
/// DNS, and blocks or caps what it is told to.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// Log as JSON lines instead of text.
    #[arg(long, global = true, env = "EXFILGUARD_LOG_JSON")]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Load and attach the programs, then poll counters and events until
    /// SIGINT/SIGTERM.
    Run(Box<RunArgs>),
    /// Replay a capture (pcap or pcapng) through the detectors and print what
    /// they find. The workload is the client address.
    ///
    /// Example: exfilguard-agent analyze --pcap dump.pcapng --output table
    Analyze(AnalyzeArgs),
    /// Detach the programs and remove everything the agent pinned (maps,
    /// counters, blocks, caps, links).
    Cleanup {
        /// bpffs directory the agent pinned into.
        #[arg(long, env = "EXFILGUARD_PIN_DIR", default_value = datapath::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
}

#[derive(clap::Args, Debug)]
struct AnalyzeArgs {
    /// The capture file (required).
    #[arg(long)]
    pcap: PathBuf,
    /// Policy YAML (optional; default: the runbook's thresholds).
    #[arg(long)]
    policy: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    output: Output,
    /// CIDRs of the workloads' side (optional, repeatable): only sources in
    /// them are workloads and only destinations outside them are egress.
    /// Without it every source is a workload and every destination external.
    #[arg(long = "internal", value_name = "CIDR")]
    internal: Vec<IpNet>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum Output {
    Json,
    Table,
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// cgroup v2 directory to attach to: every cgroup below it is watched.
    /// `/sys/fs/cgroup` on a Kubernetes node.
    #[arg(long, env = "EXFILGUARD_CGROUP", default_value = "/sys/fs/cgroup")]
    cgroup: PathBuf,
    /// bpffs directory for pinned maps and links: counters, blocks and caps
    /// survive a restart, and stay enforced while the agent is down. bpffs is
    /// mounted if absent.
    #[arg(long, env = "EXFILGUARD_PIN_DIR", default_value = datapath::DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    /// Pin nothing: all state goes when the agent exits.
    #[arg(long)]
    no_pin: bool,
    /// CIDRs inside the cluster (pod, service, node ranges); traffic to
    /// anything else is external. Repeatable.
    #[arg(long = "internal", value_name = "CIDR")]
    internal: Vec<IpNet>,
    /// How often counters are read.
    #[arg(long, default_value = "1s", value_parser = humantime_secs)]
    poll_interval: Duration,
    /// Print flow deltas, DNS events and detections as JSON lines on stdout.
    #[arg(long)]
    print: bool,
    /// Policy YAML (thresholds, allowlists, overrides, action). Re-read on
    /// SIGHUP; a bad file is rejected and the policy in force stays.
    /// Default: the runbook's thresholds.
    #[arg(long, env = "EXFILGUARD_POLICY")]
    policy: Option<PathBuf>,
    /// cgroup v2 mount, for attributing cgroup ids to workloads.
    #[arg(long, env = "EXFILGUARD_CGROUP_ROOT", default_value = "/sys/fs/cgroup")]
    cgroup_root: PathBuf,
    /// Address of the Prometheus `/metrics`, `/healthz` and `/readyz`
    /// endpoints; `off` disables them.
    #[arg(long, env = "EXFILGUARD_METRICS_ADDR", default_value = "0.0.0.0:9464")]
    metrics_addr: String,
    /// Name pod workloads (namespace, name, labels, owner, images) from a
    /// watch of this node's Pods. `auto`: on when running in a pod
    /// (KUBERNETES_SERVICE_HOST) or KUBECONFIG is set.
    #[arg(
        long,
        env = "EXFILGUARD_KUBERNETES",
        value_enum,
        default_value = "auto"
    )]
    kubernetes: Kubernetes,
    /// This node's name: the Pod watch's `spec.nodeName`, and who the agent
    /// is to the controller (its certificate must name it). From the
    /// downward API in the DaemonSet. Default: the host name.
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    #[command(flatten)]
    controller: ControllerArgs,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Kubernetes {
    Auto,
    On,
    Off,
}

/// How long `run` waits for the first Pod list before counting, so the
/// first detections already carry pod names. Nothing is lost by waiting: the
/// kernel counters keep counting and the first poll reads them whole.
const POD_SYNC_WAIT: Duration = Duration::from_secs(10);

/// Starts the Pod watch when asked to (or, for `auto`, when Kubernetes is
/// there). Failures are retried in the task, never fatal.
fn start_pod_watch(mode: Kubernetes, node_name: Option<String>) -> Option<PodCache> {
    let on = match mode {
        Kubernetes::Off => false,
        Kubernetes::On => true,
        Kubernetes::Auto => pods::detected(|k| std::env::var(k).ok()),
    };
    if !on {
        tracing::info!("Kubernetes attribution off: workloads are named by cgroup path");
        return None;
    }
    let node_name = node_name.filter(|n| !n.is_empty()).unwrap_or_else(|| {
        let host = hostname();
        tracing::warn!(node = %host, "--node-name/NODE_NAME not set: watching pods of the node named like this host");
        host
    });
    let cache = PodCache::new();
    tokio::spawn(pods::connect_and_watch(
        pods::WatchConfig {
            node_name: node_name.clone(),
        },
        cache.clone(),
    ));
    tracing::info!(node = %node_name, "watching this node's pods for attribution");
    Some(cache)
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates
    // when the name fits, and a truncated name is cut at the buffer's end.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return String::new();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Where detections and flow reports go, and who we are to the controller.
/// Without `--controller` the agent runs standalone: it detects, logs and
/// enforces its own policy's hard caps, and nothing contains automatically.
#[derive(clap::Args, Debug)]
struct ControllerArgs {
    /// Controller endpoint, `https://host:port` (`http://` with `--insecure`).
    #[arg(long, env = "EXFILGUARD_CONTROLLER")]
    controller: Option<String>,
    /// CA certificate that signed the controller's certificate (PEM).
    #[arg(long, env = "EXFILGUARD_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// This agent's certificate (PEM, role agent).
    #[arg(long, env = "EXFILGUARD_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, env = "EXFILGUARD_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// Name to verify in the controller's certificate (default: the endpoint's host).
    #[arg(long, env = "EXFILGUARD_TLS_SERVER_NAME")]
    tls_server_name: Option<String>,
    /// Talk to the controller in plain text (development only; logs a warning).
    #[arg(long)]
    insecure: bool,
    /// Directory of the on-disk journal that holds messages until the
    /// controller has stored them.
    #[arg(
        long,
        env = "EXFILGUARD_JOURNAL_DIR",
        default_value = "/var/lib/exfilguard/journal"
    )]
    journal_dir: PathBuf,
    /// Journal size limit in bytes; when full, the oldest flow reports go first.
    #[arg(long, default_value_t = 64 << 20)]
    journal_max_bytes: u64,
    /// How often per-workload egress is reported to the controller.
    #[arg(long, default_value = "10s", value_parser = humantime_secs)]
    report_interval: Duration,
}

impl ControllerArgs {
    /// The stream configuration, or `None` standalone.
    fn stream_config(&self, node: String) -> anyhow::Result<Option<StreamConfig>> {
        let Some(endpoint) = &self.controller else {
            return Ok(None);
        };
        let mut config = StreamConfig::new(endpoint.clone(), node, &self.journal_dir);
        config.journal_max_bytes = self.journal_max_bytes;
        config.kernel_release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        config.capabilities = vec![Capability::Block, Capability::HardCap, Capability::Dns];
        config.tls = match (&self.tls_ca, &self.tls_cert, &self.tls_key, self.insecure) {
            (Some(ca), Some(cert), Some(key), false) => Some(TlsFiles {
                ca: ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
                server_name: self.tls_server_name.clone(),
            }),
            (None, None, None, true) => {
                tracing::warn!(%endpoint, "--insecure: the controller stream is plain text and unauthenticated");
                None
            }
            (_, _, _, true) => anyhow::bail!("--insecure and --tls-* exclude each other"),
            _ => anyhow::bail!(
                "--controller needs --tls-ca, --tls-cert and --tls-key (or --insecure for plain text)"
            ),
        };
        Ok(Some(config))
    }
}

fn humantime_secs(s: &str) -> Result<Duration, String> {
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "s"), |i| s.split_at(i));
    let n: f64 = num.parse().map_err(|_| format!("not a duration: {s:?}"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("unknown unit in {s:?}: use ms, s or m")),
    };
    if !(secs > 0.0 && secs.is_finite()) {
        return Err(format!("duration must be positive: {s:?}"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    telemetry::init("info", cli.log_json);
    match cli.command {
        Command::Run(args) => run(*args).await,
        Command::Analyze(args) => analyze(args),
        Command::Cleanup { pin_dir } => {
            let removed = datapath::bpffs::remove_pins(&pin_dir)
                .with_context(|| format!("removing pins under {}", pin_dir.display()))?;
            tracing::info!(count = removed.len(), dir = %pin_dir.display(), "removed pins");
            Ok(())
        }
    }
}

fn analyze(args: AnalyzeArgs) -> anyhow::Result<()> {
    let AnalyzeArgs {
        pcap,
        policy,
        output,
        internal,
    } = args;
    let policy = match policy {
        Some(p) => Policy::load(&p).with_context(|| format!("policy {}", p.display()))?,
        None => Policy::default(),
    };
    let bytes = std::fs::read(&pcap).with_context(|| format!("reading {}", pcap.display()))?;
    let report = analyze::analyze_bytes(&bytes, policy, internal);
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Output::Table => print!("{}", report_table(&report)),
    }
    match &report.error {
        // The detections up to the damage are printed above; the exit code
        // still says the capture was not read to the end.
        Some(e) => anyhow::bail!("{}: {e}", pcap.display()),
        None => Ok(()),
    }
}

fn report_table(r: &analyze::Report) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{} packets, {} DNS messages ({} unparsable), {} undecodable; {} detections",
        r.stats.packets,
        r.stats.dns_messages,
        r.stats.dns_errors,
        r.stats.undecodable,
        r.detections.len()
    );
    for d in &r.detections {
        let at = std::time::UNIX_EPOCH + Duration::from_nanos(d.evidence.window_end_ns);
        let secs = at
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let _ = writeln!(
            s,
            "{secs} {:<30} {:<6} {:<40} {:<30} observed {:.0} > {:.0} bytes {} encoded {}",
            d.rule.as_str(),
            format!("{:?}", d.phase).to_lowercase(),
            d.workload,
            d.subject.as_deref().unwrap_or("-"),
            d.observed,
            d.threshold,
            d.evidence.bytes,
            d.evidence.encoded_bytes,
        );
        for t in &d.evidence.top_destinations {
            let _ = writeln!(s, "    to {}:{} {} bytes", t.addr, t.port, t.bytes);
        }
        if let Some(dns) = &d.evidence.dns {
            for q in &dns.sample_queries {
                let _ = writeln!(s, "    query {q}");
            }
        }
    }
    s
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let RunArgs {
        cgroup,
        pin_dir,
        no_pin,
        internal,
        poll_interval,
        print,
        policy: policy_path,
        cgroup_root,
        metrics_addr,
        controller,
        kubernetes,
        node_name,
    } = args;
    let node_name = node_name.filter(|n| !n.is_empty());
    let stream_config = controller.stream_config(node_name.clone().unwrap_or_else(hostname))?;
    let policy = match &policy_path {
        Some(p) => Policy::load(p).with_context(|| format!("policy {}", p.display()))?,
        None => Policy::default(),
    };
    let metrics = Arc::new(Metrics::new());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = if metrics_addr == "off" {
        None
    } else {
        let addr: std::net::SocketAddr = metrics_addr
            .parse()
            .with_context(|| format!("--metrics-addr {metrics_addr:?}"))?;
        let mut rx = stop_rx.clone();
        let (bound, task) = exfilguard_agent::metrics::serve(addr, metrics.clone(), async move {
            let _ = rx.changed().await;
        })
        .await
        .with_context(|| format!("serving metrics on {addr}"))?;
        tracing::info!(%bound, "metrics on /metrics, /healthz, /readyz");
        Some(task)
    };
    // The policy the controller's updates lay over: the file's (or the
    // defaults), never a previous update, so an allowlist entry the
    // controller drops goes away.
    let mut file_policy = policy.clone();
    let mut engine = Engine::new(
        cgroup_root.clone(),
        policy,
        policy_path.clone(),
        metrics.clone(),
    );
    let pod_cache = start_pod_watch(kubernetes, node_name);
    if let Some(cache) = &pod_cache {
        engine.set_pods(cache.clone());
    }
    let pinned = !no_pin;
    let config = DatapathConfig {
        cgroup_path: cgroup,
        pin_dir: (!no_pin).then_some(pin_dir),
    };
    let mut dp = Datapath::load(&config)?;
    dp.set_internal_cidrs(&internal)
        .context("setting internal CIDRs")?;
    // The base cap holds from the first packet of every workload, before the
    // first poll has seen any.
    apply_policy_caps(&mut dp, &mut engine);
    let _run_time_stats = Datapath::enable_run_time_stats()
        .inspect_err(|e| tracing::warn!(error = %e, "program run-time stats unavailable"))
        .ok();

    // After a restart on pinned maps, what is already counted was reported by
    // the previous run (up to its last poll); start from there.
    let mut tracker = if dp.reused_pins() {
        FlowTracker::with_baseline(&dp.flows()?)
    } else {
        FlowTracker::new()
    };

    let ring_fd = dp.events_fd().try_clone_to_owned().context("dup ring fd")?;
    // SAFETY: AsyncFd owns `ring_fd` (a dup of the map's fd), so the fd stays
    // open for as long as it is registered.
    let events_fd = unsafe { AsyncFd::register_with_interest(ring_fd, Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("registering the ring buffer with the reactor: {e}"))?;
    if let Some(cache) = &pod_cache
        && !cache.wait_synced(POD_SYNC_WAIT).await
    {
        tracing::warn!(
            "no Pod list after {POD_SYNC_WAIT:?}: starting anyway; pods are named by UID until the watch catches up"
        );
    }
    let mut ticker = tokio::time::interval(poll_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sigterm = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("SIGHUP handler")?;

    let stream = match stream_config {
        Some(c) => {
            tracing::info!(endpoint = %c.endpoint, node = %c.node_name, journal = %c.journal_dir.display(), "streaming to the controller");
            let node = c.node_name.clone();
            let h = StreamHandle::start(c).context("opening the stream journal")?;
            Some((h, node))
        }
        None => {
            tracing::info!("standalone: no --controller, detections are logged only");
            None
        }
    };
    let mut commands = stream.as_ref().and_then(|(h, _)| h.commands());
    let mut reports = uplink::FlowReports::new(clock::unix_now_ms());
    let mut report_ticker = tokio::time::interval(controller.report_interval);
    report_ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The controller's policy, laid over the file's (and again after SIGHUP).
    let mut policy_version = uplink::PolicyVersion::default();
    let mut controller_policy: Option<pb::PolicyUpdate> = None;
    let mut cap_windows: std::collections::HashMap<u64, u64> = Default::default();

    loop {
        tokio::select! {
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            _ = sighup.recv() => match engine.reload() {
                Ok(true) => {
                    tracing::info!(policy = ?policy_path, "policy reloaded");
                    file_policy = engine.policy().clone();
                    if let Some(u) = &controller_policy {
                        match uplink::merge_policy(engine.policy(), u) {
                            Ok(p) => engine.set_policy(p),
                            Err(e) => tracing::error!(error = %e, "controller policy no longer fits the reloaded file; the file's policy is in force"),
                        }
                    }
                }
                Ok(false) => tracing::info!("SIGHUP without --policy: nothing to reload"),
                Err(e) => tracing::error!(error = %e, "policy rejected; the previous policy stays in force"),
            },
            _ = ticker.tick() => {
                let snapshot = dp.flows()?;
                let deltas = tracker.update(&snapshot);
                if print {
                    for d in &deltas {
                        let w = engine.workload(d.id.cgroup_id);
                        let owner = w.pod_info.as_ref().and_then(|p| p.owner.as_ref());
                        let line = serde_json::json!({"flow": {
                            "cgroup_id": d.id.cgroup_id, "remote": d.id.remote, "port": d.id.port,
                            "proto": d.id.proto, "bytes": d.bytes, "packets": d.packets,
                            "external": d.external, "workload": w.id,
                            "owner": owner.map(|o| format!("{}/{}", o.kind, o.name)),
                        }});
                        println!("{line}");
                    }
                }
                engine.flows(&deltas);
                if stream.is_some() {
                    reports.add(&deltas, |cg| {
                        let w = engine.workload(cg);
                        (w.id.clone(), uplink::workload(w, cg, &cgroup_root))
                    });
                }
                for d in engine.evaluate(clock::kernel_now_ns()) {
                    report(&d, print);
                    if let Some((h, node)) = &stream {
                        let cg = engine.cgroup_of(&d.workload).unwrap_or(0);
                        let w = uplink::workload(engine.workload(cg), cg, &cgroup_root);
                        if let Some(pd) = uplink::detection(&d, node, w)
                            && let Err(e) = h.send_detection(pd).await
                        {
                            tracing::error!(error = %e, rule = d.rule.as_str(), "detection not journaled");
                        }
                    }
                }
                apply_policy_caps(&mut dp, &mut engine);
                let stats = dp.stats()?;
                let programs = dp.program_stats().unwrap_or_default();
                metrics.kernel(&stats, snapshot.len() as u64, &programs);
                metrics.set_ready(true);
                tracing::debug!(flows = snapshot.len(), deltas = deltas.len(), ?stats, "poll");
                dp.flush_logs();
            }
            guard = events_fd.readable() => {
                let mut guard = guard.context("waiting on the ring buffer")?;
                for ev in dp.drain_events(4096) {
                    if let Ok(Event::Dns(r)) = &ev {
                        engine.dns(r);
                    }
                    match ev {
                        Ok(Event::Dns(r)) if print => {
                            let at = clock::kernel_to_wall(r.timestamp_ns)
                                .duration_since(std::time::UNIX_EPOCH)
                                .unwrap_or_default();
                            let line = serde_json::json!({"dns": {
                                "cgroup_id": r.cgroup_id, "direction": format!("{:?}", r.direction),
                                "tcp": r.tcp, "server": r.server.to_string(),
                                "captured": r.payload.len(), "orig_len": r.orig_len,
                                "unix_ms": at.as_millis() as u64,
                            }});
                            println!("{line}");
                        }
                        Ok(Event::Cap(c)) => {
                            tracing::warn!(
                                cgroup_id = c.cgroup_id, budget = c.budget_bytes, spent = c.spent_bytes,
                                "hard cap spent: external egress dropped until the window ends"
                            );
                            // The kernel says so once per CPU and window: report once.
                            let fresh = cap_windows.insert(c.cgroup_id, c.window) != Some(c.window);
                            if let (Some((h, node)), true) = (&stream, fresh) {
                                let w = uplink::workload(engine.workload(c.cgroup_id), c.cgroup_id, &cgroup_root);
                                let window = dp.cap_status(c.cgroup_id).ok().flatten().map(|s| s.window).unwrap_or_default();
                                let pd = cap_detection(node, w, c.budget_bytes, c.spent_bytes, window);
                                if let Err(e) = h.send_detection(pd).await {
                                    tracing::error!(error = %e, "cap detection not journaled");
                                }
                            }
                        }
                        Ok(_) => {}
                        Err(e) => tracing::warn!(error = %e, "malformed kernel event"),
                    }
                }
                guard.clear_ready();
            }
            _ = report_ticker.tick(), if stream.is_some() => {
                if let (Some((h, _)), Some(r)) = (&stream, reports.take(clock::unix_now_ms()))
                    && let Err(e) = h.send_flow_report(r).await
                {
                    tracing::error!(error = %e, "flow report not journaled");
                }
            }
            Some(cmd) = recv(&mut commands) => {
                let Some((h, _)) = &stream else { continue };
                let result = uplink::apply(&cmd.payload, &mut dp, &mut engine, &file_policy, &mut policy_version);
                if let (Ok(_), pb::controller_message::Payload::PolicyUpdate(u)) = (&result, &cmd.payload) {
                    controller_policy = Some(u.clone());
                }
                let (status, detail) = uplink::ack_status(&result);
                if status == AckStatus::Ok {
                    tracing::warn!(seq = cmd.seq, "controller command applied: {detail}");
                } else {
                    tracing::error!(seq = cmd.seq, "controller command failed: {detail}");
                }
                h.ack_command(cmd.seq, status, detail);
            }
        }
    }
    if let Some((h, _)) = stream {
        // What is not acknowledged stays in the journal for the next run.
        h.shutdown().await;
    }
    if pinned {
        tracing::info!(
            "shutting down; programs stay attached through their pinned links (`exfilguard-agent cleanup` detaches)"
        );
    } else {
        tracing::info!("shutting down: detaching programs");
    }
    drop(dp);
    metrics.set_ready(false);
    let _ = stop_tx.send(true);
    if let Some(task) = server {
        match task.await {
            Ok(Err(e)) => tracing::warn!(error = %e, "metrics server"),
            Err(e) => tracing::warn!(error = %e, "metrics server task"),
            Ok(Ok(())) => {}
        }
    }
    Ok(())
}

/// The next command, or never when there is no stream.
async fn recv(
    commands: &mut Option<tokio::sync::mpsc::Receiver<exfilguard_agent::stream::Command>>,
) -> Option<exfilguard_agent::stream::Command> {
    match commands {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Pushes the policy's hard caps to the kernel: the base cap as the default
/// for every cgroup (seen or not), an override's different cap to the cgroups
/// seen so far; the kernel enforces them even while the agent is down.
fn apply_policy_caps(dp: &mut Datapath, engine: &mut Engine) {
    if let Some(cap) = engine.default_cap_change() {
        let r = match &cap {
            Some(c) => dp.set_default_cap(c.bytes, c.window.0),
            None => dp.clear_default_cap().map(|_| ()),
        };
        match r {
            Ok(()) => {
                tracing::info!(cap = ?cap.as_ref().map(|c| (c.bytes, c.window.0)), "policy default hard cap in the kernel");
                engine.default_cap_applied(cap);
            }
            Err(e) => tracing::error!(error = %e, "could not set the policy's default hard cap"),
        }
    }
    for (cg, cap) in engine.cap_changes() {
        let r = match &cap {
            Some(c) => dp.set_cap(cg, c.bytes, c.window.0),
            None => dp.clear_cap(cg).map(|_| ()),
        };
        match r {
            Ok(()) => {
                tracing::info!(cgroup_id = cg, cap = ?cap.as_ref().map(|c| (c.bytes, c.window.0)), "policy hard cap in the kernel");
                engine.cap_applied(cg, cap);
            }
            Err(e) => {
                tracing::error!(cgroup_id = cg, error = %e, "could not set the policy's hard cap")
            }
        }
    }
}

/// A detection for a spent hard cap: the kernel already drops the rest.
fn cap_detection(
    node: &str,
    workload: pb::Workload,
    budget: u64,
    spent: u64,
    window: Duration,
) -> pb::Detection {
    let window_s = window.as_secs();
    pb::Detection {
        detection_id: format!("{node}-cap-{}-{}", workload.cgroup_id, clock::unix_now_ms()),
        kind: pb::DetectionKind::CapExhausted as i32,
        severity: pb::Severity::High as i32,
        workload: Some(workload),
        detected_at_unix_ms: clock::unix_now_ms(),
        summary: format!(
            "hard cap spent: {spent} of {budget} bytes per {window_s} s; external egress dropped in the kernel until the window ends"
        ),
        bytes_estimate: spent,
        window_seconds: u32::try_from(window_s).unwrap_or(u32::MAX),
        threshold: budget,
        evidence: None,
        // The kernel has contained it already; the incident is for humans.
        action: pb::PolicyAction::Alert as i32,
    }
}

/// Logs a detection (warn on start, info otherwise) and prints it as a JSON
/// line with `--print`. Evidence times are on the kernel's monotonic clock;
/// the printed line adds wall-clock milliseconds.
fn report(d: &Detection, print: bool) {
    let wall = |ns: u64| {
        clock::kernel_to_wall(ns)
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64
    };
    let top = d.evidence.top_destinations.first();
    if d.phase == Phase::Start {
        tracing::warn!(
            rule = d.rule.as_str(), workload = %d.workload, subject = ?d.subject,
            observed = d.observed, threshold = d.threshold, action = ?d.action,
            bytes = d.evidence.bytes, encoded_bytes = d.evidence.encoded_bytes,
            top = ?top.map(|t| (t.addr, t.port, t.bytes)),
            "detection: {}", d.condition
        );
    } else {
        tracing::info!(
            rule = d.rule.as_str(), workload = %d.workload, subject = ?d.subject,
            phase = ?d.phase, episode = d.episode, observed = d.observed, "detection episode"
        );
    }
    if print {
        let line = serde_json::json!({"detection": d, "window_start_unix_ms": wall(d.evidence.window_start_ns),
            "window_end_unix_ms": wall(d.evidence.window_end_ns)});
        println!("{line}");
    }
}
