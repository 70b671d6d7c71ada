//! Incidents shared by controller replicas through `ExfilIncident` objects
//! (`store::kube`), against kube's mock API server: the exact requests of a
//! write (create, then the status with the version just made), a conflict
//! (the other replica's record merged in, the join written on its version),
//! and another replica's write arriving by watch: the incident appears here
//! and the Block goes to the agent connected HERE, over a real gRPC stream.

mod support;

use std::{pin::Pin, time::Duration};

use exfilguard_controller::{
    correlate::ResponsePolicy,
    k8s::FIELD_MANAGER,
    server::{self, KubeDuties, ServerConfig},
    store::{
        AgentInfo, Ingest, IngestOutcome, Payload, Store,
        kube::{KubeStore, decode_record, object_name, to_object},
        sqlite::SqliteStore,
    },
};
use exfilguard_proto::v1::{
    Detection, DetectionKind, GetIncidentRequest, IncidentState, PolicyAction, Severity, Workload,
    incidents_client::IncidentsClient,
};
use kube::{Client, client::Body};
use serde_json::{Value, json};
use support::kube_mock::{Handle, parse_query, status};
use tonic::codegen::http::{Method, Request, Response, StatusCode};
use tower_test::mock;

const NS: &str = "exfilguard-system";
const BASE: &str = "/apis/exfilguard.io/v1alpha1/namespaces/exfilguard-system/exfilincidents";

fn lockdown() -> ResponsePolicy {
    ResponsePolicy {
        critical: PolicyAction::Lockdown,
        high: PolicyAction::Lockdown,
        ..Default::default()
    }
}

fn detection(node: &str, seq: u64, pod: &str, cgroup_id: u64) -> Ingest {
    Ingest {
        node: node.into(),
        seq,
        sent_at_ms: 1,
        received_ms: 1_795_356_192_000 + seq,
        payload: Payload::Detection(Box::new(Detection {
            detection_id: format!("{node}-d1"),
            kind: DetectionKind::Volume as i32,
            severity: Severity::Critical as i32,
            workload: Some(Workload {
                namespace: "shop".into(),
                pod: pod.into(),
                cgroup_id,
                ..Default::default()
            }),
            summary: "3 GB to 203.0.113.9".into(),
            bytes_estimate: 3_000_000_000,
            ..Default::default()
        })),
    }
}

fn hello(store: &dyn Store, node: &str) {
    store
        .hello(
            &AgentInfo {
                node: node.into(),
                ..Default::default()
            },
            1,
        )
        .unwrap();
}

fn opened(out: &[IngestOutcome]) -> String {
    match &out[0] {
        IngestOutcome::Stored(effects) => match &effects[0] {
            exfilguard_controller::store::Effect::Incident { incident, .. } => incident.id.clone(),
            e => panic!("first effect {e:?}"),
        },
        IngestOutcome::Duplicate => panic!("duplicate"),
    }
}

/// The object as the API server returns it: `rv` as its version.
fn served(obj: &impl serde::Serialize, rv: &str) -> Value {
    let mut v = serde_json::to_value(obj).unwrap();
    v["apiVersion"] = json!("exfilguard.io/v1alpha1");
    v["kind"] = json!("ExfilIncident");
    v["metadata"]["namespace"] = json!(NS);
    v["metadata"]["resourceVersion"] = json!(rv);
    v
}

fn record_of(body: &Value) -> exfilguard_controller::store::sqlite::replica::IncidentRecord {
    decode_record(body["status"]["record"].as_str().expect("a record")).expect("record decodes")
}

type Respond = mock::SendResponse<Response<Body>>;

/// A replica's store over the mock API server (the test answers `api`).
fn mock_store(dir: &std::path::Path) -> (std::sync::Arc<KubeStore>, Pin<Box<Handle>>) {
    let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let (store, _merged) = KubeStore::new(
        SqliteStore::open(&dir.join("a.db")).unwrap(),
        Client::new(svc, "default"),
        NS,
        tokio::runtime::Handle::current(),
    );
    (store, Box::pin(handle))
}

