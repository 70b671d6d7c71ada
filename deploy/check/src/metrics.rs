//! The metric names the agent exports, read from agent/src/metrics.rs — the
//! one place its registry is built (its own tests check that every family
//! registered there appears in the exposition, `_total` suffix included).
//! Reading the source keeps this crate from building the agent and its eBPF
//! object just to learn a dozen names.
use std::collections::BTreeSet;

use crate::CheckError;

/// Series names as Prometheus stores them (`exfilguard_ring_drops_total`, ...)
/// that the metrics module `source` (read from `origin`) registers.
pub fn exported_series(source: &str, origin: &str) -> Result<BTreeSet<String>, CheckError> {
    let prefix = between(source, "Registry::with_prefix(\"", "\")")
        .ok_or_else(|| CheckError::invalid(origin, "no Registry::with_prefix(\"...\")"))?;
    let fields = metric_fields(source)
        .ok_or_else(|| CheckError::invalid(origin, "no `pub struct Metrics { ... }`"))?;
    let mut names = BTreeSet::new();
    for call in source.split("registry.register(").skip(1) {
        let name = between(call, "\"", "\"")
            .ok_or_else(|| CheckError::invalid(origin, "register() without a name literal"))?;
        let field = between(call, "m.", ".clone()").ok_or_else(|| {
            CheckError::invalid(
                origin,
                format!("register({name:?}) of no `m.<field>.clone()`"),
            )
        })?;
        let ty = fields
            .iter()
            .find(|(f, _)| f == field)
            .map(|(_, t)| t.as_str())
            .ok_or_else(|| CheckError::invalid(origin, format!("no field {field:?} in Metrics")))?;
        let base = format!("{prefix}_{name}");
        // A Family's value type is its last generic argument's head.
        if ty.contains("Histogram") {
            for s in ["_bucket", "_sum", "_count"] {
                names.insert(format!("{base}{s}"));
            }
        } else if ty.contains("Counter") {
            names.insert(format!("{base}_total"));
        } else if ty.contains("Gauge") {
            names.insert(base);
        } else {
            return Err(CheckError::invalid(
                origin,
                format!("metric {name:?} has a type this check does not know: {ty}"),
            ));
        }
    }
    if names.is_empty() {
        return Err(CheckError::invalid(
            origin,
            "no registry.register(...) calls found",
        ));
    }
    Ok(names)
}

/// `(field, type)` of each `pub field: Type,` in `pub struct Metrics { }`.
fn metric_fields(source: &str) -> Option<Vec<(String, String)>> {
    let body = between(source, "pub struct Metrics {", "\n}")?;
    Some(
        body.lines()
            .filter_map(|l| l.trim().strip_prefix("pub "))
            .filter_map(|l| l.split_once(": "))
            .map(|(f, t)| (f.trim().to_owned(), t.trim_end_matches(',').to_owned()))
            .collect(),
    )
}

fn between<'a>(s: &'a str, start: &str, end: &str) -> Option<&'a str> {
    let from = s.find(start)? + start.len();
    let len = s[from..].find(end)?;
    Some(&s[from..from + len])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_get_total_and_gauges_do_not() {
        let src = r#"
pub struct Metrics {
    registry: Registry,
    /// x
    pub a: Family<L, Counter>,
    pub b: Gauge,
    pub c: Family<L, Counter<f64, AtomicU64>>,
}
fn new() {
    let mut registry = Registry::with_prefix("exfilguard");
    registry.register("a_bytes", "help", m.a.clone());
    registry.register(
        "b",
        "help",
        m.b.clone(),
    );
    registry.register("c_seconds", "help", m.c.clone());
}
"#;
        let names: Vec<_> = exported_series(src, "test").unwrap().into_iter().collect();
        assert_eq!(
            names,
            [
                "exfilguard_a_bytes_total",
                "exfilguard_b",
                "exfilguard_c_seconds_total"
            ]
        );
        let err = exported_series(
            "pub struct Metrics {\n}\nRegistry::with_prefix(\"p\")",
            "test",
        )
        .unwrap_err();
        assert!(err.to_string().contains("no registry.register"), "{err}");
    }
}
