//! The agent's on-disk journal of sequenced messages not yet acknowledged by
//! the controller.
//!
//! Every FlowReport and Detection is written here (and fsynced) before it is
//! sent, and removed when the controller acknowledges it; so the same path
//! covers "connected", "disconnected" and "agent restarted". The journal is
//! bounded: when it is full the oldest FlowReport goes first and Detections
//! only when no FlowReport is left, and every drop is counted (and persisted,
//! so the next Hello reports it).
//!
//! On disk it is an append-only log of checksummed records (put, ack, drop,
//! state); opening replays it, stopping at the first torn or corrupt record
//! (a crash mid-write) and truncating there. It is rewritten compactly when
//! the dead records outweigh the live ones.

use std::{
    collections::BTreeMap,
    fs::{self, File, OpenOptions},
    io::{self, Read, Write},
    path::{Path, PathBuf},
};

/// Journal failures.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// A file operation failed.
    #[error("journal {op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// One message is larger than the whole journal may be.
    #[error("message of {size} bytes does not fit a journal of {max} bytes")]
    TooLarge {
        /// Message size.
        size: usize,
        /// Journal limit.
        max: u64,
    },
}

type Result<T> = std::result::Result<T, JournalError>;

/// What a journal entry holds; decides the drop order when full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A FlowReport: periodic, the next one says nearly the same; dropped first.
    Flow,
    /// A Detection: dropped only when nothing else is left.
    Detection,
}

impl Kind {
    fn byte(self) -> u8 {
        match self {
            Kind::Flow => 1,
            Kind::Detection => 2,
        }
    }

    fn from_byte(b: u8) -> Option<Kind> {
        match b {
            1 => Some(Kind::Flow),
            2 => Some(Kind::Detection),
            _ => None,
        }
    }
}

/// One unacknowledged message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its sequence number.
    pub seq: u64,
    /// What it is.
    pub kind: Kind,
    /// When it was produced (Unix ms).
    pub at_ms: u64,
    /// The encoded FlowReport or Detection.
    pub payload: Vec<u8>,
}

/// Drop counters (cumulative over the journal's life).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Drops {
    /// FlowReports dropped because the journal was full.
    pub flow_reports: u64,
    /// Detections dropped because the journal was full.
    pub detections: u64,
}

const REC_PUT: u8 = 1;
const REC_ACK: u8 = 2;
const REC_DROP: u8 = 3;
const REC_STATE: u8 = 4;
/// Per-entry bookkeeping counted against the limit besides the payload.
pub const ENTRY_OVERHEAD: u64 = 32;
const LOG_NAME: &str = "journal.log";

/// CRC-32 (IEEE), bitwise: records are small and this avoids a dependency.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xEDB8_8320 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

/// The journal.
#[derive(Debug)]
pub struct Journal {
    dir: PathBuf,
    file: File,
    entries: BTreeMap<u64, Entry>,
    live_bytes: u64,
    log_bytes: u64,
    max_bytes: u64,
    high_seq: u64,
    drops: Drops,
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> JournalError {
    let path = path.to_path_buf();
    move |source| JournalError::Io { op, path, source }
}

fn frame(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 8);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32(body).to_le_bytes());
    out.extend_from_slice(body);
    out
}

fn put_body(e: &Entry) -> Vec<u8> {
    let mut b = Vec::with_capacity(e.payload.len() + 18);
    b.push(REC_PUT);
    b.extend_from_slice(&e.seq.to_le_bytes());
    b.push(e.kind.byte());
    b.extend_from_slice(&e.at_ms.to_le_bytes());
    b.extend_from_slice(&e.payload);
    b
}

fn seq_body(tag: u8, seq: u64, kind: Option<Kind>) -> Vec<u8> {
    let mut b = vec![tag];
    b.extend_from_slice(&seq.to_le_bytes());
    if let Some(k) = kind {
        b.push(k.byte());
    }
    b
}

