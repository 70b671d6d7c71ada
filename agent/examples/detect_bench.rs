//! Detector benchmark: DNS events scored per second on one core, and the
//! resident memory of the detectors holding 10,000 workloads with flows and
//! DNS state. Run with `cargo run --release -p exfilguard-agent --example
//! detect_bench`; prints one JSON line. Inputs are realistic DNS payloads
//! (word-built names under many registered domains, some hash-like CDN
//! names), built before the clock starts.
use std::{net::IpAddr, time::Instant};

use exfilguard_agent::{
    detect::{NS, dns::DnsDetector, dns::build_message, volume::VolumeDetector},
    policy::{Policy, WorkloadMeta},
};
use hickory_proto::rr::RecordType;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

const WORDS: &[&str] = &[
    "acme", "atlas", "beacon", "cedar", "cloud", "data", "delta", "echo", "forge", "global",
    "harbor", "insight", "lunar", "matrix", "metro", "nova", "orbit", "pixel", "prime", "quest",
    "river", "signal", "solar", "summit", "terra", "vector", "vista", "wave", "zen", "zone",
];
const HOSTS: &[&str] = &[
    "www", "api", "cdn", "static", "img", "mail", "auth", "login",
];
const TLDS: &[&str] = &["com", "net", "org", "io", "co.uk", "de"];

fn main() {
    let policy = Policy::default();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    // 200,000 distinct-enough payloads from 1,000 workloads.
    let n = 200_000usize;
    let payloads: Vec<(String, Vec<u8>)> = (0..n)
        .map(|i| {
            let r = rng.next();
            let w = format!("pod/{:04}", r % 1000);
            let a = WORDS[(r >> 10) as usize % WORDS.len()];
            let b = WORDS[(r >> 20) as usize % WORDS.len()];
            let tld = TLDS[(r >> 30) as usize % TLDS.len()];
            let name = if r.is_multiple_of(10) {
                format!("d{:013x}.cloudfront.net", r >> 12)
            } else {
                format!("{}.{a}{b}.{tld}", HOSTS[(r >> 40) as usize % HOSTS.len()])
            };
            let wire = build_message(i as u16, &name, RecordType::A, None).expect("build");
            (w, wire)
        })
        .collect();
    let mut dns = DnsDetector::new();
    let start = Instant::now();
    let mut detections = 0;
    // 20,000 events per simulated second, evaluated once a second like the
    // agent's poll.
    for (i, (w, p)) in payloads.iter().enumerate() {
        let t = (i as u64 / 20_000 + 1) * NS;
        let _ = dns.observe_payload(&policy, w, p, false, None, t);
        if i % 20_000 == 19_999 {
            detections += dns.evaluate(&policy, t).len();
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let events_per_sec = n as f64 / secs;

    // Memory: 10,000 workloads, 20 external destinations each, plus the DNS
    // state above.
    let before = rss_kib();
    let mut volume = VolumeDetector::new();
    let meta = WorkloadMeta::default();
    for w in 0..10_000u32 {
        let id = format!("pod/{w:08x}-0000-0000-0000-000000000000");
        for d in 0..20u32 {
            let addr = IpAddr::from([198, 51, (d % 256) as u8, (w % 256) as u8]);
            volume.observe(&policy, &id, &meta, addr, 443, 1500, true, NS);
        }
    }
    detections += volume.evaluate(&policy, 2 * NS).len();
    let after = rss_kib();
    println!(
        "{}",
        serde_json::json!({
            "dns_events": n,
            "dns_seconds": secs,
            "dns_events_per_sec_one_core": events_per_sec.round(),
            "volume_workloads": 10_000,
            "volume_flows": 200_000,
            "volume_rss_delta_kib": after.saturating_sub(before),
            "rss_kib_total": after,
            "detections": detections,
        })
    );
}
