//! The policy parser and validator: any text gives a policy or an error
//! naming the field, never a panic or a hang; a policy it accepts can be
//! applied to a workload.
#![no_main]

use exfilguard_agent::policy::{Policy, WorkloadMeta};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(policy) = Policy::from_yaml(text) {
        let _ = policy.effective(&WorkloadMeta::default());
    }
});
