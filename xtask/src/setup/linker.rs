//! bpf-linker, built against the libLLVM inside nightly's own sysroot.
//!
//! bpf-linker reads the LLVM bitcode rustc writes, so its LLVM must be the one
//! of the rustc that wrote it (Debian's LLVM 14/15 cannot read nightly's).
use std::{
    env, fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use super::{Installed, NIGHTLY, Nightly, elf};
use crate::process;

/// The bpf-linker release that works with aya-ebpf 0.2 and LLVM 22.
const VERSION: &str = "0.13.0";

/// Installs bpf-linker unless the one on PATH is [`VERSION`] and links one of
/// nightly's libLLVM files.
pub fn ensure(nightly: &Nightly, installed: &mut Installed) -> anyhow::Result<()> {
    let llvm_libs = nightly_llvm_libs(&nightly.sysroot)?;
    if is_current(&llvm_libs)? {
        return Ok(());
    }

    let prefix = cargo_home()?.join(format!("bpf-llvm-{}", nightly.llvm_major));
    link_llvm(&prefix.join("lib"), &llvm_libs)?;
    eprintln!(
        "setup: building bpf-linker {VERSION} against {NIGHTLY}'s LLVM {}",
        nightly.llvm_major
    );
    process::run(
        Command::new("cargo")
            .args([&format!("+{NIGHTLY}"), "install", "--locked", "--force"])
            .args(["bpf-linker", "--version", VERSION, "--no-default-features"])
            .args(["--features", &format!("llvm-{}", nightly.llvm_major)])
            .env("LLVM_PREFIX", &prefix),
    )?;
    if !is_current(&llvm_libs)? {
        bail!("bpf-linker {VERSION} was installed but the one on PATH is not it");
    }
    installed.note(format_args!(
        "bpf-linker {VERSION} (LLVM {})",
        nightly.llvm_major
    ));
    Ok(())
}

/// The `libLLVM*.so*` files in nightly's `lib/`.
fn nightly_llvm_libs(sysroot: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let lib = sysroot.join("lib");
    let mut libs = Vec::new();
    for entry in fs::read_dir(&lib).with_context(|| format!("reading {}", lib.display()))? {
        let path = entry
            .with_context(|| format!("reading {}", lib.display()))?
            .path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if name.starts_with("libLLVM") && name.contains(".so") {
            libs.push(path);
        }
    }
    if libs.is_empty() {
        bail!("no libLLVM*.so* in {}", lib.display());
    }
    libs.sort();
    Ok(libs)
}

/// Whether the bpf-linker on PATH runs, is [`VERSION`], and needs one of
/// `llvm_libs` by name: one built against another LLVM, or against an older
/// nightly's, needs another file.
fn is_current(llvm_libs: &[PathBuf]) -> anyhow::Result<bool> {
    let Some(binary) = find_on_path("bpf-linker") else {
        return Ok(false);
    };
    let Ok(output) = Command::new(&binary).arg("--version").output() else {
        return Ok(false);
    };
    let version = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() || version.trim() != format!("bpf-linker {VERSION}") {
        return Ok(false);
    }
    let needed = elf::needed_libraries(&binary)?;
    Ok(llvm_libs.iter().any(|lib| {
        let name = lib.file_name().unwrap_or_default().to_string_lossy();
        needed.iter().any(|needed| *needed == name)
    }))
}

/// Points `dir/<name>` at each of nightly's libLLVM files, plus the unversioned
/// `libLLVM.so` that llvm-sys links with; this is bpf-linker's LLVM_PREFIX.
fn link_llvm(dir: &Path, llvm_libs: &[PathBuf]) -> anyhow::Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let versioned = llvm_libs.iter().find(|lib| {
        lib.file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .starts_with("libLLVM.so.")
    });
    let links = llvm_libs
        .iter()
        .map(|lib| (lib, dir.join(lib.file_name().unwrap_or_default())))
        .chain(versioned.map(|lib| (lib, dir.join("libLLVM.so"))));
    for (target, link) in links {
        // Replaced each time: an older nightly's links would point nowhere.
        if link.symlink_metadata().is_ok() {
            fs::remove_file(&link).with_context(|| format!("removing {}", link.display()))?;
        }
        symlink(target, &link)
            .with_context(|| format!("linking {} to {}", link.display(), target.display()))?;
    }
    Ok(())
}

/// `$CARGO_HOME`, or `~/.cargo`.
fn cargo_home() -> anyhow::Result<PathBuf> {
    if let Some(home) = env::var_os("CARGO_HOME") {
        return Ok(PathBuf::from(home));
    }
    let home = env::var_os("HOME").context("neither CARGO_HOME nor HOME is set")?;
    Ok(Path::new(&home).join(".cargo"))
}

/// The first executable file called `name` in PATH.
fn find_on_path(name: &str) -> Option<PathBuf> {
    env::split_paths(&env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
}
