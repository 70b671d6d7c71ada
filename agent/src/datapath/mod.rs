//! The kernel side of the agent: loads the embedded eBPF object, attaches it
//! to a cgroup v2 directory, and gives typed access to its maps: flow
//! counters, internal CIDRs, blocks, hard caps, events and stats.
pub mod bpffs;
pub mod events;
mod links;
pub mod preflight;

use std::{
    collections::HashSet,
    fs::File,
    net::IpAddr,
    os::fd::{AsFd as _, BorrowedFd},
    path::{Path, PathBuf},
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, LpmTrie, MapData, MapError, PerCpuArray, PerCpuHashMap, PerCpuValues,
        RingBuf,
    },
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, ProgramError, TestRun as _,
        TestRunOptions,
    },
};
use exfilguard_common::{
    AddrKey, BlockCidrKey, BlockValue, CapConfig, CapUsage, DEFAULT_CAP_KEY, FlowKey, FlowValue,
    Stat, active, map_names, program_names,
};

use crate::{
    cidr::{self, IpNet},
    clock,
};
pub use events::{CapNotice, DnsDirection, DnsRecord, Event, EventError};

/// The eBPF object, built by build.rs for the BPF target and embedded so the
/// agent is one self-contained binary.
static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/exfilguard-probes"));

/// Default pin directory on bpffs.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/exfilguard";

/// Every map the agent pins, with the key and value sizes this build expects
/// (a pin left by another build with another layout must not be reused).
const PINNED_MAPS: [(&str, usize, usize); 9] = [
    (
        map_names::FLOWS,
        size_of::<FlowKey>(),
        size_of::<FlowValue>(),
    ),
    (map_names::INTERNAL, 4 + size_of::<AddrKey>(), 1),
    (map_names::BLOCKED_CGROUPS, 8, size_of::<BlockValue>()),
    (map_names::BLOCKED_CIDRS, 4 + size_of::<BlockCidrKey>(), 1),
    (map_names::CAP_CONFIG, 8, size_of::<CapConfig>()),
    (map_names::CAP_USAGE, 8, size_of::<CapUsage>()),
    (map_names::EVENTS, 0, 0),
    (map_names::STATS, 4, 8),
    (map_names::ACTIVE, 4, 8),
];

/// Errors of the kernel side, each saying what is wrong and what to do.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// The kernel is too old.
    #[error(
        "kernel {release} is not supported: exfilguard needs Linux 5.8 or newer (cgroup BPF links, ring buffers)"
    )]
    UnsupportedKernel {
        /// `uname -r`.
        release: String,
    },
    /// No kernel BTF.
    #[error(
        "the kernel exposes no BTF (/sys/kernel/btf/vmlinux is missing): use a kernel built with CONFIG_DEBUG_INFO_BTF=y"
    )]
    MissingBtf,
    /// Not a cgroup v2 directory.
    #[error(
        "{path} is not a cgroup v2 directory: point --cgroup at the cgroup2 mount (`/sys/fs/cgroup` on Kubernetes nodes, `findmnt -t cgroup2` shows it)"
    )]
    NotCgroup2 {
        /// The configured path.
        path: PathBuf,
    },
    /// Missing capabilities.
    #[error(
        "missing capabilities {missing}: run as root or grant CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON"
    )]
    MissingCapabilities {
        /// Comma-separated capability names.
        missing: String,
    },
    /// A pinned map from another build with another layout.
    #[error(
        "pinned map {path} has key/value size {found:?}, this agent expects {expected:?}: it was left by another version; run `exfilguard-agent cleanup` to remove the old pins"
    )]
    IncompatiblePin {
        /// The pin.
        path: PathBuf,
        /// Key and value size found.
        found: (u32, u32),
        /// Key and value size expected.
        expected: (u32, u32),
    },
    /// A file-system operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// The kernel refused the object (verifier, map creation).
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    /// A program could not be loaded or attached.
    #[error("{op} program {program}: {source}")]
    Program {
        /// load or attach.
        op: &'static str,
        /// Program name.
        program: &'static str,
        /// Why.
        #[source]
        source: ProgramError,
    },
    /// The object lacks a map or program this build expects.
    #[error("the eBPF object has no {what} named {name}")]
    Missing {
        /// "map" or "program".
        what: &'static str,
        /// Its name.
        name: &'static str,
    },
    /// A map operation failed.
    #[error("{op} on map {map}: {source}")]
    Map {
        /// What was being done.
        op: &'static str,
        /// Which map.
        map: &'static str,
        /// Why.
        #[source]
        source: MapError,
    },
}

