//! The bpffs directory where maps are pinned so counters, blocks and caps
//! outlive the agent process.
use std::{
    ffi::CString,
    fs,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

use super::{DatapathError, preflight};

/// Makes `dir` usable for pinning: mounts bpffs on its parent mount point if
/// no bpffs is there (these build machines and some nodes do not mount
/// `/sys/fs/bpf`), then creates `dir`.
pub fn ensure_pin_dir(dir: &Path) -> Result<(), DatapathError> {
    let mount_point = dir.parent().unwrap_or(dir);
    fs::create_dir_all(mount_point).map_err(DatapathError::io("create", mount_point))?;
    if preflight::statfs_type(mount_point).map_err(DatapathError::io("statfs", mount_point))?
        != preflight::BPF_FS_MAGIC
    {
        mount_bpffs(mount_point)?;
        tracing::info!(path = %mount_point.display(), "mounted bpffs");
    }
    fs::create_dir_all(dir).map_err(DatapathError::io("create", dir))
}

fn mount_bpffs(at: &Path) -> Result<(), DatapathError> {
    let target = CString::new(at.as_os_str().as_bytes()).map_err(|_| DatapathError::Io {
        op: "mount bpffs",
        path: at.to_owned(),
        source: std::io::ErrorKind::InvalidInput.into(),
    })?;
    // SAFETY: NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(DatapathError::Io {
            op: "mount bpffs",
            path: at.to_owned(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Removes every pin the agent made under `dir`, then `dir` itself. Pins are
/// files; the kernel frees a map when its last pin and fd are gone.
pub fn remove_pins(dir: &Path) -> Result<Vec<PathBuf>, DatapathError> {
    let mut removed = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(DatapathError::io("list", dir)(e)),
    };
    for entry in entries {
        let path = entry.map_err(DatapathError::io("list", dir))?.path();
        fs::remove_file(&path).map_err(DatapathError::io("unpin", &path))?;
        removed.push(path);
    }
    fs::remove_dir(dir).map_err(DatapathError::io("remove", dir))?;
    Ok(removed)
}
