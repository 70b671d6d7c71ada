//! deploy/helm/exfilguard. Helm cannot be installed here, so the chart is
//! rendered by the crate's renderer of the template subset the chart uses
//! (anything else fails loudly), and the result must equal the plain
//! manifests, which manifests.rs checks against the Kubernetes types. What
//! this does not prove: that Helm itself renders the same (the subset is
//! plain Go-template semantics), and values far from the defaults.
use std::collections::BTreeMap;

use exfilguard_deploy_check::{chart::Context, docs, docs::Doc, kube_types, read, repo, repo_root};
use serde_json::{Value, json};

const NAMESPACE: &str = "exfilguard-system";

fn render(overrides: Value) -> Vec<Doc> {
    let dir = repo_root().join("deploy/helm/exfilguard");
    let ctx = Context::load(&dir, "exfilguard", NAMESPACE, &overrides).unwrap();
    let text = ctx.render_all().unwrap_or_else(|e| panic!("{e}"));
    let docs = docs::parse(&text, "rendered chart").unwrap_or_else(|e| panic!("{e}\n{text}"));
    for d in docs
        .iter()
        .filter(|d| d.api_version() != "monitoring.coreos.com/v1")
    {
        kube_types::check(d).unwrap_or_else(|e| panic!("rendered chart: {e}"));
    }
    docs
}

/// ConfigMap data are files: compare what they parse to, not their comments.
fn normalized(d: &Doc) -> Value {
    let mut v = d.value.clone();
    if d.kind() == "ConfigMap"
        && let Some(data) = v["data"].as_object_mut()
    {
        for (k, text) in data.iter_mut() {
            let parsed = docs::parse(text.as_str().unwrap(), k).unwrap();
            *text = parsed
                .into_iter()
                .next()
                .map(|d| d.value)
                .unwrap_or(Value::Null);
        }
    }
    v
}

fn by_key(docs: &[Doc]) -> BTreeMap<String, Value> {
    docs.iter().map(|d| (d.key(), normalized(d))).collect()
}

fn assert_same(want: &[Doc], got: &[Doc], what: &str) {
    let (want, got) = (by_key(want), by_key(got));
    assert_eq!(
        want.keys().collect::<Vec<_>>(),
        got.keys().collect::<Vec<_>>(),
        "{what}: objects"
    );
    for (k, w) in &want {
        let diffs = docs::differences(w, &got[k]);
        assert!(
            diffs.is_empty(),
            "{what}: {k} differs:\n{}",
            diffs.join("\n")
        );
    }
}

#[test]
fn default_values_render_the_plain_manifests() {
    let rendered = render(json!({}));
    let mut want: Vec<Doc> = repo::load_all(&repo::manifest_files().unwrap()).unwrap();
    // `helm install --create-namespace` makes the namespace.
    want.retain(|d| d.kind() != "Namespace");
    let rbac_path = repo_root().join("deploy/rbac.yaml");
    let mut got = rendered.clone();
    if rbac_path.exists() {
        want.extend(docs::load(&rbac_path).unwrap());
    } else {
        println!(
            "NOT CHECKED: the chart's RBAC against deploy/rbac.yaml (not in this checkout); its objects passed the type check"
        );
        got.retain(|d| {
            ![
                "ServiceAccount",
                "ClusterRole",
                "ClusterRoleBinding",
                "Role",
                "RoleBinding",
            ]
            .contains(&d.kind())
        });
    }
    assert_same(&want, &got, "chart with default values vs deploy/manifests");
}

#[test]
fn prometheus_objects_render_the_deploy_prometheus_files() {
    let rendered = render(
        json!({"prometheus": {"rules": {"enabled": true}, "podMonitor": {"enabled": true}}}),
    );
    let got: Vec<Doc> = rendered
        .into_iter()
        .filter(|d| d.api_version() == "monitoring.coreos.com/v1")
        .collect();
    let dir = repo_root().join("deploy/prometheus");
    let want =
        repo::load_all(&[dir.join("prometheusrule.yaml"), dir.join("podmonitor.yaml")]).unwrap();
    assert_same(
        &want,
        &got,
        "chart's Prometheus objects vs deploy/prometheus",
    );
}

