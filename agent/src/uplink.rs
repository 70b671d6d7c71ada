//! The agent's side of the controller contract: detections and per-workload
//! egress in their protobuf form, and the controller's commands applied to the
//! kernel. The `run` loop moves them between the [`crate::stream`] client, the
//! [`Engine`] and the [`Datapath`].
use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
    path::Path,
    time::Duration,
};

use exfilguard_proto::v1::{
    self as pb, AckStatus, DetectionKind, L4Protocol, PolicyAction, Severity,
    controller_message::Payload,
};

use crate::{
    attribution::Workload,
    cidr::IpNet,
    clock,
    datapath::{Datapath, DatapathError},
    detect::{Detection, Phase, Rule},
    engine::Engine,
    flows::FlowDelta,
    policy::{Action, Allowlist, HardCap, Override, OverrideSettings, Policy, Span},
};

/// At most this many destinations per workload in a FlowReport (the
/// controller refuses more than 64).
const MAX_REPORT_DESTINATIONS: usize = 16;
/// At most this many workloads per FlowReport (the controller's limit is 4096);
/// the rest are carried in the next report.
const MAX_REPORT_WORKLOADS: usize = 2048;
/// At most this many DNS samples per detection (the proto says 32).
const MAX_SAMPLES: usize = 32;

