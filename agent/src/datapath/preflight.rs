//! Checks run before anything is loaded, so a machine that cannot run the
//! agent gets one clear message saying what is wrong and what to do, and
//! nothing is left half-attached.
use std::{ffi::CString, fs, os::unix::ffi::OsStrExt as _, path::Path};

use super::DatapathError;

/// `statfs` magic of a cgroup v2 mount (linux/magic.h).
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
/// `statfs` magic of a bpffs mount (linux/magic.h).
pub(crate) const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// Where the kernel exposes its own BTF.
const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";
/// cgroup_skb links (BPF_LINK_CREATE for cgroups) and ring buffers need 5.8.
const MIN_KERNEL: (u32, u32) = (5, 8);

/// Capability bits the agent needs (linux/capability.h).
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Runs every check; the first failure is returned.
pub fn check(cgroup_path: &Path) -> Result<(), DatapathError> {
    check_kernel(&kernel_release()?)?;
    if !Path::new(VMLINUX_BTF).exists() {
        return Err(DatapathError::MissingBtf);
    }
    let status = Path::new("/proc/self/status");
    check_capabilities(&fs::read_to_string(status).map_err(DatapathError::io("read", status))?)?;
    check_cgroup2(cgroup_path)
}

fn kernel_release() -> Result<String, DatapathError> {
    let path = Path::new("/proc/sys/kernel/osrelease");
    fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .map_err(DatapathError::io("read", path))
}

/// Fails on kernels older than [`MIN_KERNEL`].
pub(crate) fn check_kernel(release: &str) -> Result<(), DatapathError> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next().and_then(|p| p.parse::<u32>().ok());
    let minor = parts.next().and_then(|p| p.parse::<u32>().ok());
    match (major, minor) {
        (Some(major), Some(minor)) if (major, minor) >= MIN_KERNEL => Ok(()),
        _ => Err(DatapathError::UnsupportedKernel {
            release: release.to_owned(),
        }),
    }
}

/// Fails unless the effective capabilities include CAP_BPF, CAP_NET_ADMIN and
/// CAP_PERFMON (or CAP_SYS_ADMIN, which implies the first and last).
pub(crate) fn check_capabilities(proc_status: &str) -> Result<(), DatapathError> {
    let eff = proc_status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let has = |cap: u32| eff & (1u64 << cap) != 0;
    let sys_admin = has(CAP_SYS_ADMIN);
    let mut missing = Vec::new();
    if !has(CAP_BPF) && !sys_admin {
        missing.push("CAP_BPF");
    }
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    if !has(CAP_PERFMON) && !sys_admin {
        missing.push("CAP_PERFMON");
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(DatapathError::MissingCapabilities {
            missing: missing.join(", "),
        })
    }
}

/// Fails unless `path` is the root or a directory of a cgroup v2 hierarchy.
pub(crate) fn check_cgroup2(path: &Path) -> Result<(), DatapathError> {
    match statfs_type(path) {
        Ok(CGROUP2_SUPER_MAGIC) => Ok(()),
        Ok(_) => Err(DatapathError::NotCgroup2 {
            path: path.to_owned(),
        }),
        Err(e) => Err(DatapathError::io("statfs", path)(e)),
    }
}

/// The filesystem magic of the mount holding `path`.
pub(crate) fn statfs_type(path: &Path) -> std::io::Result<i64> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: zeroed statfs is a valid out-parameter; `c` is NUL-terminated.
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut buf) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(buf.f_type)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions() {
        assert!(check_kernel("6.18.44-fc-v595").is_ok());
        assert!(check_kernel("5.8.0").is_ok());
        assert!(check_kernel("5.10").is_ok());
        let err = check_kernel("5.4.0-150-generic").unwrap_err();
        assert!(err.to_string().contains("5.4.0-150-generic"), "{err}");
        assert!(check_kernel("garbage").is_err());
        assert!(check_kernel("").is_err());
    }

    #[test]
    fn capabilities() {
        // Root: every bit.
        assert!(check_capabilities("CapEff:\t000001ffffffffff\n").is_ok());
        // CAP_BPF + CAP_NET_ADMIN + CAP_PERFMON only.
        let eff = (1u64 << 39) | (1 << 12) | (1 << 38);
        assert!(check_capabilities(&format!("CapEff:\t{eff:016x}\n")).is_ok());
        // CAP_SYS_ADMIN stands in for BPF and PERFMON, not for NET_ADMIN.
        let eff = 1u64 << 21;
        let err = check_capabilities(&format!("CapEff:\t{eff:016x}\n")).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("missing capabilities CAP_NET_ADMIN:"),
            "{err}"
        );
        // Nothing, or no line at all.
        let err = check_capabilities("Name:\tx\n").unwrap_err();
        assert!(
            err.to_string()
                .contains("CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON"),
            "{err}"
        );
    }

    #[test]
    fn cgroup2_check_rejects_other_filesystems() {
        let err = check_cgroup2(Path::new("/proc")).unwrap_err();
        assert!(matches!(err, DatapathError::NotCgroup2 { .. }), "{err}");
        let err = check_cgroup2(Path::new("/nonexistent/cgroup")).unwrap_err();
        assert!(matches!(err, DatapathError::Io { .. }), "{err}");
    }
}
