//! The sink-agnostic alert: one incident transition, as the store recorded it
//! in the same transaction as the transition itself (so no transition can
//! commit without its alert).

use exfilguard_proto::v1::{Incident, PolicyAction};
use serde::{Deserialize, Serialize};

use crate::json;

/// Which transition of the incident this alert announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transition {
    /// A new incident.
    Opened,
    /// The workload's egress was blocked.
    Contained,
    /// A responder lifted the containment.
    Released,
    /// A responder closed an incident that was never contained.
    Resolved,
}

impl Transition {
    /// `opened`, `contained`, ...
    pub fn as_str(self) -> &'static str {
        match self {
            Transition::Opened => "opened",
            Transition::Contained => "contained",
            Transition::Released => "released",
            Transition::Resolved => "resolved",
        }
    }

    /// Whether the incident is over after this transition (sinks "resolve").
    pub fn closes(self) -> bool {
        matches!(self, Transition::Released | Transition::Resolved)
    }
}

/// One incident transition, with the facts every sink renders from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alert {
    /// Incident id (`EXFIL-…`).
    pub incident_id: String,
    /// What happened.
    pub transition: Transition,
    /// When (Unix ms).
    pub at_ms: u64,
    /// When the incident opened (Unix ms).
    pub opened_ms: u64,
    /// `critical`, `high`, `low`.
    pub severity: String,
    /// Detection kind (`volume`, `dns_tunnel`, ...).
    pub kind: String,
    /// Policy action (`lockdown`, `alert`, `dry_run`).
    pub action: String,
    /// Node of the workload.
    pub node: String,
    /// Workload name (`ns/pod` or the cgroup path).
    pub workload: String,
    /// Owner (`StatefulSet shop/db`), empty if unknown.
    pub owner: String,
    /// The newest detection's summary.
    pub summary: String,
    /// Estimated bytes sent so far.
    pub bytes_estimate: u64,
    /// Who caused the transition (`agent:node-a`, `alice (responder)`).
    pub actor: String,
    /// Why (the timeline entry's cause).
    pub cause: String,
}

impl Alert {
    /// An alert for `incident` (as it is right after the transition).
    pub fn new(
        incident: &Incident,
        transition: Transition,
        at_ms: u64,
        actor: &str,
        cause: &str,
    ) -> Alert {
        let s = |v: serde_json::Value| {
            v.as_str()
                .map(str::to_string)
                .unwrap_or_else(|| v.to_string())
        };
        let owner = incident
            .workload
            .as_ref()
            .filter(|w| !w.owner_kind.is_empty())
            .map(|w| format!("{} {}/{}", w.owner_kind, w.namespace, w.owner_name))
            .unwrap_or_default();
        Alert {
            incident_id: incident.id.clone(),
            transition,
            at_ms,
            opened_ms: incident.opened_at_unix_ms,
            severity: s(json::severity(incident.severity)),
            kind: s(json::kind(incident.kind)),
            action: s(json::action(incident.action)),
            node: incident.node.clone(),
            workload: json::workload_name(incident.workload.as_ref()),
            owner,
            summary: incident.summary.clone(),
            bytes_estimate: incident.bytes_estimate,
            actor: actor.to_string(),
            cause: cause.to_string(),
        }
    }

    /// The key a sink de-duplicates on: one per incident transition, stable
    /// across retries and controller restarts.
    pub fn key(&self) -> String {
        format!("{}:{}", self.incident_id, self.transition.as_str())
    }

    /// One line for people: what, where, how much.
    pub fn headline(&self) -> String {
        let what = match self.transition {
            Transition::Opened => "possible data exfiltration",
            Transition::Contained => "egress contained",
            Transition::Released => "containment released",
            Transition::Resolved => "incident resolved",
        };
        format!(
            "{} {}: {what} from {} on node {}",
            self.severity.to_ascii_uppercase(),
            self.incident_id,
            self.workload,
            self.node
        )
    }

    /// A paragraph: the headline's facts plus the detection summary and cause.
    pub fn description(&self) -> String {
        format!(
            "{}. {} (about {} bytes sent; detection type {}). {}: {}.",
            self.headline(),
            self.summary,
            self.bytes_estimate,
            self.kind,
            self.actor,
            self.cause
        )
    }

    /// What the system has done so far, as the runbook's `immediate_actions`.
    pub fn immediate_actions(&self) -> Vec<String> {
        let mut actions = vec!["evidence_preserved".to_string(), "alert_sent".to_string()];
        match self.transition {
            Transition::Opened if self.action == action_name(PolicyAction::DryRun) => {
                actions.push("dry_run_lockdown_recorded".into())
            }
            Transition::Opened => {}
            Transition::Contained => actions.push("egress_blocked".into()),
            Transition::Released => actions.push("containment_released".into()),
            Transition::Resolved => actions.push("incident_resolved".into()),
        }
        actions
    }

    /// The runbook's `affected_systems`: the workload, its owner, its node.
    pub fn affected_systems(&self) -> Vec<String> {
        let mut systems = vec![self.workload.clone()];
        if !self.owner.is_empty() {
            systems.push(self.owner.clone());
        }
        systems.push(format!("node/{}", self.node));
        systems
    }
}

fn action_name(a: PolicyAction) -> String {
    json::action(a as i32)
        .as_str()
        .unwrap_or_default()
        .to_string()
}
