//! Types shared by exfilguard's kernel programs and its user-space agent.
//!
//! Every struct here crosses the kernel/user boundary as raw bytes, so each is
//! `#[repr(C)]`, holds no `bool` (any byte other than 0/1 would be undefined
//! behaviour when read back) and has no implicit padding (the kernel hashes and
//! compares keys bytewise: uninitialised padding would split one flow into
//! many). A `const` assertion pins each size so a layout change cannot slip
//! through unnoticed.
#![no_std]

use core::mem::size_of;

/// Names of the maps, as the kernel object declares them and as they are
/// pinned under the bpffs directory.
pub mod map_names {
    /// Per-flow egress counters ([`crate::FlowKey`] → [`crate::FlowValue`]).
    pub const FLOWS: &str = "EG_FLOWS";
    /// CIDRs inside the cluster ([`crate::AddrKey`] LPM trie → `u8`).
    pub const INTERNAL: &str = "EG_INTERNAL";
    /// Blocked cgroups (cgroup id → [`crate::BlockValue`]).
    pub const BLOCKED_CGROUPS: &str = "EG_BLOCK_CG";
    /// Blocked remote CIDRs, global (cgroup 0) and per cgroup ([`crate::BlockCidrKey`]).
    pub const BLOCKED_CIDRS: &str = "EG_BLOCK_NET";
    /// Hard-cap settings per cgroup (cgroup id → [`crate::CapConfig`]).
    pub const CAP_CONFIG: &str = "EG_CAP_CFG";
    /// Hard-cap spending per cgroup and CPU (cgroup id → [`crate::CapUsage`]).
    pub const CAP_USAGE: &str = "EG_CAP_USE";
    /// Events to user space: DNS payloads and cap notices.
    pub const EVENTS: &str = "EG_EVENTS";
    /// Global counters, indexed by [`crate::Stat`].
    pub const STATS: &str = "EG_STATS";
    /// One `u64` of [`crate::active`] flags.
    pub const ACTIVE: &str = "EG_ACTIVE";
}

/// Names of the kernel programs.
pub mod program_names {
    /// `cgroup_skb/egress`: accounting, block, cap, DNS queries.
    pub const EGRESS: &str = "exfilguard_egress";
    /// `cgroup_skb/ingress`: DNS answers, ingress bytes.
    pub const INGRESS: &str = "exfilguard_ingress";
    /// An empty `cgroup_skb` program, the benchmark's baseline; never attached.
    pub const BASELINE: &str = "exfilguard_baseline";
}

/// Capacity of the flow map; least recently used flows are evicted past it.
pub const MAX_FLOWS: u32 = 65_536;
/// Capacity of the internal-CIDR trie.
pub const MAX_INTERNAL_CIDRS: u32 = 4_096;
/// Capacity of the blocked-cgroup map.
pub const MAX_BLOCKED_CGROUPS: u32 = 4_096;
/// Capacity of the blocked-CIDR trie.
pub const MAX_BLOCKED_CIDRS: u32 = 16_384;
/// Capacity of the cap maps.
pub const MAX_CAPS: u32 = 4_096;
/// Size of the event ring buffer in bytes (a power of two, a multiple of the page size).
pub const EVENT_RING_BYTES: u32 = 1 << 22;
/// Most bytes of a DNS payload copied into an event; longer ones are truncated
/// and say so through [`DnsEventHeader::orig_len`].
pub const DNS_MAX_PAYLOAD: usize = 512;
/// Highest CPU index the cap program sums over.
pub const MAX_CPUS: u32 = 256;

/// Address family of a flow's remote end.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// IPv4; the address is stored IPv4-mapped (`::ffff:a.b.c.d`).
    Inet = 4,
    /// IPv6.
    Inet6 = 6,
}

/// IANA protocol numbers the programs distinguish.
pub mod proto {
    /// ICMP.
    pub const ICMP: u8 = 1;
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
    /// ICMPv6.
    pub const ICMPV6: u8 = 58;
}

/// Key of the egress flow map: one entry per (cgroup, remote address, remote
/// port, L4 protocol).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// `bpf_skb_cgroup_id`: the inode number of the sender's cgroup v2 directory.
    pub cgroup_id: u64,
    /// Remote address; IPv4 stored IPv4-mapped so one key shape serves both.
    pub addr: [u8; 16],
    /// Remote port in host byte order (0 for protocols without ports).
    pub port: u16,
    /// L4 protocol number ([`proto`]).
    pub proto: u8,
    /// [`Family`] as a byte.
    pub family: u8,
    /// Explicit padding, always zero.
    pub _pad: [u8; 4],
}
const _: () = assert!(size_of::<FlowKey>() == 32);

