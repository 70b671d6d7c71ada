//! Debian packages: checked with one `dpkg-query`, installed with apt-get only
//! when some are missing.
use std::{fs, os::unix::fs::PermissionsExt as _, path::Path, process::Command};

use anyhow::Context as _;

use super::Installed;
use crate::process;

/// Every Debian package the build and the tests use, grouped by who uses it.
pub const PACKAGES: &[&str] = &[
    // proto/: tonic-prost-build runs protoc on exfilguard/v1/*.proto.
    "protobuf-compiler",
    // The controller's allocator: tikv-jemalloc-sys builds jemalloc with make.
    "make",
    // tests/ kernel tests: network namespaces and veth pairs (ip), and real
    // traffic whose bytes the eBPF counters are checked against.
    "iproute2",
    "iputils-ping",
    "socat",
    "netcat-openbsd",
    "iperf3",
    // tests/ traffic senders and receivers are small Python scripts run inside
    // the namespaces; the machine's own Python may live outside the PATH
    // `ip netns exec` passes on.
    "python3",
    // ...and python3-venv makes the environment the gRPC interoperability
    // test's packages go into (setup/python.rs).
    "python3-venv",
    // tests/ and whoever debugs them: captures, and the programs, maps and
    // links the agent loaded.
    "tcpdump",
    "bpftool",
    // tests/ DNS detection: dig; a local resolver (dnsmasq-base is the binary
    // without a system service that would hold port 53); and real DNS
    // tunnels to detect.
    "dnsutils",
    "dnsmasq-base",
    "iodine",
    "dns2tcp",
    // deploy/ and tests/: promtool checks the shipped alert rules; a real
    // Alertmanager is the sink the end-to-end alert tests deliver to.
    "prometheus",
    "prometheus-alertmanager",
    // deploy/check: the Lima harness and deploy/make-certs.sh are checked
    // with shellcheck.
    "shellcheck",
];

/// Installs the packages of [`PACKAGES`] that are not installed.
pub fn ensure(installed: &mut Installed) -> anyhow::Result<()> {
    // dpkg-query exits 1 when a package was never installed (and says so on
    // stderr), so only its stdout is read.
    let mut query = Command::new("dpkg-query");
    query
        .args(["-W", "-f=${Package}\t${Status}\n"])
        .args(PACKAGES);
    let output = query
        .output()
        .with_context(|| format!("starting `{}`", process::describe(&query)))?;
    let status = String::from_utf8_lossy(&output.stdout);
    let missing = missing(PACKAGES, &status);
    if missing.is_empty() {
        return Ok(());
    }

    let _no_services = NoServiceStart::install()?;
    eprintln!("setup: installing Debian packages: {}", missing.join(" "));
    process::quiet(Command::new("apt-get").args(["-qq", "update"]))?;
    process::quiet(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            // iodine asks debconf questions; CI has no stdin.
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    for package in missing {
        installed.note(format_args!("Debian package {package}"));
    }
    Ok(())
}

/// The packages of `wanted` that `dpkg-query -f='${Package}\t${Status}\n'`
/// output does not report as installed.
fn missing<'a>(wanted: &[&'a str], dpkg_status: &str) -> Vec<&'a str> {
    let installed: Vec<&str> = dpkg_status
        .lines()
        .filter_map(|line| line.split_once('\t'))
        .filter(|(_, status)| status.trim() == "install ok installed")
        .map(|(package, _)| package.trim())
        .collect();
    wanted
        .iter()
        .copied()
        .filter(|package| !installed.contains(package))
        .collect()
}

/// Keeps apt from starting the daemons it installs (prometheus, alertmanager,
/// iodined) while it exists: the tests start their own instances, inside
/// namespaces, and a system copy would hold their ports. This is Debian's own
/// mechanism (invoke-rc.d's policy-rc.d, exit 101 = "action forbidden"); if
/// the machine already has a policy-rc.d it is left as it is.
struct NoServiceStart(Option<&'static Path>);

impl NoServiceStart {
    const PATH: &'static str = "/usr/sbin/policy-rc.d";

    /// Writes a forbidding policy-rc.d unless one exists.
    fn install() -> anyhow::Result<Self> {
        let path = Path::new(Self::PATH);
        if path.exists() {
            return Ok(Self(None));
        }
        fs::write(
            path,
            "#!/bin/sh\n# Written by cargo xtask setup while apt-get runs.\nexit 101\n",
        )
        .with_context(|| format!("writing {}", path.display()))?;
        fs::set_permissions(path, fs::Permissions::from_mode(0o755))
            .with_context(|| format!("making {} executable", path.display()))?;
        Ok(Self(Some(path)))
    }
}

impl Drop for NoServiceStart {
    fn drop(&mut self) {
        if let Some(path) = self.0
            && let Err(e) = fs::remove_file(path)
        {
            eprintln!("setup: could not remove {}: {e}", path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{PACKAGES, missing};

    #[test]
    fn nothing_missing_when_all_installed() {
        let out = "socat\tinstall ok installed\ntcpdump\tinstall ok installed\n";
        assert!(missing(&["socat", "tcpdump"], out).is_empty());
    }

    #[test]
    fn unknown_and_removed_packages_are_missing() {
        // `iperf3` removed but its config kept; `tcpdump` never installed, so
        // dpkg-query prints nothing for it.
        let out = "socat\tinstall ok installed\niperf3\tdeinstall ok config-files\n";
        assert_eq!(
            missing(&["socat", "iperf3", "tcpdump"], out),
            ["iperf3", "tcpdump"]
        );
    }

    #[test]
    fn package_list_has_no_duplicates() {
        let mut sorted = PACKAGES.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), PACKAGES.len());
    }
}
