//! `cargo xtask …`: exfilguard's developer commands.
//!
//! Every command but `setup` runs `setup` first, so a fresh machine needs no
//! manual step before `cargo xtask test`; on a machine that has everything,
//! `setup` only checks, in well under two seconds.
mod bench;
mod build;
mod cargo;
mod certs;
mod demo;
mod process;
mod setup;
mod test;

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::Context as _;
use clap::{Parser, Subcommand};

/// exfilguard's developer commands.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// One variant per command, each implemented in the module of the same name.
#[derive(Debug, Subcommand)]
enum Command {
    /// Install what the build and the tests need (Debian packages, nightly's
    /// rust-src or a prebuilt `core` for the BPF target, bpf-linker). Safe to
    /// run again: it installs only what is missing.
    Setup,
    /// Build the workspace, the agent's embedded eBPF object included.
    Build(build::Options),
    /// Run every check CI runs: fmt, clippy, unit tests, kernel tests (root).
    Test(test::Options),
    /// Run the benchmarks (all, or those named) and write target/bench/results.json.
    Bench(bench::Options),
    /// Make a development CA and controller, agent and client certificates.
    Certs(certs::Options),
    /// A live exfiltration in a namespace lab, caught and contained by the
    /// agent and the controller (root). `--keep` leaves it running.
    Demo(demo::Options),
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            if !error.is::<Reported>() {
                report(&error);
            }
            ExitCode::FAILURE
        }
    }
}

/// An error already printed with [`report`] where it had to be, e.g. before
/// `cargo xtask test`'s closing summary line.
#[derive(Debug)]
pub struct Reported;

impl std::fmt::Display for Reported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("failed (reported above)")
    }
}

impl std::error::Error for Reported {}

/// Prints `error` and its causes, one a line. No backtrace: the failing
/// command's own output, just above, says where.
pub fn report(error: &anyhow::Error) {
    eprintln!("error: {error}");
    for cause in error.chain().skip(1) {
        eprintln!("  caused by: {cause}");
    }
}

fn run() -> anyhow::Result<()> {
    let Cli { command } = Cli::parse();
    let root = workspace_root();
    // Every relative path and every cargo invocation below is meant from the
    // workspace root, wherever `cargo xtask` was started.
    std::env::set_current_dir(&root)
        .with_context(|| format!("changing directory to {}", root.display()))?;

    let setup = setup::run().context("setup")?;
    match command {
        Command::Setup => {
            if setup.installed == 0 {
                println!("setup: everything was already present");
            }
            Ok(())
        }
        Command::Build(options) => build::run(&setup.env, &options).context("build"),
        Command::Test(options) => test::run(&setup.env, &options).context("test"),
        Command::Bench(options) => bench::run(&setup.env, &root, &options).context("bench"),
        Command::Certs(options) => certs::run(&setup.env, &options).context("certs"),
        Command::Demo(options) => demo::run(&setup.env, &options).context("demo"),
    }
}

/// The workspace root: the parent of this crate's directory.
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}
