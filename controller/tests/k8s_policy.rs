//! The ExfilPolicy reconciler against kube's mock API server (`tower-test`):
//! the list and watch it makes, the exact status writes (path, field manager,
//! content type, body), and the policy it pushes to connected agents; then
//! the whole controller served on loopback with a real gRPC agent stream,
//! where an ExfilPolicy event must reach the agent within 2 s. The last test
//! runs the same flow against a real API server when `KUBECONFIG` is set.
mod support;

use std::{
    collections::VecDeque,
    pin::pin,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use exfilguard_controller::{
    hub::Hub,
    k8s::{FIELD_MANAGER, crd::ExfilPolicy, policy_reconciler},
};
use exfilguard_proto::v1::{
    AgentMessage, Hello, PolicyAction, PolicyOverride, PolicyUpdate,
    agent_gateway_client::AgentGatewayClient, agent_message, controller_message,
};
use kube::{Client, client::Body};
use serde_json::{Value, json};
use support::{kube_mock::parse_query, kube_real::real_cluster};
use tokio::sync::{mpsc, watch};
use tonic::codegen::http::{Method, Request, Response, StatusCode};
use tower_test::mock;

type Handle = mock::Handle<Request<Body>, Response<Body>>;
type Responder = mock::SendResponse<Response<Body>>;

const LIST_PATH: &str = "/apis/exfilguard.io/v1alpha1/exfilpolicies";

fn policy_json(ns: &str, name: &str, generation: i64, spec: Value) -> Value {
    json!({
        "apiVersion": "exfilguard.io/v1alpha1", "kind": "ExfilPolicy",
        "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{ns}-{name}"),
            "generation": generation, "resourceVersion": "100"},
        "spec": spec,
    })
}

/// A status write the reconciler made.
#[derive(Debug)]
struct Write {
    path: String,
    query: Vec<(String, String)>,
    content_type: Option<String>,
    body: Value,
}

fn respond(tx: Responder, code: StatusCode, body: Vec<u8>) {
    let mut res = Response::new(Body::from(body));
    *res.status_mut() = code;
    tx.send_response(res);
}

/// The mock API server: answers the list with `items`, each watch with the
/// next scripted batch of events (sent when the test says so: a watch is
/// held open until then), and every status write with the object it
/// describes; anything else fails the test.
struct Api {
    writes: mpsc::UnboundedReceiver<Write>,
    watch_events: mpsc::UnboundedSender<Vec<Value>>,
    watches: Arc<Mutex<usize>>,
}

fn mock_api(handle: Handle, items: Vec<Value>) -> Api {
    mock_api_failing(handle, items, 0)
}

/// [`mock_api`] whose first `fail_writes` status writes get a 500 (recorded
/// all the same).
fn mock_api_failing(handle: Handle, items: Vec<Value>, mut fail_writes: usize) -> Api {
    let (wtx, writes) = mpsc::unbounded_channel();
    let (watch_events, mut scripted) = mpsc::unbounded_channel::<Vec<Value>>();
    let watches = Arc::new(Mutex::new(0));
    let counter = watches.clone();
    tokio::spawn(async move {
        let mut handle = pin!(handle);
        let mut held: VecDeque<Responder> = VecDeque::new();
        loop {
            tokio::select! {
                next = handle.next_request() => {
                    let Some((req, tx)) = next else { return };
                    let path = req.uri().path().to_owned();
                    let query = parse_query(req.uri().query());
                    let is_watch = query.iter().any(|(k, v)| k == "watch" && v == "true");
                    match (req.method().clone(), path.as_str()) {
                        (Method::GET, LIST_PATH) if is_watch => {
                            *counter.lock().unwrap() += 1;
                            held.push_back(tx);
                        }
                        (Method::GET, LIST_PATH) => {
                            assert!(query.contains(&("limit".into(), "500".into())), "list query {query:?}");
                            let list = json!({"apiVersion": "exfilguard.io/v1alpha1", "kind": "ExfilPolicyList",
                                "metadata": {"resourceVersion": "100"}, "items": items});
                            respond(tx, StatusCode::OK, serde_json::to_vec(&list).unwrap());
                        }
                        (Method::PATCH, p) if p.ends_with("/status") => {
                            let content_type = req.headers().get("content-type")
                                .map(|v| v.to_str().unwrap().to_owned());
                            let bytes = req.into_body().collect_bytes().await.unwrap();
                            let body: Value = serde_json::from_slice(&bytes).expect("status write is JSON");
                            let segs: Vec<&str> = p.split('/').collect();
                            // /apis/exfilguard.io/v1alpha1/namespaces/NS/exfilpolicies/NAME/status
                            if fail_writes > 0 {
                                fail_writes -= 1;
                                let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                                    "status": "Failure", "message": "etcd is sad", "reason": "InternalError", "code": 500});
                                respond(tx, StatusCode::INTERNAL_SERVER_ERROR, serde_json::to_vec(&status).unwrap());
                            } else {
                                let mut obj = policy_json(segs[5], segs[7], 1, json!({}));
                                obj["status"] = body["status"].clone();
                                respond(tx, StatusCode::OK, serde_json::to_vec(&obj).unwrap());
                            }
                            let _ = wtx.send(Write { path: p.to_owned(), query, content_type, body });
                        }
                        (m, p) => panic!("unexpected request {m} {p}?{query:?}"),
                    }
                }
                Some(events) = scripted.recv() => {
                    let tx = loop {
                        if let Some(tx) = held.pop_front() { break tx; }
                        // The watch is not open yet: wait for it.
                        let (req, tx) = handle.next_request().await.expect("a watch request");
                        assert!(req.uri().query().unwrap_or_default().contains("watch=true"), "{}", req.uri());
                        *counter.lock().unwrap() += 1;
                        held.push_back(tx);
                    };
                    let mut body = Vec::new();
                    for e in events {
                        body.extend(serde_json::to_vec(&e).unwrap());
                        body.push(b'\n');
                    }
                    respond(tx, StatusCode::OK, body);
                }
            }
        }
    });
    Api {
        writes,
        watch_events,
        watches,
    }
}

