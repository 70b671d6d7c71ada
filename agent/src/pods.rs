//! Pods on this node, from a Kubernetes watch: pod UID → namespace, name,
//! labels, owner, node and container images.
//!
//! [`attribution`](crate::attribution) finds a pod UID in a cgroup path; this
//! module names it. The watch is limited to this node by the field selector
//! `spec.nodeName=<node>`, so the cache holds tens of pods, not the cluster.
//! A watch failure is never fatal: it is logged and retried with backoff, and
//! until the pod is known its workload stays named by UID (or cgroup path).
use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, RwLock},
    time::Duration,
};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, Client, runtime::watcher};

/// Label the Deployment controller puts on the pods of each ReplicaSet it
/// makes, and appends to the ReplicaSet's name.
const POD_TEMPLATE_HASH: &str = "pod-template-hash";

/// The controlling owner of a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    /// Kind: `Deployment`, `StatefulSet`, `DaemonSet`, `Job`, `ReplicaSet`, ...
    pub kind: String,
    /// Name.
    pub name: String,
}

/// One container of a pod, from its status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerInfo {
    /// Container name in the pod spec.
    pub name: String,
    /// Image as written in the spec (`nginx:1.27`).
    pub image: String,
    /// Image the runtime ran, by digest (`docker.io/library/nginx@sha256:…`);
    /// empty until the kubelet reports it.
    pub image_id: String,
    /// Runtime container id without the `containerd://` scheme; the id found
    /// in the container's cgroup path.
    pub container_id: Option<String>,
}

/// What the watch knows about one pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    /// Pod UID.
    pub uid: String,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Controlling owner; a ReplicaSet made by a Deployment is reported as
    /// the Deployment (see [`owner_of`]).
    pub owner: Option<Owner>,
    /// Node the pod is bound to.
    pub node: Option<String>,
    /// Containers (init containers included) with their image digests.
    pub containers: Vec<ContainerInfo>,
}

impl PodInfo {
    /// The container with runtime id `id` (as found in a cgroup path).
    pub fn container(&self, id: &str) -> Option<&ContainerInfo> {
        self.containers
            .iter()
            .find(|c| c.container_id.as_deref() == Some(id))
    }
}

/// The controlling owner of `pod`: the ownerReference with `controller:
/// true`. A ReplicaSet whose name is `<name>-<pod-template-hash>` was made by
/// Deployment `<name>` (the Deployment controller's naming, and the only
/// controller that sets that label), so it is reported as that Deployment
/// without reading ReplicaSets, which the agent has no RBAC for.
pub fn owner_of(pod: &Pod) -> Option<Owner> {
    let r = pod
        .metadata
        .owner_references
        .as_ref()?
        .iter()
        .find(|r| r.controller == Some(true))?;
    if r.kind == "ReplicaSet"
        && let Some(hash) = pod
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(POD_TEMPLATE_HASH))
        && let Some(deployment) = r
            .name
            .strip_suffix(hash.as_str())
            .and_then(|n| n.strip_suffix('-'))
        && !deployment.is_empty()
    {
        return Some(Owner {
            kind: "Deployment".into(),
            name: deployment.to_owned(),
        });
    }
    Some(Owner {
        kind: r.kind.clone(),
        name: r.name.clone(),
    })
}

/// `containerd://<id>` → `<id>` (also `cri-o://`, `docker://`).
fn strip_runtime_scheme(id: &str) -> &str {
    id.split_once("://").map_or(id, |(_, id)| id)
}

/// The [`PodInfo`] of a Pod object; `None` without a UID, name or namespace
/// (which the API server always sets, so only malformed input lacks them).
pub fn pod_info(pod: &Pod) -> Option<PodInfo> {
    let m = &pod.metadata;
    let uid = m.uid.clone()?;
    let namespace = m.namespace.clone()?;
    let name = m.name.clone()?;
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    let statuses = status
        .into_iter()
        .flat_map(|s| {
            s.init_container_statuses
                .iter()
                .flatten()
                .chain(s.container_statuses.iter().flatten())
        })
        .collect::<Vec<_>>();
    let spec_images = spec
        .into_iter()
        .flat_map(|s| s.init_containers.iter().flatten().chain(&s.containers))
        .map(|c| (c.name.as_str(), c.image.clone().unwrap_or_default()));
    let containers = spec_images
        .map(|(cname, image)| {
            let st = statuses.iter().find(|s| s.name == cname);
            ContainerInfo {
                name: cname.to_owned(),
                image,
                image_id: st.map(|s| s.image_id.clone()).unwrap_or_default(),
                container_id: st
                    .and_then(|s| s.container_id.as_deref())
                    .map(|id| strip_runtime_scheme(id).to_owned()),
            }
        })
        .collect();
    Some(PodInfo {
        uid,
        namespace,
        name,
        labels: m.labels.clone().unwrap_or_default(),
        owner: owner_of(pod),
        node: spec.and_then(|s| s.node_name.clone()),
        containers,
    })
}

