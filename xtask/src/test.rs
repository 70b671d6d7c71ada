//! `cargo xtask test`: everything CI checks, in order, stopping at the first
//! failure: fmt, clippy, the unprivileged tests, the fuzz targets for a
//! bounded time, then the kernel tests (root).
//! The last line printed is `N passed, N failed`, counted from libtest's own
//! closing lines.
mod fuzz;
mod summary;

use std::{
    io::{Read as _, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};
use serde_json::Value;

use self::summary::Counts;
use crate::{cargo::BuildEnv, process};

/// The package of tests that need root, namespaces and a real kernel.
const KERNEL_TESTS_PACKAGE: &str = "exfilguard-tests";
/// Its directory, relative to the workspace root.
const KERNEL_TESTS_DIR: &str = "tests";

/// Options of `cargo xtask test`.
#[derive(Debug, clap::Args)]
pub struct Options {
    /// Skip the kernel tests (they need root): for a laptop. CI never uses this.
    #[arg(long)]
    pub unit_only: bool,
    /// Run only the tests whose name contains this (passed to every harness).
    pub filter: Option<String>,
}

/// Runs the checks and prints the closing summary line, also on failure.
pub fn run(env: &BuildEnv, options: &Options) -> anyhow::Result<()> {
    let Options { unit_only, filter } = options;
    // Checked first: minutes of clippy and unit tests are wasted if the
    // kernel tests cannot run at the end.
    if !unit_only && !is_root() {
        bail!(
            "the kernel tests need root (network namespaces, cgroups, eBPF): run \
             `sudo -E cargo xtask test`, or `cargo xtask test --unit-only` to skip them"
        );
    }

    let mut counts = Counts::default();
    let result = run_stages(env, *unit_only, filter.as_deref(), &mut counts);
    if *unit_only {
        eprintln!();
        eprintln!(
            "!!! KERNEL TESTS WERE SKIPPED (--unit-only): only fmt, clippy and unit tests ran."
        );
        eprintln!("!!! Run `cargo xtask test` as root for the full suite; CI does.");
    }
    // The summary is the closing line, so a failure is reported before it.
    if let Err(error) = &result {
        crate::report(error);
    }
    println!("{}", counts.summary_line());
    result.map_err(|_| crate::Reported.into())
}

fn run_stages(
    env: &BuildEnv,
    unit_only: bool,
    filter: Option<&str>,
    counts: &mut Counts,
) -> anyhow::Result<()> {
    stage("formatting");
    process::run(&mut env.cargo(["fmt", "--all", "--check"]))?;

    stage("clippy");
    process::run(&mut env.cargo([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;

    stage("unit tests");
    let mut unit = env.cargo(["test", "--workspace", "--exclude", KERNEL_TESTS_PACKAGE]);
    if let Some(filter) = filter {
        unit.args(["--", filter]);
    }
    let (status, unit_counts) = run_counting(&mut unit)?;
    *counts += unit_counts;
    process::check(&unit, status)?;

    stage("fuzzing (bounded)");
    fuzz::run(env, &crate::workspace_root(), counts)?;

    if unit_only {
        return Ok(());
    }

    stage("kernel tests (root)");
    let (bin_dir, binaries) = build_kernel_tests(env)?;
    if binaries.is_empty() {
        bail!("cargo built no test binary for {KERNEL_TESTS_PACKAGE}");
    }
    for TestBinary {
        executable,
        package_dir,
    } in binaries
    {
        let mut cmd = Command::new(&executable);
        // One at a time: the tests share kernel state (cgroups, attached
        // programs, pinned maps).
        cmd.arg("--test-threads=1")
            .args(filter)
            .current_dir(&package_dir)
            .env("CARGO_MANIFEST_DIR", &package_dir)
            .env("RUST_LOG", "info")
            .env("RUST_BACKTRACE", "1")
            // A kernel test that cannot run must fail here, not skip.
            .env("EXFILGUARD_REQUIRE_KERNEL_TESTS", "1")
            .env("EXFILGUARD_BIN_DIR", &bin_dir)
            // The interpreter with the gRPC packages setup installed.
            .env(
                "EXFILGUARD_PYTHON",
                crate::setup::python_interpreter(&crate::workspace_root()),
            );
        eprintln!("     Running {}", executable.display());
        let (status, mut binary_counts) = run_counting(&mut cmd)?;
        if !status.success() && binary_counts.failed == 0 {
            // Crashed or aborted before its closing line: still a failure.
            binary_counts.failed = 1;
        }
        *counts += binary_counts;
        process::check(&cmd, status)?;
    }
    Ok(())
}

/// Prints a stage header, so a failure in the log is easy to place.
fn stage(name: &str) {
    eprintln!("==> {name}");
}

/// Runs `cmd`, copying its stdout and stderr through as they come, and adds
/// up the libtest closing lines in them.
fn run_counting(cmd: &mut Command) -> anyhow::Result<(std::process::ExitStatus, Counts)> {
    // One pipe for both streams keeps cargo's `Running …` lines (stderr) in
    // order with the harness output (stdout) instead of racing it.
    let (mut reader, writer) = std::io::pipe().context("creating a pipe")?;
    let writer_too = writer.try_clone().context("duplicating a pipe")?;
    let spawned = cmd.stdout(writer).stderr(writer_too).spawn();
    // The command keeps its copies of the write end open until replaced, and
    // the read below would never see the end of the output.
    cmd.stdout(Stdio::inherit()).stderr(Stdio::inherit());
    let mut child = spawned.with_context(|| format!("starting `{}`", process::describe(cmd)))?;

    let mut counts = Counts::default();
    let mut line = Vec::new();
    let mut buf = [0; 8192];
    let mut out = std::io::stdout().lock();
    loop {
        // Copied in chunks, not lines: libtest prints `test name ... ` and the
        // verdict only when a (possibly long) kernel test ends.
        let n = reader
            .read(&mut buf)
            .with_context(|| format!("reading the output of `{}`", process::describe(cmd)))?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])
            .and_then(|()| out.flush())
            .context("writing to stdout")?;
        for &byte in &buf[..n] {
            if byte == b'\n' {
                if let Some(found) = Counts::parse_line(&String::from_utf8_lossy(&line)) {
                    counts += found;
                }
                line.clear();
            } else {
                line.push(byte);
            }
        }
    }
    let status = child
        .wait()
        .with_context(|| format!("waiting for `{}`", process::describe(cmd)))?;
    Ok((status, counts))
}

/// A test executable cargo built, and the directory of its package (where
/// `cargo test` would run it).
#[derive(Debug, PartialEq, Eq)]
struct TestBinary {
    executable: PathBuf,
    package_dir: PathBuf,
}

/// Builds the agent, controller and lab binaries the end-to-end kernel tests
/// start as processes; returns the directory they are in.
pub fn build_binaries(env: &BuildEnv) -> anyhow::Result<PathBuf> {
    let mut cmd = env.cargo([
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
    bin_dir(&artifacts(&process::stdout(&mut cmd)?)?)
}

/// Builds the kernel tests and the binaries they start, without running
/// them: the test executables and the directory of the binaries.
///
/// One `--workspace --all-targets` build: the same package selection as the
/// unit tests, so cargo resolves the same features and reuses what they
/// built. Narrower selections (`-p exfilguard-tests`, `--bins` alone) resolve
/// other features and rebuild most dependencies a second time, which costs
/// minutes and gigabytes in CI.
fn build_kernel_tests(env: &BuildEnv) -> anyhow::Result<(PathBuf, Vec<TestBinary>)> {
    let mut cmd = env.cargo([
        "build",
        "--workspace",
        "--all-targets",
        // Diagnostics rendered to stderr as usual; stdout is JSON only.
        "--message-format=json-render-diagnostics",
    ]);
    let artifacts = artifacts(&process::stdout(&mut cmd)?)?;
    let bin_dir = bin_dir(&artifacts)?;
    let kernel_dir = crate::workspace_root().join(KERNEL_TESTS_DIR);
    let kernel_dir = kernel_dir
        .canonicalize()
        .with_context(|| format!("resolving {}", kernel_dir.display()))?;
    let binaries = test_binaries(&artifacts)?
        .into_iter()
        .filter(|b| b.package_dir == kernel_dir)
        .collect();
    Ok((bin_dir, binaries))
}

/// The `compiler-artifact` messages in cargo's `--message-format=json` output.
fn artifacts(cargo_json: &str) -> anyhow::Result<Vec<Value>> {
    let mut artifacts = Vec::new();
    for line in cargo_json.lines().filter(|line| line.starts_with('{')) {
        let message: Value = serde_json::from_str(line)
            .with_context(|| format!("cargo printed a line that is not JSON: {line}"))?;
        if message["reason"] == "compiler-artifact" {
            artifacts.push(message);
        }
    }
    Ok(artifacts)
}

/// The directory of the (non-test) binaries among cargo's artifacts.
fn bin_dir(artifacts: &[Value]) -> anyhow::Result<PathBuf> {
    artifacts
        .iter()
        .filter(|a| a["profile"]["test"] == false && a["target"]["kind"][0] == "bin")
        .find_map(|a| Some(Path::new(a["executable"].as_str()?).parent()?.to_path_buf()))
        .context("cargo built no binary")
}

/// The test executables among cargo's artifacts.
fn test_binaries(artifacts: &[Value]) -> anyhow::Result<Vec<TestBinary>> {
    let mut binaries = Vec::new();
    for artifact in artifacts.iter().filter(|a| a["profile"]["test"] == true) {
        let Some(executable) = artifact["executable"].as_str() else {
            continue;
        };
        let manifest = artifact["manifest_path"]
            .as_str()
            .with_context(|| format!("artifact without manifest_path: {artifact}"))?;
        let package_dir = Path::new(manifest)
            .parent()
            .with_context(|| format!("manifest_path without a parent: {manifest}"))?;
        binaries.push(TestBinary {
            executable: PathBuf::from(executable),
            package_dir: package_dir.to_path_buf(),
        });
    }
    Ok(binaries)
}

/// Whether this process runs as root.
fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::{TestBinary, artifacts, bin_dir, test_binaries};

    #[test]
    fn only_test_artifacts_with_executables_are_listed() {
        let json = r#"{"reason":"compiler-artifact","package_id":"path+file:///w/tests#exfilguard-tests@0.1.0","manifest_path":"/w/tests/Cargo.toml","target":{"kind":["lib"],"name":"exfilguard_tests"},"profile":{"test":false},"executable":null,"fresh":true}
{"reason":"compiler-artifact","manifest_path":"/w/tests/Cargo.toml","target":{"kind":["lib"],"name":"exfilguard_tests"},"profile":{"test":true},"executable":"/w/target/debug/deps/exfilguard_tests-0123","fresh":false}
{"reason":"compiler-artifact","manifest_path":"/w/tests/Cargo.toml","target":{"kind":["test"],"name":"egress"},"profile":{"test":true},"executable":"/w/target/debug/deps/egress-4567","fresh":false}
{"reason":"build-script-executed","package_id":"x","out_dir":"/w/target/debug/build/x/out"}
{"reason":"build-finished","success":true}
"#;
        assert_eq!(
            test_binaries(&artifacts(json).unwrap()).unwrap(),
            [
                TestBinary {
                    executable: PathBuf::from("/w/target/debug/deps/exfilguard_tests-0123"),
                    package_dir: PathBuf::from("/w/tests"),
                },
                TestBinary {
                    executable: PathBuf::from("/w/target/debug/deps/egress-4567"),
                    package_dir: PathBuf::from("/w/tests"),
                },
            ]
        );
    }

    #[test]
    fn the_bin_dir_is_where_a_non_test_binary_went() {
        let json = r#"{"reason":"compiler-artifact","manifest_path":"/w/tests/Cargo.toml","target":{"kind":["test"],"name":"egress"},"profile":{"test":true},"executable":"/w/target/debug/deps/egress-4567","fresh":false}
{"reason":"compiler-artifact","manifest_path":"/w/agent/Cargo.toml","target":{"kind":["lib"],"name":"exfilguard_agent"},"profile":{"test":false},"executable":null,"fresh":true}
{"reason":"compiler-artifact","manifest_path":"/w/agent/Cargo.toml","target":{"kind":["bin"],"name":"exfilguard-agent"},"profile":{"test":false},"executable":"/w/target/debug/exfilguard-agent","fresh":true}
"#;
        assert_eq!(
            bin_dir(&artifacts(json).unwrap()).unwrap(),
            PathBuf::from("/w/target/debug")
        );
        assert!(bin_dir(&[]).is_err());
    }

    #[test]
    fn broken_json_is_an_error() {
        assert!(artifacts("{\"reason\":").is_err());
    }
}
