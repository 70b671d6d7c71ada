//! Checks of everything under deploy/ and tests/lima/ (one test binary, so
//! the Kubernetes types are linked once).
mod chart;
mod docker;
mod grafana;
mod lima;
mod manifests;
mod prometheus;

use std::collections::BTreeSet;

use exfilguard_deploy_check::{metrics, read, repo_root};

/// Series the metrics module at `origin` registers; at least `at_least`.
fn exported(origin: &str, at_least: usize) -> BTreeSet<String> {
    let src = read(&repo_root().join(origin)).expect(origin);
    let found = metrics::exported_series(&src, origin).expect("metric names");
    assert!(
        found.len() >= at_least,
        "only {} metrics found in {origin}: {found:?}",
        found.len()
    );
    found
}

/// Series the agent exports, plus Prometheus's own `up`.
pub fn agent_series() -> BTreeSet<String> {
    let mut names = exported("agent/src/metrics.rs", 10);
    names.insert("up".to_owned());
    names
}

/// Series the agent and the controller export, plus `up`.
pub fn known_series() -> BTreeSet<String> {
    let mut names = agent_series();
    names.extend(exported("controller/src/metrics.rs", 5));
    names
}
