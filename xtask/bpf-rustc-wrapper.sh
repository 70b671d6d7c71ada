#!/bin/sh
# RUSTC_WRAPPER used by `cargo xtask` only on machines where nightly has a
# prebuilt `core` for the BPF target instead of rust-src (see
# xtask/src/cargo.rs). There cargo runs with RUSTC_BOOTSTRAP=-1, which is
# meant for one reader only: aya-build, in the agent's build.rs, skips
# `-Z build-std` when it sees that value. For rustc the same value forbids
# every `#![feature]` even on nightly, which breaks aya-ebpf on the BPF target
# and crates such as proc-macro2 that probe for nightly; so every compilation
# runs with RUSTC_BOOTSTRAP unset, as the toolchain's channel decides.
#
# Cargo calls this as: wrapper [workspace-wrapper] rustc ARGS...
unset RUSTC_BOOTSTRAP
exec "$@"
