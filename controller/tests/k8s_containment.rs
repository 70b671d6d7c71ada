//! Containment against kube's mock API server (`tower-test`): every request
//! the controller makes for a lockdown and a release, in order, with method,
//! path, query (field manager, force), content type and body; and nothing
//! else. The last test runs the same lockdown → release flow against a real
//! API server when `KUBECONFIG` is set.
mod support;

use std::time::Duration;

use exfilguard_controller::k8s::{
    Containment, ContainmentConfig, DnsEndpoint, FIELD_MANAGER, LockdownOptions, LockdownOutcome,
    PlannedAction, PodRef, ReleaseOutcome, ReleaseRequest,
};
use kube::{Client, client::Body};
use serde_json::{Value, json};
use support::{
    kube_mock::{Expect, Handle, expect, ok, serve, status},
    kube_real::{TestNamespace, real_cluster, web_pod},
};
use tonic::codegen::http::{Method, Request, Response, StatusCode};
use tower_test::mock;

const NS: &str = "shop";
const POD: &str = "checkout-7d4b9c8f6-x2x9z";
const UID: &str = "6f1c2b9e-6a49-4d0c-9a57-1b2f0c3d4e5f";
const INCIDENT: &str = "EXFIL-20261123-111500-ab12";
const POLICY: &str = "exfilguard-lockdown-checkout-7d4b9c8f6-x2x9z";

fn pod_ref() -> PodRef {
    PodRef {
        namespace: NS.into(),
        name: POD.into(),
        uid: Some(UID.into()),
    }
}

fn config() -> ContainmentConfig {
    ContainmentConfig {
        reporting_instance: "exfilguard-controller-0".into(),
        ..Default::default()
    }
}

fn pod(labels: Value, rv: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": POD, "namespace": NS, "uid": UID, "resourceVersion": rv,
            "labels": labels},
        "spec": {"containers": [{"name": "app", "image": "shop/checkout:2.1"}]},
    })
}

fn containment() -> (Containment, Handle) {
    let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
    (
        Containment::new(Client::new(svc, "default"), config()),
        handle,
    )
}

fn pod_path() -> String {
    format!("/api/v1/namespaces/{NS}/pods/{POD}")
}
fn policy_path() -> String {
    format!("/apis/networking.k8s.io/v1/namespaces/{NS}/networkpolicies/{POLICY}")
}
fn events_path() -> String {
    format!("/apis/events.k8s.io/v1/namespaces/{NS}/events")
}

fn expected_policy(egress: Value) -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": POLICY,
            "namespace": NS,
            "labels": {"app.kubernetes.io/managed-by": "exfilguard", "exfilguard.io/incident": INCIDENT},
            "ownerReferences": [{"apiVersion": "v1", "kind": "Pod", "name": POD, "uid": UID}],
        },
        "spec": {
            "podSelector": {"matchLabels": {"exfilguard.io/quarantine": INCIDENT}},
            "policyTypes": ["Egress"],
            "egress": egress,
        },
    })
}

fn check_event(
    reason: &'static str,
    type_: &'static str,
    note_has: Vec<&'static str>,
) -> impl FnOnce(Value) + Send {
    move |ev: Value| {
        assert_eq!(ev["apiVersion"], "events.k8s.io/v1");
        assert_eq!(ev["kind"], "Event");
        assert_eq!(ev["metadata"]["namespace"], NS);
        let name = ev["metadata"]["name"].as_str().unwrap();
        assert!(name.starts_with(&format!("{POD}.exfilguard-")), "{name}");
        assert!(name.ends_with(&INCIDENT.to_lowercase()), "{name}");
        assert_eq!(ev["reason"], reason);
        assert_eq!(ev["type"], type_);
        assert_eq!(
            ev["regarding"],
            json!({"apiVersion": "v1", "kind": "Pod", "name": POD, "namespace": NS, "uid": UID})
        );
        assert_eq!(ev["reportingController"], "exfilguard.io/controller");
        assert_eq!(ev["reportingInstance"], "exfilguard-controller-0");
        assert!(
            ev["eventTime"].as_str().is_some_and(|t| t.ends_with('Z')),
            "{ev}"
        );
        let note = ev["note"].as_str().unwrap();
        for s in note_has {
            assert!(note.contains(s), "{s:?} not in note {note:?}");
        }
    }
}

