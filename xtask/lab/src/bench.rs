//! The time-to-contain benchmark (`cargo xtask bench`): the demo's lab,
//! repeated runs, percentiles.
//!
//! - Bulk upload: each run a fresh workload cgroup sends at a fixed pace
//!   across the runbook's 100 MB threshold; measured are the time from the
//!   crossing to the incident at the controller (detection), to the last byte
//!   at the receiver (the kernel drops from then on: containment), and the
//!   bytes that got out past the threshold. The agent polls at its default 1 s.
//! - Hard cap: a policy cap, parallel UDP senders (one per CPU) in one
//!   workload; measured is how far past the budget the receiver got, in
//!   packets.
use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use exfilguard_tests::{
    Lab, TestCgroup,
    cgroup::cgroup_root,
    process::python3,
    traffic,
    tunnel::{IodineClient, IodineServer},
};
use serde_json::json;

use crate::{
    demo::{check_interrupt, short_workload},
    scripts,
    stack::{Stack, StackConfig},
    upload::{self, Upload},
};

const THRESHOLD: u64 = 100_000_000;
const RATE: u64 = 40_000_000;
const TOTAL: u64 = 300_000_000;
const RECEIVER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 66);
const CAP_BYTES: u64 = 2_000_000;
const DATAGRAM: usize = 1400;
const TUNNEL_NS: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 53);
const TUNNEL_ZONE: &str = "t.cdn-sync.example";

