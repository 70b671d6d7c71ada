//! Correlation rules: which incident a detection belongs to, what the policy
//! does about it, and how incident ids look. Pure functions; the store applies
//! them inside its transaction so a detection and its incident change commit
//! together.

use exfilguard_proto::v1::{
    Destination, Detection, DetectionKind, DnsSample, Evidence, IncidentState, PolicyAction,
    Severity, Workload,
};
use rand::Rng;

use crate::{Error, Result, time::civil};

/// Default response per severity (DESIGN.md: `lockdown` is the default for
/// critical), and where containment may act.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponsePolicy {
    /// Action for critical detections.
    pub critical: PolicyAction,
    /// Action for high detections.
    pub high: PolicyAction,
    /// Action for low detections.
    pub low: PolicyAction,
    /// Namespaces never contained, in the kernel or in the cluster: a
    /// lockdown there is refused and the timeline says so.
    pub protected_namespaces: Vec<String>,
    /// Whether the controller can lock pods down through the API server
    /// (it runs with a Kubernetes client).
    pub cluster_containment: bool,
}

impl Default for ResponsePolicy {
    fn default() -> Self {
        Self {
            critical: PolicyAction::Lockdown,
            high: PolicyAction::Alert,
            low: PolicyAction::Alert,
            protected_namespaces: default_protected_namespaces(),
            cluster_containment: false,
        }
    }
}

/// The namespaces of the cluster's own machinery.
pub fn default_protected_namespaces() -> Vec<String> {
    ["kube-system", "kube-public", "kube-node-lease"]
        .map(String::from)
        .to_vec()
}

impl ResponsePolicy {
    /// Whether `namespace` is on the protected list (the empty namespace,
    /// outside Kubernetes, never is).
    pub fn is_protected(&self, namespace: &str) -> bool {
        !namespace.is_empty() && self.protected_namespaces.iter().any(|n| n == namespace)
    }

    /// The action for a detection: the node policy's explicit choice, else the default for its severity.
    pub fn action_for(&self, detection: &Detection) -> PolicyAction {
        match PolicyAction::try_from(detection.action) {
            Ok(PolicyAction::Unspecified) | Err(_) => {
                match Severity::try_from(detection.severity) {
                    Ok(Severity::Critical) => self.critical,
                    Ok(Severity::High) => self.high,
                    _ => self.low,
                }
            }
            Ok(explicit) => explicit,
        }
    }
}

/// The identity of a workload episode: `ns/pod` (pods are unique per
/// namespace), or `node:cgroup` outside Kubernetes (cgroup paths repeat across nodes).
pub fn workload_key(node: &str, workload: &Workload) -> String {
    if workload.pod.is_empty() {
        format!("{node}:{}", workload.cgroup_path)
    } else {
        format!("{}/{}", workload.namespace, workload.pod)
    }
}

/// A new incident id: `EXFIL-YYYYMMDD-HHMMSS-xxxx` (UTC, 4 random hex digits).
pub fn new_incident_id(now_ms: u64, rng: &mut impl Rng) -> String {
    let (y, mo, d, h, mi, s) = civil(now_ms);
    let suffix: u16 = rng.random();
    format!("EXFIL-{y:04}{mo:02}{d:02}-{h:02}{mi:02}{s:02}-{suffix:04x}")
}

/// Whether an incident in `state` is still an open episode (new detections update it).
pub fn is_active(state: i32) -> bool {
    matches!(
        IncidentState::try_from(state),
        Ok(IncidentState::Open | IncidentState::Contained)
    )
}

/// Bounds on what one detection may carry, so one hostile agent cannot fill the store.
const MAX_TEXT: usize = 4096;
const MAX_LIST: usize = 64;
const MAX_LABELS: usize = 64;

fn text(field: &str, s: &str) -> Result<()> {
    if s.len() > MAX_TEXT {
        return Err(Error::InvalidArgument(format!(
            "{field} is {} bytes; at most {MAX_TEXT}",
            s.len()
        )));
    }
    Ok(())
}

fn list<T>(field: &str, items: &[T]) -> Result<()> {
    if items.len() > MAX_LIST {
        return Err(Error::InvalidArgument(format!(
            "{field} has {} entries; at most {MAX_LIST}",
            items.len()
        )));
    }
    Ok(())
}

/// Checks a workload's strings and label count.
pub fn validate_workload(field: &str, w: &Workload) -> Result<()> {
    for (name, value) in [
        ("namespace", &w.namespace),
        ("pod", &w.pod),
        ("container", &w.container),
        ("cgroup_path", &w.cgroup_path),
        ("owner_kind", &w.owner_kind),
        ("owner_name", &w.owner_name),
    ] {
        text(&format!("{field}.{name}"), value)?;
    }
    if w.labels.len() > MAX_LABELS {
        return Err(Error::InvalidArgument(format!(
            "{field}.labels has more than {MAX_LABELS} entries"
        )));
    }
    if w.pod.is_empty() && w.cgroup_path.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "{field} names neither a pod nor a cgroup path"
        )));
    }
    Ok(())
}