/// n1 says Hello and sends a critical detection of `db-0`, on a blocking
/// thread (the store waits on the API server).
fn spawn_ingest(store: &std::sync::Arc<KubeStore>) -> tokio::task::JoinHandle<Vec<IngestOutcome>> {
    let s = store.clone();
    tokio::task::spawn_blocking(move || {
        hello(s.as_ref(), "n1");
        s.ingest(&[detection("n1", 1, "db-0", 7)], &lockdown())
            .unwrap()
    })
}

/// One request the client made.
struct Req {
    method: Method,
    path: String,
    query: Vec<(String, String)>,
    body: Value,
    respond: Respond,
}

impl Req {
    fn reply(self, code: StatusCode, body: Value) {
        let mut res = Response::new(Body::from(serde_json::to_vec(&body).unwrap()));
        *res.status_mut() = code;
        self.respond.send_response(res);
    }
}

async fn next(handle: &mut Pin<Box<Handle>>) -> Req {
    let (req, respond) = tokio::time::timeout(Duration::from_secs(10), handle.next_request())
        .await
        .expect("a request in time")
        .expect("client alive");
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = parse_query(req.uri().query());
    let bytes = req.into_body().collect_bytes().await.unwrap();
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).expect("JSON body")
    };
    Req {
        method,
        path,
        query,
        body,
        respond,
    }
}

