//! Deciding, loudly, whether a kernel test can run here.
//!
//! Kernel tests need root, some command-line tools and a cgroup v2 mount. Where those
//! are missing a test skips and says so on stderr, unless
//! `EXFILGUARD_REQUIRE_KERNEL_TESTS=1` is set (as CI and `cargo xtask` do on a prepared
//! machine): then a skip would be a silent pass, so it panics instead.

use std::{
    env,
    path::{Path, PathBuf},
};

use crate::cgroup::{self, CGROUP_ROOT_ENV};

/// Set to `1` to turn every skip into a failure.
pub const REQUIRE_ENV: &str = "EXFILGUARD_REQUIRE_KERNEL_TESTS";

/// Returns `true` if the test can run: root, every tool in `tools` on `PATH`, and a
/// cgroup v2 root. Otherwise prints `SKIPPED: <reason>` and returns `false`, or panics
/// if [`REQUIRE_ENV`] is `1`.
///
/// Usage: `if !kernel_test_guard(&["ip", "python3"]) { return; }`.
#[track_caller]
pub fn kernel_test_guard(tools: &[&str]) -> bool {
    decide(missing(tools), required())
}

/// [`kernel_test_guard`] with no tools: root and a cgroup v2 root only.
#[track_caller]
pub fn require_root() -> bool {
    kernel_test_guard(&[])
}

fn required() -> bool {
    env::var_os(REQUIRE_ENV).is_some_and(|v| v == "1")
}

/// The first unmet requirement, if any.
fn missing(tools: &[&str]) -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("kernel tests need root (namespaces, cgroups, bpf)".into());
    }
    let absent: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|tool| find_tool(tool).is_none())
        .collect();
    if !absent.is_empty() {
        return Some(format!(
            "missing tools: {} (run `cargo xtask setup`)",
            absent.join(", ")
        ));
    }
    let root = cgroup::cgroup_root();
    if !cgroup::is_cgroup2(&root) {
        return Some(format!(
            "{} is not a cgroup v2 mount (set {CGROUP_ROOT_ENV})",
            root.display()
        ));
    }
    None
}

#[track_caller]
fn decide(missing: Option<String>, required: bool) -> bool {
    match missing {
        None => true,
        Some(reason) if required => {
            panic!("{REQUIRE_ENV}=1 but this kernel test cannot run: {reason}")
        }
        Some(reason) => {
            let at = std::panic::Location::caller();
            eprintln!("SKIPPED: {reason} ({at})");
            false
        }
    }
}

/// Finds an executable on `PATH`, plus the sbin directories (`ip` lives there and a
/// non-login root shell may lack them).
pub fn find_tool(tool: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;

    let path = env::var_os("PATH").unwrap_or_default();
    env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(tool))
        .find(|candidate| {
            Path::new(candidate)
                .metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_when_nothing_is_missing() {
        assert!(decide(None, false));
        assert!(decide(None, true));
    }

    #[test]
    fn skips_when_not_required() {
        assert!(!decide(Some("no root".into()), false));
    }

    #[test]
    #[should_panic(expected = "cannot run: no root")]
    fn panics_when_required() {
        decide(Some("no root".into()), true);
    }

    #[test]
    fn finds_sh_but_not_nonsense() {
        assert!(find_tool("sh").is_some());
        assert!(find_tool("eg-no-such-tool-anywhere").is_none());
    }
}