#[derive(Debug, Default)]
struct State {
    pods: HashMap<String, Arc<PodInfo>>,
    /// Pods of a relist in progress; swapped in whole at its end, so pods
    /// deleted while the watch was down go too.
    relist: Option<HashMap<String, Arc<PodInfo>>>,
}

/// The pods of this node by UID, shared between the watch task (writer) and
/// attribution (reader).
#[derive(Clone, Debug)]
pub struct PodCache {
    state: Arc<RwLock<State>>,
    synced: Arc<tokio::sync::watch::Sender<bool>>,
}

impl Default for PodCache {
    fn default() -> Self {
        Self {
            state: Arc::default(),
            synced: Arc::new(tokio::sync::watch::channel(false).0),
        }
    }
}

impl PodCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        // A panic while holding the lock cannot leave the map half-written
        // (every write is one insert/remove/swap), so a poisoned lock is
        // still consistent.
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The pod with `uid`, if the watch has seen it.
    pub fn get(&self, uid: &str) -> Option<Arc<PodInfo>> {
        self.read().pods.get(uid).cloned()
    }

    /// Number of pods known.
    pub fn len(&self) -> usize {
        self.read().pods.len()
    }

    /// Whether no pod is known.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the first full list has arrived.
    pub fn is_synced(&self) -> bool {
        *self.synced.borrow()
    }

    /// Waits until the first full list has arrived, at most `timeout`;
    /// returns whether it has.
    pub async fn wait_synced(&self, timeout: Duration) -> bool {
        let mut rx = self.synced.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|s| *s))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Applies one watch event.
    pub fn apply(&self, event: watcher::Event<Pod>) {
        let mut st = self.write();
        match event {
            watcher::Event::Init => st.relist = Some(HashMap::new()),
            watcher::Event::InitApply(p) => {
                if let Some(info) = pod_info(&p) {
                    st.relist
                        .get_or_insert_with(HashMap::new)
                        .insert(info.uid.clone(), Arc::new(info));
                }
            }
            watcher::Event::InitDone => {
                if let Some(pods) = st.relist.take() {
                    st.pods = pods;
                }
                drop(st);
                self.synced.send_replace(true);
            }
            watcher::Event::Apply(p) => {
                if let Some(info) = pod_info(&p) {
                    // Skip unchanged objects (status-only churn), so readers
                    // comparing `Arc`s see a change only when there is one.
                    if st.pods.get(&info.uid).is_none_or(|old| **old != info) {
                        st.pods.insert(info.uid.clone(), Arc::new(info));
                    }
                }
            }
            watcher::Event::Delete(p) => {
                if let Some(uid) = &p.metadata.uid {
                    st.pods.remove(uid);
                }
            }
        }
    }
}

/// How the Pod watch is set up.
#[derive(Clone, Debug)]
pub struct WatchConfig {
    /// This node's name (the `spec.nodeName` of its pods).
    pub node_name: String,
}

/// The watcher configuration: this node's pods only.
pub fn watcher_config(node_name: &str) -> watcher::Config {
    watcher::Config::default().fields(&format!("spec.nodeName={node_name}"))
}

/// First and longest wait between attempts of a failing watch.
const RETRY_FIRST: Duration = Duration::from_millis(800);
const RETRY_MAX: Duration = Duration::from_secs(60);

