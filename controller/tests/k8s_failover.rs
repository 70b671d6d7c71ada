//! Two controller replicas on one (test) API namespace, as the Deployment
//! runs them: incidents in ExfilIncident objects, a leader elected on a
//! Lease (1 s here), alerts to a real webhook on 127.0.0.1. An agent on the
//! follower opens an incident: the follower contains it (its agent's Block),
//! the leader alerts. The leader dies without releasing the Lease; the
//! follower takes over within the bound, and a new incident opened after
//! that is alerted by it. Every (incident, transition) reaches the sink
//! exactly once and in order: nothing lost, nothing doubled across the
//! failover. (A leader that dies between the sink's answer and recording it
//! leaves the alert to be sent again by the next; the alert carries its
//! `dedup_key` for that case.)

mod support;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{Json, Router, extract::State, routing::post};
use exfilguard_controller::{
    alerts::{
        AlertsConfig, SinkKind,
        config::{RetryConfig, SecretSource, SinkConfig},
    },
    config::FileConfig,
    correlate::ResponsePolicy,
    k8s::lease::LeaseConfig,
    server::{self, KubeDuties, ServerConfig},
};
use exfilguard_proto::v1::{PolicyAction, Workload};
use kube::{Client, client::Body};
use serde_json::Value;
use support::{agent::TestAgent, shared_api::SharedApi};
use tonic::{
    codegen::http::{Request, Response},
    transport::Channel,
};
use tower_test::mock;

const NS: &str = "exfilguard-system";
const LEASE: Duration = Duration::from_millis(1_000);
const RETRY: Duration = Duration::from_millis(100);

/// The webhook: what it received, by (incident, transition).
type Received = Arc<Mutex<BTreeMap<(String, String), u32>>>;

/// The order transitions arrived in, per incident.
type Order = Arc<Mutex<BTreeMap<String, Vec<String>>>>;

