//! The detector policy the controller pushes to every agent (`PolicyUpdate`):
//! read from a YAML file, validated, re-read on SIGHUP and sent to every
//! connected agent, and to each agent that connects later right after Welcome.
//!
//! The agent lays it over its own policy file: thresholds, window, action and
//! hard cap replace the node's; allowlists are added to the node's.

use std::{path::Path, time::Duration};

use exfilguard_proto::v1::{PolicyAction, PolicyUpdate};
use serde::Deserialize;

use crate::{Error, Result, time::now_ms};

/// The file's shape. Every field is optional: absent keeps the node's own.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodePolicyFile {
    /// Volume detector: external bytes per workload per window.
    pub volume_threshold_bytes: Option<u64>,
    /// Volume detector window (`30s`, `10m`, `1h`).
    pub volume_window: Option<String>,
    /// `alert`, `lockdown` or `dry-run`.
    pub action: Option<String>,
    /// Cluster-internal CIDRs (pod, service, node ranges).
    pub internal_cidrs: Vec<String>,
    /// Allowlisted destination CIDRs.
    pub allow_cidrs: Vec<String>,
    /// Allowlisted registered domains.
    pub allow_domains: Vec<String>,
    /// Egress proxies: internal addresses that count as external.
    pub egress_proxy_cidrs: Vec<String>,
    /// In-kernel hard cap on every workload's external egress.
    pub hard_cap: Option<HardCapFile>,
}

/// A hard cap in the file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HardCapFile {
    /// Bytes per window (> 0).
    pub bytes: u64,
    /// Window (`1m`, ...; at least 1 s).
    pub window: String,
}

fn invalid(field: &str, problem: impl std::fmt::Display) -> Error {
    Error::InvalidArgument(format!("agent policy: {field}: {problem}"))
}

/// Parses `30s`, `10m`, `1h`, `500ms`, `1d`.
fn duration(field: &str, s: &str) -> Result<Duration> {
    exfilguard_policy::parse_duration(s).map_err(|problem| invalid(field, problem))
}

fn cidrs(field: &str, items: &[String]) -> Result<()> {
    for (i, c) in items.iter().enumerate() {
        exfilguard_policy::parse_cidr(c)
            .map_err(|problem| invalid(&format!("{field}[{i}]"), problem))?;
    }
    Ok(())
}

impl NodePolicyFile {
    /// Parses and validates YAML.
    pub fn from_yaml(text: &str) -> Result<Self> {
        let f: NodePolicyFile = if text.trim().is_empty() {
            NodePolicyFile::default()
        } else {
            serde_norway::from_str(text).map_err(|e| invalid("YAML", e))?
        };
        f.to_update(1)?;
        Ok(f)
    }

