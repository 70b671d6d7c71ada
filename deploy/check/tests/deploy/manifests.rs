//! deploy/manifests (and deploy/rbac.yaml, deploy/crds/ when present): the
//! Kubernetes types accept every object unchanged, the objects refer to each
//! other consistently, the flags exist in the binaries, and — with
//! KUBECONFIG set — a real API server accepts them (server-side dry run).
use std::{
    collections::BTreeSet,
    io::Write as _,
    process::{Command, Stdio},
};

use exfilguard_deploy_check::{docs, docs::Doc, kube_types, read, repo, repo_root};
use serde_json::Value;

fn manifests() -> Vec<Doc> {
    repo::load_all(&repo::manifest_files().unwrap()).unwrap()
}

/// The Prometheus Operator's kinds, which k8s-openapi has no types for
/// (prometheus.rs checks the rule, `podmonitor_selects_the_agents` the monitor).
fn is_operator_kind(d: &Doc) -> bool {
    d.api_version() == "monitoring.coreos.com/v1"
}

#[test]
fn every_object_matches_the_kubernetes_types() {
    let mut files = repo::manifest_files().unwrap();
    let kube = repo::kube_integration_files().unwrap();
    if kube.is_empty() {
        println!("NOT CHECKED: deploy/rbac.yaml and deploy/crds/ are not in this checkout");
    }
    files.extend(kube);
    let mut checked = 0;
    for f in &files {
        let text = read(f).unwrap();
        let octal = docs::ambiguous_octal_lines(&text);
        assert!(
            octal.is_empty(),
            "{}: leading-zero integers (octal in YAML 1.1 only): {octal:?}",
            f.display()
        );
        for d in docs::parse(&text, &f.display().to_string()).unwrap() {
            kube_types::check(&d).unwrap_or_else(|e| panic!("{e}"));
            checked += 1;
        }
    }
    println!("{checked} objects checked in {} files", files.len());
    assert!(checked >= 7, "only {checked} objects");
}

fn container<'a>(d: &'a Doc, name: &str) -> &'a Value {
    d.value["spec"]["template"]["spec"]["containers"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("{}: no container {name}", d.key()))
}

fn args(c: &Value) -> Vec<String> {
    c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect()
}

/// `--flag` names a clap-derived CLI accepts: its fields in kebab case and
/// explicit `long = "..."` names.
fn cli_flags(source: &str) -> BTreeSet<String> {
    let mut flags = BTreeSet::new();
    for line in source.lines() {
        let l = line.trim();
        if let Some(rest) = l.split("long = \"").nth(1) {
            flags.insert(rest.split('"').next().unwrap_or("").to_owned());
        }
        if let Some((field, _)) = l.strip_prefix("pub ").unwrap_or(l).split_once(": ")
            && field.chars().all(|c| c.is_ascii_lowercase() || c == '_')
        {
            flags.insert(field.replace('_', "-"));
        }
    }
    flags
}

fn assert_flags_exist(args: &[String], source_file: &str) {
    let src = read(&repo_root().join(source_file)).unwrap();
    let flags = cli_flags(&src);
    for a in args.iter().filter(|a| a.starts_with("--")) {
        let name = a.trim_start_matches("--").split('=').next().unwrap();
        assert!(flags.contains(name), "{a}: no such flag in {source_file}");
    }
}

fn pod_labels(d: &Doc) -> &serde_json::Map<String, Value> {
    d.value["spec"]["template"]["metadata"]["labels"]
        .as_object()
        .unwrap()
}

fn selects(selector: &Value, labels: &serde_json::Map<String, Value>) -> bool {
    selector
        .as_object()
        .unwrap()
        .iter()
        .all(|(k, v)| labels.get(k) == Some(v))
}

fn assert_mounts_and_ports(d: &Doc, c: &Value) {
    let spec = &d.value["spec"]["template"]["spec"];
    let volumes: BTreeSet<&str> = spec["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    for m in c["volumeMounts"].as_array().unwrap() {
        assert!(
            volumes.contains(m["name"].as_str().unwrap()),
            "{}: mount of no volume {m}",
            d.key()
        );
    }
    let ports: BTreeSet<&str> = c["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    for probe in ["readinessProbe", "livenessProbe"] {
        let p = &c[probe];
        let port = p["httpGet"]["port"]
            .as_str()
            .or(p["tcpSocket"]["port"].as_str());
        let port =
            port.unwrap_or_else(|| panic!("{}: {probe} missing or not by port name", d.key()));
        assert!(
            ports.contains(port),
            "{}: {probe} on unknown port {port}",
            d.key()
        );
    }
    assert!(
        c["resources"]["requests"].is_object() && c["resources"]["limits"].is_object(),
        "{}: requests and limits",
        d.key()
    );
}

