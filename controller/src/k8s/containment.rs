//! Containment of one pod: the quarantine label, a NetworkPolicy that
//! denies its egress, and an Event on the pod; and the release of all three.
//!
//! The policy selects the pod by the quarantine label, never by its owner's
//! labels, so the other replicas keep working. It is owned by the Pod (its
//! UID), so the garbage collector removes it with the pod. Every write names
//! the field manager [`FIELD_MANAGER`]; the policy is written by server-side
//! apply with force, the label by a JSON merge patch carrying the pod's UID
//! as a precondition, so a retry changes nothing and a new pod that took the
//! old one's name is never touched. The caller records the outcome in the
//! incident's timeline; a gone pod or a protected namespace is an outcome,
//! not an error.
use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        core::v1::{ObjectReference, Pod},
        events::v1::Event,
        networking::v1::{
            IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyPeer, NetworkPolicyPort,
            NetworkPolicySpec,
        },
    },
    apimachinery::pkg::{
        apis::meta::v1::{LabelSelector, MicroTime, ObjectMeta, OwnerReference},
        util::intstr::IntOrString,
    },
};
use kube::{
    Api, Client,
    api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions},
};
use serde::Serialize;

use super::{Error, FIELD_MANAGER, INCIDENT_LABEL, QUARANTINE_LABEL, Result, names, status_code};

/// Event reason of a lockdown.
pub const REASON_LOCKDOWN: &str = "ExfilguardLockdown";
/// Event reason of a release.
pub const REASON_RELEASE: &str = "ExfilguardRelease";
/// Prefix of the lockdown NetworkPolicy's name; the pod's name follows.
pub const POLICY_PREFIX: &str = "exfilguard-lockdown-";

/// How many times a release re-reads the pod when it changed under it.
const CONFLICT_RETRIES: u32 = 3;

/// Which pod to contain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PodRef {
    /// Namespace.
    pub namespace: String,
    /// Pod name.
    pub name: String,
    /// Pod UID, when the detection carried it: a pod with this name but
    /// another UID is a different pod (a StatefulSet replacement) and is
    /// left alone.
    pub uid: Option<String>,
}

/// Who and what containment talks as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainmentConfig {
    /// Namespaces never locked down (`kube-system`, ...).
    pub protected_namespaces: Vec<String>,
    /// `reportingController` of the Events.
    pub reporting_controller: String,
    /// `reportingInstance` of the Events (the controller pod's name).
    pub reporting_instance: String,
}

impl Default for ContainmentConfig {
    fn default() -> Self {
        Self {
            protected_namespaces: crate::correlate::default_protected_namespaces(),
            reporting_controller: "exfilguard.io/controller".into(),
            reporting_instance: std::env::var("POD_NAME")
                .ok()
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| "exfilguard-controller".into()),
        }
    }
}

/// Pods the lockdown still lets the contained pod reach for DNS.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DnsEndpoint {
    /// Their namespace.
    pub namespace: String,
    /// Labels selecting them.
    pub pod_labels: BTreeMap<String, String>,
}

impl DnsEndpoint {
    /// The cluster DNS of kubeadm, kind, k3s and the managed clouds:
    /// pods labelled `k8s-app=kube-dns` in `kube-system`.
    pub fn kube_dns() -> Self {
        Self {
            namespace: "kube-system".into(),
            pod_labels: BTreeMap::from([("k8s-app".into(), "kube-dns".into())]),
        }
    }
}

/// What a lockdown keeps and whether it acts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LockdownOptions {
    /// Only say what would be done (policy `action: dry-run`).
    pub dry_run: bool,
    /// Keep DNS (UDP and TCP 53) to these pods; `None`: no DNS either.
    pub allow_dns: Option<DnsEndpoint>,
    /// Networks the pod may still reach (the policy's explicit keeps, e.g. a
    /// logging endpoint), as CIDRs.
    pub allow_cidrs: Vec<String>,
}

/// Who releases and why, for the Event and the timeline.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReleaseRequest {
    /// Who asked (the `exfilctl` user's identity).
    pub by: String,
    /// Why.
    pub reason: String,
    /// Only say what would be done.
    pub dry_run: bool,
}

