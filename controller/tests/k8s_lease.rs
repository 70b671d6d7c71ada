//! Leader election on a coordination.k8s.io Lease against kube's mock API
//! server (`tower-test`): the exact requests for acquiring a missing lease,
//! renewing, losing it on a conflict, waiting on a live one, taking over an
//! expired one, stepping down when renewals fail, and releasing at shutdown.
//! Then two electors answered from one shared in-test Lease with the API
//! server's concurrency rules (resourceVersion, 409s): failover after a
//! crash and after a graceful shutdown, timed, never two leaders at once.
//! Then the gating of a leader-only duty (alert dispatch, with a real HTTP
//! sink on 127.0.0.1; the responder's sweep on gaining leadership, against
//! the mock API). The last test runs against a real API server when
//! `KUBECONFIG` is set.
mod support;

use std::{
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use exfilguard_controller::{
    correlate::ResponsePolicy,
    k8s::{
        FIELD_MANAGER,
        lease::{self, Leader, LeaseConfig, LeaseGuard},
    },
    store::{Effect, Outbox as _, Store as _, sqlite::SqliteStore},
};
use kube::{Client, client::Body};
use serde_json::{Value, json};
use support::{
    kube_mock::{Handle, answer, expect, ok, status},
    kube_real::{TestNamespace, real_cluster},
};
use tonic::codegen::http::{Method, Request, Response, StatusCode};
use tower_test::mock;

const NS: &str = "exfilguard-system";
const NAME: &str = "exfilguard-controller";
const ME: &str = "controller-0_0000000a";
const OTHER: &str = "controller-1_0000000b";
const JSON: &str = "application/json";

fn lease_path() -> String {
    format!("/apis/coordination.k8s.io/v1/namespaces/{NS}/leases/{NAME}")
}

fn leases_path() -> String {
    format!("/apis/coordination.k8s.io/v1/namespaces/{NS}/leases")
}

const FM: [(&str, &str); 1] = [("fieldManager", FIELD_MANAGER)];

fn config(identity: &str, lease_ms: u64, renew_ms: u64, retry_ms: u64) -> LeaseConfig {
    LeaseConfig {
        namespace: NS.into(),
        name: NAME.into(),
        identity: identity.into(),
        lease_duration: Duration::from_millis(lease_ms),
        renew_every: Duration::from_millis(renew_ms),
        retry_every: Duration::from_millis(retry_ms),
    }
}

/// A Lease as the API server returns it.
fn lease_json(rv: &str, holder: Option<&str>, secs: i64, transitions: i64) -> Value {
    let mut spec = json!({
        "leaseDurationSeconds": secs,
        "acquireTime": "2026-11-23T10:00:00.000000Z",
        "renewTime": format!("2026-11-23T10:00:{:02}.000000Z", rv.parse::<u64>().unwrap_or(0) % 60),
        "leaseTransitions": transitions,
    });
    if let Some(h) = holder {
        spec["holderIdentity"] = json!(h);
    }
    json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": NAME, "namespace": NS, "resourceVersion": rv, "uid": "lease-uid"},
        "spec": spec,
    })
}

fn elector(cfg: LeaseConfig) -> (Leader, LeaseGuard, Pin<Box<Handle>>) {
    let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let (leader, guard) = lease::spawn(Client::new(svc, "default"), cfg).expect("valid config");
    (leader, guard, Box::pin(handle))
}

/// Waits (bounded) until `leader` says `want`.
async fn until(leader: &mut Leader, want: bool, within: Duration) {
    let done = async {
        while leader.is_leader() != want {
            leader.changed().await;
        }
    };
    tokio::time::timeout(within, done)
        .await
        .unwrap_or_else(|_| panic!("leadership not {want} within {within:?}"));
}

/// Checks a write's Lease body: holder, duration, transitions and, for a
/// PUT, the resourceVersion it was based on.
fn check_lease(body: &Value, rv: Option<&str>, holder: Option<&str>, secs: i64, transitions: i64) {
    assert_eq!(body["apiVersion"], "coordination.k8s.io/v1", "{body}");
    assert_eq!(body["kind"], "Lease", "{body}");
    assert_eq!(body["metadata"]["name"], NAME, "{body}");
    assert_eq!(body["metadata"]["namespace"], NS, "{body}");
    assert_eq!(
        body["metadata"]["resourceVersion"].as_str(),
        rv,
        "resourceVersion: {body}"
    );
    assert_eq!(body["spec"]["holderIdentity"].as_str(), holder, "{body}");
    assert_eq!(body["spec"]["leaseDurationSeconds"], secs, "{body}");
    assert_eq!(body["spec"]["leaseTransitions"], transitions, "{body}");
    assert!(body["spec"]["renewTime"].is_string(), "renewTime: {body}");
    assert!(
        body["spec"]["acquireTime"].is_string(),
        "acquireTime: {body}"
    );
}

