//! Kubernetes side of the controller: containment of one pod
//! ([`containment`]), carried out for incidents by [`respond`], the custom
//! resources ([`crd`]) and the `ExfilPolicy` reconciler that turns them into
//! the agents' policy ([`policy_reconciler`]); of several controller
//! replicas, the one that does the leader-only duties is elected on a Lease
//! ([`lease`]).
//!
//! Everything here talks to the API server through a [`kube::Client`], so the
//! tests drive it with kube's `tower-test` mock (exact requests) and, when
//! `KUBECONFIG` is set, against a real cluster.

pub mod containment;
pub mod crd;
pub mod evidence;
pub mod lease;
mod names;
pub mod policy_reconciler;
pub mod respond;

pub use containment::{
    Containment, ContainmentConfig, DnsEndpoint, LockdownOptions, LockdownOutcome, PlannedAction,
    PodRef, ReleaseOutcome, ReleaseRequest,
};

/// Field manager of every write (server-side apply and patches), so
/// `kubectl get -o yaml --show-managed-fields` says who set what.
pub const FIELD_MANAGER: &str = "exfilguard-controller";

/// Label that marks a pod as quarantined; its value is the incident id, and
/// the lockdown NetworkPolicy selects on it.
pub const QUARANTINE_LABEL: &str = "exfilguard.io/quarantine";

/// Label on the lockdown NetworkPolicy naming the incident that made it, so
/// a release only removes its own policy.
pub const INCIDENT_LABEL: &str = "exfilguard.io/incident";

/// Failures of the Kubernetes side.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An argument cannot be used as a Kubernetes name or label value.
    #[error("invalid {what} {value:?}: {problem}")]
    Invalid {
        /// What the value is (`incident id`, `pod name`, ...).
        what: &'static str,
        /// The value.
        value: String,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// The API server refused or could not be reached.
    #[error("kubernetes {op}: {source}")]
    Api {
        /// What was being done (`get pod`, `apply networkpolicy`, ...).
        op: &'static str,
        /// The client's error (an API `Status` for refusals).
        #[source]
        source: kube::Error,
    },
    /// The API server kept changing the object under us.
    #[error("kubernetes {op}: still conflicting after {attempts} attempts")]
    Conflict {
        /// What was being done.
        op: &'static str,
        /// Attempts made.
        attempts: u32,
    },
}

impl Error {
    /// A short stable label for logs and metrics (one per variant).
    pub fn label(&self) -> &'static str {
        match self {
            Error::Invalid { .. } => "invalid",
            Error::Api { .. } => "api",
            Error::Conflict { .. } => "conflict",
        }
    }

    fn api(op: &'static str) -> impl FnOnce(kube::Error) -> Error {
        move |source| Error::Api { op, source }
    }
}

/// Result with this module's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The API status code of a refused request, if that is what `e` is.
fn status_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}
