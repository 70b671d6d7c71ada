//! The agent's Prometheus metrics and the small HTTP server that exposes
//! them with `/healthz` and `/readyz`. The one place the registry is built.
use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use axum::{
    Router, extract::State, http::StatusCode, http::header, response::IntoResponse, routing::get,
};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::{
    datapath::{KernelStats, ProgramRunStats},
    detect::Rule,
};

/// Labels of egress bytes.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EgressLabels {
    /// Workload identity.
    pub workload: String,
    /// `external`, `internal` or `allowlisted`.
    pub class: &'static str,
}

/// A workload label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkloadLabel {
    /// Workload identity.
    pub workload: String,
}

/// A rule label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuleLabel {
    /// Rule name.
    pub rule: &'static str,
}

/// A kernel program label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProgramLabel {
    /// Program name.
    pub program: &'static str,
}

/// Every metric the agent exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Egress bytes by workload and destination class.
    pub egress_bytes: Family<EgressLabels, Counter>,
    /// DNS queries by workload.
    pub dns_queries: Family<WorkloadLabel, Counter>,
    /// DNS payloads that did not parse.
    pub dns_parse_errors: Counter,
    /// Detections (episode starts) by rule.
    pub detections: Family<RuleLabel, Counter>,
    /// Events lost because the ring buffer was full.
    pub ring_drops: Counter,
    /// Flows evicted from the kernel's LRU flow map.
    pub flow_evictions: Gauge,
    /// Flow inserts the kernel refused.
    pub flow_insert_errors: Counter,
    /// Packets dropped by blocks.
    pub blocked_packets: Counter,
    /// Packets dropped by hard caps.
    pub cap_dropped_packets: Counter,
    /// Kernel program run time.
    pub program_run_seconds: Family<ProgramLabel, Counter<f64, AtomicU64>>,
    /// Kernel program runs.
    pub program_runs: Family<ProgramLabel, Counter>,
    /// Policy reloads that were rejected.
    pub policy_reload_errors: Counter,
    last_kernel: Mutex<(KernelStats, Vec<ProgramRunStats>)>,
    ready: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn delta(new: u64, old: u64) -> u64 {
    // A counter that went down was re-created (agent restarted without
    // pins): count it from zero.
    if new >= old { new - old } else { new }
}

