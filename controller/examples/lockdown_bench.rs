//! Time from a detection reaching the controller to its containment going
//! out: the in-kernel Block arriving on the agent's stream, and the lockdown
//! NetworkPolicy's apply request arriving at the API server (kube's
//! in-process mock, so API-server time is not in it). The controller runs in
//! this process on 127.0.0.1 with a real SQLite file and the real gRPC agent
//! stream; each detection is a new pod's, so each opens (and commits) an
//! incident. p50/p99 over a bounded number of incidents, one at a time.
//!
//! cargo run --release -p exfilguard-controller --example lockdown_bench [-- --count 300 --json out.json]
use std::{
    collections::HashMap,
    path::PathBuf,
    pin::pin,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::Parser;
use exfilguard_controller::server::{self, KubeDuties, ServerConfig};
use exfilguard_proto::v1::{
    AgentMessage, Detection, DetectionKind, Evidence, Hello, Severity, Workload,
    agent_gateway_client::AgentGatewayClient, agent_message, controller_message,
};
use kube::{Client, client::Body};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::http::{Method, Request, Response};

#[derive(Parser)]
struct Args {
    /// Incidents to time (after 20 warm-up ones).
    #[arg(long, default_value_t = 300)]
    count: usize,
    /// Write the measures as JSON (`cargo xtask bench`'s format) here.
    #[arg(long)]
    json: Option<PathBuf>,
}

const WARM_UP: usize = 20;
const WAIT: Duration = Duration::from_secs(10);

fn pod_name(i: usize) -> String {
    format!("web-{i}")
}

/// The mock API server's answer to each request of a lockdown.
fn answer(req: &Request<Body>) -> serde_json::Value {
    let path = req.uri().path();
    let pod = path.rsplit('/').next().unwrap_or("web-0");
    match *req.method() {
        // The evidence capture's list of the pod's Events.
        Method::GET if path.ends_with("/events") => {
            json!({"apiVersion": "v1", "kind": "EventList", "metadata": {}, "items": []})
        }
        Method::POST => json!({"apiVersion": "events.k8s.io/v1", "kind": "Event",
            "metadata": {"name": "e", "namespace": "shop"}, "eventTime": "2026-11-23T11:15:00.000000Z"}),
        _ if path.contains("/networkpolicies/") => json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": pod, "namespace": "shop"}, "spec": {"podSelector": {}}}),
        _ => json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod, "namespace": "shop", "uid": "6f1c2b9e-6a49-4d0c-9a57-1b2f0c3d4e5f",
                "resourceVersion": "1"},
            "spec": {"containers": [{"name": "app", "image": "web:1"}]}}),
    }
}

fn detection(i: usize) -> AgentMessage {
    AgentMessage {
        seq: i as u64 + 1,
        sent_at_unix_ms: 1,
        payload: Some(agent_message::Payload::Detection(Detection {
            detection_id: format!("det-{i}"),
            kind: DetectionKind::Volume as i32,
            severity: Severity::Critical as i32,
            workload: Some(Workload {
                namespace: "shop".into(),
                pod: pod_name(i),
                cgroup_id: 1000 + i as u64,
                ..Default::default()
            }),
            summary: "150 MB to 203.0.113.7:443 in 10 min".into(),
            bytes_estimate: 150_000_000,
            window_seconds: 600,
            threshold: 100_000_000,
            evidence: Some(Evidence::default()),
            ..Default::default()
        })),
    }
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;

    // When each pod's NetworkPolicy apply request came in.
    let applied: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let seen = applied.clone();
    tokio::spawn(async move {
        let mut handle = pin!(handle);
        while let Some((req, send)) = handle.next_request().await {
            if req.method() == Method::PATCH && req.uri().path().contains("/networkpolicies/") {
                let name = req.uri().path().rsplit('/').next().unwrap_or_default();
                let pod = name.trim_start_matches("exfilguard-lockdown-").to_owned();
                seen.lock().expect("lock").insert(pod, Instant::now());
            }
            let body = serde_json::to_vec(&answer(&req)).expect("json");
            send.send_response(Response::new(Body::from(body)));
        }
    });

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let config = ServerConfig {
        kube: Some(Client::new(svc, "default")),
        duties: KubeDuties {
            exfilpolicies: false,
            incidents: false,
            ..Default::default()
        },
        ..ServerConfig::new(dir.path().join("controller.db"), None)
    };
    tokio::spawn(server::serve(config, listener, std::future::pending()));

    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?;
    let mut channel = None;
    for _ in 0..50 {
        if let Ok(ch) = endpoint.connect().await {
            channel = Some(ch);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let channel = channel.context("controller did not come up")?;
    let (tx, out) = mpsc::channel(16);
    tx.send(AgentMessage {
        payload: Some(agent_message::Payload::Hello(Hello {
            node_name: "bench-node".into(),
            agent_version: "bench".into(),
            ..Default::default()
        })),
        ..Default::default()
    })
    .await?;
    let mut rx = AgentGatewayClient::new(channel)
        .connect(ReceiverStream::new(out))
        .await?
        .into_inner();

    let (mut to_block, mut to_policy) = (Vec::new(), Vec::new());
    for i in 0..args.count + WARM_UP {
        let start = Instant::now();
        tx.send(detection(i)).await?;
        let blocked = loop {
            let msg = tokio::time::timeout(WAIT, rx.message())
                .await
                .context("no Block in time")??
                .context("stream closed")?;
            if let Some(controller_message::Payload::Block(b)) = msg.payload {
                if b.cgroup_id != 1000 + i as u64 {
                    bail!(
                        "Block for cgroup {} while waiting for {}",
                        b.cgroup_id,
                        1000 + i
                    );
                }
                break Instant::now();
            }
        };
        let deadline = Instant::now() + WAIT;
        let policy = loop {
            if let Some(t) = applied.lock().expect("lock").get(&pod_name(i)) {
                break *t;
            }
            if Instant::now() > deadline {
                bail!("no NetworkPolicy for {} in time", pod_name(i));
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        };
        if i >= WARM_UP {
            to_block.push((blocked - start).as_secs_f64() * 1e3);
            to_policy.push((policy.saturating_duration_since(start)).as_secs_f64() * 1e3);
        }
    }
    let (b50, b99) = (
        percentile(to_block.clone(), 0.5),
        percentile(to_block, 0.99),
    );
    let (p50, p99) = (
        percentile(to_policy.clone(), 0.5),
        percentile(to_policy, 0.99),
    );
    println!(
        "detection → Block on the agent's stream ({n} incidents): p50 {b50:.2} ms, p99 {b99:.2} ms\n\
         detection → NetworkPolicy apply at the (mock) API server: p50 {p50:.2} ms, p99 {p99:.2} ms",
        n = args.count
    );
    if let Some(path) = &args.json {
        let m = |name: &str, v: f64| json!({"name": name, "value": v, "unit": "ms", "goal": "record", "met": true});
        let measures = json!([
            m("lockdown.detection_to_block_p50", b50),
            m("lockdown.detection_to_block_p99", b99),
            m("lockdown.detection_to_networkpolicy_p50", p50),
            m("lockdown.detection_to_networkpolicy_p99", p99),
        ]);
        std::fs::write(path, serde_json::to_string_pretty(&measures)? + "\n")?;
    }
    Ok(())
}