/// Unix milliseconds of a kernel `CLOCK_MONOTONIC` stamp.
pub fn wall_ms(stamp_ns: u64) -> u64 {
    clock::kernel_to_wall(stamp_ns)
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The proto form of a workload on this node: what the Pod watch knows,
/// and the cgroup path always (the workload's id when the cgroup is gone or
/// unknown, so the controller still has a name for it).
pub fn workload(w: &Workload, cgroup_id: u64, cgroup_root: &Path) -> pb::Workload {
    let mut p = w.to_proto(cgroup_id, cgroup_root);
    if p.cgroup_path.is_empty() {
        p.cgroup_path = w.id.clone();
    }
    p
}

/// Kind and severity of a rule. Volume and DNS exfiltration are exfiltration
/// in progress (critical); a rate spike against the workload's own baseline is
/// a weaker signal (high) that never contains on its own.
pub fn classify(rule: Rule) -> (DetectionKind, Severity) {
    match rule {
        Rule::LargeDataTransfer | Rule::LargeTransferToDestination => {
            (DetectionKind::Volume, Severity::Critical)
        }
        Rule::EgressRateSpike => (DetectionKind::RateSpike, Severity::High),
        Rule::DnsExfiltration | Rule::DnsExfiltrationSpread => {
            (DetectionKind::DnsLowAndSlow, Severity::Critical)
        }
        Rule::DnsTunnel => (DetectionKind::DnsTunnel, Severity::Critical),
    }
}

fn action(a: Action) -> PolicyAction {
    match a {
        Action::Alert => PolicyAction::Alert,
        Action::Lockdown => PolicyAction::Lockdown,
        Action::DryRun => PolicyAction::DryRun,
    }
}

/// The proto form of a detection, or `None` for an episode's end (the
/// controller's incident outlives the episode; nothing to send).
pub fn detection(d: &Detection, node: &str, workload: pb::Workload) -> Option<pb::Detection> {
    if d.phase == Phase::End {
        return None;
    }
    let (kind, severity) = classify(d.rule);
    let policy_action = if severity == Severity::Critical {
        action(d.action)
    } else {
        PolicyAction::Alert
    };
    let e = &d.evidence;
    let window_s = e.window_end_ns.saturating_sub(e.window_start_ns) / 1_000_000_000;
    let mut measurements: HashMap<String, f64> = HashMap::new();
    measurements.insert("observed".into(), d.observed);
    measurements.insert("allowlisted_bytes".into(), e.allowlisted_bytes as f64);
    measurements.insert("episode".into(), d.episode as f64);
    let mut dns_samples = Vec::new();
    let mut registered_domain = String::new();
    if let Some(dns) = &e.dns {
        measurements.insert("queries".into(), dns.queries as f64);
        measurements.insert("distinct_names".into(), dns.distinct_names as f64);
        measurements.insert("max_label_len".into(), dns.max_label_len as f64);
        measurements.insert("max_name_len".into(), dns.max_name_len as f64);
        measurements.insert("mean_entropy".into(), dns.mean_entropy);
        measurements.insert("unusual_type_share".into(), dns.unusual_type_share);
        measurements.insert("nxdomain_share".into(), dns.nxdomain_share);
        measurements.insert("domains".into(), dns.domains.len() as f64);
        registered_domain = d
            .subject
            .clone()
            .or_else(|| dns.domains.first().cloned())
            .unwrap_or_default();
        dns_samples = dns
            .sample_queries
            .iter()
            .take(MAX_SAMPLES)
            .map(|q| pb::DnsSample {
                query_name: q.clone(),
                ..Default::default()
            })
            .collect();
    }
    let bytes_estimate = if e.dns.is_some() {
        e.encoded_bytes
    } else {
        e.bytes
    };
    let subject = d
        .subject
        .as_deref()
        .map(|s| format!(" ({s})"))
        .unwrap_or_default();
    Some(pb::Detection {
        detection_id: format!("{node}-{}-{}", d.rule.as_str(), d.episode),
        kind: kind as i32,
        severity: severity as i32,
        workload: Some(workload),
        detected_at_unix_ms: wall_ms(e.window_end_ns),
        summary: format!("{}{subject}: {}", d.rule.as_str(), d.condition),
        bytes_estimate,
        window_seconds: u32::try_from(window_s).unwrap_or(u32::MAX),
        threshold: d.threshold.max(0.0) as u64,
        evidence: Some(pb::Evidence {
            top_flows: e
                .top_destinations
                .iter()
                .take(MAX_REPORT_DESTINATIONS)
                .map(|t| pb::Destination {
                    address: t.addr.to_string(),
                    port: u32::from(t.port),
                    protocol: L4Protocol::Unspecified as i32,
                    bytes: t.bytes,
                    packets: 0,
                    domain: String::new(),
                    external: true,
                })
                .collect(),
            dns_samples,
            registered_domain,
            measurements,
        }),
        action: policy_action as i32,
    })
}

#[derive(Debug, Default)]
struct WorkloadAgg {
    workload: Option<pb::Workload>,
    external: u64,
    internal: u64,
    packets: u64,
    dests: HashMap<(IpAddr, u16, u8), (u64, u64, bool)>,
}

/// Per-workload egress between two FlowReports.
#[derive(Debug)]
pub struct FlowReports {
    window_start_ms: u64,
    by_workload: HashMap<String, WorkloadAgg>,
}

impl FlowReports {
    /// Starts the first window now.
    pub fn new(now_ms: u64) -> Self {
        Self {
            window_start_ms: now_ms,
            by_workload: HashMap::new(),
        }
    }

    /// Adds one poll's deltas; `workload_of` resolves a cgroup id to the
    /// workload's id and proto form.
    pub fn add(
        &mut self,
        deltas: &[FlowDelta],
        mut workload_of: impl FnMut(u64) -> (String, pb::Workload),
    ) {
        for d in deltas {
            let (id, w) = workload_of(d.id.cgroup_id);
            let agg = self.by_workload.entry(id).or_default();
            agg.workload.get_or_insert(w);
            if d.external {
                agg.external += d.bytes;
            } else {
                agg.internal += d.bytes;
            }
            agg.packets += d.packets;
            let e = agg
                .dests
                .entry((d.id.remote, d.id.port, d.id.proto))
                .or_insert((0, 0, d.external));
            e.0 += d.bytes;
            e.1 += d.packets;
            e.2 = d.external;
        }
    }

    /// Closes the window at `now_ms`: the report, or `None` when nothing was
    /// sent in it.
    pub fn take(&mut self, now_ms: u64) -> Option<pb::FlowReport> {
        let start = std::mem::replace(&mut self.window_start_ms, now_ms);
        if self.by_workload.is_empty() {
            return None;
        }
        let mut all: Vec<(String, WorkloadAgg)> = self.by_workload.drain().collect();
        // Biggest senders first, so a report cut at the limit keeps them.
        all.sort_by_key(|(_, a)| std::cmp::Reverse(a.external + a.internal));
        let rest = all.split_off(all.len().min(MAX_REPORT_WORKLOADS));
        self.by_workload.extend(rest);
        let workloads = all
            .into_iter()
            .map(|(_, a)| {
                let mut dests: Vec<_> = a.dests.into_iter().collect();
                dests.sort_by_key(|(_, (b, _, _))| std::cmp::Reverse(*b));
                dests.truncate(MAX_REPORT_DESTINATIONS);
                pb::WorkloadEgress {
                    workload: a.workload,
                    external_bytes: a.external,
                    internal_bytes: a.internal,
                    packets: a.packets,
                    top_destinations: dests
                        .into_iter()
                        .map(
                            |((addr, port, proto), (bytes, packets, external))| pb::Destination {
                                address: addr.to_string(),
                                port: u32::from(port),
                                protocol: l4(proto) as i32,
                                bytes,
                                packets,
                                domain: String::new(),
                                external,
                            },
                        )
                        .collect(),
                }
            })
            .collect();
        Some(pb::FlowReport {
            window_start_unix_ms: start,
            window_end_unix_ms: now_ms,
            workloads,
        })
    }
}

fn l4(proto: u8) -> L4Protocol {
    match proto {
        6 => L4Protocol::Tcp,
        17 => L4Protocol::Udp,
        1 | 58 => L4Protocol::Icmp,
        _ => L4Protocol::Unspecified,
    }
}

/// Why a command could not be applied; the text goes back in the Ack.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The command is malformed.
    #[error("{0}")]
    Invalid(String),
    /// The kernel refused.
    #[error(transparent)]
    Datapath(#[from] DatapathError),
}

/// What applying a command did, for the log and the Ack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// One line for the log and the Ack's detail.
    pub detail: String,
}

