//! Library target of the eBPF crate: empty. It exists so the agent can list
//! this crate as a build-dependency and be rebuilt when it changes; the
//! programs are the `exfilguard-probes` binary.
#![no_std]