impl DatapathError {
    fn map(op: &'static str, map: &'static str) -> impl FnOnce(MapError) -> Self {
        move |source| Self::Map { op, map, source }
    }

    fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.to_owned();
        move |source| Self::Io { op, path, source }
    }
}

/// Where to attach and whether to pin.
#[derive(Clone, Debug)]
pub struct DatapathConfig {
    /// cgroup v2 directory the programs attach to (every cgroup below it is covered).
    pub cgroup_path: PathBuf,
    /// bpffs directory for pinned maps and links; `None` keeps nothing after exit.
    pub pin_dir: Option<PathBuf>,
}

/// Identity of a flow: who sent to where.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowId {
    /// Sending cgroup (inode of its cgroup v2 directory).
    pub cgroup_id: u64,
    /// Remote address.
    pub remote: IpAddr,
    /// Remote port (0 for protocols without ports).
    pub port: u16,
    /// IANA protocol number.
    pub proto: u8,
}

/// Counters of one flow, summed over CPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowCounters {
    /// Bytes at IP level (IP + L4 headers + payload).
    pub bytes: u64,
    /// skbs (GSO super-packets count once).
    pub packets: u64,
    /// `CLOCK_MONOTONIC` ns of the first packet.
    pub first_seen_ns: u64,
    /// `CLOCK_MONOTONIC` ns of the latest packet.
    pub last_seen_ns: u64,
    /// Remote address outside every internal CIDR.
    pub external: bool,
}

/// The kernel's global counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelStats {
    /// Flows inserted into the flow map since it was created.
    pub flows_inserted: u64,
    /// Flow inserts the kernel refused.
    pub flow_insert_errors: u64,
    /// Events lost because the ring buffer was full.
    pub ring_drops: u64,
    /// Egress packets dropped by a block.
    pub blocked_packets: u64,
    /// Their bytes.
    pub blocked_bytes: u64,
    /// Egress packets dropped by a hard cap.
    pub cap_dropped_packets: u64,
    /// Their bytes.
    pub cap_dropped_bytes: u64,
    /// DNS payloads captured.
    pub dns_events: u64,
    /// Packets whose headers could not be read.
    pub parse_errors: u64,
    /// Ingress bytes, all cgroups.
    pub ingress_bytes: u64,
    /// Ingress packets, all cgroups.
    pub ingress_packets: u64,
}

/// A cgroup's hard cap and what it has spent in the current window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CapStatus {
    /// Bytes allowed per window.
    pub budget_bytes: u64,
    /// Window length.
    pub window: Duration,
    /// Bytes let through in the current window.
    pub spent_bytes: u64,
    /// Bytes dropped in the current window.
    pub dropped_bytes: u64,
    /// Packets dropped in the current window.
    pub dropped_packets: u64,
}

/// Run time of one kernel program (needs `kernel.bpf_stats_enabled` or
/// [`Datapath::enable_run_time_stats`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProgramRunStats {
    /// Program name.
    pub name: &'static str,
    /// Total run time.
    pub run_time: Duration,
    /// Runs.
    pub run_count: u64,
}

/// Programs [`Datapath::test_run`] can run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TestProgram {
    /// The egress program, with its maps.
    Egress,
    /// An empty program: the cost of BPF_PROG_TEST_RUN itself.
    Baseline,
}

/// The loaded and attached programs and their maps. Without a pin directory,
/// dropping it detaches the programs and frees the maps. With one, programs
/// and maps stay in the kernel (enforcing and counting) until
/// [`bpffs::remove_pins`] removes the pins.
pub struct Datapath {
    ebpf: Ebpf,
    flows: PerCpuHashMap<MapData, FlowKey, FlowValue>,
    internal: LpmTrie<MapData, AddrKey, u8>,
    blocked_cgroups: HashMap<MapData, u64, BlockValue>,
    blocked_cidrs: LpmTrie<MapData, BlockCidrKey, u8>,
    cap_config: HashMap<MapData, u64, CapConfig>,
    cap_usage: PerCpuHashMap<MapData, u64, CapUsage>,
    events: RingBuf<MapData>,
    stats: PerCpuArray<MapData, u64>,
    active: Array<MapData, u64>,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    reused_pins: bool,
    nr_cpus: usize,
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, DatapathError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(DatapathError::Missing { what: "map", name })?;
    T::try_from(map).map_err(DatapathError::map("open", name))
}