fn state_body(high_seq: u64, drops: Drops) -> Vec<u8> {
    let mut b = vec![REC_STATE];
    b.extend_from_slice(&high_seq.to_le_bytes());
    b.extend_from_slice(&drops.flow_reports.to_le_bytes());
    b.extend_from_slice(&drops.detections.to_le_bytes());
    b
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

fn entry_cost(e: &Entry) -> u64 {
    e.payload.len() as u64 + ENTRY_OVERHEAD
}

impl Journal {
    /// Opens (or creates) the journal in `dir`, bounded to `max_bytes` of live entries.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Self> {
        fs::create_dir_all(dir).map_err(io_err("create", dir))?;
        let path = dir.join(LOG_NAME);
        let mut data = Vec::new();
        if path.exists() {
            File::open(&path)
                .and_then(|mut f| f.read_to_end(&mut data))
                .map_err(io_err("read", &path))?;
        }
        let mut journal = Journal {
            dir: dir.to_path_buf(),
            file: OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(io_err("open", &path))?,
            entries: BTreeMap::new(),
            live_bytes: 0,
            log_bytes: 0,
            max_bytes,
            high_seq: 0,
            drops: Drops::default(),
        };
        let valid = journal.replay(&data);
        if valid < data.len() {
            // A torn tail from a crash mid-append: everything before it is
            // intact (each record is checksummed), so cut there.
            tracing::warn!(path = %path.display(), kept = valid, dropped = data.len() - valid, "journal tail was torn; truncating");
            journal
                .file
                .set_len(valid as u64)
                .map_err(io_err("truncate", &path))?;
        }
        journal.log_bytes = valid as u64;
        // A smaller limit than last time applies at once.
        journal.enforce_limit(0)?;
        Ok(journal)
    }

    /// Applies the records in `data`; returns how many bytes were valid.
    fn replay(&mut self, data: &[u8]) -> usize {
        let mut at = 0;
        while let Some(header) = data.get(at..at + 8) {
            let len = u32::from_le_bytes(header[0..4].try_into().unwrap_or_default()) as usize;
            let crc = u32::from_le_bytes(header[4..8].try_into().unwrap_or_default());
            let Some(body) = data.get(at + 8..at + 8 + len) else {
                break;
            };
            if crc32(body) != crc || !self.apply(body) {
                break;
            }
            at += 8 + len;
        }
        at
    }

    fn apply(&mut self, body: &[u8]) -> bool {
        match body.first() {
            Some(&REC_PUT) => {
                let (Some(seq), Some(kind), Some(at_ms)) = (
                    u64_at(body, 1),
                    body.get(9).and_then(|&k| Kind::from_byte(k)),
                    u64_at(body, 10),
                ) else {
                    return false;
                };
                let entry = Entry {
                    seq,
                    kind,
                    at_ms,
                    payload: body[18..].to_vec(),
                };
                self.live_bytes += entry_cost(&entry);
                self.high_seq = self.high_seq.max(seq);
                if let Some(old) = self.entries.insert(seq, entry) {
                    self.live_bytes -= entry_cost(&old);
                }
                true
            }
            Some(&REC_ACK) | Some(&REC_DROP) => {
                let Some(seq) = u64_at(body, 1) else {
                    return false;
                };
                if let Some(old) = self.entries.remove(&seq) {
                    self.live_bytes -= entry_cost(&old);
                }
                if body[0] == REC_DROP {
                    match body.get(9).and_then(|&k| Kind::from_byte(k)) {
                        Some(Kind::Flow) => self.drops.flow_reports += 1,
                        Some(Kind::Detection) => self.drops.detections += 1,
                        None => return false,
                    }
                }
                true
            }
            Some(&REC_STATE) => {
                let (Some(high), Some(flow), Some(det)) =
                    (u64_at(body, 1), u64_at(body, 9), u64_at(body, 17))
                else {
                    return false;
                };
                self.high_seq = self.high_seq.max(high);
                self.drops = Drops {
                    flow_reports: flow,
                    detections: det,
                };
                true
            }
            _ => false,
        }
    }

    fn write(&mut self, body: &[u8], sync: bool) -> Result<()> {
        let path = self.dir.join(LOG_NAME);
        let framed = frame(body);
        self.file
            .write_all(&framed)
            .map_err(io_err("append", &path))?;
        if sync {
            self.file.sync_data().map_err(io_err("sync", &path))?;
        }
        self.log_bytes += framed.len() as u64;
        Ok(())
    }

    /// Drops oldest entries (FlowReports first) until `incoming` more bytes fit.
    fn enforce_limit(&mut self, incoming: u64) -> Result<()> {
        while self.live_bytes + incoming > self.max_bytes && !self.entries.is_empty() {
            let victim = self
                .entries
                .values()
                .find(|e| e.kind == Kind::Flow)
                .or_else(|| self.entries.values().next())
                .map(|e| (e.seq, e.kind));
            let Some((seq, kind)) = victim else { break };
            if let Some(old) = self.entries.remove(&seq) {
                self.live_bytes -= entry_cost(&old);
            }
            match kind {
                Kind::Flow => self.drops.flow_reports += 1,
                Kind::Detection => self.drops.detections += 1,
            }
            tracing::warn!(seq, ?kind, "journal full: dropped the oldest entry");
            self.write(&seq_body(REC_DROP, seq, Some(kind)), false)?;
        }
        Ok(())
    }

    /// Appends a message, assigning the next sequence number; durable when it returns.
    pub fn append(&mut self, kind: Kind, at_ms: u64, payload: Vec<u8>) -> Result<u64> {
        let entry = Entry {
            seq: self.high_seq + 1,
            kind,
            at_ms,
            payload,
        };
        let cost = entry_cost(&entry);
        if cost > self.max_bytes {
            return Err(JournalError::TooLarge {
                size: entry.payload.len(),
                max: self.max_bytes,
            });
        }
        self.enforce_limit(cost)?;
        self.write(&put_body(&entry), true)?;
        self.high_seq = entry.seq;
        self.live_bytes += cost;
        let seq = entry.seq;
        self.entries.insert(seq, entry);
        Ok(seq)
    }

    /// The controller stored `seq`: forget it. Not fsynced: losing an ack only
    /// causes a resend, which the controller recognises as a duplicate.
    pub fn ack(&mut self, seq: u64) -> Result<bool> {
        let Some(old) = self.entries.remove(&seq) else {
            return Ok(false);
        };
        self.live_bytes -= entry_cost(&old);
        self.write(&seq_body(REC_ACK, seq, None), false)?;
        self.maybe_compact()?;
        Ok(true)
    }

    /// The controller has stored everything up to `seq` (its Welcome says so).
    pub fn ack_through(&mut self, seq: u64) -> Result<usize> {
        let done: Vec<u64> = self.entries.range(..=seq).map(|(s, _)| *s).collect();
        for s in &done {
            self.ack(*s)?;
        }
        Ok(done.len())
    }

    /// The controller has stored sequence numbers up to `floor` that this
    /// journal never issued (the agent's state was lost): renumber pending
    /// entries above it so they are not mistaken for duplicates.
    pub fn rebase(&mut self, floor: u64) -> Result<()> {
        if floor <= self.high_seq {
            return Ok(());
        }
        let old: Vec<Entry> = std::mem::take(&mut self.entries).into_values().collect();
        self.high_seq = floor;
        for (i, mut e) in old.into_iter().enumerate() {
            e.seq = floor + 1 + i as u64;
            self.high_seq = e.seq;
            self.entries.insert(e.seq, e);
        }
        tracing::warn!(
            floor,
            pending = self.entries.len(),
            "controller is ahead of this journal; renumbered pending messages"
        );
        self.compact()
    }

    /// Up to `limit` entries with sequence numbers above `after`, in order.
    pub fn pending_after(&self, after: u64, limit: usize) -> Vec<Entry> {
        self.entries
            .range(after + 1..)
            .take(limit)
            .map(|(_, e)| e.clone())
            .collect()
    }

    /// Highest sequence number issued.
    pub fn high_seq(&self) -> u64 {
        self.high_seq
    }

    /// Drop counters.
    pub fn drops(&self) -> Drops {
        self.drops
    }

    /// Unacknowledged entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is pending.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes the pending entries count against the limit.
    pub fn live_bytes(&self) -> u64 {
        self.live_bytes
    }

    fn maybe_compact(&mut self) -> Result<()> {
        if self.log_bytes > 2 * self.live_bytes + (1 << 20) {
            self.compact()?;
        }
        Ok(())
    }

    /// Rewrites the log with only the live entries: write a new file, fsync,
    /// rename over the old one, fsync the directory.
    fn compact(&mut self) -> Result<()> {
        let path = self.dir.join(LOG_NAME);
        let tmp = self.dir.join(format!("{LOG_NAME}.tmp"));
        let mut data = frame(&state_body(self.high_seq, self.drops));
        for e in self.entries.values() {
            data.extend_from_slice(&frame(&put_body(e)));
        }
        let mut f = File::create(&tmp).map_err(io_err("create", &tmp))?;
        f.write_all(&data)
            .and_then(|_| f.sync_all())
            .map_err(io_err("write", &tmp))?;
        fs::rename(&tmp, &path).map_err(io_err("rename", &path))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err("sync", &self.dir))?;
        self.file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(io_err("open", &path))?;
        self.log_bytes = data.len() as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("exfilguard-journal-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn survives_reopen_and_forgets_acked() {
        let dir = temp_dir("reopen");
        {
            let mut j = Journal::open(&dir, 1 << 20).unwrap();
            assert_eq!(j.append(Kind::Flow, 1, vec![1; 10]).unwrap(), 1);
            assert_eq!(j.append(Kind::Detection, 2, vec![2; 10]).unwrap(), 2);
            assert_eq!(j.append(Kind::Flow, 3, vec![3; 10]).unwrap(), 3);
            assert!(j.ack(2).unwrap());
            assert!(!j.ack(2).unwrap());
        }
        let mut j = Journal::open(&dir, 1 << 20).unwrap();
        let seqs: Vec<u64> = j.pending_after(0, 10).iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [1, 3]);
        assert_eq!(j.pending_after(0, 10)[1].payload, vec![3; 10]);
        // Sequence numbers continue after a restart, never reuse.
        assert_eq!(j.append(Kind::Flow, 4, vec![]).unwrap(), 4);
        assert_eq!(j.ack_through(3).unwrap(), 2);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn full_journal_drops_oldest_flow_reports_first_and_counts() {
        let dir = temp_dir("full");
        let cost = 100 + ENTRY_OVERHEAD;
        let mut j = Journal::open(&dir, cost * 3).unwrap();
        j.append(Kind::Detection, 0, vec![0; 100]).unwrap(); // 1
        j.append(Kind::Flow, 0, vec![0; 100]).unwrap(); // 2
        j.append(Kind::Flow, 0, vec![0; 100]).unwrap(); // 3
        j.append(Kind::Detection, 0, vec![0; 100]).unwrap(); // 4: drops 2
        j.append(Kind::Detection, 0, vec![0; 100]).unwrap(); // 5: drops 3
        j.append(Kind::Detection, 0, vec![0; 100]).unwrap(); // 6: drops 1 (no flow left)
        let seqs: Vec<u64> = j.pending_after(0, 10).iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [4, 5, 6]);
        assert_eq!(
            j.drops(),
            Drops {
                flow_reports: 2,
                detections: 1
            }
        );
        drop(j);
        let j = Journal::open(&dir, cost * 3).unwrap();
        assert_eq!(
            j.drops(),
            Drops {
                flow_reports: 2,
                detections: 1
            }
        );
        assert!(matches!(
            Journal::open(&dir, cost * 3)
                .unwrap()
                .append(Kind::Flow, 0, vec![0; 1000]),
            Err(JournalError::TooLarge { .. })
        ));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn torn_tail_is_cut_and_compaction_keeps_state() {
        let dir = temp_dir("torn");
        {
            let mut j = Journal::open(&dir, 1 << 30).unwrap();
            for i in 0..100u64 {
                j.append(Kind::Flow, i, vec![7; 20_000]).unwrap();
            }
            // Acks past 2x live + 1 MiB trigger a compaction.
            j.ack_through(99).unwrap();
            assert!(j.log_bytes < 1 << 20, "compacted: {}", j.log_bytes);
            j.append(Kind::Detection, 0, vec![9; 10]).unwrap();
        }
        // Simulate a crash mid-append: half a record at the end.
        let path = dir.join(LOG_NAME);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(
            &frame(&put_body(&Entry {
                seq: 102,
                kind: Kind::Flow,
                at_ms: 0,
                payload: vec![1; 50],
            }))[..30],
        )
        .unwrap();
        drop(f);
        let mut j = Journal::open(&dir, 1 << 30).unwrap();
        assert_eq!(j.high_seq(), 101);
        assert_eq!(
            j.pending_after(0, 10)
                .iter()
                .map(|e| e.seq)
                .collect::<Vec<_>>(),
            [100, 101]
        );
        assert_eq!(j.append(Kind::Flow, 0, vec![]).unwrap(), 102);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rebase_renumbers_above_the_controllers_high_water() {
        let dir = temp_dir("rebase");
        let mut j = Journal::open(&dir, 1 << 20).unwrap();
        j.append(Kind::Detection, 0, vec![1]).unwrap();
        j.append(Kind::Flow, 0, vec![2]).unwrap();
        j.rebase(500).unwrap();
        let seqs: Vec<u64> = j.pending_after(0, 10).iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [501, 502]);
        drop(j);
        let mut j = Journal::open(&dir, 1 << 20).unwrap();
        assert_eq!(j.append(Kind::Flow, 0, vec![]).unwrap(), 503);
        fs::remove_dir_all(&dir).unwrap();
    }
}