/// Watches this node's pods into `cache` until the task is dropped. Errors
/// (API server down, RBAC, a bad object) are logged and retried with
/// exponential backoff (0.8 s doubling to 60 s); they never end the watch.
///
/// The backoff is ours, not kube's `default_backoff()`: the watcher yields
/// `Ok(Init)` before every relist attempt, which resets kube's backoff, so a
/// refused connection was retried every second forever. Here only an event
/// carrying data (a listed or watched pod, the end of a list) counts as
/// recovery.
pub async fn watch(client: Client, config: WatchConfig, cache: PodCache) {
    let api: Api<Pod> = Api::all(client);
    let stream = watcher(api, watcher_config(&config.node_name));
    let mut stream = std::pin::pin!(stream);
    let mut delay = RETRY_FIRST;
    let mut failing = false;
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(ev) => {
                let data = !matches!(ev, watcher::Event::Init);
                if failing && data {
                    tracing::info!(node = %config.node_name, "pod watch recovered");
                    failing = false;
                }
                if data {
                    delay = RETRY_FIRST;
                }
                let done = matches!(ev, watcher::Event::InitDone);
                cache.apply(ev);
                if done {
                    tracing::info!(node = %config.node_name, pods = cache.len(), "pod list synced");
                }
            }
            Err(e) => {
                // Once per outage at warn, then at debug: a long outage must
                // not flood the log.
                if failing {
                    tracing::debug!(error = %e, retry_in = ?delay, "pod watch still failing");
                } else {
                    tracing::warn!(error = %e, node = %config.node_name, retry_in = ?delay,
                        "pod watch failed; retrying with backoff (workloads keep their cgroup identity meanwhile)");
                    failing = true;
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(RETRY_MAX);
            }
        }
    }
}

/// Connects (in-cluster service account or `KUBECONFIG`), retrying with
/// backoff up to 5 minutes apart, then watches forever. For `tokio::spawn`.
pub async fn connect_and_watch(config: WatchConfig, cache: PodCache) {
    let mut delay = Duration::from_secs(1);
    let client = loop {
        match Client::try_default().await {
            Ok(c) => break c,
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?delay, "no Kubernetes client; pods stay unnamed until it works");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(300));
            }
        }
    };
    watch(client, config, cache).await;
}

