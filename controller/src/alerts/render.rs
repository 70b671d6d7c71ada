//! Request bodies, one shape per sink kind. Pure functions of the alert, so
//! a retry sends the same bytes.

use serde_json::{Value, json};

use super::{
    alert::Alert,
    config::{Sink, SinkKind},
};
use crate::time::rfc3339;

/// How long an Alertmanager alert stays firing without an update. The outbox
/// sends transitions, not Prometheus-style refreshes, so an open incident's
/// alert carries an explicit end far enough out; `released`/`resolved` ends it
/// at once.
pub const ALERTMANAGER_ACTIVE_MS: u64 = 24 * 3600 * 1000;

/// The JSON body `sink` receives for `alert`.
pub fn body(sink: &Sink, alert: &Alert) -> Value {
    match sink.kind {
        SinkKind::Webhook => webhook(alert),
        SinkKind::Pagerduty => pagerduty(sink, alert),
        SinkKind::Alertmanager => alertmanager(sink, alert),
        SinkKind::Slack => slack(alert),
    }
}

/// The runbook's security-alert shape (step 4, "Alert Stakeholders"), plus
/// the transition and the key the receiver de-duplicates on.
fn webhook(a: &Alert) -> Value {
    json!({
        "incident_id": a.incident_id,
        "severity": a.severity.to_ascii_uppercase(),
        "type": "data_exfiltration",
        "timestamp": rfc3339(a.at_ms),
        "description": a.description(),
        "affected_systems": a.affected_systems(),
        "immediate_actions": a.immediate_actions(),
        "transition": a.transition.as_str(),
        "dedup_key": a.key(),
        "detection_type": a.kind,
        "node": a.node,
        "workload": a.workload,
        "bytes_estimate": a.bytes_estimate,
        "opened_at": rfc3339(a.opened_ms),
    })
}

/// PagerDuty severities: critical, error, warning, info.
fn pagerduty_severity(severity: &str) -> &'static str {
    match severity {
        "critical" => "critical",
        "high" => "error",
        _ => "warning",
    }
}

/// Events API v2: `dedup_key` is the incident id, so every transition of one
/// incident lands on one PagerDuty incident, and released/resolved resolves it.
fn pagerduty(sink: &Sink, a: &Alert) -> Value {
    let routing_key = sink.routing_key.as_ref().map(|k| k.expose()).unwrap_or("");
    if a.transition.closes() {
        return json!({
            "routing_key": routing_key,
            "event_action": "resolve",
            "dedup_key": a.incident_id,
        });
    }
    json!({
        "routing_key": routing_key,
        "event_action": "trigger",
        "dedup_key": a.incident_id,
        "payload": {
            "summary": truncate(&a.headline(), 1024),
            "severity": pagerduty_severity(&a.severity),
            "source": sink.source,
            "timestamp": rfc3339(a.at_ms),
            "component": a.workload,
            "group": a.node,
            "class": a.kind,
            "custom_details": {
                "transition": a.transition.as_str(),
                "description": a.description(),
                "affected_systems": a.affected_systems(),
                "immediate_actions": a.immediate_actions(),
                "bytes_estimate": a.bytes_estimate,
            },
        },
    })
}

/// One alert whose labels identify the incident (so a later transition
/// updates the same alert) and whose `endsAt` resolves it on release.
fn alertmanager(sink: &Sink, a: &Alert) -> Value {
    let ends = if a.transition.closes() {
        a.at_ms
    } else {
        a.at_ms + ALERTMANAGER_ACTIVE_MS
    };
    json!([{
        "labels": {
            "alertname": "ExfilguardIncident",
            "incident_id": a.incident_id,
            "severity": a.severity,
            "workload": a.workload,
            "node": a.node,
            "source": sink.source,
        },
        "annotations": {
            "summary": a.headline(),
            "description": a.description(),
            "transition": a.transition.as_str(),
        },
        "startsAt": rfc3339(a.opened_ms),
        "endsAt": rfc3339(ends),
    }])
}

