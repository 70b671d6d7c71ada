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

/// Series the agent exports, plus Prometheus's own `up`.
pub fn known_series() -> BTreeSet<String> {
    let src = read(&repo_root().join("agent/src/metrics.rs")).expect("agent/src/metrics.rs");
    let mut names = metrics::exported_series(&src).expect("metric names");
    assert!(
        names.len() >= 10,
        "only {} metrics found in agent/src/metrics.rs: {names:?}",
        names.len()
    );
    names.insert("up".to_owned());
    names
}
