//! Background WAL checkpoints, so the ingest writer rarely pays for one.
//!
//! SQLite checkpoints inside the commit that pushes the WAL past
//! `wal_autocheckpoint`: that commit copies every frame since the last
//! checkpoint into the database file and syncs it, and every message queued
//! behind it waits. A PASSIVE checkpoint on another connection copies the
//! frames while the writer goes on committing (it takes no write lock). The
//! writer's own automatic checkpoint stays as the backstop that lets the WAL
//! restart from its beginning (the passive ones never quite catch up while
//! the writer appends): it copies only the frames since the last pass here,
//! at most one interval's worth, instead of all of them.

use std::{
    path::Path,
    sync::{Arc, Condvar, Mutex},
    thread::{self, JoinHandle},
    time::Duration,
};

use rusqlite::Connection;

use crate::{Error, Result};

/// Stop flag shared with the checkpoint thread.
type Stop = Arc<(Mutex<bool>, Condvar)>;

/// A thread that checkpoints the WAL every `interval` until dropped.
pub(super) struct Checkpointer {
    stop: Stop,
    thread: Option<JoinHandle<()>>,
}

impl Checkpointer {
    /// Starts checkpointing `conn`'s database every `interval`.
    pub(super) fn start(conn: Connection, path: &Path, interval: Duration) -> Result<Self> {
        let stop: Stop = Arc::new((Mutex::new(false), Condvar::new()));
        let flag = stop.clone();
        let path = path.display().to_string();
        let thread = thread::Builder::new()
            .name("wal-checkpoint".into())
            .spawn(move || run(&conn, &path, interval, &flag))
            .map_err(|e| {
                Error::Unavailable(format!("cannot start the WAL checkpoint thread: {e}"))
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        let (lock, wake) = &*self.stop;
        if let Ok(mut stopped) = lock.lock() {
            *stopped = true;
        }
        wake.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The thread: one PASSIVE checkpoint per interval until stopped.
fn run(conn: &Connection, path: &str, interval: Duration, stop: &Stop) {
    let (lock, wake) = &**stop;
    loop {
        let Ok(stopped) = lock.lock() else { return };
        let Ok((stopped, _)) = wake.wait_timeout_while(stopped, interval, |s| !*s) else {
            return;
        };
        if *stopped {
            return;
        }
        drop(stopped);
        match checkpoint(conn) {
            Ok((log, copied)) => tracing::trace!(path, log, copied, "WAL checkpoint"),
            // Not fatal: the writer's own checkpoint still bounds the WAL.
            Err(e) => tracing::warn!(path, error = %e, "background WAL checkpoint failed"),
        }
    }
}

/// Runs one PASSIVE checkpoint; returns the WAL's frames and how many of
/// them are now in the database file.
fn checkpoint(conn: &Connection) -> rusqlite::Result<(i64, i64)> {
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
        Ok((r.get(1)?, r.get(2)?))
    })
}
