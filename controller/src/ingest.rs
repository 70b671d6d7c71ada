//! Group commit: messages from every agent stream are stored in batches, one
//! transaction (one fsync) per batch, and each sender learns its own outcome
//! only after the commit. This is what makes "ack only after durable commit"
//! cheap enough for hundreds of agents.

use std::{
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use tokio::sync::{mpsc, oneshot};

use crate::{
    Error, Result,
    correlate::ResponsePolicy,
    hub::Hub,
    metrics::{Metrics, OutcomeLabel},
    store::{AgentInfo, Ingest, IngestOutcome, Store},
    time::now_ms,
};

/// Most messages committed in one transaction.
const MAX_BATCH: usize = 1024;

/// Shortest time between two commits. Without it the writer, once fast,
/// committed ~700 batches of ~30 messages a second under 500 agents, each
/// rewriting the same `agents` pages and paying an fsync; 2 ms cut the
/// controller's CPU by about a tenth at the same tail latency (5 ms raised
/// the median for no further gain).
const MIN_COMMIT_INTERVAL: Duration = Duration::from_millis(2);

/// Whether a stored message was new.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// Newly stored.
    New,
    /// Already stored earlier (resend).
    Duplicate,
}

/// Work for the writer thread.
enum Job {
    /// An agent message to store.
    Message {
        msg: Ingest,
        /// When the gateway handed it over: the start of ingest→stored.
        received: Instant,
        reply: oneshot::Sender<Result<Stored>>,
    },
    /// An agent's Hello: committed with the other Hellos waiting, so a fleet
    /// reconnecting at once (a controller restart) costs a few commits, not
    /// one fsync per node while the first streams already wait to be stored.
    Hello {
        info: AgentInfo,
        reply: oneshot::Sender<Result<u64>>,
    },
}

/// Handle to the batching writer thread.
#[derive(Clone)]
pub struct Ingestor {
    jobs: mpsc::Sender<Job>,
    metrics: Arc<Metrics>,
}

impl Ingestor {
    /// Starts the writer thread; `queue` bounds messages waiting for a commit
    /// (back-pressure on the agent streams when the disk is slow).
    pub fn start(
        store: Arc<dyn Store>,
        hub: Arc<Hub>,
        policy: ResponsePolicy,
        queue: usize,
        metrics: Arc<Metrics>,
    ) -> Result<Self> {
        let (tx, rx) = mpsc::channel(queue.max(1));
        let writer = Writer {
            store,
            hub,
            policy,
            metrics: metrics.clone(),
        };
        thread::Builder::new()
            .name("ingest".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| Error::Unavailable(format!("cannot start the ingest thread: {e}")))?;
        Ok(Self { jobs: tx, metrics })
    }

    /// The metrics the writer records into.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Queues `msg`; the receiver resolves after its batch committed.
    pub async fn submit(&self, msg: Ingest) -> Result<oneshot::Receiver<Result<Stored>>> {
        let (reply, rx) = oneshot::channel();
        let received = Instant::now();
        self.send(Job::Message {
            msg,
            received,
            reply,
        })
        .await?;
        Ok(rx)
    }

    /// Records an agent's Hello; returns the node's highest stored sequence number.
    pub async fn hello(&self, info: AgentInfo) -> Result<u64> {
        let (reply, rx) = oneshot::channel();
        self.send(Job::Hello { info, reply }).await?;
        rx.await
            .map_err(|_| Error::Unavailable("the store writer stopped".into()))?
    }

    async fn send(&self, job: Job) -> Result<()> {
        self.jobs
            .send(job)
            .await
            .map_err(|_| Error::Unavailable("the store writer stopped".into()))
    }
}

