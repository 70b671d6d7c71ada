//! `core` for `bpfel-unknown-none`, which has no prebuilt standard library.
//!
//! Upstream aya builds it with `-Z build-std=core`, which needs nightly's
//! rust-src component. When rustup cannot fetch rust-src (a closed network),
//! the source of `core` is rebuilt from the rustdoc source pages of nightly's
//! rust-docs component ([`super::rustdoc_src`]), compiled once, and installed
//! into nightly's sysroot as a prebuilt target library, with a marker file
//! saying so; [`crate::cargo::BuildEnv`] then sets cargo up to use it.
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

use super::{Installed, NIGHTLY, Nightly, RUSTUP_TIMEOUT, rustdoc_src};
use crate::process;

/// The BPF target aya-build compiles for on little-endian hosts.
const TARGET: &str = "bpfel-unknown-none";

/// Written beside the prebuilt libraries, so only a `core` this code built
/// switches cargo to the prebuilt path. It lives in the toolchain's own
/// sysroot, so a new nightly starts without it.
const MARKER: &str = "exfilguard-prebuilt-core";

/// How many times the `core` build is retried after creating the Markdown
/// files it includes for its docs (the rustdoc pages do not carry them).
const MAX_BUILD_ROUNDS: usize = 5;

/// Where nightly's `core` for the BPF target comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CoreSource {
    /// rust-src is installed: aya-build's `-Z build-std=core` works.
    RustSrc,
    /// A `core` built by [`ensure`] from rust-docs sits in the sysroot.
    Prebuilt,
}

/// Makes sure one of the two sources is present and says which.
pub fn ensure(nightly: &Nightly, installed: &mut Installed) -> anyhow::Result<CoreSource> {
    let rust_src = nightly
        .sysroot
        .join("lib/rustlib/src/rust/library/Cargo.lock");
    if rust_src.is_file() {
        return Ok(CoreSource::RustSrc);
    }
    let target_dir = nightly.sysroot.join("lib/rustlib").join(TARGET);
    let libdir = target_dir.join("lib");
    let marker = target_dir.join(MARKER);
    let prebuilt = ["libcore.rlib", "libcompiler_builtins.rlib"];
    if marker.is_file() && prebuilt.iter().all(|lib| libdir.join(lib).is_file()) {
        return Ok(CoreSource::Prebuilt);
    }

    let mut rustup = Command::new("rustup");
    rustup.args(["component", "add", "rust-src", "--toolchain", NIGHTLY]);
    if process::try_with_timeout(&mut rustup, RUSTUP_TIMEOUT)? && rust_src.is_file() {
        installed.note(format_args!("rust-src for {NIGHTLY}"));
        return Ok(CoreSource::RustSrc);
    }

    eprintln!(
        "setup: `{}` failed or timed out; building `core` for {TARGET} from {NIGHTLY}'s rust-docs",
        process::describe(&rustup)
    );
    let work = TempDir::new("xtask-core")?;
    build_prebuilt(&nightly.sysroot, work.path())?;
    fs::create_dir_all(&libdir).with_context(|| format!("creating {}", libdir.display()))?;
    for lib in prebuilt {
        install_file(&work.path().join("out").join(lib), &libdir.join(lib))?;
    }
    fs::write(
        &marker,
        "core and compiler_builtins in lib/ were built from rust-docs by `cargo xtask setup`\n",
    )
    .with_context(|| format!("writing {}", marker.display()))?;
    installed.note(format_args!(
        "prebuilt core for {TARGET} into {}",
        libdir.display()
    ));
    Ok(CoreSource::Prebuilt)
}

