//! Pod evidence capture against kube's mock API server (`tower-test`): the
//! exact requests (GET pod, GET its ReplicaSet, LIST Events with the field
//! selector) and nothing else; the items stored with their hashes in a real
//! SQLite store; the pod-gone, replaced-pod and API-failure paths with their
//! timeline entries. The last test runs the capture against a real API
//! server when `KUBECONFIG` is set.
mod support;

use std::{pin::pin, sync::Arc, time::Duration};

use exfilguard_controller::{
    correlate::ResponsePolicy,
    evidence::{
        capture::{Capturer, Retry},
        sha256_hex,
    },
    k8s::evidence::PodEvidence,
    store::{AgentInfo, IncidentFilter, Ingest, Payload, Store, sqlite::SqliteStore},
};
use exfilguard_proto::v1::{Detection, EvidenceItem, Incident, Severity, Workload};
use kube::{Client, client::Body};
use serde_json::{Value, json};
use support::kube_real::real_cluster;
use tonic::codegen::http::{Method, Request, Response, StatusCode};
use tower_test::mock;

type Handle = mock::Handle<Request<Body>, Response<Body>>;

const NS: &str = "shop";
const POD: &str = "checkout-7d4b9c8f6-x2x9z";
const UID: &str = "6f1c2b9e-6a49-4d0c-9a57-1b2f0c3d4e5f";
const RS: &str = "checkout-7d4b9c8f6";
const DIGEST: &str = "docker.io/shop/checkout@sha256:0f3a7c2e9b1d4f6a8c0e2b4d6f8a1c3e5b7d9f1a3c5e7b9d1f3a5c7e9b1d3f5a";

/// One expected request and the raw bytes the mock server answers with.
struct Expect {
    method: Method,
    path: String,
    query: Vec<(&'static str, String)>,
    status: StatusCode,
    body: String,
}

fn get(path: &str, status: u16, body: &str) -> Expect {
    Expect {
        method: Method::GET,
        path: path.into(),
        query: vec![],
        status: StatusCode::from_u16(status).unwrap(),
        body: body.into(),
    }
}

fn failure(code: u16, reason: &str) -> String {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!("{reason} (test)"), "reason": reason, "code": code})
    .to_string()
}

fn parse_query(q: Option<&str>) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = q
        .unwrap_or_default()
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect();
    v.sort();
    v
}

/// Percent-decoding of query values (field selectors carry `=` and `,`).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
                out.push(u8::from_str_radix(hex, 16).unwrap());
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap()
}

/// Serves `script` in order, checking each request, then checks that the
/// client makes no further request before it is dropped.
fn serve(handle: Handle, script: Vec<Expect>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut handle = pin!(handle);
        for (i, e) in script.into_iter().enumerate() {
            let (req, send) = tokio::time::timeout(Duration::from_secs(5), handle.next_request())
                .await
                .unwrap_or_else(|_| panic!("request #{i} ({} {}) never came", e.method, e.path))
                .unwrap_or_else(|| panic!("client gone before request #{i} ({})", e.path));
            assert_eq!(req.method(), e.method, "request #{i}: {}", req.uri());
            assert_eq!(req.uri().path(), e.path, "request #{i}");
            let mut want: Vec<(String, String)> = e
                .query
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect();
            want.sort();
            assert_eq!(
                parse_query(req.uri().query()),
                want,
                "request #{i}: {}",
                req.uri()
            );
            let body = req.into_body().collect_bytes().await.unwrap();
            assert!(body.is_empty(), "request #{i}: a read sent a body");
            let mut res = Response::new(Body::from(e.body.into_bytes()));
            *res.status_mut() = e.status;
            send.send_response(res);
        }
        if let Some((req, _)) = handle.next_request().await {
            panic!("unexpected request {} {}", req.method(), req.uri());
        }
    })
}

fn pod_path() -> String {
    format!("/api/v1/namespaces/{NS}/pods/{POD}")
}

