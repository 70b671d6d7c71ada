//! tests/lima and deploy/*.sh: the scripts parse (`bash -n`) and pass
//! shellcheck; the Lima templates are YAML with the settings the harness
//! relies on. (The harness itself needs a workstation with Lima: it cannot
//! run here.)
use std::{path::PathBuf, process::Command};

use exfilguard_deploy_check::{docs, read, repo, repo_root};

fn scripts() -> Vec<PathBuf> {
    let root = repo_root();
    let mut out = Vec::new();
    for dir in [root.join("tests/lima"), root.join("deploy")] {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "sh") {
                out.push(p);
            }
        }
    }
    out.sort();
    assert!(out.len() >= 2, "scripts: {out:?}");
    out
}

#[test]
fn scripts_parse_and_pass_shellcheck() {
    let shellcheck = repo::tool("shellcheck", "shellcheck").unwrap_or_else(|e| panic!("{e}"));
    for s in scripts() {
        let out = Command::new("bash").arg("-n").arg(&s).output().unwrap();
        assert!(
            out.status.success(),
            "bash -n {}: {}",
            s.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let out = Command::new(&shellcheck)
            .args(["--shell=bash", "--severity=style", "--external-sources"])
            .arg(&s)
            .current_dir(s.parent().unwrap())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "shellcheck {}:\n{}",
            s.display(),
            String::from_utf8_lossy(&out.stdout)
        );
        let text = read(&s).unwrap();
        assert!(
            text.starts_with("#!/usr/bin/env bash\n"),
            "{}: shebang",
            s.display()
        );
        assert!(
            text.contains("set -euo pipefail"),
            "{}: strict mode",
            s.display()
        );
    }
}

#[test]
fn lima_templates_ask_for_what_the_harness_needs() {
    let dir = repo_root().join("tests/lima");
    for name in ["k3s-server.yaml", "k3s-agent.yaml"] {
        let path = dir.join(name);
        let t = docs::load(&path).unwrap().remove(0).value;
        let images = t["images"]
            .as_array()
            .unwrap_or_else(|| panic!("{name}: images"));
        assert!(
            images
                .iter()
                .all(|i| i["location"].as_str().unwrap().contains("ubuntu")),
            "{name}: Ubuntu images"
        );
        assert!(
            images.iter().any(|i| i["arch"] == "x86_64")
                && images.iter().any(|i| i["arch"] == "aarch64"),
            "{name}"
        );
        assert_eq!(
            t["containerd"]["system"], false,
            "{name}: k3s brings its own containerd"
        );
        let provision: String = t["provision"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["script"].as_str().unwrap_or(""))
            .collect();
        assert!(
            provision.contains("/sys/kernel/btf/vmlinux"),
            "{name}: checks BTF"
        );
        assert!(provision.contains("cgroup2fs"), "{name}: checks cgroup v2");
        assert!(provision.contains("get.k3s.io"), "{name}: installs k3s");
        assert!(
            t["networks"].as_array().is_some_and(|n| !n.is_empty()),
            "{name}: a network the two nodes share"
        );
    }
}
