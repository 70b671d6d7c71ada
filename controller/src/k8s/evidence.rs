//! The pod's side of an incident's evidence, read from the API server: the
//! Pod object and its Events exactly as the server sent them (raw bytes, so
//! their hashes cover what Kubernetes said, not our re-serialisation), plus a
//! summary of labels, owner chain, node and image digests.
//!
//! Requests, in order: GET the pod; GET its controlling ReplicaSet when it
//! has one (to name the Deployment on top); LIST core/v1 Events in its
//! namespace with `fieldSelector=involvedObject.name=<pod>,involvedObject.uid=<uid>`.
//! A pod that is gone (or was replaced by a newer pod of the same name) is
//! an item saying so, not an error.

use k8s_openapi::api::{apps::v1::ReplicaSet, core::v1::Pod};
use kube::{
    Client,
    api::{GetParams, ListParams},
};
use serde_json::{Value, json};

use super::{Error, Result, names, status_code};
use crate::evidence::{NewEvidence, kind};

/// Most Events listed (the newest are kept when a pod has more).
pub const MAX_EVENTS: u32 = 500;

/// Reads a pod's evidence from the API server.
#[derive(Clone)]
pub struct PodEvidence {
    client: Client,
}

impl std::fmt::Debug for PodEvidence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodEvidence").finish_non_exhaustive()
    }
}

fn source(method: &str, path: &str) -> String {
    format!("kubernetes-api {method} {path}")
}

impl PodEvidence {
    /// Reads through `client`.
    pub fn new(client: Client) -> Self {
        Self { client }
    }

    async fn get_raw(&self, op: &'static str, path: String, name: &str) -> Result<Option<String>> {
        let req = kube::core::Request::new(&path)
            .get(name, &GetParams::default())
            .map_err(|e| Error::Api {
                op,
                source: kube::Error::BuildRequest(e),
            })?;
        match self.client.request_text(req).await {
            Ok(text) => Ok(Some(text)),
            Err(e) if status_code(&e) == Some(404) => Ok(None),
            Err(e) => Err(Error::Api { op, source: e }),
        }
    }