#[tokio::test]
async fn acquires_a_missing_lease_renews_and_releases_at_shutdown() {
    let (mut leader, guard, mut api) = elector(config(ME, 3_000, 200, 200));
    assert!(!leader.is_leader());
    answer(
        &mut api,
        vec![
            expect(Method::GET, &lease_path()).reply(status(404, "NotFound", "leases not found")),
            expect(Method::POST, &leases_path())
                .query(&FM)
                .body(JSON, |b| check_lease(&b, None, Some(ME), 3, 0))
                .reply((StatusCode::CREATED, lease_json("1", Some(ME), 3, 0))),
        ],
    )
    .await;
    until(&mut leader, true, Duration::from_secs(2)).await;
    // Renewals: a PUT on the last version seen, same holder and transitions.
    let t = Instant::now();
    answer(
        &mut api,
        vec![
            expect(Method::PUT, &lease_path())
                .query(&FM)
                .body(JSON, |b| check_lease(&b, Some("1"), Some(ME), 3, 0))
                .reply(ok(lease_json("2", Some(ME), 3, 0))),
            expect(Method::PUT, &lease_path())
                .query(&FM)
                .body(JSON, |b| check_lease(&b, Some("2"), Some(ME), 3, 0))
                .reply(ok(lease_json("3", Some(ME), 3, 0))),
        ],
    )
    .await;
    let two_renewals = t.elapsed();
    assert!(
        two_renewals >= Duration::from_millis(300),
        "renewed every 200 ms, not sooner: {two_renewals:?}"
    );
    assert!(leader.is_leader());
    // Shutdown: leadership ends first, then the holder is cleared.
    let mut watching = leader.clone();
    let stopping = tokio::spawn(guard.shutdown());
    answer(
        &mut api,
        vec![
            expect(Method::PUT, &lease_path())
                .query(&FM)
                .body(JSON, |b| {
                    assert_eq!(b["metadata"]["resourceVersion"], "3", "{b}");
                    assert!(
                        b["spec"].get("holderIdentity").is_none(),
                        "holder kept: {b}"
                    );
                    assert_eq!(b["spec"]["leaseDurationSeconds"], 1, "{b}");
                    assert_eq!(b["spec"]["leaseTransitions"], 0, "{b}");
                })
                .reply(ok(lease_json("4", None, 1, 0))),
        ],
    )
    .await;
    until(&mut watching, false, Duration::from_secs(1)).await;
    tokio::time::timeout(Duration::from_secs(2), stopping)
        .await
        .expect("shutdown returns")
        .unwrap();
    // The elector is gone with its client: no more requests.
    assert!(api.next_request().await.is_none());
}

#[tokio::test]
async fn a_shutdown_during_a_renewal_still_releases() {
    let (mut leader, guard, mut api) = elector(config(ME, 3_000, 200, 200));
    answer(
        &mut api,
        vec![
            expect(Method::GET, &lease_path()).reply(status(404, "NotFound", "not found")),
            expect(Method::POST, &leases_path())
                .query(&FM)
                .body(JSON, |b| check_lease(&b, None, Some(ME), 3, 0))
                .reply((StatusCode::CREATED, lease_json("1", Some(ME), 3, 0))),
        ],
    )
    .await;
    until(&mut leader, true, Duration::from_secs(2)).await;
    // A renewal arrives; the server applies it (version 2) but the answer
    // never comes: the shutdown cuts it short.
    let (req, _unanswered) = tokio::time::timeout(Duration::from_secs(2), api.next_request())
        .await
        .expect("a renewal")
        .expect("client alive");
    assert_eq!(req.method(), Method::PUT);
    let stopping = tokio::spawn(guard.shutdown());
    answer(
        &mut api,
        vec![
            // The release on the version it knew: stale.
            expect(Method::PUT, &lease_path())
                .query(&FM)
                .body(JSON, |b| {
                    assert_eq!(b["metadata"]["resourceVersion"], "1", "{b}");
                    assert!(b["spec"].get("holderIdentity").is_none(), "{b}");
                })
                .reply(status(409, "Conflict", "the object has been modified")),
            // Read again: still ours, so released on the current version.
            expect(Method::GET, &lease_path()).reply(ok(lease_json("2", Some(ME), 3, 0))),
            expect(Method::PUT, &lease_path())
                .query(&FM)
                .body(JSON, |b| {
                    assert_eq!(b["metadata"]["resourceVersion"], "2", "{b}");
                    assert!(b["spec"].get("holderIdentity").is_none(), "{b}");
                    assert_eq!(b["spec"]["leaseDurationSeconds"], 1, "{b}");
                })
                .reply(ok(lease_json("3", None, 1, 0))),
        ],
    )
    .await;
    tokio::time::timeout(Duration::from_secs(2), stopping)
        .await
        .expect("shutdown returns")
        .unwrap();
    assert!(!leader.is_leader());
}