/// The pod as the API server would send it: deliberately not in the order
/// or spacing serde would write, so an exact-bytes check means something.
fn pod_json(created: &str) -> String {
    format!(
        r#"{{"kind":"Pod","apiVersion":"v1","metadata":{{"name":"{POD}","namespace":"{NS}","uid":"{UID}",
  "creationTimestamp":"{created}","labels":{{"app":"checkout","pod-template-hash":"7d4b9c8f6"}},
  "ownerReferences":[{{"apiVersion":"apps/v1","kind":"ReplicaSet","name":"{RS}","uid":"rs-uid","controller":true}}]}},
  "spec":{{"nodeName":"node-a","serviceAccountName":"checkout","containers":[{{"name":"app","image":"shop/checkout:2.1"}}]}},
  "status":{{"phase":"Running","containerStatuses":[{{"name":"app","image":"shop/checkout:2.1","imageID":"{DIGEST}",
  "ready":true,"restartCount":0}}]}}}}"#
    )
}

fn rs_json() -> String {
    json!({"kind": "ReplicaSet", "apiVersion": "apps/v1",
        "metadata": {"name": RS, "namespace": NS, "uid": "rs-uid",
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": "checkout",
                "uid": "deploy-uid", "controller": true}]}})
    .to_string()
}

fn events_json() -> String {
    json!({"kind": "EventList", "apiVersion": "v1", "metadata": {"resourceVersion": "77"},
        "items": [{"metadata": {"name": "checkout.1", "namespace": NS},
            "involvedObject": {"kind": "Pod", "name": POD, "namespace": NS, "uid": UID},
            "reason": "Pulled", "message": "Container image \"shop/checkout:2.1\" already present",
            "type": "Normal", "count": 1}]})
    .to_string()
}

fn events_expect() -> Expect {
    Expect {
        query: vec![
            (
                "fieldSelector",
                format!("involvedObject.name={POD},involvedObject.uid={UID}"),
            ),
            ("limit", "500".into()),
        ],
        ..get(
            &format!("/api/v1/namespaces/{NS}/events"),
            200,
            &events_json(),
        )
    }
}

/// A real SQLite store with one open incident for the pod.
fn store_with_incident(dir: &std::path::Path) -> (Arc<dyn Store>, Incident) {
    let store = SqliteStore::open(&dir.join("c.db")).unwrap();
    store
        .hello(
            &AgentInfo {
                node: "node-a".into(),
                agent_version: "test".into(),
                ..Default::default()
            },
            1,
        )
        .unwrap();
    store
        .ingest(
            &[Ingest {
                node: "node-a".into(),
                seq: 1,
                sent_at_ms: 1,
                received_ms: exfilguard_controller::time::now_ms(),
                payload: Payload::Detection(Box::new(Detection {
                    detection_id: "d1".into(),
                    severity: Severity::High as i32,
                    workload: Some(Workload {
                        namespace: NS.into(),
                        pod: POD.into(),
                        cgroup_id: 9,
                        ..Default::default()
                    }),
                    ..Default::default()
                })),
            }],
            &ResponsePolicy::default(),
        )
        .unwrap();
    let incident = store
        .list_incidents(&IncidentFilter {
            limit: 1,
            ..Default::default()
        })
        .unwrap()
        .incidents
        .remove(0);
    let store: Arc<dyn Store> = Arc::new(store);
    (store, incident)
}

fn capturer(store: &Arc<dyn Store>, attempts: u32) -> (Capturer, Handle) {
    let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
    (
        Capturer::new(
            store.clone(),
            Client::new(svc, "default"),
            Retry {
                attempts,
                first_backoff: Duration::from_millis(10),
            },
        ),
        handle,
    )
}

fn pod_items(store: &Arc<dyn Store>, id: &str) -> Vec<EvidenceItem> {
    store
        .evidence(id)
        .unwrap()
        .into_iter()
        .filter(|i| !i.source.starts_with("agent:"))
        .collect()
}

fn causes(store: &Arc<dyn Store>, id: &str) -> Vec<String> {
    store
        .get_incident(id)
        .unwrap()
        .timeline
        .into_iter()
        .map(|t| t.cause)
        .collect()
}