/// The lockdown script up to the Event: read, apply policy, label.
fn lockdown_script(egress: Value, existing_labels: Value) -> Vec<Expect> {
    let want_policy = expected_policy(egress);
    vec![
        expect(Method::GET, &pod_path()).reply(ok(pod(existing_labels, "41"))),
        expect(Method::PATCH, &policy_path())
            .query(&[("fieldManager", FIELD_MANAGER), ("force", "true")])
            .body("application/apply-patch+yaml", move |b| assert_eq!(b, want_policy))
            .reply(ok(expected_policy(json!([])))),
        expect(Method::PATCH, &pod_path())
            .query(&[("fieldManager", FIELD_MANAGER)])
            .body("application/merge-patch+json", |b| {
                assert_eq!(
                    b,
                    json!({"metadata": {"uid": UID, "labels": {"exfilguard.io/quarantine": INCIDENT}}})
                )
            })
            .reply(ok(pod(json!({"exfilguard.io/quarantine": INCIDENT}), "42"))),
    ]
}

fn event_expect(reason: &'static str, type_: &'static str, note_has: Vec<&'static str>) -> Expect {
    expect(Method::POST, &events_path())
        .query(&[("fieldManager", FIELD_MANAGER)])
        .body("application/json", check_event(reason, type_, note_has))
        .reply((StatusCode::CREATED, json!({"apiVersion": "events.k8s.io/v1", "kind": "Event",
            "metadata": {"name": "x", "namespace": NS}, "eventTime": "2026-11-23T11:15:00.000000Z"})))
}

#[tokio::test]
async fn lockdown_applies_policy_labels_pod_and_records_event() {
    let (c, handle) = containment();
    let mut script = lockdown_script(json!([]), json!({"app": "checkout"}));
    script.push(event_expect(
        "ExfilguardLockdown",
        "Warning",
        vec![INCIDENT, POLICY, "egress kept: none"],
    ));
    let server = serve(handle, script);
    let out = c
        .lockdown(&pod_ref(), INCIDENT, &LockdownOptions::default())
        .await
        .unwrap();
    assert_eq!(
        out,
        LockdownOutcome::Contained {
            network_policy: POLICY.into(),
            pod_uid: UID.into(),
            replaced_incident: None,
            event_recorded: true,
        }
    );
    drop(c);
    server.await.unwrap();
}

