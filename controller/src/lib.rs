//! exfilguard controller: the cluster side of the agent stream, incidents, and
//! the security team's API.
//!
//! The data path reads in one direction: [`gateway`] receives agent messages,
//! [`ingest`] commits them in batches to the [`store`] (which correlates
//! detections into incidents, see [`correlate`]), [`hub`] fans committed
//! changes out to watchers and containment commands out to agents, and
//! [`api`] answers the security team. [`auth`] decides who may do what from
//! the client certificate; [`server`] wires it all to a listener. [`k8s`]
//! contains pods in a cluster (label, NetworkPolicy, Event) and defines the
//! custom resources.

pub mod alerts;
pub mod api;
pub mod auth;
pub mod certs;
pub mod client;
pub mod config;
pub mod correlate;
pub mod evidence;
pub mod gateway;
pub mod hub;
pub mod ingest;
pub mod json;
pub mod k8s;
pub mod metrics;
pub mod node_policy;
pub mod report;
pub mod retention;
pub mod retry;
pub mod server;
pub mod store;
pub mod time;

use tonic::{Code, Status};

/// Controller version, reported to agents in `Welcome`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Every failure the controller can report; converted to a gRPC status in one
/// place ([`From<Error> for Status`](#impl-From<Error>-for-Status)).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The caller presented no client certificate.
    #[error("no client certificate: this endpoint needs mutual TLS")]
    Unauthenticated,
    /// The caller's role may not do this.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// A message or request is malformed.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The request does not fit the current state (e.g. releasing a closed incident).
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    /// A second stream for a node that already has one.
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// Unknown incident (or other entity).
    #[error("{kind} not found: {id}")]
    NotFound {
        /// What was looked up.
        kind: &'static str,
        /// The id that was not found.
        id: String,
    },
    /// A limit was hit (streams, queue).
    #[error("resource exhausted: {0}")]
    ResourceExhausted(String),
    /// The store failed.
    #[error("store {op}: {source}")]
    Store {
        /// What the store was doing.
        op: &'static str,
        /// The SQLite error.
        #[source]
        source: rusqlite::Error,
    },
    /// The controller is shutting down or a component stopped.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// Reading a file (certificate, key, config) failed.
    #[error("read {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A certificate could not be generated or parsed.
    #[error("certificate: {0}")]
    Certificate(String),
}

impl Error {
    /// A short stable label for logs and metrics (one per variant).
    pub fn label(&self) -> &'static str {
        match self {
            Error::Unauthenticated => "unauthenticated",
            Error::PermissionDenied(_) => "permission_denied",
            Error::InvalidArgument(_) => "invalid_argument",
            Error::FailedPrecondition(_) => "failed_precondition",
            Error::AlreadyExists(_) => "already_exists",
            Error::NotFound { .. } => "not_found",
            Error::ResourceExhausted(_) => "resource_exhausted",
            Error::Store { .. } => "store",
            Error::Unavailable(_) => "unavailable",
            Error::Io { .. } => "io",
            Error::Certificate(_) => "certificate",
        }
    }

    /// Shorthand for a store error with context.
    pub fn store(op: &'static str) -> impl FnOnce(rusqlite::Error) -> Error {
        move |source| Error::Store { op, source }
    }
}

/// The one place domain errors become gRPC statuses. Store and I/O details
/// stay in the controller's log; the caller gets a generic INTERNAL.
impl From<Error> for Status {
    fn from(err: Error) -> Status {
        let code = match &err {
            Error::Unauthenticated => Code::Unauthenticated,
            Error::PermissionDenied(_) => Code::PermissionDenied,
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::NotFound { .. } => Code::NotFound,
            Error::ResourceExhausted(_) => Code::ResourceExhausted,
            Error::Unavailable(_) => Code::Unavailable,
            Error::Store { .. } | Error::Io { .. } | Error::Certificate(_) => {
                tracing::error!(error = %err, "internal error");
                return Status::internal("internal error (see the controller's log)");
            }
        };
        Status::new(code, err.to_string())
    }
}

/// Result with the controller's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