/// Commits waiting Hellos together; if that fails, one by one, so only a
/// failing one gets the error.
fn say_hellos(
    store: &dyn Store,
    infos: &mut Vec<AgentInfo>,
    replies: &mut Vec<oneshot::Sender<Result<u64>>>,
) {
    match store.hellos(infos, now_ms()) {
        Ok(last) => {
            for (reply, seq) in replies.drain(..).zip(last) {
                let _ = reply.send(Ok(seq));
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, size = infos.len(), "Hello batch failed; retrying one by one");
            for (info, reply) in infos.iter().zip(replies.drain(..)) {
                let _ = reply.send(store.hello(info, now_ms()));
            }
        }
    }
    infos.clear();
}

/// The error for a message the store gave no outcome for: the agent keeps it
/// and resends, rather than dropping a message that may not be stored.
fn no_outcome() -> Error {
    Error::Unavailable("the store answered no outcome for this message; resend it".into())
}

/// A sender waiting for its message's batch to commit.
struct Waiting {
    /// When the gateway handed the message over: the start of ingest→stored.
    received: Instant,
    reply: oneshot::Sender<Result<Stored>>,
}

/// The writer thread's state.
struct Writer {
    store: Arc<dyn Store>,
    hub: Arc<Hub>,
    policy: ResponsePolicy,
    metrics: Arc<Metrics>,
}

impl Writer {
    fn run(self, mut rx: mpsc::Receiver<Job>) {
        let mut msgs: Vec<Ingest> = Vec::with_capacity(MAX_BATCH);
        let mut waiting: Vec<Waiting> = Vec::with_capacity(MAX_BATCH);
        let mut hellos: Vec<AgentInfo> = Vec::new();
        let mut hello_replies = Vec::new();
        let mut last_commit = Instant::now();
        while let Some(first) = rx.blocking_recv() {
            // Group commit: wait out the commit interval so the batch gathers
            // what arrives meanwhile (when the writer is busy, it has passed).
            let due = last_commit + MIN_COMMIT_INTERVAL;
            let now = Instant::now();
            if now < due {
                thread::sleep(due - now);
            }
            last_commit = Instant::now();
            let mut next = Some(first);
            while let Some(job) = next {
                match job {
                    Job::Message {
                        msg,
                        received,
                        reply,
                    } => {
                        msgs.push(msg);
                        waiting.push(Waiting { received, reply });
                    }
                    Job::Hello { info, reply } => {
                        hellos.push(info);
                        hello_replies.push(reply);
                    }
                }
                next = if msgs.len() + hellos.len() < MAX_BATCH {
                    rx.try_recv().ok()
                } else {
                    None
                };
            }
            // A node's messages only come after its Hello was answered, so the
            // Hellos of this batch go first.
            if !hellos.is_empty() {
                say_hellos(self.store.as_ref(), &mut hellos, &mut hello_replies);
            }
            if !msgs.is_empty() {
                self.store_batch(&mut msgs, &mut waiting);
            }
            self.metrics
                .writer_busy_seconds
                .inc_by(last_commit.elapsed().as_secs_f64());
        }
    }

    /// Stores one batch in one transaction and answers each sender; both
    /// vectors are empty afterwards.
    fn store_batch(&self, msgs: &mut Vec<Ingest>, waiting: &mut Vec<Waiting>) {
        let started = Instant::now();
        for w in waiting.iter() {
            self.metrics
                .queue_seconds
                .observe((started - w.received).as_secs_f64());
        }
        let outcomes = self.store.ingest(msgs, &self.policy);
        let committed = Instant::now();
        match outcomes {
            Ok(outcomes) => {
                self.metrics.batch(committed - started, msgs.len());
                msgs.clear();
                let (mut new, mut duplicate, mut failed) = (0, 0, 0);
                let mut outcomes = outcomes.into_iter();
                for w in waiting.drain(..) {
                    // A store that answers fewer outcomes than messages is a
                    // bug; the unanswered ones must not be taken as stored.
                    let Some(outcome) = outcomes.next() else {
                        failed += 1;
                        let _ = w.reply.send(Err(no_outcome()));
                        continue;
                    };
                    self.metrics
                        .ingest_seconds
                        .observe((committed - w.received).as_secs_f64());
                    let stored = self.settle(outcome);
                    match stored {
                        Stored::New => new += 1,
                        Stored::Duplicate => duplicate += 1,
                    }
                    // The stream may have gone; its agent resends.
                    let _ = w.reply.send(Ok(stored));
                }
                self.count(OutcomeLabel::NEW, new);
                self.count(OutcomeLabel::DUPLICATE, duplicate);
                self.count(OutcomeLabel::FAILED, failed);
            }
            Err(batch_err) => self.one_by_one(batch_err, msgs, waiting),
        }
    }