impl Api {
    async fn next_write(&mut self) -> Write {
        tokio::time::timeout(Duration::from_secs(5), self.writes.recv())
            .await
            .expect("a status write in time")
            .expect("mock server alive")
    }

    fn no_more_writes(&mut self) {
        assert!(self.writes.try_recv().is_err(), "unexpected status write");
    }
}

fn status_path(ns: &str, name: &str) -> String {
    format!("/apis/exfilguard.io/v1alpha1/namespaces/{ns}/exfilpolicies/{name}/status")
}

fn apply_query() -> Vec<(String, String)> {
    vec![
        ("fieldManager".into(), FIELD_MANAGER.into()),
        ("force".into(), "true".into()),
    ]
}

/// Checks one status write and returns its status.
fn check_write(w: &Write, ns: &str, name: &str) -> Value {
    assert_eq!(w.path, status_path(ns, name));
    assert_eq!(w.query, apply_query());
    assert_eq!(
        w.content_type.as_deref(),
        Some("application/apply-patch+yaml")
    );
    assert_eq!(w.body["apiVersion"], "exfilguard.io/v1alpha1");
    assert_eq!(w.body["kind"], "ExfilPolicy");
    let keys: Vec<&String> = w.body.as_object().unwrap().keys().collect();
    assert_eq!(
        keys,
        ["apiVersion", "kind", "status"],
        "only the status is applied"
    );
    w.body["status"].clone()
}

fn without_time(mut status: Value) -> Value {
    for c in status["conditions"].as_array_mut().unwrap() {
        assert!(c["lastTransitionTime"].is_string(), "{c}");
        c.as_object_mut().unwrap().remove("lastTransitionTime");
    }
    status
}

async fn next_policy(
    rx: &mut mpsc::UnboundedReceiver<controller_message::Payload>,
) -> PolicyUpdate {
    match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
        Ok(Some(controller_message::Payload::PolicyUpdate(u))) => u,
        other => panic!("expected a PolicyUpdate, got {other:?}"),
    }
}

fn etl_spec() -> Value {
    json!({"pod_selector": {"matchLabels": {"app": "etl"}}, "action": "lockdown",
        "volume": {"threshold_bytes": 5000000}, "hard_cap": {"bytes": 1073741824, "window": "1h"},
        "allowlist": {"cidrs": ["203.0.113.0/24"]}})
}

fn etl_override() -> PolicyOverride {
    PolicyOverride {
        source: "shop/etl".into(),
        namespace: "shop".into(),
        match_labels: [("app".to_string(), "etl".to_string())].into(),
        action: PolicyAction::Lockdown as i32,
        volume_threshold_bytes: 5_000_000,
        allow_cidrs: vec!["203.0.113.0/24".into()],
        hard_cap_bytes: 1 << 30,
        hard_cap_window_seconds: 3600,
        ..Default::default()
    }
}

