//! Custom resources: `ExfilPolicy` (namespaced detection policy) and
//! `ExfilIncident` (an incident as cluster state, status subresource).
//!
//! `ExfilPolicy`'s spec uses the field names of the agent's policy file
//! (`agent/src/policy.rs`: `threshold_bytes`, `hard_cap`, `allowlist`, ...),
//! so one document reads the same in a file and in the cluster; every field
//! is optional and an absent one keeps the cluster default. The CRD YAML under
//! `deploy/crds/` is generated from these types (see [`crd_yaml`]) and a test
//! fails when it drifts.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, CustomResourceExt as _};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A duration as the agent's policy writes it: `500ms`, `30s`, `10m`, `1h`, `1d`.
const DURATION_PATTERN: &str = r"^[0-9]+(ms|s|m|h|d)$";

/// What happens on a detection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// Raise an incident and alert.
    #[default]
    Alert,
    /// Alert and cut the pod's egress (NetworkPolicy and in-kernel block).
    Lockdown,
    /// Record what would have been done, do nothing.
    DryRun,
}

/// Volume thresholds (the agent's `volume`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct VolumeRules {
    /// Sliding window (`10m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub window: Option<String>,
    /// External egress bytes per workload in the window that fire the rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub threshold_bytes: Option<u64>,
    /// Same, per destination address and port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub per_destination_bytes: Option<u64>,
    /// A minute above this many times the learned baseline is a spike.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1.0))]
    pub spike_factor: Option<f64>,
    /// Smallest minute of egress that can be a spike.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spike_min_bytes: Option<u64>,
    /// Minutes of history before the baseline is trusted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spike_warmup_minutes: Option<u32>,
}

/// DNS thresholds (the agent's `dns`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct DnsRules {
    /// Sliding window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub window: Option<String>,
    /// Estimated bytes encoded in names under one registered domain that
    /// fire `dns_exfiltration`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub encoded_bytes: Option<u64>,
    /// Same, summed over carrier-looking sibling domains.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub spread_encoded_bytes: Option<u64>,
    /// Queries per minute to one registered domain that make a tunnel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub tunnel_queries_per_minute: Option<u64>,
    /// Domain suffixes of the cluster (never exfiltration).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_domains: Option<Vec<String>>,
}

/// Destinations exempt from detection (still counted).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Allowlist {
    /// Networks, as CIDRs (`10.20.0.0/16`, `2001:db8::/32`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cidrs: Vec<String>,
    /// Domains; subdomains included.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub domains: Vec<String>,
}

/// A kernel-enforced byte budget per window.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct HardCap {
    /// External egress bytes allowed per window.
    #[schemars(range(min = 1))]
    pub bytes: u64,
    /// The window.
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub window: String,
}

/// The desired detection policy for the pods `pod_selector` picks in the
/// object's namespace.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "exfilguard.io",
    version = "v1alpha1",
    kind = "ExfilPolicy",
    plural = "exfilpolicies",
    shortname = "xpol",
    namespaced,
    status = "ExfilPolicyStatus",
    derive = "PartialEq",
    // Raw JSON columns: the structured form repeats `type_ = "string"`,
    // which clippy's duplicated_attributes lint rejects.
    doc = "Detection thresholds, allowlists and the response for the pods it selects.",
    printcolumn = r#"{"name":"Action","type":"string","jsonPath":".spec.action"}"#,
    printcolumn = r#"{"name":"Valid","type":"string","jsonPath":".status.valid"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
pub struct ExfilPolicySpec {
    /// Pods of this namespace the policy applies to; all when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
    /// What happens on a detection: `alert`, `lockdown` or `dry-run`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<Action>,
    /// Volume thresholds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<VolumeRules>,
    /// DNS thresholds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<DnsRules>,
    /// Destinations exempt from detection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowlist: Option<Allowlist>,
    /// In-kernel byte budget per window for each selected pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hard_cap: Option<HardCap>,
    /// How often an open episode may report an update (`1m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub update_interval: Option<String>,
    /// When lockdown is the action: keep DNS to kube-dns reachable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lockdown_keeps_dns: Option<bool>,
}

