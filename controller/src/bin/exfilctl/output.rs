//! Rendering for `--output table|json|yaml`.

use std::io::Write;

use exfilguard_controller::{json, time::rfc3339};
use exfilguard_proto::v1::{Incident, IncidentEvent, IncidentEventKind, Node, Talker};
use serde_json::Value;

use crate::args::Output;

fn structured(w: &mut impl Write, out: Output, value: &Value) -> anyhow::Result<()> {
    match out {
        Output::Json => writeln!(w, "{}", serde_json::to_string_pretty(value)?)?,
        Output::Yaml => write!(w, "{}", serde_norway::to_string(value)?)?,
        Output::Table => unreachable!("tables are rendered by the caller"),
    }
    Ok(())
}

fn table(w: &mut impl Write, header: &[&str], rows: Vec<Vec<String>>) -> anyhow::Result<()> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = widths[i]))
            .collect::<Vec<_>>()
            .join("  ")
    };
    writeln!(
        w,
        "{}",
        line(header.iter().map(|s| s.to_string()).collect()).trim_end()
    )?;
    for row in rows {
        writeln!(w, "{}", line(row).trim_end())?;
    }
    Ok(())
}

fn text(v: Value) -> String {
    v.as_str()
        .map(str::to_string)
        .unwrap_or_else(|| v.to_string())
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1000.0 && unit < UNITS.len() - 1 {
        v /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// A list of incidents.
pub fn incidents(w: &mut impl Write, out: Output, list: &[Incident]) -> anyhow::Result<()> {
    if out != Output::Table {
        return structured(
            w,
            out,
            &Value::Array(list.iter().map(json::incident).collect()),
        );
    }
    let rows = list
        .iter()
        .map(|i| {
            vec![
                i.id.clone(),
                text(json::state(i.state)),
                text(json::severity(i.severity)),
                text(json::kind(i.kind)),
                json::workload_name(i.workload.as_ref()),
                i.node.clone(),
                i.detection_count.to_string(),
                bytes(i.bytes_estimate),
                rfc3339(i.opened_at_unix_ms),
            ]
        })
        .collect();
    table(
        w,
        &[
            "ID",
            "STATE",
            "SEVERITY",
            "KIND",
            "WORKLOAD",
            "NODE",
            "DETECTIONS",
            "BYTES",
            "OPENED",
        ],
        rows,
    )
}

/// One incident in detail.
pub fn incident(w: &mut impl Write, out: Output, i: &Incident) -> anyhow::Result<()> {
    if out != Output::Table {
        return structured(w, out, &json::incident(i));
    }
    writeln!(w, "Incident:     {}", i.id)?;
    writeln!(w, "State:        {}", text(json::state(i.state)))?;
    writeln!(w, "Severity:     {}", text(json::severity(i.severity)))?;
    writeln!(w, "Kind:         {}", text(json::kind(i.kind)))?;
    writeln!(
        w,
        "Workload:     {} (node {})",
        json::workload_name(i.workload.as_ref()),
        i.node
    )?;
    writeln!(w, "Opened:       {}", rfc3339(i.opened_at_unix_ms))?;
    writeln!(
        w,
        "Detections:   {} ({} estimated)",
        i.detection_count,
        bytes(i.bytes_estimate)
    )?;
    writeln!(w, "Summary:      {}", i.summary)?;
    if !i.acknowledged_by.is_empty() {
        writeln!(w, "Acknowledged: {}", i.acknowledged_by)?;
    }
    writeln!(
        w,
        "Notify by:    {} (72 h from detection)",
        rfc3339(i.notification_deadline_unix_ms)
    )?;
    if !i.timeline.is_empty() {
        writeln!(w, "\nTimeline:")?;
        for t in &i.timeline {
            writeln!(
                w,
                "  {}  {:<28} {}",
                rfc3339(t.at_unix_ms),
                t.actor,
                t.cause
            )?;
        }
    }
    if !i.evidence.is_empty() {
        writeln!(w, "\nEvidence:")?;
        for e in &i.evidence {
            writeln!(w, "  {} seq {}  sha256 {}", e.detection_id, e.seq, e.sha256)?;
        }
    }
    Ok(())
}

/// A watch event (one line in table mode).
pub fn event(w: &mut impl Write, out: Output, e: &IncidentEvent) -> anyhow::Result<()> {
    let kind = IncidentEventKind::try_from(e.kind)
        .map(|k| {
            k.as_str_name()
                .trim_start_matches("INCIDENT_EVENT_KIND_")
                .to_ascii_lowercase()
        })
        .unwrap_or_else(|_| e.kind.to_string());
    let Some(i) = &e.incident else { return Ok(()) };
    if out != Output::Table {
        let mut v = json::incident(i);
        v["event"] = Value::String(kind);
        return match out {
            // One JSON document per line, so the stream can be piped.
            Output::Json => Ok(writeln!(w, "{v}")?),
            _ => {
                writeln!(w, "---")?;
                structured(w, out, &v)
            }
        };
    }
    writeln!(
        w,
        "{}  {:<13} {}  {:<9} {}  {}",
        rfc3339(i.updated_at_unix_ms),
        kind,
        i.id,
        text(json::state(i.state)),
        json::workload_name(i.workload.as_ref()),
        i.summary
    )?;
    Ok(())
}

/// Nodes.
pub fn nodes(w: &mut impl Write, out: Output, list: &[Node]) -> anyhow::Result<()> {
    if out != Output::Table {
        return structured(w, out, &Value::Array(list.iter().map(json::node).collect()));
    }
    let rows = list
        .iter()
        .map(|n| {
            vec![
                n.name.clone(),
                if n.connected {
                    "yes".into()
                } else {
                    "no".into()
                },
                n.agent_version.clone(),
                n.kernel_release.clone(),
                rfc3339(n.last_seen_unix_ms),
                n.last_seq.to_string(),
                format!("{} ms", n.lag_ms),
                format!("{}/{}", n.dropped_flow_reports, n.dropped_detections),
            ]
        })
        .collect();
    table(
        w,
        &[
            "NODE",
            "CONNECTED",
            "AGENT",
            "KERNEL",
            "LAST SEEN",
            "LAST SEQ",
            "LAG",
            "DROPS (FLOW/DET)",
        ],
        rows,
    )
}

/// Top talkers.
pub fn talkers(w: &mut impl Write, out: Output, list: &[Talker]) -> anyhow::Result<()> {
    if out != Output::Table {
        return structured(
            w,
            out,
            &Value::Array(list.iter().map(json::talker).collect()),
        );
    }
    let rows = list
        .iter()
        .map(|t| {
            vec![
                json::workload_name(t.workload.as_ref()),
                t.node.clone(),
                bytes(t.external_bytes),
                bytes(t.internal_bytes),
            ]
        })
        .collect();
    table(w, &["WORKLOAD", "NODE", "EXTERNAL", "INTERNAL"], rows)
}
