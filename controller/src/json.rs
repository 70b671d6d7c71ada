//! JSON views of wire messages: the canonical evidence record (what its
//! SHA-256 covers) and exfilctl's `--output json|yaml`.
//!
//! serde_json's default map is ordered by key, so the same detection always
//! renders to the same bytes and the same hash.

use exfilguard_proto::v1::{
    Destination, Detection, DetectionKind, DnsSample, Evidence, Incident, IncidentState,
    L4Protocol, Node, PolicyAction, Severity, Talker, TimelineEntry, Workload,
};
use serde_json::{Value, json};

use crate::time::rfc3339;

/// Enum name without its prefix (`SEVERITY_CRITICAL` → `critical`), or the raw number if unknown.
fn enum_name(name: Option<&str>, prefix: &str, raw: i32) -> Value {
    match name {
        Some(n) => Value::String(n.trim_start_matches(prefix).to_ascii_lowercase()),
        None => Value::from(raw),
    }
}

/// `critical`, `high`, ...
pub fn severity(raw: i32) -> Value {
    enum_name(
        Severity::try_from(raw).ok().map(|s| s.as_str_name()),
        "SEVERITY_",
        raw,
    )
}

/// `volume`, `dns_tunnel`, ...
pub fn kind(raw: i32) -> Value {
    enum_name(
        DetectionKind::try_from(raw).ok().map(|s| s.as_str_name()),
        "DETECTION_KIND_",
        raw,
    )
}

/// `open`, `contained`, ...
pub fn state(raw: i32) -> Value {
    enum_name(
        IncidentState::try_from(raw).ok().map(|s| s.as_str_name()),
        "INCIDENT_STATE_",
        raw,
    )
}

/// `lockdown`, `alert`, ...
pub fn action(raw: i32) -> Value {
    enum_name(
        PolicyAction::try_from(raw).ok().map(|s| s.as_str_name()),
        "POLICY_ACTION_",
        raw,
    )
}

fn protocol(raw: i32) -> Value {
    enum_name(
        L4Protocol::try_from(raw).ok().map(|s| s.as_str_name()),
        "L4_PROTOCOL_",
        raw,
    )
}

/// A workload.
pub fn workload(w: Option<&Workload>) -> Value {
    let Some(w) = w else { return Value::Null };
    json!({
        "namespace": w.namespace, "pod": w.pod, "container": w.container,
        "cgroup_path": w.cgroup_path, "cgroup_id": w.cgroup_id,
        "owner_kind": w.owner_kind, "owner_name": w.owner_name, "labels": w.labels.iter().collect::<std::collections::BTreeMap<_, _>>(),
    })
}

/// Short human name of a workload: `ns/pod` in Kubernetes, else the cgroup path.
pub fn workload_name(w: Option<&Workload>) -> String {
    match w {
        Some(w) if !w.pod.is_empty() => format!("{}/{}", w.namespace, w.pod),
        Some(w) => w.cgroup_path.clone(),
        None => String::new(),
    }
}

fn destination(d: &Destination) -> Value {
    json!({
        "address": d.address, "port": d.port, "protocol": protocol(d.protocol),
        "bytes": d.bytes, "packets": d.packets, "domain": d.domain, "external": d.external,
    })
}

fn dns_sample(s: &DnsSample) -> Value {
    json!({
        "query_name": s.query_name, "query_type": s.query_type,
        "response_code": s.response_code, "at": rfc3339(s.at_unix_ms),
    })
}

fn evidence(e: Option<&Evidence>) -> Value {
    let Some(e) = e else { return Value::Null };
    json!({
        "top_flows": e.top_flows.iter().map(destination).collect::<Vec<_>>(),
        "dns_samples": e.dns_samples.iter().map(dns_sample).collect::<Vec<_>>(),
        "registered_domain": e.registered_domain,
        "measurements": e.measurements.iter().collect::<std::collections::BTreeMap<_, _>>(),
    })
}

/// The canonical record of a detection (stored as evidence, hashed).
pub fn detection(node: &str, seq: u64, d: &Detection) -> Value {
    json!({
        "node": node, "seq": seq,
        "detection_id": d.detection_id, "kind": kind(d.kind), "severity": severity(d.severity),
        "workload": workload(d.workload.as_ref()), "detected_at": rfc3339(d.detected_at_unix_ms),
        "detected_at_unix_ms": d.detected_at_unix_ms,
        "summary": d.summary, "bytes_estimate": d.bytes_estimate,
        "window_seconds": d.window_seconds, "threshold": d.threshold,
        "evidence": evidence(d.evidence.as_ref()), "action": action(d.action),
    })
}

fn timeline_entry(t: &TimelineEntry) -> Value {
    json!({ "at": rfc3339(t.at_unix_ms), "actor": t.actor, "cause": t.cause, "state": state(t.state) })
}

/// An incident (timeline and evidence included when present).
pub fn incident(i: &Incident) -> Value {
    let mut v = json!({
        "id": i.id, "state": state(i.state), "severity": severity(i.severity), "kind": kind(i.kind),
        "action": action(i.action), "node": i.node, "workload": workload_name(i.workload.as_ref()),
        "opened_at": rfc3339(i.opened_at_unix_ms), "updated_at": rfc3339(i.updated_at_unix_ms),
        "detection_count": i.detection_count, "bytes_estimate": i.bytes_estimate,
        "summary": i.summary, "acknowledged_by": i.acknowledged_by,
        "notification_deadline": rfc3339(i.notification_deadline_unix_ms),
    });
    if !i.timeline.is_empty() {
        v["timeline"] = i.timeline.iter().map(timeline_entry).collect();
    }
    if !i.evidence.is_empty() {
        v["evidence"] = i
            .evidence
            .iter()
            .map(|e| {
                json!({
                    "detection_id": e.detection_id, "seq": e.seq, "sha256": e.sha256,
                    "stored_at": rfc3339(e.stored_at_unix_ms),
                    "detection": serde_json::from_str::<Value>(&e.json).unwrap_or(Value::String(e.json.clone())),
                })
            })
            .collect();
    }
    v
}

/// A node.
pub fn node(n: &Node) -> Value {
    json!({
        "name": n.name, "agent_version": n.agent_version, "kernel_release": n.kernel_release,
        "connected": n.connected, "last_seen": rfc3339(n.last_seen_unix_ms), "last_seq": n.last_seq,
        "lag_ms": n.lag_ms, "dropped_flow_reports": n.dropped_flow_reports,
        "dropped_detections": n.dropped_detections,
    })
}

/// A top talker.
pub fn talker(t: &Talker) -> Value {
    json!({
        "node": t.node, "workload": workload_name(t.workload.as_ref()),
        "external_bytes": t.external_bytes, "internal_bytes": t.internal_bytes,
    })
}
