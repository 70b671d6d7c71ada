//! Carries the store's cluster effects out against the API server: locks an
//! incident's pod down ([`Effect::Lockdown`]), lifts it ([`Effect::Release`]),
//! and writes what happened into the incident's timeline, so a responder
//! reading `exfilctl incidents show` sees the NetworkPolicy, the label and
//! any failure without opening the controller's log.
//!
//! Runs beside the agent's in-kernel Block, never instead of it: the hub
//! sends the Block to the node in the same breath. Commands for one incident
//! run in order (a release waits for its lockdown); different incidents run
//! concurrently, so one slow API call does not hold up the next incident.
//!
//! With several controller replicas only the elected leader acts
//! ([`Leader`]); the others drop the effects (every replica sees every
//! incident in the shared store, so the leader acts on them). A replica that
//! gains leadership re-applies every contained incident's lockdown and lifts
//! the leftover lockdowns of incidents released or resolved meanwhile, since
//! a release may have been lost in the failover.

use std::{collections::HashMap, future::Future, sync::Arc, time::Duration};

use exfilguard_proto::v1::{IncidentEventKind, IncidentState, Workload};
use k8s_openapi::api::{core::v1::Pod, networking::v1::NetworkPolicy};
use kube::{Api, ResourceExt as _, api::ListParams};
use tokio::{sync::mpsc, task::JoinHandle};

use super::{
    Containment, Error, INCIDENT_LABEL, LockdownOptions, LockdownOutcome, PlannedAction, PodRef,
    QUARANTINE_LABEL, ReleaseOutcome, ReleaseRequest, lease::Leader, status_code,
};
use crate::{
    hub::Hub,
    store::{Effect, IncidentFilter, Store},
    time::now_ms,
};

/// Timeline actor of every entry written here.
const ACTOR: &str = "controller/kubernetes";

pub use crate::retry::Retry;

/// Containment's retries: 0.5 + 1 + 2 s, so a brief API server hiccup is
/// ridden out while the in-kernel Block already holds the workload.
pub const RETRY: Retry = Retry {
    attempts: 4,
    first_backoff: Duration::from_millis(500),
};

/// Locks pods down and releases them on the hub's behalf.
#[derive(Clone)]
pub struct Responder {
    containment: Containment,
    store: Arc<dyn Store>,
    hub: Arc<Hub>,
    options: LockdownOptions,
    retry: Retry,
    leader: Leader,
}

impl Responder {
    /// A responder that contains through `containment` with `options`.
    pub fn new(
        containment: Containment,
        store: Arc<dyn Store>,
        hub: Arc<Hub>,
        options: LockdownOptions,
        retry: Retry,
    ) -> Self {
        Self {
            containment,
            store,
            hub,
            options,
            retry,
            leader: Leader::always(),
        }
    }

    /// Acts only while `leader` says this replica leads (default: always).
    pub fn with_leader(mut self, leader: Leader) -> Self {
        self.leader = leader;
        self
    }