/// Options of `bench`.
pub struct Options {
    /// Work directory.
    pub out: PathBuf,
    /// Bulk-upload runs (≥ 10 for the percentiles to mean something).
    pub runs: usize,
    /// Where the measures go (JSON array of {name, value, unit, goal, met}).
    pub json: PathBuf,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    // Nearest rank.
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn measure(name: &str, value: f64, unit: &str, goal: Option<f64>) -> serde_json::Value {
    let (goal_s, met) = match goal {
        Some(g) => (format!("<= {g}"), value <= g),
        None => ("-".to_string(), true),
    };
    json!({"name": name, "value": value, "unit": unit, "goal": goal_s, "met": met})
}

/// Runs the benchmark and writes the measures.
pub fn run(opts: &Options) -> anyhow::Result<()> {
    std::fs::create_dir_all(&opts.out)?;
    let out = std::fs::canonicalize(&opts.out)?;
    let lab = Lab::new();
    lab.add_peer_addr(RECEIVER.into());
    lab.add_peer_addr(TUNNEL_NS.into());
    let root = cgroup_root();
    let company =
        TestCgroup::named_under(&root, &format!("exfilguard-bench-{}", std::process::id()));
    let sink = lab.peer().spawn(
        None,
        &[
            python3(),
            "-c",
            scripts::PROGRESS_SINK,
            &RECEIVER.to_string(),
            "443",
            "1.5",
        ],
    );
    sink.wait_for_line("receiver", |l| l == "ready", Duration::from_secs(10));
    let mut measures = Vec::new();

    {
        let stack = Stack::start(&StackConfig {
            out: &out,
            attach: company.path(),
            cgroup_root: &root,
            agent_policy: "action: lockdown\n",
            internal: &["10.0.0.0/8"],
            poll_interval: "1s",
        })?;
        let (mut detect, mut contain, mut after) = (Vec::new(), Vec::new(), Vec::new());
        let mut workloads = Vec::new();
        for i in 0..opts.runs {
            let cg = TestCgroup::named_under(company.path(), &format!("upload-{i}"));
            let b = upload::run(
                &Upload {
                    lab: &lab,
                    cg: &cg,
                    sink: &sink,
                    stack: &stack,
                    to: (RECEIVER, 443).into(),
                    total: TOTAL,
                    rate: RATE,
                    threshold: THRESHOLD,
                },
                false,
            )?;
            anyhow::ensure!(
                b.crossed_ms > 0 && b.detected_ms > 0 && b.last_byte_ms > 0,
                "run {i}: not detected or not contained: {b:?}"
            );
            let d = b.detected_ms.saturating_sub(b.crossed_ms) as f64 / 1000.0;
            let c = b.last_byte_ms.saturating_sub(b.crossed_ms) as f64 / 1000.0;
            let a = b.received.saturating_sub(THRESHOLD) as f64 / 1e6;
            println!(
                "run {i:>2}: detected after {d:.3} s, contained after {c:.3} s, {a:.1} MB past the threshold"
            );
            detect.push(d);
            contain.push(c);
            after.push(a);
            workloads.push(cg);
            check_interrupt()?;
        }
        for v in [&mut detect, &mut contain, &mut after] {
            v.sort_by(f64::total_cmp);
        }
        measures.push(measure(
            "contain.detect_p50",
            percentile(&detect, 50.0),
            "s",
            None,
        ));
        measures.push(measure(
            "contain.detect_p95",
            percentile(&detect, 95.0),
            "s",
            Some(1.0),
        ));
        measures.push(measure(
            "contain.contain_p50",
            percentile(&contain, 50.0),
            "s",
            None,
        ));
        measures.push(measure(
            "contain.contain_p95",
            percentile(&contain, 95.0),
            "s",
            Some(1.2),
        ));
        measures.push(measure(
            "contain.bytes_past_threshold_p95",
            percentile(&after, 95.0),
            "MB",
            None,
        ));
        measures.push(measure("contain.runs", detect.len() as f64, "runs", None));
        measures.extend(dns_tunnel(
            &lab,
            &company,
            &stack,
            opts.runs,
            &mut workloads,
        )?);
        // The stack goes first (the agent detaches), then the cgroups.
        drop(stack);
        drop(workloads);
    }

    check_interrupt()?;
    measures.extend(hard_cap(&lab, &company, &root, &out)?);

    let text = serde_json::to_string_pretty(&measures)? + "\n";
    write(&opts.json, &text)?;
    println!("wrote {}", opts.json.display());
    Ok(())
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// A policy hard cap and one UDP sender per CPU: how far past the budget.
fn hard_cap(
    lab: &Lab,
    company: &TestCgroup,
    root: &Path,
    out: &Path,
) -> anyhow::Result<Vec<serde_json::Value>> {
    let policy = format!(
        "action: alert\nvolume: {{threshold_bytes: 100000000000, per_destination_bytes: 100000000000}}\n\
         hard_cap: {{bytes: {CAP_BYTES}, window: 10m}}\n"
    );
    let stack = Stack::start(&StackConfig {
        out,
        attach: company.path(),
        cgroup_root: root,
        agent_policy: &policy,
        internal: &["10.0.0.0/8"],
        poll_interval: "1s",
    })?;
    let cg = TestCgroup::named_under(company.path(), "capped");
    let sink = lab.peer().spawn(
        None,
        &[
            python3(),
            "-c",
            scripts::UDP_COUNT_SINK,
            &RECEIVER.to_string(),
            "9500",
            "2",
        ],
    );
    sink.wait_for_line("counting sink", |l| l == "ready", Duration::from_secs(10));
    // The policy's cap reaches a cgroup once the agent has seen it send: a
    // first datagram, then the cap, then the flood. (The first datagram
    // counts too: it is sent before the cap and not charged to it.)
    traffic::send_udp(lab.client(), &cg, (RECEIVER, 9500).into(), 1, 10);
    stack.agent.wait_for_line(
        "the policy cap in the kernel",
        |l| l.contains("policy hard cap in the kernel"),
        Duration::from_secs(10),
    );
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per_sender = CAP_BYTES / DATAGRAM as u64 + 500;
    let senders: Vec<_> = (0..cpus)
        .map(|_| {
            lab.client().spawn(
                Some(&cg),
                &[
                    python3(),
                    "-c",
                    scripts::UDP_UNTIL_REFUSED,
                    &RECEIVER.to_string(),
                    "9500",
                    &per_sender.to_string(),
                    &DATAGRAM.to_string(),
                ],
            )
        })
        .collect();
    for s in &senders {
        s.wait_for_line(
            "sender done",
            |l| l.starts_with("sent "),
            Duration::from_secs(30),
        );
    }
    let line = sink.wait_for_line(
        "count",
        |l| l.starts_with("count "),
        Duration::from_secs(30),
    );
    // Less the registering datagram.
    let units: u64 = line["count ".len()..]
        .trim()
        .parse::<u64>()
        .context("count")?
        - 1;
    // IP bytes per datagram: 20 (IPv4) + 8 (UDP) + payload.
    let per_packet = DATAGRAM as u64 + 28;
    let over_packets = (units * per_packet).saturating_sub(CAP_BYTES) as f64 / per_packet as f64;
    println!(
        "hard cap {CAP_BYTES} B, {cpus} parallel senders: {} datagrams arrived, {over_packets:.2} packets past the budget",
        units
    );
    drop(senders);
    drop(stack);
    Ok(vec![
        measure(
            "contain.cap_overshoot_packets",
            over_packets,
            "packets",
            Some(cpus as f64),
        ),
        measure(
            "contain.cap_bytes_through",
            units as f64 * per_packet as f64,
            "B",
            None,
        ),
    ])
}

/// Real iodine tunnels, one fresh workload per run: seconds from starting
/// the client to the incident, and DNS queries the detector had seen.
fn dns_tunnel(
    lab: &Lab,
    company: &TestCgroup,
    stack: &Stack,
    runs: usize,
    keep: &mut Vec<TestCgroup>,
) -> anyhow::Result<Vec<serde_json::Value>> {
    let (mut secs, mut queries) = (Vec::new(), Vec::new());
    for i in 0..runs {
        let cg = TestCgroup::named_under(company.path(), &format!("tunnel-{i}"));
        let server = IodineServer::start(lab.peer(), TUNNEL_NS.into(), TUNNEL_ZONE);
        let started = exfilguard_controller::time::now_ms();
        let client = IodineClient::try_connect(
            lab.client(),
            &cg,
            TUNNEL_NS.into(),
            TUNNEL_ZONE,
            Duration::from_secs(30),
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let incident = loop {
            if let Some(i) = stack
                .incidents()?
                .into_iter()
                .find(|i| short_workload(i) == cg.name())
            {
                break i;
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "tunnel run {i}: no incident within 30 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        let s = incident.opened_at_unix_ms.saturating_sub(started) as f64 / 1000.0;
        let q = incident
            .evidence
            .first()
            .and_then(|e| serde_json::from_str::<serde_json::Value>(&e.json).ok())
            .and_then(|v| v["evidence"]["measurements"]["queries"].as_f64())
            .unwrap_or(f64::NAN);
        println!(
            "tunnel {i:>2}: detected after {s:.1} s, {q} queries seen ({})",
            if client.is_ok() {
                "tunnel was up"
            } else {
                "during the handshake"
            }
        );
        secs.push(s);
        queries.push(q);
        drop(client);
        drop(server);
        keep.push(cg);
        check_interrupt()?;
    }
    secs.sort_by(f64::total_cmp);
    queries.sort_by(f64::total_cmp);
    Ok(vec![
        measure(
            "contain.dns_tunnel_detect_p50",
            percentile(&secs, 50.0),
            "s",
            None,
        ),
        measure(
            "contain.dns_tunnel_detect_p95",
            percentile(&secs, 95.0),
            "s",
            Some(10.0),
        ),
        measure(
            "contain.dns_tunnel_queries_p50",
            percentile(&queries, 50.0),
            "queries",
            None,
        ),
    ])
}
