//! The detection engine of the live agent: attributes flow deltas and DNS
//! records to workloads, feeds the detectors under the policy in force, and
//! counts what it sees. The `run` loop and the kernel tests drive the same
//! engine.
use std::{path::PathBuf, sync::Arc};

use crate::{
    attribution::Resolver,
    datapath::events::{DnsDirection, DnsRecord},
    detect::{Detection, Phase, dns::DnsDetector, volume::VolumeDetector},
    flows::FlowDelta,
    metrics::{EgressLabels, Metrics, RuleLabel, WorkloadLabel},
    policy::{Policy, PolicyError},
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
        }
    }

    /// The policy in force.
    pub fn policy(&self) -> &Policy {
        &self.policy
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