    /// The `PolicyUpdate` with version `version`.
    pub fn to_update(&self, version: u64) -> Result<PolicyUpdate> {
        let action = match self.action.as_deref() {
            None => PolicyAction::Unspecified,
            Some("alert") => PolicyAction::Alert,
            Some("lockdown") => PolicyAction::Lockdown,
            Some("dry-run") => PolicyAction::DryRun,
            Some(other) => {
                return Err(invalid(
                    "action",
                    format!("{other:?} is not one of alert, lockdown, dry-run"),
                ));
            }
        };
        let window = match &self.volume_window {
            Some(w) => {
                let d = duration("volume_window", w)?;
                if d < Duration::from_secs(1) {
                    return Err(invalid("volume_window", "must be at least 1s"));
                }
                u32::try_from(d.as_secs()).map_err(|_| invalid("volume_window", "too long"))?
            }
            None => 0,
        };
        if self.volume_threshold_bytes == Some(0) {
            return Err(invalid("volume_threshold_bytes", "must be greater than 0"));
        }
        cidrs("internal_cidrs", &self.internal_cidrs)?;
        cidrs("allow_cidrs", &self.allow_cidrs)?;
        cidrs("egress_proxy_cidrs", &self.egress_proxy_cidrs)?;
        for (i, d) in self.allow_domains.iter().enumerate() {
            exfilguard_policy::check_domain(d)
                .map_err(|problem| invalid(&format!("allow_domains[{i}]"), problem))?;
        }
        let (cap_bytes, cap_window) = match &self.hard_cap {
            Some(c) => {
                if c.bytes == 0 {
                    return Err(invalid("hard_cap.bytes", "must be greater than 0"));
                }
                let w = duration("hard_cap.window", &c.window)?;
                if w < Duration::from_secs(1) {
                    return Err(invalid("hard_cap.window", "must be at least 1s"));
                }
                (
                    c.bytes,
                    u32::try_from(w.as_secs())
                        .map_err(|_| invalid("hard_cap.window", "too long"))?,
                )
            }
            None => (0, 0),
        };
        Ok(PolicyUpdate {
            version,
            volume_threshold_bytes: self.volume_threshold_bytes.unwrap_or(0),
            volume_window_seconds: window,
            action: action as i32,
            internal_cidrs: self.internal_cidrs.clone(),
            allow_cidrs: self.allow_cidrs.clone(),
            allow_domains: self.allow_domains.clone(),
            egress_proxy_cidrs: self.egress_proxy_cidrs.clone(),
            hard_cap_bytes: cap_bytes,
            hard_cap_window_seconds: cap_window,
            // ExfilPolicy objects add these (k8s::policy_reconciler).
            overrides: Vec::new(),
        })
    }
}

/// Reads and validates the file; the version is the load time in Unix ms,
/// so a reload (or a restarted controller) always supersedes what agents have.
pub fn load(path: &Path) -> Result<PolicyUpdate> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.display().to_string(),
        source,
    })?;
    NodePolicyFile::from_yaml(&text)
        .and_then(|f| f.to_update(now_ms()))
        .map_err(|e| match e {
            Error::InvalidArgument(m) => Error::InvalidArgument(format!("{}: {m}", path.display())),
            other => other,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_file_becomes_an_update() {
        let f = NodePolicyFile::from_yaml(
            "volume_threshold_bytes: 5000000\nvolume_window: 30s\naction: lockdown\n\
             allow_cidrs: [192.0.2.0/24]\nallow_domains: [backup.example]\n\
             internal_cidrs: ['10.0.0.0/8', 'fd00::/8']\nhard_cap: {bytes: 1048576, window: 1m}\n",
        )
        .unwrap();
        let u = f.to_update(7).unwrap();
        assert_eq!(u.version, 7);
        assert_eq!(u.volume_threshold_bytes, 5_000_000);
        assert_eq!(u.volume_window_seconds, 30);
        assert_eq!(u.action, PolicyAction::Lockdown as i32);
        assert_eq!(u.hard_cap_bytes, 1 << 20);
        assert_eq!(u.hard_cap_window_seconds, 60);
        assert_eq!(u.internal_cidrs.len(), 2);
    }

    #[test]
    fn errors_name_the_field() {
        for (yaml, field) in [
            ("action: nuke\n", "action"),
            ("volume_window: 10\n", "volume_window"),
            ("volume_threshold_bytes: 0\n", "volume_threshold_bytes"),
            ("allow_cidrs: [10.0.0.0/33]\n", "allow_cidrs[0]"),
            ("allow_cidrs: [nonsense]\n", "allow_cidrs[0]"),
            ("allow_domains: ['a b']\n", "allow_domains[0]"),
            ("hard_cap: {bytes: 0, window: 1m}\n", "hard_cap.bytes"),
            ("hard_cap: {bytes: 5, window: 10ms}\n", "hard_cap.window"),
            ("unknown_field: 1\n", "YAML"),
            ("volume_threshold_bytes: [1]\n", "YAML"),
        ] {
            let e = NodePolicyFile::from_yaml(yaml).unwrap_err().to_string();
            assert!(e.contains(field), "{yaml:?}: {e}");
        }
        assert!(NodePolicyFile::from_yaml("").is_ok());
    }
}
