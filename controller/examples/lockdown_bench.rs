//! Lockdown latency against kube's in-process mock API server: the time
//! `Containment::lockdown` takes for its four requests (read pod, apply
//! NetworkPolicy, label pod, record Event), i.e. the controller's own cost
//! of a containment without network or API-server time. p50/p99 over a
//! bounded number of lockdowns.
//!
//! cargo run --release -p exfilguard-controller --example lockdown_bench [-- --count 2000 --json out.json]
use std::{path::PathBuf, pin::pin, time::Instant};

use clap::Parser;
use exfilguard_controller::k8s::{
    Containment, ContainmentConfig, DnsEndpoint, LockdownOptions, LockdownOutcome, PodRef,
};
use kube::{Client, client::Body};
use serde_json::json;
use tonic::codegen::http::{Method, Request, Response};

#[derive(Parser)]
struct Args {
    /// Lockdowns to time (after 100 warm-up ones).
    #[arg(long, default_value_t = 2000)]
    count: usize,
    /// Write the measures as JSON (`cargo xtask bench`'s format) here.
    #[arg(long)]
    json: Option<PathBuf>,
}

const UID: &str = "6f1c2b9e-6a49-4d0c-9a57-1b2f0c3d4e5f";

fn answer(req: &Request<Body>) -> serde_json::Value {
    let path = req.uri().path();
    match (req.method(), path) {
        (&Method::POST, _) => json!({"apiVersion": "events.k8s.io/v1", "kind": "Event",
            "metadata": {"name": "e", "namespace": "shop"}, "eventTime": "2026-11-23T11:15:00.000000Z"}),
        (_, p) if p.contains("/networkpolicies/") => json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "exfilguard-lockdown-web-0", "namespace": "shop"},
            "spec": {"podSelector": {}}}),
        _ => json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web-0", "namespace": "shop", "uid": UID, "resourceVersion": "1"},
            "spec": {"containers": [{"name": "app", "image": "web:1"}]}}),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let server = tokio::spawn(async move {
        let mut handle = pin!(handle);
        while let Some((req, send)) = handle.next_request().await {
            let body = serde_json::to_vec(&answer(&req)).expect("json");
            send.send_response(Response::new(Body::from(body)));
        }
    });
    let c = Containment::new(Client::new(svc, "default"), ContainmentConfig::default());
    let pod = PodRef {
        namespace: "shop".into(),
        name: "web-0".into(),
        uid: Some(UID.into()),
    };
    let options = LockdownOptions {
        allow_dns: Some(DnsEndpoint::kube_dns()),
        ..Default::default()
    };
    let mut times = Vec::with_capacity(args.count);
    for i in 0..args.count + 100 {
        let start = Instant::now();
        let out = c
            .lockdown(&pod, "EXFIL-20261123-111500-ab12", &options)
            .await?;
        let took = start.elapsed();
        anyhow::ensure!(
            matches!(out, LockdownOutcome::Contained { .. }),
            "unexpected outcome {out:?}"
        );
        if i >= 100 {
            times.push(took.as_secs_f64() * 1e6);
        }
    }
    drop(c);
    server.await?;
    times.sort_by(f64::total_cmp);
    let q = |p: f64| times[((times.len() - 1) as f64 * p).round() as usize];
    let (p50, p99) = (q(0.50), q(0.99));
    println!(
        "lockdown (mock API, {} runs): p50 {p50:.1} µs, p99 {p99:.1} µs",
        times.len()
    );
    if let Some(path) = &args.json {
        let m = |name: &str, v: f64| json!({"name": name, "value": v, "unit": "us", "goal": "record", "met": true});
        let measures = json!([
            m("lockdown.mock_api_p50", p50),
            m("lockdown.mock_api_p99", p99)
        ]);
        std::fs::write(path, serde_json::to_string_pretty(&measures)? + "\n")?;
    }
    Ok(())
}
