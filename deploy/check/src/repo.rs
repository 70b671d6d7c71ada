//! The repository's deploy files, loaded for the checks.
use std::path::{Path, PathBuf};

use crate::{CheckError, docs::Doc, repo_root};

/// `deploy/manifests/*.yaml`, in name order.
pub fn manifest_files() -> Result<Vec<PathBuf>, CheckError> {
    yaml_files(&repo_root().join("deploy/manifests"))
}

/// The `*.yaml` files of `dir`, in name order.
pub fn yaml_files(dir: &Path) -> Result<Vec<PathBuf>, CheckError> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|source| CheckError::Io {
            path: dir.to_owned(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    Ok(files)
}

/// Every document of `files`.
pub fn load_all(files: &[PathBuf]) -> Result<Vec<Doc>, CheckError> {
    let mut docs = Vec::new();
    for f in files {
        docs.extend(crate::docs::load(f)?);
    }
    Ok(docs)
}

/// Files owned by the Kubernetes integration (deploy/rbac.yaml,
/// deploy/crds/*.yaml) that exist in this checkout.
pub fn kube_integration_files() -> Result<Vec<PathBuf>, CheckError> {
    let root = repo_root();
    let mut files = Vec::new();
    let rbac = root.join("deploy/rbac.yaml");
    if rbac.exists() {
        files.push(rbac);
    }
    let crds = root.join("deploy/crds");
    if crds.is_dir() {
        files.extend(yaml_files(&crds)?);
    }
    Ok(files)
}

/// The document `kind/name` of `docs`.
pub fn find<'a>(docs: &'a [Doc], kind: &str, name: &str) -> Result<&'a Doc, CheckError> {
    docs.iter()
        .find(|d| d.kind() == kind && d.name() == name)
        .ok_or_else(|| CheckError::invalid("manifests", format!("no {kind}/{name}")))
}

/// The path of a program on `PATH`, or a clear error saying which Debian
/// package provides it (`cargo xtask setup` installs it).
pub fn tool(name: &str, package: &str) -> Result<PathBuf, CheckError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            CheckError::invalid(
                name,
                format!(
                    "not installed; `cargo xtask setup` installs it (Debian package {package})"
                ),
            )
        })
}