#[tokio::test]
async fn listed_objects_get_exact_status_writes_and_valid_ones_reach_agents() {
    let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let mut api = mock_api(
        handle,
        vec![
            policy_json("shop", "etl", 2, etl_spec()),
            policy_json(
                "shop",
                "broken",
                5,
                json!({"volume": {"window": "10m", "threshold_bytes": 0},
                "pod_selector": {"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["x"]}]}}),
            ),
        ],
    );
    let hub = Hub::new(8);
    let (_reg, mut rx) = hub.register("node-a").unwrap();
    let default = PolicyUpdate {
        version: 1,
        volume_threshold_bytes: 100_000_000,
        ..Default::default()
    };
    hub.set_policy(default.clone());
    assert_eq!(next_policy(&mut rx).await.version, 1);
    let (default_tx, default_rx) = watch::channel(Some(default.clone()));
    let task = tokio::spawn(policy_reconciler::run(
        Client::new(svc, "default"),
        hub.clone(),
        default_rx,
        Duration::from_millis(50),
    ));

    let pushed = next_policy(&mut rx).await;
    assert!(pushed.version > 1);
    assert_eq!(
        PolicyUpdate {
            version: 0,
            ..pushed
        },
        PolicyUpdate {
            version: 0,
            overrides: vec![etl_override()],
            ..default.clone()
        },
        "the default with the one valid object as an override"
    );

    // Statuses in namespace/name order: broken, then etl.
    let broken = without_time(check_write(&api.next_write().await, "shop", "broken"));
    let errors = vec![
        "volume.threshold_bytes: must be above 0",
        "volume.window: cannot be set per pod selector yet; set it in the cluster default (--agent-policy) or the node's policy file",
        "pod_selector.matchExpressions[0]: NotIn on \"app\" is not supported: agents match labels by equality (use matchLabels, or In with exactly one value)",
    ];
    assert_eq!(
        broken,
        json!({"observed_generation": 5, "valid": false, "errors": errors,
            "conditions": [{"type": "Ready", "status": "False", "reason": "Invalid", "observedGeneration": 5,
                "message": format!("rejected, not sent to agents (3 errors): {}", errors.join("; "))}]})
    );
    let etl = without_time(check_write(&api.next_write().await, "shop", "etl"));
    assert_eq!(
        etl,
        json!({"observed_generation": 2, "valid": true,
            "conditions": [{"type": "Ready", "status": "True", "reason": "Accepted", "observedGeneration": 2,
                "message": "in force: part of the policy pushed to every agent"}]})
    );

    // The watch: the broken object is fixed (generation 6), etl deleted.
    let mut fixed = policy_json("shop", "broken", 6, json!({"action": "dry-run"}));
    fixed["metadata"]["resourceVersion"] = json!("101");
    let mut gone = policy_json("shop", "etl", 2, etl_spec());
    gone["metadata"]["resourceVersion"] = json!("102");
    api.watch_events
        .send(vec![
            json!({"type": "MODIFIED", "object": fixed}),
            json!({"type": "DELETED", "object": gone}),
        ])
        .unwrap();
    let pushed2 = next_policy(&mut rx).await;
    assert!(pushed2.version > pushed.version);
    assert_eq!(
        pushed2.overrides,
        vec![PolicyOverride {
            source: "shop/broken".into(),
            namespace: "shop".into(),
            action: PolicyAction::DryRun as i32,
            ..Default::default()
        }]
    );
    let st = without_time(check_write(&api.next_write().await, "shop", "broken"));
    assert_eq!(st["valid"], true);
    assert_eq!(st["observed_generation"], 6);
    // Nothing for the deleted one, nothing pushed twice.
    tokio::time::sleep(Duration::from_millis(300)).await;
    api.no_more_writes();
    assert!(rx.try_recv().is_err(), "pushed without a change");
    assert!(*api.watches.lock().unwrap() >= 1);

    // The cluster default changes (SIGHUP re-read the file): pushed with the
    // overrides still on top, no status written.
    default_tx.send_replace(Some(PolicyUpdate {
        volume_threshold_bytes: 50_000_000,
        ..default.clone()
    }));
    let pushed3 = next_policy(&mut rx).await;
    assert!(pushed3.version > pushed2.version);
    assert_eq!(pushed3.volume_threshold_bytes, 50_000_000);
    assert_eq!(pushed3.overrides, pushed2.overrides);
    tokio::time::sleep(Duration::from_millis(300)).await;
    api.no_more_writes();
    task.abort();
}

async fn next_update(
    stream: &mut tonic::Streaming<exfilguard_proto::v1::ControllerMessage>,
) -> PolicyUpdate {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("a message in time")
            .expect("stream healthy")
            .expect("stream open");
        if let Some(controller_message::Payload::PolicyUpdate(u)) = msg.payload {
            return u;
        }
    }
}

#[tokio::test]
async fn a_failed_status_write_is_retried() {
    let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let mut api = mock_api_failing(handle, vec![policy_json("shop", "etl", 1, etl_spec())], 1);
    let hub = Hub::new(8);
    let (_reg, mut rx) = hub.register("node-a").unwrap();
    let (_tx, default_rx) = watch::channel(None);
    let task = tokio::spawn(policy_reconciler::run(
        Client::new(svc, "default"),
        hub.clone(),
        default_rx,
        Duration::from_millis(20),
    ));
    // The policy does not wait for the status.
    assert_eq!(next_policy(&mut rx).await.overrides, vec![etl_override()]);
    let first = check_write(&api.next_write().await, "shop", "etl");
    let t0 = Instant::now();
    let again = tokio::time::timeout(Duration::from_secs(10), api.writes.recv())
        .await
        .expect("the write is retried")
        .unwrap();
    assert!(
        t0.elapsed() >= Duration::from_secs(4),
        "retried after {:?}",
        t0.elapsed()
    );
    assert_eq!(
        without_time(check_write(&again, "shop", "etl")),
        without_time(first)
    );
    // Written: no third try, and the policy was not pushed again.
    tokio::time::sleep(Duration::from_millis(300)).await;
    api.no_more_writes();
    assert!(rx.try_recv().is_err());
    task.abort();
}

fn insecure_hello(node: &str) -> AgentMessage {
    AgentMessage {
        seq: 0,
        sent_at_unix_ms: 0,
        payload: Some(agent_message::Payload::Hello(Hello {
            node_name: node.into(),
            agent_version: "test".into(),
            kernel_release: "6.1".into(),
            ..Default::default()
        })),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exfilpolicy_event_reaches_a_connected_agent_over_grpc_within_2s() {
    use exfilguard_controller::server::{ServerConfig, serve};
    let dir = tempfile::tempdir().unwrap();
    let default_file = dir.path().join("agent-policy.yaml");
    std::fs::write(
        &default_file,
        "volume_threshold_bytes: 100000000\naction: alert\n",
    )
    .unwrap();
    let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let mut api = mock_api(handle, vec![]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = ServerConfig {
        agent_policy: Some(default_file),
        kube: Some(Client::new(svc, "default")),
        duties: exfilguard_controller::server::KubeDuties {
            incidents: false,
            ..Default::default()
        },
        ..ServerConfig::new(dir.path().join("controller.db"), None)
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(config, listener, async {
        let _ = stopped.await;
    }));

    // A test agent on a real gRPC stream.
    let channel = {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect()
                .await
            {
                Ok(c) => break c,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("controller did not start: {e}"),
            }
        }
    };
    let (tx, out) = mpsc::channel(16);
    tx.send(insecure_hello("node-a")).await.unwrap();
    let mut stream = AgentGatewayClient::new(channel)
        .connect(tokio_stream::wrappers::ReceiverStream::new(out))
        .await
        .unwrap()
        .into_inner();
    // After Welcome: the file's default (the list was empty: nothing else).
    let first = next_update(&mut stream).await;
    assert_eq!(first.volume_threshold_bytes, 100_000_000);
    assert!(first.overrides.is_empty());

    // Past the reconciler's first debounce (after its list), so the
    // measurement includes a whole one.
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The event: an ExfilPolicy is created.
    let t0 = Instant::now();
    api.watch_events
        .send(vec![
            json!({"type": "ADDED", "object": policy_json("shop", "etl", 1, etl_spec())}),
        ])
        .unwrap();
    let u = next_update(&mut stream).await;
    let latency = t0.elapsed();
    eprintln!("ExfilPolicy event to PolicyUpdate on the agent stream: {latency:?}");
    assert!(latency < Duration::from_secs(2), "took {latency:?}");
    assert!(u.version > first.version);
    assert_eq!(
        u.volume_threshold_bytes, 100_000_000,
        "the default stays under the override"
    );
    assert_eq!(u.overrides, vec![etl_override()]);
    let st = check_write(&api.next_write().await, "shop", "etl");
    assert_eq!(st["valid"], true);

    drop(tx);
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("server stops")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn real_api_server_status_and_pushed_update() {
    use k8s_openapi::{
        api::core::v1::Namespace,
        apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    };
    use kube::{
        Api as KApi, CustomResourceExt as _,
        api::{DeleteParams, Patch, PatchParams, PostParams},
    };
    let Some(client) = real_cluster("real_api_server_status_and_pushed_update").await else {
        return;
    };
    // The CRD (server-side apply: idempotent), then wait until it is served.
    let crds: KApi<CustomResourceDefinition> = KApi::all(client.clone());
    crds.patch(
        "exfilpolicies.exfilguard.io",
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(ExfilPolicy::crd()),
    )
    .await
    .expect("apply the ExfilPolicy CRD");
    let ns_name = format!("exfilguard-policy-test-{}", std::process::id());
    let namespaces: KApi<Namespace> = KApi::all(client.clone());
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": ns_name}})).unwrap();
    namespaces
        .create(&PostParams::default(), &ns)
        .await
        .expect("create namespace");
    struct Cleanup(KApi<Namespace>, String);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let (api, name) = (self.0.clone(), self.1.clone());
            // Best effort, on a runtime of its own: the test's may be gone.
            let _ = std::thread::spawn(move || {
                tokio::runtime::Runtime::new().unwrap().block_on(async {
                    let _ = api.delete(&name, &DeleteParams::default()).await;
                })
            })
            .join();
        }
    }
    let _cleanup = Cleanup(namespaces, ns_name.clone());

    let hub = Hub::new(8);
    let (_reg, mut rx) = hub.register("node-a").unwrap();
    let (_tx, default_rx) = watch::channel(None);
    let task = tokio::spawn(policy_reconciler::run(
        client.clone(),
        hub.clone(),
        default_rx,
        Duration::from_millis(100),
    ));
    let policies: KApi<ExfilPolicy> = KApi::namespaced(client.clone(), &ns_name);
    let deadline = Instant::now() + Duration::from_secs(30);
    let obj: ExfilPolicy =
        serde_json::from_value(policy_json(&ns_name, "etl", 1, etl_spec())).unwrap();
    let mut obj = obj;
    obj.metadata.uid = None;
    obj.metadata.generation = None;
    obj.metadata.resource_version = None;
    loop {
        match policies.create(&PostParams::default(), &obj).await {
            Ok(_) => break,
            // The CRD may not be established yet.
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("create ExfilPolicy: {e}"),
        }
    }
    let t0 = Instant::now();
    let u = loop {
        let u = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("a PolicyUpdate in time")
            .expect("hub alive");
        if let controller_message::Payload::PolicyUpdate(u) = u
            && u.overrides.iter().any(|o| o.namespace == ns_name)
        {
            break u;
        }
    };
    eprintln!(
        "real API: ExfilPolicy created → pushed in {:?}",
        t0.elapsed()
    );
    let o = u.overrides.iter().find(|o| o.namespace == ns_name).unwrap();
    assert_eq!(o.volume_threshold_bytes, 5_000_000);
    let status = loop {
        let got = policies.get("etl").await.expect("get ExfilPolicy");
        if let Some(s) = got.status.filter(|s| s.valid.is_some()) {
            break s;
        }
        assert!(Instant::now() < deadline, "no status written");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(status.valid, Some(true));
    assert_eq!(status.observed_generation, Some(1));
    task.abort();
}

/// With several replicas each pushes the effective policy to its own
/// agents, but only the leader writes status, and it writes it on gaining
/// leadership.
#[tokio::test]
async fn every_replica_pushes_only_the_leader_writes_status() {
    use exfilguard_controller::k8s::lease::Leader;
    let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let mut api = mock_api(handle, vec![policy_json("shop", "etl", 2, etl_spec())]);
    let hub = Hub::new(8);
    let (_reg, mut rx) = hub.register("node-a").unwrap();
    let (_default_tx, default_rx) = watch::channel(None);
    let (leading, leader_rx) = watch::channel(false);
    let task = tokio::spawn(policy_reconciler::run_with_leader(
        Client::new(svc, "default"),
        hub.clone(),
        default_rx,
        Duration::from_millis(50),
        Leader::from_receiver(leader_rx),
    ));
    let pushed = next_policy(&mut rx).await;
    assert_eq!(
        pushed.overrides,
        vec![etl_override()],
        "pushed while follower"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    api.no_more_writes();
    leading.send_replace(true);
    let etl = check_write(&api.next_write().await, "shop", "etl");
    assert_eq!(etl["valid"], true);
    assert_eq!(etl["observed_generation"], 2);
    // Nothing changed in the policy: no second push.
    assert!(rx.try_recv().is_err(), "pushed again on gaining leadership");
    task.abort();
}
