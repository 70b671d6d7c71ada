//! deploy/prometheus: promtool accepts the rules and their unit tests pass;
//! the PrometheusRule carries exactly the plain rules; every query selects a
//! metric the agent exports.
use std::process::Command;

use exfilguard_deploy_check::{docs, promql, read, repo, repo_root};

fn promtool(args: &[&str]) {
    let promtool = repo::tool("promtool", "prometheus").unwrap_or_else(|e| panic!("{e}"));
    let dir = repo_root().join("deploy/prometheus");
    let out = Command::new(promtool)
        .args(args)
        .current_dir(&dir)
        .output()
        .expect("running promtool");
    assert!(
        out.status.success(),
        "promtool {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn promtool_checks_the_rules() {
    promtool(&["check", "rules", "exfilguard-rules.yaml"]);
}

#[test]
fn promtool_unit_tests_pass() {
    promtool(&["test", "rules", "exfilguard-rules.test.yaml"]);
}

fn plain_rules() -> serde_json::Value {
    let mut d = docs::load(&repo_root().join("deploy/prometheus/exfilguard-rules.yaml")).unwrap();
    d.remove(0).value
}

#[test]
fn the_prometheusrule_holds_exactly_the_plain_rules() {
    let d = docs::load(&repo_root().join("deploy/prometheus/prometheusrule.yaml")).unwrap();
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].api_version(), "monitoring.coreos.com/v1");
    assert_eq!(d[0].kind(), "PrometheusRule");
    assert_eq!(d[0].value["metadata"]["namespace"], "exfilguard-system");
    let diffs = docs::differences(&plain_rules(), &d[0].value["spec"]);
    assert!(
        diffs.is_empty(),
        "prometheusrule.yaml's spec differs from exfilguard-rules.yaml:\n{}",
        diffs.join("\n")
    );
}

#[test]
fn every_alert_selects_exported_metrics_and_is_labelled() {
    let known = crate::known_series();
    let rules = plain_rules();
    let mut alerts = Vec::new();
    for group in rules["groups"].as_array().expect("groups") {
        for rule in group["rules"].as_array().expect("rules") {
            let name = rule["alert"].as_str().expect("every rule is an alert");
            let expr = rule["expr"].as_str().expect("expr");
            let selected = promql::selected_metrics(expr, name).unwrap();
            for m in &selected {
                assert!(
                    known.contains(m),
                    "{name} selects {m}, which neither the agent nor the controller exports"
                );
            }
            // Scoped to the job of what it selects.
            let job = if selected
                .iter()
                .any(|m| m.starts_with("exfilguard_controller_"))
            {
                "exfilguard-controller"
            } else {
                "exfilguard-agent"
            };
            assert!(
                expr.contains(&format!("job=\"{job}\"")),
                "{name}: not scoped to job {job}"
            );
            for label in ["severity", "type"] {
                assert!(
                    rule["labels"][label].is_string(),
                    "{name}: no {label} label"
                );
            }
            for a in ["summary", "description"] {
                assert!(
                    rule["annotations"][a].is_string(),
                    "{name}: no {a} annotation"
                );
            }
            alerts.push(name.to_owned());
        }
    }
    // The runbook's alerts the issue names, by their exfilguard names.
    for want in [
        "ExfilguardLargeExternalTransfer",
        "ExfilguardDnsExfiltration",
        "ExfilguardRingBufferDrops",
        "ExfilguardAgentDown",
    ] {
        assert!(alerts.iter().any(|a| a == want), "no {want} in {alerts:?}");
    }
}

/// The unit tests feed series the agent really exports (a test of a
/// misspelt metric would pass while the alert never could fire), and cover
/// every alert, both firing and quiet.
#[test]
fn the_unit_tests_use_real_series_and_cover_every_alert() {
    let known = crate::known_series();
    let path = repo_root().join("deploy/prometheus/exfilguard-rules.test.yaml");
    let tests = docs::parse(&read(&path).unwrap(), "rules test")
        .unwrap()
        .remove(0)
        .value;
    let mut fires = std::collections::BTreeSet::new();
    let mut quiet = std::collections::BTreeSet::new();
    for t in tests["tests"].as_array().expect("tests") {
        for s in t["input_series"].as_array().expect("input_series") {
            let series = s["series"].as_str().expect("series");
            let name = series.split('{').next().unwrap_or(series);
            assert!(
                known.contains(name),
                "test series {series}: neither the agent nor the controller exports {name}"
            );
        }
        for a in t["alert_rule_test"].as_array().expect("alert_rule_test") {
            let name = a["alertname"].as_str().unwrap().to_owned();
            match a["exp_alerts"].as_array().map(Vec::len) {
                Some(0) | None => quiet.insert(name),
                Some(_) => fires.insert(name),
            };
        }
    }
    for group in plain_rules()["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            let name = rule["alert"].as_str().unwrap();
            assert!(fires.contains(name), "no unit test where {name} fires");
            assert!(
                quiet.contains(name),
                "no unit test where {name} stays quiet"
            );
        }
    }
}
