//! `cargo xtask certs`: a development PKI (CA; controller, agent, viewer and
//! responder certificates) made by the controller's own `certs` command, so
//! there is one implementation of the certificate profiles and roles.
use std::path::PathBuf;

use crate::{cargo::BuildEnv, process};

/// Options of `cargo xtask certs`.
#[derive(Debug, clap::Args)]
pub struct Options {
    /// Output directory; an existing CA there is reused.
    #[arg(long, default_value = "target/pki")]
    out: PathBuf,
    /// Agent node names to issue certificates for (repeatable).
    #[arg(long = "node")]
    nodes: Vec<String>,
    /// Names and addresses for the controller's certificate (repeatable).
    #[arg(long = "host")]
    hosts: Vec<String>,
}

/// Runs `exfilguard-controller certs` with the options.
pub fn run(env: &BuildEnv, options: &Options) -> anyhow::Result<()> {
    let Options { out, nodes, hosts } = options;
    let mut cmd = env.cargo([
        "run",
        "--quiet",
        "--package",
        "exfilguard-controller",
        "--bin",
        "exfilguard-controller",
        "--",
        "certs",
        "--out",
    ]);
    cmd.arg(out);
    for node in nodes {
        cmd.args(["--node", node]);
    }
    for host in hosts {
        cmd.args(["--host", host]);
    }
    process::run(&mut cmd)?;
    println!("certificates in {}", out.display());
    Ok(())
}
