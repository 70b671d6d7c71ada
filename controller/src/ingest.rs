//! Group commit: messages from every agent stream are stored in batches, one
//! transaction (one fsync) per batch, and each sender learns its own outcome
//! only after the commit. This is what makes "ack only after durable commit"
//! cheap enough for hundreds of agents.

use std::{sync::Arc, thread};

use tokio::sync::{mpsc, oneshot};

use crate::{
    Error, Result,
    correlate::ResponsePolicy,
    hub::Hub,
    store::{Ingest, IngestOutcome, Store},
};

/// Most messages committed in one transaction.
const MAX_BATCH: usize = 1024;

/// Whether a stored message was new.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// Newly stored.
    New,
    /// Already stored earlier (resend).
    Duplicate,
}

struct Job {
    msg: Ingest,
    reply: oneshot::Sender<Result<Stored>>,
}

/// Handle to the batching writer thread.
#[derive(Clone)]
pub struct Ingestor {
    jobs: mpsc::Sender<Job>,
}

impl Ingestor {
    /// Starts the writer thread; `queue` bounds messages waiting for a commit
    /// (back-pressure on the agent streams when the disk is slow).
    pub fn start(
        store: Arc<dyn Store>,
        hub: Arc<Hub>,
        policy: ResponsePolicy,
        queue: usize,
    ) -> Result<Self> {
        let (tx, rx) = mpsc::channel(queue.max(1));
        thread::Builder::new()
            .name("ingest".into())
            .spawn(move || run(store, hub, policy, rx))
            .map_err(|e| Error::Unavailable(format!("cannot start the ingest thread: {e}")))?;
        Ok(Self { jobs: tx })
    }

    /// Queues `msg`; the receiver resolves after its batch committed.
    pub async fn submit(&self, msg: Ingest) -> Result<oneshot::Receiver<Result<Stored>>> {
        let (reply, rx) = oneshot::channel();
        self.jobs
            .send(Job { msg, reply })
            .await
            .map_err(|_| Error::Unavailable("the store writer stopped".into()))?;
        Ok(rx)
    }
}

fn run(store: Arc<dyn Store>, hub: Arc<Hub>, policy: ResponsePolicy, mut rx: mpsc::Receiver<Job>) {
    let mut msgs: Vec<Ingest> = Vec::with_capacity(MAX_BATCH);
    let mut replies: Vec<oneshot::Sender<Result<Stored>>> = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = rx.blocking_recv() {
        let mut next = Some(first);
        while let Some(Job { msg, reply }) = next {
            msgs.push(msg);
            replies.push(reply);
            next = if msgs.len() < MAX_BATCH {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        match store.ingest(&msgs, &policy) {
            Ok(outcomes) => {
                msgs.clear();
                for (reply, outcome) in replies.drain(..).zip(outcomes) {
                    let stored = match outcome {
                        IngestOutcome::Stored(effects) => {
                            hub.apply(store.as_ref(), effects);
                            Stored::New
                        }
                        IngestOutcome::Duplicate => Stored::Duplicate,
                    };
                    // The stream may have gone; its agent resends.
                    let _ = reply.send(Ok(stored));
                }
            }
            Err(batch_err) => {
                // One message must not fail the others: retry one by one so
                // only the culprit gets the error. Once a node's message failed,
                // its later ones in this batch fail too: storing them would
                // raise the node's high-water mark past the failed one, which
                // would then be taken for a duplicate when resent.
                tracing::warn!(error = %batch_err, size = msgs.len(), "batch failed; retrying messages one by one");
                let mut failed_nodes = std::collections::HashSet::new();
                for (msg, reply) in msgs.drain(..).zip(replies.drain(..)) {
                    if failed_nodes.contains(&msg.node) {
                        let _ = reply.send(Err(Error::Unavailable(format!(
                            "an earlier message of node {} failed to store; resend from there",
                            msg.node
                        ))));
                        continue;
                    }
                    let result = store
                        .ingest(std::slice::from_ref(&msg), &policy)
                        .map(|mut o| match o.pop() {
                            Some(IngestOutcome::Stored(effects)) => {
                                hub.apply(store.as_ref(), effects);
                                Stored::New
                            }
                            _ => Stored::Duplicate,
                        });
                    if result.is_err() {
                        failed_nodes.insert(msg.node);
                    }
                    let _ = reply.send(result);
                }
            }
        }
    }
}