#[tokio::test]
async fn lockdown_keeps_only_what_options_keep() {
    let (c, handle) = containment();
    let egress = json!([
        {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                 "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
         "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]},
        {"to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}]},
    ]);
    let mut script = lockdown_script(egress, json!({"exfilguard.io/quarantine": "EXFIL-OLD"}));
    // A retried lockdown: the Event of the first attempt is already there.
    script.push(
        event_expect(
            "ExfilguardLockdown",
            "Warning",
            vec!["DNS to kube-system, 10.20.0.0/16"],
        )
        .reply(status(409, "AlreadyExists", "events already exists")),
    );
    let server = serve(handle, script);
    let options = LockdownOptions {
        dry_run: false,
        allow_dns: Some(DnsEndpoint::kube_dns()),
        allow_cidrs: vec!["10.20.0.0/16".into()],
    };
    let out = c.lockdown(&pod_ref(), INCIDENT, &options).await.unwrap();
    let LockdownOutcome::Contained {
        replaced_incident,
        event_recorded,
        ..
    } = out
    else {
        panic!("{out:?}")
    };
    assert_eq!(replaced_incident.as_deref(), Some("EXFIL-OLD"));
    assert!(event_recorded, "409 on the Event is a retry's success");
    drop(c);
    server.await.unwrap();
}

#[tokio::test]
async fn event_failure_does_not_undo_containment() {
    let (c, handle) = containment();
    let mut script = lockdown_script(json!([]), json!({}));
    script.push(
        event_expect("ExfilguardLockdown", "Warning", vec![]).reply(status(
            403,
            "Forbidden",
            "events is forbidden",
        )),
    );
    let server = serve(handle, script);
    let out = c
        .lockdown(&pod_ref(), INCIDENT, &LockdownOptions::default())
        .await
        .unwrap();
    assert!(
        matches!(
            out,
            LockdownOutcome::Contained {
                event_recorded: false,
                ..
            }
        ),
        "{out:?}"
    );
    drop(c);
    server.await.unwrap();
}

#[tokio::test]
async fn pod_gone_is_an_outcome_with_one_request() {
    let (c, handle) = containment();
    let server = serve(
        handle,
        vec![expect(Method::GET, &pod_path()).reply(status(404, "NotFound", "pods not found"))],
    );
    let out = c
        .lockdown(&pod_ref(), INCIDENT, &LockdownOptions::default())
        .await
        .unwrap();
    assert!(matches!(out, LockdownOutcome::PodGone { .. }), "{out:?}");
    drop(c);
    server.await.unwrap();
}

#[tokio::test]
async fn a_new_pod_with_the_same_name_is_left_alone() {
    let (c, handle) = containment();
    let mut other = pod(json!({}), "5");
    other["metadata"]["uid"] = json!("00000000-0000-0000-0000-000000000000");
    let server = serve(
        handle,
        vec![expect(Method::GET, &pod_path()).reply(ok(other))],
    );
    let out = c
        .lockdown(&pod_ref(), INCIDENT, &LockdownOptions::default())
        .await
        .unwrap();
    let LockdownOutcome::PodGone { detail } = out else {
        panic!("{out:?}")
    };
    assert!(detail.contains("00000000-0000"), "{detail}");
    drop(c);
    server.await.unwrap();
}

#[tokio::test]
async fn pod_deleted_between_read_and_label() {
    let (c, handle) = containment();
    let mut script = lockdown_script(json!([]), json!({}));
    let last = script.pop().unwrap();
    script.push(last.reply(status(404, "NotFound", "pods not found")));
    let server = serve(handle, script);
    let out = c
        .lockdown(&pod_ref(), INCIDENT, &LockdownOptions::default())
        .await
        .unwrap();
    assert!(matches!(out, LockdownOutcome::PodGone { .. }), "{out:?}");
    drop(c);
    server.await.unwrap();
}

#[tokio::test]
async fn protected_namespace_makes_no_request() {
    let (c, handle) = containment();
    let server = serve(handle, vec![]);
    let mut p = pod_ref();
    p.namespace = "kube-system".into();
    let out = c
        .lockdown(&p, INCIDENT, &LockdownOptions::default())
        .await
        .unwrap();
    assert_eq!(
        out,
        LockdownOutcome::ProtectedNamespace {
            namespace: "kube-system".into()
        }
    );
    drop(c);
    server.await.unwrap();
}

#[tokio::test]
async fn dry_run_plans_without_calling_the_api() {
    let (c, handle) = containment();
    let server = serve(handle, vec![]);
    let options = LockdownOptions {
        dry_run: true,
        ..Default::default()
    };
    let out = c.lockdown(&pod_ref(), INCIDENT, &options).await.unwrap();
    let LockdownOutcome::DryRun { actions } = out else {
        panic!("{out:?}")
    };
    assert_eq!(actions.len(), 3);
    match &actions[0] {
        PlannedAction::ApplyNetworkPolicy { name, object, .. } => {
            assert_eq!(name, POLICY);
            assert_eq!(*object, expected_policy(json!([])));
        }
        a => panic!("{a:?}"),
    }
    assert!(matches!(&actions[1], PlannedAction::LabelPod { value, .. } if value == INCIDENT));
    assert!(
        matches!(&actions[2], PlannedAction::RecordEvent { reason, .. } if reason == "ExfilguardLockdown")
    );
    // A release dry run likewise.
    let out = c
        .release(
            &pod_ref(),
            INCIDENT,
            &ReleaseRequest {
                dry_run: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(
        matches!(out, ReleaseOutcome::DryRun { ref actions } if actions.len() == 3),
        "{out:?}"
    );
    drop(c);
    server.await.unwrap();
}

#[tokio::test]
async fn bad_input_is_an_error_before_any_request() {
    let (c, handle) = containment();
    let server = serve(handle, vec![]);
    let e = c
        .lockdown(&pod_ref(), "not a label value", &LockdownOptions::default())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("incident id"), "{e}");
    let mut p = pod_ref();
    p.name = "../../secrets".into();
    let e = c
        .lockdown(&p, INCIDENT, &LockdownOptions::default())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("pod name"), "{e}");
    drop(c);
    server.await.unwrap();
}

fn release_request() -> ReleaseRequest {
    ReleaseRequest {
        by: "alice@sec".into(),
        reason: "false positive: nightly backup".into(),
        dry_run: false,
    }
}

fn policy_object(incident: &str) -> Value {
    let mut p = expected_policy(json!([]));
    p["metadata"]["labels"]["exfilguard.io/incident"] = json!(incident);
    p["metadata"]["uid"] = json!("np-uid-1");
    p["metadata"]["resourceVersion"] = json!("77");
    p
}

fn unlabel(rv: &'static str) -> Expect {
    expect(Method::PATCH, &pod_path())
        .query(&[("fieldManager", FIELD_MANAGER)])
        .body("application/merge-patch+json", move |b| {
            assert_eq!(
                b,
                json!({"metadata": {"uid": UID, "resourceVersion": rv,
                    "labels": {"exfilguard.io/quarantine": null}}})
            )
        })
}

#[tokio::test]
async fn release_removes_label_and_policy_and_says_who() {
    let (c, handle) = containment();
    let server = serve(
        handle,
        vec![
            expect(Method::GET, &pod_path()).reply(ok(pod(
                json!({"app": "checkout", "exfilguard.io/quarantine": INCIDENT}),
                "50",
            ))),
            unlabel("50").reply(ok(pod(json!({"app": "checkout"}), "51"))),
            expect(Method::GET, &policy_path()).reply(ok(policy_object(INCIDENT))),
            expect(Method::DELETE, &policy_path())
                .body("application/json", |b| {
                    assert_eq!(
                        b["preconditions"],
                        json!({"uid": "np-uid-1", "resourceVersion": "77"})
                    )
                })
                .reply(ok(
                    json!({"kind": "Status", "apiVersion": "v1", "status": "Success",
                    "metadata": {}, "code": 200}),
                )),
            event_expect(
                "ExfilguardRelease",
                "Normal",
                vec![
                    INCIDENT,
                    "released by alice@sec",
                    "false positive: nightly backup",
                ],
            ),
        ],
    );
    let out = c
        .release(&pod_ref(), INCIDENT, &release_request())
        .await
        .unwrap();
    assert_eq!(
        out,
        ReleaseOutcome::Released {
            label_removed: true,
            network_policy_deleted: true,
            event_recorded: true,
            still_held_by: None,
        }
    );
    drop(c);
    server.await.unwrap();
}

#[tokio::test]
async fn release_retries_when_the_pod_changed_under_it() {
    let (c, handle) = containment();
    let labelled = || json!({"exfilguard.io/quarantine": INCIDENT});
    let server = serve(
        handle,
        vec![
            expect(Method::GET, &pod_path()).reply(ok(pod(labelled(), "60"))),
            unlabel("60").reply(status(409, "Conflict", "the object has been modified")),
            expect(Method::GET, &pod_path()).reply(ok(pod(labelled(), "61"))),
            unlabel("61").reply(ok(pod(json!({}), "62"))),
            expect(Method::GET, &policy_path()).reply(status(404, "NotFound", "gone")),
            event_expect("ExfilguardRelease", "Normal", vec!["alice@sec"]),
        ],
    );
    let out = c
        .release(&pod_ref(), INCIDENT, &release_request())
        .await
        .unwrap();
    assert!(
        matches!(
            out,
            ReleaseOutcome::Released {
                label_removed: true,
                network_policy_deleted: false,
                ..
            }
        ),
        "{out:?}"
    );
    drop(c);
    server.await.unwrap();
}

#[tokio::test]
async fn release_leaves_another_incidents_containment_alone() {
    let (c, handle) = containment();
    let server = serve(
        handle,
        vec![
            expect(Method::GET, &pod_path()).reply(ok(pod(
                json!({"exfilguard.io/quarantine": "EXFIL-NEWER"}),
                "70",
            ))),
            expect(Method::GET, &policy_path()).reply(ok(policy_object("EXFIL-NEWER"))),
        ],
    );
    let out = c
        .release(&pod_ref(), INCIDENT, &release_request())
        .await
        .unwrap();
    assert_eq!(
        out,
        ReleaseOutcome::Released {
            label_removed: false,
            network_policy_deleted: false,
            event_recorded: false,
            still_held_by: Some("EXFIL-NEWER".into()),
        }
    );
    drop(c);
    server.await.unwrap();
}

#[tokio::test]
async fn release_of_a_gone_pod() {
    let (c, handle) = containment();
    let server = serve(
        handle,
        vec![expect(Method::GET, &pod_path()).reply(status(404, "NotFound", "pods not found"))],
    );
    let out = c
        .release(&pod_ref(), INCIDENT, &release_request())
        .await
        .unwrap();
    assert!(matches!(out, ReleaseOutcome::PodGone { .. }), "{out:?}");
    drop(c);
    server.await.unwrap();
}

#[tokio::test]
async fn api_errors_are_errors_with_the_operation() {
    let (c, handle) = containment();
    let server = serve(
        handle,
        vec![
            expect(Method::GET, &pod_path()).reply(ok(pod(json!({}), "1"))),
            expect(Method::PATCH, &policy_path())
                .query(&[("fieldManager", FIELD_MANAGER), ("force", "true")])
                .body("application/apply-patch+yaml", |_| {})
                .reply(status(403, "Forbidden", "networkpolicies is forbidden")),
        ],
    );
    let e = c
        .lockdown(&pod_ref(), INCIDENT, &LockdownOptions::default())
        .await
        .unwrap_err();
    assert_eq!(e.label(), "api");
    assert!(e.to_string().contains("apply networkpolicy"), "{e}");
    drop(c);
    server.await.unwrap();
}

#[tokio::test]
async fn real_cluster_lockdown_then_release() {
    use k8s_openapi::api::{core::v1::Pod, events::v1::Event, networking::v1::NetworkPolicy};
    let Some(client) = real_cluster("real_cluster_lockdown_then_release").await else {
        return;
    };
    let ns = TestNamespace::create(&client).await;
    let pods = kube::Api::<Pod>::namespaced(client.clone(), &ns.name);
    let web = pods
        .create(&Default::default(), &web_pod("web-0"))
        .await
        .unwrap();
    // A replica with the same app label: containment must not touch it.
    pods.create(&Default::default(), &web_pod("web-1"))
        .await
        .unwrap();
    let uid = web.metadata.uid.clone().unwrap();
    let target = PodRef {
        namespace: ns.name.clone(),
        name: "web-0".into(),
        uid: Some(uid.clone()),
    };
    let c = Containment::new(client.clone(), ContainmentConfig::default());
    let options = LockdownOptions {
        allow_dns: Some(DnsEndpoint::kube_dns()),
        ..Default::default()
    };

    for attempt in 0..2 {
        let out = c.lockdown(&target, INCIDENT, &options).await.unwrap();
        assert!(
            matches!(&out, LockdownOutcome::Contained { pod_uid, event_recorded: true, .. } if *pod_uid == uid),
            "attempt {attempt}: {out:?}"
        );
    }
    let np = kube::Api::<NetworkPolicy>::namespaced(client.clone(), &ns.name)
        .get("exfilguard-lockdown-web-0")
        .await
        .unwrap();
    let owner = &np.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str()),
        ("Pod", uid.as_str())
    );
    let spec = np.spec.unwrap();
    assert_eq!(spec.policy_types, Some(vec!["Egress".into()]));
    assert_eq!(
        spec.pod_selector.unwrap().match_labels.unwrap()["exfilguard.io/quarantine"],
        INCIDENT
    );
    let labels = |p: Pod| p.metadata.labels.unwrap_or_default();
    assert_eq!(
        labels(pods.get("web-0").await.unwrap())["exfilguard.io/quarantine"],
        INCIDENT
    );
    assert!(
        !labels(pods.get("web-1").await.unwrap()).contains_key("exfilguard.io/quarantine"),
        "the other replica is untouched"
    );
    let events = kube::Api::<Event>::namespaced(client.clone(), &ns.name);
    let reasons =
        |list: Vec<Event>| -> Vec<String> { list.into_iter().filter_map(|e| e.reason).collect() };
    let got = reasons(events.list(&Default::default()).await.unwrap().items);
    assert_eq!(
        got.iter().filter(|r| *r == "ExfilguardLockdown").count(),
        1,
        "one Event for two attempts: {got:?}"
    );

    let out = c
        .release(&target, INCIDENT, &release_request())
        .await
        .unwrap();
    assert_eq!(
        out,
        ReleaseOutcome::Released {
            label_removed: true,
            network_policy_deleted: true,
            event_recorded: true,
            still_held_by: None,
        }
    );
    assert!(!labels(pods.get("web-0").await.unwrap()).contains_key("exfilguard.io/quarantine"));
    assert!(
        kube::Api::<NetworkPolicy>::namespaced(client.clone(), &ns.name)
            .get_opt("exfilguard-lockdown-web-0")
            .await
            .unwrap()
            .is_none()
    );
    let got = events.list(&Default::default()).await.unwrap().items;
    let release = got
        .iter()
        .find(|e| e.reason.as_deref() == Some("ExfilguardRelease"))
        .expect("release Event");
    assert!(
        release
            .note
            .as_deref()
            .unwrap()
            .contains("released by alice@sec")
    );

    // Protected namespace: refused without touching anything.
    let sys = PodRef {
        namespace: "kube-system".into(),
        name: "coredns-0".into(),
        uid: None,
    };
    assert!(matches!(
        c.lockdown(&sys, INCIDENT, &options).await.unwrap(),
        LockdownOutcome::ProtectedNamespace { .. }
    ));
    // Gone pod.
    pods.delete("web-0", &kube::api::DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    for _ in 0..100 {
        if pods.get_opt("web-0").await.unwrap().is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(matches!(
        c.lockdown(&target, INCIDENT, &options).await.unwrap(),
        LockdownOutcome::PodGone { .. }
    ));
    drop(ns);
}