impl Datapath {
    /// Checks the machine, loads the programs (reusing pinned maps when
    /// present) and attaches them to `config.cgroup_path`. On any error
    /// nothing stays attached.
    pub fn load(config: &DatapathConfig) -> Result<Self, DatapathError> {
        let DatapathConfig {
            cgroup_path,
            pin_dir,
        } = config;
        preflight::check(cgroup_path)?;

        let mut loader = EbpfLoader::new();
        let mut reused_pins = false;
        let pin_paths: Vec<(&'static str, PathBuf)>;
        if let Some(dir) = pin_dir {
            bpffs::ensure_pin_dir(dir)?;
            pin_paths = PINNED_MAPS
                .iter()
                .map(|(name, _, _)| (*name, dir.join(name)))
                .collect();
            for ((name, key, value), (_, path)) in PINNED_MAPS.iter().zip(&pin_paths) {
                if *name == map_names::CAP_USAGE {
                    replace_old_cap_usage(path)?;
                }
                reused_pins |= check_pin(path, *key, *value)?;
                loader.map_pin_path(name, path.as_path());
            }
        }
        let mut ebpf = loader.load(EBPF_OBJECT)?;

        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => Some(logger),
            Err(e) => {
                tracing::warn!(error = %e, "kernel log records will not be forwarded");
                None
            }
        };

        let cgroup = File::open(cgroup_path).map_err(DatapathError::io("open", cgroup_path))?;
        let cgroup_id = cgroup_id(cgroup_path).map_err(DatapathError::io("stat", cgroup_path))?;
        let mut reattached = false;
        let mut created_links = Vec::new();
        for (name, attach_type) in [
            (program_names::EGRESS, CgroupSkbAttachType::Egress),
            (program_names::INGRESS, CgroupSkbAttachType::Ingress),
        ] {
            let program: &mut CgroupSkb = ebpf
                .program_mut(name)
                .ok_or(DatapathError::Missing {
                    what: "program",
                    name,
                })?
                .try_into()
                .map_err(|source| DatapathError::Program {
                    op: "find",
                    program: name,
                    source,
                })?;
            program.load().map_err(|source| DatapathError::Program {
                op: "load",
                program: name,
                source,
            })?;
            match pin_dir {
                Some(dir) => {
                    match links::attach_pinned(program, name, &cgroup, cgroup_id, attach_type, dir)
                    {
                        Ok(again) => {
                            reattached |= again;
                            if !again {
                                created_links.push(links::pin_path(dir, name, cgroup_id));
                            }
                        }
                        Err(e) => {
                            // Leave nothing half-attached: unpinning detaches.
                            for pin in &created_links {
                                let _ = std::fs::remove_file(pin);
                            }
                            return Err(e);
                        }
                    }
                }
                // A BPF link takes no attach flags (the kernel answers EINVAL)
                // and always runs beside other programs on the cgroup, a CNI's
                // say. Owned by `ebpf`: detached when the Datapath is dropped.
                None => {
                    program
                        .attach(&cgroup, attach_type, CgroupAttachMode::Single)
                        .map_err(|source| DatapathError::Program {
                            op: "attach",
                            program: name,
                            source,
                        })?;
                }
            }
        }

        let nr_cpus = aya::util::nr_cpus().map_err(|(path, source)| DatapathError::Io {
            op: "read",
            path: PathBuf::from(path),
            source,
        })?;
        let mut datapath = Self {
            flows: take(&mut ebpf, map_names::FLOWS)?,
            internal: take(&mut ebpf, map_names::INTERNAL)?,
            blocked_cgroups: take(&mut ebpf, map_names::BLOCKED_CGROUPS)?,
            blocked_cidrs: take(&mut ebpf, map_names::BLOCKED_CIDRS)?,
            cap_config: take(&mut ebpf, map_names::CAP_CONFIG)?,
            cap_usage: take(&mut ebpf, map_names::CAP_USAGE)?,
            events: take(&mut ebpf, map_names::EVENTS)?,
            stats: take(&mut ebpf, map_names::STATS)?,
            active: take(&mut ebpf, map_names::ACTIVE)?,
            ebpf,
            logger,
            reused_pins,
            nr_cpus,
        };
        datapath.refresh_active()?;
        tracing::info!(
            cgroup = %cgroup_path.display(),
            pinned = ?pin_dir,
            reused_pins,
            reattached,
            "eBPF programs attached"
        );
        Ok(datapath)
    }