#[tokio::test]
async fn a_conflict_on_renewal_loses_leadership() {
    let (mut leader, guard, mut api) = elector(config(ME, 3_000, 200, 200));
    answer(
        &mut api,
        vec![
            expect(Method::GET, &lease_path()).reply(status(404, "NotFound", "not found")),
            // Another replica created it first: observe again.
            expect(Method::POST, &leases_path())
                .query(&FM)
                .body(JSON, |b| check_lease(&b, None, Some(ME), 3, 0))
                .reply(status(409, "AlreadyExists", "leases already exists")),
            // Read again: free (its holder released it), so taken over.
            expect(Method::GET, &lease_path()).reply(ok(lease_json("5", None, 1, 2))),
            expect(Method::PUT, &lease_path())
                .query(&FM)
                .body(JSON, |b| check_lease(&b, Some("5"), Some(ME), 3, 3))
                .reply(ok(lease_json("6", Some(ME), 3, 3))),
        ],
    )
    .await;
    until(&mut leader, true, Duration::from_secs(2)).await;
    answer(
        &mut api,
        vec![
            expect(Method::PUT, &lease_path())
                .query(&FM)
                .body(JSON, |b| check_lease(&b, Some("6"), Some(ME), 3, 3))
                .reply(status(409, "Conflict", "the object has been modified")),
        ],
    )
    .await;
    until(&mut leader, false, Duration::from_secs(1)).await;
    // Back to candidate: reads again and finds someone else holding it.
    answer(
        &mut api,
        vec![expect(Method::GET, &lease_path()).reply(ok(lease_json("7", Some(OTHER), 3, 4)))],
    )
    .await;
    assert!(!leader.is_leader());
    guard.abort().await;
}

#[tokio::test]
async fn a_live_lease_is_waited_on_and_an_expired_one_taken_over() {
    // Lease 1 s; looks every 100 ms.
    let (mut leader, guard, mut api) = elector(config(ME, 1_000, 300, 100));
    // The other replica renews for 1.5 s: a new resourceVersion at every
    // read. We never write.
    let start = Instant::now();
    let mut rv = 10;
    while start.elapsed() < Duration::from_millis(1_500) {
        rv += 1;
        answer(
            &mut api,
            vec![expect(Method::GET, &lease_path()).reply(ok(lease_json(
                &rv.to_string(),
                Some(OTHER),
                1,
                2,
            )))],
        )
        .await;
        assert!(!leader.is_leader());
    }
    // Then it stops renewing: the same version at every read, until a full
    // lease duration after we first saw it, then a takeover.
    let frozen = rv.to_string();
    let first_seen = Instant::now();
    let mut reads = 0;
    let put_at = loop {
        let (req, send) = tokio::time::timeout(Duration::from_secs(3), api.next_request())
            .await
            .expect("a request")
            .expect("client alive");
        let now = Instant::now();
        match *req.method() {
            Method::GET => {
                reads += 1;
                let body = serde_json::to_vec(&lease_json(&frozen, Some(OTHER), 1, 2)).unwrap();
                send.send_response(Response::new(Body::from(body)));
            }
            Method::PUT => {
                assert_eq!(req.uri().path(), lease_path());
                let bytes = req.into_body().collect_bytes().await.unwrap();
                let b: Value = serde_json::from_slice(&bytes).unwrap();
                check_lease(&b, Some(&frozen), Some(ME), 1, 3);
                let body = serde_json::to_vec(&lease_json("99", Some(ME), 1, 3)).unwrap();
                send.send_response(Response::new(Body::from(body)));
                break now;
            }
            ref m => panic!("unexpected {m} {}", req.uri()),
        }
    };
    let waited = put_at - first_seen;
    assert!(
        waited >= Duration::from_millis(900),
        "took over {waited:?} after the last change was seen: before the lease expired"
    );
    assert!(
        waited <= Duration::from_millis(1_600),
        "took over only {waited:?} after the last change was seen"
    );
    assert!(reads >= 5, "read {reads} times while waiting");
    until(&mut leader, true, Duration::from_secs(1)).await;
    guard.abort().await;
}

#[tokio::test]
async fn failing_renewals_step_down_before_the_lease_expires() {
    // Lease 1.5 s: the renew deadline is 1 s after the last good renewal.
    let (mut leader, guard, mut api) = elector(config(ME, 1_500, 200, 100));
    answer(
        &mut api,
        vec![
            expect(Method::GET, &lease_path()).reply(status(404, "NotFound", "not found")),
            expect(Method::POST, &leases_path())
                .query(&FM)
                // 1.5 s rounds up: others wait at least as long as we assume.
                .body(JSON, |b| check_lease(&b, None, Some(ME), 2, 0))
                .reply((StatusCode::CREATED, lease_json("1", Some(ME), 2, 0))),
        ],
    )
    .await;
    let acquired = Instant::now();
    until(&mut leader, true, Duration::from_secs(1)).await;
    // Every renewal fails with a 500 (an etcd outage).
    let failing = Arc::new(AtomicUsize::new(0));
    let count = failing.clone();
    let server = tokio::spawn(async move {
        while let Some((req, send)) = api.next_request().await {
            assert_eq!(req.method(), Method::PUT, "{}", req.uri());
            count.fetch_add(1, Ordering::SeqCst);
            let (code, body) = status(500, "InternalError", "etcd is away");
            let mut res = Response::new(Body::from(serde_json::to_vec(&body).unwrap()));
            *res.status_mut() = code;
            send.send_response(res);
        }
    });
    until(&mut leader, false, Duration::from_secs(3)).await;
    let led = acquired.elapsed();
    println!("renewals failing: stepped down {led:?} after the last good write (lease 1.5 s)");
    assert!(
        led < Duration::from_millis(1_500),
        "still leader {led:?} after the last good write: others may have taken over"
    );
    assert!(
        led >= Duration::from_millis(900),
        "stepped down early: {led:?}"
    );
    assert!(failing.load(Ordering::SeqCst) >= 2, "renewal retried");
    guard.abort().await;
    server.abort();
}

