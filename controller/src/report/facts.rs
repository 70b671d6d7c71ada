//! The facts a report states, gathered once from the incident, its evidence
//! records and the workload's stored egress. Every renderer and template
//! reads these; none goes back to the raw records.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use exfilguard_proto::v1::{Incident, IncidentState};
use serde_json::Value;

use crate::{json, store::EgressPoint};

/// 72 hours (GDPR Art. 33(1)), counted here from the first detection.
pub const NOTIFICATION_WINDOW_MS: u64 = 72 * 3600 * 1000;

/// One destination the workload sent to, from the detections' top flows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestinationFact {
    /// `203.0.113.9:443/tcp`.
    pub endpoint: String,
    /// Domain it was looked up as, if the agent saw the DNS answer.
    pub domain: String,
    /// Largest byte count any one detection window saw to it.
    pub bytes: u64,
}

/// One DNS query from the evidence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsFact {
    /// Query name.
    pub name: String,
    /// Query type.
    pub qtype: String,
    /// Response code (empty: no answer seen).
    pub rcode: String,
    /// When (RFC 3339).
    pub at: String,
}

/// A timeline entry that was an action (not an agent's detection).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActionFact {
    /// When (Unix ms).
    pub at_ms: u64,
    /// Who.
    pub actor: String,
    /// What.
    pub what: String,
}

/// Everything a report says, in one place.
#[derive(Debug, Clone)]
pub struct Facts {
    /// Incident id.
    pub id: String,
    /// `open`, `contained`, ...
    pub state: String,
    /// `critical`, ...
    pub severity: String,
    /// Detection type.
    pub kind: String,
    /// Policy action.
    pub action: String,
    /// `ns/pod` or cgroup path.
    pub workload: String,
    /// Owner (`StatefulSet db`), empty if unknown.
    pub owner: String,
    /// Container name, empty if unknown.
    pub container: String,
    /// Node.
    pub node: String,
    /// Newest detection's summary.
    pub summary: String,
    /// First detection's summary (from its evidence record; else the newest).
    pub first_summary: String,
    /// First detection (Unix ms).
    pub detected_ms: u64,
    /// When containment was applied, if it was.
    pub contained_ms: Option<u64>,
    /// When the incident was released or resolved, if it was.
    pub closed_ms: Option<u64>,
    /// Who acknowledged it (empty: nobody yet).
    pub acknowledged_by: String,
    /// Detections correlated into it.
    pub detection_count: u64,
    /// Bytes sent (estimate from the detections).
    pub bytes_estimate: u64,
    /// External bytes in the stored flow reports over the chart's span.
    pub egress_external_bytes: u64,
    /// Destinations, largest first.
    pub destinations: Vec<DestinationFact>,
    /// Registered domains the DNS detector keyed on.
    pub registered_domains: Vec<String>,
    /// DNS queries, in time order (bounded).
    pub dns: Vec<DnsFact>,
    /// The detector's threshold and window, from the first detection that had one.
    pub threshold: Option<(u64, u32)>,
    /// Actions taken.
    pub actions: Vec<ActionFact>,
    /// Timeline: (Unix ms, actor, cause, state).
    pub timeline: Vec<(u64, String, String, String)>,
    /// Evidence records: (detection id, SHA-256, stored at).
    pub evidence: Vec<(String, String, u64)>,
    /// Regulatory notification deadline (Unix ms).
    pub deadline_ms: u64,
    /// When the report was made (Unix ms).
    pub now_ms: u64,
    /// Local zone for people.
    pub zone: Tz,
    /// Workload egress per flow-report window.
    pub egress: Vec<EgressPoint>,
}

/// DNS queries shown at most.
const MAX_DNS: usize = 20;
/// Destinations shown at most.
const MAX_DESTINATIONS: usize = 10;

fn s(v: Value) -> String {
    v.as_str()
        .map(str::to_string)
        .unwrap_or_else(|| v.to_string())
}

