//! `cargo xtask demo`: builds the agent, the controller, exfilctl and the
//! lab, then runs `exfilguard-lab demo` as root: a live exfiltration in a
//! namespace lab, caught and contained (see `xtask/lab/src/demo.rs`).
use std::process::Command;

use anyhow::bail;

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
    let bin_dir = crate::test::build_binaries(env)?;
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