#[test]
fn values_reach_the_objects() {
    let rendered = render(json!({
        "agent": {"image": {"tag": "9.9.9"}, "nodeSelector": {"kubernetes.io/os": "linux"}, "metricsPort": 9500},
        "controller": {"replicas": 3, "criticalAction": "alert", "egressRetention": "7d"},
        "agentPolicy": {"internal_cidrs": ["10.42.0.0/16", "10.43.0.0/16"], "allow_cidrs": ["198.51.100.20/32"]},
    }));
    let ds = repo::find(&rendered, "DaemonSet", "exfilguard-agent").unwrap();
    let pod = &ds.value["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    assert_eq!(c["image"], "ghcr.io/exfilguard/exfilguard-agent:9.9.9");
    assert_eq!(pod["nodeSelector"]["kubernetes.io/os"], "linux");
    assert_eq!(c["ports"][0]["containerPort"], 9500);
    assert_eq!(
        ds.value["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"],
        "9500"
    );
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(
        args.contains(&"--internal=10.42.0.0/16") && args.contains(&"--internal=10.43.0.0/16"),
        "{args:?}"
    );
    assert!(args.contains(&"--metrics-addr=0.0.0.0:9500"), "{args:?}");
    let dep = repo::find(&rendered, "Deployment", "exfilguard-controller").unwrap();
    assert_eq!(dep.value["spec"]["replicas"], 3);
    let ctl_args = dep.value["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap();
    assert!(ctl_args.contains(&json!("--critical-action=alert")));
    assert!(ctl_args.contains(&json!("--egress-retention=7d")));
    let cm = repo::find(&rendered, "ConfigMap", "exfilguard-agent-policy").unwrap();
    let policy = &normalized(cm)["data"]["agent-policy.yaml"];
    assert_eq!(policy["allow_cidrs"], json!(["198.51.100.20/32"]));
    assert_eq!(policy["volume_threshold_bytes"], 100000000);
}

#[test]
fn chart_copies_and_metadata_are_current() {
    let root = repo_root();
    let chart = root.join("deploy/helm/exfilguard");
    assert_eq!(
        read(&chart.join("files/exfilguard-rules.yaml")).unwrap(),
        read(&root.join("deploy/prometheus/exfilguard-rules.yaml")).unwrap(),
        "copy deploy/prometheus/exfilguard-rules.yaml to deploy/helm/exfilguard/files/"
    );
    let crds = root.join("deploy/crds/exfilguard.io.yaml");
    let chart_crds = chart.join("crds/exfilguard.io.yaml");
    if crds.exists() {
        assert_eq!(
            read(&chart_crds).unwrap(),
            read(&crds).unwrap(),
            "copy deploy/crds/exfilguard.io.yaml to deploy/helm/exfilguard/crds/"
        );
    } else {
        println!("NOT CHECKED: the chart's CRDs against deploy/crds/ (not in this checkout)");
    }
    for d in docs::load(&chart_crds).unwrap() {
        kube_types::check(&d).unwrap_or_else(|e| panic!("{e}"));
    }
    let meta = docs::load(&chart.join("Chart.yaml"))
        .unwrap()
        .remove(0)
        .value;
    assert_eq!(meta["apiVersion"], "v2");
    let cargo = read(&root.join("Cargo.toml")).unwrap();
    let version = cargo
        .lines()
        .find_map(|l| l.strip_prefix("version = \""))
        .and_then(|v| v.strip_suffix('"'))
        .expect("workspace version");
    assert_eq!(
        meta["appVersion"], version,
        "Chart.yaml appVersion vs the workspace version"
    );
    let values = docs::load(&chart.join("values.yaml"))
        .unwrap()
        .remove(0)
        .value;
    for part in ["agent", "controller"] {
        assert_eq!(values[part]["image"]["tag"], version, "{part} image tag");
    }
}