/// What the controller made of an `ExfilPolicy`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ExfilPolicyStatus {
    /// `metadata.generation` this status is about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Whether the spec is in force (`false`: see `errors`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid: Option<bool>,
    /// Validation errors, one per field: `volume.window: "10x": unknown unit`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
    /// Standard conditions (`Ready`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// One field error of an `ExfilPolicy` spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted path of the field.
    pub field: String,
    /// What is wrong with it.
    pub problem: String,
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.problem)
    }
}

fn check_duration(field: &str, v: &Option<String>, out: &mut Vec<FieldError>) {
    let Some(v) = v else { return };
    let problem = match exfilguard_policy::parse_duration(v) {
        Err(problem) => Some(problem),
        Ok(d) if d.is_zero() => Some(format!("{v:?} must be a positive whole number")),
        Ok(_) => None,
    };
    if let Some(problem) = problem {
        out.push(FieldError {
            field: field.into(),
            problem,
        });
    }
}

fn check_cidr(field: String, v: &str, out: &mut Vec<FieldError>) {
    if let Err(problem) = exfilguard_policy::parse_cidr(v) {
        out.push(FieldError { field, problem });
    }
}

impl ExfilPolicySpec {
    /// What the schema cannot say: every error, each naming its field, for
    /// the object's status. Empty when the spec can be put in force.
    pub fn validate(&self) -> Vec<FieldError> {
        let mut out = Vec::new();
        if let Some(v) = &self.volume {
            check_duration("volume.window", &v.window, &mut out);
            if v.spike_factor.is_some_and(|f| !(f.is_finite() && f >= 1.0)) {
                out.push(FieldError {
                    field: "volume.spike_factor".into(),
                    problem: "must be a number of at least 1".into(),
                });
            }
            for (f, x) in [
                ("volume.threshold_bytes", v.threshold_bytes),
                ("volume.per_destination_bytes", v.per_destination_bytes),
            ] {
                if x == Some(0) {
                    out.push(FieldError {
                        field: f.into(),
                        problem: "must be above 0".into(),
                    });
                }
            }
        }
        if let Some(d) = &self.dns {
            check_duration("dns.window", &d.window, &mut out);
        }
        if let Some(a) = &self.allowlist {
            for (i, c) in a.cidrs.iter().enumerate() {
                check_cidr(format!("allowlist.cidrs[{i}]"), c, &mut out);
            }
            for (i, d) in a.domains.iter().enumerate() {
                if let Err(problem) = exfilguard_policy::check_domain(d) {
                    out.push(FieldError {
                        field: format!("allowlist.domains[{i}]"),
                        problem,
                    });
                }
            }
        }
        if let Some(h) = &self.hard_cap {
            check_duration("hard_cap.window", &Some(h.window.clone()), &mut out);
            if h.bytes == 0 {
                out.push(FieldError {
                    field: "hard_cap.bytes".into(),
                    problem: "must be above 0".into(),
                });
            }
        }
        check_duration("update_interval", &self.update_interval, &mut out);
        out
    }
}

/// Where an incident stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum IncidentState {
    /// Detected, not contained.
    #[default]
    Open,
    /// Contained (lockdown in force).
    Contained,
    /// A responder lifted the containment.
    Released,
    /// Closed without containment to lift.
    Resolved,
}

/// The workload an incident is about.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct IncidentWorkload {
    /// Namespace (empty outside Kubernetes).
    #[serde(default)]
    pub namespace: String,
    /// Pod name (empty outside Kubernetes).
    #[serde(default)]
    pub pod: String,
    /// Node.
    #[serde(default)]
    pub node: String,
    /// cgroup path on the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup_path: Option<String>,
}