    /// What a stored message means for its sender; a new one's effects
    /// (incident events, commands) go out through the hub.
    fn settle(&self, outcome: IngestOutcome) -> Stored {
        match outcome {
            IngestOutcome::Stored(effects) => {
                self.hub.apply(self.store.as_ref(), effects);
                Stored::New
            }
            IngestOutcome::Duplicate => Stored::Duplicate,
        }
    }

    fn count(&self, outcome: OutcomeLabel, n: u64) {
        if n > 0 {
            self.metrics.messages.get_or_create(&outcome).inc_by(n);
        }
    }

    /// One message must not fail the others: after a failed batch, retry one
    /// by one so only the culprit gets the error. Once a node's message
    /// failed, its later ones in this batch fail too: storing them would raise
    /// the node's high-water mark past the failed one, which would then be
    /// taken for a duplicate when resent.
    fn one_by_one(&self, batch_err: Error, msgs: &mut Vec<Ingest>, waiting: &mut Vec<Waiting>) {
        tracing::warn!(error = %batch_err, size = msgs.len(), "batch failed; retrying messages one by one");
        let mut failed_nodes = std::collections::HashSet::new();
        for (msg, w) in msgs.drain(..).zip(waiting.drain(..)) {
            if failed_nodes.contains(&msg.node) {
                self.count(OutcomeLabel::FAILED, 1);
                let _ = w.reply.send(Err(Error::Unavailable(format!(
                    "an earlier message of node {} failed to store; resend from there",
                    msg.node
                ))));
                continue;
            }
            let result = self
                .store
                .ingest(std::slice::from_ref(&msg), &self.policy)
                .and_then(|mut o| o.pop().map(|o| self.settle(o)).ok_or_else(no_outcome));
            let label = match result {
                Ok(Stored::New) => OutcomeLabel::NEW,
                Ok(Stored::Duplicate) => OutcomeLabel::DUPLICATE,
                Err(_) => OutcomeLabel::FAILED,
            };
            self.count(label, 1);
            if result.is_ok() {
                self.metrics
                    .ingest_seconds
                    .observe(w.received.elapsed().as_secs_f64());
            } else {
                failed_nodes.insert(msg.node);
            }
            let _ = w.reply.send(result);
        }
    }
}

#[cfg(test)]
mod tests {
    use exfilguard_proto::v1::{FlowReport, Workload, WorkloadEgress};