    /// Connects the responder to its hub and starts serving; returns the
    /// task, which ends when the hub is dropped.
    pub fn start(self) -> JoinHandle<()> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.hub.set_cluster(tx);
        tokio::spawn(self.run(rx))
    }

    async fn run(self, mut rx: mpsc::UnboundedReceiver<Effect>) {
        let mut running: HashMap<String, JoinHandle<()>> = HashMap::new();
        while let Some(effect) = rx.recv().await {
            let Some(incident) = incident_of(&effect).map(str::to_owned) else {
                continue;
            };
            if !self.leader.is_leader() {
                tracing::debug!(%incident, "not the leader: the leading replica carries this cluster effect out");
                continue;
            }
            running.retain(|_, task| !task.is_finished());
            let before = running.remove(&incident);
            let this = self.clone();
            let task = tokio::spawn(async move {
                if let Some(before) = before {
                    let _ = before.await;
                }
                // Leadership may have gone while the previous one ran.
                if !this.leader.is_leader() {
                    tracing::debug!("no longer the leader: cluster effect left to the new leader");
                    return;
                }
                this.carry_out(effect).await;
            });
            running.insert(incident, task);
        }
    }

    /// Follows the leadership: while leading from the start, re-applies the
    /// contained incidents' lockdowns once (what a restart interrupted); on
    /// every later gain, that and [`Responder::sweep_released`]. The task
    /// runs until aborted.
    pub fn follow_leadership(&self) -> JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut leader = me.leader.clone();
            if leader.is_leader() {
                me.reconcile_contained().await;
            }
            loop {
                if leader.changed().await {
                    tracing::info!("leading: re-applying lockdowns and lifting stale ones");
                    me.reconcile_contained().await;
                    me.sweep_released().await;
                }
            }
        })
    }

    /// Lifts lockdowns left behind by incidents that are no longer contained
    /// (released or resolved, their release lost, e.g. in a failover): every
    /// lockdown NetworkPolicy and quarantine label in the cluster is checked
    /// against its incident in the store. Lockdowns of incidents the store
    /// does not know, or that are still open or contained, stay.
    pub async fn sweep_released(&self) {
        let client = self.containment.client().clone();
        let mut found: Vec<(String, PodRef)> = Vec::new();
        let params = |label: &str| ListParams::default().labels(label);
        let policies: Api<NetworkPolicy> = Api::all(client.clone());
        match policies.list(&params(INCIDENT_LABEL)).await {
            Ok(list) => {
                for np in list.items {
                    let Some(incident) = np.labels().get(INCIDENT_LABEL).cloned() else {
                        continue;
                    };
                    let owner = np
                        .owner_references()
                        .iter()
                        .find(|o| o.kind == "Pod" && o.api_version == "v1");
                    if let (Some(ns), Some(owner)) = (np.namespace(), owner) {
                        found.push((
                            incident,
                            PodRef {
                                namespace: ns,
                                name: owner.name.clone(),
                                uid: Some(owner.uid.clone()),
                            },
                        ));
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot list lockdown NetworkPolicies to lift stale ones");
                return;
            }
        }
        let pods: Api<Pod> = Api::all(client);
        match pods.list(&params(QUARANTINE_LABEL)).await {
            Ok(list) => {
                for pod in list.items {
                    let Some(incident) = pod.labels().get(QUARANTINE_LABEL).cloned() else {
                        continue;
                    };
                    let pod_ref = PodRef {
                        namespace: pod.namespace().unwrap_or_default(),
                        name: pod.name_any(),
                        uid: pod.uid(),
                    };
                    if !found.iter().any(|(i, p)| {
                        *i == incident && p.namespace == pod_ref.namespace && p.name == pod_ref.name
                    }) {
                        found.push((incident, pod_ref));
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot list quarantined pods to lift stale lockdowns");
                return;
            }
        }
        for (incident, pod) in found {
            let store = self.store.clone();
            let id = incident.clone();
            let state = match tokio::task::spawn_blocking(move || store.get_incident(&id)).await {
                Ok(Ok(i)) => i.state(),
                Ok(Err(crate::Error::NotFound { .. })) => {
                    tracing::warn!(%incident, namespace = %pod.namespace, pod = %pod.name,
                        "lockdown of an incident the store does not know; left in place");
                    continue;
                }
                Ok(Err(e)) => {
                    tracing::warn!(%incident, error = %e, "cannot read the incident of a lockdown");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "store task failed");
                    continue;
                }
            };
            if matches!(state, IncidentState::Released | IncidentState::Resolved) {
                tracing::info!(%incident, namespace = %pod.namespace, pod = %pod.name, ?state,
                    "lifting a lockdown its incident no longer holds");
                self.release_pod(
                    &incident,
                    pod,
                    "exfilguard-controller".into(),
                    format!(
                        "incident is {}; its release was not carried out before a leader change",
                        state.as_str_name()
                    ),
                )
                .await;
            }
        }
    }

    /// Locks down again the pods of every contained incident (idempotent:
    /// server-side apply), so containment that a restart interrupted, or a
    /// label someone removed by hand, is put back.
    pub async fn reconcile_contained(&self) {
        let mut filter = IncidentFilter {
            state: Some(IncidentState::Contained),
            limit: 200,
            ..Default::default()
        };
        // Bounded: a store that keeps returning pages cannot loop forever.
        for _ in 0..1000 {
            let page = {
                let store = self.store.clone();
                let f = filter.clone();
                match tokio::task::spawn_blocking(move || store.list_incidents(&f)).await {
                    Ok(Ok(page)) => page,
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "cannot list contained incidents to re-apply lockdowns");
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "store task failed");
                        return;
                    }
                }
            };
            for incident in &page.incidents {
                if let Some(w) = incident.workload.as_ref().filter(|w| !w.pod.is_empty()) {
                    self.lockdown(&incident.id, w, false, true).await;
                }
            }
            match page.next {
                Some(next) => filter.after = Some(next),
                None => return,
            }
        }
    }

    async fn carry_out(&self, effect: Effect) {
        match effect {
            Effect::Lockdown {
                incident_id,
                workload,
                dry_run,
            } => self.lockdown(&incident_id, &workload, dry_run, false).await,
            Effect::Release {
                incident_id,
                workload,
                by,
                reason,
            } => self.release(&incident_id, &workload, by, reason).await,
            _ => {}
        }
    }

    async fn lockdown(&self, incident: &str, workload: &Workload, dry_run: bool, again: bool) {
        let pod = pod_ref(workload);
        let options = LockdownOptions {
            dry_run,
            ..self.options.clone()
        };
        let result = self
            .with_retry("lockdown", || {
                self.containment.lockdown(&pod, incident, &options)
            })
            .await;
        let entry = match result {
            Ok(LockdownOutcome::Contained { .. }) if again => {
                tracing::info!(incident, pod = %pod.name, "lockdown re-applied");
                return;
            }
            Ok(outcome) => describe_lockdown(&pod, incident, &outcome),
            Err((e, attempts)) => format!(
                "kubernetes lockdown of pod {}/{} failed after {attempts} attempt(s): {e}; \
                 the in-kernel Block (if sent) still holds; by hand: \
                 kubectl -n {} label pod {} {QUARANTINE_LABEL}={incident}",
                pod.namespace, pod.name, pod.namespace, pod.name
            ),
        };
        self.note(incident, entry).await;
    }

    async fn release(&self, incident: &str, workload: &Workload, by: String, reason: String) {
        self.release_pod(incident, pod_ref(workload), by, reason)
            .await;
    }

    async fn release_pod(&self, incident: &str, pod: PodRef, by: String, reason: String) {
        let request = ReleaseRequest {
            by,
            reason,
            dry_run: false,
        };
        let result = self
            .with_retry("release", || {
                self.containment.release(&pod, incident, &request)
            })
            .await;
        let entry = match result {
            Ok(outcome) => describe_release(&pod, &outcome),
            Err((e, attempts)) => format!(
                "kubernetes release of pod {}/{} failed after {attempts} attempt(s): {e}; by hand: \
                 kubectl -n {} label pod {} {QUARANTINE_LABEL}- && \
                 kubectl -n {} delete networkpolicy {}",
                pod.namespace,
                pod.name,
                pod.namespace,
                pod.name,
                pod.namespace,
                super::containment::policy_name(&pod.name)
            ),
        };
        self.note(incident, entry).await;
    }

    /// Runs `call` until it succeeds, fails for good, or the attempts are
    /// used up; the error comes with the number of attempts made.
    async fn with_retry<T, F, Fut>(&self, what: &str, call: F) -> Result<T, (Error, u32)>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = super::Result<T>>,
    {
        let attempts = self.retry.attempts();
        for attempt in 1..=attempts {
            match call().await {
                Ok(v) => return Ok(v),
                Err(e) if attempt < attempts && is_transient(&e) => {
                    tracing::warn!(what, attempt, error = %e, "kubernetes call failed; retrying");
                    tokio::time::sleep(self.retry.backoff(attempt)).await;
                }
                Err(e) => return Err((e, attempt)),
            }
        }
        unreachable!("the loop returns on its last attempt")
    }

    /// Appends a timeline entry and tells watchers the incident changed.
    async fn note(&self, incident: &str, entry: String) {
        let store = self.store.clone();
        let hub = self.hub.clone();
        let id = incident.to_owned();
        let done = tokio::task::spawn_blocking(move || -> crate::Result<()> {
            store.note(&id, ACTOR, &entry, now_ms())?;
            let incident = store.get_incident(&id)?;
            hub.apply(
                store.as_ref(),
                vec![Effect::Incident {
                    kind: IncidentEventKind::Updated,
                    incident: Box::new(incident),
                }],
            );
            Ok(())
        })
        .await;
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(incident, error = %e, "could not record the kubernetes outcome")
            }
            Err(e) => tracing::warn!(incident, error = %e, "store task failed"),
        }
    }
}