/// One API action, as planned (dry run) or taken.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum PlannedAction {
    /// Server-side apply of the lockdown NetworkPolicy.
    ApplyNetworkPolicy {
        /// Namespace.
        namespace: String,
        /// Policy name.
        name: String,
        /// The object applied.
        object: serde_json::Value,
    },
    /// Set the quarantine label on the pod.
    LabelPod {
        /// Namespace.
        namespace: String,
        /// Pod.
        pod: String,
        /// Label key.
        label: String,
        /// Label value (the incident id).
        value: String,
    },
    /// Remove the quarantine label (if it still names this incident).
    UnlabelPod {
        /// Namespace.
        namespace: String,
        /// Pod.
        pod: String,
        /// Label key.
        label: String,
    },
    /// Delete the lockdown NetworkPolicy (if this incident made it).
    DeleteNetworkPolicy {
        /// Namespace.
        namespace: String,
        /// Policy name.
        name: String,
    },
    /// Record an Event on the pod.
    RecordEvent {
        /// Namespace.
        namespace: String,
        /// Pod.
        pod: String,
        /// Event reason.
        reason: String,
        /// Event message.
        note: String,
    },
}

/// What a lockdown did.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum LockdownOutcome {
    /// Label and NetworkPolicy are in place.
    Contained {
        /// The NetworkPolicy's name.
        network_policy: String,
        /// UID of the pod contained.
        pod_uid: String,
        /// Another incident's quarantine this one took over, if any (its
        /// release will no longer free the pod).
        replaced_incident: Option<String>,
        /// Whether the Event was recorded (a failure there does not undo
        /// the containment; the reason is in the controller's log).
        event_recorded: bool,
    },
    /// The pod no longer exists (or another pod took its name): nothing
    /// to contain.
    PodGone {
        /// What was found.
        detail: String,
    },
    /// The namespace is on the protected list: nothing was done.
    ProtectedNamespace {
        /// The namespace.
        namespace: String,
    },
    /// Dry run: what would have been done; the API was not called.
    DryRun {
        /// The actions, in order.
        actions: Vec<PlannedAction>,
    },
}

/// What a release did.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum ReleaseOutcome {
    /// This incident's containment is gone.
    Released {
        /// Whether the label was there (with this incident) and removed.
        label_removed: bool,
        /// Whether this incident's NetworkPolicy was there and deleted.
        network_policy_deleted: bool,
        /// Whether the Event was recorded.
        event_recorded: bool,
        /// Another incident that still holds the pod, if any.
        still_held_by: Option<String>,
    },
    /// The pod no longer exists; its NetworkPolicy goes with it.
    PodGone {
        /// What was found.
        detail: String,
    },
    /// Dry run: what would have been done.
    DryRun {
        /// The actions, in order.
        actions: Vec<PlannedAction>,
    },
}

/// Locks pods down and releases them.
#[derive(Clone)]
pub struct Containment {
    client: Client,
    config: ContainmentConfig,
}

impl std::fmt::Debug for Containment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Containment")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// The NetworkPolicy name for a pod.
pub fn policy_name(pod: &str) -> String {
    names::object_name(POLICY_PREFIX, pod, "")
}

/// The lockdown NetworkPolicy for `pod` (with UID `uid`) under `incident`.
pub fn lockdown_policy(
    pod: &PodRef,
    uid: &str,
    incident: &str,
    options: &LockdownOptions,
) -> NetworkPolicy {
    let mut egress = Vec::new();
    if let Some(dns) = &options.allow_dns {
        egress.push(NetworkPolicyEgressRule {
            to: Some(vec![NetworkPolicyPeer {
                namespace_selector: Some(LabelSelector {
                    // Set on every namespace by the API server since 1.22.
                    match_labels: Some(BTreeMap::from([(
                        "kubernetes.io/metadata.name".into(),
                        dns.namespace.clone(),
                    )])),
                    ..Default::default()
                }),
                pod_selector: Some(LabelSelector {
                    match_labels: Some(dns.pod_labels.clone()),
                    ..Default::default()
                }),
                ..Default::default()
            }]),
            ports: Some(
                ["UDP", "TCP"]
                    .map(|p| NetworkPolicyPort {
                        protocol: Some(p.into()),
                        port: Some(IntOrString::Int(53)),
                        ..Default::default()
                    })
                    .to_vec(),
            ),
        });
    }
    if !options.allow_cidrs.is_empty() {
        egress.push(NetworkPolicyEgressRule {
            to: Some(
                options
                    .allow_cidrs
                    .iter()
                    .map(|c| NetworkPolicyPeer {
                        ip_block: Some(IPBlock {
                            cidr: c.clone(),
                            except: None,
                        }),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ports: None,
        });
    }
    NetworkPolicy {
        metadata: ObjectMeta {
            name: Some(policy_name(&pod.name)),
            namespace: Some(pod.namespace.clone()),
            labels: Some(BTreeMap::from([
                (
                    "app.kubernetes.io/managed-by".into(),
                    "exfilguard".to_owned(),
                ),
                (INCIDENT_LABEL.into(), incident.to_owned()),
            ])),
            owner_references: Some(vec![OwnerReference {
                api_version: "v1".into(),
                kind: "Pod".into(),
                name: pod.name.clone(),
                uid: uid.to_owned(),
                // Not the pod's controller (its Deployment is), and blocking
                // its deletion on this policy would only slow the pod's end.
                controller: None,
                block_owner_deletion: None,
            }]),
            ..Default::default()
        },
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(BTreeMap::from([(
                    QUARANTINE_LABEL.into(),
                    incident.to_owned(),
                )])),
                ..Default::default()
            }),
            policy_types: Some(vec!["Egress".into()]),
            // Present and empty when nothing is kept: deny all egress.
            egress: Some(egress),
            ingress: None,
        }),
    }
}