impl Metrics {
    /// Builds the registry under the `exfilguard` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("exfilguard");
        let m = Self {
            registry: Registry::default(),
            egress_bytes: Family::default(),
            dns_queries: Family::default(),
            dns_parse_errors: Counter::default(),
            detections: Family::default(),
            ring_drops: Counter::default(),
            flow_evictions: Gauge::default(),
            flow_insert_errors: Counter::default(),
            blocked_packets: Counter::default(),
            cap_dropped_packets: Counter::default(),
            program_run_seconds: Family::default(),
            program_runs: Family::default(),
            policy_reload_errors: Counter::default(),
            last_kernel: Mutex::new((KernelStats::default(), Vec::new())),
            ready: AtomicBool::new(false),
        };
        registry.register(
            "egress_bytes",
            "Egress bytes by workload and destination class",
            m.egress_bytes.clone(),
        );
        registry.register(
            "dns_queries",
            "DNS queries by workload",
            m.dns_queries.clone(),
        );
        registry.register(
            "dns_parse_errors",
            "DNS payloads that did not parse",
            m.dns_parse_errors.clone(),
        );
        registry.register(
            "detections",
            "Detection episodes started, by rule",
            m.detections.clone(),
        );
        for r in Rule::ALL {
            // Present at zero so alerts on increase() work from the start.
            let _ = m.detections.get_or_create(&RuleLabel { rule: r.as_str() });
        }
        registry.register(
            "ring_drops",
            "Kernel events lost because the ring buffer was full",
            m.ring_drops.clone(),
        );
        registry.register(
            "flow_evictions",
            "Flows evicted from the kernel flow map (inserted minus present)",
            m.flow_evictions.clone(),
        );
        registry.register(
            "flow_insert_errors",
            "Flow inserts the kernel refused",
            m.flow_insert_errors.clone(),
        );
        registry.register(
            "blocked_packets",
            "Egress packets dropped by blocks",
            m.blocked_packets.clone(),
        );
        registry.register(
            "cap_dropped_packets",
            "Egress packets dropped by hard caps",
            m.cap_dropped_packets.clone(),
        );
        registry.register(
            "program_run_seconds",
            "Kernel program run time",
            m.program_run_seconds.clone(),
        );
        registry.register(
            "program_runs",
            "Kernel program runs",
            m.program_runs.clone(),
        );
        registry.register(
            "policy_reload_errors",
            "Policy reloads rejected (the previous policy stayed)",
            m.policy_reload_errors.clone(),
        );
        Self { registry, ..m }
    }

    /// Takes in the kernel's cumulative counters.
    pub fn kernel(&self, stats: &KernelStats, flows_present: u64, programs: &[ProgramRunStats]) {
        let mut last = self.last_kernel.lock().unwrap_or_else(|p| p.into_inner());
        let (old, old_progs) = &*last;
        self.ring_drops
            .inc_by(delta(stats.ring_drops, old.ring_drops));
        self.flow_insert_errors
            .inc_by(delta(stats.flow_insert_errors, old.flow_insert_errors));
        self.blocked_packets
            .inc_by(delta(stats.blocked_packets, old.blocked_packets));
        self.cap_dropped_packets
            .inc_by(delta(stats.cap_dropped_packets, old.cap_dropped_packets));
        self.flow_evictions
            .set(stats.flows_inserted.saturating_sub(flows_present) as i64);
        for p in programs {
            let prev = old_progs.iter().find(|o| o.name == p.name);
            let (t0, n0) = prev.map_or((0, 0), |o| (o.run_time.as_nanos() as u64, o.run_count));
            let l = ProgramLabel { program: p.name };
            self.program_run_seconds
                .get_or_create(&l)
                .inc_by(delta(p.run_time.as_nanos() as u64, t0) as f64 / 1e9);
            self.program_runs
                .get_or_create(&l)
                .inc_by(delta(p.run_count, n0));
        }
        *last = (*stats, programs.to_vec());
    }

    /// Marks the agent ready (programs attached, first poll done).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut s = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut s, &self.registry);
        s
    }

    /// The same in the Prometheus text format 0.0.4, for scrapers (and
    /// `promtool check metrics`) that do not speak OpenMetrics: counter
    /// families are named with their `_total` suffix and there is no `# EOF`.
    pub fn encode_prometheus_text(&self) -> String {
        openmetrics_to_text(&self.encode())
    }
}

