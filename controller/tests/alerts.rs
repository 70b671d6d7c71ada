//! Alert sinks end to end: real HTTP servers on 127.0.0.1 that fail the first
//! deliveries, a real SQLite outbox that survives a restart, and a real
//! Alertmanager (Debian's `prometheus-alertmanager`) that shows the alert.

use std::{
    collections::{HashSet, VecDeque},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};
use exfilguard_controller::{
    alerts::{
        AlertsConfig, Dispatcher,
        config::{RetryConfig, SecretSource, SinkConfig, SinkKind},
        sink::IDEMPOTENCY_HEADER,
    },
    correlate::ResponsePolicy,
    store::{
        AgentInfo, DeliveryState, Effect, Ingest, IngestOutcome, Outbox, Payload, Store,
        sqlite::SqliteStore,
    },
};
use exfilguard_proto::v1::{Detection, DetectionKind, Severity, Workload};
use serde_json::Value;

// ---------------------------------------------------------------- test sink

/// What the sink answers to the next request.
#[derive(Clone, Copy, Debug)]
enum Reply {
    /// Refuse with this status (nothing processed).
    Fail(u16),
    /// 429 with `Retry-After: secs`.
    RateLimit(u64),
    /// Process the alert, then answer 500 anyway (a lost response): the
    /// controller must retry and the sink must drop the duplicate by key.
    ProcessThenFail,
}

#[derive(Debug, Clone)]
struct Received {
    at: Instant,
    key: String,
    body: Value,
    /// Whether the sink processed it (accepted, or processed-then-failed).
    processed: bool,
}

#[derive(Default)]
struct SinkState {
    script: Mutex<VecDeque<Reply>>,
    down: AtomicBool,
    received: Mutex<Vec<Received>>,
}

/// An HTTP server on 127.0.0.1:0 playing a sink; stops when dropped.
struct TestSink {
    addr: SocketAddr,
    state: Arc<SinkState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestSink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(State(state): State<Arc<SinkState>>, headers: HeaderMap, body: Bytes) -> Response {
    let key = headers
        .get(IDEMPOTENCY_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let reply = if state.down.load(Ordering::SeqCst) {
        Some(Reply::Fail(503))
    } else {
        state.script.lock().unwrap().pop_front()
    };
    let processed = matches!(reply, None | Some(Reply::ProcessThenFail));
    state.received.lock().unwrap().push(Received {
        at: Instant::now(),
        key,
        body,
        processed,
    });
    match reply {
        None => (StatusCode::ACCEPTED, "ok").into_response(),
        Some(Reply::Fail(code)) => {
            (StatusCode::from_u16(code).unwrap(), "sink trouble").into_response()
        }
        Some(Reply::RateLimit(secs)) => (
            StatusCode::TOO_MANY_REQUESTS,
            [("retry-after", secs.to_string())],
            "slow down",
        )
            .into_response(),
        Some(Reply::ProcessThenFail) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "stored, but the reply got lost",
        )
            .into_response(),
    }
}

impl TestSink {
    async fn start(script: &[Reply]) -> TestSink {
        let state = Arc::new(SinkState {
            script: Mutex::new(script.iter().copied().collect()),
            ..Default::default()
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind test sink");
        let addr = listener.local_addr().unwrap();
        let app = Router::new().fallback(handle).with_state(state.clone());
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("test sink");
        });
        TestSink { addr, state, task }
    }

    fn url(&self) -> String {
        format!("http://{}/hook/T0K3N-secret", self.addr)
    }

    fn received(&self) -> Vec<Received> {
        self.state.received.lock().unwrap().clone()
    }

