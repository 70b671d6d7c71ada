//! Incident reports: Markdown for people, JSON for tools. Both are built
//! only from what the store holds, with gaps named rather than guessed.

use exfilguard_proto::v1::Incident;

use crate::{json, time::rfc3339};

/// JSON report (the incident with timeline and evidence).
pub fn render_json(incident: &Incident) -> String {
    serde_json::to_string_pretty(&json::incident(incident))
        .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

fn s(v: serde_json::Value) -> String {
    v.as_str()
        .map(str::to_string)
        .unwrap_or_else(|| v.to_string())
}

/// Markdown report: summary, 72-hour clock, timeline, evidence with hashes.
pub fn render_markdown(incident: &Incident) -> String {
    let mut out = String::new();
    let w = json::workload_name(incident.workload.as_ref());
    out += &format!("# Incident {}\n\n", incident.id);
    out += "| | |\n|---|---|\n";
    out += &format!("| State | {} |\n", s(json::state(incident.state)));
    out += &format!("| Severity | {} |\n", s(json::severity(incident.severity)));
    out += &format!("| Type | {} |\n", s(json::kind(incident.kind)));
    out += &format!("| Workload | `{w}` on node `{}` |\n", incident.node);
    out += &format!("| Opened | {} |\n", rfc3339(incident.opened_at_unix_ms));
    out += &format!(
        "| Last change | {} |\n",
        rfc3339(incident.updated_at_unix_ms)
    );
    out += &format!("| Detections | {} |\n", incident.detection_count);
    out += &format!("| Bytes (estimate) | {} |\n", incident.bytes_estimate);
    out += &format!("| Policy action | {} |\n", s(json::action(incident.action)));
    let ack = if incident.acknowledged_by.is_empty() {
        "not yet"
    } else {
        incident.acknowledged_by.as_str()
    };
    out += &format!("| Acknowledged by | {ack} |\n\n");
    out += &format!("**Summary:** {}\n\n", incident.summary);
    out += &format!(
        "**72-hour notification deadline (GDPR Art. 33):** {} — counted from detection; \
         the controller cannot know when your organisation became *aware*, which is what the regulation counts from.\n\n",
        rfc3339(incident.notification_deadline_unix_ms)
    );
    out += "## Timeline (UTC)\n\n";
    for t in &incident.timeline {
        out += &format!(
            "- {} — **{}** — {} _(state: {})_\n",
            rfc3339(t.at_unix_ms),
            t.actor,
            t.cause,
            s(json::state(t.state))
        );
    }
    out += "\n## Evidence\n\n";
    if incident.evidence.is_empty() {
        out += "_No evidence records._\n";
    }
    for e in &incident.evidence {
        out += &format!(
            "### Detection `{}` (seq {})\n\nSHA-256 `{}` of the canonical record below, stored {}.\n\n```json\n{}\n```\n\n",
            e.detection_id,
            e.seq,
            e.sha256,
            rfc3339(e.stored_at_unix_ms),
            serde_json::from_str::<serde_json::Value>(&e.json)
                .ok()
                .and_then(|v| serde_json::to_string_pretty(&v).ok())
                .unwrap_or_else(|| e.json.clone())
        );
    }
    out += "## Not known to exfilguard\n\n- What the data was (classification, records affected).\n- Who is behind it and how they got in.\n- Whether the data appeared elsewhere.\n";
    out
}