    /// The evidence items of pod `namespace/name`, captured at `now_ms`.
    /// `detected_ms`: when the incident was opened; a pod of that name created
    /// later is a replacement and is not taken for the detected one.
    pub async fn capture(
        &self,
        namespace: &str,
        name: &str,
        detected_ms: u64,
        now_ms: u64,
    ) -> Result<Vec<NewEvidence>> {
        names::check_object_name("namespace", namespace)?;
        names::check_object_name("pod name", name)?;
        for (what, value) in [("namespace", namespace), ("pod name", name)] {
            // Valid characters, but a path segment the URL would resolve away.
            if value == "." || value == ".." {
                return Err(Error::Invalid {
                    what,
                    value: value.to_owned(),
                    problem: "is a relative path segment, not an object name",
                });
            }
        }
        let pods = format!("/api/v1/namespaces/{namespace}/pods");
        let pod_path = format!("{pods}/{name}");
        let Some(raw) = self.get_raw("get pod", pods, name).await? else {
            return Ok(vec![gone(
                &pod_path,
                now_ms,
                format!("pod {namespace}/{name} was not found when its evidence was captured"),
            )]);
        };
        let pod: Pod = serde_json::from_str(&raw).map_err(|e| Error::Api {
            op: "get pod",
            source: kube::Error::SerdeError(e),
        })?;
        let created_ms = pod
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.as_millisecond().max(0) as u64);
        // Creation times have second precision: a pod created within the
        // detection's second still counts as the detected one.
        if let Some(created) = created_ms
            && created > detected_ms.saturating_add(999)
        {
            return Ok(vec![gone(
                &pod_path,
                now_ms,
                format!(
                    "pod {namespace}/{name} was created at {created} (Unix ms), after the detection \
                     at {detected_ms}: a replacement, not the detected pod; not captured"
                ),
            )]);
        }
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let owner_chain = self.owner_chain(namespace, &pod).await?;
        let mut items = vec![
            NewEvidence {
                kind: kind::POD.into(),
                media_type: crate::evidence::JSON.into(),
                source: source("GET", &pod_path),
                captured_ms: now_ms,
                content: raw.into_bytes(),
            },
            NewEvidence::json(
                kind::POD_SUMMARY,
                &source("GET", &pod_path),
                now_ms,
                &summary(&pod, owner_chain),
            ),
        ];
        let events_path = format!("/api/v1/namespaces/{namespace}/events");
        let selector = format!("involvedObject.name={name},involvedObject.uid={uid}");
        let req = kube::core::Request::new(&events_path)
            .list(&ListParams::default().fields(&selector).limit(MAX_EVENTS))
            .map_err(|e| Error::Api {
                op: "list events",
                source: kube::Error::BuildRequest(e),
            })?;
        let events = self
            .client
            .request_text(req)
            .await
            .map_err(Error::api("list events"))?;
        items.push(NewEvidence {
            kind: kind::POD_EVENTS.into(),
            media_type: crate::evidence::JSON.into(),
            source: source("LIST", &format!("{events_path}?fieldSelector={selector}")),
            captured_ms: now_ms,
            content: events.into_bytes(),
        });
        Ok(items)
    }

    /// The pod's controlling owner and, for a ReplicaSet, the ReplicaSet's
    /// own controller (the Deployment): one extra GET at most.
    async fn owner_chain(&self, namespace: &str, pod: &Pod) -> Result<Vec<Value>> {
        let Some(owner) = controller_of(pod.metadata.owner_references.as_deref()) else {
            return Ok(Vec::new());
        };
        let mut chain = vec![json!({"kind": owner.kind, "name": owner.name, "uid": owner.uid})];
        if owner.kind == "ReplicaSet" && owner.api_version == "apps/v1" {
            let path = format!("/apis/apps/v1/namespaces/{namespace}/replicasets");
            if let Some(raw) = self.get_raw("get replicaset", path, &owner.name).await? {
                let rs: ReplicaSet = serde_json::from_str(&raw).map_err(|e| Error::Api {
                    op: "get replicaset",
                    source: kube::Error::SerdeError(e),
                })?;
                if let Some(top) = controller_of(rs.metadata.owner_references.as_deref()) {
                    chain.push(json!({"kind": top.kind, "name": top.name, "uid": top.uid}));
                }
            }
        }
        Ok(chain)
    }
}

fn controller_of(
    refs: Option<&[k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference]>,
) -> Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference> {
    refs?.iter().find(|o| o.controller == Some(true))
}

fn gone(path: &str, now_ms: u64, detail: String) -> NewEvidence {
    NewEvidence::json(
        kind::POD_GONE,
        &source("GET", path),
        now_ms,
        &json!({ "detail": detail }),
    )
}

/// Labels, owners, node and image digests of `pod`, for a reader who does
/// not want to dig through the whole object.
fn summary(pod: &Pod, owner_chain: Vec<Value>) -> Value {
    let m = &pod.metadata;
    let spec = pod.spec.clone().unwrap_or_default();
    let status = pod.status.clone().unwrap_or_default();
    let statuses = status
        .container_statuses
        .unwrap_or_default()
        .into_iter()
        .chain(status.init_container_statuses.unwrap_or_default())
        .map(|c| json!({"container": c.name, "image": c.image, "image_id": c.image_id}))
        .collect::<Vec<_>>();
    json!({
        "namespace": m.namespace, "name": m.name, "uid": m.uid,
        "labels": m.labels, "owner_references": m.owner_references,
        "owner_chain": owner_chain,
        "node": spec.node_name, "service_account": spec.service_account_name,
        "images": spec.containers.iter().map(|c| json!({"container": c.name, "image": c.image})).collect::<Vec<_>>(),
        "image_digests": statuses,
        "phase": status.phase, "pod_ips": status.pod_ips,
        "created": m.creation_timestamp,
    })
}