// ------------------------------------------------------------------ failover

/// One Lease with the API server's rules, shared by several mock servers:
/// every write bumps the resourceVersion; a PUT on a stale version and a
/// POST when it exists are 409s.
#[derive(Default)]
struct SharedLease {
    object: Mutex<Option<Value>>,
    version: AtomicUsize,
}

impl SharedLease {
    fn handle(&self, method: &Method, path: &str, body: &[u8]) -> (StatusCode, Value) {
        let mut object = self.object.lock().unwrap();
        match (method.clone(), path) {
            (Method::GET, p) if p == lease_path() => match &*object {
                Some(o) => ok(o.clone()),
                None => status(404, "NotFound", "leases not found"),
            },
            (Method::POST, p) if p == leases_path() => {
                if object.is_some() {
                    return status(409, "AlreadyExists", "leases already exists");
                }
                let mut o: Value = serde_json::from_slice(body).unwrap();
                let rv = self.version.fetch_add(1, Ordering::SeqCst) + 1;
                o["metadata"]["resourceVersion"] = json!(rv.to_string());
                *object = Some(o.clone());
                (StatusCode::CREATED, o)
            }
            (Method::PUT, p) if p == lease_path() => {
                let mut o: Value = serde_json::from_slice(body).unwrap();
                let Some(current) = &*object else {
                    return status(404, "NotFound", "leases not found");
                };
                if o["metadata"]["resourceVersion"] != current["metadata"]["resourceVersion"] {
                    return status(409, "Conflict", "the object has been modified");
                }
                let rv = self.version.fetch_add(1, Ordering::SeqCst) + 1;
                o["metadata"]["resourceVersion"] = json!(rv.to_string());
                *object = Some(o.clone());
                ok(o)
            }
            (m, p) => panic!("unexpected {m} {p}"),
        }
    }

    fn holder(&self) -> Option<String> {
        self.object.lock().unwrap().as_ref().and_then(|o| {
            o["spec"]["holderIdentity"]
                .as_str()
                .filter(|h| !h.is_empty())
                .map(str::to_owned)
        })
    }

    fn transitions(&self) -> i64 {
        self.object
            .lock()
            .unwrap()
            .as_ref()
            .map_or(0, |o| o["spec"]["leaseTransitions"].as_i64().unwrap_or(0))
    }
}

/// Serves one elector's requests from `lease` until its client is gone.
fn serve_shared(handle: Pin<Box<Handle>>, lease: Arc<SharedLease>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut handle = handle;
        while let Some((req, send)) = handle.next_request().await {
            let method = req.method().clone();
            let path = req.uri().path().to_owned();
            let bytes = req.into_body().collect_bytes().await.unwrap();
            let (code, body) = lease.handle(&method, &path, &bytes);
            let mut res = Response::new(Body::from(serde_json::to_vec(&body).unwrap()));
            *res.status_mut() = code;
            send.send_response(res);
        }
    })
}

/// Samples both replicas' leadership every millisecond; counts the samples
/// where both lead.
fn sample_both(a: Leader, b: Leader, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        let mut both = 0;
        while !stop.load(Ordering::SeqCst) {
            if a.is_leader() && b.is_leader() {
                both += 1;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        both
    })
}

