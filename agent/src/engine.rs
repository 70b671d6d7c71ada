//! The detection engine of the live agent: attributes flow deltas and DNS
//! records to workloads, feeds the detectors under the policy in force, and
//! counts what it sees. The `run` loop and the kernel tests drive the same
//! engine.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    path::PathBuf,
    sync::Arc,
};

use crate::{
    attribution::Resolver,
    datapath::events::{DnsDirection, DnsRecord},
    detect::{Detection, Phase, dns::DnsDetector, volume::VolumeDetector},
    flows::FlowDelta,
    metrics::{EgressLabels, Metrics, RuleLabel, WorkloadLabel},
    policy::{HardCap, Policy, PolicyError},
};

/// Detectors, attribution and policy, together.
#[derive(Debug)]
pub struct Engine {
    policy: Arc<Policy>,
    policy_path: Option<PathBuf>,
    resolver: Resolver,
    volume: VolumeDetector,
    dns: DnsDetector,
    metrics: Arc<Metrics>,
    /// cgroup ids seen per workload id, sorted: a Block or cap for a
    /// workload covers every container cgroup of it, not only the one a
    /// detection names. (A vector, not a set: a pod has one to a few, and
    /// with 10,000 pods a B-tree node each was a megabyte.)
    cgroups: HashMap<String, Vec<u64>>,
    /// The hard cap last pushed to the kernel per cgroup (by policy, not by
    /// the controller's SetCap, which `caps` never overrides).
    caps: BTreeMap<u64, Option<HardCap>>,
    /// cgroups whose cap the controller set; policy leaves them alone.
    pinned_caps: BTreeSet<u64>,
}

