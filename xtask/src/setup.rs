//! `cargo xtask setup`: install what the build and the tests need, and only
//! what is missing.
//!
//! Every other command runs this first, so the everything-present path must
//! stay cheap: one `dpkg-query` for all Debian packages, three `rustc` queries
//! run side by side, file checks, and `bpf-linker --version`. Nothing touches
//! the network unless something is missing.
mod apt;
mod bpf_core;
mod elf;
mod fuzz;
mod linker;
mod python;
mod rustdoc_src;

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};

pub use self::{bpf_core::CoreSource, python::interpreter as python_interpreter};
use crate::{cargo::BuildEnv, process};

/// The toolchain aya-build compiles the eBPF crate with (`Toolchain::default()`
/// in agent/build.rs).
pub const NIGHTLY: &str = "nightly";

/// How long a `rustup component add` may take before we give up on it (and,
/// for rust-src, fall back to building `core` ourselves).
const RUSTUP_TIMEOUT: Duration = Duration::from_secs(120);

/// What `setup` found and did.
#[derive(Debug)]
pub struct Outcome {
    /// How child cargo invocations must be set up on this machine.
    pub env: BuildEnv,
    /// How many things were installed (0: everything was present).
    pub installed: usize,
}

/// Facts about the nightly toolchain that builds the eBPF object.
#[derive(Debug)]
struct Nightly {
    /// `rustc +nightly --print sysroot`.
    sysroot: PathBuf,
    /// The major version of the LLVM inside nightly's rustc.
    llvm_major: u32,
}

/// Installs whatever is missing and prints one line for each thing installed.
pub fn run() -> anyhow::Result<Outcome> {
    let mut installed = Installed::default();

    // Started first so the rustc queries overlap with the package check.
    let plus_nightly = format!("+{NIGHTLY}");
    let nightly_sysroot =
        spawn_stdout(Command::new("rustc").args([&plus_nightly, "--print", "sysroot"]))?;
    let nightly_version = spawn_stdout(Command::new("rustc").args([&plus_nightly, "-vV"]))?;
    let default_sysroot = spawn_stdout(Command::new("rustc").args(["--print", "sysroot"]))?;

    apt::ensure(&mut installed).context("Debian packages")?;

    let nightly = Nightly {
        sysroot: PathBuf::from(nightly_sysroot.wait().context(
            "querying the nightly toolchain, which builds the eBPF object \
             (`rustup toolchain install nightly --component rust-src,rust-docs` installs it)",
        )?),
        llvm_major: llvm_major(&nightly_version.wait()?)?,
    };
    let default_sysroot = PathBuf::from(default_sysroot.wait()?);

    ensure_lint_tools(&default_sysroot, &mut installed)?;
    let core = bpf_core::ensure(&nightly, &mut installed).context("`core` for the BPF target")?;
    linker::ensure(&nightly, &mut installed).context("bpf-linker")?;
    fuzz::ensure(&mut installed).context("cargo-fuzz")?;
    python::ensure(&crate::workspace_root(), &mut installed)
        .context("Python environment for the gRPC interoperability test")?;

    Ok(Outcome {
        env: BuildEnv {
            core,
            bpf_rustc_wrapper: crate::workspace_root().join("xtask/bpf-rustc-wrapper.sh"),
        },
        installed: installed.0,
    })
}

/// Counts and reports what `setup` installed.
#[derive(Debug, Default)]
struct Installed(usize);

impl Installed {
    /// Records and prints one installed thing.
    fn note(&mut self, what: impl std::fmt::Display) {
        self.0 += 1;
        println!("setup: installed {what}");
    }
}

/// rustfmt and clippy for the default toolchain: `cargo xtask test` runs both.
fn ensure_lint_tools(sysroot: &Path, installed: &mut Installed) -> anyhow::Result<()> {
    let missing: Vec<&str> = [("cargo-fmt", "rustfmt"), ("cargo-clippy", "clippy")]
        .into_iter()
        .filter(|(bin, _)| !sysroot.join("bin").join(bin).is_file())
        .map(|(_, component)| component)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let mut cmd = Command::new("rustup");
    cmd.args(["component", "add"]).args(&missing);
    if !process::try_with_timeout(&mut cmd, RUSTUP_TIMEOUT)? {
        bail!("`{}` failed or timed out", process::describe(&cmd));
    }
    for component in missing {
        installed.note(format_args!("rustup component {component}"));
    }
    Ok(())
}

/// A child whose stdout is collected later, so several queries run at once.
struct PendingStdout {
    child: std::process::Child,
    line: String,
}

/// Starts `cmd` with stdout captured.
fn spawn_stdout(cmd: &mut Command) -> anyhow::Result<PendingStdout> {
    let line = process::describe(cmd);
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting `{line}`"))?;
    Ok(PendingStdout { child, line })
}

impl PendingStdout {
    /// Waits for the child and returns its stdout, trimmed.
    fn wait(self) -> anyhow::Result<String> {
        let Self { child, line } = self;
        let output = child
            .wait_with_output()
            .with_context(|| format!("waiting for `{line}`"))?;
        if !output.status.success() {
            bail!(
                "`{line}` failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        let stdout = String::from_utf8(output.stdout)
            .with_context(|| format!("`{line}` printed non-UTF-8 output"))?;
        Ok(stdout.trim().to_owned())
    }
}

/// The LLVM major version from `rustc -vV` output (`LLVM version: 22.1.4`).
fn llvm_major(rustc_verbose_version: &str) -> anyhow::Result<u32> {
    let version = rustc_verbose_version
        .lines()
        .find_map(|line| line.strip_prefix("LLVM version:"))
        .context("`rustc -vV` printed no `LLVM version:` line")?
        .trim();
    let major = version.split('.').next().unwrap_or_default();
    major
        .parse()
        .with_context(|| format!("LLVM version {version:?} does not start with a number"))
}

#[cfg(test)]
mod tests {
    use super::llvm_major;

    #[test]
    fn llvm_major_from_nightly_verbose_version() {
        let out = "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)\n\
                   binary: rustc\n\
                   host: x86_64-unknown-linux-gnu\n\
                   release: 1.97.0-nightly\n\
                   LLVM version: 22.1.4\n";
        assert_eq!(llvm_major(out).unwrap(), 22);
    }

    #[test]
    fn llvm_major_single_component() {
        assert_eq!(llvm_major("LLVM version: 23").unwrap(), 23);
    }

    #[test]
    fn llvm_major_missing_line_is_an_error() {
        let err = llvm_major("rustc 1.95.0\nbinary: rustc\n").unwrap_err();
        assert!(err.to_string().contains("LLVM version"), "{err}");
    }

    #[test]
    fn llvm_major_garbage_is_an_error() {
        assert!(llvm_major("LLVM version: unknown").is_err());
    }
}
