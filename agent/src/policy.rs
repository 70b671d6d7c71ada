//! The detection policy: thresholds, windows, allowlists, overrides and the
//! action to take. Loaded from YAML in standalone mode; validated as a whole
//! so a bad file is rejected with the field and the problem, and the policy in
//! force stays.
use std::{collections::BTreeMap, net::IpAddr, path::Path, time::Duration};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Why a policy was rejected.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The file could not be read.
    #[error("reading policy {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Not valid YAML, or a field of the wrong type or unknown name.
    #[error("policy is not valid: {0}")]
    Yaml(#[from] serde_norway::Error),
    /// A field has a value out of range.
    #[error("policy field `{field}`: {problem}")]
    Invalid {
        /// Dotted path of the field.
        field: String,
        /// What is wrong with it.
        problem: String,
    },
}

/// What the controller (or the agent, standalone) does on a detection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// Raise an incident and alert.
    #[default]
    Alert,
    /// Alert and cut the workload's external egress.
    Lockdown,
    /// Record the detection only.
    DryRun,
}

/// A duration written as `30s`, `10m`, `1h` or `500ms`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Span(pub Duration);

impl TryFrom<String> for Span {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        parse_duration(&s).map(Span)
    }
}

impl From<Span> for String {
    fn from(s: Span) -> String {
        format!("{}ms", s.0.as_millis())
    }
}

/// Parses `500ms`, `30s`, `10m`, `1h`, `1d` (the syntax every policy shares).
pub use exfilguard_policy::parse_duration;

/// Volume thresholds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VolumeRules {
    /// Sliding window.
    pub window: Span,
    /// External egress bytes per workload in the window above which the
    /// rule fires (the runbook: `> 100000000` in 10 minutes).
    pub threshold_bytes: u64,
    /// Same, per destination address and port.
    pub per_destination_bytes: u64,
    /// A minute of egress above `spike_factor` times the learned per-minute
    /// baseline (and above `spike_min_bytes`) is a spike.
    pub spike_factor: f64,
    /// Smallest minute of egress that can be a spike.
    pub spike_min_bytes: u64,
    /// Minutes of history before the baseline is trusted.
    pub spike_warmup_minutes: u32,
}

impl Default for VolumeRules {
    fn default() -> Self {
        Self {
            window: Span(Duration::from_secs(600)),
            threshold_bytes: 100_000_000,
            per_destination_bytes: 100_000_000,
            spike_factor: 20.0,
            spike_min_bytes: 20_000_000,
            spike_warmup_minutes: 10,
        }
    }
}

/// DNS thresholds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsRules {
    /// Sliding window.
    pub window: Span,
    /// Estimated bytes encoded in new names under one registered domain in
    /// the window above which `dns_exfiltration` fires. 10 B/s for 10
    /// minutes is 6000 B; the default catches it after about 4 minutes.
    pub encoded_bytes: u64,
    /// Same, summed over registered domains that each look like a carrier
    /// (`dns_exfiltration_spread`).
    pub spread_encoded_bytes: u64,
    /// Queries per minute to one registered domain that, with mostly unique
    /// names, make a tunnel.
    pub tunnel_queries_per_minute: u64,
    /// Domain suffixes of the cluster (service discovery, never exfiltration).
    pub cluster_domains: Vec<String>,
}

impl Default for DnsRules {
    fn default() -> Self {
        Self {
            window: Span(Duration::from_secs(600)),
            encoded_bytes: 2400,
            spread_encoded_bytes: 3000,
            tunnel_queries_per_minute: 300,
            cluster_domains: vec!["cluster.local".into()],
        }
    }
}

/// Destinations exempt from detection (still counted).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Allowlist {
    /// Networks (e.g. the backup target).
    pub cidrs: Vec<IpNet>,
    /// Domains; subdomains included.
    pub domains: Vec<String>,
}

/// A kernel-enforced byte budget per window.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HardCap {
    /// External egress bytes allowed per window.
    pub bytes: u64,
    /// The window.
    pub window: Span,
}

/// Settings an override may change; absent fields keep the base value.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OverrideSettings {
    /// Action.
    pub action: Option<Action>,
    /// Volume threshold per workload.
    pub threshold_bytes: Option<u64>,
    /// Volume threshold per destination.
    pub per_destination_bytes: Option<u64>,
    /// DNS encoded-bytes threshold.
    pub dns_encoded_bytes: Option<u64>,
    /// Hard cap.
    pub hard_cap: Option<HardCap>,
    /// Extra allowlist.
    pub allowlist: Option<Allowlist>,
}