/// The incident a cluster effect is about; `None` for other effects.
fn incident_of(effect: &Effect) -> Option<&str> {
    match effect {
        Effect::Lockdown { incident_id, .. } | Effect::Release { incident_id, .. } => {
            Some(incident_id)
        }
        _ => None,
    }
}

/// Worth another attempt: the API server was unreachable, overloaded, or the
/// object changed under us. A refusal (403, 422, ...) will not change.
fn is_transient(e: &Error) -> bool {
    match e {
        Error::Invalid { .. } => false,
        Error::Conflict { .. } => true,
        Error::Api { source, .. } => match status_code(source) {
            Some(code) => code == 409 || code == 429 || code >= 500,
            None => true,
        },
    }
}

fn pod_ref(w: &Workload) -> PodRef {
    PodRef {
        namespace: w.namespace.clone(),
        name: w.pod.clone(),
        uid: pod_uid(&w.cgroup_path),
    }
}

/// The pod UID in a kubelet cgroup path, for either cgroup driver:
/// `…/kubepods-burstable-pod<uid with _>.slice/…` (systemd) or
/// `…/pod<uid>/…` (cgroupfs). With it, a pod re-created under the same name
/// (a StatefulSet replica) is not mistaken for the one that leaked.
pub fn pod_uid(cgroup_path: &str) -> Option<String> {
    cgroup_path.split('/').find_map(|part| {
        let part = part.strip_suffix(".slice").unwrap_or(part);
        let rest = if let Some(r) = part.strip_prefix("pod") {
            r
        } else {
            &part[part.rfind("-pod")? + 4..]
        };
        let uid = rest.replace('_', "-");
        let shape = uid.len() == 36
            && uid.char_indices().all(|(i, c)| {
                if matches!(i, 8 | 13 | 18 | 23) {
                    c == '-'
                } else {
                    c.is_ascii_hexdigit()
                }
            });
        shape.then_some(uid)
    })
}

