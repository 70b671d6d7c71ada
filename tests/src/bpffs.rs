//! Private bpffs instances for pinning, one per test.
//!
//! Every `mount -t bpf` creates a separate, empty instance, so a test gets its own pin
//! directory without touching `/sys/fs/bpf` (which may be absent, or be another
//! program's) and without seeing other tests' pins.

use std::{
    env, fs,
    io::ErrorKind,
    path::{Path, PathBuf},
};

use nix::{
    errno::Errno,
    mount::{MntFlags, MsFlags, mount, umount2},
    sys::statfs::{BPF_FS_MAGIC, statfs},
};

use crate::naming::UniqueId;

/// Whether `path` is on a bpf filesystem.
pub fn is_bpffs(path: &Path) -> bool {
    statfs(path).is_ok_and(|s| s.filesystem_type() == BPF_FS_MAGIC)
}

/// A bpffs mounted at `$TMPDIR/eg{pid}x{counter}-bpffs`; unmounted (freeing whatever was
/// pinned in it) and removed on `Drop`.
#[derive(Debug)]
pub struct BpfFs {
    path: PathBuf,
}

impl BpfFs {
    /// Creates the directory and mounts a fresh bpffs instance on it.
    pub fn new() -> Self {
        let path = env::temp_dir().join(format!("{}-bpffs", UniqueId::next().prefix()));
        fs::create_dir(&path)
            .unwrap_or_else(|e| panic!("create bpffs dir {}: {e}", path.display()));
        if let Err(e) = mount(
            Some("bpf"),
            &path,
            Some("bpf"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None::<&str>,
        ) {
            let _ = fs::remove_dir(&path);
            panic!("mount bpffs at {}: {e}", path.display());
        }
        Self { path }
    }

    /// The mount point: pin objects below it.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Default for BpfFs {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        // Report, never panic: a Drop may run while a failed test unwinds.
        match umount2(&self.path, MntFlags::empty()) {
            Ok(()) => {}
            // Someone (an agent under test) still has it open or mounted below: detach
            // lazily so the directory can go; the instance dies with its last user.
            Err(Errno::EBUSY) => {
                if let Err(e) = umount2(&self.path, MntFlags::MNT_DETACH) {
                    eprintln!("lazy unmount bpffs {}: {e}", self.path.display());
                }
            }
            Err(e) => eprintln!("unmount bpffs {}: {e}", self.path.display()),
        }
        match fs::remove_dir(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => eprintln!("remove bpffs dir {}: {e}", self.path.display()),
        }
    }
}