    use super::*;
    use crate::store::{Payload, sqlite::SqliteStore};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hellos_and_messages_share_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("c.db")).unwrap());
        let ingestor = Ingestor::start(
            store.clone(),
            Hub::new(4),
            ResponsePolicy::default(),
            64,
            Arc::new(Metrics::new()),
        )
        .unwrap();
        // A fleet saying Hello at once, then each node's first message.
        let tasks: Vec<_> = (0..40)
            .map(|i| {
                let ingestor = ingestor.clone();
                tokio::spawn(async move {
                    let node = format!("node-{i}");
                    let last = ingestor
                        .hello(AgentInfo {
                            node: node.clone(),
                            ..Default::default()
                        })
                        .await
                        .unwrap();
                    assert_eq!(last, 0);
                    let stored = ingestor
                        .submit(Ingest {
                            node,
                            seq: 1,
                            sent_at_ms: 1,
                            received_ms: 2,
                            payload: Payload::Flow(FlowReport::default()),
                        })
                        .await
                        .unwrap()
                        .await
                        .unwrap()
                        .unwrap();
                    assert_eq!(stored, Stored::New);
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let nodes = store.list_nodes().unwrap();
        assert_eq!(nodes.len(), 40);
        assert!(nodes.iter().all(|n| n.last_seq == 1));
        // A reconnecting node learns its high-water mark.
        let again = ingestor
            .hello(AgentInfo {
                node: "node-3".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(again, 1);
    }

    fn flow(node: &str, seq: u64, namespace: &str) -> Ingest {
        Ingest {
            node: node.into(),
            seq,
            sent_at_ms: 1,
            received_ms: 2,
            payload: Payload::Flow(FlowReport {
                workloads: vec![WorkloadEgress {
                    workload: Some(Workload {
                        namespace: namespace.into(),
                        pod: "web-0".into(),
                        ..Default::default()
                    }),
                    external_bytes: 4096,
                    ..Default::default()
                }],
                ..Default::default()
            }),
        }
    }

    #[test]
    fn a_message_that_fails_to_store_fails_alone_with_its_nodes_later_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).unwrap());
        for node in ["node-a", "node-b"] {
            let info = AgentInfo {
                node: node.into(),
                ..Default::default()
            };
            store.hello(&info, 1).unwrap();
        }
        // A real SQLite failure for one message: a trigger refuses its row.
        rusqlite::Connection::open(&path)
            .unwrap()
            .execute_batch(
                "CREATE TRIGGER poison BEFORE INSERT ON egress WHEN NEW.namespace = 'poison'
                 BEGIN SELECT RAISE(ABORT, 'refused by the test'); END;",
            )
            .unwrap();
        let writer = Writer {
            store: store.clone(),
            hub: Hub::new(4),
            policy: ResponsePolicy::default(),
            metrics: Arc::new(Metrics::new()),
        };
        let mut msgs = vec![
            flow("node-a", 1, "shop"),
            flow("node-b", 1, "shop"),
            flow("node-a", 2, "poison"),
            flow("node-b", 2, "shop"),
            flow("node-a", 3, "shop"),
        ];
        let (mut waiting, answers): (Vec<_>, Vec<_>) = (0..msgs.len())
            .map(|_| {
                let (reply, answer) = oneshot::channel();
                let received = Instant::now();
                (Waiting { received, reply }, answer)
            })
            .unzip();
        writer.store_batch(&mut msgs, &mut waiting);
        assert!(msgs.is_empty() && waiting.is_empty());

        let answers: Vec<_> = answers
            .into_iter()
            .map(|mut a| a.try_recv().expect("every sender answered"))
            .collect();
        assert!(matches!(answers[0], Ok(Stored::New)), "{answers:?}");
        assert!(matches!(answers[1], Ok(Stored::New)), "{answers:?}");
        assert!(answers[2].is_err(), "{answers:?}");
        assert!(matches!(answers[3], Ok(Stored::New)), "{answers:?}");
        // Stored, node-a's 3 would make its resent 2 look like a duplicate.
        let later = answers[4].as_ref().unwrap_err().to_string();
        assert!(later.contains("earlier message of node node-a"), "{later}");
        let last: Vec<_> = store
            .list_nodes()
            .unwrap()
            .into_iter()
            .map(|n| (n.name, n.last_seq))
            .collect();
        assert!(last.contains(&("node-a".into(), 1)), "{last:?}");
        assert!(last.contains(&("node-b".into(), 2)), "{last:?}");

        let text = writer.metrics.encode();
        for line in [
            "exfilguard_controller_messages_total{outcome=\"new\"} 3",
            "exfilguard_controller_messages_total{outcome=\"failed\"} 2",
            "exfilguard_controller_ingest_seconds_count 3",
            // The failed batch is not a commit.
            "exfilguard_controller_commit_seconds_count 0",
            // Each message waited once for the batch that then failed.
            "exfilguard_controller_queue_seconds_count 5",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
    }
}