    /// Tells the kernel which optional maps hold entries, so it skips the
    /// lookups of empty ones. Called after every change to those maps.
    fn refresh_active(&mut self) -> Result<(), DatapathError> {
        let mut word = 0;
        if self.blocked_cgroups.keys().next().is_some() {
            word |= active::BLOCKED_CGROUPS;
        }
        if self.blocked_cidrs.keys().next().is_some() {
            word |= active::BLOCKED_CIDRS;
        }
        if self.cap_config.keys().next().is_some() {
            word |= active::CAPS;
        }
        if self.internal.keys().next().is_some() {
            word |= active::INTERNAL;
        }
        self.active
            .set(0, word, 0)
            .map_err(DatapathError::map("update", map_names::ACTIVE))
    }

    /// Whether the maps were found pinned by an earlier run (counters,
    /// blocks and caps carried over).
    pub fn reused_pins(&self) -> bool {
        self.reused_pins
    }

    /// Every flow in the map, counters summed over CPUs.
    pub fn flows(&self) -> Result<Vec<(FlowId, FlowCounters)>, DatapathError> {
        let mut out = Vec::new();
        for entry in self.flows.iter() {
            let (key, values) = entry.map_err(DatapathError::map("iterate", map_names::FLOWS))?;
            out.push((flow_id(&key), sum_flow(&values)));
        }
        Ok(out)
    }

    /// Counters of one flow, if present.
    pub fn flow(&self, id: &FlowId) -> Result<Option<FlowCounters>, DatapathError> {
        let key = flow_key(id);
        match self.flows.get(&key, 0) {
            Ok(values) => Ok(Some(sum_flow(&values))),
            Err(e) if not_found(&e) => Ok(None),
            Err(e) => Err(DatapathError::map("read", map_names::FLOWS)(e)),
        }
    }

    /// The kernel's global counters.
    pub fn stats(&self) -> Result<KernelStats, DatapathError> {
        let mut v = [0u64; Stat::COUNT as usize];
        for stat in Stat::ALL {
            let per_cpu = self
                .stats
                .get(&(stat as u32), 0)
                .map_err(DatapathError::map("read", map_names::STATS))?;
            v[stat as usize] = per_cpu.iter().sum();
        }
        Ok(KernelStats {
            flows_inserted: v[Stat::FlowsInserted as usize],
            flow_insert_errors: v[Stat::FlowInsertErrors as usize],
            ring_drops: v[Stat::RingDrops as usize],
            blocked_packets: v[Stat::BlockedPackets as usize],
            blocked_bytes: v[Stat::BlockedBytes as usize],
            cap_dropped_packets: v[Stat::CapDroppedPackets as usize],
            cap_dropped_bytes: v[Stat::CapDroppedBytes as usize],
            dns_events: v[Stat::DnsEvents as usize],
            parse_errors: v[Stat::ParseErrors as usize],
            ingress_bytes: v[Stat::IngressBytes as usize],
            ingress_packets: v[Stat::IngressPackets as usize],
        })
    }

    /// Replaces the internal CIDRs (cluster pod/service/node ranges and
    /// allowlisted destinations); traffic to anything else is external.
    pub fn set_internal_cidrs(&mut self, cidrs: &[IpNet]) -> Result<(), DatapathError> {
        let wanted: HashSet<IpNet> = cidrs.iter().map(IpNet::trunc).collect();
        let present: HashSet<IpNet> = self.internal_cidrs()?.into_iter().collect();
        for net in present.difference(&wanted) {
            self.internal
                .remove(&cidr::internal_key(*net))
                .map_err(DatapathError::map("remove", map_names::INTERNAL))?;
        }
        for net in wanted.difference(&present) {
            self.internal
                .insert(&cidr::internal_key(*net), 1, 0)
                .map_err(DatapathError::map("insert", map_names::INTERNAL))?;
        }
        self.refresh_active()
    }

    /// The internal CIDRs now in force.
    pub fn internal_cidrs(&self) -> Result<Vec<IpNet>, DatapathError> {
        let mut out = Vec::new();
        for key in self.internal.keys() {
            let key = key.map_err(DatapathError::map("iterate", map_names::INTERNAL))?;
            out.extend(cidr::net_from_mapped(key.prefix_len(), key.data().addr));
        }
        Ok(out)
    }

