//! Alert sink configuration: the `alerts:` section of the controller's config
//! file, and the secrets it points at (read from files or the environment,
//! never printed).

use std::{fmt, path::PathBuf, time::Duration};

use serde::Deserialize;

/// A configuration problem, reported when the controller starts.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A secret or config file could not be read.
    #[error("read {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid YAML for this schema.
    #[error("parse {path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// What the parser said (line and column included).
        message: String,
    },
    /// A sink's settings do not make sense.
    #[error("alert sink {sink:?}: {message}")]
    Invalid {
        /// The sink's name.
        sink: String,
        /// What is wrong.
        message: String,
    },
}

/// A secret value (webhook URL with its token, PagerDuty routing key). Its
/// `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Where a secret comes from: inline (discouraged), a file, or an environment variable.
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretSource {
    /// The value itself.
    #[serde(default)]
    pub value: Option<String>,
    /// A file holding it (trailing newline ignored), e.g. a mounted Kubernetes Secret.
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// An environment variable holding it.
    #[serde(default)]
    pub env: Option<String>,
}

impl fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretSource")
            .field("value", &self.value.as_ref().map(|_| "<redacted>"))
            .field("file", &self.file)
            .field("env", &self.env)
            .finish()
    }
}

impl SecretSource {
    fn is_set(&self) -> bool {
        self.value.is_some() || self.file.is_some() || self.env.is_some()
    }

    /// Reads the secret; exactly one source must be given.
    pub fn resolve(&self, sink: &str, what: &str) -> Result<Secret, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            sink: sink.to_string(),
            message,
        };
        let given = [
            self.value.is_some(),
            self.file.is_some(),
            self.env.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if given != 1 {
            return Err(invalid(format!(
                "{what}: give exactly one of value, file, env ({given} given)"
            )));
        }
        let raw = if let Some(v) = &self.value {
            v.clone()
        } else if let Some(path) = &self.file {
            std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
                path: path.display().to_string(),
                source,
            })?
        } else {
            let var = self.env.as_deref().unwrap_or_default();
            std::env::var(var)
                .map_err(|_| invalid(format!("{what}: environment variable {var} is not set")))?
        };
        let value = raw.trim();
        if value.is_empty() {
            return Err(invalid(format!("{what} is empty")));
        }
        Ok(Secret::new(value))
    }
}

/// The kind of sink, which decides the request's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SinkKind {
    /// Generic webhook with the runbook's JSON shape.
    Webhook,
    /// PagerDuty Events API v2.
    Pagerduty,
    /// Prometheus Alertmanager `/api/v2/alerts`.
    Alertmanager,
    /// Slack-compatible incoming webhook.
    Slack,
}

impl SinkKind {
    /// `webhook`, `pagerduty`, ...
    pub fn as_str(self) -> &'static str {
        match self {
            SinkKind::Webhook => "webhook",
            SinkKind::Pagerduty => "pagerduty",
            SinkKind::Alertmanager => "alertmanager",
            SinkKind::Slack => "slack",
        }
    }
}

/// PagerDuty's public Events API v2 endpoint (the default `url` of a `pagerduty` sink).
pub const PAGERDUTY_EVENTS_URL: &str = "https://events.pagerduty.com/v2/enqueue";

/// Severities an incident may have, as routing keys.
pub const SEVERITIES: &[&str] = &["low", "high", "critical"];

/// One sink as written in the config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    /// Unique name; outbox rows and timeline entries refer to it. Renaming a
    /// sink orphans its pending deliveries (they fail with a timeline entry).
    pub name: String,
    /// The sink's protocol.
    pub kind: SinkKind,
    /// Endpoint. Webhook and Slack URLs carry tokens, so this is a secret
    /// source; for PagerDuty it defaults to the public Events API; for
    /// Alertmanager it is the base URL (`http://alertmanager:9093`).
    #[serde(default)]
    pub url: SecretSource,
    /// PagerDuty integration (routing) key.
    #[serde(default)]
    pub routing_key: SecretSource,
    /// Severities routed to this sink; all when empty.
    #[serde(default)]
    pub severities: Vec<String>,
    /// `payload.source` (PagerDuty) / `generatorURL`-free source label; default `exfilguard-controller`.
    #[serde(default)]
    pub source: Option<String>,
}

/// Retry behaviour shared by all sinks.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// First back-off, milliseconds (doubles per attempt, with jitter).
    pub initial_backoff_ms: u64,
    /// Longest back-off, milliseconds.
    pub max_backoff_ms: u64,
    /// Attempts before a delivery is given up (and the timeline says so).
    pub max_attempts: u32,
    /// Per-request timeout, milliseconds.
    pub timeout_ms: u64,
    /// Longest `Retry-After` honoured, milliseconds (a sink asking for a day is
    /// capped so an incident's alert is not parked that long).
    pub max_retry_after_ms: u64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            initial_backoff_ms: 1_000,
            max_backoff_ms: 300_000,
            // 1+2+4+...+300 s: about 40 minutes of trying.
            max_attempts: 16,
            timeout_ms: 10_000,
            max_retry_after_ms: 3_600_000,
        }
    }
}

impl RetryConfig {
    /// Per-request timeout.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

/// The `alerts:` section.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsConfig {
    /// Retry behaviour.
    #[serde(default)]
    pub retry: RetryConfig,
    /// The sinks.
    #[serde(default)]
    pub sinks: Vec<SinkConfig>,
}

