//! Captures a newly opened incident's pod evidence from the API server, off
//! the ingest path: it follows the hub's incident events, so ingest and acks
//! never wait for Kubernetes. A failed capture is retried a bounded number of
//! times, each failure a timeline entry; giving up leaves a `capture_failed`
//! item. Standalone (no Kubernetes client) nothing runs here: the detection's
//! own items (workload identity, flows, DNS) are stored at ingest. Of
//! several controller replicas only the leader captures ([`Leader`]).

use std::{sync::Arc, time::Duration};

use exfilguard_proto::v1::{Incident, IncidentEventKind};
use serde_json::json;
use tokio::sync::broadcast::{self, error::RecvError};

use super::{NewEvidence, kind};
use crate::{
    Result,
    k8s::{evidence::PodEvidence, lease::Leader},
    store::Store,
    time::now_ms,
};

/// Timeline actor of capture entries.
const ACTOR: &str = "controller (evidence)";

pub use crate::retry::Retry;

/// The capture's retries: 2, 4, 8 s apart (the API server may be briefly
/// away; the incident does not wait for it).
pub const RETRY: Retry = Retry {
    attempts: 4,
    first_backoff: Duration::from_secs(2),
};

/// Captures pod evidence into the store.
#[derive(Clone)]
pub struct Capturer {
    store: Arc<dyn Store>,
    pods: PodEvidence,
    retry: Retry,
    leader: Leader,
}

impl std::fmt::Debug for Capturer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Capturer")
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

impl Capturer {
    /// A capturer storing into `store`, reading through `client`.
    pub fn new(store: Arc<dyn Store>, client: kube::Client, retry: Retry) -> Self {
        Self {
            store,
            pods: PodEvidence::new(client),
            retry,
            leader: Leader::always(),
        }
    }

    /// Captures only while `leader` says this replica leads (default:
    /// always).
    pub fn with_leader(mut self, leader: Leader) -> Self {
        self.leader = leader;
        self
    }

    /// Follows `events` until the hub closes, capturing each opened
    /// incident's pod in its own task.
    pub fn spawn(self, mut events: broadcast::Receiver<exfilguard_proto::v1::IncidentEvent>) {
        tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(e) if e.kind == IncidentEventKind::Opened as i32 => {
                        if !self.leader.is_leader() {
                            tracing::debug!(
                                "not the leader: the leading replica captures this incident's evidence"
                            );
                            continue;
                        }
                        if let Some(incident) = e.incident {
                            let me = self.clone();
                            tokio::spawn(async move { me.capture(&incident).await });
                        }
                    }
                    Ok(_) => {}
                    Err(RecvError::Lagged(n)) => {
                        tracing::warn!(
                            missed = n,
                            "evidence capture fell behind the incident events; some pods were not captured"
                        );
                    }
                    Err(RecvError::Closed) => return,
                }
            }
        });
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Store) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(store.as_ref()))
            .await
            .map_err(|e| crate::Error::Unavailable(format!("store task: {e}")))?
    }

    async fn note(&self, id: &str, cause: String) {
        let id2 = id.to_string();
        if let Err(e) = self
            .blocking(move |s| s.note(&id2, ACTOR, &cause, now_ms()))
            .await
        {
            tracing::warn!(incident = id, error = %e, "could not record timeline entry");
        }
    }

    async fn add(&self, id: &str, item: NewEvidence) {
        let id2 = id.to_string();
        let what = item.kind.clone();
        if let Err(e) = self.blocking(move |s| s.add_evidence(&id2, &item)).await {
            tracing::error!(incident = id, kind = %what, error = %e, "could not store evidence item");
        }
    }

    /// Captures `incident`'s pod (nothing for a workload outside Kubernetes),
    /// retrying failures; every outcome is in the evidence or the timeline.
    pub async fn capture(&self, incident: &Incident) {
        let Some(w) = incident.workload.as_ref().filter(|w| !w.pod.is_empty()) else {
            return;
        };
        let id = incident.id.as_str();
        let attempts = self.retry.attempts();
        for attempt in 1..=attempts {
            match self
                .pods
                .capture(&w.namespace, &w.pod, incident.opened_at_unix_ms, now_ms())
                .await
            {
                Ok(items) => {
                    let kinds: Vec<String> = items.iter().map(|i| i.kind.clone()).collect();
                    for item in items {
                        self.add(id, item).await;
                    }
                    self.note(
                        id,
                        format!(
                            "evidence captured from the API server for pod {}/{}: {}",
                            w.namespace,
                            w.pod,
                            kinds.join(", ")
                        ),
                    )
                    .await;
                    return;
                }
                Err(e) => {
                    let last = attempt == attempts;
                    self.note(
                        id,
                        format!(
                            "evidence capture for pod {}/{} failed (attempt {attempt}/{attempts}{}): {e}",
                            w.namespace,
                            w.pod,
                            if last { ", giving up" } else { ", retrying" }
                        ),
                    )
                    .await;
                    if last {
                        self.add(
                            id,
                            NewEvidence::json(
                                kind::CAPTURE_FAILED,
                                "controller",
                                now_ms(),
                                &json!({
                                    "namespace": w.namespace, "pod": w.pod,
                                    "attempts": attempts, "last_error": e.to_string(),
                                }),
                            ),
                        )
                        .await;
                        return;
                    }
                    tokio::time::sleep(self.retry.backoff(attempt)).await;
                }
            }
        }
    }
}