/// Checks a destination.
pub fn validate_destination(field: &str, d: &Destination) -> Result<()> {
    text(&format!("{field}.address"), &d.address)?;
    text(&format!("{field}.domain"), &d.domain)?;
    if d.port > u32::from(u16::MAX) {
        return Err(Error::InvalidArgument(format!(
            "{field}.port {} is not a port",
            d.port
        )));
    }
    exfilguard_proto::v1::L4Protocol::try_from(d.protocol).map_err(|_| {
        Error::InvalidArgument(format!("{field}.protocol: unknown value {}", d.protocol))
    })?;
    Ok(())
}

fn validate_sample(field: &str, s: &DnsSample) -> Result<()> {
    text(&format!("{field}.query_name"), &s.query_name)?;
    text(&format!("{field}.query_type"), &s.query_type)?;
    text(&format!("{field}.response_code"), &s.response_code)
}

fn validate_evidence(e: &Evidence) -> Result<()> {
    list("evidence.top_flows", &e.top_flows)?;
    list("evidence.dns_samples", &e.dns_samples)?;
    for (i, d) in e.top_flows.iter().enumerate() {
        validate_destination(&format!("evidence.top_flows[{i}]"), d)?;
    }
    for (i, s) in e.dns_samples.iter().enumerate() {
        validate_sample(&format!("evidence.dns_samples[{i}]"), s)?;
    }
    text("evidence.registered_domain", &e.registered_domain)?;
    if e.measurements.len() > MAX_LIST {
        return Err(Error::InvalidArgument(
            "evidence.measurements has too many entries".into(),
        ));
    }
    Ok(())
}

/// Rejects a detection with unknown enum values, missing parts or oversized fields.
pub fn validate_detection(d: &Detection) -> Result<()> {
    match DetectionKind::try_from(d.kind) {
        Ok(DetectionKind::Unspecified) => {
            return Err(Error::InvalidArgument("detection.kind is not set".into()));
        }
        Err(_) => {
            return Err(Error::InvalidArgument(format!(
                "detection.kind: unknown value {}",
                d.kind
            )));
        }
        Ok(_) => {}
    }
    match Severity::try_from(d.severity) {
        Ok(Severity::Unspecified) => {
            return Err(Error::InvalidArgument(
                "detection.severity is not set".into(),
            ));
        }
        Err(_) => {
            return Err(Error::InvalidArgument(format!(
                "detection.severity: unknown value {}",
                d.severity
            )));
        }
        Ok(_) => {}
    }
    PolicyAction::try_from(d.action).map_err(|_| {
        Error::InvalidArgument(format!("detection.action: unknown value {}", d.action))
    })?;
    let w = d
        .workload
        .as_ref()
        .ok_or_else(|| Error::InvalidArgument("detection.workload is missing".into()))?;
    validate_workload("detection.workload", w)?;
    text("detection.detection_id", &d.detection_id)?;
    text("detection.summary", &d.summary)?;
    if let Some(e) = &d.evidence {
        validate_evidence(e)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{SeedableRng, rngs::StdRng};

    fn detection(severity: Severity, action: PolicyAction) -> Detection {
        Detection {
            kind: DetectionKind::Volume as i32,
            severity: severity as i32,
            action: action as i32,
            workload: Some(Workload {
                namespace: "shop".into(),
                pod: "db-0".into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn incident_ids_have_the_documented_shape() {
        let id = new_incident_id(1_795_356_192_000, &mut StdRng::seed_from_u64(1));
        assert!(id.starts_with("EXFIL-20261122-140312-"), "{id}");
        assert_eq!(id.len(), "EXFIL-20261122-140312-7f3a".len());
        assert!(id[22..].chars().all(|c| c.is_ascii_hexdigit()), "{id}");
    }

    #[test]
    fn policy_defaults_by_severity_and_respects_explicit_actions() {
        let p = ResponsePolicy::default();
        assert_eq!(
            p.action_for(&detection(Severity::Critical, PolicyAction::Unspecified)),
            PolicyAction::Lockdown
        );
        assert_eq!(
            p.action_for(&detection(Severity::High, PolicyAction::Unspecified)),
            PolicyAction::Alert
        );
        assert_eq!(
            p.action_for(&detection(Severity::Critical, PolicyAction::DryRun)),
            PolicyAction::DryRun
        );
    }

    #[test]
    fn validation_rejects_unknown_enums_and_missing_workloads() {
        assert!(validate_detection(&detection(Severity::High, PolicyAction::Alert)).is_ok());
        let mut d = detection(Severity::High, PolicyAction::Alert);
        d.kind = 99;
        assert!(
            matches!(validate_detection(&d), Err(Error::InvalidArgument(m)) if m.contains("unknown value 99"))
        );
        let mut d = detection(Severity::High, PolicyAction::Alert);
        d.severity = 0;
        assert!(validate_detection(&d).is_err());
        let mut d = detection(Severity::High, PolicyAction::Alert);
        d.workload = None;
        assert!(validate_detection(&d).is_err());
        let mut d = detection(Severity::High, PolicyAction::Alert);
        d.summary = "x".repeat(MAX_TEXT + 1);
        assert!(validate_detection(&d).is_err());
    }

    #[test]
    fn workload_keys_separate_pods_and_host_cgroups() {
        let pod = Workload {
            namespace: "a".into(),
            pod: "p".into(),
            ..Default::default()
        };
        assert_eq!(workload_key("n1", &pod), workload_key("n2", &pod));
        let host = Workload {
            cgroup_path: "/system.slice/x".into(),
            ..Default::default()
        };
        assert_ne!(workload_key("n1", &host), workload_key("n2", &host));
    }
}
