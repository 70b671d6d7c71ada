//! `cargo xtask demo`: builds the agent, the controller, exfilctl and the
//! lab, then runs `exfilguard-lab demo` as root: a live exfiltration in a
//! namespace lab, caught and contained (see `xtask/lab/src/demo.rs`).
use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::{cargo::BuildEnv, process};

/// Options of `cargo xtask demo`.
#[derive(Debug, clap::Args)]
pub struct Options {
    /// Leave the lab and exfilguard running until Ctrl-C, to poke at them
    /// with exfilctl, curl /metrics and a generic gRPC client.
    #[arg(long)]
    pub keep: bool,
}

/// No-op SIGINT handler: Ctrl-C reaches the lab (which cleans up and says
/// how it ended) while this process stays to report its exit status. A
/// handler, unlike SIG_IGN, is reset for the children on exec.
extern "C" fn ignore(_: libc::c_int) {}

/// Builds what the demo runs and runs it.
pub fn run(env: &BuildEnv, options: &Options) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "the demo needs root (network namespaces, cgroups, eBPF): run `sudo -E cargo xtask demo`"
        );
    }
    eprintln!("==> building exfilguard-agent, exfilguard-controller, exfilctl, exfilguard-lab");
    let mut build = env.cargo([
        "build",
        "--package",
        "exfilguard-agent",
        "--package",
        "exfilguard-controller",
        "--package",
        "exfilguard-lab",
        "--bins",
        "--message-format=json-render-diagnostics",
    ]);
    let stdout = process::stdout(&mut build)?;
    let mut bin_dir: Option<PathBuf> = None;
    for line in stdout.lines().filter(|l| l.starts_with('{')) {
        let message: Value = serde_json::from_str(line)
            .with_context(|| format!("cargo printed a line that is not JSON: {line}"))?;
        if message["reason"] == "compiler-artifact"
            && let Some(exe) = message["executable"].as_str()
        {
            bin_dir = std::path::Path::new(exe).parent().map(PathBuf::from);
        }
    }
    let bin_dir = bin_dir.context("cargo built no binaries")?;
    let mut lab = Command::new(bin_dir.join("exfilguard-lab"));
    lab.arg("demo").env("EXFILGUARD_BIN_DIR", &bin_dir);
    if options.keep {
        lab.arg("--keep");
    }
    // SAFETY: installing a handler that does nothing is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, ignore as *const () as libc::sighandler_t);
    }
    process::run(&mut lab)
}