fn describe_lockdown(pod: &PodRef, incident: &str, outcome: &LockdownOutcome) -> String {
    let at = format!("{}/{}", pod.namespace, pod.name);
    match outcome {
        LockdownOutcome::Contained {
            network_policy,
            replaced_incident,
            event_recorded,
            ..
        } => {
            let mut s = format!(
                "kubernetes lockdown: NetworkPolicy {}/{network_policy} applied (egress denied), \
                 pod {at} labelled {QUARANTINE_LABEL}={incident}",
                pod.namespace
            );
            if let Some(other) = replaced_incident {
                s.push_str(&format!("; took the quarantine over from incident {other}"));
            }
            s.push_str(if *event_recorded {
                "; Event recorded on the pod"
            } else {
                "; the Event could not be recorded (see the controller log)"
            });
            s
        }
        LockdownOutcome::PodGone { detail } => {
            format!("kubernetes lockdown: pod {at} is gone ({detail}); nothing to lock down")
        }
        LockdownOutcome::ProtectedNamespace { namespace } => {
            format!("kubernetes lockdown refused: namespace {namespace} is on the protected list")
        }
        LockdownOutcome::DryRun { actions } => format!(
            "dry-run: kubernetes lockdown would {}",
            actions
                .iter()
                .map(describe_action)
                .collect::<Vec<_>>()
                .join("; ")
        ),
    }
}

fn describe_release(pod: &PodRef, outcome: &ReleaseOutcome) -> String {
    let at = format!("{}/{}", pod.namespace, pod.name);
    match outcome {
        ReleaseOutcome::Released {
            label_removed,
            network_policy_deleted,
            event_recorded,
            still_held_by,
        } => {
            let mut s = format!(
                "kubernetes release of pod {at}: {}, {}",
                if *label_removed {
                    "quarantine label removed"
                } else {
                    "quarantine label was not there"
                },
                if *network_policy_deleted {
                    "NetworkPolicy deleted"
                } else {
                    "NetworkPolicy was not there"
                }
            );
            if let Some(other) = still_held_by {
                s.push_str(&format!("; the pod stays quarantined by incident {other}"));
            }
            if !event_recorded {
                s.push_str("; the Event could not be recorded (see the controller log)");
            }
            s
        }
        ReleaseOutcome::PodGone { detail } => {
            format!("kubernetes release: pod {at} is gone ({detail}); nothing to release")
        }
        ReleaseOutcome::DryRun { actions } => format!(
            "dry-run: kubernetes release would {}",
            actions
                .iter()
                .map(describe_action)
                .collect::<Vec<_>>()
                .join("; ")
        ),
    }
}

