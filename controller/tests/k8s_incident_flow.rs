//! An incident's cluster containment end to end: the controller served on
//! loopback with kube's mock API server behind it, a real gRPC agent stream
//! sending a critical detection for a pod. The agent gets its in-kernel
//! Block and, at the same time, the API server sees the lockdown (read pod,
//! apply NetworkPolicy, label, Event); the outcome lands in the timeline.
//! A responder's release undoes both. Dry-run and protected namespaces make
//! no API write at all.

mod support;

use std::{pin::Pin, time::Duration};

use exfilguard_controller::{
    correlate::ResponsePolicy,
    k8s::FIELD_MANAGER,
    server::{self, KubeDuties, ServerConfig},
};
use exfilguard_proto::v1::{
    GetIncidentRequest, Incident, PolicyAction, ReleaseIncidentRequest, Workload,
    controller_message, incidents_client::IncidentsClient,
};
use kube::{Client, client::Body};
use serde_json::{Value, json};
use support::{
    agent::TestAgent,
    kube_mock::{Expect, Handle, answer_unordered, expect, no_request_but, ok},
    kube_real::{TestNamespace, real_cluster, web_pod},
};
use tokio::sync::oneshot;
use tonic::{
    codegen::http::{Method, Request, Response, StatusCode},
    transport::Channel,
};
use tower_test::mock;

const WAIT: Duration = Duration::from_secs(20);
const POD: &str = "checkout-7d4b9c8f6-x2x9z";
const UID: &str = "6f1c2b9e-6a49-4d0c-9a57-1b2f0c3d4e5f";
const CGROUP: &str = "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod6f1c2b9e_6a49_4d0c_9a57_1b2f0c3d4e5f.slice/cri-containerd-0123.scope";

/// The controller in this process, plain text on 127.0.0.1, with the mock
/// API server as its Kubernetes; stopped on drop.
struct Stack {
    channel: Channel,
    api: Pin<Box<Handle>>,
    stop: Option<oneshot::Sender<()>>,
    _dir: tempfile::TempDir,
}

impl Stack {
    async fn start(critical: PolicyAction) -> Stack {
        let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
        Self::with_client(critical, Client::new(svc, "default"), handle).await
    }

