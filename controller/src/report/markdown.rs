//! Markdown rendering of a [`Doc`]; gaps are bold and bracketed so they
//! stand out in any viewer and are easy to search for.

use super::{
    doc::{Block, Doc, Inline, Line},
    facts::Facts,
};

fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

/// `**x** ` rather than `**x **`: CommonMark does not close emphasis after a space.
fn wrap(s: &str, marker: &str) -> String {
    let body = s.trim();
    if body.is_empty() {
        return s.to_string();
    }
    let lead = &s[..s.len() - s.trim_start().len()];
    let trail = &s[s.trim_end().len()..];
    format!("{lead}{marker}{body}{marker}{trail}")
}

fn line(l: &Line) -> String {
    l.iter()
        .map(|i| match i {
            Inline::Text(s) => s.clone(),
            Inline::Strong(s) => wrap(s, "**"),
            Inline::Code(s) => format!("`{s}`"),
            Inline::Gap(g) => format!("**[GAP: {g}]**"),
        })
        .collect()
}

/// Renders `doc`; the chart becomes a short table of the egress series.
pub fn render(doc: &Doc, f: &Facts) -> String {
    let mut out = format!("# {}\n\n", doc.title);
    for block in &doc.blocks {
        match block {
            Block::Heading(h) => out += &format!("## {h}\n\n"),
            Block::Para(l) => out += &format!("{}\n\n", line(l)),
            Block::List(items) => {
                for i in items {
                    out += &format!("- {}\n", line(i));
                }
                out += "\n";
            }
            Block::Table(rows) => {
                out += "| | |\n|---|---|\n";
                for (k, v) in rows {
                    out += &format!("| {} | {} |\n", cell(k), cell(&line(v)));
                }
                out += "\n";
            }
            Block::Grid { header, rows } => {
                out += &format!(
                    "| {} |\n",
                    header
                        .iter()
                        .map(|h| cell(h))
                        .collect::<Vec<_>>()
                        .join(" | ")
                );
                out += &format!("|{}\n", "---|".repeat(header.len()));
                for r in rows {
                    out += &format!(
                        "| {} |\n",
                        r.iter().map(|c| cell(c)).collect::<Vec<_>>().join(" | ")
                    );
                }
                out += "\n";
            }
            Block::Chart => {
                if f.egress.is_empty() {
                    out += "_No flow reports stored for this workload in this period._\n\n";
                } else {
                    out += "External egress per flow-report window (the HTML report draws it):\n\n| Window end (UTC) | External bytes |\n|---|---|\n";
                    for p in &f.egress {
                        out += &format!("| {} | {} |\n", f.utc(p.window_end_ms), p.external_bytes);
                    }
                    out += "\n";
                }
                if let Some((bytes, window)) = f.threshold {
                    out += &format!(
                        "Detector threshold: {} in {window} s.\n\n",
                        Facts::bytes(bytes)
                    );
                }
            }
        }
    }
    out
}