#[test]
fn objects_refer_to_each_other_consistently() {
    let docs = manifests();
    let ds = repo::find(&docs, "DaemonSet", "exfilguard-agent").unwrap();
    let dep = repo::find(&docs, "Deployment", "exfilguard-controller").unwrap();
    let svc = repo::find(&docs, "Service", "exfilguard-controller").unwrap();
    let ns = repo::find(&docs, "Namespace", "exfilguard-system").unwrap();
    for d in &docs {
        if d.kind() != "Namespace" {
            assert_eq!(d.value["metadata"]["namespace"], ns.name(), "{}", d.key());
        }
    }
    for w in [ds, dep] {
        assert!(
            selects(&w.value["spec"]["selector"]["matchLabels"], pod_labels(w)),
            "{}: selector misses its pods",
            w.key()
        );
    }
    assert!(
        selects(&svc.value["spec"]["selector"], pod_labels(dep)),
        "Service does not select the controller"
    );

    // Agent: capabilities not privilege; every node; downward-API node name.
    let agent = container(ds, "agent");
    assert_mounts_and_ports(ds, agent);
    let sc = &agent["securityContext"];
    assert_eq!(sc["privileged"], false);
    let caps: BTreeSet<&str> = sc["capabilities"]["add"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert_eq!(
        caps,
        BTreeSet::from(["BPF", "NET_ADMIN", "PERFMON"]),
        "what preflight.rs checks for"
    );
    let tolerations = ds.value["spec"]["template"]["spec"]["tolerations"]
        .as_array()
        .unwrap();
    assert!(
        tolerations
            .iter()
            .any(|t| t["operator"] == "Exists" && t.get("key").is_none()),
        "agent must tolerate every taint"
    );
    let env = agent["env"].as_array().unwrap();
    assert!(
        env.iter().any(|e| e["name"] == "NODE_NAME"
            && e["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName")
    );
    let ann = &ds.value["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(ann["prometheus.io/scrape"], "true");
    let metrics_port = agent["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "metrics")
        .unwrap();
    assert_eq!(
        ann["prometheus.io/port"].as_str().unwrap(),
        metrics_port["containerPort"].to_string()
    );
    let agent_args = args(agent);
    assert_flags_exist(&agent_args, "agent/src/main.rs");
    assert!(agent_args.contains(&format!(
        "--metrics-addr=0.0.0.0:{}",
        metrics_port["containerPort"]
    )));

    // The agent's --internal flags and the pushed policy's internal_cidrs agree.
    let internal: BTreeSet<String> = agent_args
        .iter()
        .filter_map(|a| a.strip_prefix("--internal="))
        .map(str::to_owned)
        .collect();
    let policy_cm = repo::find(&docs, "ConfigMap", "exfilguard-agent-policy").unwrap();
    let policy = docs::parse(
        policy_cm.value["data"]["agent-policy.yaml"]
            .as_str()
            .unwrap(),
        "policy",
    )
    .unwrap()
    .remove(0)
    .value;
    let cidrs: BTreeSet<String> = policy["internal_cidrs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(internal, cidrs, "agent --internal vs policy internal_cidrs");

    // The agent reaches the controller through the Service, on its port.
    let svc_port = &svc.value["spec"]["ports"][0];
    let url = agent_args
        .iter()
        .find_map(|a| a.strip_prefix("--controller="))
        .unwrap();
    assert_eq!(
        url,
        format!(
            "https://{}.{}.svc:{}",
            svc.name(),
            ns.name(),
            svc_port["port"]
        )
    );

    // Controller: its flags exist, its ConfigMaps exist, the Service's
    // target port is one of its ports.
    let ctl = container(dep, "controller");
    assert_mounts_and_ports(dep, ctl);
    assert_flags_exist(&args(ctl), "controller/src/bin/exfilguard-controller.rs");
    let ctl_ports: BTreeSet<&str> = ctl["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert!(ctl_ports.contains(svc_port["targetPort"].as_str().unwrap()));
    for w in [ds, dep] {
        for v in w.value["spec"]["template"]["spec"]["volumes"]
            .as_array()
            .unwrap()
        {
            if let Some(cm) = v["configMap"]["name"].as_str() {
                repo::find(&docs, "ConfigMap", cm).unwrap();
            }
            if let Some(pvc) = v["persistentVolumeClaim"]["claimName"].as_str() {
                repo::find(&docs, "PersistentVolumeClaim", pvc).unwrap();
            }
            // Secrets are made by deploy/make-certs.sh, not shipped.
            if let Some(secret) = v["secret"]["secretName"].as_str() {
                let script = read(&repo_root().join("deploy/make-certs.sh")).unwrap();
                assert!(
                    script.contains(secret),
                    "make-certs.sh does not make Secret {secret}"
                );
            }
        }
    }
    // Two controller replicas sharing incidents through the API server (the
    // duty is on, leader election too), never both down by choice.
    assert_eq!(dep.value["spec"]["replicas"], 2);
    assert_eq!(dep.value["spec"]["strategy"]["type"], "RollingUpdate");
    let pdb = repo::find(&docs, "PodDisruptionBudget", "exfilguard-controller").unwrap();
    assert_eq!(pdb.value["spec"]["minAvailable"], 1);
    let args = dep.value["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap();
    assert!(
        !args.iter().any(|a| a
            .as_str()
            .is_some_and(|a| a.starts_with("--kubernetes-duties") && !a.contains("incidents"))),
        "incidents duty switched off: {args:?}"
    );

    // Service accounts exist where the RBAC is in this checkout.
    let rbac_path = repo_root().join("deploy/rbac.yaml");
    if rbac_path.exists() {
        let rbac = docs::load(&rbac_path).unwrap();
        for w in [ds, dep] {
            let sa = w.value["spec"]["template"]["spec"]["serviceAccountName"]
                .as_str()
                .unwrap();
            let found = rbac
                .iter()
                .find(|d| d.kind() == "ServiceAccount" && d.name() == sa)
                .unwrap_or_else(|| panic!("no ServiceAccount {sa} in deploy/rbac.yaml"));
            assert_eq!(found.value["metadata"]["namespace"], ns.name());
        }
    } else {
        println!("NOT CHECKED: service accounts (deploy/rbac.yaml is not in this checkout)");
    }
}

#[test]
fn podmonitor_selects_the_agents() {
    let docs = manifests();
    let ds = repo::find(&docs, "DaemonSet", "exfilguard-agent").unwrap();
    let pm = docs::load(&repo_root().join("deploy/prometheus/podmonitor.yaml"))
        .unwrap()
        .remove(0);
    assert!(is_operator_kind(&pm));
    assert_eq!(pm.kind(), "PodMonitor");
    let labels = pod_labels(ds);
    assert!(selects(
        &pm.value["spec"]["selector"]["matchLabels"],
        labels
    ));
    // job = the pod's value of jobLabel = what the rules and dashboard select.
    let job_label = pm.value["spec"]["jobLabel"].as_str().unwrap();
    assert_eq!(labels[job_label], "exfilguard-agent");
    let port = pm.value["spec"]["podMetricsEndpoints"][0]["port"]
        .as_str()
        .unwrap();
    let agent = container(ds, "agent");
    assert!(
        agent["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == port)
    );
}

/// Deletes the test namespace even when the test fails.
struct Namespace(String);

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("kubectl")
            .args(["delete", "namespace", &self.0, "--wait=false"])
            .status();
    }
}

fn kubectl(args: &[&str], stdin: Option<&str>) -> std::process::Output {
    let mut child = Command::new("kubectl")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl");
    if let Some(s) = stdin {
        child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
    }
    child.wait_with_output().unwrap()
}

/// With KUBECONFIG set: every object through the real API server's
/// validation (strict field validation, server-side dry run), namespaced
/// ones in a namespace of the test's own.
#[test]
fn a_real_api_server_accepts_them() {
    if std::env::var_os("KUBECONFIG").is_none() {
        println!("SKIPPED a_real_api_server_accepts_them: KUBECONFIG is not set");
        return;
    }
    repo::tool("kubectl", "kubectl").unwrap_or_else(|e| panic!("KUBECONFIG is set but {e}"));
    let ns = Namespace(format!("exfilguard-deploy-check-{}", std::process::id()));
    let out = kubectl(&["create", "namespace", &ns.0], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let has_operator = kubectl(
        &[
            "api-resources",
            "--api-group=monitoring.coreos.com",
            "-o",
            "name",
        ],
        None,
    );
    let has_operator = has_operator.status.success() && !has_operator.stdout.is_empty();
    let mut docs = manifests();
    docs.extend(repo::load_all(&repo::kube_integration_files().unwrap()).unwrap());
    for f in ["prometheusrule.yaml", "podmonitor.yaml"] {
        docs.extend(docs::load(&repo_root().join("deploy/prometheus").join(f)).unwrap());
    }
    for mut d in docs {
        if is_operator_kind(&d) && !has_operator {
            println!(
                "SKIPPED {}: the cluster has no monitoring.coreos.com API (Prometheus Operator)",
                d.key()
            );
            continue;
        }
        if d.value["metadata"].get("namespace").is_some() {
            d.value["metadata"]["namespace"] = Value::from(ns.0.clone());
        }
        let json = serde_json::to_string(&d.value).unwrap();
        let out = kubectl(
            &["apply", "--dry-run=server", "--validate=strict", "-f", "-"],
            Some(&json),
        );
        assert!(
            out.status.success(),
            "{} ({}): {}",
            d.origin,
            d.key(),
            String::from_utf8_lossy(&out.stderr)
        );
        println!("{}", String::from_utf8_lossy(&out.stdout).trim());
    }
}