    /// With `client` as its Kubernetes; `api` is the mock's handle (unused
    /// against a real API server).
    async fn with_client(critical: PolicyAction, client: Client, api: Handle) -> Stack {
        let dir = tempfile::tempdir().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let config = ServerConfig {
            policy: ResponsePolicy {
                critical,
                ..Default::default()
            },
            kube: Some(client),
            duties: KubeDuties {
                exfilpolicies: false,
                incidents: false,
                ..Default::default()
            },
            ..ServerConfig::new(dir.path().join("c.db"), None)
        };
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            server::serve(config, listener, async {
                let _ = stopped.await;
            })
            .await
            .expect("serve");
        });
        let channel = support::agent::channel(addr).await;
        Stack {
            channel,
            api: Box::pin(api),
            stop: Some(stop),
            _dir: dir,
        }
    }

    async fn incident(&self, id: &str) -> Incident {
        IncidentsClient::new(self.channel.clone())
            .get_incident(GetIncidentRequest { id: id.into() })
            .await
            .unwrap()
            .into_inner()
    }

    /// The id of the first incident, once there is one (for responses that
    /// send the agent nothing to learn it from).
    async fn first_incident(&self) -> String {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let list = IncidentsClient::new(self.channel.clone())
                .list_incidents(exfilguard_proto::v1::ListIncidentsRequest::default())
                .await
                .unwrap()
                .into_inner();
            if let Some(i) = list.incidents.first() {
                return i.id.clone();
            }
            assert!(tokio::time::Instant::now() < deadline, "no incident opened");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the incident's timeline has an entry containing `text`.
    async fn timeline_entry(&self, id: &str, text: &str) -> String {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let incident = self.incident(id).await;
            if let Some(e) = incident.timeline.iter().find(|e| e.cause.contains(text)) {
                return e.cause.clone();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no timeline entry with {text:?}: {:#?}",
                incident.timeline
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The test workload's pod in `namespace` (cgroup id 42).
fn workload(namespace: &str, pod: &str, cgroup_path: &str) -> Workload {
    Workload {
        namespace: namespace.into(),
        pod: pod.into(),
        cgroup_id: 42,
        cgroup_path: cgroup_path.into(),
        ..Default::default()
    }
}

/// The id of the incident the agent's next command, a Block of cgroup 42,
/// is for.
async fn blocked(agent: &mut TestAgent) -> String {
    let b = agent.block().await;
    assert_eq!(b.cgroup_id, 42);
    b.incident_id
}

fn pod_path(ns: &str) -> String {
    format!("/api/v1/namespaces/{ns}/pods/{POD}")
}

fn policy_path(ns: &str) -> String {
    format!("/apis/networking.k8s.io/v1/namespaces/{ns}/networkpolicies/exfilguard-lockdown-{POD}")
}

fn pod(ns: &str, labels: Value, rv: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": POD, "namespace": ns, "uid": UID, "resourceVersion": rv, "labels": labels},
        "spec": {"containers": [{"name": "app", "image": "shop/checkout:2.1"}]},
    })
}

fn event(ns: &str, reason: &'static str, incident: String) -> Expect {
    expect(Method::POST, &format!("/apis/events.k8s.io/v1/namespaces/{ns}/events"))
        .query(&[("fieldManager", FIELD_MANAGER)])
        .body("application/json", move |ev| {
            assert_eq!(ev["reason"], reason);
            assert_eq!(ev["regarding"]["uid"], UID);
            assert!(ev["note"].as_str().unwrap().contains(&incident), "{ev}");
        })
        .reply((StatusCode::CREATED, json!({"apiVersion": "events.k8s.io/v1", "kind": "Event",
            "metadata": {"name": "x", "namespace": ns}, "eventTime": "2026-11-23T11:15:00.000000Z"})))
}

/// The evidence capture's list of the pod's Events (its other request, the
/// pod read, is the same as the lockdown's and is in the scripts).
fn capture(req: &Request<Body>) -> Option<(StatusCode, Value)> {
    (req.method() == Method::GET && req.uri().path().ends_with("/events"))
        .then(|| ok(json!({"apiVersion": "v1", "kind": "EventList", "metadata": {}, "items": []})))
}

/// `capture`, and the capture's read of the pod too (where the test does
/// not expect one of its own).
fn capture_and_pod(ns: &'static str) -> impl Fn(&Request<Body>) -> Option<(StatusCode, Value)> {
    move |req| {
        capture(req).or_else(|| {
            (req.method() == Method::GET && req.uri().path() == pod_path(ns))
                .then(|| ok(pod(ns, json!({"app": "checkout"}), "41")))
        })
    }
}

fn lockdown_script(ns: &str, incident: &str) -> Vec<Expect> {
    let (i1, i2, i3) = (
        incident.to_owned(),
        incident.to_owned(),
        incident.to_owned(),
    );
    vec![
        expect(Method::GET, &pod_path(ns)).reply(ok(pod(ns, json!({"app": "checkout"}), "41"))),
        // The evidence capture reads the pod too.
        expect(Method::GET, &pod_path(ns)).reply(ok(pod(ns, json!({"app": "checkout"}), "41"))),
        expect(Method::PATCH, &policy_path(ns))
            .query(&[("fieldManager", FIELD_MANAGER), ("force", "true")])
            .body("application/apply-patch+yaml", move |np| {
                // Exactly the incident's pod, by the quarantine label; nothing allowed out.
                assert_eq!(
                    np["spec"],
                    json!({"podSelector": {"matchLabels": {"exfilguard.io/quarantine": i1}},
                           "policyTypes": ["Egress"], "egress": []})
                );
                assert_eq!(np["metadata"]["ownerReferences"][0]["uid"], UID);
            })
            .reply(ok(json!({}))),
        expect(Method::PATCH, &pod_path(ns))
            .query(&[("fieldManager", FIELD_MANAGER)])
            .body("application/merge-patch+json", move |b| {
                assert_eq!(
                    b,
                    json!({"metadata": {"uid": UID, "labels": {"exfilguard.io/quarantine": i2}}})
                )
            })
            .reply(ok(pod(
                ns,
                json!({"exfilguard.io/quarantine": incident}),
                "42",
            ))),
        event(ns, "ExfilguardLockdown", i3),
    ]
}

#[tokio::test]
async fn lockdown_reaches_agent_and_api_and_release_undoes_both() {
    let mut stack = Stack::start(PolicyAction::Lockdown).await;
    let mut agent = TestAgent::connect(stack.channel.clone(), "n1").await;
    agent.detect(1, workload("shop", POD, CGROUP)).await;
    let id = blocked(&mut agent).await;
    answer_unordered(&mut stack.api, lockdown_script("shop", &id), &capture).await;
    let entry = stack.timeline_entry(&id, "kubernetes lockdown").await;
    assert_eq!(
        entry,
        format!(
            "kubernetes lockdown: NetworkPolicy shop/exfilguard-lockdown-{POD} applied (egress denied), \
             pod shop/{POD} labelled exfilguard.io/quarantine={id}; Event recorded on the pod"
        )
    );
    // A second detection of the same episode contains nothing again.
    agent.detect(2, workload("shop", POD, CGROUP)).await;
    no_request_but(&mut stack.api, Duration::from_millis(500), &capture).await;

    IncidentsClient::new(stack.channel.clone())
        .release_incident(ReleaseIncidentRequest {
            id: id.clone(),
            reason: "false positive: nightly backup".into(),
        })
        .await
        .unwrap();
    match agent.command().await {
        controller_message::Payload::Unblock(u) => assert_eq!(u.incident_id, id),
        other => panic!("expected an Unblock, got {other:?}"),
    }
    let labelled = json!({"app": "checkout", "exfilguard.io/quarantine": id});
    answer_unordered(
        &mut stack.api,
        vec![
            expect(Method::GET, &pod_path("shop")).reply(ok(pod("shop", labelled, "50"))),
            expect(Method::PATCH, &pod_path("shop"))
                .query(&[("fieldManager", FIELD_MANAGER)])
                .body("application/merge-patch+json", |b| {
                    assert_eq!(
                        b["metadata"]["labels"],
                        json!({"exfilguard.io/quarantine": null})
                    )
                })
                .reply(ok(pod("shop", json!({"app": "checkout"}), "51"))),
            expect(Method::GET, &policy_path("shop")).reply(ok(json!({
                "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": {"name": format!("exfilguard-lockdown-{POD}"), "namespace": "shop",
                    "uid": "np-1", "resourceVersion": "77",
                    "labels": {"exfilguard.io/incident": id}},
                "spec": {"podSelector": {}},
            }))),
            expect(Method::DELETE, &policy_path("shop"))
                .body("application/json", |b| {
                    assert_eq!(
                        b["preconditions"],
                        json!({"uid": "np-1", "resourceVersion": "77"})
                    )
                })
                .reply(ok(
                    json!({"kind": "Status", "apiVersion": "v1", "status": "Success",
                    "metadata": {}, "code": 200}),
                )),
            event("shop", "ExfilguardRelease", id.clone()),
        ],
        &capture,
    )
    .await;
    let entry = stack.timeline_entry(&id, "kubernetes release").await;
    assert_eq!(
        entry,
        format!(
            "kubernetes release of pod shop/{POD}: quarantine label removed, NetworkPolicy deleted"
        )
    );
    no_request_but(&mut stack.api, Duration::from_millis(300), &capture).await;
}

#[tokio::test]
async fn api_outage_is_retried_then_recorded() {
    let mut stack = Stack::start(PolicyAction::Lockdown).await;
    let channel = stack.channel.clone();
    let mut agent = TestAgent::connect(stack.channel.clone(), "n1").await;
    agent.detect(1, workload("shop", POD, CGROUP)).await;
    let id = blocked(&mut agent).await;
    // Every read fails (the evidence capture's too); the lockdown tries four
    // times (0.5 + 1 + 2 s apart), then the timeline says so; the in-kernel
    // Block was sent regardless.
    let down = |req: &Request<Body>| {
        (req.method() == Method::GET)
            .then(|| support::kube_mock::status(503, "ServiceUnavailable", "etcd is down"))
    };
    {
        let api = &mut stack.api;
        let serving = async { no_request_but(api, Duration::from_secs(15), &down).await };
        tokio::pin!(serving);
        tokio::select! {
            _ = &mut serving => panic!("no timeline entry within 15 s"),
            _ = async {
                loop {
                    let incident = IncidentsClient::new(channel.clone())
                        .get_incident(GetIncidentRequest { id: id.clone() })
                        .await
                        .unwrap()
                        .into_inner();
                    if incident.timeline.iter().any(|e| e.cause.contains("failed after")) {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            } => {}
        }
    }
    let entry = stack.timeline_entry(&id, "failed after").await;
    assert!(
        entry.starts_with(&format!(
            "kubernetes lockdown of pod shop/{POD} failed after 4 attempt(s)"
        )) && entry.contains("etcd is down")
            && entry.contains(&format!(
                "kubectl -n shop label pod {POD} exfilguard.io/quarantine={id}"
            )),
        "{entry}"
    );
}

#[tokio::test]
async fn dry_run_records_the_plan_and_writes_nothing() {
    let mut stack = Stack::start(PolicyAction::DryRun).await;
    let agent = TestAgent::connect(stack.channel.clone(), "n1").await;
    agent.detect(1, workload("shop", POD, CGROUP)).await;
    // No Block, no API call: find the incident by listing.
    let id = stack.first_incident().await;
    let entry = stack.timeline_entry(&id, "dry-run: kubernetes").await;
    assert_eq!(
        entry,
        format!(
            "dry-run: kubernetes lockdown would apply NetworkPolicy shop/exfilguard-lockdown-{POD} \
             (egress denied); label pod shop/{POD} exfilguard.io/quarantine={id}; \
             record Event ExfilguardLockdown on pod shop/{POD}"
        )
    );
    assert_eq!(stack.incident(&id).await.state, 1, "stays open");
    no_request_but(
        &mut stack.api,
        Duration::from_millis(500),
        &capture_and_pod("shop"),
    )
    .await;
}

#[tokio::test]
async fn protected_namespace_is_left_alone_and_says_so() {
    let mut stack = Stack::start(PolicyAction::Lockdown).await;
    let agent = TestAgent::connect(stack.channel.clone(), "n1").await;
    agent.detect(1, workload("kube-system", POD, CGROUP)).await;
    let id = stack.first_incident().await;
    stack
        .timeline_entry(
            &id,
            "lockdown refused: namespace kube-system is on the protected list",
        )
        .await;
    assert_eq!(stack.incident(&id).await.state, 1, "stays open");
    no_request_but(
        &mut stack.api,
        Duration::from_millis(500),
        &capture_and_pod("kube-system"),
    )
    .await;
}

/// The same flow against a real API server when `KUBECONFIG` is set: the
/// pod gets the label and its own NetworkPolicy, a replica with the same
/// app label is untouched, and the release removes both.
#[tokio::test]
async fn real_cluster_incident_lockdown_then_release() {
    use k8s_openapi::api::{core::v1::Pod, networking::v1::NetworkPolicy};
    let Some(client) = real_cluster("real_cluster_incident_lockdown_then_release").await else {
        return;
    };
    let ns = TestNamespace::create(&client).await;
    let pods = kube::Api::<Pod>::namespaced(client.clone(), &ns.name);
    let policies = kube::Api::<NetworkPolicy>::namespaced(client.clone(), &ns.name);
    let web = pods
        .create(&Default::default(), &web_pod("web-0"))
        .await
        .unwrap();
    pods.create(&Default::default(), &web_pod("web-1"))
        .await
        .unwrap();
    let uid = web.metadata.uid.clone().unwrap();
    let cgroup = format!("kubepods/burstable/pod{uid}/0123abcd");

    let (_unused, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let stack = Stack::with_client(PolicyAction::Lockdown, client.clone(), handle).await;
    let mut agent = TestAgent::connect(stack.channel.clone(), "n1").await;
    agent.detect(1, workload(&ns.name, "web-0", &cgroup)).await;
    let id = blocked(&mut agent).await;
    stack
        .timeline_entry(&id, "kubernetes lockdown: NetworkPolicy")
        .await;
    let labels = |p: &Pod| p.metadata.labels.clone().unwrap_or_default();
    let web0 = pods.get("web-0").await.unwrap();
    assert_eq!(labels(&web0).get("exfilguard.io/quarantine"), Some(&id));
    assert!(!labels(&pods.get("web-1").await.unwrap()).contains_key("exfilguard.io/quarantine"));
    let np = policies.get("exfilguard-lockdown-web-0").await.unwrap();
    assert_eq!(np.metadata.owner_references.unwrap()[0].uid, uid);

    IncidentsClient::new(stack.channel.clone())
        .release_incident(ReleaseIncidentRequest {
            id: id.clone(),
            reason: "test over".into(),
        })
        .await
        .unwrap();
    stack.timeline_entry(&id, "kubernetes release of pod").await;
    assert!(!labels(&pods.get("web-0").await.unwrap()).contains_key("exfilguard.io/quarantine"));
    assert!(
        policies
            .get_opt("exfilguard-lockdown-web-0")
            .await
            .unwrap()
            .is_none()
    );
}
