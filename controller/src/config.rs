//! The controller's config file (`exfilguard-controller serve --config FILE`):
//! YAML for the settings that do not fit flags, such as the alert sinks.
//!
//! ```yaml
//! alerts:
//!   retry: {initial_backoff_ms: 1000, max_backoff_ms: 300000, max_attempts: 16}
//!   sinks:
//!     - name: security-webhook
//!       kind: webhook            # webhook | pagerduty | alertmanager | slack
//!       url: {env: SECURITY_WEBHOOK_URL}
//!       severities: [critical, high]
//!     - name: pagerduty
//!       kind: pagerduty
//!       routing_key: {file: /run/secrets/pagerduty-routing-key}
//!       severities: [critical]
//!     - name: alertmanager
//!       kind: alertmanager
//!       url: {value: "http://alertmanager.monitoring:9093"}
//! reports:
//!   time_zone: Europe/Berlin     # local times beside UTC in reports
//! ```

use std::path::Path;

use serde::Deserialize;

use crate::{
    alerts::{AlertsConfig, ConfigError},
    report::{ReportConfig, parse_zone},
};

/// Everything the config file may hold; unknown keys are errors (a typo must
/// not silently disable a sink).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Alert sinks and their retry policy.
    #[serde(default)]
    pub alerts: AlertsConfig,
    /// Report settings (local time zone).
    #[serde(default)]
    pub reports: ReportConfig,
}

impl FileConfig {
    /// Reads and checks `path` (secrets included, so a missing one fails at start).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let config: FileConfig = serde_norway::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        config.alerts.resolve()?;
        parse_zone(&config.reports.time_zone).map_err(|message| ConfigError::Invalid {
            sink: "reports.time_zone".into(),
            message,
        })?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_example_parses_and_typos_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(
            &path,
            "alerts:\n  retry: {max_attempts: 3}\n  sinks:\n    - name: am\n      kind: alertmanager\n      url: {value: 'http://127.0.0.1:9093'}\n",
        )
        .unwrap();
        let c = FileConfig::load(&path).unwrap();
        assert_eq!(c.alerts.retry.max_attempts, 3);
        assert_eq!(c.alerts.sinks.len(), 1);
        std::fs::write(&path, "alert:\n  sinks: []\n").unwrap();
        let err = FileConfig::load(&path).unwrap_err().to_string();
        assert!(err.contains("unknown field `alert`"), "{err}");
        let err = FileConfig::load(&dir.path().join("missing.yaml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.yaml"), "{err}");
    }
}
