//! The outbox worker: routes new alerts to sinks, delivers due rows, and
//! schedules retries. All state is in the store, so a restarted controller
//! carries on where the last one stopped. Of several controller replicas
//! only the leader dispatches ([`Leader`]): one that gains leadership picks
//! up everything pending, as a restarted controller does.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use rand::Rng;
use tokio::{
    sync::{Notify, broadcast, watch},
    task::{JoinHandle, JoinSet},
};

use super::{
    config::{AlertsConfig, ConfigError, RetryConfig, Sink},
    sink::{self, Attempt},
};
use crate::{
    Result,
    hub::Hub,
    k8s::lease::Leader,
    store::{Delivery, Store},
    time::now_ms,
};

/// Most deliveries in flight at once.
const MAX_IN_FLIGHT: usize = 32;
/// Longest sleep between passes when nothing is due and nothing woke us
/// (covers a wake-up missed while a pass ran).
const IDLE_POLL: Duration = Duration::from_secs(1);
/// Shortest time between two passes.
const MIN_PASS_GAP: Duration = Duration::from_millis(20);

/// Handle to the running outbox worker; [`Dispatcher::shutdown`] stops it.
pub struct Dispatcher {
    task: JoinHandle<()>,
    stop: watch::Sender<bool>,
    wake: Arc<Notify>,
}

struct Inner {
    store: Arc<dyn Store>,
    sinks: HashMap<String, Sink>,
    order: Vec<String>,
    retry: RetryConfig,
    client: reqwest::Client,
    in_flight: Mutex<HashSet<i64>>,
}

impl Dispatcher {
    /// Resolves the sinks' secrets and starts the worker. With a `hub`, every
    /// incident change wakes it at once; without, it polls.
    pub fn start(
        store: Arc<dyn Store>,
        config: &AlertsConfig,
        hub: Option<&Hub>,
    ) -> Result<Self, ConfigError> {
        Self::start_with_leader(store, config, hub, Leader::always())
    }

    /// [`Dispatcher::start`] that delivers only while `leader` says this
    /// replica leads: deliveries in flight when leadership is lost are
    /// abandoned (the new leader retries them: at least once).
    pub fn start_with_leader(
        store: Arc<dyn Store>,
        config: &AlertsConfig,
        hub: Option<&Hub>,
        leader: Leader,
    ) -> Result<Self, ConfigError> {
        let sinks = config.resolve()?;
        let client = sink::client(config.retry.timeout()).map_err(|e| ConfigError::Invalid {
            sink: "*".into(),
            message: format!("HTTP client: {e}"),
        })?;
        for s in &sinks {
            tracing::info!(sink = %s.name, kind = s.kind.as_str(), severities = ?s.severities, "alert sink configured");
        }
        let inner = Arc::new(Inner {
            store,
            order: sinks.iter().map(|s| s.name.clone()).collect(),
            sinks: sinks.into_iter().map(|s| (s.name.clone(), s)).collect(),
            retry: config.retry,
            client,
            in_flight: Mutex::new(HashSet::new()),
        });
        let (stop, stop_rx) = watch::channel(false);
        let wake = Arc::new(Notify::new());
        let events = hub.map(Hub::subscribe);
        let task = tokio::spawn(run(inner, stop_rx, wake.clone(), events, leader));
        Ok(Self { task, stop, wake })
    }

    /// Makes the worker look at the outbox now (e.g. after a transition).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Stops the worker; deliveries in flight are abandoned and retried by
    /// the next start (at least once, never lost).
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// Waits for an incident event, then swallows the ones already queued: a
/// burst of detections is one wake-up, not one outbox pass each.
async fn next_event(events: &mut Option<broadcast::Receiver<exfilguard_proto::v1::IncidentEvent>>) {
    let Some(rx) = events else {
        return std::future::pending().await;
    };
    if let Err(broadcast::error::RecvError::Closed) = rx.recv().await {
        *events = None;
        return;
    }
    while let Ok(_) | Err(broadcast::error::TryRecvError::Lagged(_)) = rx.try_recv() {}
}

async fn run(
    inner: Arc<Inner>,
    mut stop: watch::Receiver<bool>,
    wake: Arc<Notify>,
    mut events: Option<broadcast::Receiver<exfilguard_proto::v1::IncidentEvent>>,
    mut leader: Leader,
) {
    let mut tasks = JoinSet::new();
    loop {
        if !leader.is_leader() {
            if !tasks.is_empty() {
                tracing::info!(
                    abandoned = tasks.len(),
                    "no longer the leader: alert deliveries in flight left to the new leader"
                );
                tasks.abort_all();
                while tasks.join_next().await.is_some() {}
                if let Ok(mut f) = inner.in_flight.lock() {
                    f.clear();
                }
            }
            tokio::select! {
                _ = stop.changed() => break,
                _ = leader.changed() => {}
            }
            continue;
        }
        // At most one pass per MIN_PASS_GAP however often we are woken, so a
        // stream of incident events does not turn into a stream of queries.
        let started = tokio::time::Instant::now();
        let wait = match pass(&inner, &mut tasks).await {
            // Due now but already in flight: the task's end wakes us.
            Ok(Some(next)) if next <= now_ms() && !tasks.is_empty() => IDLE_POLL,
            Ok(Some(next)) => Duration::from_millis(next.saturating_sub(now_ms()))
                .clamp(Duration::from_millis(10), IDLE_POLL),
            Ok(None) => IDLE_POLL,
            Err(e) => {
                tracing::warn!(error = %e, "alert outbox pass failed; retrying");
                IDLE_POLL
            }
        };
        tokio::select! {
            _ = stop.changed() => break,
            _ = wake.notified() => {}
            _ = next_event(&mut events) => {}
            _ = tokio::time::sleep(wait) => {}
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            _ = leader.changed() => {}
        }
        tokio::time::sleep_until(started + MIN_PASS_GAP).await;
    }
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| crate::Error::Unavailable(format!("store task: {e}")))?
}

