//! Volume: external egress bytes per workload over a sliding window, per
//! destination, and a minute-over-baseline spike. Fed with per-poll deltas;
//! evaluated after each poll, so a crossing is reported within one poll.
use std::{
    collections::{BTreeSet, HashMap, VecDeque},
    net::IpAddr,
};

use super::{
    Destination, Detection, Episodes, Evidence, Meta, NS, Rule,
    small_map::{Keyed, SmallMap},
};
use crate::policy::{Policy, WorkloadMeta};

/// A sliding window of byte counts in fixed-width buckets.
///
/// The newest bucket is held inline and older ones (with their sum) in a
/// boxed queue made only when a second bucket is used: most destinations
/// of most workloads are seen within one bucket, and with 10,000 workloads
/// × tens of destinations this is most of the detector's memory.
#[derive(Debug, Default, Clone)]
struct Buckets {
    /// (index, bytes) of the newest bucket; bytes 0 when there is none.
    last: (u64, u64),
    /// Older buckets.
    older: Option<Box<Older>>,
}

/// Buckets before the newest, oldest first, and their bytes.
#[derive(Debug, Default, Clone)]
struct Older {
    queue: VecDeque<(u64, u64)>,
    sum: u64,
}

impl Buckets {
    /// Bytes in the window.
    fn sum(&self) -> u64 {
        self.last.1 + self.older.as_ref().map_or(0, |o| o.sum)
    }

    fn add(&mut self, idx: u64, bytes: u64) {
        if self.last.1 > 0 && self.last.0 != idx {
            let older = self.older.get_or_insert_default();
            older.queue.push_back(self.last);
            older.sum += self.last.1;
            self.last = (idx, 0);
        }
        self.last.0 = idx;
        self.last.1 += bytes;
    }

    /// Drops buckets older than `first` (the oldest index still in the window).
    fn expire(&mut self, first: u64) {
        if let Some(older) = &mut self.older {
            while let Some(&(i, b)) = older.queue.front() {
                if i >= first {
                    break;
                }
                older.sum -= b;
                older.queue.pop_front();
            }
            if older.queue.is_empty() {
                self.older = None;
            }
        }
        if self.last.1 > 0 && self.last.0 < first {
            self.last = (0, 0);
        }
    }
}

/// One destination's window, and whether it was sent to since the last
/// evaluation. Carries its own key, so a workload's few destinations are a
/// sorted vector of these (48 bytes each).
#[derive(Debug, Clone)]
struct Dest {
    bytes: Buckets,
    to: (IpAddr, u16),
    dirty: bool,
}

impl Keyed for Dest {
    type Key = (IpAddr, u16);
    type Owned = (IpAddr, u16);
    fn key(&self) -> &(IpAddr, u16) {
        &self.to
    }
    fn owned_key(&self) -> (IpAddr, u16) {
        self.to
    }
}

#[derive(Debug, Default)]
struct Workload {
    meta: Meta,
    counted: Buckets,
    allowlisted: Buckets,
    dests: SmallMap<Dest>,
    minute: u64,
    minute_bytes: u64,
    prev_minute_spiked: bool,
    baseline: f64,
    learned_minutes: u32,
    last_seen_ns: u64,
    first_seen_ns: u64,
    /// Destinations (`addr:port`) with an open episode (empty for almost
    /// every workload: a B-tree set allocates nothing then).
    open_dests: BTreeSet<String>,
    /// Some destination was sent to since the last evaluation.
    dirty_dests: bool,
    /// Oldest bucket index kept at the last expiry: expiry only has work
    /// to do when the window has moved on by a bucket.
    expired_to: u64,
}

/// Counters the metrics export.
#[derive(Debug, Default, Clone, Copy)]
pub struct VolumeStats {
    /// Workloads tracked.
    pub workloads: usize,
    /// Open episodes.
    pub open_episodes: usize,
}

/// The volume detector.
#[derive(Debug, Default)]
pub struct VolumeDetector {
    workloads: HashMap<String, Workload>,
    episodes: Episodes,
}

const TOP: usize = 5;
/// Buckets per window: expiry is exact to 1/60 of the window.
const BUCKETS: u64 = 60;
const MINUTE: u64 = 60 * NS;
/// Workloads idle this long with nothing open are forgotten.
const IDLE_NS: u64 = 3600 * NS;

fn bucket_ns(p: &Policy) -> u64 {
    (p.volume.window.0.as_nanos() as u64 / BUCKETS).max(NS)
}