/// Overrides for workloads in a namespace and/or carrying labels.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Override {
    /// Namespace to match; any when absent.
    #[serde(default)]
    pub namespace: Option<String>,
    /// Labels that must all match.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// What changes.
    #[serde(flatten)]
    pub settings: OverrideSettings,
}

/// The whole policy.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Policy {
    /// Default action.
    pub action: Action,
    /// Volume rules.
    pub volume: VolumeRules,
    /// DNS rules.
    pub dns: DnsRules,
    /// Exempt destinations.
    pub allowlist: Allowlist,
    /// Hard cap applied to every workload, if any.
    pub hard_cap: Option<HardCap>,
    /// First matching override wins.
    pub overrides: Vec<Override>,
    /// How often an open episode may report an update.
    pub update_interval: Option<Span>,
}

/// Who a workload is, as far as policy matching needs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkloadMeta {
    /// Namespace, when known.
    pub namespace: Option<String>,
    /// Labels, when known.
    pub labels: BTreeMap<String, String>,
}

/// The settings in force for one workload.
#[derive(Clone, Debug, PartialEq)]
pub struct Effective {
    /// Action.
    pub action: Action,
    /// Volume threshold.
    pub threshold_bytes: u64,
    /// Per-destination threshold.
    pub per_destination_bytes: u64,
    /// DNS encoded-bytes threshold.
    pub dns_encoded_bytes: u64,
    /// Hard cap.
    pub hard_cap: Option<HardCap>,
    /// Extra allowlisted networks.
    pub extra_cidrs: Vec<IpNet>,
}

fn invalid(field: impl Into<String>, problem: impl Into<String>) -> PolicyError {
    PolicyError::Invalid {
        field: field.into(),
        problem: problem.into(),
    }
}

fn check_domain(field: &str, d: &str) -> Result<(), PolicyError> {
    exfilguard_policy::check_domain(d).map_err(|problem| invalid(field, problem))
}

impl Policy {
    /// Parses and validates YAML.
    pub fn from_yaml(text: &str) -> Result<Self, PolicyError> {
        // An empty file is the default policy, not an error.
        let p: Policy = if text.trim().is_empty() {
            Policy::default()
        } else {
            serde_norway::from_str(text)?
        };
        p.validate()?;
        Ok(p)
    }