/// One pass: fan out new alerts, start due deliveries. Returns when the
/// next pending row is due.
async fn pass(inner: &Arc<Inner>, tasks: &mut JoinSet<()>) -> Result<Option<u64>> {
    let store = inner.store.clone();
    let unrouted = blocking(move || store.unrouted_alerts(256)).await?;
    // One transaction (one fsync) for the whole batch: a burst of new
    // incidents must not compete with ingest commit by commit.
    let routes: Vec<(i64, Vec<String>)> = unrouted
        .into_iter()
        .map(|u| {
            let names = inner
                .order
                .iter()
                .filter(|n| inner.sinks[*n].takes(&u.alert.severity))
                .cloned()
                .collect();
            (u.event_id, names)
        })
        .collect();
    if !routes.is_empty() {
        let store = inner.store.clone();
        blocking(move || store.route_alerts(&routes, now_ms())).await?;
    }
    // What is in flight BEFORE the read: an attempt that ends between the
    // read and the spawn below leaves its row in `due` as it was before the
    // attempt (stale), and must not be attempted again on that reading.
    let busy = inner
        .in_flight
        .lock()
        .map(|f| f.clone())
        .unwrap_or_default();
    let store = inner.store.clone();
    let due = blocking(move || store.due_deliveries(now_ms(), (MAX_IN_FLIGHT * 4) as u32)).await?;
    for d in due {
        if tasks.len() >= MAX_IN_FLIGHT {
            break;
        }
        if busy.contains(&d.id) {
            continue;
        }
        let fresh = inner
            .in_flight
            .lock()
            .map(|mut f| f.insert(d.id))
            .unwrap_or(false);
        if fresh {
            let inner = inner.clone();
            tasks.spawn(async move {
                let id = d.id;
                if let Err(e) = attempt(&inner, d).await {
                    tracing::warn!(error = %e, "recording an alert delivery failed; it is retried");
                }
                if let Ok(mut f) = inner.in_flight.lock() {
                    f.remove(&id);
                }
            });
        }
    }
    let store = inner.store.clone();
    blocking(move || store.next_delivery_ms()).await
}

/// Exponential back-off with "equal jitter": half fixed, half random, so
/// many alerts failing together do not retry in lockstep.
fn backoff(retry: &RetryConfig, attempts: u32) -> Duration {
    let exp = retry
        .initial_backoff_ms
        .saturating_mul(1u64 << attempts.saturating_sub(1).min(32))
        .min(retry.max_backoff_ms);
    let half = exp / 2;
    Duration::from_millis(half + rand::rng().random_range(0..=half))
}

async fn attempt(inner: &Arc<Inner>, d: Delivery) -> Result<()> {
    let attempts = d.attempts + 1;
    let (Some(sink), Some(alert)) = (inner.sinks.get(&d.sink), d.alert.as_ref()) else {
        let why = if inner.sinks.contains_key(&d.sink) {
            "the stored alert does not parse".to_string()
        } else {
            format!("sink {} is no longer configured", d.sink)
        };
        let store = inner.store.clone();
        return blocking(move || store.delivery_failed(&d, d.attempts, &why, now_ms())).await;
    };
    let outcome = sink::deliver(&inner.client, sink, alert).await;
    let store = inner.store.clone();
    match outcome {
        Attempt::Delivered { status } => {
            tracing::info!(incident = %d.incident_id, sink = %d.sink, transition = %d.transition, attempts, "alert delivered");
            blocking(move || store.delivered(&d, attempts, &format!("HTTP {status}"), now_ms()))
                .await
        }
        Attempt::Rejected { reason } => {
            tracing::error!(incident = %d.incident_id, sink = %d.sink, %reason, "alert refused by the sink");
            blocking(move || store.delivery_failed(&d, attempts, &reason, now_ms())).await
        }
        Attempt::Retry { reason, .. } if attempts >= inner.retry.max_attempts => {
            tracing::error!(incident = %d.incident_id, sink = %d.sink, %reason, attempts, "alert given up");
            let why = format!("last error: {reason}");
            blocking(move || store.delivery_failed(&d, attempts, &why, now_ms())).await
        }
        Attempt::Retry { reason, after } => {
            let cap = Duration::from_millis(inner.retry.max_retry_after_ms);
            let delay = after
                .map(|a| a.min(cap))
                .unwrap_or_else(|| backoff(&inner.retry, attempts));
            tracing::warn!(incident = %d.incident_id, sink = %d.sink, %reason, attempts, retry_in_ms = delay.as_millis() as u64, "alert delivery failed; retrying");
            let next = now_ms() + delay.as_millis() as u64;
            blocking(move || store.retry_later(d.id, attempts, next, &reason)).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_within_jitter_and_caps() {
        let retry = RetryConfig {
            initial_backoff_ms: 100,
            max_backoff_ms: 1_000,
            ..Default::default()
        };
        for (attempts, full) in [
            (1, 100),
            (2, 200),
            (3, 400),
            (4, 800),
            (5, 1_000),
            (40, 1_000),
        ] {
            let d = backoff(&retry, attempts).as_millis() as u64;
            assert!((full / 2..=full).contains(&d), "attempt {attempts}: {d} ms");
        }
    }
}