impl VolumeDetector {
    /// An empty detector.
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts `bytes` sent by `workload` to `remote:port`. Internal traffic is
    /// ignored; allowlisted destinations are counted apart and never fire.
    #[expect(clippy::too_many_arguments, reason = "one flow delta, spelled out")]
    pub fn observe(
        &mut self,
        policy: &Policy,
        workload: &str,
        meta: &WorkloadMeta,
        remote: IpAddr,
        port: u16,
        bytes: u64,
        external: bool,
        now_ns: u64,
    ) {
        if !external || bytes == 0 {
            return;
        }
        let idx = now_ns / bucket_ns(policy);
        let w = match self.workloads.get_mut(workload) {
            Some(w) => w,
            None => self
                .workloads
                .entry(workload.to_owned())
                .or_insert_with(|| Workload {
                    meta: Meta::new(meta),
                    minute: now_ns / MINUTE,
                    first_seen_ns: now_ns,
                    ..Default::default()
                }),
        };
        w.last_seen_ns = w.last_seen_ns.max(now_ns);
        let allow = policy.allowlisted_addr(remote)
            || (!policy.overrides.is_empty()
                && policy
                    .effective(w.meta.get())
                    .extra_cidrs
                    .iter()
                    .any(|n| n.contains(&remote)));
        if allow {
            w.allowlisted.add(idx, bytes);
            return;
        }
        w.counted.add(idx, bytes);
        let d = w.dests.get_or_insert_with(&(remote, port), || Dest {
            bytes: Buckets::default(),
            to: (remote, port),
            dirty: false,
        });
        d.bytes.add(idx, bytes);
        d.dirty = true;
        w.dirty_dests = true;
        roll_minute(policy, w, now_ns);
        w.minute_bytes += bytes;
    }