    /// Drops every egress packet of `cgroup_id`, established connections too.
    pub fn block_cgroup(&mut self, cgroup_id: u64) -> Result<(), DatapathError> {
        let value = BlockValue {
            since_ns: clock::kernel_now_ns(),
        };
        self.blocked_cgroups
            .insert(cgroup_id, value, 0)
            .map_err(DatapathError::map("insert", map_names::BLOCKED_CGROUPS))?;
        self.refresh_active()
    }

    /// Lifts a cgroup block; true if there was one.
    pub fn unblock_cgroup(&mut self, cgroup_id: u64) -> Result<bool, DatapathError> {
        let existed = match self.blocked_cgroups.remove(&cgroup_id) {
            Ok(()) => true,
            Err(e) if not_found(&e) => false,
            Err(e) => return Err(DatapathError::map("remove", map_names::BLOCKED_CGROUPS)(e)),
        };
        self.refresh_active()?;
        Ok(existed)
    }

    /// The blocked cgroups.
    pub fn blocked_cgroups(&self) -> Result<Vec<u64>, DatapathError> {
        self.blocked_cgroups
            .keys()
            .collect::<Result<_, _>>()
            .map_err(DatapathError::map("iterate", map_names::BLOCKED_CGROUPS))
    }

    /// Drops egress to `net` from one cgroup, or from every cgroup (`None`).
    pub fn block_cidr(&mut self, cgroup_id: Option<u64>, net: IpNet) -> Result<(), DatapathError> {
        self.blocked_cidrs
            .insert(&cidr::block_key(cgroup_id, net), 1, 0)
            .map_err(DatapathError::map("insert", map_names::BLOCKED_CIDRS))?;
        self.refresh_active()
    }

    /// Lifts a CIDR block; true if there was one.
    pub fn unblock_cidr(
        &mut self,
        cgroup_id: Option<u64>,
        net: IpNet,
    ) -> Result<bool, DatapathError> {
        let existed = match self.blocked_cidrs.remove(&cidr::block_key(cgroup_id, net)) {
            Ok(()) => true,
            Err(e) if not_found(&e) => false,
            Err(e) => return Err(DatapathError::map("remove", map_names::BLOCKED_CIDRS)(e)),
        };
        self.refresh_active()?;
        Ok(existed)
    }

    /// Sets (or replaces) a hard cap: at most `budget_bytes` of external
    /// egress per `window`, counted from now. Spending starts from zero.
    pub fn set_cap(
        &mut self,
        cgroup_id: u64,
        budget_bytes: u64,
        window: Duration,
    ) -> Result<(), DatapathError> {
        let generation = match self.cap_config.get(&cgroup_id, 0) {
            Ok(old) => old.generation.wrapping_add(1),
            Err(e) if not_found(&e) => 1,
            Err(e) => return Err(DatapathError::map("read", map_names::CAP_CONFIG)(e)),
        };
        // A window of zero would disable the cap in the kernel; clamp to 1 ns.
        let window_ns = u64::try_from(window.as_nanos()).unwrap_or(u64::MAX).max(1);
        let config = CapConfig {
            budget_bytes,
            window_ns,
            epoch_ns: clock::kernel_now_ns(),
            generation,
        };
        // Usage first, so the kernel never sees a config whose slots are stale.
        let zero = CapUsage {
            generation,
            ..CapUsage::default()
        };
        let values = PerCpuValues::try_from(vec![zero; self.nr_cpus]).map_err(|source| {
            DatapathError::Io {
                op: "size per-CPU values",
                path: PathBuf::from("/sys/devices/system/cpu/possible"),
                source,
            }
        })?;
        self.cap_usage
            .insert(cgroup_id, values, 0)
            .map_err(DatapathError::map("insert", map_names::CAP_USAGE))?;
        self.cap_config
            .insert(cgroup_id, config, 0)
            .map_err(DatapathError::map("insert", map_names::CAP_CONFIG))?;
        self.refresh_active()
    }

    /// Sets the default cap: every cgroup without a cap of its own may send
    /// at most `budget_bytes` of external egress per `window`, each cgroup
    /// spending its own budget, from its first packet on.
    pub fn set_default_cap(
        &mut self,
        budget_bytes: u64,
        window: Duration,
    ) -> Result<(), DatapathError> {
        self.set_cap(DEFAULT_CAP_KEY, budget_bytes, window)
    }