#[tokio::test]
async fn captures_the_pod_its_owner_chain_and_events_with_exact_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let (store, incident) = store_with_incident(dir.path());
    let (c, handle) = capturer(&store, 3);
    let server = serve(
        handle,
        vec![
            get(&pod_path(), 200, &pod_json("2026-01-01T00:00:00Z")),
            get(
                &format!("/apis/apps/v1/namespaces/{NS}/replicasets/{RS}"),
                200,
                &rs_json(),
            ),
            events_expect(),
        ],
    );
    c.capture(&incident).await;
    drop(c);
    server.await.unwrap();

    let items = pod_items(&store, &incident.id);
    let kinds: Vec<&str> = items.iter().map(|i| i.kind.as_str()).collect();
    assert_eq!(kinds, ["pod", "pod_summary", "pod_events"]);
    // What Kubernetes said, byte for byte, hashed.
    assert_eq!(
        items[0].content,
        pod_json("2026-01-01T00:00:00Z").into_bytes()
    );
    assert_eq!(items[2].content, events_json().into_bytes());
    for i in &items {
        assert_eq!(i.sha256, sha256_hex(&i.content));
        assert_eq!(i.media_type, "application/json");
        assert!(i.note.is_empty());
    }
    assert_eq!(
        items[0].source,
        format!("kubernetes-api GET {}", pod_path())
    );
    assert!(
        items[2]
            .source
            .contains("fieldSelector=involvedObject.name="),
        "{}",
        items[2].source
    );
    let summary: Value = serde_json::from_slice(&items[1].content).unwrap();
    assert_eq!(summary["node"], "node-a");
    assert_eq!(summary["uid"], UID);
    assert_eq!(summary["labels"]["app"], "checkout");
    assert_eq!(summary["image_digests"][0]["image_id"], DIGEST);
    assert_eq!(summary["owner_chain"][0]["kind"], "ReplicaSet");
    assert_eq!(summary["owner_chain"][1]["kind"], "Deployment");
    assert_eq!(summary["owner_chain"][1]["name"], "checkout");
    let causes = causes(&store, &incident.id);
    assert!(
        causes.last().unwrap().starts_with(&format!(
            "evidence captured from the API server for pod {NS}/{POD}: pod, pod_summary, pod_events"
        )),
        "{causes:?}"
    );
}

#[tokio::test]
async fn a_gone_pod_is_an_item_not_a_failure() {
    let dir = tempfile::tempdir().unwrap();
    let (store, incident) = store_with_incident(dir.path());
    let (c, handle) = capturer(&store, 3);
    let server = serve(
        handle,
        vec![get(&pod_path(), 404, &failure(404, "NotFound"))],
    );
    c.capture(&incident).await;
    drop(c);
    server.await.unwrap();
    let items = pod_items(&store, &incident.id);
    assert_eq!(items.len(), 1);
    assert_eq!(items[0].kind, "pod_gone");
    let v: Value = serde_json::from_slice(&items[0].content).unwrap();
    assert!(
        v["detail"].as_str().unwrap().contains("was not found"),
        "{v}"
    );
    assert!(
        !causes(&store, &incident.id)
            .iter()
            .any(|c| c.contains("failed"))
    );
}

#[tokio::test]
async fn a_newer_pod_of_the_same_name_is_not_taken_for_the_detected_one() {
    let dir = tempfile::tempdir().unwrap();
    let (store, incident) = store_with_incident(dir.path());
    let (c, handle) = capturer(&store, 3);
    let server = serve(
        handle,
        vec![get(&pod_path(), 200, &pod_json("2099-01-01T00:00:00Z"))],
    );
    c.capture(&incident).await;
    drop(c);
    server.await.unwrap();
    let items = pod_items(&store, &incident.id);
    assert_eq!(items.len(), 1);
    assert_eq!(items[0].kind, "pod_gone");
    assert!(String::from_utf8_lossy(&items[0].content).contains("a replacement"));
}