/// The newest policy version applied from the controller (older ones are ignored).
#[derive(Debug, Default)]
pub struct PolicyVersion(pub u64);

/// Applies one controller command to the kernel (Block, Unblock, SetCap) or
/// the engine (PolicyUpdate). Every Block and cap covers every cgroup seen for
/// the workload, since one pod has several container cgroups.
pub fn apply(
    payload: &Payload,
    dp: &mut Datapath,
    engine: &mut Engine,
    base_policy: &Policy,
    version: &mut PolicyVersion,
) -> Result<Applied, CommandError> {
    match payload {
        Payload::Block(b) => {
            if b.cgroup_id == 0 {
                return Err(CommandError::Invalid("Block names cgroup 0".into()));
            }
            let nets = parse_cidrs("remote_cidrs", &b.remote_cidrs)?;
            let cgroups = engine.sibling_cgroups(b.cgroup_id);
            for &cg in &cgroups {
                if nets.is_empty() {
                    dp.block_cgroup(cg)?;
                } else {
                    for n in &nets {
                        dp.block_cidr(Some(cg), *n)?;
                    }
                }
            }
            Ok(Applied {
                detail: format!(
                    "incident {}: blocked {} of cgroups {}",
                    b.incident_id,
                    if nets.is_empty() {
                        "all egress".to_string()
                    } else {
                        format!("egress to {}", b.remote_cidrs.join(", "))
                    },
                    list(&cgroups)
                ),
            })
        }
        Payload::Unblock(u) => {
            if u.cgroup_id == 0 {
                return Err(CommandError::Invalid("Unblock names cgroup 0".into()));
            }
            let cgroups = engine.sibling_cgroups(u.cgroup_id);
            for &cg in &cgroups {
                dp.unblock_cgroup(cg)?;
            }
            Ok(Applied {
                detail: format!(
                    "incident {}: unblocked cgroups {} ({})",
                    u.incident_id,
                    list(&cgroups),
                    u.reason
                ),
            })
        }
        Payload::SetCap(c) => {
            if c.cgroup_id == 0 {
                return Err(CommandError::Invalid("SetCap names cgroup 0".into()));
            }
            if c.bytes > 0 && c.window_seconds == 0 {
                return Err(CommandError::Invalid(
                    "SetCap with bytes > 0 needs window_seconds > 0".into(),
                ));
            }
            let cgroups = engine.sibling_cgroups(c.cgroup_id);
            for &cg in &cgroups {
                if c.bytes == 0 {
                    dp.clear_cap(cg)?;
                } else {
                    dp.set_cap(cg, c.bytes, Duration::from_secs(c.window_seconds.into()))?;
                }
                engine.cap_set_by_controller(cg);
            }
            Ok(Applied {
                detail: if c.bytes == 0 {
                    format!("cap cleared on cgroups {}", list(&cgroups))
                } else {
                    format!(
                        "cap {} bytes per {} s on cgroups {}",
                        c.bytes,
                        c.window_seconds,
                        list(&cgroups)
                    )
                },
            })
        }
        Payload::PolicyUpdate(p) => {
            if p.version <= version.0 {
                return Ok(Applied {
                    detail: format!(
                        "policy version {} ignored: version {} is in force",
                        p.version, version.0
                    ),
                });
            }
            let policy = merge_policy(base_policy, p)?;
            let internal = parse_cidrs("internal_cidrs", &p.internal_cidrs)?;
            if !internal.is_empty() {
                dp.set_internal_cidrs(&internal)?;
            }
            engine.set_policy(policy);
            version.0 = p.version;
            Ok(Applied {
                detail: format!("policy version {} in force", p.version),
            })
        }
        Payload::Welcome(_) | Payload::Ack(_) => Err(CommandError::Invalid(
            "not a command (Welcome and Ack are handled by the stream)".into(),
        )),
    }
}

