//! cargo-fuzz, which `cargo xtask test` uses to run the fuzz targets in
//! agent/fuzz for a bounded time (they build with the nightly toolchain that
//! setup already requires for the eBPF object).
use std::{env, path::Path, process::Command};

use super::Installed;
use crate::process;

/// The cargo-fuzz release the targets are run with.
const VERSION: &str = "0.13.2";

/// Installs cargo-fuzz unless a `cargo-fuzz` is on PATH (a file check).
pub fn ensure(installed: &mut Installed) -> anyhow::Result<()> {
    if on_path("cargo-fuzz") {
        return Ok(());
    }
    eprintln!("setup: building cargo-fuzz {VERSION}");
    process::run(Command::new("cargo").args([
        "install",
        "--locked",
        "cargo-fuzz",
        "--version",
        VERSION,
    ]))?;
    installed.note(format_args!("cargo-fuzz {VERSION}"));
    Ok(())
}

/// Whether an executable file `name` is in a directory of `PATH`.
fn on_path(name: &str) -> bool {
    env::var_os("PATH")
        .is_some_and(|paths| env::split_paths(&paths).any(|dir| is_executable(&dir.join(name))))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::on_path;

    #[test]
    fn finds_sh_and_not_nonsense() {
        assert!(on_path("sh"));
        assert!(!on_path("exfilguard-no-such-tool"));
    }
}
