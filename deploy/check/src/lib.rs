//! Checks of the files under `deploy/` and `tests/lima/`, run by this crate's
//! tests (`cargo test -p exfilguard-deploy-check`):
//!
//! - manifests deserialize into the Kubernetes API types and round-trip
//!   unchanged ([`kube_types`]), and refer to each other consistently;
//! - the Helm chart rendered with its default values equals the plain
//!   manifests ([`chart`]: a renderer for the small template subset it uses);
//! - every metric an alert rule or the Grafana dashboard selects is one the
//!   agent exports ([`metrics`], [`promql`]).
pub mod chart;
pub mod docs;
pub mod kube_types;
pub mod metrics;
pub mod promql;
pub mod repo;

use std::path::{Path, PathBuf};

/// Why a check failed.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A file is not valid YAML or JSON.
    #[error("{origin}: {message}")]
    Parse {
        /// File (and document) that failed.
        origin: String,
        /// The parser's message.
        message: String,
    },
    /// A check found a problem.
    #[error("{origin}: {message}")]
    Invalid {
        /// File, document or object concerned.
        origin: String,
        /// What is wrong.
        message: String,
    },
}

impl CheckError {
    /// An [`CheckError::Invalid`] about `origin`.
    pub fn invalid(origin: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid {
            origin: origin.into(),
            message: message.into(),
        }
    }
}

/// The repository root (this crate lives in `deploy/check`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."))
}

/// Reads a file to a string.
pub fn read(path: &Path) -> Result<String, CheckError> {
    std::fs::read_to_string(path).map_err(|source| CheckError::Io {
        path: path.to_owned(),
        source,
    })
}
