//! Load generator for the controller: N simulated agents, each on its own
//! mutual-TLS connection with its own certificate, stream FlowReports and
//! Detections at a fixed rate; measures durably stored messages per second
//! (acks only come after the commit), the ingest → stored latency the
//! controller itself records (its `/metrics` histogram, read before and after
//! the run and every 10 s), the end-to-end ack latency (generation → ack at
//! the agent: adds the generator, loopback and the ack's way back; also per
//! 10 s of the run, and from the moment a message was handed to the stream),
//! the controller's peak RSS and the CPU seconds the controller and the
//! generator used. Then checks that the store holds exactly what was
//! acknowledged.
//!
//! `cargo run --release -p exfilguard-controller --example loadgen -- --agents 500 --rate 40 --seconds 60`
//! (build the controller binary first: `cargo build --release -p exfilguard-controller`).

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::Parser;
use exfilguard_controller::{
    auth::Role,
    certs::{CertificateAuthority, write_dev_pki},
};
use exfilguard_proto::v1::{
    AgentMessage, Detection, DetectionKind, FlowReport, Hello, ListNodesRequest, Severity,
    Workload, WorkloadEgress, agent_gateway_client::AgentGatewayClient, agent_message,
    controller_message, incidents_client::IncidentsClient,
};
use tokio::sync::{Mutex, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

#[derive(Parser)]
struct Args {
    /// Simulated agents (one connection and certificate each).
    #[arg(long, default_value_t = 500)]
    agents: usize,
    /// Messages per second per agent.
    #[arg(long, default_value_t = 40)]
    rate: u64,
    /// Length of the measured run.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// One message in this many is a Detection (the rest FlowReports).
    #[arg(long, default_value_t = 20)]
    detection_every: u64,
    /// The controller binary.
    #[arg(long)]
    controller: Option<PathBuf>,
    /// Working directory (PKI, database), kept after the run; by default a
    /// fresh temp dir, removed after the run.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Offer `rate × burst` per agent for the run instead (a burst): what the
    /// controller cannot take at once waits in each agent's journal, as on a
    /// real agent, and the run then waits for everything to be stored.
    #[arg(long, default_value_t = 1)]
    burst: u64,
    /// Longest wait after the run for every generated message to be stored.
    #[arg(long, default_value_t = 1800)]
    drain_timeout_seconds: u64,
    /// Also write the measures as `[{name, value, unit, goal, met}]` (the
    /// format of `cargo xtask bench`'s results) to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// One acknowledged message's latency.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Latency {
    /// Second of the run the message was generated in.
    second: u32,
    /// Generation → ack (µs): includes waiting in the agent's journal.
    from_generation_us: u32,
    /// Handed to the gRPC stream → ack (µs): the controller's part, plus loopback.
    from_send_us: u32,
}

struct Shared {
    acked: AtomicU64,
    sent: AtomicU64,
    generated: AtomicU64,
    latencies_us: Mutex<Vec<Latency>>,
    /// When the measured run started.
    start: Instant,
    stop: AtomicBool,
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// The scheduler's account of the controller's thread named `comm` (from
/// /proc/PID/task/TID/schedstat): nanoseconds on a CPU, nanoseconds runnable
/// but waiting for one, and times it was scheduled in. Zeros if not found.
fn thread_schedstat(pid: u32, comm: &str) -> [u64; 3] {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten();
    for task in tasks.flatten() {
        let dir = task.path();
        let name = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if name.trim() != comm {
            continue;
        }
        let stat = std::fs::read_to_string(dir.join("schedstat")).unwrap_or_default();
        let v: Vec<u64> = stat
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        if let [run, wait, slices] = v[..] {
            return [run, wait, slices];
        }
    }
    [0; 3]
}

/// CPU time (user + system) a process has used so far, in seconds.
fn cpu_seconds(pid: &str) -> f64 {
    // Fields 14 and 15 of /proc/PID/stat, after the parenthesised command name.
    let ticks: u64 = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1.split_whitespace().collect::<Vec<_>>();
            Some(rest.get(11)?.parse::<u64>().ok()? + rest.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0);
    // Clock ticks; USER_HZ is 100 on every Linux build we run on.
    ticks as f64 / 100.0
}

/// The contents of a file the controller writes at start.
async fn read_when_written(path: &std::path::Path) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(a) = std::fs::read_to_string(path) {
            return Ok(a);
        }
        if Instant::now() > deadline {
            bail!("controller did not write {} in time", path.display());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A Prometheus histogram as scraped: cumulative counts by upper bound.
#[derive(Debug, Default)]
struct Histogram {
    /// (upper bound in seconds, cumulative count), ascending; +Inf last.
    buckets: Vec<(f64, f64)>,
    count: f64,
    /// Sum of the observations (seconds).
    sum: f64,
}

impl Histogram {
    /// Parses `NAME_bucket{le="…"} N` and `NAME_count N` lines.
    fn parse(text: &str, name: &str) -> anyhow::Result<Self> {
        let mut h = Histogram::default();
        let bucket = format!("{name}_bucket{{le=\"");
        let count = format!("{name}_count ");
        let sum = format!("{name}_sum ");
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix(&bucket) {
                let (le, n) = rest.split_once("\"} ").context("bucket line")?;
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse()?
                };
                h.buckets.push((le, n.trim().parse()?));
            } else if let Some(n) = line.strip_prefix(&count) {
                h.count = n.trim().parse()?;
            } else if let Some(n) = line.strip_prefix(&sum) {
                h.sum = n.trim().parse()?;
            }
        }
        if h.buckets.is_empty() {
            bail!("no {name} histogram in the controller's metrics");
        }
        Ok(h)
    }

    /// What was observed after `earlier` (a scrape of the same histogram).
    fn since(&self, earlier: &Histogram) -> Histogram {
        Histogram {
            buckets: self
                .buckets
                .iter()
                .zip(&earlier.buckets)
                .map(|(a, b)| (a.0, a.1 - b.1))
                .collect(),
            count: self.count - earlier.count,
            sum: self.sum - earlier.sum,
        }
    }

    /// The mean observation in ms.
    fn mean_ms(&self) -> f64 {
        if self.count > 0.0 {
            self.sum / self.count * 1000.0
        } else {
            0.0
        }
    }

    /// The share of observations at most `le` seconds (a bucket bound).
    fn share_within(&self, le: f64) -> f64 {
        let n = self.buckets.iter().find(|b| b.0 >= le).map_or(0.0, |b| b.1);
        if self.count > 0.0 {
            n / self.count
        } else {
            1.0
        }
    }

    /// The `q` quantile in ms, interpolated linearly within its bucket (as
    /// Prometheus' histogram_quantile); in the +Inf bucket, the last bound.
    fn quantile_ms(&self, q: f64) -> f64 {
        let rank = q * self.count;
        let mut lower = (0.0, 0.0);
        for &(le, n) in &self.buckets {
            if n >= rank && self.count > 0.0 {
                if le.is_infinite() {
                    return lower.0 * 1000.0;
                }
                let within = if n > lower.1 {
                    (rank - lower.1) / (n - lower.1)
                } else {
                    1.0
                };
                return (lower.0 + (le - lower.0) * within) * 1000.0;
            }
            lower = (le, n);
        }
        0.0
    }
}

/// Reads the controller's `/metrics`, and its writer thread's schedstat.
struct Scraper {
    url: String,
    http: reqwest::Client,
    pid: u32,
}

impl Scraper {
    fn new(addr: String, pid: u32) -> Self {
        Self {
            url: format!("http://{addr}/metrics"),
            http: reqwest::Client::new(),
            pid,
        }
    }

    /// The controller's ingest series, now.
    async fn scrape(&self) -> anyhow::Result<Scrape> {
        let text = self
            .http
            .get(&self.url)
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?;
        let busy = "exfilguard_controller_writer_busy_seconds_total ";
        Ok(Scrape {
            at: Instant::now(),
            ingest: Histogram::parse(&text, "exfilguard_controller_ingest_seconds")?,
            queue: Histogram::parse(&text, "exfilguard_controller_queue_seconds")?,
            commit: Histogram::parse(&text, "exfilguard_controller_commit_seconds")?,
            writer_busy_s: text
                .lines()
                .find_map(|l| l.strip_prefix(busy))
                .context("no writer_busy_seconds in the controller's metrics")?
                .trim()
                .parse()?,
            writer_sched: thread_schedstat(self.pid, "ingest"),
        })
    }
}

/// One read of the controller's ingest series.
struct Scrape {
    at: Instant,
    /// Received → durable commit, per message.
    ingest: Histogram,
    /// Received → its batch starts storing, per message.
    queue: Histogram,
    /// Store and commit, per batch.
    commit: Histogram,
    /// Seconds the writer has been busy so far.
    writer_busy_s: f64,
    /// The writer thread's schedstat (see [`thread_schedstat`]).
    writer_sched: [u64; 3],
}

impl Scrape {
    /// The writer's busy share between `earlier` and this read (0..1).
    fn busy_since(&self, earlier: &Scrape) -> f64 {
        let wall = (self.at - earlier.at).as_secs_f64();
        if wall > 0.0 {
            (self.writer_busy_s - earlier.writer_busy_s) / wall
        } else {
            0.0
        }
    }

    /// Since `earlier`: ms the writer was runnable but off-CPU, and the mean
    /// of that wait per time it was scheduled in (µs).
    fn run_queue_since(&self, earlier: &Scrape) -> [f64; 2] {
        let [_, wait, slices] = self.writer_sched;
        let wait = wait.saturating_sub(earlier.writer_sched[1]) as f64;
        let slices = slices.saturating_sub(earlier.writer_sched[2]).max(1) as f64;
        [wait / 1e6, wait / slices / 1e3]
    }
}

/// The machine's CPU time so far from /proc/stat: (stolen by the
/// hypervisor, all), in clock ticks. On a shared VM the steal explains
/// much of a run's tail.
fn cpu_steal_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("cpu "))
        .map(|l| {
            l.split_whitespace()
                .filter_map(|v| v.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    // user nice system idle iowait irq softirq steal (guest time is in user).
    let all = ticks.iter().take(8).sum();
    (ticks.get(7).copied().unwrap_or(0), all)
}

fn tls(ca: &str, cert: &str, key: &str) -> ClientTlsConfig {
    ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .identity(Identity::from_pem(cert, key))
        .domain_name("localhost")
}

async fn connect(addr: &str, tls: ClientTlsConfig) -> anyhow::Result<Channel> {
    Ok(Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(tls)?
        .connect()
        .await?)
}

/// The message with sequence number `seq` of agent `node`, made at `now` (ms).
fn message(node: usize, seq: u64, detection_every: u64, now: u64) -> AgentMessage {
    // Pods are unique per namespace, so each node has its own four.
    let pod = format!("n{node}-pod-{}", seq % 4);
    let workload = Workload {
        namespace: format!("ns-{}", node % 50),
        pod,
        cgroup_id: seq % 4 + 1,
        ..Default::default()
    };
    let payload = if seq.is_multiple_of(detection_every) {
        agent_message::Payload::Detection(Detection {
            detection_id: format!("n{node}-{seq}"),
            kind: DetectionKind::Volume as i32,
            severity: Severity::High as i32,
            workload: Some(workload),
            detected_at_unix_ms: now,
            summary: "120 MB to 203.0.113.7:443 in 10 min".into(),
            bytes_estimate: 120_000_000,
            window_seconds: 600,
            threshold: 100_000_000,
            ..Default::default()
        })
    } else {
        agent_message::Payload::FlowReport(FlowReport {
            window_start_unix_ms: now - 1000,
            window_end_unix_ms: now,
            workloads: vec![WorkloadEgress {
                workload: Some(workload),
                external_bytes: 4096,
                internal_bytes: 1024,
                packets: 9,
                ..Default::default()
            }],
        })
    };
    AgentMessage {
        seq,
        sent_at_unix_ms: now,
        payload: Some(payload),
    }
}

/// Messages generated on one tick: `count` of them, all made at `at`.
struct Tick {
    count: u64,
    at: Instant,
    wall_ms: u64,
}

/// One simulated agent. A ticker generates messages on schedule into the
/// agent's journal (a queue of ticks: a message is rebuilt from its seq when
/// sent) and the sender streams them as fast as the controller takes them,
/// so the latency of a message counts any time it waited in the journal.
async fn agent(
    node: usize,
    ch: Channel,
    args: Arc<Args>,
    shared: Arc<Shared>,
) -> anyhow::Result<(u64, u64)> {
    // A small window: what the controller has not taken yet stays in the
    // journal, not in this process's memory.
    let (tx, rx) = mpsc::channel(256);
    let hello = Hello {
        node_name: format!("node-{node}"),
        agent_version: "loadgen".into(),
        ..Default::default()
    };
    tx.send(AgentMessage {
        seq: 0,
        sent_at_unix_ms: 0,
        payload: Some(agent_message::Payload::Hello(hello)),
    })
    .await?;
    let mut inbound = AgentGatewayClient::new(ch)
        .connect(ReceiverStream::new(rx))
        .await?
        .into_inner();
    inbound.message().await?.context("no Welcome")?;
    // (seq, generated at, handed to the stream at) of every unacknowledged message.
    let sent_at: Arc<Mutex<std::collections::VecDeque<(u64, Instant, Instant)>>> =
        Default::default();
    let reader = {
        let sent_at = sent_at.clone();
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut last_acked = 0;
            while let Ok(Some(msg)) = inbound.message().await {
                if let Some(controller_message::Payload::Ack(a)) = msg.payload {
                    let mut q = sent_at.lock().await;
                    while let Some(&(seq, at, sent)) = q.front() {
                        if seq > a.seq {
                            break;
                        }
                        q.pop_front();
                        if seq == a.seq {
                            let second = at.saturating_duration_since(shared.start).as_secs();
                            let us = |t: Instant| t.elapsed().as_micros().min(u32::MAX as u128);
                            lat.push(Latency {
                                second: second as u32,
                                from_generation_us: us(at) as u32,
                                from_send_us: us(sent) as u32,
                            });
                        }
                    }
                    last_acked = a.seq;
                    shared.acked.fetch_add(1, Ordering::Relaxed);
                }
            }
            shared.latencies_us.lock().await.extend(lat);
            last_acked
        })
    };

    // Unbounded: a tick is a few bytes, and what the controller has not taken
    // must wait here. Closed when generation stops.
    let (journal, mut pending) = mpsc::unbounded_channel::<Tick>();
    let ticker = {
        let (args, shared) = (args.clone(), shared.clone());
        tokio::spawn(async move {
            // Ticks of 100 ms, spread over the agents so they do not all fire at once.
            let count = (args.rate * args.burst.max(1) / 10).max(1);
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            tokio::time::sleep(Duration::from_millis((node as u64 * 7) % 100)).await;
            while !shared.stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let made = Tick {
                    count,
                    at: Instant::now(),
                    wall_ms: exfilguard_controller::time::now_ms(),
                };
                if journal.send(made).is_err() {
                    break;
                }
                shared.generated.fetch_add(count, Ordering::Relaxed);
            }
        })
    };

    let mut seq = 0;
    while let Some(tick) = pending.recv().await {
        for _ in 0..tick.count {
            seq += 1;
            sent_at
                .lock()
                .await
                .push_back((seq, tick.at, Instant::now()));
            tx.send(message(node, seq, args.detection_every, tick.wall_ms))
                .await?;
            shared.sent.fetch_add(1, Ordering::Relaxed);
        }
    }
    ticker.await?;
    // Let the last acks arrive, then close.
    let deadline = Instant::now() + Duration::from_secs(args.drain_timeout_seconds);
    while !sent_at.lock().await.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(tx);
    let last_acked = reader.await?;
    Ok((last_acked.min(seq), seq))
}

