//! deploy/docker: no container engine here, so the Dockerfiles cannot be
//! built; check what can be checked without one: the packages and binaries
//! they build exist, what they copy into the runtime image is what they
//! built, the runtime image is minimal, and the ports match the manifests.
use std::collections::BTreeSet;

use exfilguard_deploy_check::{read, repo, repo_root};

/// `[[bin]]` names declared in a crate's Cargo.toml, and its package name.
fn crate_bins(dir: &str) -> (String, BTreeSet<String>) {
    let toml = read(&repo_root().join(dir).join("Cargo.toml")).unwrap();
    let mut names = toml
        .lines()
        .filter_map(|l| l.strip_prefix("name = \""))
        .map(|n| n.trim_end_matches('"').to_owned());
    let package = names.next().expect("package name");
    (package, names.collect())
}

fn check(file: &str, crate_dir: &str, bins: &[&str], port: u16, user: Option<&str>) {
    let text = read(&repo_root().join("deploy/docker").join(file)).unwrap();
    let (package, declared) = crate_bins(crate_dir);
    assert!(
        text.contains(&format!("-p {package} ")),
        "{file}: does not build {package}"
    );
    for bin in bins {
        assert!(
            declared.contains(*bin),
            "{crate_dir} declares no binary {bin}"
        );
        assert!(
            text.contains(&format!("target/release/{bin} ")),
            "{file}: does not take {bin} from the build"
        );
        assert!(
            text.contains(&format!("/out/{bin}")),
            "{file}: does not copy {bin} out"
        );
    }
    let stages: Vec<&str> = text.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(stages.len(), 2, "{file}: a build stage and a runtime stage");
    assert!(stages[0].ends_with(" AS build"), "{file}: {}", stages[0]);
    assert!(
        stages[1].contains("gcr.io/distroless/cc-debian12"),
        "{file}: minimal runtime image"
    );
    assert!(text.contains("--locked"), "{file}: builds with Cargo.lock");
    assert!(
        text.lines().any(|l| l == format!("EXPOSE {port}")),
        "{file}: EXPOSE {port}"
    );
    if let Some(u) = user {
        assert!(
            text.lines().any(|l| l == format!("USER {u}")),
            "{file}: USER {u}"
        );
    }
}

#[test]
fn dockerfiles_build_what_the_manifests_run() {
    let docs = repo::load_all(&repo::manifest_files().unwrap()).unwrap();
    let port = |kind: &str, name: &str| -> u16 {
        let d = repo::find(&docs, kind, name).unwrap();
        let p = d.value["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"]
            .as_u64();
        u16::try_from(p.unwrap()).unwrap()
    };
    let dep = repo::find(&docs, "Deployment", "exfilguard-controller").unwrap();
    let ctl_user = dep.value["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
        .as_u64()
        .unwrap();
    check(
        "agent.Dockerfile",
        "agent",
        &["exfilguard-agent"],
        port("DaemonSet", "exfilguard-agent"),
        None,
    );
    check(
        "controller.Dockerfile",
        "controller",
        &["exfilguard-controller", "exfilctl"],
        port("Deployment", "exfilguard-controller"),
        Some(&format!("{ctl_user}:{ctl_user}")),
    );
    // The agent image is built with the toolchain setup installs for CI.
    let agent = read(&repo_root().join("deploy/docker/agent.Dockerfile")).unwrap();
    assert!(
        agent.contains("cargo xtask setup"),
        "agent.Dockerfile: eBPF toolchain via xtask setup"
    );
    let ignore = read(&repo_root().join(".dockerignore")).unwrap();
    assert!(
        ignore.lines().any(|l| l == "target/"),
        ".dockerignore keeps target/ out of the context"
    );
}
