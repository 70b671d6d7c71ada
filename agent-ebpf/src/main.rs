//! exfilguard's kernel programs: `cgroup_skb` egress and ingress.
//!
//! Egress: drop what is blocked or over its hard cap, count the rest per
//! (cgroup, remote, port, protocol), and copy DNS queries to user space.
//! Ingress: copy DNS answers to user space and count ingress bytes.
//!
//! At `cgroup_skb` the skb starts at the IP header (no L2), and `skb->len` is
//! IP header + L4 header + payload, once per GSO super-packet.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(target_arch = "bpf")]
mod probes;

// A host build of this crate (e.g. `cargo build --workspace`) produces a stub;
// the real object is built for the BPF target by the agent's build.rs.
#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects any program in which this is reachable.
    unsafe { core::hint::unreachable_unchecked() }
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
