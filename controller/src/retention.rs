//! Egress aggregates age out of the store.
//!
//! Every agent's FlowReports add rows to `egress` for as long as the
//! controller runs; without a limit the file grows until the disk is full.
//! Incidents, their timelines and evidence are kept: only the per-window
//! aggregates behind TopTalkers and the reports' egress chart expire.

use std::{sync::Arc, time::Duration};

use crate::{Result, store::Store, time::now_ms};

/// How long egress aggregates are kept unless configured: longer than the
/// 72-hour notification clock and a month of looking back on an incident.
pub const DEFAULT_EGRESS_RETENTION: Duration = Duration::from_secs(30 * 86_400);

/// How often the pruner looks for expired rows.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// Rows deleted per transaction: each chunk holds the store's write lock, so
/// it is kept small (2.4-8 ms per chunk on a copy of a benchmark store) and
/// agent messages commit in between.
const CHUNK: u32 = 2_000;

/// Chunks per round, so one round is bounded even after a long outage; what
/// is left goes in the next round.
const MAX_CHUNKS: usize = 500;

/// Deletes egress aggregates whose window ended more than `keep` before
/// `now_ms`, in chunks; returns how many rows went.
pub async fn prune_egress(store: Arc<dyn Store>, now_ms: u64, keep: Duration) -> Result<u64> {
    let before = now_ms.saturating_sub(u64::try_from(keep.as_millis()).unwrap_or(u64::MAX));
    let mut total = 0;
    for _ in 0..MAX_CHUNKS {
        let s = store.clone();
        let deleted = tokio::task::spawn_blocking(move || s.prune_egress(before, CHUNK))
            .await
            .map_err(|e| crate::Error::Unavailable(format!("prune task: {e}")))??;
        total += deleted;
        if deleted < u64::from(CHUNK) {
            break;
        }
        // Lets the ingest writer take the lock between chunks.
        tokio::task::yield_now().await;
    }
    Ok(total)
}

/// Prunes every [`PRUNE_EVERY`] until the task is aborted.
pub fn spawn_egress_pruner(store: Arc<dyn Store>, keep: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(PRUNE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match prune_egress(store.clone(), now_ms(), keep).await {
                Ok(0) => {}
                Ok(rows) => tracing::info!(rows, keep = ?keep, "expired egress aggregates deleted"),
                // Not fatal: the next round tries again.
                Err(e) => tracing::warn!(error = %e, "pruning expired egress aggregates failed"),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use exfilguard_proto::v1::{FlowReport, Workload, WorkloadEgress};

    use super::*;
    use crate::correlate::ResponsePolicy;
    use crate::store::{AgentInfo, Ingest, Payload, sqlite::SqliteStore};

    const DAY_MS: u64 = 86_400_000;

    fn flow(seq: u64, window_end_ms: u64, pod: &str) -> Ingest {
        Ingest {
            node: "n1".into(),
            seq,
            sent_at_ms: window_end_ms,
            received_ms: window_end_ms,
            payload: Payload::Flow(FlowReport {
                window_end_unix_ms: window_end_ms,
                workloads: vec![WorkloadEgress {
                    workload: Some(Workload {
                        namespace: "shop".into(),
                        pod: pod.into(),
                        ..Default::default()
                    }),
                    external_bytes: 1000,
                    ..Default::default()
                }],
                ..Default::default()
            }),
        }
    }

    #[tokio::test]
    async fn aggregates_older_than_the_retention_go_in_chunks_and_newer_stay() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("c.db")).unwrap());
        store
            .hello(
                &AgentInfo {
                    node: "n1".into(),
                    ..Default::default()
                },
                1,
            )
            .unwrap();
        let now = 100 * DAY_MS;
        // More expired rows than one chunk, then a day's worth that stays.
        let old = u64::from(CHUNK) * 2 + 7;
        let batch: Vec<Ingest> = (1..=old)
            .map(|seq| flow(seq, now - 40 * DAY_MS + seq, "old-0"))
            .chain((1..=5).map(|i| flow(old + i, now - DAY_MS + i, "new-0")))
            .collect();
        store.ingest(&batch, &ResponsePolicy::default()).unwrap();

        let deleted = prune_egress(store.clone(), now, DEFAULT_EGRESS_RETENTION)
            .await
            .unwrap();
        assert_eq!(deleted, old);
        let talkers = store.top_talkers(0, 10, None).unwrap();
        assert_eq!(talkers.len(), 1, "{talkers:?}");
        assert_eq!(talkers[0].workload.as_ref().unwrap().pod, "new-0");
        assert_eq!(talkers[0].external_bytes, 5000);
        // Nothing left to expire: a second round deletes nothing.
        let again = prune_egress(store.clone(), now, DEFAULT_EGRESS_RETENTION)
            .await
            .unwrap();
        assert_eq!(again, 0);
    }
}