fn describe_action(a: &PlannedAction) -> String {
    match a {
        PlannedAction::ApplyNetworkPolicy {
            namespace, name, ..
        } => format!("apply NetworkPolicy {namespace}/{name} (egress denied)"),
        PlannedAction::LabelPod {
            namespace,
            pod,
            label,
            value,
        } => format!("label pod {namespace}/{pod} {label}={value}"),
        PlannedAction::UnlabelPod {
            namespace,
            pod,
            label,
        } => format!("remove label {label} from pod {namespace}/{pod}"),
        PlannedAction::DeleteNetworkPolicy { namespace, name } => {
            format!("delete NetworkPolicy {namespace}/{name}")
        }
        PlannedAction::RecordEvent {
            namespace,
            pod,
            reason,
            ..
        } => format!("record Event {reason} on pod {namespace}/{pod}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_uid_from_both_cgroup_drivers() {
        let uid = "6f1c2b9e-6a49-4d0c-9a57-1b2f0c3d4e5f";
        assert_eq!(
            pod_uid(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod6f1c2b9e_6a49_4d0c_9a57_1b2f0c3d4e5f.slice/cri-containerd-abc.scope"
            )
            .as_deref(),
            Some(uid)
        );
        assert_eq!(
            pod_uid("kubepods.slice/kubepods-pod6f1c2b9e_6a49_4d0c_9a57_1b2f0c3d4e5f.slice/crio-abc.scope").as_deref(),
            Some(uid)
        );
        assert_eq!(
            pod_uid(&format!("kubepods/besteffort/pod{uid}/0123abcd")).as_deref(),
            Some(uid)
        );
        assert_eq!(
            pod_uid(&format!("kubepods/pod{uid}/0123abcd")).as_deref(),
            Some(uid)
        );
    }

    #[test]
    fn no_pod_uid_outside_kubelet_layouts() {
        for path in [
            "",
            "/",
            "system.slice/sshd.service",
            "kubepods/burstable/podnot-a-uid/abc",
            "kubepods.slice/kubepods-pod.slice",
            "user.slice/user-0.slice/pod6f1c2b9e-6a49-4d0c-9a57-1b2f0c3d4e5", // 35 chars
            "kubepods/pod6f1c2b9e-6a49-4d0c-9a57-1b2f0c3d4e5fx/abc",
            "a-pod\u{e9}\u{e9}",
        ] {
            assert_eq!(pod_uid(path), None, "{path:?}");
        }
    }

    #[test]
    fn dry_run_entry_lists_every_planned_action() {
        let pod = PodRef {
            namespace: "shop".into(),
            name: "checkout-1".into(),
            uid: None,
        };
        let entry = describe_lockdown(
            &pod,
            "EXFIL-1",
            &LockdownOutcome::DryRun {
                actions: vec![
                    PlannedAction::ApplyNetworkPolicy {
                        namespace: "shop".into(),
                        name: "exfilguard-lockdown-checkout-1".into(),
                        object: serde_json::json!({}),
                    },
                    PlannedAction::LabelPod {
                        namespace: "shop".into(),
                        pod: "checkout-1".into(),
                        label: QUARANTINE_LABEL.into(),
                        value: "EXFIL-1".into(),
                    },
                ],
            },
        );
        assert_eq!(
            entry,
            "dry-run: kubernetes lockdown would apply NetworkPolicy shop/exfilguard-lockdown-checkout-1 \
             (egress denied); label pod shop/checkout-1 exfilguard.io/quarantine=EXFIL-1"
        );
    }

    #[test]
    fn refusals_are_final_outages_are_retried() {
        let api = |code| Error::Api {
            op: "get pod",
            source: kube::Error::Api(
                kube::core::Status::failure("x", "y")
                    .with_code(code)
                    .boxed(),
            ),
        };
        assert!(!is_transient(&api(403)));
        assert!(!is_transient(&api(422)));
        assert!(is_transient(&api(500)));
        assert!(is_transient(&api(429)));
        assert!(is_transient(&api(409)));
        assert!(!is_transient(&Error::Invalid {
            what: "pod name",
            value: "X".into(),
            problem: "upper case",
        }));
    }
}
