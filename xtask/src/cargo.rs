//! Cargo invocations that build the agent, set up for how this machine
//! builds `core` for the BPF target.
use std::{path::PathBuf, process::Command};

use crate::setup::CoreSource;

/// The environment child cargo invocations need; produced by `setup`.
#[derive(Debug)]
pub struct BuildEnv {
    /// Where nightly's `core` for the BPF target comes from.
    pub core: CoreSource,
    /// The rustc wrapper used with a prebuilt `core` (see [`BuildEnv::cargo`]).
    pub bpf_rustc_wrapper: PathBuf,
}

impl BuildEnv {
    /// `cargo ARGS…`, with the environment the agent's build.rs needs.
    ///
    /// With rust-src, aya-build's `-Z build-std=core` works and nothing is set.
    /// With the prebuilt `core` that `setup` installs when rustup cannot fetch
    /// rust-src, `-Z build-std` must be skipped, and aya-build skips it only
    /// when it sees `RUSTC_BOOTSTRAP=-1`. To rustc that value forbids every
    /// `#![feature]`, even on nightly (aya-ebpf needs `asm_experimental_arch`
    /// on the BPF target), so a rustc wrapper unsets it for each compilation:
    /// only build scripts, aya-build's among them, see it.
    pub fn cargo<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut cmd = Command::new("cargo");
        cmd.args(args);
        match self.core {
            CoreSource::RustSrc => {}
            CoreSource::Prebuilt => {
                cmd.env("RUSTC_BOOTSTRAP", "-1")
                    .env("RUSTC_WRAPPER", &self.bpf_rustc_wrapper);
            }
        }
        cmd
    }
}