/// Per-CPU value of the egress flow map. User space sums bytes and packets and
/// takes the earliest first-seen and latest last-seen across CPUs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowValue {
    /// Bytes as the kernel sees them at `cgroup_skb/egress`: IP header + L4
    /// header + payload, once per GSO super-packet.
    pub bytes: u64,
    /// skbs counted.
    pub packets: u64,
    /// the kernel's coarse monotonic clock, in ns, of the first packet on this CPU.
    pub first_seen_ns: u64,
    /// the kernel's coarse monotonic clock, in ns, of the latest packet on this CPU.
    pub last_seen_ns: u64,
    /// 1 when the remote address is outside every internal CIDR.
    pub external: u8,
    /// Explicit padding, always zero.
    pub _pad: [u8; 7],
}
const _: () = assert!(size_of::<FlowValue>() == 40);

/// Key of the internal-CIDR LPM trie (data part; the trie key adds the prefix
/// length in front). IPv4 CIDRs are stored IPv4-mapped with 96 added to the
/// prefix length.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddrKey {
    /// Address bytes in network order.
    pub addr: [u8; 16],
}
const _: () = assert!(size_of::<AddrKey>() == 16);

/// Key of the blocked-CIDR LPM trie (data part). The cgroup id comes first so a
/// prefix length of 64 + N matches "this cgroup, this N-bit address prefix";
/// cgroup id 0 holds the global blocks.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockCidrKey {
    /// Cgroup id in big-endian byte order (the trie matches bits from the first
    /// byte), or zero for a block that applies to every cgroup.
    pub cgroup_be: [u8; 8],
    /// Address bytes in network order, IPv4-mapped for IPv4.
    pub addr: [u8; 16],
}
const _: () = assert!(size_of::<BlockCidrKey>() == 24);

/// Prefix bits of [`BlockCidrKey::cgroup_be`], always matched exactly.
pub const BLOCK_CGROUP_BITS: u32 = 64;
/// Prefix bits to add to an IPv4 prefix length for its IPv4-mapped form.
pub const V4_MAPPED_BITS: u32 = 96;

/// Value of the blocked-cgroup map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockValue {
    /// When the block was set (`CLOCK_MONOTONIC` ns), for display.
    pub since_ns: u64,
}
const _: () = assert!(size_of::<BlockValue>() == 8);

/// The `EG_CAP_CFG` key of the default cap: the setting of every cgroup
/// without an entry of its own (no cgroup has id 0), so a workload is capped
/// from its first packet, before user space has ever seen it.
pub const DEFAULT_CAP_KEY: u64 = 0;

/// Hard-cap setting of one cgroup: at most `budget_bytes` of external egress
/// per `window_ns`. A `window_ns` of 0 means uncapped.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CapConfig {
    /// Bytes (as counted in [`FlowValue::bytes`]) allowed per window.
    pub budget_bytes: u64,
    /// Window length in ns; windows are aligned to `epoch_ns`.
    pub window_ns: u64,
    /// `CLOCK_MONOTONIC` ns at which the first window starts.
    pub epoch_ns: u64,
    /// Bumped by user space on every change so stale per-CPU spending is
    /// ignored after a reset.
    pub generation: u64,
}
const _: () = assert!(size_of::<CapConfig>() == 32);

/// Per-CPU hard-cap spending of one cgroup. The program sums this over every
/// CPU before letting a packet through: racing CPUs can each let one packet
/// past the budget, never more.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CapUsage {
    /// Window index (`(now - epoch) / window`) these bytes belong to.
    pub window: u64,
    /// [`CapConfig::generation`] these bytes belong to.
    pub generation: u64,
    /// Bytes let through by this CPU in `window`.
    pub bytes: u64,
    /// Bytes dropped by this CPU in `window` because the cap was spent.
    pub dropped_bytes: u64,
    /// Packets dropped by this CPU in `window`.
    pub dropped_packets: u64,
    /// Window (plus one) for which this CPU already sent a cap event; 0 = none.
    pub reported_window: u64,
}
const _: () = assert!(size_of::<CapUsage>() == 48);

/// Indices of the global counters in the stats map.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// Flows inserted into the flow map (evictions = inserted − live entries).
    FlowsInserted = 0,
    /// Flow inserts the kernel refused.
    FlowInsertErrors = 1,
    /// Events that did not fit into the ring buffer.
    RingDrops = 2,
    /// Packets dropped because the cgroup or destination is blocked.
    BlockedPackets = 3,
    /// Bytes of those packets.
    BlockedBytes = 4,
    /// Packets dropped by a hard cap.
    CapDroppedPackets = 5,
    /// Bytes of those packets.
    CapDroppedBytes = 6,
    /// DNS events written to the ring buffer.
    DnsEvents = 7,
    /// Packets whose headers could not be read.
    ParseErrors = 8,
    /// Ingress bytes (all cgroups).
    IngressBytes = 9,
    /// Ingress packets (all cgroups).
    IngressPackets = 10,
}

