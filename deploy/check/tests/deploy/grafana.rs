//! deploy/grafana: the dashboard is valid JSON of the expected shape, and
//! every query selects a metric the agent exports — and every exported
//! metric is on it.
use std::collections::BTreeSet;

use exfilguard_deploy_check::{promql, read, repo_root};
use serde_json::Value;

fn dashboard() -> Value {
    let path = repo_root().join("deploy/grafana/exfilguard-agents.json");
    serde_json::from_str(&read(&path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn panels(v: &Value, out: &mut Vec<Value>) {
    for p in v["panels"].as_array().into_iter().flatten() {
        out.push(p.clone());
        panels(p, out);
    }
}

#[test]
fn queries_select_exported_metrics_and_cover_them_all() {
    let d = dashboard();
    // The agents' dashboard: every agent series, and only those.
    let known = crate::agent_series();
    let mut all = Vec::new();
    panels(&d, &mut all);
    let mut used = BTreeSet::new();
    let mut queries = 0;
    for p in &all {
        let title = p["title"].as_str().unwrap_or("?");
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("{title}: target without expr"));
            queries += 1;
            for m in promql::selected_metrics(expr, title).unwrap() {
                assert!(
                    known.contains(&m),
                    "panel {title:?} selects {m}, which the agent does not export"
                );
                used.insert(m);
            }
            assert!(
                expr.contains("job=\"exfilguard-agent\""),
                "panel {title:?}: not scoped to the agents' job"
            );
        }
    }
    // Template variables: label_values(SELECTOR, label).
    for v in d["templating"]["list"].as_array().expect("templating") {
        if let Some(q) = v["query"]["query"].as_str() {
            let inner = q
                .strip_prefix("label_values(")
                .and_then(|s| s.rsplit_once(','))
                .map(|(sel, _)| sel)
                .unwrap_or_else(|| panic!("unexpected variable query {q}"));
            for m in promql::selected_metrics(inner, "templating").unwrap() {
                assert!(known.contains(&m), "variable query selects unknown {m}");
            }
        }
    }
    assert!(queries >= 10, "only {queries} queries");
    let missing: Vec<_> = known.iter().filter(|m| !used.contains(*m)).collect();
    assert!(missing.is_empty(), "exported but on no panel: {missing:?}");
}

#[test]
fn layout_ids_and_datasources_are_consistent() {
    let d = dashboard();
    assert!(d["uid"].is_string() && d["title"].is_string());
    let vars: Vec<&str> = d["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert!(vars.contains(&"datasource"), "{vars:?}");
    let mut all = Vec::new();
    panels(&d, &mut all);
    let mut ids = BTreeSet::new();
    for p in &all {
        let title = p["title"].as_str().unwrap_or("?");
        assert!(
            ids.insert(p["id"].as_u64().expect("numeric id")),
            "duplicate id in {title}"
        );
        let g = &p["gridPos"];
        let (x, w) = (g["x"].as_u64().unwrap(), g["w"].as_u64().unwrap());
        assert!(x + w <= 24, "{title}: wider than the 24-column grid");
        if p["type"] != "row" {
            assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}");
            assert!(
                p["targets"].as_array().is_some_and(|t| !t.is_empty()),
                "{title}: no query"
            );
        }
    }
}
