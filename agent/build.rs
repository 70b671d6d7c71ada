//! Builds the eBPF object (agent-ebpf) for the BPF target with nightly and
//! bpf-linker, so the agent embeds it; `cargo xtask setup` installs both.
use std::path::Path;

use anyhow::Context as _;
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let ebpf_dir = Path::new(&manifest_dir).join("../agent-ebpf");
    let ebpf_dir = ebpf_dir
        .canonicalize()
        .with_context(|| format!("locating {}", ebpf_dir.display()))?;
    let root_dir = ebpf_dir.to_str().context("non-UTF-8 path to agent-ebpf")?;
    aya_build::build_ebpf(
        [Package {
            name: "exfilguard-ebpf",
            root_dir,
            ..Default::default()
        }],
        Toolchain::default(),
    )
    .context("building the eBPF programs; `cargo xtask setup` installs nightly's rust-src and bpf-linker")
}
