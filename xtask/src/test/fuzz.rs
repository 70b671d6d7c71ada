//! The fuzz targets in agent/fuzz, each for a bounded time: a crash, a
//! panic, a hang past libFuzzer's per-input timeout or a blown memory limit
//! fails the run. The committed seeds in agent/fuzz/seeds/<target> start each
//! run; what libFuzzer finds on top goes to agent/fuzz/corpus/<target>
//! (ignored by git, kept between runs) and crashing inputs to
//! agent/fuzz/artifacts/<target>/.
use std::path::Path;

use anyhow::Context as _;

use super::summary::Counts;
use crate::{cargo::BuildEnv, process};

/// Every target, in the order they run.
const TARGETS: &[&str] = &["dns_payload", "pcap_reader", "policy_yaml", "agent_message"];

/// Seconds each target runs. The stage's budget is ~5 minutes on 2 cores
/// including the build: 4 × 20 s of fuzzing (each target reaches roughly 0.4–3.5
/// million inputs in that time here) leaves the rest for the incremental
/// rebuild of the agent with coverage instrumentation (~4 minutes on the
/// shared CI VM; a cold build of the fuzz workspace takes far longer).
const SECONDS_PER_TARGET: u32 = 20;

/// Seconds one input may take before libFuzzer calls it a hang.
const INPUT_TIMEOUT_SECONDS: u32 = 10;

/// Where the fuzz crate lives, relative to the workspace root.
const FUZZ_DIR: &str = "agent/fuzz";

/// `cargo +nightly fuzz <subcommand>` with the flags every call shares.
///
/// No sanitizer: the code under test is safe Rust, so what fuzzing looks for
/// is panics, hangs and runaway memory, which need none; this also keeps
/// the build to the plain instrumented one. Debug assertions are on so that
/// integer overflow is a crash too.
fn fuzz(env: &BuildEnv, root: &Path, subcommand: &str) -> std::process::Command {
    let mut cmd = env.cargo([
        &format!("+{}", crate::setup::NIGHTLY),
        "fuzz",
        subcommand,
        "--fuzz-dir",
        FUZZ_DIR,
        "--sanitizer",
        "none",
        "--debug-assertions",
    ]);
    cmd.current_dir(root);
    cmd
}

/// Builds every target, then runs each; one count per target.
pub fn run(env: &BuildEnv, root: &Path, counts: &mut Counts) -> anyhow::Result<()> {
    process::run(&mut fuzz(env, root, "build"))?;
    let mut failed = Vec::new();
    for target in TARGETS {
        let scratch = root.join(FUZZ_DIR).join("corpus").join(target);
        let artifacts = root.join(FUZZ_DIR).join("artifacts").join(target);
        for dir in [&scratch, &artifacts] {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let seeds = root.join(FUZZ_DIR).join("seeds").join(target);
        let mut cmd = fuzz(env, root, "run");
        cmd.arg(target)
            .arg(&scratch)
            .arg(&seeds)
            .arg("--")
            .arg(format!("-max_total_time={SECONDS_PER_TARGET}"))
            .arg(format!("-timeout={INPUT_TIMEOUT_SECONDS}"))
            .arg("-rss_limit_mb=2048")
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            // The summary, not a line per new coverage point.
            .arg("-print_final_stats=1")
            .arg("-verbosity=0");
        eprintln!("     Fuzzing {target} for {SECONDS_PER_TARGET}s");
        match process::run(&mut cmd) {
            Ok(()) => counts.passed += 1,
            Err(e) => {
                counts.failed += 1;
                eprintln!("fuzz target {target} failed: {e:#}");
                failed.push(*target);
            }
        }
    }
    if std::env::var_os("CI").is_some() {
        // CI's clean clone never reuses the instrumented build (~2 GB), and
        // the kernel tests still need the disk.
        let target = root.join(FUZZ_DIR).join("target");
        std::fs::remove_dir_all(&target)
            .with_context(|| format!("removing {}", target.display()))?;
    }
    if !failed.is_empty() {
        anyhow::bail!(
            "fuzz targets failed: {} (the crashing input is in {FUZZ_DIR}/artifacts/<target>/; \
             `cargo +nightly fuzz run --fuzz-dir {FUZZ_DIR} <target> <file>` replays it)",
            failed.join(", ")
        );
    }
    Ok(())
}