    /// Removes the default cap; true if there was one.
    pub fn clear_default_cap(&mut self) -> Result<bool, DatapathError> {
        self.clear_cap(DEFAULT_CAP_KEY)
    }

    /// Removes a hard cap; true if there was one.
    pub fn clear_cap(&mut self, cgroup_id: u64) -> Result<bool, DatapathError> {
        let existed = match self.cap_config.remove(&cgroup_id) {
            Ok(()) => true,
            Err(e) if not_found(&e) => false,
            Err(e) => return Err(DatapathError::map("remove", map_names::CAP_CONFIG)(e)),
        };
        match self.cap_usage.remove(&cgroup_id) {
            Ok(()) => {}
            Err(e) if not_found(&e) => {}
            Err(e) => return Err(DatapathError::map("remove", map_names::CAP_USAGE)(e)),
        }
        self.refresh_active()?;
        Ok(existed)
    }

    /// A cgroup's cap (its own, else the default) and its spending in the
    /// current window.
    pub fn cap_status(&self, cgroup_id: u64) -> Result<Option<CapStatus>, DatapathError> {
        let mut config = None;
        for key in [cgroup_id, DEFAULT_CAP_KEY] {
            match self.cap_config.get(&key, 0) {
                Ok(c) => {
                    config = Some(c);
                    break;
                }
                Err(e) if not_found(&e) => {}
                Err(e) => return Err(DatapathError::map("read", map_names::CAP_CONFIG)(e)),
            }
        }
        let Some(config) = config.filter(|c| c.window_ns > 0) else {
            return Ok(None);
        };
        let window = clock::kernel_now_ns().saturating_sub(config.epoch_ns) / config.window_ns;
        let mut status = CapStatus {
            budget_bytes: config.budget_bytes,
            window: Duration::from_nanos(config.window_ns),
            spent_bytes: 0,
            dropped_bytes: 0,
            dropped_packets: 0,
        };
        match self.cap_usage.get(&cgroup_id, 0) {
            Ok(values) => {
                for u in values
                    .iter()
                    .filter(|u| u.window == window && u.generation == config.generation)
                {
                    status.spent_bytes += u.bytes;
                    status.dropped_bytes += u.dropped_bytes;
                    status.dropped_packets += u.dropped_packets;
                }
            }
            Err(e) if not_found(&e) => {}
            Err(e) => return Err(DatapathError::map("read", map_names::CAP_USAGE)(e)),
        }
        Ok(Some(status))
    }

    /// Takes up to `max` records from the event ring buffer. A malformed
    /// record is returned as an error and does not stop the others.
    pub fn drain_events(&mut self, max: usize) -> Vec<Result<Event, EventError>> {
        let mut out = Vec::new();
        while out.len() < max {
            let Some(item) = self.events.next() else {
                break;
            };
            out.push(events::parse(&item));
        }
        out
    }

