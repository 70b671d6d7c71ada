//! Per-object unique names, so that concurrent tests and concurrent runs never collide.

use std::{
    process,
    sync::atomic::{AtomicU32, Ordering},
};

/// One counter for every kind of object: a name is unique across namespaces, veths,
/// cgroups and mounts of this process, and the pid makes it unique across processes.
static COUNTER: AtomicU32 = AtomicU32::new(0);

/// The two numbers a unique name is made of; callers derive addresses from them too.
#[derive(Clone, Copy, Debug)]
pub(crate) struct UniqueId {
    pub(crate) pid: u32,
    pub(crate) n: u32,
}

impl UniqueId {
    pub(crate) fn next() -> Self {
        Self {
            pid: process::id(),
            n: COUNTER.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// `eg{pid}x{n}`: at most 2 + 7 + 1 + 10 characters, but in practice (pid_max is
    /// 2^22, a test process creates far fewer than 10^4 objects) ≤ 14, which leaves room
    /// for a one-letter suffix within the 15-character interface-name limit.
    pub(crate) fn prefix(self) -> String {
        let Self { pid, n } = self;
        format!("eg{pid}x{n}")
    }
}

/// A fresh name `eg{pid}x{counter}` for anything a test creates outside this crate's
/// guards (a file, a map pin, a process label).
pub fn unique_name() -> String {
    UniqueId::next().prefix()
}