/// An incident: the facts fixed at detection. Every controller replica
/// writes and reads incidents through these objects (`status.record` holds
/// the whole incident; the other status fields are its readable summary).
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "exfilguard.io",
    version = "v1alpha1",
    kind = "ExfilIncident",
    plural = "exfilincidents",
    shortname = "xinc",
    namespaced,
    status = "ExfilIncidentStatus",
    derive = "PartialEq",
    doc = "A data-exfiltration incident and its timeline, shared by every controller replica.",
    printcolumn = r#"{"name":"Severity","type":"string","jsonPath":".spec.severity"}"#,
    printcolumn = r#"{"name":"State","type":"string","jsonPath":".status.state"}"#,
    printcolumn = r#"{"name":"Namespace-Of-Pod","type":"string","jsonPath":".spec.workload.namespace"}"#,
    printcolumn = r#"{"name":"Pod","type":"string","jsonPath":".spec.workload.pod"}"#,
    printcolumn = r#"{"name":"Bytes","type":"integer","jsonPath":".status.bytes"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
pub struct ExfilIncidentSpec {
    /// Incident id (`EXFIL-YYYYMMDD-HHMMSS-xxxx`).
    pub incident_id: String,
    /// Severity when opened (`critical`, `high`, `medium`, `low`).
    pub severity: String,
    /// Rule that opened it (`large_data_transfer`, `dns_exfiltration`, ...).
    pub rule: String,
    /// The workload.
    pub workload: IncidentWorkload,
    /// First detection, RFC 3339 UTC.
    pub first_seen: String,
}

/// One timeline entry.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct TimelineEntry {
    /// When, RFC 3339 UTC.
    pub at: String,
    /// The state the entry left the incident in.
    pub state: String,
    /// What happened.
    pub message: String,
    /// Who did it (`controller`, `agent:<node>`, a person).
    pub actor: String,
}

/// One alert delivery.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct DeliveryEntry {
    /// The transition alerted (`opened`, `contained`, ...).
    pub transition: String,
    /// The sink's configured name.
    pub sink: String,
    /// `pending`, `delivered` or `failed`.
    pub state: String,
    /// Attempts made.
    pub attempts: u32,
    /// The last failure, if any.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub last_error: String,
}

/// One evidence item's identity.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct EvidenceDigest {
    /// Kind (`pod`, `flows`, `dns`, `events`, ...).
    pub kind: String,
    /// SHA-256 of the stored content.
    pub sha256: String,
    /// Captured, RFC 3339 UTC.
    pub captured: String,
    /// Stored size in bytes.
    pub size: u64,
    /// Left out of `record` to keep the object under the size limit; the
    /// replica that captured it still holds it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub omitted: bool,
}

/// The incident's changing state.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ExfilIncidentStatus {
    /// Where it stands.
    #[serde(default)]
    pub state: IncidentState,
    /// Current severity.
    #[serde(default)]
    pub severity: String,
    /// Latest summary.
    #[serde(default)]
    pub summary: String,
    /// Last change, RFC 3339 UTC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<String>,
    /// Largest external bytes estimate.
    #[serde(default)]
    pub bytes: u64,
    /// Detections correlated into it.
    #[serde(default)]
    pub detections: u64,
    /// Who acknowledged it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub acknowledged_by: String,
    /// The newest timeline entries, oldest first (the whole timeline is in
    /// `record`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub timeline: Vec<TimelineEntry>,
    /// Alert deliveries.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deliveries: Vec<DeliveryEntry>,
    /// Evidence items.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub evidence: Vec<EvidenceDigest>,
    /// The whole incident (every row the store keeps), JSON, gzip, base64.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub record: String,
}

