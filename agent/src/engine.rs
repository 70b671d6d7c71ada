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
    /// The cgroup's own hard cap last pushed to the kernel per cgroup (by
    /// policy, not by the controller's SetCap, which `caps` never
    /// overrides); `None`: no own entry, the default cap applies.
    caps: BTreeMap<u64, Option<HardCap>>,
    /// The default cap last pushed to the kernel (the policy's base cap,
    /// for every cgroup without its own); outer `None`: not yet this run.
    default_cap: Option<Option<HardCap>>,
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
            default_cap: None,
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

    /// The default cap the kernel should hold, if it differs from what it
    /// was last told: the policy's base cap, which the kernel applies to
    /// every cgroup without a cap of its own from its first packet on (no
    /// cgroup needs to have been seen). Confirm with
    /// [`Engine::default_cap_applied`].
    pub fn default_cap_change(&self) -> Option<Option<HardCap>> {
        let want = self.policy.hard_cap.clone();
        (self.default_cap.as_ref() != Some(&want)).then_some(want)
    }

    /// Records that the kernel now holds `cap` as the default cap.
    pub fn default_cap_applied(&mut self, cap: Option<HardCap>) {
        self.default_cap = Some(cap);
    }

    /// The caps of their own that seen cgroups need, where they differ from
    /// what the kernel was last told: `Some(cap)` where an override's cap
    /// differs from the base cap, `None` (remove the own entry, the default
    /// applies) where it does not. The caller applies them and confirms each
    /// with [`Engine::cap_applied`].
    pub fn cap_changes(&mut self) -> Vec<(u64, Option<HardCap>)> {
        let mut out = Vec::new();
        let base = self.policy.hard_cap.clone();
        let ids: Vec<u64> = self.cgroups.values().flatten().copied().collect();
        for cg in ids {
            if self.pinned_caps.contains(&cg) {
                continue;
            }
            let meta = self.resolver.resolve(cg).meta.clone();
            let want = self.policy.effective(&meta).hard_cap;
            let own = if want == base { None } else { want };
            // First sight: an entry left by an earlier run may be stale, so
            // say what it should be either way.
            match self.caps.get(&cg) {
                Some(have) if *have == own => {}
                _ => out.push((cg, own)),
            }
        }
        out
    }

    /// Records that the kernel now holds `cap` as `cgroup_id`'s own cap.
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{datapath::FlowId, policy::Span};

    const UID_A: &str = "0a1b2c3d-0000-4000-8000-000000000001";
    const UID_B: &str = "0a1b2c3d-0000-4000-8000-000000000002";

    /// A cgroup tree with two pods (directory inodes stand in for cgroup
    /// ids), a Pod cache naming them (`etl` in namespace `batch`, `web` in
    /// `shop`), and an engine under `policy`.
    fn engine(policy: &str) -> (tempfile::TempDir, Engine, u64, u64) {
        let root = tempfile::tempdir().unwrap();
        let mut ids = Vec::new();
        for uid in [UID_A, UID_B] {
            let dir = root.path().join(format!("kubepods/pod{uid}/c0ffee"));
            std::fs::create_dir_all(&dir).unwrap();
            ids.push(crate::datapath::cgroup_id(&dir).unwrap());
        }
        let pods = crate::pods::PodCache::new();
        for (uid, name, ns) in [(UID_A, "etl-0", "batch"), (UID_B, "web-0", "shop")] {
            let pod = serde_json::from_value(serde_json::json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": ns, "uid": uid},
                "spec": {"containers": [{"name": "app", "image": "x"}]},
            }))
            .unwrap();
            pods.apply(kube::runtime::watcher::Event::Apply(pod));
        }
        let mut e = Engine::new(
            root.path(),
            Policy::from_yaml(policy).unwrap(),
            None,
            Arc::new(Metrics::new()),
        );
        e.set_pods(pods);
        (root, e, ids[0], ids[1])
    }

    fn traffic(e: &mut Engine, cgroup_id: u64) {
        e.flows(&[FlowDelta {
            id: FlowId {
                cgroup_id,
                remote: "192.0.2.1".parse().unwrap(),
                port: 443,
                proto: 6,
            },
            bytes: 100,
            packets: 1,
            last_seen_ns: 1,
            external: true,
        }]);
    }

    fn cap(bytes: u64, secs: u64) -> Option<HardCap> {
        Some(HardCap {
            bytes,
            window: Span(Duration::from_secs(secs)),
        })
    }

    #[test]
    fn the_base_cap_is_the_kernel_default_before_any_traffic() {
        let (_root, mut e, etl, web) = engine(
            "hard_cap: {bytes: 5000000, window: 1h}\noverrides: [{namespace: batch, hard_cap: {bytes: 1000, window: 1m}}]",
        );
        // No cgroup seen yet: the default is all the kernel needs.
        assert_eq!(e.default_cap_change(), Some(cap(5_000_000, 3600)));
        assert!(e.cap_changes().is_empty());
        e.default_cap_applied(cap(5_000_000, 3600));
        assert_eq!(e.default_cap_change(), None);

        traffic(&mut e, etl);
        traffic(&mut e, web);
        let mut changes = e.cap_changes();
        changes.sort_by_key(|(cg, _)| *cg);
        let mut want = vec![(etl, cap(1000, 60)), (web, None)];
        want.sort_by_key(|(cg, _)| *cg);
        // The override's own cap; the base-capped pod clears any stale own entry.
        assert_eq!(changes, want);
        for (cg, c) in changes {
            e.cap_applied(cg, c);
        }
        assert!(
            e.cap_changes().is_empty(),
            "nothing changes: nothing to push"
        );
    }

    #[test]
    fn policy_changes_move_the_default_and_the_own_caps() {
        let (_root, mut e, etl, _web) = engine("hard_cap: {bytes: 5000000, window: 1h}");
        e.default_cap_applied(cap(5_000_000, 3600));
        traffic(&mut e, etl);
        for (cg, c) in e.cap_changes() {
            e.cap_applied(cg, c);
        }
        // No cap any more: the default goes, nothing of its own to remove.
        e.set_policy(Policy::from_yaml("{}").unwrap());
        assert_eq!(e.default_cap_change(), Some(None));
        assert!(e.cap_changes().is_empty());
        // A controller's cap on a cgroup is never overridden by policy.
        e.set_policy(
            Policy::from_yaml("overrides: [{namespace: batch, hard_cap: {bytes: 9, window: 1s}}]")
                .unwrap(),
        );
        e.cap_set_by_controller(etl);
        assert!(e.cap_changes().is_empty());
    }
}
