//! Pinned BPF links: with pinning on, the programs stay attached while the
//! agent is down (a restart, an upgrade, a crash), so blocks and caps keep
//! being enforced and bytes keep being counted. A restarted agent swaps its
//! freshly loaded program into the pinned link atomically (BPF_LINK_UPDATE):
//! no packet passes unobserved and none is counted twice.
//!
//! aya 0.14 exposes neither link update for cgroup links nor a pinned link's
//! fd, so those two calls are made here directly.
use std::{
    ffi::CString,
    fs::File,
    io,
    os::{
        fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::{Path, PathBuf},
};

use aya::programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, links::FdLink};

use super::DatapathError;

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_UPDATE: libc::c_long = 29;

/// Prefix of link pins; the rest names the program and the cgroup id, so a
/// pin for another cgroup is recognised and not reused.
const LINK_PIN_PREFIX: &str = "link_";

/// Pin path of the link of `program` on the cgroup with id `cgroup_id`.
pub(crate) fn pin_path(pin_dir: &Path, program: &str, cgroup_id: u64) -> PathBuf {
    pin_dir.join(format!("{LINK_PIN_PREFIX}{program}_{cgroup_id}"))
}

/// Attaches `program` to `cgroup` through a pinned link: reuses the pin if it
/// exists (swapping in this program), else attaches and pins. Link pins of
/// this program for other cgroups are removed (detaching them).
pub(crate) fn attach_pinned(
    program: &mut CgroupSkb,
    name: &'static str,
    cgroup: &File,
    cgroup_id: u64,
    attach_type: CgroupSkbAttachType,
    pin_dir: &Path,
) -> Result<bool, DatapathError> {
    let pin = pin_path(pin_dir, name, cgroup_id);
    remove_stale(pin_dir, name, &pin)?;
    let prog_err = |op| {
        move |source| DatapathError::Program {
            op,
            program: name,
            source,
        }
    };
    if pin.exists() {
        let link = obj_get(&pin).map_err(DatapathError::io("open pinned link", &pin))?;
        let prog_fd = program.fd().map_err(prog_err("find"))?;
        link_update(link.as_fd(), prog_fd.as_fd())
            .map_err(DatapathError::io("BPF_LINK_UPDATE", &pin))?;
        return Ok(true);
    }
    let id = program
        .attach(cgroup, attach_type, CgroupAttachMode::Single)
        .map_err(prog_err("attach"))?;
    let link = program.take_link(id).map_err(prog_err("take link"))?;
    let link = FdLink::try_from(link).map_err(|e| DatapathError::Io {
        op: "convert link",
        path: pin.clone(),
        source: io::Error::other(e.to_string()),
    })?;
    // The pin keeps the link (and the program) alive after the fd is closed.
    link.pin(&pin).map_err(|e| DatapathError::Io {
        op: "pin link",
        path: pin.clone(),
        source: io::Error::other(e.to_string()),
    })?;
    Ok(false)
}

fn remove_stale(pin_dir: &Path, program: &str, keep: &Path) -> Result<(), DatapathError> {
    let prefix = format!("{LINK_PIN_PREFIX}{program}_");
    let entries = std::fs::read_dir(pin_dir).map_err(DatapathError::io("list", pin_dir))?;
    for entry in entries.flatten() {
        let path = entry.path();
        let stale = entry.file_name().to_string_lossy().starts_with(&prefix) && path != keep;
        if stale {
            tracing::warn!(pin = %path.display(), "detaching a link pinned for another cgroup");
            std::fs::remove_file(&path).map_err(DatapathError::io("unpin", &path))?;
        }
    }
    Ok(())
}

fn sys_bpf(cmd: libc::c_long, attr: &mut [u8]) -> io::Result<libc::c_long> {
    // SAFETY: attr is a zero-padded bpf_attr prefix of the size passed.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// BPF_OBJ_GET: opens a pinned object.
fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // struct { __aligned_u64 pathname; __u32 bpf_fd; __u32 file_flags; }
    let mut attr = [0u8; 16];
    attr[..8].copy_from_slice(&(c.as_ptr() as u64).to_ne_bytes());
    let fd = sys_bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// BPF_LINK_UPDATE: makes `link` run `prog` instead of its current program.
fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    // struct { __u32 link_fd; __u32 new_prog_fd; __u32 flags; __u32 old_prog_fd; }
    let mut attr = [0u8; 16];
    attr[..4].copy_from_slice(&(link.as_raw_fd() as u32).to_ne_bytes());
    attr[4..8].copy_from_slice(&(prog.as_raw_fd() as u32).to_ne_bytes());
    sys_bpf(BPF_LINK_UPDATE, &mut attr).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_names_carry_program_and_cgroup() {
        let p = pin_path(Path::new("/sys/fs/bpf/exfilguard"), "exfilguard_egress", 42);
        assert_eq!(
            p,
            Path::new("/sys/fs/bpf/exfilguard/link_exfilguard_egress_42")
        );
    }
}