    /// The keys the sink acted on, each once, in the order first processed:
    /// what a receiver that de-duplicates by key ends up with.
    fn deduplicated(&self) -> Vec<String> {
        let mut seen = HashSet::new();
        self.received()
            .into_iter()
            .filter(|r| r.processed && seen.insert(r.key.clone()))
            .map(|r| r.key)
            .collect()
    }
}

// ---------------------------------------------------------------- incidents

fn hello(store: &SqliteStore, node: &str) {
    store
        .hello(
            &AgentInfo {
                node: node.into(),
                agent_version: "test".into(),
                ..Default::default()
            },
            1,
        )
        .expect("hello");
}

/// Stores one detection; returns the incident it landed in.
fn detect(store: &SqliteStore, seq: u64, pod: &str, severity: Severity) -> String {
    let msg = Ingest {
        node: "node-a".into(),
        seq,
        sent_at_ms: 1,
        received_ms: exfilguard_controller::time::now_ms(),
        payload: Payload::Detection(Box::new(Detection {
            detection_id: format!("d{seq}"),
            kind: DetectionKind::Volume as i32,
            severity: severity as i32,
            workload: Some(Workload {
                namespace: "shop".into(),
                pod: pod.into(),
                cgroup_id: 1000 + seq,
                owner_kind: "StatefulSet".into(),
                owner_name: "db".into(),
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

fn sink(name: &str, kind: SinkKind, url: &str, severities: &[&str]) -> SinkConfig {
    SinkConfig {
        name: name.into(),
        kind,
        url: SecretSource {
            value: Some(url.into()),
            ..Default::default()
        },
        routing_key: SecretSource {
            value: (kind == SinkKind::Pagerduty).then(|| "R0UT1NG-KEY".into()),
            ..Default::default()
        },
        severities: severities.iter().map(|s| s.to_string()).collect(),
        source: None,
    }
}

fn fast_retry() -> RetryConfig {
    RetryConfig {
        initial_backoff_ms: 50,
        max_backoff_ms: 400,
        max_attempts: 30,
        timeout_ms: 5_000,
        max_retry_after_ms: 5_000,
    }
}

/// Waits (bounded) until every outbox row of `incidents` is delivered, and
/// there are `rows` of them.
async fn wait_delivered(store: &SqliteStore, incidents: &[&str], rows: usize) {
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let all: Vec<_> = incidents
            .iter()
            .flat_map(|i| store.deliveries(i).expect("deliveries"))
            .collect();
        if all.len() == rows && all.iter().all(|d| d.state == DeliveryState::Delivered) {
            return;
        }
        assert!(
            all.iter().all(|d| d.state != DeliveryState::Failed),
            "a delivery failed: {all:?}"
        );
        assert!(
            Instant::now() < deadline,
            "alerts not delivered within 40 s: {all:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------- tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_alert_arrives_once_per_transition_through_failures() {
    let webhook = TestSink::start(&[
        Reply::Fail(500),
        Reply::Fail(502),
        Reply::RateLimit(1),
        Reply::ProcessThenFail,
    ])
    .await;
    let pagerduty = TestSink::start(&[Reply::Fail(503)]).await;
    let slack = TestSink::start(&[Reply::RateLimit(0)]).await;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(&dir.path().join("c.db")).unwrap());
    hello(&store, "node-a");
    let config = AlertsConfig {
        retry: fast_retry(),
        sinks: vec![
            sink("webhook", SinkKind::Webhook, &webhook.url(), &[]),
            sink("pd", SinkKind::Pagerduty, &pagerduty.url(), &["critical"]),
            sink(
                "slack",
                SinkKind::Slack,
                &slack.url(),
                &["critical", "high"],
            ),
        ],
    };
    let dispatcher = Dispatcher::start(store.clone(), &config, None).expect("dispatcher");

    // Incident A: critical → opened and contained; then released.
    let a = detect(&store, 1, "db-0", Severity::Critical);
    // Incident B: high → opened only; then resolved.
    let b = detect(&store, 2, "web-1", Severity::High);
    // A second detection in A is an update, not a transition: no alert.
    assert_eq!(detect(&store, 3, "db-0", Severity::Critical), a);
    dispatcher.wake();
    store
        .release(
            &a,
            "alice (responder)",
            "false positive",
            exfilguard_controller::time::now_ms(),
        )
        .unwrap();
    store
        .release(
            &b,
            "bob (responder)",
            "benign backup",
            exfilguard_controller::time::now_ms(),
        )
        .unwrap();
    dispatcher.wake();
    // webhook 5 + pd 3 (critical A only) + slack 5.
    wait_delivered(&store, &[&a, &b], 13).await;
    dispatcher.shutdown().await;

    // Webhook: every transition, once after de-duplication, each incident in order.
    let keys = webhook.deduplicated();
    let expect = |id: &str, ts: &[&str]| ts.iter().map(|t| format!("{id}:{t}")).collect::<Vec<_>>();
    let of = |id: &str| {
        keys.iter()
            .filter(|k| k.starts_with(id))
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(
        of(&a),
        expect(&a, &["opened", "contained", "released"]),
        "{keys:?}"
    );
    assert_eq!(of(&b), expect(&b, &["opened", "resolved"]), "{keys:?}");
    assert_eq!(keys.len(), 5, "{keys:?}");
    let got = webhook.received();
    // 4 scripted failures, so at least 4 extra requests; the processed-then-failed one came twice.
    assert!(got.len() >= 9, "{} requests", got.len());
    let twice = &got[3].key;
    assert!(got[3].processed);
    assert!(
        got.iter()
            .filter(|r| &r.key == twice && r.processed)
            .count()
            >= 2,
        "{twice} not resent"
    );
    // Retry-After: 1 was honoured (back-off alone would have been ≤ 400 ms).
    // The third request got the 429; its key's next request is its retry.
    let limited = &got[2];
    let retry = got[3..]
        .iter()
        .find(|r| r.key == limited.key)
        .expect("the 429'd alert retried");
    let gap = retry.at.duration_since(limited.at);
    assert!(
        gap >= Duration::from_millis(950),
        "retried {gap:?} after a 429 with Retry-After: 1"
    );
    // The runbook's shape.
    let first = got
        .iter()
        .find(|r| r.key == format!("{a}:contained") && r.processed)
        .unwrap();
    for field in [
        "incident_id",
        "severity",
        "type",
        "timestamp",
        "description",
        "affected_systems",
        "immediate_actions",
    ] {
        assert!(
            first.body.get(field).is_some(),
            "{field} missing: {}",
            first.body
        );
    }
    assert_eq!(first.body["incident_id"], a.as_str());
    assert_eq!(first.body["severity"], "CRITICAL");

    // PagerDuty: only the critical incident, trigger, trigger, resolve on one dedup_key.
    let pd: Vec<Value> = pagerduty
        .received()
        .into_iter()
        .filter(|r| r.processed)
        .map(|r| r.body)
        .collect();
    let actions: Vec<&str> = pd
        .iter()
        .map(|e| e["event_action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["trigger", "trigger", "resolve"], "{pd:?}");
    assert!(
        pd.iter()
            .all(|e| e["dedup_key"] == a.as_str() && e["routing_key"] == "R0UT1NG-KEY")
    );
    assert_eq!(pd[0]["payload"]["severity"], "critical");
    assert_eq!(pd[0]["payload"]["source"], "exfilguard-controller");
    assert!(
        pd[0]["payload"]["summary"]
            .as_str()
            .unwrap()
            .contains("shop/db-0")
    );

    // Slack: five messages, one per transition.
    assert_eq!(slack.deduplicated().len(), 5);
    assert!(slack.received().iter().all(|r| r.body["text"].is_string()));

    // The timeline says where each alert went; the secret URL is nowhere in it.
    let timeline = store.get_incident(&a).unwrap().timeline;
    let notes: Vec<&str> = timeline.iter().map(|t| t.cause.as_str()).collect();
    assert_eq!(
        notes
            .iter()
            .filter(|c| c.contains("delivered to sink"))
            .count(),
        9,
        "{notes:?}"
    );
    assert!(
        notes
            .iter()
            .any(|c| c.starts_with("alert (contained) delivered to sink webhook")),
        "{notes:?}"
    );
    assert!(!notes.iter().any(|c| c.contains("T0K3N")), "{notes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_restart_loses_no_alert() {
    let webhook = TestSink::start(&[]).await;
    webhook.state.down.store(true, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("c.db");
    let config = AlertsConfig {
        retry: fast_retry(),
        sinks: vec![sink("webhook", SinkKind::Webhook, &webhook.url(), &[])],
    };

    // First run: the sink is down; the alerts retry.
    let a = {
        let store = Arc::new(SqliteStore::open(&db).unwrap());
        hello(&store, "node-a");
        let dispatcher = Dispatcher::start(store.clone(), &config, None).unwrap();
        let a = detect(&store, 1, "db-0", Severity::Critical);
        dispatcher.wake();
        let deadline = Instant::now() + Duration::from_secs(20);
        while store
            .deliveries(&a)
            .unwrap()
            .iter()
            .map(|d| d.attempts)
            .sum::<u32>()
            < 3
        {
            assert!(
                Instant::now() < deadline,
                "no retries: {:?}",
                store.deliveries(&a)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        dispatcher.shutdown().await;
        a
    };
    assert!(webhook.deduplicated().is_empty());

    // Between runs (no dispatcher): a release is recorded, not sent.
    {
        let store = SqliteStore::open(&db).unwrap();
        store
            .release(
                &a,
                "alice (responder)",
                "contained elsewhere",
                exfilguard_controller::time::now_ms(),
            )
            .unwrap();
    }

    // Second run: the sink is back; everything pending goes out, once each.
    webhook.state.down.store(false, Ordering::SeqCst);
    let store = Arc::new(SqliteStore::open(&db).unwrap());
    let dispatcher = Dispatcher::start(store.clone(), &config, None).unwrap();
    wait_delivered(&store, &[&a], 3).await;
    dispatcher.shutdown().await;
    let keys = webhook.deduplicated();
    assert_eq!(
        keys,
        [
            format!("{a}:opened"),
            format!("{a}:contained"),
            format!("{a}:released")
        ]
    );
    // Accepted exactly once each: nothing was accepted while down, nothing resent after.
    assert_eq!(webhook.received().iter().filter(|r| r.processed).count(), 3);
    assert!(webhook.received().iter().filter(|r| !r.processed).count() >= 3);
    let delivered = store.deliveries(&a).unwrap();
    assert!(delivered[0].attempts >= 2, "{delivered:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_alert_is_given_up_and_the_timeline_says_so() {
    let webhook = TestSink::start(&[Reply::Fail(400)]).await;
    let slack = TestSink::start(&[]).await;
    slack.state.down.store(true, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(&dir.path().join("c.db")).unwrap());
    hello(&store, "node-a");
    let config = AlertsConfig {
        retry: RetryConfig {
            max_attempts: 3,
            ..fast_retry()
        },
        sinks: vec![
            sink("webhook", SinkKind::Webhook, &webhook.url(), &[]),
            sink("slack", SinkKind::Slack, &slack.url(), &[]),
        ],
    };
    let dispatcher = Dispatcher::start(store.clone(), &config, None).unwrap();
    let b = detect(&store, 1, "web-1", Severity::High);
    dispatcher.wake();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let rows = store.deliveries(&b).unwrap();
        if rows.len() == 2 && rows.iter().all(|d| d.state == DeliveryState::Failed) {
            assert_eq!(rows[0].attempts, 1, "a 400 is not retried: {rows:?}");
            assert_eq!(
                rows[1].attempts, 3,
                "503 retried up to max_attempts: {rows:?}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "not given up: {rows:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    dispatcher.shutdown().await;
    assert_eq!(slack.received().len(), 3);
    let notes: Vec<String> = store
        .get_incident(&b)
        .unwrap()
        .timeline
        .into_iter()
        .map(|t| t.cause)
        .collect();
    assert!(
        notes
            .iter()
            .any(|c| c.contains("to sink webhook FAILED after 1 attempts: HTTP 400")),
        "{notes:?}"
    );
    assert!(
        notes
            .iter()
            .any(|c| c.contains("to sink slack FAILED after 3 attempts")),
        "{notes:?}"
    );
}

// ---------------------------------------------------------------- Alertmanager

/// A `prometheus-alertmanager` we started; killed (by its PID) and reaped on drop.
struct AlertmanagerGuard {
    child: Child,
    url: String,
}

impl Drop for AlertmanagerGuard {
    fn drop(&mut self) {
        if let Err(e) = self.child.kill() {
            eprintln!("kill alertmanager (pid {}): {e}", self.child.id());
        }
        let _ = self.child.wait();
    }
}

const ALERTMANAGER: &str = "/usr/bin/prometheus-alertmanager";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn start_alertmanager(dir: &Path) -> AlertmanagerGuard {
    assert!(
        Path::new(ALERTMANAGER).exists(),
        "{ALERTMANAGER} is missing: install Debian's prometheus-alertmanager (cargo xtask setup does)"
    );
    let config = dir.join("alertmanager.yml");
    std::fs::write(
        &config,
        "route:\n  receiver: devnull\nreceivers:\n  - name: devnull\n",
    )
    .unwrap();
    let storage: PathBuf = dir.join("am-data");
    std::fs::create_dir_all(&storage).unwrap();
    let client = reqwest::Client::new();
    // The port is free when picked but could be taken before Alertmanager
    // binds it: try a few.
    for _ in 0..5 {
        let port = free_port();
        let child = Command::new(ALERTMANAGER)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.path={}", storage.display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            // No gossip listener: a lone instance on loopback only.
            .arg("--cluster.listen-address=")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {ALERTMANAGER}: {e}"));
        let mut guard = AlertmanagerGuard {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = guard.child.try_wait() {
                break;
            }
            if let Ok(r) = client.get(format!("{}/-/ready", guard.url)).send().await
                && r.status().is_success()
            {
                return guard;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut err = String::new();
        if let Some(mut e) = guard.child.stderr.take() {
            let _ = guard.child.kill();
            use std::io::Read;
            let _ = e.read_to_string(&mut err);
        }
        eprintln!("alertmanager on port {port} did not become ready: {err}");
    }
    panic!("alertmanager did not start");
}

async fn am_alerts(am: &AlertmanagerGuard, incident: &str, active: bool) -> Vec<Value> {
    let r = reqwest::Client::new()
        .get(format!("{}/api/v2/alerts", am.url))
        .query(&[
            ("filter", format!("incident_id=\"{incident}\"")),
            ("active", active.to_string()),
            ("silenced", "true".into()),
            ("inhibited", "true".into()),
            ("unprocessed", "true".into()),
        ])
        .send()
        .await
        .expect("query alertmanager");
    assert!(
        r.status().is_success(),
        "alertmanager answered {}",
        r.status()
    );
    r.json::<Vec<Value>>().await.expect("alertmanager JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_alertmanager_shows_the_alert() {
    let dir = tempfile::tempdir().unwrap();
    let am = start_alertmanager(dir.path()).await;
    let store = Arc::new(SqliteStore::open(&dir.path().join("c.db")).unwrap());
    hello(&store, "node-a");
    let config = AlertsConfig {
        retry: fast_retry(),
        sinks: vec![sink("am", SinkKind::Alertmanager, &am.url, &[])],
    };
    let dispatcher = Dispatcher::start(store.clone(), &config, None).unwrap();
    let a = detect(&store, 1, "db-0", Severity::Critical);
    dispatcher.wake();
    wait_delivered(&store, &[&a], 2).await;

    let alerts = am_alerts(&am, &a, true).await;
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    let alert = &alerts[0];
    assert_eq!(alert["labels"]["alertname"], "ExfilguardIncident");
    assert_eq!(alert["labels"]["incident_id"], a.as_str());
    assert_eq!(alert["labels"]["severity"], "critical");
    assert_eq!(alert["labels"]["workload"], "shop/db-0");
    assert_eq!(alert["status"]["state"], "active");
    assert_eq!(alert["annotations"]["transition"], "contained");

    // Release: the same alert (same labels) ends.
    store
        .release(
            &a,
            "alice (responder)",
            "false positive",
            exfilguard_controller::time::now_ms(),
        )
        .unwrap();
    dispatcher.wake();
    wait_delivered(&store, &[&a], 3).await;
    dispatcher.shutdown().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !am_alerts(&am, &a, true).await.is_empty() {
        assert!(
            Instant::now() < deadline,
            "alert still active after release"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