/// Whether a command result is worth a FAILED ack.
pub fn ack_status(r: &Result<Applied, CommandError>) -> (AckStatus, String) {
    match r {
        Ok(a) => (AckStatus::Ok, a.detail.clone()),
        Err(e) => (AckStatus::Failed, e.to_string()),
    }
}

fn list(ids: &BTreeSet<u64>) -> String {
    ids.iter().map(u64::to_string).collect::<Vec<_>>().join(",")
}

fn parse_cidrs(field: &str, items: &[String]) -> Result<Vec<IpNet>, CommandError> {
    items
        .iter()
        .enumerate()
        .map(|(i, s)| {
            s.parse::<IpNet>()
                .map_err(|e| CommandError::Invalid(format!("{field}[{i}] {s:?}: {e}")))
        })
        .collect()
}

/// The policy action a proto value names; `None` for UNSPECIFIED (keep).
fn policy_action(field: &str, v: i32) -> Result<Option<Action>, CommandError> {
    match PolicyAction::try_from(v) {
        Ok(PolicyAction::Alert) => Ok(Some(Action::Alert)),
        Ok(PolicyAction::Lockdown) => Ok(Some(Action::Lockdown)),
        Ok(PolicyAction::DryRun) => Ok(Some(Action::DryRun)),
        Ok(PolicyAction::Unspecified) => Ok(None),
        Err(_) => Err(CommandError::Invalid(format!("{field}: unknown value {v}"))),
    }
}

/// One controller override as the policy file would write it. Zero / empty
/// fields keep the underlying value; the whole policy is validated after.
fn policy_override(i: usize, o: &pb::PolicyOverride) -> Result<Override, CommandError> {
    let f = format!("overrides[{i}] ({})", o.source);
    if o.namespace.is_empty() && o.match_labels.is_empty() {
        return Err(CommandError::Invalid(format!(
            "{f}: needs a namespace or labels to match (it would apply to every workload)"
        )));
    }
    if o.hard_cap_bytes > 0 && o.hard_cap_window_seconds == 0 {
        return Err(CommandError::Invalid(format!(
            "{f}.hard_cap_window_seconds: must be set with hard_cap_bytes"
        )));
    }
    let nonzero = |v: u64| (v > 0).then_some(v);
    let allowlist = if o.allow_cidrs.is_empty() && o.allow_domains.is_empty() {
        None
    } else {
        Some(Allowlist {
            cidrs: parse_cidrs(&format!("{f}.allow_cidrs"), &o.allow_cidrs)?,
            domains: o.allow_domains.clone(),
        })
    };
    Ok(Override {
        namespace: (!o.namespace.is_empty()).then(|| o.namespace.clone()),
        labels: o
            .match_labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        settings: OverrideSettings {
            action: policy_action(&format!("{f}.action"), o.action)?,
            threshold_bytes: nonzero(o.volume_threshold_bytes),
            per_destination_bytes: nonzero(o.per_destination_bytes),
            dns_encoded_bytes: nonzero(o.dns_encoded_bytes),
            hard_cap: (o.hard_cap_bytes > 0).then(|| HardCap {
                bytes: o.hard_cap_bytes,
                window: Span(Duration::from_secs(o.hard_cap_window_seconds.into())),
            }),
            allowlist,
        },
    })
}

