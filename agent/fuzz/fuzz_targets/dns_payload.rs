//! The DNS-payload path the kernel's records take: parse (UDP and TCP
//! framing), classify, score, evaluate. Truncated messages, compression
//! loops, oversized labels: an error or a result, never a panic or a hang.
#![no_main]

use exfilguard_agent::{detect::dns::DnsDetector, policy::Policy};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let policy = Policy::default();
    let mut d = DnsDetector::new();
    let tcp = data.first().is_some_and(|b| b & 1 == 1);
    let payload = data.get(1..).unwrap_or_default();
    let _ = d.observe_payload(&policy, "fuzz", payload, tcp, None, 1_000_000_000);
    let _ = d.evaluate(&policy, 2_000_000_000);
});
