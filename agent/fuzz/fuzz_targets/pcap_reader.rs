//! The capture reader and packet decoding behind `analyze --pcap`: any bytes
//! give a report (possibly with an error naming the offset), never a panic.
#![no_main]

use exfilguard_agent::{analyze::analyze_bytes, policy::Policy};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = analyze_bytes(data, Policy::default(), Vec::new());
});