impl Stat {
    /// Number of stat slots.
    pub const COUNT: u32 = 11;
    /// Every stat, in index order.
    pub const ALL: [Stat; Self::COUNT as usize] = [
        Stat::FlowsInserted,
        Stat::FlowInsertErrors,
        Stat::RingDrops,
        Stat::BlockedPackets,
        Stat::BlockedBytes,
        Stat::CapDroppedPackets,
        Stat::CapDroppedBytes,
        Stat::DnsEvents,
        Stat::ParseErrors,
        Stat::IngressBytes,
        Stat::IngressPackets,
    ];
}

/// Bits of the `EG_ACTIVE` word: which optional maps hold entries. The
/// egress program skips the lookups of an empty map (an LPM trie lookup costs
/// tens of ns even when empty); user space sets a bit after inserting the
/// first entry and clears it after removing the last.
pub mod active {
    /// `EG_BLOCK_CG` has entries.
    pub const BLOCKED_CGROUPS: u64 = 1 << 0;
    /// `EG_BLOCK_NET` has entries.
    pub const BLOCKED_CIDRS: u64 = 1 << 1;
    /// `EG_CAP_CFG` has entries.
    pub const CAPS: u64 = 1 << 2;
    /// `EG_INTERNAL` has entries (without any, every remote is external).
    pub const INTERNAL: u64 = 1 << 3;
}

/// Kind of record in the event ring buffer; the first byte of every record.
pub mod event_kind {
    /// A [`crate::DnsEvent`].
    pub const DNS: u8 = 1;
    /// A [`crate::CapEvent`].
    pub const CAP: u8 = 2;
}

/// Direction of a DNS payload.
pub mod direction {
    /// Sent by the cgroup (a query).
    pub const EGRESS: u8 = 0;
    /// Received by the cgroup (an answer).
    pub const INGRESS: u8 = 1;
}

/// Fixed part of a DNS event.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DnsEventHeader {
    /// [`event_kind::DNS`].
    pub kind: u8,
    /// [`direction`].
    pub direction: u8,
    /// L4 protocol: [`proto::UDP`] or [`proto::TCP`] (TCP payloads keep their
    /// two-byte length prefix, exactly as sent).
    pub proto: u8,
    /// [`Family`] as a byte.
    pub family: u8,
    /// Bytes of `payload` that are valid.
    pub captured_len: u16,
    /// Length of the L4 payload in the packet (more than `captured_len` when truncated).
    pub orig_len: u16,
    /// Sending or receiving cgroup.
    pub cgroup_id: u64,
    /// the kernel's coarse monotonic clock, in ns, when the packet passed.
    pub timestamp_ns: u64,
    /// Address of the DNS server (the packet's remote end), IPv4-mapped for IPv4.
    pub server: [u8; 16],
    /// Port of the DNS server, host byte order.
    pub server_port: u16,
    /// Port of the client socket, host byte order.
    pub client_port: u16,
    /// Explicit padding, always zero.
    pub _pad: [u8; 4],
}
const _: () = assert!(size_of::<DnsEventHeader>() == 48);

/// A DNS payload as copied from a packet.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DnsEvent {
    /// What, where, when.
    pub header: DnsEventHeader,
    /// The first `header.captured_len` bytes of the L4 payload.
    pub payload: [u8; DNS_MAX_PAYLOAD],
}
const _: () = assert!(size_of::<DnsEvent>() == 48 + DNS_MAX_PAYLOAD);

/// Sent once per CPU and window when a cgroup's hard cap is spent.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CapEvent {
    /// [`event_kind::CAP`].
    pub kind: u8,
    /// Explicit padding, always zero.
    pub _pad: [u8; 7],
    /// The capped cgroup.
    pub cgroup_id: u64,
    /// Window index that was spent.
    pub window: u64,
    /// The budget in force.
    pub budget_bytes: u64,
    /// Bytes let through in the window, summed over CPUs when the event was sent.
    pub spent_bytes: u64,
    /// the kernel's coarse monotonic clock, in ns, of the first dropped packet.
    pub timestamp_ns: u64,
}
const _: () = assert!(size_of::<CapEvent>() == 48);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: every type is #[repr(C)], Copy, has no padding and is valid for
    // any bit pattern.
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowValue {}
    unsafe impl aya::Pod for super::AddrKey {}
    unsafe impl aya::Pod for super::BlockCidrKey {}
    unsafe impl aya::Pod for super::BlockValue {}
    unsafe impl aya::Pod for super::CapConfig {}
    unsafe impl aya::Pod for super::CapUsage {}
}