/// A sink ready to use: secrets read, URL checked.
#[derive(Debug, Clone)]
pub struct Sink {
    /// Its name.
    pub name: String,
    /// Its protocol.
    pub kind: SinkKind,
    /// Where requests go.
    pub url: Secret,
    /// PagerDuty routing key.
    pub routing_key: Option<Secret>,
    /// Severities it takes (empty: all).
    pub severities: Vec<String>,
    /// Source name shown by the sink.
    pub source: String,
}

impl Sink {
    /// Whether alerts of `severity` go to this sink.
    pub fn takes(&self, severity: &str) -> bool {
        self.severities.is_empty() || self.severities.iter().any(|s| s == severity)
    }
}

impl AlertsConfig {
    /// Reads the secrets and checks every sink.
    pub fn resolve(&self) -> Result<Vec<Sink>, ConfigError> {
        let mut sinks: Vec<Sink> = Vec::with_capacity(self.sinks.len());
        for c in &self.sinks {
            let invalid = |message: String| ConfigError::Invalid {
                sink: c.name.clone(),
                message,
            };
            if c.name.is_empty() {
                return Err(invalid("name is empty".into()));
            }
            if sinks.iter().any(|s| s.name == c.name) {
                return Err(invalid("two sinks have this name".into()));
            }
            for s in &c.severities {
                if !SEVERITIES.contains(&s.as_str()) {
                    return Err(invalid(format!(
                        "unknown severity {s:?} (expected one of {SEVERITIES:?})"
                    )));
                }
            }
            let url = match (c.kind, c.url.is_set()) {
                (SinkKind::Pagerduty, false) => Secret::new(PAGERDUTY_EVENTS_URL),
                _ => c.url.resolve(&c.name, "url")?,
            };
            // Only the scheme is echoed: the rest may hold a token.
            let scheme = url.expose().split("://").next().unwrap_or_default();
            if !matches!(scheme, "http" | "https") || !url.expose().contains("://") {
                return Err(invalid(
                    "url must start with http:// or https://".to_string(),
                ));
            }
            let routing_key = match c.kind {
                SinkKind::Pagerduty => Some(c.routing_key.resolve(&c.name, "routing_key")?),
                _ if c.routing_key.is_set() => {
                    return Err(invalid(
                        "routing_key is only for kind: pagerduty".to_string(),
                    ));
                }
                _ => None,
            };
            sinks.push(Sink {
                name: c.name.clone(),
                kind: c.kind,
                url,
                routing_key,
                severities: c.severities.clone(),
                source: c
                    .source
                    .clone()
                    .unwrap_or_else(|| "exfilguard-controller".into()),
            });
        }
        if self.retry.max_attempts == 0 {
            return Err(ConfigError::Invalid {
                sink: "*".into(),
                message: "retry.max_attempts must be at least 1".into(),
            });
        }
        Ok(sinks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> AlertsConfig {
        serde_norway::from_str(yaml).unwrap()
    }

    #[test]
    fn secrets_come_from_files_or_env_and_never_print() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("pd-key");
        std::fs::write(&key, "R0UT1NGKEY\n").unwrap();
        let cfg = parse(&format!(
            "sinks:\n- name: pd\n  kind: pagerduty\n  routing_key: {{file: {}}}\n  severities: [critical]\n\
             - name: hook\n  kind: webhook\n  url: {{value: 'https://hooks.example/T0K3N'}}\n",
            key.display()
        ));
        let sinks = cfg.resolve().unwrap();
        assert_eq!(
            sinks[0].routing_key.as_ref().unwrap().expose(),
            "R0UT1NGKEY"
        );
        assert_eq!(sinks[0].url.expose(), PAGERDUTY_EVENTS_URL);
        assert!(sinks[0].takes("critical") && !sinks[0].takes("high"));
        assert!(sinks[1].takes("low"));
        let shown = format!("{sinks:?} {cfg:?}");
        assert!(!shown.contains("R0UT1NGKEY"), "{shown}");
        assert!(!shown.contains("T0K3N"), "{shown}");
    }

    #[test]
    fn bad_sinks_are_refused_with_the_reason() {
        let err = |yaml: &str| parse(yaml).resolve().unwrap_err().to_string();
        assert!(err("sinks:\n- {name: a, kind: webhook}\n").contains("exactly one"));
        assert!(
            err("sinks:\n- {name: a, kind: pagerduty, routing_key: {env: EXFILGUARD_TEST_UNSET_VAR}}\n")
                .contains("EXFILGUARD_TEST_UNSET_VAR is not set")
        );
        assert!(
            err("sinks:\n- {name: a, kind: slack, url: {value: 'ftp://x'}}\n").contains("http")
        );
        assert!(
            err(
                "sinks:\n- {name: a, kind: slack, url: {value: 'http://x'}, severities: [urgent]}\n"
            )
            .contains("unknown severity")
        );
        assert!(
            err("sinks:\n- {name: a, kind: slack, url: {value: 'http://x'}}\n- {name: a, kind: slack, url: {value: 'http://y'}}\n")
                .contains("two sinks")
        );
        assert!(
            serde_norway::from_str::<AlertsConfig>("sinks:\n- {name: a, kind: email}\n").is_err()
        );
    }
}