/// Starts two electors A and B on one shared Lease; A starts first and leads.
async fn two_replicas(
    lease: &Arc<SharedLease>,
) -> (
    (Leader, LeaseGuard, tokio::task::JoinHandle<()>),
    (Leader, LeaseGuard, tokio::task::JoinHandle<()>),
) {
    // Lease 1 s, renew every 300 ms, look every 200 ms.
    let (mut a, a_guard, a_api) = elector(config("replica-a_00000001", 1_000, 300, 200));
    let a_server = serve_shared(a_api, lease.clone());
    until(&mut a, true, Duration::from_secs(2)).await;
    let (b, b_guard, b_api) = elector(config("replica-b_00000002", 1_000, 300, 200));
    let b_server = serve_shared(b_api, lease.clone());
    // B stays a follower while A renews.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert!(a.is_leader());
    assert!(!b.is_leader(), "B took over a live lease");
    assert_eq!(lease.holder().as_deref(), Some("replica-a_00000001"));
    ((a, a_guard, a_server), (b, b_guard, b_server))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_after_the_leader_dies_within_the_lease_duration() {
    let lease = Arc::new(SharedLease::default());
    let ((a, a_guard, a_server), (mut b, b_guard, b_server)) = two_replicas(&lease).await;
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample_both(a.clone(), b.clone(), stop.clone());
    // A crashes: no release, the lease must expire.
    let t0 = Instant::now();
    a_guard.abort().await;
    assert!(!a.is_leader(), "an aborted elector still says leader");
    until(&mut b, true, Duration::from_secs(5)).await;
    let failover = t0.elapsed();
    println!("failover after the leader died (no release): {failover:?} (lease 1 s, retry 200 ms)");
    // Expiry counts from B's last sight of A's renewal (at most one retry
    // before the crash... or after), then one retry to notice.
    assert!(
        failover >= Duration::from_millis(500),
        "B took over {failover:?} after the crash: before A's lease could have expired"
    );
    assert!(
        failover <= Duration::from_millis(1_000 + 2 * 200 + 500),
        "failover took {failover:?}"
    );
    assert_eq!(lease.holder().as_deref(), Some("replica-b_00000002"));
    assert_eq!(lease.transitions(), 1, "one transition: A → B");
    // B keeps it.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    assert!(b.is_leader());
    stop.store(true, Ordering::SeqCst);
    assert_eq!(sampler.await.unwrap(), 0, "A and B led at the same time");
    b_guard.shutdown().await;
    a_server.abort();
    b_server.await.unwrap();
    assert_eq!(lease.holder(), None, "B released at shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_after_a_graceful_shutdown_within_the_retry_period() {
    let lease = Arc::new(SharedLease::default());
    let ((a, a_guard, a_server), (mut b, b_guard, b_server)) = two_replicas(&lease).await;
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample_both(a.clone(), b.clone(), stop.clone());
    let t0 = Instant::now();
    a_guard.shutdown().await;
    assert!(!a.is_leader());
    let released = t0.elapsed();
    until(&mut b, true, Duration::from_secs(3)).await;
    let failover = t0.elapsed();
    println!(
        "failover after a graceful shutdown (lease released in {released:?}): {failover:?} \
         (lease 1 s, retry 200 ms)"
    );
    assert!(
        failover <= Duration::from_millis(200 + 300),
        "failover took {failover:?}: more than one retry period"
    );
    assert_eq!(lease.holder().as_deref(), Some("replica-b_00000002"));
    assert_eq!(lease.transitions(), 1);
    stop.store(true, Ordering::SeqCst);
    assert_eq!(sampler.await.unwrap(), 0, "A and B led at the same time");
    a_server.await.unwrap();
    b_guard.shutdown().await;
    b_server.await.unwrap();
}

// ------------------------------------------------------------------- gating

/// A webhook sink on 127.0.0.1: counts the alerts it gets.
struct CountingSink {
    url: String,
    hits: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for CountingSink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn counting_sink() -> CountingSink {
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    let app = axum::Router::new().fallback(move || {
        let counter = counter.clone();
        async move {
            counter.fetch_add(1, Ordering::SeqCst);
            StatusCode::ACCEPTED
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.expect("test sink");
    });
    CountingSink {
        url: format!("http://{addr}/hook"),
        hits,
        task,
    }
}

/// Stores a critical detection for `pod`; returns its incident.
fn detect(store: &SqliteStore, seq: u64, pod: &str) -> String {
    use exfilguard_controller::store::{Ingest, IngestOutcome, Payload};
    use exfilguard_proto::v1::{Detection, DetectionKind, Severity, Workload};
    let msg = Ingest {
        node: "node-a".into(),
        seq,
        sent_at_ms: 1,
        received_ms: exfilguard_controller::time::now_ms(),
        payload: Payload::Detection(Box::new(Detection {
            detection_id: format!("d{seq}"),
            kind: DetectionKind::Volume as i32,
            severity: Severity::Critical as i32,
            workload: Some(Workload {
                namespace: "shop".into(),
                pod: pod.into(),
                cgroup_id: 1000 + seq,
                ..Default::default()
            }),
            summary: format!("{seq}00 MB to 203.0.113.9:443"),
            bytes_estimate: seq * 100_000_000,
            ..Default::default()
        })),
    };
    let out = store
        .ingest(&[msg], &ResponsePolicy::default())
        .expect("ingest");
    let Some(IngestOutcome::Stored(effects)) = out.into_iter().next() else {
        panic!("detection {seq} not stored")
    };
    effects
        .into_iter()
        .find_map(|e| match e {
            Effect::Incident { incident, .. } => Some(incident.id),
            _ => None,
        })
        .expect("an incident effect")
}

fn store_in(dir: &tempfile::TempDir) -> Arc<SqliteStore> {
    let store = Arc::new(SqliteStore::open(&dir.path().join("c.db")).unwrap());
    store
        .hello(
            &exfilguard_controller::store::AgentInfo {
                node: "node-a".into(),
                agent_version: "test".into(),
                ..Default::default()
            },
            1,
        )
        .expect("hello");
    store
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_wait_for_leadership_then_go_out() {
    use exfilguard_controller::alerts::{
        AlertsConfig, Dispatcher,
        config::{RetryConfig, SecretSource, SinkConfig, SinkKind},
    };
    let sink = counting_sink().await;
    let dir = tempfile::tempdir().unwrap();
    let store = store_in(&dir);
    let incident = detect(&store, 1, "db-0");
    // Another replica holds the lease (2 s) and then stops renewing: this
    // one leads only once it expired.
    let lease = Arc::new(SharedLease::default());
    *lease.object.lock().unwrap() = Some(lease_json("1", Some(OTHER), 2, 0));
    lease.version.store(1, Ordering::SeqCst);
    let (leader, guard, api) = elector(config(ME, 1_000, 300, 100));
    let server = serve_shared(api, lease.clone());
    let config = AlertsConfig {
        retry: RetryConfig {
            initial_backoff_ms: 50,
            max_backoff_ms: 400,
            max_attempts: 30,
            timeout_ms: 5_000,
            max_retry_after_ms: 5_000,
        },
        sinks: vec![SinkConfig {
            name: "webhook".into(),
            kind: SinkKind::Webhook,
            url: SecretSource {
                value: Some(sink.url.clone()),
                ..Default::default()
            },
            routing_key: SecretSource::default(),
            severities: vec![],
            source: None,
        }],
    };
    let t0 = Instant::now();
    let dispatcher =
        Dispatcher::start_with_leader(store.clone(), &config, None, leader.clone()).unwrap();
    dispatcher.wake();
    // Nothing goes out while another replica leads.
    loop {
        let hits = sink.hits.load(Ordering::SeqCst);
        if leader.is_leader() {
            break;
        }
        assert_eq!(hits, 0, "an alert went out while not leader");
        assert!(t0.elapsed() < Duration::from_secs(5), "never became leader");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let follower_for = t0.elapsed();
    assert!(
        follower_for >= Duration::from_millis(1_800),
        "led after {follower_for:?}: before the other's lease expired"
    );
    // Leader now: what was pending goes out.
    let deadline = Instant::now() + Duration::from_secs(10);
    while sink.hits.load(Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "alert not sent after gaining leadership"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rows = store.deliveries(&incident).unwrap();
    assert!(!rows.is_empty(), "{rows:?}");
    dispatcher.shutdown().await;
    guard.shutdown().await;
    server.await.unwrap();
}

#[tokio::test]
async fn responder_acts_only_when_leading_and_lifts_stale_lockdowns_on_gaining() {
    use exfilguard_controller::{
        hub::Hub,
        k8s::{Containment, ContainmentConfig, LockdownOptions, respond::Responder},
    };
    use exfilguard_proto::v1::Workload;
    let dir = tempfile::tempdir().unwrap();
    let store = store_in(&dir);
    let released = detect(&store, 1, "db-0");
    store
        .release(&released, "alice@sec", "false positive", 2)
        .expect("release");
    let hub = Hub::new(64);
    let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let mut api = Box::pin(handle);
    let (tx, rx) = tokio::sync::watch::channel(false);
    let responder = Responder::new(
        Containment::new(Client::new(svc, "default"), ContainmentConfig::default()),
        store.clone(),
        hub.clone(),
        LockdownOptions::default(),
        exfilguard_controller::k8s::respond::RETRY,
    )
    .with_leader(Leader::from_receiver(rx));
    let serving = responder.clone().start();
    let following = responder.follow_leadership();
    // Not leader: a lockdown effect is dropped, no API call.
    hub.apply(
        store.as_ref(),
        vec![Effect::Lockdown {
            incident_id: released.clone(),
            workload: Box::new(Workload {
                namespace: "shop".into(),
                pod: "db-0".into(),
                ..Default::default()
            }),
            dry_run: false,
        }],
    );
    support::kube_mock::no_request(&mut api, Duration::from_millis(400)).await;
    // Gaining leadership: the sweep finds the released incident's
    // NetworkPolicy and label, and one of an incident the store does not
    // know (left alone), and lifts the former.
    tx.send_replace(true);
    const UID: &str = "6f1c2b9e-6a49-4d0c-9a57-1b2f0c3d4e5f";
    let np = |incident: &str, pod: &str| {
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": format!("exfilguard-lockdown-{pod}"), "namespace": "shop",
                "uid": "np-uid-1", "resourceVersion": "77",
                "labels": {"app.kubernetes.io/managed-by": "exfilguard", "exfilguard.io/incident": incident},
                "ownerReferences": [{"apiVersion": "v1", "kind": "Pod", "name": pod, "uid": UID}]},
            "spec": {"podSelector": {"matchLabels": {"exfilguard.io/quarantine": incident}},
                "policyTypes": ["Egress"], "egress": []}})
    };
    let pod = |labels: Value, rv: &str| {
        json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "db-0", "namespace": "shop", "uid": UID, "resourceVersion": rv,
                "labels": labels},
            "spec": {"containers": [{"name": "db", "image": "postgres:16"}]}})
    };
    let pod_path = "/api/v1/namespaces/shop/pods/db-0";
    let np_path =
        "/apis/networking.k8s.io/v1/namespaces/shop/networkpolicies/exfilguard-lockdown-db-0";
    let r = released.clone();
    answer(
        &mut api,
        vec![
            expect(Method::GET, "/apis/networking.k8s.io/v1/networkpolicies")
                .query(&[("labelSelector", "exfilguard.io%2Fincident")])
                .reply(ok(json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicyList",
                    "metadata": {"resourceVersion": "80"},
                    "items": [np(&released, "db-0"), np("EXFIL-UNKNOWN-1", "web-1")]}))),
            expect(Method::GET, "/api/v1/pods")
                .query(&[("labelSelector", "exfilguard.io%2Fquarantine")])
                .reply(ok(json!({"apiVersion": "v1", "kind": "PodList",
                    "metadata": {"resourceVersion": "80"},
                    "items": [pod(json!({"app": "db", "exfilguard.io/quarantine": released}), "50")]}))),
            expect(Method::GET, pod_path).reply(ok(pod(
                json!({"app": "db", "exfilguard.io/quarantine": released}),
                "50",
            ))),
            expect(Method::PATCH, pod_path)
                .query(&FM)
                .body("application/merge-patch+json", |b| {
                    assert_eq!(
                        b,
                        json!({"metadata": {"uid": UID, "resourceVersion": "50",
                            "labels": {"exfilguard.io/quarantine": null}}})
                    )
                })
                .reply(ok(pod(json!({"app": "db"}), "51"))),
            expect(Method::GET, np_path).reply(ok(np(&released, "db-0"))),
            expect(Method::DELETE, np_path)
                .body(JSON, |b| {
                    assert_eq!(
                        b["preconditions"],
                        json!({"uid": "np-uid-1", "resourceVersion": "77"})
                    )
                })
                .reply(ok(json!({"kind": "Status", "apiVersion": "v1", "status": "Success",
                    "metadata": {}, "code": 200}))),
            expect(Method::POST, "/apis/events.k8s.io/v1/namespaces/shop/events")
                .query(&FM)
                .body(JSON, move |b| {
                    assert_eq!(b["reason"], "ExfilguardRelease", "{b}");
                    let note = b["note"].as_str().unwrap();
                    assert!(note.contains(&r), "{note}");
                    assert!(note.contains("leader change"), "{note}");
                })
                .reply((StatusCode::CREATED, json!({"apiVersion": "events.k8s.io/v1", "kind": "Event",
                    "metadata": {"name": "x", "namespace": "shop"},
                    "eventTime": "2026-11-23T11:15:00.000000Z"}))),
        ],
    )
    .await;
    // The timeline says it, and nothing else is asked (the unknown
    // incident's lockdown stays).
    support::kube_mock::no_request(&mut api, Duration::from_millis(400)).await;
    let timeline = store.get_incident(&released).unwrap().timeline;
    assert!(
        timeline
            .iter()
            .any(|e| e.cause.contains("kubernetes release of pod shop/db-0")),
        "{timeline:?}"
    );
    following.abort();
    serving.abort();
}