impl Facts {
    /// Gathers the facts of `incident` (with timeline and evidence).
    pub fn gather(incident: &Incident, egress: &[EgressPoint], now_ms: u64, zone: Tz) -> Facts {
        let w = incident.workload.clone().unwrap_or_default();
        let contained = IncidentState::Contained as i32;
        let closed = [
            IncidentState::Released as i32,
            IncidentState::Resolved as i32,
        ];
        let mut destinations: BTreeMap<String, DestinationFact> = BTreeMap::new();
        let mut domains: Vec<String> = Vec::new();
        let mut dns: BTreeMap<(String, String), DnsFact> = BTreeMap::new();
        let mut threshold = None;
        for e in &incident.evidence {
            let Ok(d) = serde_json::from_str::<Value>(&e.json) else {
                continue;
            };
            if threshold.is_none()
                && let Some(t) = d["threshold"].as_u64().filter(|t| *t > 0)
            {
                threshold = Some((t, d["window_seconds"].as_u64().unwrap_or(0) as u32));
            }
            let ev = &d["evidence"];
            for f in ev["top_flows"].as_array().into_iter().flatten() {
                if f["external"] == Value::Bool(false) {
                    continue;
                }
                let endpoint = format!(
                    "{}:{}/{}",
                    s(f["address"].clone()),
                    f["port"],
                    s(f["protocol"].clone())
                );
                let bytes = f["bytes"].as_u64().unwrap_or(0);
                let entry = destinations
                    .entry(endpoint.clone())
                    .or_insert(DestinationFact {
                        endpoint,
                        domain: String::new(),
                        bytes: 0,
                    });
                entry.bytes = entry.bytes.max(bytes);
                if let Some(domain) = f["domain"].as_str().filter(|d| !d.is_empty()) {
                    entry.domain = domain.to_string();
                }
            }
            if let Some(rd) = ev["registered_domain"].as_str().filter(|d| !d.is_empty())
                && !domains.iter().any(|d| d == rd)
            {
                domains.push(rd.to_string());
            }
            for q in ev["dns_samples"].as_array().into_iter().flatten() {
                let fact = DnsFact {
                    name: s(q["query_name"].clone()),
                    qtype: s(q["query_type"].clone()),
                    rcode: s(q["response_code"].clone()),
                    at: s(q["at"].clone()),
                };
                dns.entry((fact.name.clone(), fact.qtype.clone()))
                    .or_insert(fact);
            }
        }
        let mut destinations: Vec<DestinationFact> = destinations.into_values().collect();
        destinations.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.endpoint.cmp(&b.endpoint)));
        destinations.truncate(MAX_DESTINATIONS);
        let mut dns: Vec<DnsFact> = dns.into_values().collect();
        dns.sort_by(|a, b| a.at.cmp(&b.at).then(a.name.cmp(&b.name)));
        dns.truncate(MAX_DNS);
        let timeline: Vec<(u64, String, String, String)> = incident
            .timeline
            .iter()
            .map(|t| {
                (
                    t.at_unix_ms,
                    t.actor.clone(),
                    t.cause.clone(),
                    s(json::state(t.state)),
                )
            })
            .collect();
        let actions = incident
            .timeline
            .iter()
            .filter(|t| !t.actor.starts_with("agent:"))
            .map(|t| ActionFact {
                at_ms: t.at_unix_ms,
                actor: t.actor.clone(),
                what: t.cause.clone(),
            })
            .collect();
        Facts {
            id: incident.id.clone(),
            state: s(json::state(incident.state)),
            severity: s(json::severity(incident.severity)),
            kind: s(json::kind(incident.kind)),
            action: s(json::action(incident.action)),
            workload: json::workload_name(incident.workload.as_ref()),
            owner: if w.owner_kind.is_empty() {
                String::new()
            } else {
                format!("{} {}", w.owner_kind, w.owner_name)
            },
            container: w.container.clone(),
            node: incident.node.clone(),
            summary: incident.summary.clone(),
            first_summary: incident
                .evidence
                .first()
                .and_then(|e| serde_json::from_str::<Value>(&e.json).ok())
                .and_then(|d| d["summary"].as_str().map(str::to_string))
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| incident.summary.clone()),
            detected_ms: incident.opened_at_unix_ms,
            contained_ms: incident
                .timeline
                .iter()
                .find(|t| t.state == contained)
                .map(|t| t.at_unix_ms),
            closed_ms: incident
                .timeline
                .iter()
                .find(|t| closed.contains(&t.state))
                .map(|t| t.at_unix_ms),
            acknowledged_by: incident.acknowledged_by.clone(),
            detection_count: incident.detection_count,
            bytes_estimate: incident.bytes_estimate,
            egress_external_bytes: egress.iter().map(|p| p.external_bytes).sum(),
            destinations,
            registered_domains: domains,
            dns,
            threshold,
            actions,
            timeline,
            evidence: incident
                .evidence
                .iter()
                .map(|e| {
                    (
                        e.detection_id.clone(),
                        e.sha256.clone(),
                        e.stored_at_unix_ms,
                    )
                })
                .collect(),
            deadline_ms: incident.opened_at_unix_ms + NOTIFICATION_WINDOW_MS,
            now_ms,
            zone,
            egress: egress.to_vec(),
        }
    }

    /// `2026-11-22 14:03:12 UTC`.
    pub fn utc(&self, ms: u64) -> String {
        match DateTime::<Utc>::from_timestamp_millis(ms as i64) {
            Some(t) => t.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
            None => format!("{ms} ms"),
        }
    }

    /// `2026-11-22 06:03:12 PST` in the report's zone.
    pub fn local(&self, ms: u64) -> String {
        match DateTime::<Utc>::from_timestamp_millis(ms as i64) {
            Some(t) => t
                .with_timezone(&self.zone)
                .format("%Y-%m-%d %H:%M:%S %Z")
                .to_string(),
            None => format!("{ms} ms"),
        }
    }

    /// Both: `2026-11-22 14:03:12 UTC (2026-11-22 06:03:12 PST)`.
    pub fn both(&self, ms: u64) -> String {
        format!("{} ({})", self.utc(ms), self.local(ms))
    }

    /// `61 h 12 min remaining` or `overdue by 3 h 5 min`.
    pub fn deadline_status(&self) -> String {
        let span = |ms: u64| {
            let min = ms / 60_000;
            format!("{} h {} min", min / 60, min % 60)
        };
        if self.now_ms <= self.deadline_ms {
            format!("{} remaining", span(self.deadline_ms - self.now_ms))
        } else {
            format!("overdue by {}", span(self.now_ms - self.deadline_ms))
        }
    }

    /// Bytes for people: `1.2 GB (1200000000 bytes)`.
    pub fn bytes(n: u64) -> String {
        const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
        let mut v = n as f64;
        let mut unit = 0;
        while v >= 1000.0 && unit < UNITS.len() - 1 {
            v /= 1000.0;
            unit += 1;
        }
        if unit == 0 {
            format!("{n} bytes")
        } else {
            format!("{v:.1} {} ({n} bytes)", UNITS[unit])
        }
    }

    /// Whether the workload's egress is blocked now.
    pub fn is_contained(&self) -> bool {
        self.state == "contained"
    }

    /// The largest destinations, for a sentence.
    pub fn top_destinations(&self, n: usize) -> String {
        if self.destinations.is_empty() {
            return "destinations not captured in the evidence".into();
        }
        self.destinations
            .iter()
            .take(n)
            .map(|d| {
                if d.domain.is_empty() {
                    d.endpoint.clone()
                } else {
                    format!("{} ({})", d.endpoint, d.domain)
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}