    /// Reads, parses and validates a file.
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_yaml(&text)
    }

    /// Checks every field's range.
    pub fn validate(&self) -> Result<(), PolicyError> {
        let v = &self.volume;
        if v.window.0 < Duration::from_secs(1) || v.window.0 > Duration::from_secs(86_400) {
            return Err(invalid("volume.window", "must be between 1s and 24h"));
        }
        if v.threshold_bytes == 0 {
            return Err(invalid("volume.threshold_bytes", "must be greater than 0"));
        }
        if v.per_destination_bytes == 0 {
            return Err(invalid(
                "volume.per_destination_bytes",
                "must be greater than 0",
            ));
        }
        if !(v.spike_factor.is_finite() && v.spike_factor > 1.0) {
            return Err(invalid("volume.spike_factor", "must be a number above 1"));
        }
        let d = &self.dns;
        if d.window.0 < Duration::from_secs(10) || d.window.0 > Duration::from_secs(86_400) {
            return Err(invalid("dns.window", "must be between 10s and 24h"));
        }
        if d.encoded_bytes == 0 {
            return Err(invalid("dns.encoded_bytes", "must be greater than 0"));
        }
        if d.spread_encoded_bytes == 0 {
            return Err(invalid(
                "dns.spread_encoded_bytes",
                "must be greater than 0",
            ));
        }
        if d.tunnel_queries_per_minute == 0 {
            return Err(invalid(
                "dns.tunnel_queries_per_minute",
                "must be greater than 0",
            ));
        }
        for (i, c) in d.cluster_domains.iter().enumerate() {
            check_domain(&format!("dns.cluster_domains[{i}]"), c)?;
        }
        check_allowlist("allowlist", &self.allowlist)?;
        if let Some(c) = &self.hard_cap {
            check_cap("hard_cap", c)?;
        }
        if let Some(u) = self.update_interval
            && u.0 < Duration::from_secs(1)
        {
            return Err(invalid("update_interval", "must be at least 1s"));
        }
        for (i, o) in self.overrides.iter().enumerate() {
            let f = format!("overrides[{i}]");
            if o.namespace.is_none() && o.labels.is_empty() {
                return Err(invalid(
                    &f,
                    "needs a namespace or labels to match (it would apply to everything)",
                ));
            }
            let s = &o.settings;
            if s.threshold_bytes == Some(0) {
                return Err(invalid(
                    format!("{f}.threshold_bytes"),
                    "must be greater than 0",
                ));
            }
            if s.per_destination_bytes == Some(0) {
                return Err(invalid(
                    format!("{f}.per_destination_bytes"),
                    "must be greater than 0",
                ));
            }
            if s.dns_encoded_bytes == Some(0) {
                return Err(invalid(
                    format!("{f}.dns_encoded_bytes"),
                    "must be greater than 0",
                ));
            }
            if let Some(c) = &s.hard_cap {
                check_cap(&format!("{f}.hard_cap"), c)?;
            }
            if let Some(a) = &s.allowlist {
                check_allowlist(&format!("{f}.allowlist"), a)?;
            }
        }
        Ok(())
    }

    /// How often an open episode may report.
    pub fn update_interval_ns(&self) -> u64 {
        self.update_interval
            .map_or(60 * crate::detect::NS, |s| s.0.as_nanos() as u64)
    }

    /// True when `addr` is allowlisted for everyone.
    pub fn allowlisted_addr(&self, addr: IpAddr) -> bool {
        self.allowlist.cidrs.iter().any(|n| n.contains(&addr))
    }

    /// True when `name` (lower case, no trailing dot) is an allowlisted
    /// domain or below one.
    pub fn allowlisted_domain(&self, name: &str) -> bool {
        self.allowlist.domains.iter().any(|d| {
            let d = d.trim_end_matches('.');
            name.len() >= d.len()
                && name[name.len() - d.len()..].eq_ignore_ascii_case(d)
                && (name.len() == d.len() || name.as_bytes()[name.len() - d.len() - 1] == b'.')
        })
    }

    /// Settings in force for a workload: the first matching override over
    /// the base.
    pub fn effective(&self, w: &WorkloadMeta) -> Effective {
        let mut e = Effective {
            action: self.action,
            threshold_bytes: self.volume.threshold_bytes,
            per_destination_bytes: self.volume.per_destination_bytes,
            dns_encoded_bytes: self.dns.encoded_bytes,
            hard_cap: self.hard_cap.clone(),
            extra_cidrs: Vec::new(),
        };
        let hit = self.overrides.iter().find(|o| {
            o.namespace
                .as_ref()
                .is_none_or(|n| w.namespace.as_ref() == Some(n))
                && o.labels.iter().all(|(k, v)| w.labels.get(k) == Some(v))
        });
        if let Some(o) = hit {
            let s = &o.settings;
            e.action = s.action.unwrap_or(e.action);
            e.threshold_bytes = s.threshold_bytes.unwrap_or(e.threshold_bytes);
            e.per_destination_bytes = s.per_destination_bytes.unwrap_or(e.per_destination_bytes);
            e.dns_encoded_bytes = s.dns_encoded_bytes.unwrap_or(e.dns_encoded_bytes);
            if s.hard_cap.is_some() {
                e.hard_cap = s.hard_cap.clone();
            }
            if let Some(a) = &s.allowlist {
                e.extra_cidrs = a.cidrs.clone();
            }
        }
        e
    }
}

fn check_allowlist(field: &str, a: &Allowlist) -> Result<(), PolicyError> {
    for (i, d) in a.domains.iter().enumerate() {
        check_domain(&format!("{field}.domains[{i}]"), d)?;
    }
    for (i, n) in a.cidrs.iter().enumerate() {
        if n.prefix_len() == 0 {
            return Err(invalid(
                format!("{field}.cidrs[{i}]"),
                format!("{n} allowlists every address: detection would be off"),
            ));
        }
    }
    Ok(())
}

fn check_cap(field: &str, c: &HardCap) -> Result<(), PolicyError> {
    if c.bytes == 0 {
        return Err(invalid(format!("{field}.bytes"), "must be greater than 0"));
    }
    if c.window.0 < Duration::from_secs(1) {
        return Err(invalid(format!("{field}.window"), "must be at least 1s"));
    }
    Ok(())
}

/// The policy in force, replaced whole on reload.
#[derive(Debug, Default)]
pub struct PolicyHolder {
    current: std::sync::Arc<Policy>,
}

impl PolicyHolder {
    /// Starts with `p`.
    pub fn new(p: Policy) -> Self {
        Self {
            current: std::sync::Arc::new(p),
        }
    }

    /// The policy in force.
    pub fn get(&self) -> std::sync::Arc<Policy> {
        self.current.clone()
    }