#[tokio::test]
async fn api_failures_are_retried_a_bounded_number_of_times_and_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let (store, incident) = store_with_incident(dir.path());
    // A failure, then success on the retry.
    let (c, handle) = capturer(&store, 3);
    let server = serve(
        handle,
        vec![
            get(&pod_path(), 500, &failure(500, "InternalError")),
            get(&pod_path(), 200, &pod_json("2026-01-01T00:00:00Z")),
            get(
                &format!("/apis/apps/v1/namespaces/{NS}/replicasets/{RS}"),
                404,
                &failure(404, "NotFound"),
            ),
            events_expect(),
        ],
    );
    c.capture(&incident).await;
    drop(c);
    server.await.unwrap();
    let kinds: Vec<String> = pod_items(&store, &incident.id)
        .into_iter()
        .map(|i| i.kind)
        .collect();
    assert_eq!(kinds, ["pod", "pod_summary", "pod_events"]);
    let timeline = causes(&store, &incident.id);
    assert!(
        timeline
            .iter()
            .any(|c| c.contains("failed (attempt 1/3, retrying)") && c.contains("get pod")),
        "{timeline:?}"
    );

    // Failing every time: exactly `attempts` requests, then a capture_failed item.
    let (store, incident) = {
        let dir2 = dir.path().join("second");
        std::fs::create_dir(&dir2).unwrap();
        store_with_incident(&dir2)
    };
    let (c, handle) = capturer(&store, 2);
    let server = serve(
        handle,
        vec![
            get(&pod_path(), 503, &failure(503, "ServiceUnavailable")),
            get(&pod_path(), 403, &failure(403, "Forbidden")),
        ],
    );
    c.capture(&incident).await;
    drop(c);
    server.await.unwrap();
    let items = pod_items(&store, &incident.id);
    assert_eq!(items.len(), 1);
    assert_eq!(items[0].kind, "capture_failed");
    let v: Value = serde_json::from_slice(&items[0].content).unwrap();
    assert_eq!(v["attempts"], 2);
    assert!(
        v["last_error"].as_str().unwrap().contains("Forbidden"),
        "{v}"
    );
    let timeline = causes(&store, &incident.id);
    assert!(
        timeline
            .iter()
            .any(|c| c.contains("attempt 2/2, giving up")),
        "{timeline:?}"
    );
}

#[tokio::test]
async fn a_workload_outside_kubernetes_makes_no_request() {
    let dir = tempfile::tempdir().unwrap();
    let (store, mut incident) = store_with_incident(dir.path());
    incident.workload = Some(Workload {
        cgroup_path: "/system.slice/backup.service".into(),
        ..Default::default()
    });
    let (c, handle) = capturer(&store, 3);
    let server = serve(handle, vec![]);
    c.capture(&incident).await;
    drop(c);
    server.await.unwrap();
    assert!(pod_items(&store, &incident.id).is_empty());
}

#[tokio::test]
async fn bad_names_are_refused_before_any_request() {
    let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let pods = PodEvidence::new(Client::new(svc, "default"));
    let server = serve(handle, vec![]);
    for (ns, name) in [
        ("shop", "../../secrets"),
        ("shop", ".."),
        ("", "x"),
        ("shop", &"a".repeat(300)[..]),
    ] {
        let err = pods.capture(ns, name, 0, 1).await.unwrap_err();
        assert_eq!(err.label(), "invalid", "{ns}/{name}: {err}");
    }
    drop(pods);
    server.await.unwrap();
}

#[tokio::test]
async fn real_cluster_captures_a_pod_and_notices_it_gone() {
    use k8s_openapi::api::core::v1::{Namespace, Pod};
    let Some(client) = real_cluster("real_cluster_captures_a_pod_and_notices_it_gone").await else {
        return;
    };
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let ns_name = format!("exfilguard-evidence-{}-{nanos}", std::process::id());
    let namespaces = kube::Api::<Namespace>::all(client.clone());
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": ns_name}})).unwrap();
    namespaces.create(&Default::default(), &ns).await.unwrap();
    // Deleted at the end even when an assertion fails.
    struct Cleanup(kube::Api<Namespace>, String);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let (api, name) = (self.0.clone(), self.1.clone());
            let _ = std::thread::spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap()
                    .block_on(async { api.delete(&name, &Default::default()).await.map(|_| ()) })
            })
            .join();
        }
    }
    let _cleanup = Cleanup(namespaces, ns_name.clone());
    let pods = kube::Api::<Pod>::namespaced(client.clone(), &ns_name);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "web-0", "labels": {"app": "web"}},
        "spec": {"containers": [{"name": "app", "image": "registry.k8s.io/pause:3.9"}]},
    }))
    .unwrap();
    let created = pods.create(&Default::default(), &pod).await.unwrap();
    let uid = created.metadata.uid.clone().unwrap();
    let capture = PodEvidence::new(client.clone());
    let now = exfilguard_controller::time::now_ms();
    let items = capture.capture(&ns_name, "web-0", now, now).await.unwrap();
    let kinds: Vec<&str> = items.iter().map(|i| i.kind.as_str()).collect();
    assert_eq!(kinds, ["pod", "pod_summary", "pod_events"]);
    let raw: Value = serde_json::from_slice(&items[0].content).unwrap();
    assert_eq!(raw["metadata"]["uid"], uid.as_str());
    let events: Value = serde_json::from_slice(&items[2].content).unwrap();
    assert!(events["items"].is_array(), "{events}");
    pods.delete("web-0", &kube::api::DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    for _ in 0..100 {
        if pods.get_opt("web-0").await.unwrap().is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let items = capture.capture(&ns_name, "web-0", now, now).await.unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0].kind, "pod_gone");
}