    /// The event ring buffer's fd, to wait on with epoll / `AsyncFd`.
    pub fn events_fd(&self) -> BorrowedFd<'_> {
        self.events.as_fd()
    }

    /// The kernel log ring buffer's fd, if log forwarding is on.
    pub fn log_fd(&self) -> Option<BorrowedFd<'_>> {
        self.logger.as_ref().map(|l| l.as_fd())
    }

    /// Forwards pending kernel log records to `tracing`.
    pub fn flush_logs(&mut self) {
        if let Some(logger) = &mut self.logger {
            logger.flush();
        }
    }

    /// Turns on the kernel's run-time accounting for BPF programs while the
    /// returned fd is open.
    pub fn enable_run_time_stats() -> Result<std::os::fd::OwnedFd, DatapathError> {
        aya::sys::enable_stats(aya::sys::Stats::RunTime).map_err(|e| DatapathError::Io {
            op: "BPF_ENABLE_STATS",
            path: PathBuf::from("bpf()"),
            source: e.io_error,
        })
    }

    /// Run time and run count of each program.
    pub fn program_stats(&self) -> Result<Vec<ProgramRunStats>, DatapathError> {
        let mut out = Vec::new();
        for name in [program_names::EGRESS, program_names::INGRESS] {
            let program = self.ebpf.program(name).ok_or(DatapathError::Missing {
                what: "program",
                name,
            })?;
            let info = program.info().map_err(|source| DatapathError::Program {
                op: "query",
                program: name,
                source,
            })?;
            out.push(ProgramRunStats {
                name,
                run_time: info.run_time(),
                run_count: info.run_count(),
            });
        }
        Ok(out)
    }

    /// Runs a program once per `repeat` on `packet` (an Ethernet frame; the
    /// kernel strips the L2 header for cgroup programs) with
    /// BPF_PROG_TEST_RUN, and returns the program's verdict and the kernel's
    /// mean time per run. The egress program updates the real maps.
    pub fn test_run(
        &mut self,
        program: TestProgram,
        packet: &[u8],
        repeat: u32,
    ) -> Result<aya::programs::TestRunResult, DatapathError> {
        let name = match program {
            TestProgram::Egress => program_names::EGRESS,
            TestProgram::Baseline => program_names::BASELINE,
        };
        let prog: &mut CgroupSkb = self
            .ebpf
            .program_mut(name)
            .ok_or(DatapathError::Missing {
                what: "program",
                name,
            })?
            .try_into()
            .map_err(|source| DatapathError::Program {
                op: "find",
                program: name,
                source,
            })?;
        if prog.fd().is_err() {
            prog.load().map_err(|source| DatapathError::Program {
                op: "load",
                program: name,
                source,
            })?;
        }
        let opts = TestRunOptions {
            data_in: Some(packet),
            repeat,
            ..TestRunOptions::default()
        };
        prog.test_run(opts)
            .map_err(|source| DatapathError::Program {
                op: "test-run",
                program: name,
                source,
            })
    }

    /// Number of flows now in the flow map; with [`KernelStats::flows_inserted`]
    /// this gives the LRU evictions.
    pub fn flow_count(&self) -> Result<u64, DatapathError> {
        let mut n = 0;
        for key in self.flows.keys() {
            key.map_err(DatapathError::map("iterate", map_names::FLOWS))?;
            n += 1;
        }
        Ok(n)
    }
}

/// aya reports a missing key as `KeyNotFound` from lookups but as a raw
/// ENOENT from deletes; both mean "not there".
fn not_found(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound => true,
        MapError::SyscallError(s) => s.io_error.kind() == std::io::ErrorKind::NotFound,
        _ => false,
    }
}

/// Returns true if `path` is an existing pin with the expected layout, false
/// if there is none, and an error if it has another layout.
fn check_pin(path: &Path, key: usize, value: usize) -> Result<bool, DatapathError> {
    if !path.exists() {
        return Ok(false);
    }
    let info = aya::maps::MapInfo::from_pin(path).map_err(|source| DatapathError::Map {
        op: "inspect pin",
        map: "pinned",
        source,
    })?;
    // Ring buffers have no key or value; their size is fixed by the object.
    if key == 0 && value == 0 {
        return Ok(true);
    }
    let found = (info.key_size(), info.value_size());
    let expected = (key as u32, value as u32);
    if found != expected {
        return Err(DatapathError::IncompatiblePin {
            path: path.to_owned(),
            found,
            expected,
        });
    }
    Ok(true)
}

/// Agents before the default cap pinned the cap spending map as a plain
/// per-CPU hash; it is now an LRU one (a slot for every sending cgroup).
/// Spending is only the current window's, so an old pin is dropped and the
/// map made anew rather than refusing to start.
fn replace_old_cap_usage(path: &Path) -> Result<(), DatapathError> {
    if !path.exists() {
        return Ok(());
    }
    let info = aya::maps::MapInfo::from_pin(path).map_err(|source| DatapathError::Map {
        op: "inspect pin",
        map: map_names::CAP_USAGE,
        source,
    })?;
    if !matches!(info.map_type(), Ok(aya::maps::MapType::LruPerCpuHash)) {
        tracing::warn!(path = %path.display(), "replacing the pinned cap spending map of an older agent; spending restarts in this window");
        std::fs::remove_file(path).map_err(DatapathError::io("unpin", path))?;
    }
    Ok(())
}

fn flow_id(key: &FlowKey) -> FlowId {
    FlowId {
        cgroup_id: key.cgroup_id,
        remote: cidr::addr_from_bytes(key.addr),
        port: key.port,
        proto: key.proto,
    }
}

fn flow_key(id: &FlowId) -> FlowKey {
    FlowKey {
        cgroup_id: id.cgroup_id,
        addr: cidr::addr_bytes(id.remote),
        port: id.port,
        proto: id.proto,
        family: match id.remote {
            IpAddr::V4(_) => exfilguard_common::Family::Inet as u8,
            IpAddr::V6(_) => exfilguard_common::Family::Inet6 as u8,
        },
        _pad: [0; 4],
    }
}