/// The `p` quantile of sorted latencies (µs), in ms.
fn percentile(sorted_us: &[u32], p: f64) -> f64 {
    let i = ((sorted_us.len() as f64 * p) as usize).min(sorted_us.len().saturating_sub(1));
    sorted_us.get(i).copied().unwrap_or(0) as f64 / 1000.0
}

struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Arc::new(Args::parse());
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("exfilguard-loadgen-{}", std::process::id())),
    };
    let _ = std::fs::remove_dir_all(&dir);
    let pki = write_dev_pki(
        &dir.join("pki"),
        &["localhost".into(), "127.0.0.1".into()],
        &[],
    )?;
    let ca = CertificateAuthority::load(
        &std::fs::read_to_string(pki.ca())?,
        &std::fs::read_to_string(pki.key("ca"))?,
    )?;
    let controller_bin = match &args.controller {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .and_then(|p| p.parent())
            .context("target dir")?
            .join("exfilguard-controller"),
    };
    let addr_file = dir.join("addr");
    let metrics_file = dir.join("metrics.addr");
    let child = Command::new(&controller_bin)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .arg("--addr-file")
        .arg(&addr_file)
        .args(["--metrics-addr", "127.0.0.1:0", "--metrics-addr-file"])
        .arg(&metrics_file)
        .arg("--db")
        .arg(dir.join("controller.db"))
        .arg("--cert")
        .arg(pki.cert("controller"))
        .arg("--key")
        .arg(pki.key("controller"))
        .arg("--client-ca")
        .arg(pki.ca())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("start {}", controller_bin.display()))?;
    let pid = child.id();
    let _guard = Guard(child);
    let addr = read_when_written(&addr_file).await?;
    let metrics = Scraper::new(read_when_written(&metrics_file).await?, pid);
    let ca_pem = std::fs::read_to_string(pki.ca())?;
    eprintln!(
        "controller pid {pid} on {addr}; issuing {} agent certificates and connecting",
        args.agents
    );
    let mut channels = Vec::with_capacity(args.agents);
    for node in 0..args.agents {
        let issued = ca.issue_agent(&format!("node-{node}"))?;
        channels.push(connect(&addr, tls(&ca_pem, &issued.cert_pem, &issued.key_pem)).await?);
    }
    let shared = Arc::new(Shared {
        acked: 0.into(),
        sent: 0.into(),
        generated: 0.into(),
        latencies_us: Mutex::new(Vec::new()),
        stop: false.into(),
        start: Instant::now(),
    });
    let baseline_rss = rss_kb(pid);
    // Before the first message, so the run's histogram holds exactly its messages.
    let mut marks = vec![metrics.scrape().await?];
    let mut tasks: Vec<_> = channels
        .into_iter()
        .enumerate()
        .map(|(node, ch)| tokio::spawn(agent(node, ch, args.clone(), shared.clone())))
        .collect();
    let start = shared.start;
    let cpu_at_start = (cpu_seconds(&pid.to_string()), cpu_seconds("self"));
    let steal_at_start = cpu_steal_ticks();
    let mut peak_rss = baseline_rss;
    let mut last = (0, start);
    let progress = |peak_rss: &mut u64, last: &mut (u64, Instant)| {
        *peak_rss = (*peak_rss).max(rss_kb(pid));
        let acked = shared.acked.load(Ordering::Relaxed);
        let generated = shared.generated.load(Ordering::Relaxed);
        eprintln!(
            "t={:>4}s stored/s={:>7.0} generated={generated} sent={} acked={acked} waiting={} rss={} MB",
            start.elapsed().as_secs(),
            (acked - last.0) as f64 / last.1.elapsed().as_secs_f64(),
            shared.sent.load(Ordering::Relaxed),
            generated.saturating_sub(acked),
            rss_kb(pid) / 1024
        );
        *last = (acked, Instant::now());
    };
    let mut next_mark = Duration::from_secs(10);
    while start.elapsed() < Duration::from_secs(args.seconds) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        progress(&mut peak_rss, &mut last);
        if start.elapsed() >= next_mark {
            marks.push(metrics.scrape().await?);
            next_mark += Duration::from_secs(10);
        }
    }
    let measured = start.elapsed();
    let acked_in_window = shared.acked.load(Ordering::Relaxed);
    let cpu = (
        cpu_seconds(&pid.to_string()) - cpu_at_start.0,
        cpu_seconds("self") - cpu_at_start.1,
    );
    let steal = {
        let now = cpu_steal_ticks();
        let all = now.1.saturating_sub(steal_at_start.1).max(1);
        100.0 * now.0.saturating_sub(steal_at_start.0) as f64 / all as f64
    };
    shared.stop.store(true, Ordering::Relaxed);
    // What waited in the journals drains now (a burst leaves a backlog).
    while !tasks.iter().all(|t| t.is_finished()) {
        tokio::time::sleep(Duration::from_secs(5)).await;
        progress(&mut peak_rss, &mut last);
    }
    let until_stored = start.elapsed();
    let mut acked_total = 0;
    let mut generated_total = 0;
    for t in tasks.drain(..) {
        let (acked, generated) = t.await??;
        acked_total += acked;
        generated_total += generated;
    }
    peak_rss = peak_rss.max(rss_kb(pid));
    marks.push(metrics.scrape().await?);
    let (first, last) = (&marks[0], &marks[marks.len() - 1]);
    let ingest = last.ingest.since(&first.ingest);
    let queue = last.queue.since(&first.queue);
    let commit = last.commit.since(&first.commit);
    // By the time of the commit, unlike `ack_latency_ms.p99_by_10s`.
    let windows = || marks.windows(2);
    let ingest_by_10s: Vec<f64> = windows()
        .map(|w| w[1].ingest.since(&w[0].ingest).quantile_ms(0.99))
        .collect();
    let queue_by_10s: Vec<f64> = windows()
        .map(|w| w[1].queue.since(&w[0].queue).quantile_ms(0.99))
        .collect();
    let commit_by_10s: Vec<[f64; 3]> = windows()
        .map(|w| {
            let c = w[1].commit.since(&w[0].commit);
            [c.count, c.mean_ms(), c.quantile_ms(0.99)]
        })
        .collect();
    let busy_by_10s: Vec<f64> = windows().map(|w| w[1].busy_since(&w[0])).collect();
    let run_queue_by_10s: Vec<[f64; 2]> = windows().map(|w| w[1].run_queue_since(&w[0])).collect();
    eprintln!("ingest → stored p99 (ms) of the commits in each 10 s: {ingest_by_10s:?}");
    eprintln!("received → batch storing p99 (ms) in each 10 s: {queue_by_10s:?}");
    eprintln!("commits in each 10 s [count, mean ms, p99 ms]: {commit_by_10s:?}");
    eprintln!("writer busy share in each 10 s: {busy_by_10s:?}");
    eprintln!(
        "writer waiting for a CPU in each 10 s [ms, mean µs per wake-up]: {run_queue_by_10s:?}"
    );
    // What the store says: each node's high-water mark must equal what it saw acknowledged.
    let issued = ca.issue_client("loadgen", Role::Viewer)?;
    let mut api = IncidentsClient::new(
        connect(&addr, tls(&ca_pem, &issued.cert_pem, &issued.key_pem)).await?,
    );
    let nodes = api
        .list_nodes(ListNodesRequest {})
        .await?
        .into_inner()
        .nodes;
    let stored: u64 = nodes.iter().map(|n| n.last_seq).sum();
    let mut timed = std::mem::take(&mut *shared.latencies_us.lock().await);
    // Where in the run the tail sits: p99 of the messages generated in each 10 s.
    timed.sort_unstable();
    let by_10s: Vec<f64> = timed
        .chunk_by(|a, b| a.second / 10 == b.second / 10)
        .map(|w| {
            let mut l: Vec<u32> = w.iter().map(|t| t.from_generation_us).collect();
            l.sort_unstable();
            percentile(&l, 0.99)
        })
        .collect();
    eprintln!("p99 (ms) of the messages generated in each 10 s: {by_10s:?}");
    let mut from_send: Vec<u32> = timed.iter().map(|t| t.from_send_us).collect();
    from_send.sort_unstable();
    let mut lat: Vec<u32> = timed.into_iter().map(|t| t.from_generation_us).collect();
    lat.sort_unstable();
    let pct = |p: f64| percentile(&lat, p);
    let offered = args.agents as u64 * args.rate * args.burst.max(1);
    let stored_per_s = acked_in_window as f64 / measured.as_secs_f64();
    // Lost: generated but not in the store; or stored but never acknowledged.
    let lost = generated_total.abs_diff(stored) + stored.abs_diff(acked_total);
    let report = serde_json::json!({
        "agents": args.agents,
        "offered_msgs_per_s": offered,
        "burst_factor": args.burst.max(1),
        "seconds": measured.as_secs_f64(),
        "seconds_until_all_stored": until_stored.as_secs_f64(),
        "stored_msgs_per_s": stored_per_s,
        "ingest_to_stored_ms": {
            "messages": ingest.count,
            "p50": ingest.quantile_ms(0.5),
            "p99": ingest.quantile_ms(0.99),
            "share_within_50ms": ingest.share_within(0.05),
            "p99_by_10s": ingest_by_10s,
        },
        "queue_ms": {
            "p50": queue.quantile_ms(0.5),
            "p99": queue.quantile_ms(0.99),
            "p99_by_10s": queue_by_10s,
        },
        "writer_busy_share": {
            "run": last.busy_since(first),
            "by_10s": busy_by_10s,
        },
        "writer_run_queue_by_10s_ms_and_mean_us": run_queue_by_10s,
        "commit_ms": {
            "batches": commit.count,
            "mean": commit.mean_ms(),
            "p50": commit.quantile_ms(0.5),
            "p99": commit.quantile_ms(0.99),
            "by_10s_count_mean_p99": commit_by_10s,
        },
        "ack_latency_ms": { "p50": pct(0.50), "p99": pct(0.99), "max": pct(1.0), "p99_by_10s": by_10s },
        "ack_latency_from_send_ms": { "p50": percentile(&from_send, 0.5), "p99": percentile(&from_send, 0.99), "max": percentile(&from_send, 1.0) },
        "cpu_seconds_in_run": { "controller": cpu.0, "loadgen": cpu.1 },
        "cpu_steal_percent_in_run": steal,
        "controller_rss_mb": { "idle": baseline_rss / 1024, "peak": peak_rss / 1024 },
        "generated_total": generated_total,
        "acked_total": acked_total,
        "stored_total": stored,
        "lost_or_duplicated": lost,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    if let Some(path) = &args.json {
        let measure = |name: &str, value: f64, unit: &str, goal: &str, met: bool| serde_json::json!({ "name": name, "value": value, "unit": unit, "goal": goal, "met": met });
        let rss_mb = (peak_rss / 1024) as f64;
        // Goals from the issue: >= 20,000 stored msgs/s on 2 cores, p99 <= 50 ms,
        // RSS <= 256 MB, a 10x burst for 60 s with nothing lost.
        let measures = if args.burst > 1 {
            serde_json::json!([
                measure(
                    "controller.burst_lost_or_duplicated",
                    lost as f64,
                    "msg",
                    "== 0",
                    lost == 0
                ),
                measure(
                    "controller.burst_seconds_until_all_stored",
                    until_stored.as_secs_f64(),
                    "s",
                    "record",
                    true
                ),
                measure(
                    "controller.burst_rss_peak",
                    rss_mb,
                    "MB",
                    "<= 256",
                    rss_mb <= 256.0
                ),
            ])
        } else {
            serde_json::json!([
                measure(
                    "controller.stored_msgs_per_s",
                    stored_per_s,
                    "msg/s",
                    ">= 20000",
                    stored_per_s >= 20_000.0
                ),
                // The goal: exactly "99 % stored within 50 ms", read off the
                // controller's 50 ms bucket (the p99 shown is interpolated
                // within its bucket, as Prometheus' histogram_quantile does).
                measure(
                    "controller.ingest_to_stored_p99",
                    ingest.quantile_ms(0.99),
                    "ms",
                    "<= 50",
                    ingest.share_within(0.05) >= 0.99
                ),
                // End to end at the agent: adds the generator, loopback and
                // the ack's way back.
                measure(
                    "controller.ack_latency_p99",
                    pct(0.99),
                    "ms",
                    "record",
                    true
                ),
                measure(
                    "controller.rss_peak",
                    rss_mb,
                    "MB",
                    "<= 256",
                    rss_mb <= 256.0
                ),
                measure(
                    "controller.lost_or_duplicated",
                    lost as f64,
                    "msg",
                    "== 0",
                    lost == 0
                ),
            ])
        };
        std::fs::write(path, serde_json::to_string_pretty(&measures)? + "\n")
            .with_context(|| format!("write {}", path.display()))?;
    }
    // A directory given with --dir stays, for a look at the database.
    if args.dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    if lost != 0 {
        bail!(
            "{generated_total} messages generated, {acked_total} acknowledged, but the store holds {stored}"
        );
    }
    Ok(())
}
