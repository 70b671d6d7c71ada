//! `cargo xtask demo` keeps working: runs the lab's demo (a live
//! exfiltration caught and contained, a slow DNS leak, a backup and normal
//! traffic that must raise nothing) and requires every expectation to hold
//! and the lab to be gone afterwards. Root; `cargo xtask test` builds the
//! binaries first.
use std::{process::Command, time::Duration};

use exfilguard_tests::{
    ChildGuard, cgroup::cgroup_root, kernel_test_guard, process::workspace_bin,
};

#[test]
fn the_demo_catches_and_contains_every_leak_without_false_alarms_and_cleans_up() {
    if !kernel_test_guard(&["ip", "python3", "dnsmasq", "dig"]) {
        return;
    }
    let out = std::env::temp_dir().join(format!(
        "exfilguard-demo-test-{}",
        exfilguard_tests::unique_name()
    ));
    let mut cmd = Command::new(workspace_bin("exfilguard-lab"));
    cmd.arg("demo").arg("--out").arg(&out);
    if let Some(dir) = std::env::var_os("EXFILGUARD_BIN_DIR") {
        cmd.env("EXFILGUARD_BIN_DIR", dir);
    }
    let mut demo = ChildGuard::spawn(cmd, "exfilguard-lab demo");
    // Its closing line says how it ended; then the exit status.
    demo.wait_for_line(
        "the demo's closing line",
        |l| l.starts_with("demo"),
        Duration::from_secs(300),
    );
    let status = demo.wait(Duration::from_secs(30));
    let transcript = demo.transcript();
    let _ = std::fs::remove_dir_all(&out);
    assert!(
        status.success(),
        "the demo failed ({status}):\n{transcript}"
    );
    for expected in [
        "every expectation held",
        "false alarms            0",
        "detected after",
        "contained after",
    ] {
        assert!(
            transcript.contains(expected),
            "no {expected:?} in:\n{transcript}"
        );
    }
    let pid = demo.pid();
    assert!(
        !cgroup_root()
            .join(format!("exfilguard-demo-{pid}"))
            .exists(),
        "the demo left its cgroup behind"
    );
    let netns = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    let prefix = format!("eg{pid}x");
    assert!(
        !String::from_utf8_lossy(&netns.stdout).contains(&prefix),
        "the demo left namespaces behind"
    );
}