/// The server wired with a Kubernetes client: the agent's detection is
/// acknowledged while the API server has not answered yet (capture is off the
/// ingest path), then the capture's GET arrives and its outcome is exported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_captures_after_the_ack_and_never_delays_it() {
    use exfilguard_controller::server::{self, KubeDuties, ServerConfig};
    use exfilguard_proto::v1::{
        AgentMessage, ExportEvidenceRequest, Hello, agent_gateway_client::AgentGatewayClient,
        agent_message, controller_message, incidents_client::IncidentsClient,
    };
    use tokio_stream::wrappers::ReceiverStream;

    let dir = tempfile::tempdir().unwrap();
    let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = ServerConfig {
        kube: Some(Client::new(svc, "default")),
        duties: KubeDuties {
            exfilpolicies: false,
            incidents: false,
            ..Default::default()
        },
        ..ServerConfig::new(dir.path().join("c.db"), None)
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(server::serve(config, listener, async {
        let _ = stopped.await;
    }));
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let (tx, out) = tokio::sync::mpsc::channel(8);
    for (seq, payload) in [
        (
            0,
            agent_message::Payload::Hello(Hello {
                node_name: "node-a".into(),
                agent_version: "test".into(),
                ..Default::default()
            }),
        ),
        (
            1,
            agent_message::Payload::Detection(Detection {
                detection_id: "d1".into(),
                kind: exfilguard_proto::v1::DetectionKind::Volume as i32,
                severity: Severity::High as i32,
                workload: Some(Workload {
                    namespace: NS.into(),
                    pod: POD.into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        ),
    ] {
        tx.send(AgentMessage {
            seq,
            sent_at_unix_ms: 1,
            payload: Some(payload),
        })
        .await
        .unwrap();
    }
    let mut rx = AgentGatewayClient::new(channel.clone())
        .connect(ReceiverStream::new(out))
        .await
        .unwrap()
        .into_inner();
    // The Ack comes while the mock API server holds back every answer.
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), rx.message())
            .await
            .expect("Ack without waiting for the API server")
            .unwrap()
            .expect("stream open");
        if let Some(controller_message::Payload::Ack(a)) = msg.payload
            && a.seq == 1
        {
            break;
        }
    }
    let mut handle = pin!(handle);
    let (req, send) = tokio::time::timeout(Duration::from_secs(10), handle.next_request())
        .await
        .expect("the capture's GET")
        .unwrap();
    assert_eq!(
        (req.method(), req.uri().path()),
        (&Method::GET, pod_path().as_str())
    );
    let mut res = Response::new(Body::from(failure(404, "NotFound").into_bytes()));
    *res.status_mut() = StatusCode::NOT_FOUND;
    send.send_response(res);

    let mut api = IncidentsClient::new(channel);
    let id = api
        .list_incidents(exfilguard_proto::v1::ListIncidentsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .incidents[0]
        .id
        .clone();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut stream = api
            .export_evidence(ExportEvidenceRequest {
                incident_id: id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        let mut kinds = Vec::new();
        while let Some(item) = stream.message().await.unwrap() {
            kinds.push(item.kind);
        }
        if kinds.iter().any(|k| k == "pod_gone") {
            assert_eq!(kinds, ["detection", "workload", "flows", "pod_gone"]);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no pod item: {kinds:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(tx);
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("server stops")
        .unwrap()
        .unwrap();
}
