//! `cargo xtask build`: the whole workspace, the agent's eBPF object included.
use crate::{cargo::BuildEnv, process};

/// Options of `cargo xtask build`.
#[derive(Debug, clap::Args)]
pub struct Options {
    /// Build with the release profile.
    #[arg(long)]
    pub release: bool,
}

/// Builds every workspace member (the agent's build.rs builds agent-ebpf for
/// the BPF target; the host build of agent-ebpf is only a stub).
pub fn run(env: &BuildEnv, options: &Options) -> anyhow::Result<()> {
    let Options { release } = options;
    let mut cmd = env.cargo(["build", "--workspace"]);
    if *release {
        cmd.arg("--release");
    }
    process::run(&mut cmd)
}
