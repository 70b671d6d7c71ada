//! Self-contained HTML rendering of a [`Doc`]: inline CSS and SVG, no
//! scripts, no external resources, so the file can be mailed or archived.

use super::{
    chart,
    doc::{Block, Doc, Inline, Line},
    facts::Facts,
};

/// Escapes text for HTML content and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn line(l: &Line) -> String {
    l.iter()
        .map(|i| match i {
            Inline::Text(s) => escape(s),
            Inline::Strong(s) => format!("<strong>{}</strong>", escape(s)),
            Inline::Code(s) => format!("<code>{}</code>", escape(s)),
            Inline::Gap(g) => format!("<mark class=\"gap\">[GAP: {}]</mark>", escape(g)),
        })
        .collect()
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}\
table{border-collapse:collapse;margin:0.5rem 0 1rem}td,th{border:1px solid #ccc;padding:0.25rem 0.5rem;text-align:left;vertical-align:top}\
th{background:#f3f3f3}code{font-size:0.9em}mark.gap{background:#ffe08a;font-weight:bold}figure{margin:0.5rem 0 1rem}";

/// Renders `doc` as a complete HTML document.
pub fn render(doc: &Doc, f: &Facts) -> String {
    let mut out = format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<h1>{}</h1>\n",
        escape(&doc.title),
        escape(&doc.title)
    );
    for block in &doc.blocks {
        match block {
            Block::Heading(h) => out += &format!("<h2>{}</h2>\n", escape(h)),
            Block::Para(l) => out += &format!("<p>{}</p>\n", line(l)),
            Block::List(items) => {
                out += "<ul>\n";
                for i in items {
                    out += &format!("<li>{}</li>\n", line(i));
                }
                out += "</ul>\n";
            }
            Block::Table(rows) => {
                out += "<table class=\"facts\">\n<tbody>\n";
                for (k, v) in rows {
                    out += &format!(
                        "<tr><th scope=\"row\">{}</th><td>{}</td></tr>\n",
                        escape(k),
                        line(v)
                    );
                }
                out += "</tbody>\n</table>\n";
            }
            Block::Grid { header, rows } => {
                out += "<table>\n<thead>\n<tr>";
                for h in header {
                    out += &format!("<th>{}</th>", escape(h));
                }
                out += "</tr>\n</thead>\n<tbody>\n";
                for r in rows {
                    out += "<tr>";
                    for c in r {
                        out += &format!("<td>{}</td>", escape(c));
                    }
                    out += "</tr>\n";
                }
                out += "</tbody>\n</table>\n";
            }
            Block::Chart => {
                out += &format!(
                    "<figure>\n{}\n<figcaption>External egress of {} per flow-report window; threshold, detection and containment marked.</figcaption>\n</figure>\n",
                    chart::svg(f),
                    escape(&f.workload)
                );
            }
        }
    }
    out += "</body>\n</html>\n";
    out
}