/// Slack's incoming-webhook shape (`text`, mrkdwn), which Mattermost and
/// Rocket.Chat accept too.
fn slack(a: &Alert) -> Value {
    let icon = match (a.transition.closes(), a.severity.as_str()) {
        (true, _) => ":white_check_mark:",
        (false, "critical") => ":rotating_light:",
        _ => ":warning:",
    };
    json!({
        "text": format!(
            "{icon} *{}*\n{}\n*Actions:* {}\n*Affected:* {}",
            a.headline(),
            a.description(),
            a.immediate_actions().join(", "),
            a.affected_systems().join(", "),
        ),
    })
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alerts::{alert::Transition, config::Secret};

    fn alert(transition: Transition) -> Alert {
        Alert {
            incident_id: "EXFIL-20261122-140312-7f3a".into(),
            transition,
            at_ms: 1_795_356_252_000,
            opened_ms: 1_795_356_192_000,
            severity: "critical".into(),
            kind: "volume".into(),
            action: "lockdown".into(),
            node: "node-a".into(),
            workload: "shop/db-0".into(),
            owner: "StatefulSet shop/db".into(),
            summary: "1.2 GB to 203.0.113.9:443 in 5 min".into(),
            bytes_estimate: 1_200_000_000,
            actor: "agent:node-a".into(),
            cause: "detection d1".into(),
        }
    }

    fn sink(kind: SinkKind) -> Sink {
        Sink {
            name: "s".into(),
            kind,
            url: Secret::new("http://127.0.0.1:1"),
            routing_key: Some(Secret::new("rk")),
            severities: Vec::new(),
            source: "exfilguard-controller".into(),
        }
    }

    #[test]
    fn webhook_has_the_runbook_fields() {
        let b = body(&sink(SinkKind::Webhook), &alert(Transition::Contained));
        for field in [
            "incident_id",
            "severity",
            "type",
            "timestamp",
            "description",
            "affected_systems",
            "immediate_actions",
        ] {
            assert!(b.get(field).is_some(), "{field} missing in {b}");
        }
        assert_eq!(b["severity"], "CRITICAL");
        assert_eq!(b["timestamp"], "2026-11-22T14:04:12Z");
        assert_eq!(
            b["affected_systems"],
            json!(["shop/db-0", "StatefulSet shop/db", "node/node-a"])
        );
        assert!(
            b["immediate_actions"]
                .as_array()
                .unwrap()
                .contains(&json!("egress_blocked"))
        );
    }

    #[test]
    fn pagerduty_triggers_then_resolves_on_the_incident_id() {
        let t = body(&sink(SinkKind::Pagerduty), &alert(Transition::Opened));
        assert_eq!(t["event_action"], "trigger");
        assert_eq!(t["dedup_key"], "EXFIL-20261122-140312-7f3a");
        assert_eq!(t["routing_key"], "rk");
        assert_eq!(t["payload"]["severity"], "critical");
        assert_eq!(t["payload"]["source"], "exfilguard-controller");
        assert!(
            t["payload"]["summary"]
                .as_str()
                .unwrap()
                .contains("shop/db-0")
        );
        let r = body(&sink(SinkKind::Pagerduty), &alert(Transition::Released));
        assert_eq!(r["event_action"], "resolve");
        assert_eq!(r["dedup_key"], "EXFIL-20261122-140312-7f3a");
    }

    #[test]
    fn alertmanager_ends_the_alert_on_release() {
        let open = body(&sink(SinkKind::Alertmanager), &alert(Transition::Opened));
        let done = body(&sink(SinkKind::Alertmanager), &alert(Transition::Released));
        assert_eq!(open[0]["labels"], done[0]["labels"]);
        assert_eq!(open[0]["startsAt"], "2026-11-22T14:03:12Z");
        assert_eq!(done[0]["endsAt"], "2026-11-22T14:04:12Z");
        assert_eq!(open[0]["endsAt"], "2026-11-23T14:04:12Z");
    }

    #[test]
    fn slack_is_a_text_message() {
        let b = body(&sink(SinkKind::Slack), &alert(Transition::Opened));
        assert!(
            b["text"]
                .as_str()
                .unwrap()
                .contains("EXFIL-20261122-140312-7f3a")
        );
        assert_eq!(truncate("héllo", 2), "h");
    }
}