fn label_of<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a str> {
    meta.labels.as_ref()?.get(key).map(String::as_str)
}

impl Containment {
    /// Containment through `client` with `config`.
    pub fn new(client: Client, config: ContainmentConfig) -> Self {
        Self { client, config }
    }

    /// Containment with the in-cluster service account or `KUBECONFIG`.
    pub async fn try_default(config: ContainmentConfig) -> Result<Self> {
        let client = Client::try_default().await.map_err(Error::api("connect"))?;
        Ok(Self::new(client, config))
    }

    /// The API client.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The configuration.
    pub fn config(&self) -> &ContainmentConfig {
        &self.config
    }

    /// Whether `namespace` is protected from lockdown.
    pub fn is_protected(&self, namespace: &str) -> bool {
        self.config
            .protected_namespaces
            .iter()
            .any(|n| n == namespace)
    }

    fn check(pod: &PodRef, incident: &str) -> Result<()> {
        names::check_object_name("namespace", &pod.namespace)?;
        names::check_object_name("pod name", &pod.name)?;
        names::check_label_value("incident id", incident)
    }

    fn event_note_lockdown(incident: &str, options: &LockdownOptions) -> String {
        let mut keeps = Vec::new();
        if let Some(d) = &options.allow_dns {
            keeps.push(format!("DNS to {}", d.namespace));
        }
        keeps.extend(options.allow_cidrs.iter().cloned());
        let keeps = if keeps.is_empty() {
            "none".to_owned()
        } else {
            keeps.join(", ")
        };
        format!(
            "exfilguard incident {incident}: egress locked down by NetworkPolicy {{policy}} \
             (label {QUARANTINE_LABEL}={incident}; egress kept: {keeps})"
        )
    }

    /// Contains `pod` for `incident`: applies the lockdown NetworkPolicy,
    /// labels the pod, records an Event. Safe to call again (same result).
    /// No API call at all for a protected namespace or a dry run.
    pub async fn lockdown(
        &self,
        pod: &PodRef,
        incident: &str,
        options: &LockdownOptions,
    ) -> Result<LockdownOutcome> {
        Self::check(pod, incident)?;
        if self.is_protected(&pod.namespace) {
            tracing::warn!(namespace = %pod.namespace, pod = %pod.name, incident,
                "lockdown refused: protected namespace");
            return Ok(LockdownOutcome::ProtectedNamespace {
                namespace: pod.namespace.clone(),
            });
        }
        let name = policy_name(&pod.name);
        let note = Self::event_note_lockdown(incident, options).replace("{policy}", &name);
        if options.dry_run {
            let uid = pod.uid.as_deref().unwrap_or("<pod uid>");
            let object = serde_json::to_value(lockdown_policy(pod, uid, incident, options))
                .expect("a NetworkPolicy serializes");
            return Ok(LockdownOutcome::DryRun {
                actions: vec![
                    PlannedAction::ApplyNetworkPolicy {
                        namespace: pod.namespace.clone(),
                        name,
                        object,
                    },
                    PlannedAction::LabelPod {
                        namespace: pod.namespace.clone(),
                        pod: pod.name.clone(),
                        label: QUARANTINE_LABEL.into(),
                        value: incident.into(),
                    },
                    PlannedAction::RecordEvent {
                        namespace: pod.namespace.clone(),
                        pod: pod.name.clone(),
                        reason: REASON_LOCKDOWN.into(),
                        note,
                    },
                ],
            });
        }

        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &pod.namespace);
        let Some(current) = pods
            .get_opt(&pod.name)
            .await
            .map_err(Error::api("get pod"))?
        else {
            return Ok(gone(pod, "pod not found"));
        };
        let uid = current.metadata.uid.clone().unwrap_or_default();
        if let Some(want) = &pod.uid
            && *want != uid
        {
            return Ok(gone(
                pod,
                &format!("pod {} is now UID {uid}, not {want}", pod.name),
            ));
        }
        let replaced = label_of(&current.metadata, QUARANTINE_LABEL)
            .filter(|v| *v != incident)
            .map(str::to_owned);

