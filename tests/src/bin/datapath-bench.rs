//! `datapath-bench`: what the node data plane costs.
//!
//! 1. Per-packet cost of the egress program with BPF_PROG_TEST_RUN, next to
//!    an empty `cgroup_skb` program run the same way (the baseline): the hit
//!    path (an existing flow) and LRU churn (a new flow every packet, map full).
//! 2. The kernel's own run-time stats (`bpf_stats`) under real traffic.
//! 3. TCP throughput across a veth pair with the programs attached vs not
//!    (iperf3, median of 7 runs each, interleaved).
//!
//! Needs root. Writes its measures as JSON (`--json PATH`) for `cargo xtask bench`.
use std::{
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use exfilguard_agent::datapath::{Datapath, DatapathConfig, TestProgram};
use exfilguard_common::MAX_FLOWS;
use exfilguard_tests::{Lab, TestCgroup, kernel_test_guard, traffic, traffic::Family};
use serde::Serialize;

/// One measured figure, with its goal.
#[derive(Debug, Serialize)]
struct Measure {
    name: String,
    value: f64,
    unit: String,
    goal: String,
    met: bool,
}

fn measure(name: &str, value: f64, unit: &str, goal: &str, met: bool) -> Measure {
    let m = Measure {
        name: name.into(),
        value,
        unit: unit.into(),
        goal: goal.into(),
        met,
    };
    println!(
        "{:<48} {:>12.1} {:<6} goal {:<10} {}",
        m.name,
        m.value,
        m.unit,
        m.goal,
        if m.met { "met" } else { "NOT MET" }
    );
    m
}

/// An Ethernet + IPv4 + TCP frame with `payload` bytes to `dst`:443. It is
/// only ever handed to BPF_PROG_TEST_RUN, never sent.
fn tcp_frame(dst: [u8; 4], payload: usize) -> Vec<u8> {
    let total = 20 + 20 + payload;
    let mut f = vec![0u8; 14];
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&[10, 0, 0, 1]);
    ip[16..20].copy_from_slice(&dst);
    f.extend_from_slice(&ip);
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&443u16.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x18; // PSH, ACK
    f.extend_from_slice(&tcp);
    f.resize(14 + total, 0xab);
    f
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Mean ns per run of `program` over `frames`, one BPF_PROG_TEST_RUN each.
fn mean_single_runs(
    dp: &mut Datapath,
    program: TestProgram,
    frames: &[Vec<u8>],
) -> anyhow::Result<f64> {
    let mut total = Duration::ZERO;
    for f in frames {
        total += dp.test_run(program, f, 1)?.duration;
    }
    Ok(total.as_nanos() as f64 / frames.len() as f64)
}

fn per_packet(out: &mut Vec<Measure>, quick: bool) -> anyhow::Result<()> {
    let cg = TestCgroup::new();
    let mut dp = Datapath::load(&DatapathConfig {
        cgroup_path: cg.path().to_owned(),
        pin_dir: None,
    })?;
    // TEST-NET-1 (RFC 5737): a destination that is never routed; these frames
    // are only run through the program in the kernel, never sent.
    let frame = tcp_frame([192, 0, 2, 10], 100);
    let repeat = if quick { 100_000 } else { 1_000_000 };
    let trials = if quick { 3 } else { 7 };
    dp.test_run(TestProgram::Egress, &frame, 1000)?; // create the flow
    let (mut base, mut hit) = (Vec::new(), Vec::new());
    for _ in 0..trials {
        base.push(
            dp.test_run(TestProgram::Baseline, &frame, repeat)?
                .duration
                .as_nanos() as f64,
        );
        hit.push(
            dp.test_run(TestProgram::Egress, &frame, repeat)?
                .duration
                .as_nanos() as f64,
        );
    }
    let (base, hit) = (median(base), median(hit));
    println!("baseline (empty program): {base:.1} ns/run; egress hit path: {hit:.1} ns/run");
    out.push(measure(
        "egress program, hit path, ns above empty program",
        hit - base,
        "ns",
        "<= 60",
        hit - base <= 60.0,
    ));

    // LRU churn: fill the map past capacity, then every packet a new flow.
    let distinct = |start: u32, n: u32| -> Vec<Vec<u8>> {
        (start..start + n)
            .map(|i| {
                // 100.64.0.0/10 (shared address space), varied per flow; never sent.
                let a = 0x6440_0000u32 | (i & 0x003f_ffff);
                tcp_frame(a.to_be_bytes(), 100)
            })
            .collect()
    };
    let prefill = distinct(0, MAX_FLOWS + 8_192);
    mean_single_runs(&mut dp, TestProgram::Egress, &prefill)?;
    let n = if quick { 20_000 } else { 100_000 };
    let fresh = distinct(MAX_FLOWS + 8_192, n);
    let churn = mean_single_runs(&mut dp, TestProgram::Egress, &fresh)?;
    let churn_base = mean_single_runs(&mut dp, TestProgram::Baseline, &fresh)?;
    let stats = dp.stats()?;
    let live = dp.flow_count()?;
    println!(
        "churn: {churn:.1} ns/run vs baseline {churn_base:.1}; flows inserted {}, live {live}, evicted {}",
        stats.flows_inserted,
        stats.flows_inserted.saturating_sub(live)
    );
    if stats.flows_inserted <= live {
        bail!("the flow map never filled: no eviction was measured");
    }
    out.push(measure(
        "egress program, new flow every packet (LRU full), ns above empty program",
        churn - churn_base,
        "ns",
        "<= 500",
        churn - churn_base <= 500.0,
    ));
    Ok(())
}

fn live_stats(out: &mut Vec<Measure>, quick: bool) -> anyhow::Result<()> {
    let lab = Lab::new();
    let cg = TestCgroup::new();
    let dp = Datapath::load(&DatapathConfig {
        cgroup_path: cg.path().to_owned(),
        pin_dir: None,
    })?;
    let _stats_on = Datapath::enable_run_time_stats()?;
    let dst = SocketAddr::new(lab.peer_addr(Family::V4), 5201);
    let _sink = traffic::TcpSink::start(lab.peer(), dst);
    let bytes = if quick { 20_000_000 } else { 200_000_000 };
    traffic::send_tcp(lab.client(), &cg, dst, bytes);
    let egress = dp
        .program_stats()?
        .into_iter()
        .find(|p| p.name == exfilguard_common::program_names::EGRESS)
        .context("egress program stats")?;
    if egress.run_count == 0 {
        bail!("bpf_stats counted no runs of the egress program");
    }
    let ns = egress.run_time.as_nanos() as f64 / egress.run_count as f64;
    println!(
        "bpf_stats under a {bytes} B TCP upload: run_time {:?} over {} runs",
        egress.run_time, egress.run_count
    );
    out.push(measure(
        "egress program under live TCP traffic (bpf_stats), ns/run",
        ns,
        "ns",
        "record",
        true,
    ));
    Ok(())
}

fn iperf3(lab: &Lab, cg: &TestCgroup, secs: u32) -> anyhow::Result<f64> {
    let server = lab.peer_addr(Family::V4).to_string();
    let _srv = lab
        .peer()
        .spawn(None, &["iperf3", "-s", "-1", "-B", &server, "-p", "5301"]);
    // iperf3 needs a moment to listen; retry the client briefly.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let t = secs.to_string();
        let out = lab.client().output(
            Some(cg),
            &["iperf3", "-c", &server, "-p", "5301", "-t", &t, "-J"],
            Duration::from_secs(u64::from(secs) + 30),
        );
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if let Some(bps) = json["end"]["sum_received"]["bits_per_second"].as_f64() {
            return Ok(bps);
        }
        if Instant::now() > deadline {
            bail!(
                "iperf3 failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn throughput(out: &mut Vec<Measure>, quick: bool) -> anyhow::Result<()> {
    let lab = Lab::new();
    let cg = TestCgroup::new();
    // Interleaved so drift in the VM's speed hits both sides alike; single
    // runs here vary by ±6 %, so only the median of several means anything.
    let (runs, secs) = if quick { (3, 2) } else { (7, 4) };
    let (mut off, mut on) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        off.push(iperf3(&lab, &cg, secs)?);
        let dp = Datapath::load(&DatapathConfig {
            cgroup_path: cg.path().to_owned(),
            pin_dir: None,
        })?;
        on.push(iperf3(&lab, &cg, secs)?);
        drop(dp);
    }
    println!("iperf3 runs (bit/s), detached: {off:?}; attached: {on:?}");
    let (off, on) = (median(off), median(on));
    println!(
        "iperf3 across veth: detached {:.2} Gbit/s, attached {:.2} Gbit/s (median of {runs})",
        off / 1e9,
        on / 1e9
    );
    let pct = on / off * 100.0;
    out.push(measure(
        "TCP throughput with programs attached, % of detached",
        pct,
        "%",
        ">= 98",
        pct >= 98.0,
    ));
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let mut json: Option<PathBuf> = None;
    let mut quick = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--json" => json = Some(args.next().context("--json needs a path")?.into()),
            "--quick" => quick = true,
            other => bail!("unknown argument {other:?} (use --json PATH, --quick)"),
        }
    }
    if !kernel_test_guard(&["ip", "python3", "iperf3"]) {
        bail!("the data-plane benchmark needs root, iperf3 and python3");
    }
    let mut out = Vec::new();
    per_packet(&mut out, quick).context("per-packet cost")?;
    live_stats(&mut out, quick).context("live bpf_stats")?;
    throughput(&mut out, quick).context("throughput")?;
    if let Some(path) = json {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&path, serde_json::to_vec_pretty(&out)?)
            .with_context(|| format!("write {}", path.display()))?;
    }
    Ok(())
}