async fn webhook() -> (String, Received, Order) {
    let received: Received = Arc::default();
    let order: Order = Arc::default();
    let app = Router::new()
        .route(
            "/hook",
            post(
                |State((r, o)): State<(Received, Order)>, Json(body): Json<Value>| async move {
                    let id = body["incident_id"].as_str().unwrap_or_default().to_string();
                    let transition = body["transition"].as_str().unwrap_or_default().to_string();
                    o.lock()
                        .unwrap()
                        .entry(id.clone())
                        .or_default()
                        .push(transition.clone());
                    *r.lock().unwrap().entry((id, transition)).or_default() += 1;
                    "ok"
                },
            ),
        )
        .with_state((received.clone(), order.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/hook"), received, order)
}

/// A controller replica served on 127.0.0.1.
struct Replica {
    addr: SocketAddr,
    served: tokio::task::JoinHandle<()>,
    /// Its connection to the API server.
    api: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Replica {
    async fn start(identity: &str, api: &SharedApi, hook: &str) -> Replica {
        let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
        let api = api.serve(handle);
        let dir = tempfile::tempdir().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let config = ServerConfig {
            policy: ResponsePolicy {
                critical: PolicyAction::Lockdown,
                ..Default::default()
            },
            file: FileConfig {
                alerts: AlertsConfig {
                    retry: RetryConfig {
                        initial_backoff_ms: 50,
                        max_backoff_ms: 200,
                        max_attempts: 30,
                        timeout_ms: 2_000,
                        max_retry_after_ms: 1_000,
                    },
                    sinks: vec![SinkConfig {
                        name: "hook".into(),
                        kind: SinkKind::Webhook,
                        url: SecretSource {
                            value: Some(hook.into()),
                            ..Default::default()
                        },
                        routing_key: SecretSource::default(),
                        severities: Vec::new(),
                        source: None,
                    }],
                },
                ..Default::default()
            },
            kube: Some(Client::new(svc, "default")),
            duties: KubeDuties {
                containment: false,
                evidence: false,
                exfilpolicies: false,
                incidents: true,
            },
            namespace: NS.into(),
            leader_election: Some(LeaseConfig {
                namespace: NS.into(),
                name: "exfilguard-controller".into(),
                identity: identity.into(),
                lease_duration: LEASE,
                renew_every: Duration::from_millis(300),
                retry_every: RETRY,
            }),
            ..ServerConfig::new(dir.path().join("c.db"), None)
        };
        let served = tokio::spawn(async move {
            server::serve(config, listener, std::future::pending())
                .await
                .expect("serve");
        });
        Replica {
            addr,
            served,
            api,
            _dir: dir,
        }
    }

    /// Dies as a crashed pod does: its API connection goes first, so the
    /// Lease is not released on the way out.
    fn crash(&self) {
        self.api.abort();
        self.served.abort();
    }

    async fn channel(&self) -> Channel {
        support::agent::channel(self.addr).await
    }
}

fn pod(name: &str, cgroup_id: u64) -> Workload {
    Workload {
        namespace: "shop".into(),
        pod: name.into(),
        cgroup_id,
        ..Default::default()
    }
}

async fn until(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn count(received: &Received, id: &str, transition: &str) -> u32 {
    received
        .lock()
        .unwrap()
        .get(&(id.to_string(), transition.to_string()))
        .copied()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_follower_takes_over_and_no_alert_is_lost_or_doubled() {
    let api = SharedApi::new(NS);
    let (hook, received, order) = webhook().await;
    let a = Replica::start("replica-a", &api, &hook).await;
    until("a leads", Duration::from_secs(5), || {
        api.lease_holder("exfilguard-controller").as_deref() == Some("replica-a")
    })
    .await;
    let b = Replica::start("replica-b", &api, &hook).await;

    // n1's agent is on the follower, b: b contains (the Block), a alerts.
    let mut agent = TestAgent::connect(b.channel().await, "n1").await;
    agent.detect(1, pod("db-0", 7)).await;
    let first = agent.block().await.incident_id;
    until(
        "both alerts of the first incident",
        Duration::from_secs(10),
        || count(&received, &first, "opened") == 1 && count(&received, &first, "contained") == 1,
    )
    .await;

    // The leader records the deliveries in the incident (what the next
    // leader goes by), then dies without releasing the Lease.
    let name = first.to_ascii_lowercase();
    until(
        "the deliveries recorded in the object",
        Duration::from_secs(10),
        || {
            api.object(&name).is_some_and(|o| {
                o["status"]["deliveries"]
                    .as_array()
                    .is_some_and(|d| d.len() == 2 && d.iter().all(|d| d["state"] == "delivered"))
            })
        },
    )
    .await;
    let died = Instant::now();
    a.crash();
    // Bounded: lease + a follower period, with room for a loaded machine.
    until("b takes over", LEASE * 3 + Duration::from_secs(2), || {
        api.lease_holder("exfilguard-controller").as_deref() == Some("replica-b")
    })
    .await;
    let failover = died.elapsed();
    println!("failover after the leader died: {failover:?} (lease {LEASE:?}, retry {RETRY:?})");
    // Not before the Lease could have expired: a crashed leader is waited out.
    assert!(
        failover >= LEASE - RETRY * 3,
        "took over a live lease after {failover:?}"
    );

    // A new incident after the failover: b contains and alerts it.
    agent.detect(2, pod("etl-5", 8)).await;
    let second = agent.block().await.incident_id;
    assert_ne!(first, second);
    until(
        "both alerts of the second incident",
        Duration::from_secs(10),
        || count(&received, &second, "opened") == 1 && count(&received, &second, "contained") == 1,
    )
    .await;
    // Nothing doubled while the sink is watched a little longer.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let all = received.lock().unwrap().clone();
    assert_eq!(all.len(), 4, "{all:?}");
    assert!(all.values().all(|n| *n == 1), "{all:?}");
    // Each incident's alerts in the order of its transitions.
    for (id, transitions) in order.lock().unwrap().iter() {
        assert_eq!(transitions, &["opened", "contained"], "{id}");
    }
    drop(agent);
    b.crash();
}