impl Engine {
    /// An engine resolving cgroups below `cgroup_root` (the cgroup v2
    /// mount), under `policy` (read from `policy_path`, if any, on reload).
    pub fn new(
        cgroup_root: impl Into<PathBuf>,
        policy: Policy,
        policy_path: Option<PathBuf>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            policy: Arc::new(policy),
            policy_path,
            resolver: Resolver::new(cgroup_root),
            volume: VolumeDetector::new(),
            dns: DnsDetector::new(),
            metrics,
            cgroups: HashMap::new(),
            caps: BTreeMap::new(),
            pinned_caps: BTreeSet::new(),
        }
    }

    /// Names pod workloads from the Pod watch's cache from now on.
    pub fn set_pods(&mut self, pods: crate::pods::PodCache) {
        self.resolver.set_pods(pods);
    }

    /// The workload of `cgroup_id` (as the detectors see it).
    pub fn workload(&mut self, cgroup_id: u64) -> &crate::attribution::Workload {
        self.resolver.resolve(cgroup_id)
    }

    /// The policy in force.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Replaces the policy in force (e.g. one pushed by the controller).
    pub fn set_policy(&mut self, policy: Policy) {
        self.policy = Arc::new(policy);
        self.resolver.forget_unattributed();
    }

    /// Every cgroup id seen for the workload of `cgroup_id`, itself included.
    pub fn sibling_cgroups(&mut self, cgroup_id: u64) -> BTreeSet<u64> {
        let id = self.resolver.resolve(cgroup_id).id.clone();
        let mut out: BTreeSet<u64> = self
            .cgroups
            .get(&id)
            .map(|ids| ids.iter().copied().collect())
            .unwrap_or_default();
        out.insert(cgroup_id);
        out
    }

    /// A cgroup id seen for `workload_id` (the lowest, so it is stable).
    pub fn cgroup_of(&self, workload_id: &str) -> Option<u64> {
        self.cgroups
            .get(workload_id)
            .and_then(|s| s.first().copied())
    }

    /// Marks a cgroup's cap as set by the controller (or cleared by it), so
    /// the policy's cap does not override it.
    pub fn cap_set_by_controller(&mut self, cgroup_id: u64) {
        self.pinned_caps.insert(cgroup_id);
        self.caps.remove(&cgroup_id);
    }

    /// The policy's hard caps that differ from what the kernel was last told,
    /// per seen cgroup: `Some(cap)` to set, `None` to clear. The caller
    /// applies them and confirms each with [`Engine::cap_applied`].
    pub fn cap_changes(&mut self) -> Vec<(u64, Option<HardCap>)> {
        let mut out = Vec::new();
        let ids: Vec<u64> = self.cgroups.values().flatten().copied().collect();
        for cg in ids {
            if self.pinned_caps.contains(&cg) {
                continue;
            }
            let meta = self.resolver.resolve(cg).meta.clone();
            let want = self.policy.effective(&meta).hard_cap;
            match self.caps.get(&cg) {
                Some(have) if *have == want => {}
                None if want.is_none() => {}
                _ => out.push((cg, want)),
            }
        }
        out
    }

    /// Records that the kernel now holds `cap` for `cgroup_id`.
    pub fn cap_applied(&mut self, cgroup_id: u64, cap: Option<HardCap>) {
        self.caps.insert(cgroup_id, cap);
    }

    /// Re-reads the policy file. A bad file is rejected and the policy in
    /// force stays; the error says which field and why.
    pub fn reload(&mut self) -> Result<bool, PolicyError> {
        let Some(path) = &self.policy_path else {
            return Ok(false);
        };
        match Policy::load(path) {
            Ok(p) => {
                self.policy = Arc::new(p);
                // Cached "unattributed" answers may be stale by now too.
                self.resolver.forget_unattributed();
                Ok(true)
            }
            Err(e) => {
                self.metrics.policy_reload_errors.inc();
                Err(e)
            }
        }
    }

    /// Counts one poll's flow deltas.
    pub fn flows(&mut self, deltas: &[FlowDelta]) {
        for d in deltas {
            let w = self.resolver.resolve(d.id.cgroup_id);
            note_cgroup(&mut self.cgroups, &w.id, d.id.cgroup_id);
            let class = if !d.external {
                "internal"
            } else if self.policy.allowlisted_addr(d.id.remote) {
                "allowlisted"
            } else {
                "external"
            };
            self.metrics
                .egress_bytes
                .get_or_create(&EgressLabels {
                    workload: w.id.clone(),
                    class,
                })
                .inc_by(d.bytes);
            self.volume.observe(
                &self.policy,
                &w.id,
                &w.meta,
                d.id.remote,
                d.id.port,
                d.bytes,
                d.external,
                d.last_seen_ns,
            );
        }
    }

    /// Feeds one DNS payload from the kernel.
    pub fn dns(&mut self, r: &DnsRecord) {
        let w = self.resolver.resolve(r.cgroup_id);
        note_cgroup(&mut self.cgroups, &w.id, r.cgroup_id);
        match self.dns.observe_payload_of(
            &self.policy,
            &w.id,
            &w.meta,
            &r.payload,
            r.tcp,
            Some(r.server),
            r.timestamp_ns,
        ) {
            Ok(m) => {
                if r.direction == DnsDirection::Query && !m.response {
                    self.metrics
                        .dns_queries
                        .get_or_create(&WorkloadLabel {
                            workload: w.id.clone(),
                        })
                        .inc_by(m.questions as u64);
                }
            }
            Err(e) => {
                self.metrics.dns_parse_errors.inc();
                tracing::debug!(workload = %w.id, truncated = r.truncated(), error = %e, "DNS payload not parsed");
            }
        }
    }

    /// Evaluates the detectors at `now_ns` (the kernel's monotonic clock)
    /// and counts the episodes that started.
    pub fn evaluate(&mut self, now_ns: u64) -> Vec<Detection> {
        let mut out = self.volume.evaluate(&self.policy, now_ns);
        out.extend(self.dns.evaluate(&self.policy, now_ns));
        for d in &out {
            if d.phase == Phase::Start {
                self.metrics
                    .detections
                    .get_or_create(&RuleLabel {
                        rule: d.rule.as_str(),
                    })
                    .inc();
            }
        }
        out
    }
}

/// Remembers that `cgroup_id` belongs to `workload` (allocating only the
/// first time a cgroup is seen).
fn note_cgroup(cgroups: &mut HashMap<String, Vec<u64>>, workload: &str, cgroup_id: u64) {
    let pos = match cgroups.get(workload) {
        Some(ids) => ids.binary_search(&cgroup_id),
        None => Err(0),
    };
    if let Err(i) = pos {
        let ids = cgroups.entry(workload.to_owned()).or_default();
        ids.reserve_exact(1);
        ids.insert(i, cgroup_id);
    }
}