/// Whether Kubernetes is reachable from here without being told: a service
/// account in a pod (`KUBERNETES_SERVICE_HOST`) or a `KUBECONFIG`.
pub fn detected(env: impl Fn(&str) -> Option<String>) -> bool {
    env("KUBERNETES_SERVICE_HOST").is_some_and(|v| !v.is_empty())
        || env("KUBECONFIG").is_some_and(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn pod(uid: &str, name: &str, labels: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": name, "namespace": "shop", "uid": uid, "labels": labels,
                "ownerReferences": [
                    {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "checkout-7d4b9c8f6",
                     "uid": "11111111-2222-3333-4444-555555555555", "controller": true},
                ],
            },
            "spec": {
                "nodeName": "node-a",
                "initContainers": [{"name": "init", "image": "busybox:1.36"}],
                "containers": [{"name": "app", "image": "shop/checkout:2.1"}],
            },
            "status": {
                "containerStatuses": [{
                    "name": "app", "image": "shop/checkout:2.1",
                    "imageID": "docker.io/shop/checkout@sha256:aaaa",
                    "containerID": "containerd://4b825dc642cb6eb9a060e54bf8d69288fbee4904a1b2c3d4e5f6a7b8c9d0e1f2",
                    "ready": true, "restartCount": 0,
                }],
            },
        }))
        .unwrap()
    }

    #[test]
    fn maps_a_deployment_pod() {
        let p = pod(
            "u1",
            "checkout-7d4b9c8f6-x2x9z",
            serde_json::json!({"app": "checkout", "pod-template-hash": "7d4b9c8f6"}),
        );
        let info = pod_info(&p).unwrap();
        assert_eq!(
            (info.namespace.as_str(), info.name.as_str()),
            ("shop", "checkout-7d4b9c8f6-x2x9z")
        );
        assert_eq!(
            info.owner,
            Some(Owner {
                kind: "Deployment".into(),
                name: "checkout".into()
            })
        );
        assert_eq!(info.node.as_deref(), Some("node-a"));
        assert_eq!(info.labels["app"], "checkout");
        assert_eq!(info.containers.len(), 2);
        let app = info
            .container("4b825dc642cb6eb9a060e54bf8d69288fbee4904a1b2c3d4e5f6a7b8c9d0e1f2")
            .unwrap();
        assert_eq!(
            (app.name.as_str(), app.image_id.as_str()),
            ("app", "docker.io/shop/checkout@sha256:aaaa")
        );
        // The init container has not run yet: no digest, no id.
        assert_eq!(info.containers[0].image_id, "");
        assert_eq!(info.containers[0].container_id, None);
    }

    #[test]
    fn owner_without_template_hash_stays_replicaset() {
        // A bare ReplicaSet (no Deployment): no pod-template-hash label.
        let p = pod("u1", "checkout-abc", serde_json::json!({"app": "checkout"}));
        assert_eq!(
            owner_of(&p),
            Some(Owner {
                kind: "ReplicaSet".into(),
                name: "checkout-7d4b9c8f6".into()
            })
        );
        // A hash that is not the name's suffix is not trusted either.
        let p = pod("u1", "x", serde_json::json!({"pod-template-hash": "zzz"}));
        assert_eq!(owner_of(&p).unwrap().kind, "ReplicaSet");
    }

    #[test]
    fn owner_needs_the_controller_reference() {
        let mut p = pod("u1", "x", serde_json::json!({}));
        for r in p.metadata.owner_references.iter_mut().flatten() {
            r.controller = None;
            r.kind = "StatefulSet".into();
        }
        assert_eq!(owner_of(&p), None);
        p.metadata
            .owner_references
            .iter_mut()
            .flatten()
            .for_each(|r| {
                r.controller = Some(true);
            });
        assert_eq!(owner_of(&p).unwrap().kind, "StatefulSet");
        p.metadata.owner_references = None;
        assert_eq!(owner_of(&p), None);
    }

    #[test]
    fn malformed_pods_are_skipped_not_fatal() {
        let mut p = pod("u1", "x", serde_json::json!({}));
        p.metadata.uid = None;
        assert_eq!(pod_info(&p), None);
        let cache = PodCache::new();
        cache.apply(watcher::Event::Apply(p));
        assert!(cache.is_empty());
    }

    #[test]
    fn cache_follows_events_and_relists() {
        let cache = PodCache::new();
        assert!(!cache.is_synced());
        cache.apply(watcher::Event::Init);
        cache.apply(watcher::Event::InitApply(pod(
            "u1",
            "a",
            serde_json::json!({"v": "1"}),
        )));
        cache.apply(watcher::Event::InitApply(pod(
            "u2",
            "b",
            serde_json::json!({}),
        )));
        // Nothing visible before the list is complete.
        assert!(cache.get("u1").is_none());
        cache.apply(watcher::Event::InitDone);
        assert!(cache.is_synced());
        assert_eq!(cache.len(), 2);
        let before = cache.get("u1").unwrap();
        cache.apply(watcher::Event::Apply(pod(
            "u1",
            "a",
            serde_json::json!({"v": "1"}),
        )));
        assert!(
            Arc::ptr_eq(&before, &cache.get("u1").unwrap()),
            "unchanged object keeps its entry"
        );
        cache.apply(watcher::Event::Apply(pod(
            "u1",
            "a",
            serde_json::json!({"v": "2"}),
        )));
        assert_eq!(cache.get("u1").unwrap().labels["v"], "2");
        cache.apply(watcher::Event::Delete(pod(
            "u2",
            "b",
            serde_json::json!({}),
        )));
        assert!(cache.get("u2").is_none());
        // A relist after an outage drops pods deleted meanwhile.
        cache.apply(watcher::Event::Init);
        cache.apply(watcher::Event::InitApply(pod(
            "u3",
            "c",
            serde_json::json!({}),
        )));
        cache.apply(watcher::Event::InitDone);
        assert!(cache.get("u1").is_none());
        assert_eq!(cache.get("u3").unwrap().name, "c");
    }

    #[test]
    fn detection_of_kubernetes() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                vars.iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert!(!detected(env(&[])));
        assert!(!detected(env(&[("KUBECONFIG", "")])));
        assert!(detected(env(&[("KUBECONFIG", "/root/.kube/config")])));
        assert!(detected(env(&[("KUBERNETES_SERVICE_HOST", "10.96.0.1")])));
    }

    /// The Pod watch against kube's mock API server: the exact LIST and
    /// WATCH requests, and the cache following add / modify / delete.
    mod mock_api {
        use super::*;
        use axum::http::{self, Request, Response, StatusCode};
        use kube::client::Body;
        use tower_test::mock;

        type Handle = mock::Handle<Request<Body>, Response<Body>>;

        async fn next(handle: &mut Handle) -> (Request<Body>, mock::SendResponse<Response<Body>>) {
            tokio::time::timeout(Duration::from_secs(10), handle.next_request())
                .await
                .expect("the watcher made no request within 10 s")
                .expect("the client went away")
        }

        fn query(req: &Request<Body>) -> Vec<(String, String)> {
            req.uri()
                .query()
                .unwrap_or_default()
                .split('&')
                .filter(|kv| !kv.is_empty())
                .map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                    (k.to_owned(), v.to_owned())
                })
                .collect()
        }

        fn param(req: &Request<Body>, key: &str) -> Option<String> {
            query(req)
                .into_iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v)
        }

        fn assert_list(req: &Request<Body>) {
            assert_eq!(req.method(), http::Method::GET);
            assert_eq!(req.uri().path(), "/api/v1/pods", "all namespaces");
            assert!(
                req.uri()
                    .query()
                    .unwrap()
                    .contains("fieldSelector=spec.nodeName%3Dnode-a"),
                "{}",
                req.uri()
            );
            assert_eq!(
                param(req, "watch"),
                None,
                "a LIST, not a WATCH: {}",
                req.uri()
            );
        }

        fn assert_watch(req: &Request<Body>, rv: &str) {
            assert_eq!(req.method(), http::Method::GET);
            assert_eq!(req.uri().path(), "/api/v1/pods");
            assert_eq!(
                param(req, "watch").as_deref(),
                Some("true"),
                "{}",
                req.uri()
            );
            assert_eq!(
                param(req, "fieldSelector").as_deref(),
                Some("spec.nodeName%3Dnode-a"),
                "{}",
                req.uri()
            );
            assert_eq!(
                param(req, "resourceVersion").as_deref(),
                Some(rv),
                "{}",
                req.uri()
            );
        }

        fn with_rv(mut p: Pod, rv: &str) -> Pod {
            p.metadata.resource_version = Some(rv.into());
            p
        }

        fn json(v: &impl serde::Serialize) -> Response<Body> {
            Response::new(Body::from(serde_json::to_vec(v).unwrap()))
        }

        fn watch_event(kind: &str, p: &Pod) -> Response<Body> {
            let mut line =
                serde_json::to_vec(&serde_json::json!({"type": kind, "object": p})).unwrap();
            line.push(b'\n');
            Response::new(Body::from(line))
        }

        async fn wait_until(what: &str, f: impl Fn() -> bool) {
            for _ in 0..200 {
                if f() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!("cache never reached: {what}");
        }

        #[tokio::test]
        async fn list_then_watch_this_node_and_follow_events() {
            let (svc, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
            let client = Client::new(svc, "default");
            let cache = PodCache::new();
            let task = tokio::spawn(watch(
                client,
                WatchConfig {
                    node_name: "node-a".into(),
                },
                cache.clone(),
            ));

            // A failing API server first: the watch keeps going, backing
            // off 0.8 s, then 1.6 s (the relist's `Init` must not reset it).
            let fail = || {
                let mut res = json(&serde_json::json!({"kind": "Status", "apiVersion": "v1",
                    "status": "Failure", "code": 500, "reason": "InternalError", "message": "etcd down"}));
                *res.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                res
            };
            let (req, send) = next(&mut handle).await;
            assert_list(&req);
            send.send_response(fail());
            for min_wait in [RETRY_FIRST, RETRY_FIRST * 2] {
                let at = tokio::time::Instant::now();
                let (req, send) = next(&mut handle).await;
                assert!(at.elapsed() >= min_wait, "retried after {:?}", at.elapsed());
                assert_list(&req);
                if min_wait == RETRY_FIRST {
                    send.send_response(fail());
                    continue;
                }
                assert!(!cache.is_synced());
                send.send_response(json(&serde_json::json!({
                    "apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "100"},
                    "items": [with_rv(pod("u1", "a", serde_json::json!({"v": "1"})), "90")],
                })));
            }

            let (req, send) = next(&mut handle).await;
            assert_watch(&req, "100");
            assert!(cache.wait_synced(Duration::from_secs(5)).await);
            assert_eq!(cache.get("u1").unwrap().labels["v"], "1");
            // Labels edited.
            send.send_response(watch_event(
                "MODIFIED",
                &with_rv(pod("u1", "a", serde_json::json!({"v": "2"})), "101"),
            ));
            wait_until("u1 relabelled", || {
                cache.get("u1").is_some_and(|p| p.labels["v"] == "2")
            })
            .await;

            // The stream ended: the watch resumes from the last version seen.
            let (req, send) = next(&mut handle).await;
            assert_watch(&req, "101");
            send.send_response(watch_event(
                "ADDED",
                &with_rv(pod("u2", "b", serde_json::json!({})), "102"),
            ));
            wait_until("u2 added", || cache.get("u2").is_some()).await;

            let (req, send) = next(&mut handle).await;
            assert_watch(&req, "102");
            send.send_response(watch_event(
                "DELETED",
                &with_rv(pod("u1", "a", serde_json::json!({"v": "2"})), "103"),
            ));
            wait_until("u1 deleted", || cache.get("u1").is_none()).await;
            assert_eq!(cache.get("u2").unwrap().name, "b");

            let (req, _send) = next(&mut handle).await;
            assert_watch(&req, "103");
            task.abort();
        }
    }

    /// An API server that is not there: the watch keeps retrying (no panic,
    /// no exit) and the cache stays unsynced, so attribution falls back.
    #[tokio::test]
    async fn unreachable_api_server_is_retried_not_fatal() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        // The listener is closed: connections are refused.
        let config = kube::Config::new(format!("http://127.0.0.1:{port}").parse().unwrap());
        let client = Client::try_from(config).unwrap();
        let cache = PodCache::new();
        let task = tokio::spawn(watch(
            client,
            WatchConfig {
                node_name: "n".into(),
            },
            cache.clone(),
        ));
        assert!(!cache.wait_synced(Duration::from_millis(1500)).await);
        assert!(!task.is_finished(), "the watch gave up");
        task.abort();
    }

    /// The same watch against a real API server when `KUBECONFIG` is set:
    /// a pod bound to a made-up node name (it stays Pending; only the
    /// object matters) is listed, relabelled and deleted.
    #[tokio::test]
    async fn real_cluster_watch_follows_this_nodes_pods() {
        use k8s_openapi::api::core::v1::Namespace;
        use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
        if std::env::var_os("KUBECONFIG").is_none_or(|v| v.is_empty()) {
            // Straight to the stream, past the test harness's capture, so
            // the skip shows in a normal `cargo test` run.
            use std::io::Write as _;
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED real_cluster_watch_follows_this_nodes_pods: KUBECONFIG is not set (set it to run against a real API server)"
            );
            return;
        }
        let client = Client::try_default()
            .await
            .expect("KUBECONFIG is set but no client");
        let tag = format!(
            "{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos()
        );
        let ns_name = format!("exfilguard-test-{tag}");
        let node = format!("exfilguard-test-node-{tag}");
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let ns: Namespace =
            serde_json::from_value(serde_json::json!({"metadata": {"name": ns_name}})).unwrap();
        namespaces
            .create(&PostParams::default(), &ns)
            .await
            .unwrap();
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns_name);
        let ns_for_check = ns_name.clone();
        let result = async move {
            let ns_name = ns_for_check;
            let cache = PodCache::new();
            let task = tokio::spawn(watch(
                client.clone(),
                WatchConfig {
                    node_name: node.clone(),
                },
                cache.clone(),
            ));
            let p: Pod = serde_json::from_value(serde_json::json!({
                "metadata": {"name": "etl-0", "labels": {"app": "etl"}},
                "spec": {"nodeName": node,
                    "containers": [{"name": "etl", "image": "registry.k8s.io/pause:3.10"}]},
            }))
            .unwrap();
            let created = pods.create(&PostParams::default(), &p).await.unwrap();
            let uid = created.metadata.uid.unwrap();
            let until = |what: &'static str, f: Box<dyn Fn(&PodCache) -> bool + Send>| {
                let cache = cache.clone();
                async move {
                    for _ in 0..300 {
                        if f(&cache) {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    panic!("within 30 s: {what}");
                }
            };
            let u = uid.clone();
            until("pod seen", Box::new(move |c| c.get(&u).is_some())).await;
            assert_eq!(cache.get(&uid).unwrap().namespace, ns_name);
            pods.patch(
                "etl-0",
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"metadata": {"labels": {"tier": "batch"}}})),
            )
            .await
            .unwrap();
            let u = uid.clone();
            until(
                "relabel seen",
                Box::new(move |c| c.get(&u).is_some_and(|p| p.labels.contains_key("tier"))),
            )
            .await;
            pods.delete("etl-0", &DeleteParams::default().grace_period(0))
                .await
                .unwrap();
            let u = uid.clone();
            until("delete seen", Box::new(move |c| c.get(&u).is_none())).await;
            task.abort();
        };
        // Clean up whether or not the checks passed.
        let outcome = tokio::spawn(result).await;
        let _ = namespaces.delete(&ns_name, &DeleteParams::default()).await;
        if let Err(e) = outcome {
            std::panic::resume_unwind(e.into_panic());
        }
    }
}
