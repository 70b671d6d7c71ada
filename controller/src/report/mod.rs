//! Incident reports and drafts, built only from what the store holds, with
//! gaps named rather than guessed.
//!
//! [`facts`] gathers what is known once; [`content`] decides what each
//! document (full report, executive brief, internal escalation, regulator
//! notification) says as a small [`doc`] model; [`markdown`], [`html`] (with
//! the [`chart`]) and JSON render it.

pub mod chart;
pub mod content;
pub mod doc;
pub mod facts;
pub mod html;
pub mod markdown;

use chrono_tz::Tz;
use exfilguard_proto::v1::Incident;
use serde::Deserialize;
use serde_json::json;

pub use content::Template;
pub use facts::Facts;

use crate::{json, store::EgressPoint, time::rfc3339};

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Markdown.
    Markdown,
    /// Self-contained HTML with the egress chart.
    Html,
    /// JSON for tools.
    Json,
}

/// A rendered report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    /// MIME type.
    pub content_type: &'static str,
    /// The document.
    pub content: String,
}

/// The `reports:` section of the controller's config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReportConfig {
    /// IANA zone for local times in reports (e.g. `Europe/Berlin`).
    pub time_zone: String,
}

impl Default for ReportConfig {
    fn default() -> Self {
        Self {
            time_zone: "UTC".into(),
        }
    }
}

/// Parses an IANA zone name; the message names the zone.
pub fn parse_zone(name: &str) -> Result<Tz, String> {
    name.parse::<Tz>().map_err(|_| {
        format!("unknown time zone {name:?} (expected an IANA name such as Europe/Berlin)")
    })
}

/// How far before the first detection the chart and egress totals reach.
pub const EGRESS_LOOKBACK_MS: u64 = 30 * 60 * 1000;

/// Renders `incident` (with timeline and evidence) as `template` in `format`.
/// `egress` is the workload's stored egress around the incident, `now_ms`
/// the time the deadline's remaining time is counted from.
pub fn render(
    incident: &Incident,
    egress: &[EgressPoint],
    now_ms: u64,
    zone: Tz,
    format: Format,
    template: Template,
) -> Rendered {
    let facts = Facts::gather(incident, egress, now_ms, zone);
    let doc = content::build(&facts, template);
    match format {
        Format::Markdown => Rendered {
            content_type: "text/markdown; charset=utf-8",
            content: markdown::render(&doc, &facts),
        },
        Format::Html => Rendered {
            content_type: "text/html; charset=utf-8",
            content: html::render(&doc, &facts),
        },
        Format::Json => {
            let value = if template == Template::Full {
                let mut v = json::incident(incident);
                v["report"] = report_json(&facts, &doc);
                v
            } else {
                json!({
                    "template": template.as_str(),
                    "incident_id": facts.id,
                    "title": doc.title,
                    "markdown": markdown::render(&doc, &facts),
                    "gaps": doc.gaps(),
                })
            };
            Rendered {
                content_type: "application/json",
                content: serde_json::to_string_pretty(&value)
                    .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}")),
            }
        }
    }
}

fn report_json(f: &Facts, doc: &doc::Doc) -> serde_json::Value {
    json!({
        "generated_at": rfc3339(f.now_ms),
        "time_zone": f.zone.name(),
        "first_detection": rfc3339(f.detected_ms),
        "first_detection_local": f.local(f.detected_ms),
        "contained_at": f.contained_ms.map(rfc3339),
        "closed_at": f.closed_ms.map(rfc3339),
        "notification_deadline": rfc3339(f.deadline_ms),
        "notification_deadline_local": f.local(f.deadline_ms),
        "notification_remaining_seconds": (f.deadline_ms as i64 - f.now_ms as i64) / 1000,
        "owner": f.owner,
        "node": f.node,
        "destinations": f.destinations.iter().map(|d| json!({"endpoint": d.endpoint, "domain": d.domain, "bytes": d.bytes})).collect::<Vec<_>>(),
        "registered_domains": f.registered_domains,
        "dns": f.dns.iter().map(|q| json!({"query_name": q.name, "query_type": q.qtype, "response_code": q.rcode, "at": q.at})).collect::<Vec<_>>(),
        "threshold": f.threshold.map(|(bytes, window)| json!({"bytes": bytes, "window_seconds": window})),
        "actions": f.actions.iter().map(|a| json!({"at": rfc3339(a.at_ms), "actor": a.actor, "what": a.what})).collect::<Vec<_>>(),
        "egress": f.egress.iter().map(|p| json!({"window_end": rfc3339(p.window_end_ms), "external_bytes": p.external_bytes, "internal_bytes": p.internal_bytes})).collect::<Vec<_>>(),
        "gaps": doc.gaps(),
    })
}