fn field_manager() -> Vec<(String, String)> {
    vec![("fieldManager".into(), FIELD_MANAGER.into())]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_create_then_update_status_on_the_version_they_saw_and_merge_on_conflict() {
    let dir = tempfile::tempdir().unwrap();
    let (store, mut api) = mock_store(dir.path());

    // A detection: the incident is created, then its status written on the
    // version the create returned.
    let ingest = spawn_ingest(&store);
    let create = next(&mut api).await;
    assert_eq!(
        (&create.method, create.path.as_str()),
        (&Method::POST, BASE)
    );
    assert_eq!(create.query, field_manager());
    let id = create.body["spec"]["incident_id"]
        .as_str()
        .unwrap()
        .to_string();
    let name = object_name(&id);
    assert_eq!(create.body["metadata"]["name"], name);
    assert_eq!(create.body["spec"]["workload"]["pod"], "db-0");
    assert_eq!(create.body["spec"]["workload"]["node"], "n1");
    assert_eq!(create.body["spec"]["severity"], "critical");
    let mut made = create.body.clone();
    made.as_object_mut().unwrap().remove("status");
    create.reply(StatusCode::CREATED, served(&made, "11"));

    let status_path = format!("{BASE}/{name}/status");
    let put = next(&mut api).await;
    assert_eq!(
        (&put.method, put.path.as_str()),
        (&Method::PUT, status_path.as_str())
    );
    assert_eq!(put.query, field_manager());
    assert_eq!(put.body["metadata"]["resourceVersion"], "11");
    assert_eq!(put.body["status"]["state"], "contained");
    assert_eq!(put.body["status"]["bytes"], 3_000_000_000u64);
    let record = record_of(&put.body);
    assert_eq!(record.incident.id, id);
    assert_eq!(record.detections.len(), 1);
    assert!(
        record
            .timeline
            .iter()
            .any(|t| t.cause.starts_with("lockdown"))
    );
    assert_eq!(
        record.alerts.len(),
        2,
        "opened and contained alerts travel along"
    );
    let first = put.body.clone();
    put.reply(StatusCode::OK, served(&first, "12"));
    assert_eq!(opened(&ingest.await.unwrap()), id);

    // Another replica (b) holds the incident and noted something meanwhile.
    let bdir = tempfile::tempdir().unwrap();
    let b = SqliteStore::open(&bdir.path().join("b.db")).unwrap();
    b.merge_incident(&record).unwrap();
    b.note(&id, "bob", "called the data owner", 1_795_356_199_000)
        .unwrap();
    let theirs = served(
        &to_object(b.export_incident(&id).unwrap().unwrap()).unwrap(),
        "15",
    );

    // Our acknowledgement is written on version 12: the API server says it
    // is stale; we read theirs, merge, and write the join on 15.
    let s = store.clone();
    let ack = tokio::task::spawn_blocking({
        let id = id.clone();
        move || s.acknowledge(&id, "alice", "on it", 1_795_356_200_000)
    });
    let put = next(&mut api).await;
    assert_eq!(put.path, status_path);
    assert_eq!(put.body["metadata"]["resourceVersion"], "12");
    put.reply(
        StatusCode::CONFLICT,
        status(409, "Conflict", "the object has been modified").1,
    );
    let get = next(&mut api).await;
    assert_eq!(
        (&get.method, get.path.as_str()),
        (&Method::GET, format!("{BASE}/{name}").as_str())
    );
    get.reply(StatusCode::OK, theirs);
    let put = next(&mut api).await;
    assert_eq!(put.path, status_path);
    assert_eq!(put.body["metadata"]["resourceVersion"], "15");
    let joined = record_of(&put.body);
    let causes: Vec<&str> = joined.timeline.iter().map(|t| t.cause.as_str()).collect();
    assert!(causes.contains(&"called the data owner"), "{causes:?}");
    assert!(causes.contains(&"acknowledged: on it"), "{causes:?}");
    assert_eq!(joined.incident.acknowledged_by, "alice");
    assert_eq!(put.body["status"]["acknowledged_by"], "alice");
    let last = put.body.clone();
    put.reply(StatusCode::OK, served(&last, "16"));
    ack.await.unwrap().unwrap();
    // This replica now shows bob's note too.
    let here = store.get_incident(&id).unwrap();
    assert!(here.timeline.iter().any(|t| t.actor == "bob"));
    assert_eq!(store.pending_writes(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_the_api_server_refuses_is_kept_and_written_later() {
    let dir = tempfile::tempdir().unwrap();
    let (store, mut api) = mock_store(dir.path());
    let ingest = spawn_ingest(&store);
    let create = next(&mut api).await;
    create.reply(
        StatusCode::INTERNAL_SERVER_ERROR,
        status(500, "InternalError", "etcd is sad").1,
    );
    // The agent's message is stored (and acknowledged) all the same.
    let id = opened(&ingest.await.unwrap());
    assert_eq!(store.pending_writes(), 1);
    assert_eq!(
        store.get_incident(&id).unwrap().state,
        IncidentState::Contained as i32
    );
    // The background task writes it once the API server is back. Its watch
    // is answered with an empty list and then held.
    let task = store.spawn();
    let mut held = Vec::new();
    let mut created = false;
    for _ in 0..10 {
        let req = next(&mut api).await;
        let watch = req.query.iter().any(|(k, v)| k == "watch" && v == "true");
        match (req.method.clone(), req.path.as_str()) {
            (Method::GET, BASE) if watch => held.push(req),
            (Method::GET, BASE) => req.reply(
                StatusCode::OK,
                json!({"apiVersion": "exfilguard.io/v1alpha1", "kind": "ExfilIncidentList",
                    "metadata": {"resourceVersion": "30"}, "items": []}),
            ),
            (Method::POST, BASE) => {
                assert_eq!(req.body["spec"]["incident_id"], id);
                let body = req.body.clone();
                req.reply(StatusCode::CREATED, served(&body, "31"));
                created = true;
            }
            (Method::PUT, p) if p.ends_with("/status") => {
                assert!(created, "status before create");
                assert_eq!(req.body["metadata"]["resourceVersion"], "31");
                let body = req.body.clone();
                req.reply(StatusCode::OK, served(&body, "32"));
                break;
            }
            (m, p) => panic!("unexpected {m} {p}"),
        }
    }
    // Give the store a moment to record the write as done.
    for _ in 0..50 {
        if store.pending_writes() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(store.pending_writes(), 0);
    task.abort();
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_replicas_containment_blocks_the_agent_connected_here() {
    // Replica b contained a pod on node n2 (its record, as b wrote it).
    let bdir = tempfile::tempdir().unwrap();
    let b = SqliteStore::open(&bdir.path().join("b.db")).unwrap();
    hello(&b, "n2");
    let id = opened(
        &b.ingest(&[detection("n2", 4, "etl-5", 4242)], &lockdown())
            .unwrap(),
    );
    let theirs = served(
        &to_object(b.export_incident(&id).unwrap().unwrap()).unwrap(),
        "41",
    );
    let theirs_record = theirs["status"]["record"].as_str().unwrap().to_string();

    // This replica: a controller on loopback, incidents in the (mock)
    // cluster, no other Kubernetes duty; n2's agent is connected here.
    let dir = tempfile::tempdir().unwrap();
    let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let mut api = Box::pin(handle);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = ServerConfig {
        policy: lockdown(),
        kube: Some(Client::new(svc, "default")),
        duties: KubeDuties {
            containment: false,
            evidence: false,
            exfilpolicies: false,
            incidents: true,
        },
        namespace: NS.into(),
        ..ServerConfig::new(dir.path().join("a.db"), None)
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(server::serve(config, listener, async {
        let _ = stopped.await;
    }));
    // The watch starts with a list: empty.
    let list = next(&mut api).await;
    assert_eq!((&list.method, list.path.as_str()), (&Method::GET, BASE));
    list.reply(
        StatusCode::OK,
        json!({"apiVersion": "exfilguard.io/v1alpha1", "kind": "ExfilIncidentList",
            "metadata": {"resourceVersion": "40"}, "items": []}),
    );
    let watch = next(&mut api).await;
    assert!(
        watch.query.contains(&("watch".into(), "true".into())),
        "{:?}",
        watch.query
    );

    let channel = support::agent::channel(addr).await;
    let mut agent = support::agent::TestAgent::connect(channel.clone(), "n2").await;

    // b's write arrives by watch.
    let mut event = serde_json::to_vec(&json!({"type": "ADDED", "object": theirs})).unwrap();
    event.push(b'\n');
    let mut res = Response::new(Body::from(event));
    *res.status_mut() = StatusCode::OK;
    watch.respond.send_response(res);

    let block = agent.block().await;
    assert_eq!(block.incident_id, id);
    assert_eq!(block.cgroup_id, 4242);

    // And this replica serves the incident as b left it.
    let incident = IncidentsClient::new(channel)
        .get_incident(GetIncidentRequest { id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(incident.state, IncidentState::Contained as i32);
    assert_eq!(incident.node, "n2");

    // This replica leads (no election configured), so its dispatcher routes
    // the two alerts (to no sink: none is configured) and writes that back
    // on b's version; nothing else about the incident changes.
    let put = loop {
        let req = next(&mut api).await;
        let watch = req.query.iter().any(|(k, v)| k == "watch" && v == "true");
        if req.method == Method::GET && watch {
            std::mem::forget(req);
            continue;
        }
        break req;
    };
    assert_eq!(put.method, Method::PUT);
    assert_eq!(put.body["metadata"]["resourceVersion"], "41");
    let mine = record_of(&put.body);
    let mut b_record = decode_record(&theirs_record).unwrap();
    assert!(b_record.alerts.iter().all(|a| !a.routed));
    for a in &mut b_record.alerts {
        a.routed = true;
    }
    assert_eq!(mine, b_record);
    let body = put.body.clone();
    put.reply(StatusCode::OK, served(&body, "42"));
    // Then quiet: the only request is the watch being opened again.
    let quiet = tokio::time::timeout(Duration::from_millis(800), async {
        loop {
            let req = next(&mut api).await;
            let watch = req.query.iter().any(|(k, v)| k == "watch" && v == "true");
            assert!(
                req.method == Method::GET && watch,
                "unexpected {} {}",
                req.method,
                req.path
            );
            std::mem::forget(req);
        }
    })
    .await;
    assert!(quiet.is_err());
    // The agent hangs up, then the controller stops.
    drop(agent);
    let _ = stop.send(());
    server.await.unwrap().unwrap();
}

/// A replica: its own SQLite file, its own client, the shared namespace.
fn replica(
    api: &support::shared_api::SharedApi,
    dir: &std::path::Path,
    name: &str,
) -> (
    std::sync::Arc<KubeStore>,
    tokio::sync::mpsc::UnboundedReceiver<Vec<exfilguard_controller::store::Effect>>,
    tokio::task::JoinHandle<()>,
) {
    let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
    api.serve(handle);
    let (store, merged) = KubeStore::new(
        SqliteStore::open(&dir.join(format!("{name}.db"))).unwrap(),
        Client::new(svc, "default"),
        NS,
        tokio::runtime::Handle::current(),
    );
    let task = store.spawn();
    (store, merged, task)
}

/// Waits (bounded) until `check` holds.
async fn until(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..200 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what}: not within 10 s");
}

/// Runs a store call on a blocking thread (it waits on the API server).
async fn blocking<T: Send + 'static>(
    store: &std::sync::Arc<KubeStore>,
    f: impl FnOnce(&KubeStore) -> T + Send + 'static,
) -> T {
    let s = store.clone();
    tokio::task::spawn_blocking(move || f(&s)).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_incidents_and_converge_after_concurrent_changes() {
    let api = support::shared_api::SharedApi::new(NS);
    let dir = tempfile::tempdir().unwrap();
    let (a, _a_merged, a_task) = replica(&api, dir.path(), "a");
    let (b, mut b_merged, b_task) = replica(&api, dir.path(), "b");

    // n1's agent is on replica a, which opens and contains the incident.
    let id = opened(
        &blocking(&a, |s| {
            hello(s, "n1");
            s.ingest(&[detection("n1", 1, "db-0", 7)], &lockdown())
                .unwrap()
        })
        .await,
    );
    // b sees it, contained, and is told to Block (it would send the Block if
    // n1's agent were connected to it).
    until("b has the incident", || {
        b.get_incident(&id)
            .is_ok_and(|i| i.state == IncidentState::Contained as i32)
    })
    .await;
    let mut b_effects = Vec::new();
    while let Ok(e) = b_merged.try_recv() {
        b_effects.extend(e);
    }
    assert!(
        b_effects.iter().any(|e| matches!(e,
            exfilguard_controller::store::Effect::Block { node, block } if node == "n1" && block.cgroup_id == 7)),
        "{b_effects:?}"
    );

    // At the same time: a takes the episode's next detection and alice
    // acknowledges on a; bob releases on b.
    let (r1, r2, r3) = tokio::join!(
        blocking(&a, |s| s
            .ingest(&[detection("n1", 2, "db-0", 7)], &lockdown())
            .unwrap()),
        blocking(&a, {
            let id = id.clone();
            move |s| s.acknowledge(&id, "alice", "on it", 1_795_356_300_000)
        }),
        blocking(&b, {
            let id = id.clone();
            move |s| s.release(&id, "bob", "backup job", 1_795_356_300_001)
        }),
    );
    assert!(matches!(r1[0], IngestOutcome::Stored(_)));
    r2.unwrap();
    r3.unwrap();

    // Both replicas and the object end with the same rows: released,
    // acknowledged by alice, two detections, every timeline entry.
    until("replicas converge", || {
        let (ra, rb) = (a.local_record(&id).unwrap(), b.local_record(&id).unwrap());
        let obj = api.object(&object_name(&id));
        ra == rb
            && a.pending_writes() == 0
            && b.pending_writes() == 0
            && obj.is_some_and(|o| o["status"]["record"].is_string() && record_of(&o) == ra)
    })
    .await;
    let r = a.local_record(&id).unwrap();
    assert_eq!(r.incident.state, IncidentState::Released as i32);
    assert_eq!(r.incident.acknowledged_by, "alice");
    assert_eq!(r.incident.detection_count, 2);
    assert_eq!(r.detections.len(), 2);
    let causes: Vec<&str> = r.timeline.iter().map(|t| t.cause.as_str()).collect();
    for want in ["opened:", "lockdown:", "acknowledged: on it", "released"] {
        assert!(
            causes.iter().any(|c| c.starts_with(want)),
            "{want} in {causes:?}"
        );
    }
    let obj = api.object(&object_name(&id)).unwrap();
    assert_eq!(obj["status"]["state"], "released");
    println!(
        "converged; the API server refused {} stale writes on the way",
        api.conflicts()
    );
    a_task.abort();
    b_task.abort();
}

/// The same as above against a real API server (`KUBECONFIG`): two replicas
/// in a namespace of the test's own; what one writes the other serves, and
/// `kubectl get exfilincidents` sees the state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_against_a_real_api_server() {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::{
        CustomResourceExt as _,
        api::{Patch, PatchParams},
    };
    let Some(client) =
        support::kube_real::real_cluster("two_replicas_against_a_real_api_server").await
    else {
        return;
    };
    let crds: kube::Api<CustomResourceDefinition> = kube::Api::all(client.clone());
    crds.patch(
        "exfilincidents.exfilguard.io",
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(exfilguard_controller::k8s::crd::ExfilIncident::crd()),
    )
    .await
    .expect("apply the ExfilIncident CRD");
    let ns = support::kube_real::TestNamespace::create(&client).await;
    let dir = tempfile::tempdir().unwrap();
    let open = |name: &str| {
        let (store, merged) = KubeStore::new(
            SqliteStore::open(&dir.path().join(format!("{name}.db"))).unwrap(),
            client.clone(),
            &ns.name,
            tokio::runtime::Handle::current(),
        );
        let task = store.spawn();
        (store, merged, task)
    };
    let (a, _am, a_task) = open("a");
    let (b, _bm, b_task) = open("b");
    // The CRD may take a moment to be served: the background task retries.
    let id = opened(
        &blocking(&a, |s| {
            hello(s, "n1");
            s.ingest(&[detection("n1", 1, "db-0", 7)], &lockdown())
                .unwrap()
        })
        .await,
    );
    until("the object exists with its record", || {
        a.pending_writes() == 0
    })
    .await;
    until("b serves the incident", || b.get_incident(&id).is_ok()).await;
    blocking(&b, {
        let id = id.clone();
        move |s| s.release(&id, "bob", "real cluster test", 1_795_356_300_001)
    })
    .await
    .unwrap();
    until("a sees the release", || {
        a.get_incident(&id)
            .is_ok_and(|i| i.state == IncidentState::Released as i32)
    })
    .await;
    let objects: kube::Api<exfilguard_controller::k8s::crd::ExfilIncident> =
        kube::Api::namespaced(client.clone(), &ns.name);
    let obj = objects.get(&object_name(&id)).await.unwrap();
    assert_eq!(
        obj.status.unwrap().state,
        exfilguard_controller::k8s::crd::IncidentState::Released
    );
    a_task.abort();
    b_task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_api_server_does_not_hold_up_ingest() {
    let dir = tempfile::tempdir().unwrap();
    let (store, mut api) = mock_store(dir.path());
    let ingest = spawn_ingest(&store);
    // The create arrives and is never answered.
    let create = next(&mut api).await;
    assert_eq!(create.method, Method::POST);
    let out = tokio::time::timeout(Duration::from_secs(20), ingest)
        .await
        .expect("ingest returns although the API server does not answer")
        .unwrap();
    let id = opened(&out);
    assert_eq!(store.pending_writes(), 1, "the write is kept for later");
    assert!(store.get_incident(&id).is_ok());
    drop(create);
}
