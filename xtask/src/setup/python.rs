//! A Python virtual environment with the gRPC packages the tests' generic
//! client uses (grpcio, grpcio-reflection, grpcio-health-checking): the test
//! that proves the controller's API is self-describing runs stock gRPC tooling
//! that is not ours. Debian's python3 + python3-venv (apt.rs) create it.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context as _;

use super::Installed;
use crate::process;

/// Pinned so every machine runs the test against the same client.
const REQUIREMENTS: &[&str] = &[
    "grpcio==1.85.1",
    "grpcio-reflection==1.85.1",
    "grpcio-health-checking==1.85.1",
];

/// Where the environment lives: beside the build, so `cargo clean` or a new
/// checkout starts over, and outside the sources.
pub fn venv_dir(root: &Path) -> PathBuf {
    root.join("target/python-venv")
}

/// The environment's interpreter; what `cargo xtask test` hands the tests as
/// `EXFILGUARD_PYTHON`.
pub fn interpreter(root: &Path) -> PathBuf {
    venv_dir(root).join("bin/python3")
}

/// Creates the environment and installs [`REQUIREMENTS`] unless a marker
/// says exactly these are installed (a file check: no Python start-up).
pub fn ensure(root: &Path, installed: &mut Installed) -> anyhow::Result<()> {
    let dir = venv_dir(root);
    let marker = dir.join("exfilguard-requirements.txt");
    let wanted = REQUIREMENTS.join("\n");
    if interpreter(root).is_file() && fs::read_to_string(&marker).is_ok_and(|have| have == wanted) {
        return Ok(());
    }
    process::quiet(
        Command::new("/usr/bin/python3")
            .args(["-m", "venv", "--clear"])
            .arg(&dir),
    )
    .context("creating the Python environment (Debian packages python3, python3-venv)")?;
    process::quiet(
        Command::new(interpreter(root))
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(REQUIREMENTS),
    )
    .context("installing the Python gRPC packages from PyPI")?;
    fs::write(&marker, &wanted).with_context(|| format!("writing {}", marker.display()))?;
    installed.note(format_args!(
        "Python environment {} ({})",
        dir.display(),
        REQUIREMENTS.join(", ")
    ));
    Ok(())
}