/// Serves one controller's API requests: its lease from `lease`, and empty
/// lists for a new leader's sweep; logs each request as `METHOD path`.
fn serve_controller(
    handle: Handle,
    lease: Arc<SharedLease>,
    log: Arc<Mutex<Vec<String>>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut handle = Box::pin(handle);
        while let Some((req, send)) = handle.next_request().await {
            let method = req.method().clone();
            let path = req.uri().path().to_owned();
            log.lock().unwrap().push(format!("{method} {path}"));
            let bytes = req.into_body().collect_bytes().await.unwrap();
            let (code, body) = match path.as_str() {
                "/apis/networking.k8s.io/v1/networkpolicies" => ok(json!({
                    "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicyList",
                    "metadata": {"resourceVersion": "1"}, "items": []})),
                "/api/v1/pods" => ok(json!({"apiVersion": "v1", "kind": "PodList",
                    "metadata": {"resourceVersion": "1"}, "items": []})),
                _ => lease.handle(&method, &path, &bytes),
            };
            let mut res = Response::new(Body::from(serde_json::to_vec(&body).unwrap()));
            *res.status_mut() = code;
            send.send_response(res);
        }
    })
}

/// A controller served on 127.0.0.1 with leader election on.
struct Replica {
    log: Arc<Mutex<Vec<String>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    served: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Replica {
    async fn start(identity: &str, lease: &Arc<SharedLease>) -> Replica {
        use exfilguard_controller::server::{self, KubeDuties, ServerConfig};
        let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
        let log = Arc::new(Mutex::new(Vec::new()));
        serve_controller(handle, lease.clone(), log.clone());
        let dir = tempfile::tempdir().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let config = ServerConfig {
            kube: Some(Client::new(svc, "default")),
            duties: KubeDuties {
                containment: true,
                evidence: false,
                exfilpolicies: false,
                incidents: false,
            },
            leader_election: Some(config(identity, 1_000, 300, 100)),
            ..ServerConfig::new(dir.path().join("c.db"), None)
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = tokio::spawn(async move {
            server::serve(config, listener, async {
                let _ = stopped.await;
            })
            .await
            .expect("serve");
        });
        Replica {
            log,
            stop: Some(stop),
            served,
            _dir: dir,
        }
    }

    fn swept(&self) -> bool {
        let log = self.log.lock().unwrap();
        log.iter()
            .any(|l| l == "GET /apis/networking.k8s.io/v1/networkpolicies")
            && log.iter().any(|l| l == "GET /api/v1/pods")
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(5), &mut self.served)
            .await
            .expect("server stops")
            .unwrap();
    }
}

async fn until_holder(lease: &SharedLease, want: Option<&str>, within: Duration) {
    let deadline = Instant::now() + within;
    while lease.holder().as_deref() != want {
        assert!(
            Instant::now() < deadline,
            "holder {:?}, not {want:?}, after {within:?}",
            lease.holder()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Two controllers served with `ServerConfig::leader_election`: the first
/// leads and sweeps stale lockdowns, the second waits; stopping the first
/// releases the lease and the second leads and sweeps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn served_controllers_elect_hand_over_at_shutdown_and_sweep_on_gaining() {
    let lease = Arc::new(SharedLease::default());
    let a = Replica::start("server-a_00000001", &lease).await;
    until_holder(&lease, Some("server-a_00000001"), Duration::from_secs(3)).await;
    let deadline = Instant::now() + Duration::from_secs(3);
    while !a.swept() {
        assert!(Instant::now() < deadline, "A never swept: {:?}", a.log);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let b = Replica::start("server-b_00000002", &lease).await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(lease.holder().as_deref(), Some("server-a_00000001"));
    assert!(!b.swept(), "a follower swept: {:?}", b.log);
    let t0 = Instant::now();
    a.stop().await;
    until_holder(&lease, Some("server-b_00000002"), Duration::from_secs(3)).await;
    println!(
        "served controllers: B leads {:?} after A was told to stop",
        t0.elapsed()
    );
    let deadline = Instant::now() + Duration::from_secs(3);
    while !b.swept() {
        assert!(Instant::now() < deadline, "B never swept: {:?}", b.log);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(lease.transitions(), 1);
    b.stop().await;
    assert_eq!(lease.holder(), None, "released when B stopped");
}

// ------------------------------------------------------------- real cluster

#[tokio::test]
async fn real_api_acquire_renew_release() {
    let Some(client) = real_cluster("real_api_acquire_renew_release").await else {
        return;
    };
    use k8s_openapi::api::coordination::v1::Lease;
    let ns = TestNamespace::create(&client).await;
    let mut cfg = config("real-test_00000001", 3_000, 500, 300);
    cfg.namespace = ns.name.clone();
    let (mut leader, guard) = lease::spawn(client.clone(), cfg).expect("config");
    until(&mut leader, true, Duration::from_secs(10)).await;
    let leases: kube::Api<Lease> = kube::Api::namespaced(client.clone(), &ns.name);
    let first = leases.get(NAME).await.expect("lease exists");
    let spec = first.spec.clone().unwrap();
    assert_eq!(spec.holder_identity.as_deref(), Some("real-test_00000001"));
    assert_eq!(spec.lease_duration_seconds, Some(3));
    // Renewed: a new resourceVersion and renewTime within a few periods.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let later = leases.get(NAME).await.expect("lease");
    assert_ne!(
        later.metadata.resource_version,
        first.metadata.resource_version
    );
    assert!(later.spec.clone().unwrap().renew_time > spec.renew_time);
    assert!(leader.is_leader());
    guard.shutdown().await;
    assert!(!leader.is_leader());
    let released = leases.get(NAME).await.expect("lease");
    let s = released.spec.unwrap();
    assert_eq!(s.holder_identity, None, "released");
    assert_eq!(s.lease_duration_seconds, Some(1));
    // Another replica takes it at once.
    let mut cfg = config("real-test_00000002", 3_000, 500, 300);
    cfg.namespace = ns.name.clone();
    let (mut second, guard) = lease::spawn(client.clone(), cfg).expect("config");
    until(&mut second, true, Duration::from_secs(5)).await;
    let taken = leases.get(NAME).await.expect("lease").spec.unwrap();
    assert_eq!(taken.holder_identity.as_deref(), Some("real-test_00000002"));
    assert_eq!(taken.lease_transitions, Some(1));
    guard.shutdown().await;
}
