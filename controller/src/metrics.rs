//! The controller's Prometheus metrics (ingest latency and throughput, agent
//! streams) and the small HTTP server that exposes them on `/metrics`.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::AtomicU64},
    time::Duration,
};

use axum::{Router, extract::State, http::header, response::IntoResponse, routing::get};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

/// Upper bounds (seconds) of the ingest and commit latency buckets: fine
/// around the 50 ms goal, so "stored within 50 ms" is read off one bucket.
const LATENCY_BUCKETS: [f64; 18] = [
    0.001, 0.002, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.25, 0.5,
    1.0, 2.5, 10.0,
];

/// Outcome of one agent message at the store.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// `new`, `duplicate` or `failed`.
    pub outcome: &'static str,
}

impl OutcomeLabel {
    /// Stored for the first time.
    pub const NEW: Self = Self { outcome: "new" };
    /// Already stored (an agent's resend).
    pub const DUPLICATE: Self = Self {
        outcome: "duplicate",
    };
    /// Not stored (the agent resends it).
    pub const FAILED: Self = Self { outcome: "failed" };
}

/// Every metric the controller exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Seconds from receiving an agent message to the commit that made it
    /// durable (when it may be acknowledged), per message.
    pub ingest_seconds: Histogram,
    /// Seconds an agent message waits, from being received until its batch
    /// starts storing (the part of `ingest_seconds` that is not its commit).
    pub queue_seconds: Histogram,
    /// Seconds to store and commit one batch.
    pub commit_seconds: Histogram,
    /// Seconds the ingest writer spent storing and answering, not waiting
    /// for messages: its rate is how busy the single writer is (1 = saturated).
    pub writer_busy_seconds: Counter<f64, AtomicU64>,
    /// Messages per committed batch.
    pub batch_messages: Histogram,
    /// Agent messages by outcome.
    pub messages: Family<OutcomeLabel, Counter>,
    /// Agent streams connected now.
    pub agent_streams: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every metric at zero.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("exfilguard_controller");
        let m = Self {
            registry: Registry::default(),
            ingest_seconds: Histogram::new(LATENCY_BUCKETS),
            queue_seconds: Histogram::new(LATENCY_BUCKETS),
            commit_seconds: Histogram::new(LATENCY_BUCKETS),
            writer_busy_seconds: Counter::default(),
            batch_messages: Histogram::new((0..11).map(|i| f64::from(1u32 << i))),
            messages: Family::default(),
            agent_streams: Gauge::default(),
        };
        registry.register(
            "ingest_seconds",
            "Time from receiving an agent message to its durable commit",
            m.ingest_seconds.clone(),
        );
        registry.register(
            "queue_seconds",
            "Time from receiving an agent message until its batch starts storing",
            m.queue_seconds.clone(),
        );
        registry.register(
            "writer_busy_seconds",
            "Time the ingest writer spent storing and answering batches",
            m.writer_busy_seconds.clone(),
        );
        registry.register(
            "commit_seconds",
            "Time to store and commit one batch of agent messages",
            m.commit_seconds.clone(),
        );
        registry.register(
            "batch_messages",
            "Agent messages per committed batch",
            m.batch_messages.clone(),
        );
        registry.register(
            "messages",
            "Agent messages by outcome at the store",
            m.messages.clone(),
        );
        registry.register(
            "agent_streams",
            "Agent streams connected now",
            m.agent_streams.clone(),
        );
        Self { registry, ..m }
    }

    /// Counts an agent stream until the returned guard is dropped.
    pub fn agent_stream(&self) -> StreamGuard {
        self.agent_streams.inc();
        StreamGuard(self.agent_streams.clone())
    }

    /// Records a committed batch: its duration and size.
    pub fn batch(&self, took: Duration, messages: usize) {
        self.commit_seconds.observe(took.as_secs_f64());
        self.batch_messages.observe(messages as f64);
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut s = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut s, &self.registry);
        s
    }
}

/// Keeps one agent stream counted in `agent_streams`.
#[derive(Debug)]
pub struct StreamGuard(Gauge);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

async fn metrics(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.encode(),
    )
}

/// The routes: `/metrics` and `/healthz`.
pub fn router(m: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(m)
}

/// Binds `addr` and serves in the background; returns the bound address
/// (useful with port 0). The task ends with the runtime.
pub async fn serve(addr: SocketAddr, m: Arc<Metrics>) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router(m)).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_counted_while_their_guard_lives() {
        let m = Metrics::new();
        let a = m.agent_stream();
        let b = m.agent_stream();
        assert_eq!(m.agent_streams.get(), 2);
        drop(a);
        assert_eq!(m.agent_streams.get(), 1);
        drop(b);
        assert_eq!(m.agent_streams.get(), 0);
    }

    #[test]
    fn the_exposition_names_every_metric() {
        let m = Metrics::new();
        m.ingest_seconds.observe(0.003);
        m.batch(Duration::from_millis(1), 40);
        m.messages.get_or_create(&OutcomeLabel::NEW).inc_by(40);
        let text = m.encode();
        for line in [
            "exfilguard_controller_ingest_seconds_bucket{le=\"0.005\"} 1",
            "exfilguard_controller_ingest_seconds_bucket{le=\"0.002\"} 0",
            "exfilguard_controller_commit_seconds_count 1",
            "exfilguard_controller_queue_seconds_count 0",
            "exfilguard_controller_writer_busy_seconds_total 0.0",
            "exfilguard_controller_batch_messages_bucket{le=\"64.0\"} 1",
            "exfilguard_controller_messages_total{outcome=\"new\"} 40",
            "exfilguard_controller_agent_streams 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
    }
}