/// Builds `libcore.rlib` and an empty `libcompiler_builtins.rlib` for
/// [`TARGET`] under `work/out`.
fn build_prebuilt(sysroot: &Path, work: &Path) -> anyhow::Result<()> {
    let docs = sysroot.join("share/doc/rust/html/src/core");
    if !docs.is_dir() {
        bail!(
            "neither rust-src nor rust-docs is installed for {NIGHTLY} ({} is missing)",
            docs.display()
        );
    }
    let src = work.join("src");
    let out = work.join("out");
    let written = rustdoc_src::extract(&docs, &src)?;
    eprintln!("setup: rebuilt {written} source files of core from rustdoc pages");

    let rustc = sysroot.join("bin/rustc");
    let lib_rs = src.join("library/core/src/lib.rs");
    let mut round = 0;
    loop {
        round += 1;
        let mut cmd = Command::new(&rustc);
        cmd.args([
            "--crate-name",
            "core",
            "--crate-type",
            "lib",
            "--edition",
            "2024",
        ])
        .args(["--target", TARGET])
        .args(["-C", "opt-level=3", "-C", "panic=abort"])
        .args(["-C", "debug-assertions=off", "-C", "overflow-checks=off"])
        .args(["-Z", "force-unstable-if-unmarked"])
        .arg(&lib_rs)
        .arg("--out-dir")
        .arg(&out)
        .current_dir(work)
        .stdout(Stdio::null());
        let output = cmd
            .output()
            .with_context(|| format!("starting `{}`", process::describe(&cmd)))?;
        if output.status.success() {
            break;
        }
        let stderr = String::from_utf8_lossy(&output.stderr);
        let missing = missing_includes(&stderr);
        if missing.is_empty() || round == MAX_BUILD_ROUNDS {
            bail!("building core failed:\n{stderr}");
        }
        // rustdoc pages hold none of the .md files core pulls in with
        // include_str! for its docs; empty ones change nothing in the code.
        for path in missing {
            let path = work.join(path);
            if let Some(dir) = path.parent() {
                fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            }
            fs::write(&path, "").with_context(|| format!("writing {}", path.display()))?;
        }
    }

    // BPF programs cannot call compiler-rt routines (LLVM rejects such
    // libcalls for BPF) and bpf-linker supplies memcpy/memset/memmove/memcmp,
    // so an empty compiler_builtins is enough.
    let builtins_rs = work.join("compiler_builtins.rs");
    fs::write(
        &builtins_rs,
        "#![feature(compiler_builtins)]\n#![compiler_builtins]\n#![no_builtins]\n#![no_std]\n",
    )
    .with_context(|| format!("writing {}", builtins_rs.display()))?;
    let mut cmd = Command::new(&rustc);
    cmd.args(["--crate-name", "compiler_builtins", "--crate-type", "lib"])
        .args(["--edition", "2021", "--target", TARGET])
        .args(["-C", "opt-level=3", "-C", "panic=abort"])
        .args(["-Z", "force-unstable-if-unmarked"])
        // `#![feature(compiler_builtins)]` is internal, which is the point.
        .args(["-A", "internal_features", "-L"])
        .arg(&out)
        .arg(&builtins_rs)
        .arg("--out-dir")
        .arg(&out);
    process::run(&mut cmd)
}

/// The paths of `.md` files that rustc could not read, from its stderr
/// (``error: couldn't read `PATH`: No such file or directory``).
fn missing_includes(rustc_stderr: &str) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = rustc_stderr
        .split("couldn't read `")
        .skip(1)
        .filter_map(|rest| rest.split_once('`'))
        .map(|(path, _)| path)
        .filter(|path| path.ends_with(".md"))
        .map(PathBuf::from)
        .collect();
    paths.sort();
    paths.dedup();
    paths
}

/// Copies `from` to `to` through a temporary name and a rename, so a reader
/// never sees half a library, and a file hard-linked elsewhere is replaced
/// rather than written through.
fn install_file(from: &Path, to: &Path) -> anyhow::Result<()> {
    let tmp = to.with_extension("xtask-tmp");
    fs::copy(from, &tmp)
        .with_context(|| format!("copying {} to {}", from.display(), tmp.display()))?;
    fs::rename(&tmp, to).with_context(|| format!("renaming {} to {}", tmp.display(), to.display()))
}

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    /// Creates `$TMPDIR/{prefix}-{pid}`, emptied first if a crashed run left it.
    fn new(prefix: &str) -> anyhow::Result<Self> {
        let path = std::env::temp_dir().join(format!("{prefix}-{}", std::process::id()));
        if path.exists() {
            fs::remove_dir_all(&path).with_context(|| format!("removing {}", path.display()))?;
        }
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.0) {
            eprintln!("setup: could not remove {}: {e}", self.0.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::missing_includes;

    #[test]
    fn missing_markdown_includes_are_found_once_each() {
        let stderr = "\
error: couldn't read `/tmp/w/src/library/core/src/../../stdarch/crates/core_arch/src/core_arch_docs.md`: No such file or directory (os error 2)
  --> /tmp/w/src/library/core/src/lib.rs:300:5
error: couldn't read `/tmp/w/src/library/core/src/primitive_docs/char.md`: No such file or directory (os error 2)
error: couldn't read `/tmp/w/src/library/core/src/primitive_docs/char.md`: No such file or directory (os error 2)
error: couldn't read `/tmp/w/src/library/core/src/data.bin`: No such file or directory (os error 2)
error: aborting due to 3 previous errors
";
        assert_eq!(
            missing_includes(stderr),
            [
                PathBuf::from(
                    "/tmp/w/src/library/core/src/../../stdarch/crates/core_arch/src/core_arch_docs.md"
                ),
                PathBuf::from("/tmp/w/src/library/core/src/primitive_docs/char.md"),
            ]
        );
    }

    #[test]
    fn other_errors_give_no_includes() {
        assert!(missing_includes("error[E0425]: cannot find value `x`\n").is_empty());
    }
}
