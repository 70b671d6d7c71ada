//! `exfilguard-lab`: the namespace lab behind `cargo xtask demo`.
//!
//! Needs root (namespaces, cgroups, eBPF). Everything it creates is a guard
//! that removes itself on the way out, also on Ctrl-C or a failed scenario.
mod bench;
mod demo;
mod scripts;
mod stack;
mod upload;

use std::{
    path::PathBuf,
    process::ExitCode,
    sync::atomic::{AtomicBool, Ordering},
};

use clap::{Parser, Subcommand};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// True once SIGINT or SIGTERM arrived.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

extern "C" fn on_signal(_: nix::libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

#[derive(Parser)]
#[command(about = "exfilguard's namespace lab")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// A live exfiltration, caught and contained (standalone).
    Demo {
        /// Leave the lab and exfilguard running until Ctrl-C.
        #[arg(long)]
        keep: bool,
        /// Where certificates, the store, the journal and reports go.
        #[arg(long, default_value = "target/demo")]
        out: PathBuf,
    },
    /// The time-to-contain benchmark: repeated bulk uploads across the
    /// threshold (detection and containment p50/p95), and the hard cap's
    /// overshoot.
    Bench {
        /// Bulk-upload runs.
        #[arg(long, default_value_t = 10)]
        runs: usize,
        /// Work directory.
        #[arg(long, default_value = "target/bench/lab")]
        out: PathBuf,
        /// Where the measures go.
        #[arg(long, default_value = "target/bench/contain.json")]
        json: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("exfilguard-lab needs root (network namespaces, cgroups, eBPF)");
        return ExitCode::from(2);
    }
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        if let Err(e) = unsafe { sigaction(sig, &action) } {
            eprintln!("cannot handle {sig}: {e}");
        }
    }
    match cli.command {
        Command::Bench { runs, out, json } => {
            let result =
                std::panic::catch_unwind(|| bench::run(&bench::Options { out, runs, json }));
            match result {
                Ok(Ok(())) => ExitCode::SUCCESS,
                Ok(Err(e)) => {
                    eprintln!("bench failed: {e:#}");
                    ExitCode::FAILURE
                }
                Err(_) => ExitCode::FAILURE,
            }
        }
        Command::Demo { keep, out } => {
            // Guards clean up while unwinding too: a panic in a scenario is a
            // failed demo, not a leaked namespace.
            let result = std::panic::catch_unwind(|| demo::run(&demo::Options { out, keep }));
            match result {
                Ok(Ok(true)) => {
                    println!("\ndemo: every expectation held");
                    ExitCode::SUCCESS
                }
                Ok(Ok(false)) => {
                    println!("\ndemo: some expectations did not hold (see ✘ above)");
                    ExitCode::FAILURE
                }
                Ok(Err(e)) if interrupted() => {
                    eprintln!("\ndemo interrupted ({e}); the lab is cleaned up");
                    ExitCode::from(130)
                }
                Ok(Err(e)) => {
                    eprintln!("\ndemo failed: {e:#}");
                    ExitCode::FAILURE
                }
                Err(_) => {
                    eprintln!("\ndemo failed (see the message above); the lab is cleaned up");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
