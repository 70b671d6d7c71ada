//! `exfilguard-agent analyze --pcap` over generated corpora: every
//! exfiltration set is flagged (right rule, workload, domain, in time), the
//! benign set of 100,000 queries over more than 10,000 registered domains
//! produces nothing.
mod corpus;

use std::{
    collections::HashSet,
    net::IpAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use corpus::*;
use hickory_proto::rr::RecordType;
use pcap_file::DataLink;
use serde_json::Value;

const T0: u64 = 1_700_000_000_000_000_000;

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("exfilguard-analyze-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    dir.join(name)
}

struct Run {
    ok: bool,
    report: Value,
    stderr: String,
}

fn analyze(file: &Path, extra: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_exfilguard-agent"))
        .args(["analyze", "--output", "json", "--pcap"])
        .arg(file)
        .args(extra)
        .output()
        .expect("run exfilguard-agent");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("analyze output is not JSON ({e}): {stdout}"));
    Run {
        ok: out.status.success(),
        report,
        stderr: String::from_utf8_lossy(&out.stderr).into(),
    }
}

fn starts(r: &Value) -> Vec<&Value> {
    r["detections"]
        .as_array()
        .expect("detections")
        .iter()
        .filter(|d| d["phase"] == "start")
        .collect()
}

fn background(seed: u64, queries: usize, duration: Duration) -> Vec<Msg> {
    benign(seed, 20, queries, duration)
}

#[test]
fn benign_corpus_is_quiet() {
    let msgs = benign(1, 60, 100_000, Duration::from_secs(2 * 3600));
    let queries: Vec<&Msg> = msgs.iter().filter(|m| !m.answer).collect();
    assert_eq!(queries.len(), 100_000);
    let mut domains = HashSet::new();
    for m in &queries {
        let parsed =
            exfilguard_agent::detect::dns::parse_payload(&m.payload, false).expect("parse");
        let name = &parsed.questions[0].0;
        if let Some(d) = psl::domain_str(name) {
            domains.insert(d.to_owned());
        }
    }
    assert!(
        domains.len() >= 10_000,
        "only {} registered domains",
        domains.len()
    );
    let f = tmp("benign.pcap");
    std::fs::write(&f, write_pcap(&msgs, DataLink::RAW)).expect("write");
    let r = analyze(&f, &[]);
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(r.report["stats"]["dns_messages"], 200_000);
    assert_eq!(r.report["stats"]["dns_errors"], 0);
    let ds = r.report["detections"].as_array().expect("detections");
    assert!(
        ds.is_empty(),
        "{} false positives, first: {:#}",
        ds.len(),
        ds[0]
    );
    if std::env::var_os("EXFILGUARD_KEEP").is_none() {
        std::fs::remove_file(&f).ok();
    }
}

fn leaker() -> IpAddr {
    "10.244.9.99".parse().expect("addr")
}

fn server() -> IpAddr {
    "10.96.0.10".parse().expect("addr")
}

/// 10 B/s for ten minutes: 30 bytes every 3 s.
fn low_and_slow() -> Vec<Msg> {
    leak(
        7,
        leaker(),
        server(),
        &["telemetry-sync.com"],
        6000,
        30,
        Duration::from_secs(3),
        RecordType::A,
        false,
        Duration::from_nanos(T0 + 600 * 1_000_000_000),
    )
}

/// 10 B/s spread over four sibling domains, IPv6, DNS over TCP.
fn siblings() -> Vec<Msg> {
    leak(
        8,
        "fd00::99".parse().expect("addr"),
        "fd00::53".parse().expect("addr"),
        &[
            "sync-node1.net",
            "sync-node2.net",
            "sync-node3.org",
            "syncnode4.io",
        ],
        6000,
        30,
        Duration::from_secs(3),
        RecordType::TXT,
        true,
        Duration::from_nanos(T0 + 600 * 1_000_000_000),
    )
}

fn check_flagged(r: &Run, rule: &str, workload: &str, subject: Option<&str>, by_secs: u64) {
    assert!(r.ok, "{}", r.stderr);
    let s = starts(&r.report);
    let hit = s
        .iter()
        .find(|d| d["rule"] == rule && d["workload"] == workload)
        .unwrap_or_else(|| panic!("no {rule} for {workload}: {:#}", r.report["detections"]));
    if let Some(sub) = subject {
        assert_eq!(hit["subject"], sub);
    }
    let at = hit["evidence"]["window_end_ns"].as_u64().expect("end");
    let leak_start = T0 + 600 * 1_000_000_000;
    assert!(
        at - leak_start <= by_secs * 1_000_000_000,
        "caught after {}s",
        (at - leak_start) / 1_000_000_000
    );
    assert!(hit["evidence"]["encoded_bytes"].as_u64().expect("enc") > 1000);
    assert!(
        !hit["evidence"]["dns"]["sample_queries"]
            .as_array()
            .expect("samples")
            .is_empty()
    );
    // Nothing else is flagged: the benign background stays quiet.
    for d in s {
        assert_eq!(d["workload"], workload, "false positive: {d:#}");
    }
}

#[test]
fn low_and_slow_leak_is_caught_within_ten_minutes() {
    let bg = background(2, 8000, Duration::from_secs(1800));
    let f = tmp("low-and-slow.pcap");
    std::fs::write(&f, write_pcap(&merge(bg, low_and_slow()), DataLink::RAW)).expect("write");
    let r = analyze(&f, &[]);
    check_flagged(
        &r,
        "dns_exfiltration",
        "10.244.9.99",
        Some("telemetry-sync.com"),
        600,
    );
}