/// Sums per-CPU slots: bytes and packets add up; first-seen is the earliest
/// non-zero stamp (a CPU that never saw the flow has zeros), last-seen the
/// latest. Internal/external is what the CPU that saw the latest packet
/// decided: another CPU's slot may predate a policy change (on a tie, external).
fn sum_flow(values: &[FlowValue]) -> FlowCounters {
    let mut c = FlowCounters {
        bytes: 0,
        packets: 0,
        first_seen_ns: 0,
        last_seen_ns: 0,
        external: false,
    };
    for v in values {
        c.bytes += v.bytes;
        c.packets += v.packets;
        if v.first_seen_ns != 0 && (c.first_seen_ns == 0 || v.first_seen_ns < c.first_seen_ns) {
            c.first_seen_ns = v.first_seen_ns;
        }
        if v.packets > 0
            && (v.last_seen_ns > c.last_seen_ns
                || (v.last_seen_ns == c.last_seen_ns && v.external != 0))
        {
            c.external = v.external != 0;
        }
        c.last_seen_ns = c.last_seen_ns.max(v.last_seen_ns);
    }
    c
}

/// Inode number of a cgroup v2 directory: what `bpf_skb_cgroup_id` reports
/// for sockets in it.
pub fn cgroup_id(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(path).map(|m| m.ino())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_cpu_flow_values_sum() {
        let v = [
            FlowValue {
                bytes: 100,
                packets: 2,
                first_seen_ns: 50,
                last_seen_ns: 60,
                external: 1,
                _pad: [0; 7],
            },
            FlowValue::default(),
            FlowValue {
                bytes: 10,
                packets: 1,
                first_seen_ns: 40,
                last_seen_ns: 45,
                external: 1,
                _pad: [0; 7],
            },
        ];
        let c = sum_flow(&v);
        assert_eq!((c.bytes, c.packets), (110, 3));
        assert_eq!((c.first_seen_ns, c.last_seen_ns), (40, 60));
        assert!(c.external);
    }

    #[test]
    fn the_latest_packet_decides_internal_or_external() {
        let slot = |last, external| FlowValue {
            bytes: 1,
            packets: 1,
            first_seen_ns: 1,
            last_seen_ns: last,
            external,
            _pad: [0; 7],
        };
        // CPU 0 saw it external before a policy change, CPU 1 internal after.
        assert!(!sum_flow(&[slot(10, 1), slot(20, 0)]).external);
        assert!(sum_flow(&[slot(20, 1), slot(10, 0)]).external);
        // Same tick: count it as external.
        assert!(sum_flow(&[slot(20, 0), slot(20, 1)]).external);
        // An empty slot decides nothing.
        assert!(sum_flow(&[slot(20, 1), FlowValue::default()]).external);
    }

    #[test]
    fn flow_key_round_trips() {
        let id = FlowId {
            cgroup_id: 7,
            remote: "10.9.8.7".parse().unwrap(),
            port: 443,
            proto: exfilguard_common::proto::TCP,
        };
        let key = flow_key(&id);
        assert_eq!(key.family, 4);
        assert_eq!(flow_id(&key), id);
        let id6 = FlowId {
            remote: "fd00::7".parse().unwrap(),
            ..id
        };
        assert_eq!(flow_key(&id6).family, 6);
        assert_eq!(flow_id(&flow_key(&id6)), id6);
    }

    #[test]
    fn missing_keys_are_recognised_in_both_shapes() {
        assert!(not_found(&MapError::KeyNotFound));
        let enoent = MapError::SyscallError(aya::sys::SyscallError {
            call: "bpf_map_delete_elem",
            io_error: std::io::Error::from_raw_os_error(libc::ENOENT),
        });
        assert!(not_found(&enoent));
        let eperm = MapError::SyscallError(aya::sys::SyscallError {
            call: "bpf_map_delete_elem",
            io_error: std::io::Error::from_raw_os_error(libc::EPERM),
        });
        assert!(!not_found(&eperm));
    }

    #[test]
    fn the_object_is_embedded() {
        // An ELF file for the BPF machine (EM_BPF = 247), not a host stub.
        assert_eq!(&EBPF_OBJECT[..4], b"\x7fELF");
        assert_eq!(u16::from_le_bytes([EBPF_OBJECT[18], EBPF_OBJECT[19]]), 247);
    }
}