/// The CRD manifests of this module's resources, as one multi-document
/// YAML: what `deploy/crds/exfilguard.io.yaml` holds.
pub fn crd_yaml() -> String {
    let mut out = String::from(
        "# Generated from controller/src/k8s/crd.rs; do not edit.\n\
         # Regenerate: EXFILGUARD_BLESS_CRDS=1 cargo test -p exfilguard-controller --lib crd\n",
    );
    for crd in [ExfilPolicy::crd(), ExfilIncident::crd()] {
        out.push_str("---\n");
        out.push_str(&serde_norway::to_string(&crd).expect("a CRD serializes to YAML"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo_file() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/crds/exfilguard.io.yaml")
    }

    #[test]
    fn crd_yaml_is_committed_and_current() {
        let want = crd_yaml();
        let path = repo_file();
        if std::env::var_os("EXFILGUARD_BLESS_CRDS").is_some() {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &want).unwrap();
        }
        let have = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        assert!(
            have == want,
            "{} is stale: regenerate with EXFILGUARD_BLESS_CRDS=1 cargo test -p exfilguard-controller --lib crd",
            path.display()
        );
    }

    #[test]
    fn crd_shape() {
        let crd = ExfilPolicy::crd();
        assert_eq!(
            crd.metadata.name.as_deref(),
            Some("exfilpolicies.exfilguard.io")
        );
        assert_eq!(crd.spec.scope, "Namespaced");
        let v = &crd.spec.versions[0];
        assert!(v.subresources.as_ref().unwrap().status.is_some());
        let schema = serde_json::to_value(&v.schema).unwrap();
        let spec = &schema["openAPIV3Schema"]["properties"]["spec"]["properties"];
        assert_eq!(
            spec["action"]["enum"],
            serde_json::json!(["alert", "lockdown", "dry-run"])
        );
        assert_eq!(
            spec["volume"]["properties"]["window"]["pattern"],
            DURATION_PATTERN
        );
        assert!(spec["pod_selector"]["properties"]["matchLabels"].is_object());
        let inc = ExfilIncident::crd();
        assert_eq!(
            inc.metadata.name.as_deref(),
            Some("exfilincidents.exfilguard.io")
        );
        assert!(
            inc.spec.versions[0]
                .subresources
                .as_ref()
                .unwrap()
                .status
                .is_some()
        );
    }

    #[test]
    fn agent_policy_documents_read_as_specs() {
        // The agent's policy file format (agent/src/policy.rs) as an
        // ExfilPolicy spec, plus a pod selector.
        let spec: ExfilPolicySpec = serde_norway::from_str(
            r#"
pod_selector: {matchLabels: {app: etl}}
action: lockdown
volume: {window: 10m, threshold_bytes: 100000000}
dns: {encoded_bytes: 2400, cluster_domains: [cluster.local]}
allowlist: {cidrs: [10.20.0.0/16], domains: [backup.example.com]}
hard_cap: {bytes: 500000000, window: 1h}
"#,
        )
        .unwrap();
        assert_eq!(spec.action, Some(Action::Lockdown));
        assert_eq!(
            spec.volume.as_ref().unwrap().threshold_bytes,
            Some(100_000_000)
        );
        assert!(spec.validate().is_empty(), "{:?}", spec.validate());
    }

    #[test]
    fn validation_names_each_field() {
        let spec = ExfilPolicySpec {
            volume: Some(VolumeRules {
                window: Some("10x".into()),
                threshold_bytes: Some(0),
                spike_factor: Some(0.5),
                ..Default::default()
            }),
            allowlist: Some(Allowlist {
                cidrs: vec!["10.0.0.0/33".into(), "10.1.0.0/16".into(), "nope".into()],
                domains: vec!["ok.example".into(), "bad domain".into()],
            }),
            hard_cap: Some(HardCap {
                bytes: 0,
                window: "0s".into(),
            }),
            update_interval: Some("m".into()),
            ..Default::default()
        };
        let errs: Vec<String> = spec.validate().iter().map(ToString::to_string).collect();
        for field in [
            "volume.window: ",
            "volume.spike_factor: ",
            "volume.threshold_bytes: ",
            "allowlist.cidrs[0]: ",
            "allowlist.cidrs[2]: ",
            "allowlist.domains[1]: ",
            "hard_cap.window: ",
            "hard_cap.bytes: ",
            "update_interval: ",
        ] {
            assert!(
                errs.iter().any(|e| e.starts_with(field)),
                "{field} missing in {errs:#?}"
            );
        }
        assert_eq!(errs.len(), 9, "{errs:#?}");
    }
}