#[test]
fn sibling_domains_over_tcp_and_ipv6_are_caught() {
    let bg = background(3, 8000, Duration::from_secs(1800));
    let f = tmp("siblings.pcapng");
    std::fs::write(&f, write_pcapng(&merge(bg, siblings()))).expect("write");
    let r = analyze(&f, &[]);
    check_flagged(&r, "dns_exfiltration_spread", "fd00::99", None, 600);
    let hit = starts(&r.report)[0].clone();
    assert_eq!(
        hit["evidence"]["dns"]["domains"]
            .as_array()
            .expect("domains")
            .len(),
        4
    );
}

#[test]
fn fast_tunnel_is_caught() {
    let bg = background(4, 8000, Duration::from_secs(1800));
    // 40 queries a second of NULL records with 120 bytes each, two minutes.
    let tunnel = leak(
        9,
        leaker(),
        server(),
        &["t.c2-relay.net"],
        120 * 40 * 120,
        120,
        Duration::from_millis(25),
        RecordType::NULL,
        false,
        Duration::from_nanos(T0 + 600 * 1_000_000_000),
    );
    let f = tmp("tunnel.pcap");
    std::fs::write(&f, write_pcap(&merge(bg, tunnel), DataLink::ETHERNET)).expect("write");
    let r = analyze(&f, &[]);
    check_flagged(&r, "dns_tunnel", "10.244.9.99", Some("c2-relay.net"), 60);
    check_flagged(
        &r,
        "dns_exfiltration",
        "10.244.9.99",
        Some("c2-relay.net"),
        60,
    );
}

#[test]
fn truncated_capture_names_offset_and_keeps_detections() {
    let bytes = write_pcap(&low_and_slow(), DataLink::RAW);
    // Cut two bytes into the last record's header: everything before it is
    // read (and the leak was caught well before).
    let f = tmp("cut.pcap");
    std::fs::write(&f, &bytes[..bytes.len() - 100]).expect("write");
    let r = analyze(&f, &[]);
    assert!(!r.ok, "a truncated capture must fail");
    assert!(r.stderr.contains("offset "), "{}", r.stderr);
    let err = r.report["error"].as_str().expect("error in report");
    assert!(err.contains("truncated at offset"), "{err}");
    assert!(
        starts(&r.report)
            .iter()
            .any(|d| d["rule"] == "dns_exfiltration")
    );
    // Not a capture at all: a clear error, no panic.
    let g = tmp("garbage.pcap");
    std::fs::write(&g, b"definitely not a capture").expect("write");
    let r = analyze(&g, &[]);
    assert!(!r.ok);
    assert!(
        r.report["error"]
            .as_str()
            .expect("error")
            .contains("not a pcap")
    );
}

#[test]
fn policy_file_changes_thresholds_and_allowlist() {
    let f = tmp("policy-low.pcap");
    std::fs::write(&f, write_pcap(&low_and_slow(), DataLink::RAW)).expect("write");
    let p = tmp("allow.yaml");
    std::fs::write(&p, "allowlist: {domains: [telemetry-sync.com]}\n").expect("write");
    let r = analyze(&f, &["--policy", p.to_str().expect("utf8")]);
    assert!(r.ok, "{}", r.stderr);
    assert!(starts(&r.report).is_empty(), "allowlisted domain flagged");
    std::fs::write(&p, "dns: {encoded_bytes: 0}\n").expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_exfilguard-agent"))
        .args(["analyze", "--pcap"])
        .arg(&f)
        .arg("--policy")
        .arg(&p)
        .output()
        .expect("run");
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("dns.encoded_bytes"), "{e}");
}

/// The small fixtures in agent/testdata are exactly what the generator
/// makes (`EXFILGUARD_WRITE_TESTDATA=1` rewrites them).
#[test]
fn committed_fixtures_match_the_generator() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata");
    for (name, bytes) in [
        (
            "low-and-slow.pcap",
            write_pcap(&low_and_slow(), DataLink::RAW),
        ),
        ("siblings-tcp-ipv6.pcapng", write_pcapng(&siblings())),
    ] {
        let path = dir.join(name);
        if std::env::var_os("EXFILGUARD_WRITE_TESTDATA").is_some() {
            std::fs::create_dir_all(&dir).expect("testdata dir");
            std::fs::write(&path, &bytes).expect("write fixture");
        }
        let committed = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            committed == bytes,
            "{name} differs from the generator's output"
        );
        let r = analyze(&path, &[]);
        assert!(r.ok && !starts(&r.report).is_empty(), "{name} not flagged");
    }
}

/// Found by the pcap_reader fuzz target: a pcapng whose interface has a
/// huge timestamp resolution, so packet times sit at the end of u64
/// nanoseconds. Replaying it must not overflow the per-second evaluation.
#[test]
fn timestamps_at_the_end_of_time_do_not_panic() {
    let bytes = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/timestamp-at-u64-end.pcapng"),
    )
    .expect("fixture");
    let report = exfilguard_agent::analyze::analyze_bytes(
        &bytes,
        exfilguard_agent::policy::Policy::default(),
        Vec::new(),
    );
    assert!(report.stats.packets >= 1, "{:?}", report.stats);
}