/// Rewrites an OpenMetrics exposition as Prometheus text 0.0.4.
pub fn openmetrics_to_text(om: &str) -> String {
    let counters: std::collections::HashSet<&str> = om
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(om.len());
    for line in om.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let rewritten = ["# HELP ", "# TYPE "].iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{p}{name}_total {tail}"))
        });
        out.push_str(rewritten.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

async fn metrics(
    State(m): State<Arc<Metrics>>,
    headers: axum::http::HeaderMap,
) -> impl IntoResponse {
    let wants_om = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/openmetrics-text"));
    if wants_om {
        (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            m.encode(),
        )
    } else {
        (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            m.encode_prometheus_text(),
        )
    }
}

async fn readyz(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    if m.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

/// The routes: `/metrics`, `/healthz`, `/readyz`.
pub fn router(m: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(m)
}

/// Binds `addr` and serves until `shutdown` resolves. Returns the bound
/// address (useful with port 0) and the server task.
pub async fn serve(
    addr: SocketAddr,
    m: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<std::io::Result<()>>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let task = tokio::spawn(async move {
        axum::serve(listener, router(m))
            .with_graceful_shutdown(shutdown)
            .await
    });
    Ok((bound, task))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn sample() -> Metrics {
        let m = Metrics::new();
        m.egress_bytes
            .get_or_create(&EgressLabels {
                workload: "pod/0f5e8a8c-3b1c-4c3e-9b7a-2d4e6f8a0b1c".into(),
                class: "external",
            })
            .inc_by(1234);
        m.dns_queries
            .get_or_create(&WorkloadLabel {
                workload: "/system.slice/x \"quoted\"".into(),
            })
            .inc();
        m.detections
            .get_or_create(&RuleLabel {
                rule: Rule::DnsExfiltration.as_str(),
            })
            .inc();
        let stats = KernelStats {
            ring_drops: 5,
            flows_inserted: 100,
            blocked_packets: 3,
            ..Default::default()
        };
        let progs = [ProgramRunStats {
            name: "exfilguard_egress",
            run_time: Duration::from_millis(1500),
            run_count: 10,
        }];
        m.kernel(&stats, 90, &progs);
        // A second poll adds only the difference.
        let stats2 = KernelStats {
            ring_drops: 7,
            ..stats
        };
        m.kernel(&stats2, 90, &progs);
        m
    }

    #[test]
    fn exposition_has_every_family() {
        let text = sample().encode();
        for want in [
            "exfilguard_egress_bytes_total{workload=\"pod/0f5e8a8c-3b1c-4c3e-9b7a-2d4e6f8a0b1c\",class=\"external\"} 1234",
            "exfilguard_detections_total{rule=\"dns_exfiltration\"} 1",
            "exfilguard_detections_total{rule=\"large_data_transfer\"} 0",
            "exfilguard_ring_drops_total 7",
            "exfilguard_flow_evictions 10",
            "exfilguard_blocked_packets_total 3",
            "exfilguard_program_run_seconds_total{program=\"exfilguard_egress\"} 1.5",
            "exfilguard_program_runs_total{program=\"exfilguard_egress\"} 10",
            "# EOF",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
    }

    /// `promtool check metrics` accepts the exposition (skipped, loudly,
    /// where promtool is not installed; setup installs it).
    #[test]
    fn promtool_accepts_it() {
        let Ok(promtool) = which_promtool() else {
            eprintln!("SKIP: promtool not installed (Debian package `prometheus`)");
            return;
        };
        let text = sample().encode_prometheus_text();
        let mut child = std::process::Command::new(promtool)
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn promtool");
        use std::io::Write as _;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(text.as_bytes())
            .expect("write");
        let out = child.wait_with_output().expect("promtool");
        assert!(
            out.status.success(),
            "promtool: {}{}\n{text}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn which_promtool() -> Result<std::path::PathBuf, ()> {
        ["/usr/bin/promtool", "/usr/local/bin/promtool"]
            .iter()
            .map(std::path::PathBuf::from)
            .find(|p| p.exists())
            .ok_or(())
    }

    #[tokio::test]
    async fn http_endpoints() {
        let m = Arc::new(sample());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (addr, task) = serve("127.0.0.1:0".parse().unwrap(), m.clone(), async {
            let _ = rx.await;
        })
        .await
        .unwrap();
        let get = |path: &'static str| async move {
            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(
                format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
            let mut buf = String::new();
            s.read_to_string(&mut buf).await.unwrap();
            buf
        };
        assert!(get("/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(get("/readyz").await.starts_with("HTTP/1.1 503"));
        m.set_ready(true);
        assert!(get("/readyz").await.starts_with("HTTP/1.1 200"));
        let body = get("/metrics").await;
        assert!(body.starts_with("HTTP/1.1 200"));
        assert!(body.contains("exfilguard_ring_drops_total 7"));
        assert!(body.contains("# TYPE exfilguard_ring_drops_total counter"));
        assert!(!body.contains("# EOF"));
        let _ = tx.send(());
        task.await.unwrap().unwrap();
    }
}