    /// Expires old buckets and reports episode changes.
    pub fn evaluate(&mut self, policy: &Policy, now_ns: u64) -> Vec<Detection> {
        let bucket = bucket_ns(policy);
        let first = (now_ns / bucket).saturating_sub(BUCKETS - 1);
        let window_ns = bucket * BUCKETS;
        let every = policy.update_interval_ns();
        let mut out = Vec::new();
        let mut forget = Vec::new();
        for (name, w) in &mut self.workloads {
            if first > w.expired_to {
                w.expired_to = first;
                w.counted.expire(first);
                w.allowlisted.expire(first);
                w.dests.retain(|d| {
                    d.bytes.expire(first);
                    d.bytes.sum() > 0
                });
            }
            roll_minute(policy, w, now_ns);
            let eff = policy.effective(w.meta.get());
            // Top destinations are sorted only when a detection needs them.
            let top = |dests: &SmallMap<Dest>| {
                let mut top: Vec<Destination> = dests
                    .values()
                    .map(|d| Destination {
                        addr: d.to.0,
                        port: d.to.1,
                        bytes: d.bytes.sum(),
                    })
                    .collect();
                top.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.addr.cmp(&b.addr)));
                top.truncate(TOP);
                top
            };
            let (allowlisted_bytes, first_seen) = (w.allowlisted.sum(), w.first_seen_ns);
            let evidence = move |bytes: u64, top: &[Destination]| Evidence {
                window_start_ns: now_ns.saturating_sub(window_ns).max(first_seen),
                window_end_ns: now_ns,
                bytes,
                allowlisted_bytes,
                top_destinations: top.iter().take(TOP).cloned().collect(),
                encoded_bytes: 0,
                dns: None,
            };
            let secs = policy.volume.window.0.as_secs();
            // The runbook's rule is `increase(...) > threshold`: exactly at
            // the threshold does not fire.
            let total = w.counted.sum();
            if let Some((phase, episode)) = self.episodes.step(
                (Rule::LargeDataTransfer, name, None),
                total > eff.threshold_bytes,
                total as f64,
                now_ns,
                every,
            ) {
                out.push(Detection {
                    rule: Rule::LargeDataTransfer,
                    phase,
                    episode,
                    workload: name.clone(),
                    subject: None,
                    observed: total as f64,
                    threshold: eff.threshold_bytes as f64,
                    condition: format!(
                        "external egress bytes in {secs}s > {}",
                        eff.threshold_bytes
                    ),
                    action: eff.action,
                    evidence: evidence(total, &top(&w.dests)),
                });
            }
            // Per destination, including open episodes whose destination has
            // since left the window (they end).
            let mut subjects: Vec<(String, Destination)> = Vec::new();
            if std::mem::take(&mut w.dirty_dests) {
                for d in w.dests.values_mut() {
                    if std::mem::take(&mut d.dirty) && d.bytes.sum() > eff.per_destination_bytes {
                        let (addr, port) = d.to;
                        let dest = Destination {
                            addr,
                            port,
                            bytes: d.bytes.sum(),
                        };
                        subjects.push((format!("{}:{}", fmt_addr(addr), port), dest));
                    }
                }
            }
            for s in &w.open_dests {
                if !subjects.iter().any(|(k, _)| k == s) {
                    let (addr, port) = parse_subject(s);
                    let bytes = w.dests.get(&(addr, port)).map_or(0, |d| d.bytes.sum());
                    subjects.push((s.clone(), Destination { addr, port, bytes }));
                }
            }
            for (subject, dest) in subjects {
                let firing = dest.bytes > eff.per_destination_bytes;
                if firing {
                    w.open_dests.insert(subject.clone());
                } else {
                    w.open_dests.remove(&subject);
                }
                if let Some((phase, episode)) = self.episodes.step(
                    (Rule::LargeTransferToDestination, name, Some(&subject)),
                    firing,
                    dest.bytes as f64,
                    now_ns,
                    every,
                ) {
                    out.push(Detection {
                        rule: Rule::LargeTransferToDestination,
                        phase,
                        episode,
                        workload: name.clone(),
                        subject: Some(subject),
                        observed: dest.bytes as f64,
                        threshold: eff.per_destination_bytes as f64,
                        condition: format!(
                            "external egress bytes to one destination in {secs}s > {}",
                            eff.per_destination_bytes
                        ),
                        action: eff.action,
                        evidence: evidence(dest.bytes, std::slice::from_ref(&dest)),
                    });
                }
            }
            let spike_limit =
                (policy.volume.spike_factor * w.baseline).max(policy.volume.spike_min_bytes as f64);
            let learned = w.learned_minutes >= policy.volume.spike_warmup_minutes;
            let spiking = learned && (w.minute_bytes as f64 > spike_limit || w.prev_minute_spiked);
            if let Some((phase, episode)) = self.episodes.step(
                (Rule::EgressRateSpike, name, None),
                spiking,
                w.minute_bytes as f64,
                now_ns,
                every,
            ) {
                out.push(Detection {
                    rule: Rule::EgressRateSpike,
                    phase,
                    episode,
                    workload: name.clone(),
                    subject: None,
                    observed: w.minute_bytes as f64,
                    threshold: spike_limit,
                    condition: format!(
                        "external egress bytes in a minute > max({} x learned baseline {:.0}, {})",
                        policy.volume.spike_factor, w.baseline, policy.volume.spike_min_bytes
                    ),
                    action: eff.action,
                    evidence: evidence(w.minute_bytes, &top(&w.dests)),
                });
            }
            if now_ns.saturating_sub(w.last_seen_ns) > IDLE_NS
                && w.counted.sum() == 0
                && w.open_dests.is_empty()
            {
                forget.push(name.clone());
            }
        }
        for name in forget {
            let open = Rule::ALL
                .iter()
                .any(|&r| self.episodes.is_active((r, &name, None)));
            if !open {
                self.workloads.remove(&name);
            }
        }
        out
    }

    /// Sizes for the metrics.
    pub fn stats(&self) -> VolumeStats {
        VolumeStats {
            workloads: self.workloads.len(),
            open_episodes: self.episodes.len(),
        }
    }
}

/// Closes the minute(s) before `now_ns`: updates the learned baseline with
/// minutes that were not spikes (a spike must not teach the baseline).
fn roll_minute(policy: &Policy, w: &mut Workload, now_ns: u64) {
    let m = now_ns / MINUTE;
    if m <= w.minute {
        return;
    }
    let limit = (policy.volume.spike_factor * w.baseline).max(policy.volume.spike_min_bytes as f64);
    let learned = w.learned_minutes >= policy.volume.spike_warmup_minutes;
    let spiked = learned && w.minute_bytes as f64 > limit;
    if !spiked {
        learn(w, w.minute_bytes as f64);
    }
    // Idle minutes in between are zero-byte minutes (at most an hour's worth
    // matter to an EWMA with alpha 0.1).
    for _ in 0..(m - w.minute - 1).min(60) {
        learn(w, 0.0);
    }
    w.prev_minute_spiked = spiked && m == w.minute + 1;
    w.minute = m;
    w.minute_bytes = 0;
}