    /// Loads `path`; on success it is in force, on failure the old policy
    /// stays and the error says why.
    pub fn reload(&mut self, path: &Path) -> Result<std::sync::Arc<Policy>, PolicyError> {
        let p = Policy::load(path)?;
        self.current = std::sync::Arc::new(p);
        Ok(self.current.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
action: lockdown
update_interval: 30s
volume:
  window: 5m
  threshold_bytes: 1000000
  per_destination_bytes: 500000
dns:
  encoded_bytes: 1000
  cluster_domains: [cluster.local, corp.internal]
allowlist:
  cidrs: [203.0.113.0/24]
  domains: [backup.example.com]
hard_cap: { bytes: 5000000, window: 1h }
overrides:
  - namespace: backups
    action: dry-run
    threshold_bytes: 50000000000
  - labels: { app: etl }
    dns_encoded_bytes: 9000
"#;

    #[test]
    fn full_policy_parses_and_resolves_overrides() {
        let p = Policy::from_yaml(FULL).unwrap();
        assert_eq!(p.action, Action::Lockdown);
        assert_eq!(p.volume.window.0, Duration::from_secs(300));
        assert_eq!(p.update_interval_ns(), 30 * crate::detect::NS);
        assert!(p.allowlisted_addr("203.0.113.9".parse().unwrap()));
        assert!(!p.allowlisted_addr("198.51.100.1".parse().unwrap()));
        assert!(p.allowlisted_domain("backup.example.com"));
        assert!(p.allowlisted_domain("s3.backup.example.com"));
        assert!(!p.allowlisted_domain("evilbackup.example.com"));
        let base = p.effective(&WorkloadMeta::default());
        assert_eq!(
            (base.action, base.threshold_bytes),
            (Action::Lockdown, 1_000_000)
        );
        let ns = p.effective(&WorkloadMeta {
            namespace: Some("backups".into()),
            ..Default::default()
        });
        assert_eq!(
            (ns.action, ns.threshold_bytes),
            (Action::DryRun, 50_000_000_000)
        );
        let lab = p.effective(&WorkloadMeta {
            namespace: Some("x".into()),
            labels: [("app".into(), "etl".into())].into(),
        });
        assert_eq!(
            (lab.action, lab.dns_encoded_bytes),
            (Action::Lockdown, 9000)
        );
    }

    #[test]
    fn defaults_are_the_runbook() {
        let p = Policy::from_yaml("").unwrap();
        assert_eq!(p.volume.threshold_bytes, 100_000_000);
        assert_eq!(p.volume.window.0, Duration::from_secs(600));
        assert_eq!(p.action, Action::Alert);
    }

    fn err(y: &str) -> String {
        Policy::from_yaml(y).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_field_and_problem() {
        assert!(err("volume: {threshold_bytes: 0}").contains("`volume.threshold_bytes`"));
        assert!(err("volume: {window: 10x}").contains("unknown unit"));
        assert!(err("volume: {threshhold_bytes: 5}").contains("threshhold_bytes"));
        assert!(err("action: nuke").contains("nuke"));
        assert!(err("allowlist: {cidrs: [0.0.0.0/0]}").contains("`allowlist.cidrs[0]`"));
        let e = err("allowlist: {cidrs: [300.1.1.1/8]}");
        assert!(
            e.contains("allowlist.cidrs") && e.contains("invalid IP address"),
            "{e}"
        );
        assert!(err("allowlist: {domains: ['bad domain']}").contains("`allowlist.domains[0]`"));
        assert!(err("overrides: [{action: alert}]").contains("`overrides[0]`"));
        assert!(
            err("overrides: [{namespace: a, hard_cap: {bytes: 0, window: 1s}}]")
                .contains("`overrides[0].hard_cap.bytes`")
        );
        assert!(err("dns: {window: 1s}").contains("`dns.window`"));
        assert!(err("volume: {spike_factor: .nan}").contains("`volume.spike_factor`"));
        assert!(err(": : :").contains("not valid"));
    }

    #[test]
    fn reload_keeps_old_policy_on_error() {
        let dir = std::env::temp_dir().join(format!("exfilguard-policy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("p.yaml");
        std::fs::write(&f, "volume: {threshold_bytes: 5}").unwrap();
        let mut h = PolicyHolder::new(Policy::default());
        assert_eq!(h.reload(&f).unwrap().volume.threshold_bytes, 5);
        std::fs::write(&f, "volume: {threshold_bytes: -1}").unwrap();
        assert!(h.reload(&f).is_err());
        assert_eq!(h.get().volume.threshold_bytes, 5);
        assert!(h.reload(&dir.join("missing.yaml")).is_err());
        assert_eq!(h.get().volume.threshold_bytes, 5);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
