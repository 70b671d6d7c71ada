//! Turns snapshots of the kernel's cumulative flow counters into per-poll
//! deltas, the unit the detectors consume.
use std::collections::HashMap;

use crate::datapath::{FlowCounters, FlowId};

/// Bytes and packets of one flow since the previous poll.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowDelta {
    /// The flow.
    pub id: FlowId,
    /// New bytes (IP level).
    pub bytes: u64,
    /// New packets.
    pub packets: u64,
    /// `CLOCK_MONOTONIC` ns of the latest packet.
    pub last_seen_ns: u64,
    /// Remote outside every internal CIDR.
    pub external: bool,
}

/// Remembers the last totals per flow.
///
/// One table, updated in place: building the next poll's table beside the
/// last one doubled the tracker's memory at every poll (with 50,000 flows,
/// 3 MiB more at the agent's peak).
#[derive(Debug, Default)]
pub struct FlowTracker {
    last: HashMap<FlowId, Totals>,
    /// Flipped every update; a flow whose mark differs afterwards was not
    /// in the snapshot.
    mark: bool,
}

/// A flow's totals at the last snapshot that listed it.
#[derive(Debug, Clone, Copy)]
struct Totals {
    bytes: u64,
    packets: u64,
    mark: bool,
}

impl FlowTracker {
    /// A tracker that reports everything in the first snapshot as new.
    pub fn new() -> Self {
        Self::default()
    }

    /// A tracker that treats `snapshot` as already reported (e.g. totals
    /// saved by the previous run of the agent).
    pub fn with_baseline(snapshot: &[(FlowId, FlowCounters)]) -> Self {
        let mut t = Self::new();
        t.update(snapshot);
        t
    }

    /// Flows tracked.
    pub fn len(&self) -> usize {
        self.last.len()
    }

    /// True when no flow is tracked.
    pub fn is_empty(&self) -> bool {
        self.last.is_empty()
    }

    /// Deltas since the previous snapshot. A flow whose totals went down was
    /// evicted and re-created in the kernel: its current totals are all new.
    /// Flows gone from the snapshot are forgotten.
    pub fn update(&mut self, snapshot: &[(FlowId, FlowCounters)]) -> Vec<FlowDelta> {
        self.mark = !self.mark;
        let mark = self.mark;
        // Sized once: at most one delta per listed flow, and no chain of
        // doublings (each a copy) through tens of thousands.
        let mut deltas = Vec::with_capacity(snapshot.len());
        // Deltas first, all against the previous snapshot's totals (a flow
        // listed twice, as a map walk racing evictions can do, is compared
        // with the previous poll both times), marking the flows still
        // listed.
        for (id, c) in snapshot {
            let (bytes, packets) = match self.last.get_mut(id) {
                Some(t) => {
                    t.mark = mark;
                    if c.bytes >= t.bytes && c.packets >= t.packets {
                        (c.bytes - t.bytes, c.packets - t.packets)
                    } else {
                        (c.bytes, c.packets)
                    }
                }
                None => (c.bytes, c.packets),
            };
            if bytes > 0 || packets > 0 {
                deltas.push(FlowDelta {
                    id: *id,
                    bytes,
                    packets,
                    last_seen_ns: c.last_seen_ns,
                    external: c.external,
                });
            }
        }
        // Flows gone from the snapshot are forgotten before the new ones
        // go in, so the table holds one poll's flows, not two.
        let before = self.last.len();
        self.last.retain(|_, t| t.mark == mark);
        let gone = before - self.last.len();
        if gone > 0 && gone >= before / 4 {
            // Many went: the slots they leave marked deleted would make the
            // table double as the new flows go in. Rebuilt at the
            // snapshot's size instead, the old table freed first.
            let kept: Vec<(FlowId, Totals)> = self.last.drain().collect();
            self.last = HashMap::new();
            self.last.reserve(snapshot.len());
            self.last.extend(kept);
        }
        for (id, c) in snapshot {
            self.last.insert(
                *id,
                Totals {
                    bytes: c.bytes,
                    packets: c.packets,
                    mark,
                },
            );
        }
        if self.last.capacity() > 4 * self.last.len().max(1024) {
            // A burst of flows has passed: give its table back.
            self.last.shrink_to_fit();
        }
        deltas
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(port: u16) -> FlowId {
        FlowId {
            cgroup_id: 1,
            remote: "192.0.2.1".parse().unwrap(),
            port,
            proto: 6,
        }
    }

    fn c(bytes: u64, packets: u64) -> FlowCounters {
        FlowCounters {
            bytes,
            packets,
            first_seen_ns: 1,
            last_seen_ns: 2,
            external: true,
        }
    }

    #[test]
    fn deltas_between_polls() {
        let mut t = FlowTracker::new();
        let d = t.update(&[(id(1), c(100, 2))]);
        assert_eq!((d[0].bytes, d[0].packets), (100, 2));
        let d = t.update(&[(id(1), c(150, 3)), (id(2), c(10, 1))]);
        assert_eq!(d.len(), 2);
        assert_eq!((d[0].bytes, d[0].packets), (50, 1));
        assert_eq!((d[1].bytes, d[1].packets), (10, 1));
        // Nothing new: no deltas.
        assert!(
            t.update(&[(id(1), c(150, 3)), (id(2), c(10, 1))])
                .is_empty()
        );
    }

    #[test]
    fn counter_reset_counts_from_zero() {
        let mut t = FlowTracker::new();
        t.update(&[(id(1), c(1000, 10))]);
        // Evicted and re-created: 40 bytes are new, not -960.
        let d = t.update(&[(id(1), c(40, 1))]);
        assert_eq!((d[0].bytes, d[0].packets), (40, 1));
    }

    #[test]
    fn baseline_is_not_reported_again() {
        let mut t = FlowTracker::with_baseline(&[(id(1), c(500, 5))]);
        let d = t.update(&[(id(1), c(600, 6))]);
        assert_eq!(d[0].bytes, 100);
        assert_eq!(t.len(), 1);
        // A vanished flow is forgotten; if it comes back, all of it is new.
        t.update(&[]);
        assert!(t.is_empty());
        assert_eq!(t.update(&[(id(1), c(600, 6))])[0].bytes, 600);
    }

    #[test]
    fn flows_leave_and_stay_across_many_polls() {
        let mut t = FlowTracker::new();
        t.update(&[(id(1), c(10, 1)), (id(2), c(10, 1)), (id(3), c(10, 1))]);
        // 2 gone; 1 and 3 stay, through several updates (the mark flips).
        for round in 1..=4u64 {
            let d = t.update(&[(id(1), c(10 + round, 1 + round)), (id(3), c(10, 1))]);
            assert_eq!(t.len(), 2, "round {round}");
            assert_eq!(d.len(), 1, "only 1 moved");
            assert_eq!((d[0].id.port, d[0].bytes, d[0].packets), (1, 1, 1));
        }
        // 2 back: new, all of it.
        let d = t.update(&[(id(2), c(7, 1))]);
        assert_eq!((d[0].id.port, d[0].bytes), (2, 7));
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn a_flow_listed_twice_compares_with_the_previous_poll() {
        let mut t = FlowTracker::new();
        t.update(&[(id(1), c(100, 1))]);
        let d = t.update(&[(id(1), c(150, 2)), (id(1), c(160, 3))]);
        assert_eq!(
            d.iter().map(|d| d.bytes).collect::<Vec<_>>(),
            vec![50, 60],
            "both against the previous poll's 100"
        );
        // The last listing's totals are kept.
        assert_eq!(t.update(&[(id(1), c(170, 4))])[0].bytes, 10);
    }
}