fn learn(w: &mut Workload, bytes: f64) {
    const ALPHA: f64 = 0.1;
    w.baseline = if w.learned_minutes == 0 {
        bytes
    } else {
        (1.0 - ALPHA) * w.baseline + ALPHA * bytes
    };
    w.learned_minutes = w.learned_minutes.saturating_add(1);
}

/// Inverse of the subject format `addr:port` / `[v6]:port`.
fn parse_subject(s: &str) -> (IpAddr, u16) {
    let sa: std::net::SocketAddr = s
        .parse()
        .unwrap_or(std::net::SocketAddr::from(([0, 0, 0, 0], 0)));
    (sa.ip(), sa.port())
}

fn fmt_addr(a: IpAddr) -> String {
    match a {
        IpAddr::V6(v6) => format!("[{v6}]"),
        IpAddr::V4(v4) => v4.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_keep_the_newest_inline_and_expire_exactly() {
        let mut b = Buckets::default();
        b.add(5, 10);
        b.add(5, 5);
        assert_eq!(b.sum(), 15);
        assert!(b.older.is_none(), "one bucket needs no queue");
        b.add(7, 1);
        b.add(9, 100);
        assert_eq!(b.sum(), 116);
        b.expire(6);
        assert_eq!(b.sum(), 101);
        b.expire(8);
        assert_eq!(b.sum(), 100);
        assert!(b.older.is_none(), "queue dropped once empty");
        b.expire(9);
        assert_eq!(b.sum(), 100);
        b.expire(10);
        assert_eq!(b.sum(), 0);
        b.add(10, 3);
        assert_eq!((b.sum(), b.last), (3, (10, 3)));
        assert!(b.older.is_none());
    }
    use crate::detect::Phase;

    const EXT: &str = "198.51.100.7";

    fn policy(y: &str) -> Policy {
        Policy::from_yaml(y).unwrap()
    }

    fn send(d: &mut VolumeDetector, p: &Policy, w: &str, to: &str, bytes: u64, t: u64) {
        d.observe(
            p,
            w,
            &WorkloadMeta::default(),
            to.parse().unwrap(),
            443,
            bytes,
            true,
            t,
        );
    }

    fn rules(ds: &[Detection]) -> Vec<(Rule, Phase)> {
        ds.iter().map(|d| (d.rule, d.phase)).collect()
    }

    #[test]
    fn fires_once_just_above_threshold_not_at_it() {
        let p = policy("volume: {threshold_bytes: 1000, per_destination_bytes: 100000}");
        let mut d = VolumeDetector::new();
        send(&mut d, &p, "w", EXT, 1000, NS);
        assert!(d.evaluate(&p, NS).is_empty(), "exactly at threshold");
        send(&mut d, &p, "w", EXT, 1, 2 * NS);
        let ds = d.evaluate(&p, 2 * NS);
        assert_eq!(rules(&ds), vec![(Rule::LargeDataTransfer, Phase::Start)]);
        let e = &ds[0].evidence;
        assert_eq!(e.bytes, 1001);
        assert_eq!(
            e.top_destinations,
            vec![Destination {
                addr: EXT.parse().unwrap(),
                port: 443,
                bytes: 1001
            }]
        );
        assert_eq!(ds[0].threshold, 1000.0);
        assert!(ds[0].condition.contains("> 1000"));
        // Keeps firing for the next polls: no new detections.
        for s in 3..30 {
            send(&mut d, &p, "w", EXT, 10, s * NS);
            assert!(d.evaluate(&p, s * NS).is_empty(), "re-fired at {s}s");
        }
        // After the update interval, with more bytes: one update.
        send(&mut d, &p, "w", EXT, 10, 70 * NS);
        assert_eq!(
            rules(&d.evaluate(&p, 70 * NS)),
            vec![(Rule::LargeDataTransfer, Phase::Update)]
        );
    }

    #[test]
    fn window_expiry_ends_the_episode() {
        let p =
            policy("volume: {window: 60s, threshold_bytes: 1000, per_destination_bytes: 100000}");
        let mut d = VolumeDetector::new();
        send(&mut d, &p, "w", EXT, 800, 0);
        send(&mut d, &p, "w", EXT, 800, 30 * NS);
        assert_eq!(
            rules(&d.evaluate(&p, 30 * NS)),
            vec![(Rule::LargeDataTransfer, Phase::Start)]
        );
        // 60 s after the first send it has left the window: 800 < 1000.
        assert_eq!(
            rules(&d.evaluate(&p, 61 * NS)),
            vec![(Rule::LargeDataTransfer, Phase::End)]
        );
        // Bytes spread thinner than the threshold per window never fire.
        let mut d = VolumeDetector::new();
        for s in 0..600 {
            send(&mut d, &p, "w", EXT, 15, s * NS);
            assert!(d.evaluate(&p, s * NS).is_empty());
        }
    }

    #[test]
    fn allowlisted_destination_counted_never_fires() {
        let p = policy("volume: {threshold_bytes: 1000}\nallowlist: {cidrs: [198.51.100.0/24]}");
        let mut d = VolumeDetector::new();
        send(&mut d, &p, "w", EXT, 1_000_000, NS);
        assert!(d.evaluate(&p, NS).is_empty());
        send(&mut d, &p, "w", "192.0.2.1", 2000, 2 * NS);
        let ds = d.evaluate(&p, 2 * NS);
        assert_eq!(ds.len(), 1, "{ds:?}");
        assert_eq!(ds[0].evidence.bytes, 2000);
        assert_eq!(ds[0].evidence.allowlisted_bytes, 1_000_000);
    }

    #[test]
    fn internal_traffic_is_not_egress() {
        let p = policy("volume: {threshold_bytes: 1000}");
        let mut d = VolumeDetector::new();
        d.observe(
            &p,
            "w",
            &WorkloadMeta::default(),
            EXT.parse().unwrap(),
            1,
            5000,
            false,
            NS,
        );
        assert!(d.evaluate(&p, NS).is_empty());
    }

    #[test]
    fn per_destination_and_workloads_apart() {
        let p = policy("volume: {threshold_bytes: 10000, per_destination_bytes: 1000}");
        let mut d = VolumeDetector::new();
        send(&mut d, &p, "a", EXT, 1500, NS);
        send(&mut d, &p, "b", EXT, 900, NS);
        let ds = d.evaluate(&p, NS);
        assert_eq!(
            rules(&ds),
            vec![(Rule::LargeTransferToDestination, Phase::Start)]
        );
        assert_eq!(ds[0].workload, "a");
        assert_eq!(ds[0].subject.as_deref(), Some("198.51.100.7:443"));
    }

    #[test]
    fn spike_against_learned_baseline() {
        let p = policy(
            "volume: {threshold_bytes: 100000000000, per_destination_bytes: 100000000000, spike_factor: 10, spike_min_bytes: 1000, spike_warmup_minutes: 5}",
        );
        let mut d = VolumeDetector::new();
        let mut t = 0;
        // Ten minutes of 10 kB/min: the baseline.
        for _ in 0..10 * 60 {
            send(&mut d, &p, "w", EXT, 10_000 / 60, t);
            assert!(d.evaluate(&p, t).is_empty());
            t += NS;
        }
        // 5x: not a spike.
        for _ in 0..60 {
            send(&mut d, &p, "w", EXT, 50_000 / 60, t);
            assert!(d.evaluate(&p, t).is_empty(), "5x fired");
            t += NS;
        }
        // 100x in one second: fires within that poll.
        send(&mut d, &p, "w", EXT, 1_000_000, t);
        let ds = d.evaluate(&p, t);
        assert_eq!(rules(&ds), vec![(Rule::EgressRateSpike, Phase::Start)]);
        // Back to normal for two minutes: the episode ends.
        let mut ended = false;
        for _ in 0..180 {
            t += NS;
            send(&mut d, &p, "w", EXT, 10_000 / 60, t);
            ended |= rules(&d.evaluate(&p, t)) == vec![(Rule::EgressRateSpike, Phase::End)];
        }
        assert!(ended);
    }

    #[test]
    fn override_raises_threshold_for_namespace() {
        let p = policy(
            "volume: {threshold_bytes: 1000}\noverrides: [{namespace: backup, threshold_bytes: 1000000, per_destination_bytes: 1000000}]",
        );
        let mut d = VolumeDetector::new();
        let meta = WorkloadMeta {
            namespace: Some("backup".into()),
            ..Default::default()
        };
        d.observe(&p, "b", &meta, EXT.parse().unwrap(), 443, 5000, true, NS);
        assert!(d.evaluate(&p, NS).is_empty());
    }
}