        // The policy first: once the label lands, the pod is cut off.
        let policies: Api<NetworkPolicy> = Api::namespaced(self.client.clone(), &pod.namespace);
        let np = lockdown_policy(pod, &uid, incident, options);
        policies
            .patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&np),
            )
            .await
            .map_err(Error::api("apply networkpolicy"))?;

        let patch = serde_json::json!({
            "metadata": {"uid": uid, "labels": {QUARANTINE_LABEL: incident}},
        });
        let pp = PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        match pods.patch(&pod.name, &pp, &Patch::Merge(&patch)).await {
            Ok(_) => {}
            // Deleted since the read (404), or replaced by a pod with the
            // same name (the UID precondition: 409/422). The policy goes
            // with the old pod through its owner reference.
            Err(e) if matches!(status_code(&e), Some(404 | 409 | 422)) => {
                return Ok(gone(pod, &format!("pod went away while labelling: {e}")));
            }
            Err(e) => return Err(Error::api("label pod")(e)),
        }

        let event_recorded = self
            .record(
                &current,
                "Warning",
                REASON_LOCKDOWN,
                "Lockdown",
                incident,
                &note,
            )
            .await;
        tracing::info!(namespace = %pod.namespace, pod = %pod.name, incident, policy = %name,
            ?replaced, "pod locked down");
        Ok(LockdownOutcome::Contained {
            network_policy: name,
            pod_uid: uid,
            replaced_incident: replaced,
            event_recorded,
        })
    }

    /// Undoes `incident`'s lockdown of `pod`: removes the quarantine label
    /// if it still names this incident, deletes the NetworkPolicy if this
    /// incident made it, and records who and why in an Event.
    pub async fn release(
        &self,
        pod: &PodRef,
        incident: &str,
        request: &ReleaseRequest,
    ) -> Result<ReleaseOutcome> {
        Self::check(pod, incident)?;
        let name = policy_name(&pod.name);
        let note = format!(
            "exfilguard incident {incident}: lockdown released by {} ({})",
            if request.by.is_empty() {
                "unknown"
            } else {
                &request.by
            },
            if request.reason.is_empty() {
                "no reason given"
            } else {
                &request.reason
            },
        );
        if request.dry_run {
            return Ok(ReleaseOutcome::DryRun {
                actions: vec![
                    PlannedAction::UnlabelPod {
                        namespace: pod.namespace.clone(),
                        pod: pod.name.clone(),
                        label: QUARANTINE_LABEL.into(),
                    },
                    PlannedAction::DeleteNetworkPolicy {
                        namespace: pod.namespace.clone(),
                        name,
                    },
                    PlannedAction::RecordEvent {
                        namespace: pod.namespace.clone(),
                        pod: pod.name.clone(),
                        reason: REASON_RELEASE.into(),
                        note,
                    },
                ],
            });
        }

        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &pod.namespace);
        let mut attempt = 0;
        let (current, label_removed, still_held_by) = loop {
            attempt += 1;
            let Some(current) = pods
                .get_opt(&pod.name)
                .await
                .map_err(Error::api("get pod"))?
            else {
                return Ok(ReleaseOutcome::PodGone {
                    detail: "pod not found".into(),
                });
            };
            let uid = current.metadata.uid.clone().unwrap_or_default();
            if let Some(want) = &pod.uid
                && *want != uid
            {
                return Ok(ReleaseOutcome::PodGone {
                    detail: format!("pod {} is now UID {uid}, not {want}", pod.name),
                });
            }
            match label_of(&current.metadata, QUARANTINE_LABEL) {
                Some(v) if v == incident => {}
                other => break (current.clone(), false, other.map(str::to_owned)),
            }
            // The resourceVersion makes this a compare-and-swap: the label
            // is removed only if nobody relabelled the pod since the read.
            let patch = serde_json::json!({"metadata": {
                "uid": uid,
                "resourceVersion": current.metadata.resource_version,
                "labels": {QUARANTINE_LABEL: null},
            }});
            let pp = PatchParams {
                field_manager: Some(FIELD_MANAGER.into()),
                ..Default::default()
            };
            match pods.patch(&pod.name, &pp, &Patch::Merge(&patch)).await {
                Ok(p) => break (p, true, None),
                Err(e) if status_code(&e) == Some(404) => {
                    return Ok(ReleaseOutcome::PodGone {
                        detail: "pod went away while unlabelling".into(),
                    });
                }
                Err(e) if status_code(&e) == Some(409) && attempt < CONFLICT_RETRIES => {
                    tracing::debug!(pod = %pod.name, attempt, "pod changed during release; re-reading");
                }
                Err(e) if status_code(&e) == Some(409) => {
                    return Err(Error::Conflict {
                        op: "unlabel pod",
                        attempts: attempt,
                    });
                }
                Err(e) => return Err(Error::api("unlabel pod")(e)),
            }
        };

        let policies: Api<NetworkPolicy> = Api::namespaced(self.client.clone(), &pod.namespace);
        let mut network_policy_deleted = false;
        if let Some(np) = policies
            .get_opt(&name)
            .await
            .map_err(Error::api("get networkpolicy"))?
            && label_of(&np.metadata, INCIDENT_LABEL) == Some(incident)
        {
            let dp = DeleteParams::default().preconditions(Preconditions {
                uid: np.metadata.uid.clone(),
                resource_version: np.metadata.resource_version.clone(),
            });
            match policies.delete(&name, &dp).await {
                Ok(_) => network_policy_deleted = true,
                // Gone meanwhile (the pod's end) or replaced by another
                // incident's lockdown (precondition): either way not ours.
                Err(e) if matches!(status_code(&e), Some(404 | 409)) => {}
                Err(e) => return Err(Error::api("delete networkpolicy")(e)),
            }
        }

        let event_recorded = if label_removed || network_policy_deleted {
            self.record(
                &current,
                "Normal",
                REASON_RELEASE,
                "Release",
                incident,
                &note,
            )
            .await
        } else {
            false
        };
        tracing::info!(namespace = %pod.namespace, pod = %pod.name, incident, by = %request.by,
            label_removed, network_policy_deleted, ?still_held_by, "lockdown released");
        Ok(ReleaseOutcome::Released {
            label_removed,
            network_policy_deleted,
            event_recorded,
            still_held_by,
        })
    }

    /// Records an events.k8s.io/v1 Event on `pod`. Its name is derived from
    /// the pod, action and incident, so a retried lockdown finds it there
    /// (409) instead of adding another. A failure is logged, not returned:
    /// the containment itself stands.
    async fn record(
        &self,
        pod: &Pod,
        type_: &str,
        reason: &str,
        action: &str,
        incident: &str,
        note: &str,
    ) -> bool {
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let pod_name = pod.metadata.name.clone().unwrap_or_default();
        let ev = Event {
            metadata: ObjectMeta {
                name: Some(names::object_name(
                    &format!("{pod_name}."),
                    &format!("exfilguard-{action}-{incident}"),
                    "",
                )),
                namespace: Some(namespace.clone()),
                ..Default::default()
            },
            event_time: Some(MicroTime(k8s_openapi::jiff::Timestamp::now())),
            action: Some(action.into()),
            reason: Some(reason.into()),
            // The API caps the note at 1 kB.
            note: Some(note.chars().take(1000).collect()),
            type_: Some(type_.into()),
            regarding: Some(ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(pod_name),
                namespace: Some(namespace.clone()),
                uid: pod.metadata.uid.clone(),
                resource_version: None,
                field_path: None,
            }),
            reporting_controller: Some(self.config.reporting_controller.clone()),
            reporting_instance: Some(self.config.reporting_instance.clone()),
            ..Default::default()
        };
        let events: Api<Event> = Api::namespaced(self.client.clone(), &namespace);
        let pp = PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        match events.create(&pp, &ev).await {
            Ok(_) => true,
            Err(e) if status_code(&e) == Some(409) => true,
            Err(e) => {
                tracing::warn!(error = %e, reason, incident, "could not record the Event on the pod");
                false
            }
        }
    }
}

fn gone(pod: &PodRef, detail: &str) -> LockdownOutcome {
    tracing::info!(namespace = %pod.namespace, pod = %pod.name, detail, "nothing to lock down: pod gone");
    LockdownOutcome::PodGone {
        detail: detail.to_owned(),
    }
}