/// The node's policy with the controller's fields laid over it: thresholds,
/// window and action replace the node's, allowlists are added to it, and
/// the update's overrides go before the file's. The result is validated like
/// a file; a bad update changes nothing.
pub fn merge_policy(base: &Policy, u: &pb::PolicyUpdate) -> Result<Policy, CommandError> {
    let mut p = base.clone();
    if u.volume_threshold_bytes > 0 {
        p.volume.threshold_bytes = u.volume_threshold_bytes;
    }
    if u.volume_window_seconds > 0 {
        p.volume.window = Span(Duration::from_secs(u.volume_window_seconds.into()));
    }
    if let Some(a) = policy_action("action", u.action)? {
        p.action = a;
    }
    p.allowlist
        .cidrs
        .extend(parse_cidrs("allow_cidrs", &u.allow_cidrs)?);
    p.allowlist.domains.extend(u.allow_domains.iter().cloned());
    if u.hard_cap_bytes > 0 {
        p.hard_cap = Some(HardCap {
            bytes: u.hard_cap_bytes,
            window: Span(Duration::from_secs(u.hard_cap_window_seconds.max(1).into())),
        });
    }
    // The controller's overrides (one per ExfilPolicy, most specific first)
    // go before the file's: first match wins, and the cluster's word is the
    // newer one.
    let mut overrides = u
        .overrides
        .iter()
        .enumerate()
        .map(|(i, o)| policy_override(i, o))
        .collect::<Result<Vec<_>, _>>()?;
    overrides.append(&mut p.overrides);
    p.overrides = overrides;
    p.validate()
        .map_err(|e| CommandError::Invalid(format!("policy update: {e}")))?;
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        datapath::FlowId,
        detect::{DnsEvidence, Evidence},
    };

    fn det(rule: Rule, phase: Phase, action: Action) -> Detection {
        Detection {
            rule,
            phase,
            episode: 3,
            workload: "/lab/app".into(),
            subject: Some("evil.example".into()),
            observed: 2e6,
            threshold: 1e6,
            condition: "over 1 MB in 10 s".into(),
            action,
            evidence: Evidence {
                window_start_ns: 1_000_000_000,
                window_end_ns: 11_000_000_000,
                bytes: 2_000_000,
                allowlisted_bytes: 5,
                top_destinations: vec![crate::detect::Destination {
                    addr: "10.9.0.2".parse().unwrap(),
                    port: 443,
                    bytes: 2_000_000,
                }],
                encoded_bytes: 700,
                dns: Some(DnsEvidence {
                    queries: 40,
                    sample_queries: vec!["a.evil.example".into(); 50],
                    domains: vec!["evil.example".into()],
                    ..Default::default()
                }),
            },
        }
    }

    #[test]
    fn critical_detections_carry_the_policy_action_and_spikes_only_alert() {
        let w = pb::Workload {
            cgroup_path: "/lab/app".into(),
            cgroup_id: 7,
            ..Default::default()
        };
        let d = detection(
            &det(Rule::DnsTunnel, Phase::Start, Action::Lockdown),
            "n1",
            w.clone(),
        )
        .unwrap();
        assert_eq!(d.kind, DetectionKind::DnsTunnel as i32);
        assert_eq!(d.severity, Severity::Critical as i32);
        assert_eq!(d.action, PolicyAction::Lockdown as i32);
        assert_eq!(d.window_seconds, 10);
        assert_eq!(d.bytes_estimate, 700, "DNS rules report encoded bytes");
        let e = d.evidence.unwrap();
        assert_eq!(e.registered_domain, "evil.example");
        assert_eq!(e.dns_samples.len(), MAX_SAMPLES);
        assert_eq!(e.top_flows[0].address, "10.9.0.2");
        let spike = detection(
            &det(Rule::EgressRateSpike, Phase::Update, Action::Lockdown),
            "n1",
            w.clone(),
        )
        .unwrap();
        assert_eq!(spike.severity, Severity::High as i32);
        assert_eq!(spike.action, PolicyAction::Alert as i32);
        assert!(
            detection(
                &det(Rule::LargeDataTransfer, Phase::End, Action::Alert),
                "n1",
                w
            )
            .is_none()
        );
    }

    fn delta(cg: u64, remote: &str, port: u16, bytes: u64, external: bool) -> FlowDelta {
        FlowDelta {
            id: FlowId {
                cgroup_id: cg,
                remote: remote.parse().unwrap(),
                port,
                proto: 6,
            },
            bytes,
            packets: 1,
            last_seen_ns: 0,
            external,
        }
    }

    #[test]
    fn flow_reports_sum_per_workload_and_close_windows() {
        let mut r = FlowReports::new(1000);
        assert!(r.take(2000).is_none(), "an empty window sends nothing");
        let wl = |cg: u64| {
            let id = if cg < 10 { "a" } else { "b" };
            (
                id.to_string(),
                pb::Workload {
                    cgroup_path: id.into(),
                    cgroup_id: cg,
                    ..Default::default()
                },
            )
        };
        r.add(
            &[
                delta(1, "10.0.0.1", 443, 100, true),
                delta(2, "10.0.0.1", 443, 50, true),
                delta(1, "10.1.0.1", 80, 7, false),
                delta(11, "10.0.0.2", 53, 3, true),
            ],
            wl,
        );
        let rep = r.take(3000).unwrap();
        assert_eq!(
            (rep.window_start_unix_ms, rep.window_end_unix_ms),
            (2000, 3000)
        );
        assert_eq!(rep.workloads.len(), 2);
        let a = &rep.workloads[0];
        assert_eq!(a.workload.as_ref().unwrap().cgroup_path, "a");
        assert_eq!((a.external_bytes, a.internal_bytes, a.packets), (150, 7, 3));
        assert_eq!(a.top_destinations[0].bytes, 150);
        assert_eq!(a.top_destinations[0].protocol, L4Protocol::Tcp as i32);
        assert!(r.take(4000).is_none());
    }

    #[test]
    fn policy_updates_lay_over_the_node_policy_and_bad_ones_change_nothing() {
        let base = Policy::default();
        let u = pb::PolicyUpdate {
            version: 2,
            volume_threshold_bytes: 5_000_000,
            volume_window_seconds: 30,
            action: PolicyAction::Lockdown as i32,
            allow_cidrs: vec!["192.0.2.0/24".into()],
            allow_domains: vec!["backup.example".into()],
            hard_cap_bytes: 1 << 20,
            hard_cap_window_seconds: 60,
            ..Default::default()
        };
        let p = merge_policy(&base, &u).unwrap();
        assert_eq!(p.volume.threshold_bytes, 5_000_000);
        assert_eq!(p.volume.window.0, Duration::from_secs(30));
        assert_eq!(p.action, Action::Lockdown);
        assert!(p.allowlisted_addr("192.0.2.9".parse().unwrap()));
        assert!(p.allowlisted_domain("x.backup.example"));
        assert_eq!(p.hard_cap.unwrap().bytes, 1 << 20);
        let bad = pb::PolicyUpdate {
            allow_cidrs: vec!["not-a-cidr".into()],
            ..u.clone()
        };
        assert!(
            matches!(merge_policy(&base, &bad), Err(CommandError::Invalid(m)) if m.contains("allow_cidrs[0]"))
        );
        let bad = pb::PolicyUpdate {
            allow_domains: vec!["bad domain!".into()],
            ..u.clone()
        };
        assert!(merge_policy(&base, &bad).is_err());
        let bad = pb::PolicyUpdate { action: 42, ..u };
        assert!(merge_policy(&base, &bad).is_err());
    }

    fn meta(ns: &str, labels: &[(&str, &str)]) -> crate::policy::WorkloadMeta {
        crate::policy::WorkloadMeta {
            namespace: Some(ns.into()),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
        }
    }

    fn etl_override() -> pb::PolicyOverride {
        pb::PolicyOverride {
            source: "shop/etl".into(),
            namespace: "shop".into(),
            match_labels: [("app".to_string(), "etl".to_string())].into(),
            action: PolicyAction::Lockdown as i32,
            volume_threshold_bytes: 7_000_000,
            per_destination_bytes: 0,
            dns_encoded_bytes: 900,
            allow_cidrs: vec!["198.51.100.0/24".into()],
            allow_domains: vec!["backup.example".into()],
            hard_cap_bytes: 1 << 30,
            hard_cap_window_seconds: 3600,
        }
    }

    #[test]
    fn controller_overrides_map_onto_the_policy_before_the_files() {
        let base = Policy::from_yaml(
            "overrides: [{namespace: shop, threshold_bytes: 1000}, {labels: {app: etl}, threshold_bytes: 2000}]",
        )
        .unwrap();
        let u = pb::PolicyUpdate {
            version: 3,
            overrides: vec![
                etl_override(),
                pb::PolicyOverride {
                    source: "shop/all".into(),
                    namespace: "shop".into(),
                    action: PolicyAction::DryRun as i32,
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let p = merge_policy(&base, &u).unwrap();
        assert_eq!(p.overrides.len(), 4);
        let o = &p.overrides[0];
        assert_eq!(o.namespace.as_deref(), Some("shop"));
        assert_eq!(o.labels.get("app").map(String::as_str), Some("etl"));
        assert_eq!(o.settings.action, Some(Action::Lockdown));
        assert_eq!(o.settings.threshold_bytes, Some(7_000_000));
        assert_eq!(o.settings.per_destination_bytes, None, "0 keeps");
        assert_eq!(o.settings.dns_encoded_bytes, Some(900));
        let cap = o.settings.hard_cap.as_ref().unwrap();
        assert_eq!(
            (cap.bytes, cap.window.0),
            (1 << 30, Duration::from_secs(3600))
        );
        let a = o.settings.allowlist.as_ref().unwrap();
        assert_eq!(a.cidrs, vec!["198.51.100.0/24".parse::<IpNet>().unwrap()]);
        assert_eq!(a.domains, vec!["backup.example".to_string()]);
        // The file's overrides follow, in their order.
        assert_eq!(p.overrides[2], base.overrides[0]);
        assert_eq!(p.overrides[3], base.overrides[1]);

        // Resolution: the ExfilPolicy for app=etl, then the namespace-wide
        // one, then the file's overrides, then the base.
        let e = p.effective(&meta("shop", &[("app", "etl")]));
        assert_eq!((e.action, e.threshold_bytes), (Action::Lockdown, 7_000_000));
        let e = p.effective(&meta("shop", &[("app", "web")]));
        assert_eq!(
            (e.action, e.threshold_bytes),
            (Action::DryRun, base.volume.threshold_bytes)
        );
        let e = p.effective(&meta("batch", &[("app", "etl")]));
        assert_eq!((e.action, e.threshold_bytes), (Action::Alert, 2000));
        let e = p.effective(&meta("batch", &[]));
        assert_eq!(e.threshold_bytes, base.volume.threshold_bytes);
    }

    #[test]
    fn bad_overrides_reject_the_whole_update() {
        let base = Policy::default();
        let with = |o: pb::PolicyOverride| pb::PolicyUpdate {
            version: 4,
            volume_threshold_bytes: 5,
            overrides: vec![o],
            ..Default::default()
        };
        for (o, want) in [
            (
                pb::PolicyOverride {
                    action: 42,
                    ..etl_override()
                },
                "overrides[0] (shop/etl).action: unknown value 42",
            ),
            (
                pb::PolicyOverride {
                    allow_cidrs: vec!["10.0.0.0/40".into()],
                    ..etl_override()
                },
                "overrides[0] (shop/etl).allow_cidrs[0]",
            ),
            (
                pb::PolicyOverride {
                    allow_cidrs: vec!["0.0.0.0/0".into()],
                    ..etl_override()
                },
                "overrides[0].allowlist.cidrs[0]",
            ),
            (
                pb::PolicyOverride {
                    allow_domains: vec!["not a domain".into()],
                    ..etl_override()
                },
                "overrides[0].allowlist.domains[0]",
            ),
            (
                pb::PolicyOverride {
                    hard_cap_window_seconds: 0,
                    ..etl_override()
                },
                "hard_cap_window_seconds: must be set",
            ),
            (
                pb::PolicyOverride {
                    namespace: String::new(),
                    match_labels: Default::default(),
                    ..etl_override()
                },
                "needs a namespace or labels",
            ),
        ] {
            match merge_policy(&base, &with(o)) {
                Err(CommandError::Invalid(m)) => assert!(m.contains(want), "{want:?} not in {m:?}"),
                other => panic!("{want:?}: {other:?}"),
            }
        }
    }
}
