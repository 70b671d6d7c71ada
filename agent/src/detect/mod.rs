//! Detectors: pure state machines fed with observations and a clock, which
//! return detections with their evidence. They never read the kernel or the
//! wall clock themselves, so the live agent and `analyze --pcap` share them and
//! the tests drive them with constructed inputs.
pub mod dns;
mod small_map;
pub mod volume;

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
};

use serde::Serialize;

use crate::policy::{Action, WorkloadMeta};

/// Nanoseconds per second.
pub const NS: u64 = 1_000_000_000;

/// Which rule fired.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    /// External egress of a workload over the window above the threshold
    /// (the runbook's `LargeDataTransfer`).
    LargeDataTransfer,
    /// External egress of a workload to one destination above its threshold.
    LargeTransferToDestination,
    /// A minute of egress far above the workload's learned baseline.
    EgressRateSpike,
    /// Data encoded into query names under one registered domain.
    DnsExfiltration,
    /// Data encoded into query names spread over several registered domains.
    DnsExfiltrationSpread,
    /// A DNS tunnel: a high rate of unique, long or TXT/NULL queries.
    DnsTunnel,
}

impl Rule {
    /// Every rule, for metrics that should show zeros.
    pub const ALL: [Rule; 6] = [
        Rule::LargeDataTransfer,
        Rule::LargeTransferToDestination,
        Rule::EgressRateSpike,
        Rule::DnsExfiltration,
        Rule::DnsExfiltrationSpread,
        Rule::DnsTunnel,
    ];

    /// The snake_case name used in logs, JSON and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Rule::LargeDataTransfer => "large_data_transfer",
            Rule::LargeTransferToDestination => "large_transfer_to_destination",
            Rule::EgressRateSpike => "egress_rate_spike",
            Rule::DnsExfiltration => "dns_exfiltration",
            Rule::DnsExfiltrationSpread => "dns_exfiltration_spread",
            Rule::DnsTunnel => "dns_tunnel",
        }
    }
}

/// Where a detection is in its episode. An episode starts when a rule first
/// fires for a subject, gets updates while it keeps firing (rate-limited), and
/// ends when the rule has stopped firing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// First firing of the episode.
    Start,
    /// Still firing; the evidence has grown.
    Update,
    /// The rule no longer fires.
    End,
}

/// One destination in the evidence.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Destination {
    /// Remote address.
    pub addr: IpAddr,
    /// Remote port.
    pub port: u16,
    /// Bytes sent to it in the window.
    pub bytes: u64,
}

/// DNS features of the evidence.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct DnsEvidence {
    /// Queries in the window.
    pub queries: u64,
    /// Distinct query names in the window.
    pub distinct_names: u64,
    /// Longest label seen (bytes).
    pub max_label_len: usize,
    /// Longest name seen (bytes).
    pub max_name_len: usize,
    /// Mean Shannon entropy of the subdomain part, bits per character.
    pub mean_entropy: f64,
    /// Share of TXT, NULL, CNAME and ANY queries.
    pub unusual_type_share: f64,
    /// Share of answers that were NXDOMAIN.
    pub nxdomain_share: f64,
    /// Registered domains involved, most encoded bytes first.
    pub domains: Vec<String>,
    /// A few of the query names.
    pub sample_queries: Vec<String>,
}

/// What a detection rests on.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Evidence {
    /// Start of the window the numbers cover (detector clock, ns).
    pub window_start_ns: u64,
    /// End of that window (detector clock, ns).
    pub window_end_ns: u64,
    /// External egress bytes counted against the rule in the window.
    pub bytes: u64,
    /// Bytes to allowlisted destinations in the window (counted, exempt).
    pub allowlisted_bytes: u64,
    /// Biggest destinations in the window.
    pub top_destinations: Vec<Destination>,
    /// Estimated bytes of data encoded in query names.
    pub encoded_bytes: u64,
    /// DNS features, for DNS rules.
    pub dns: Option<DnsEvidence>,
}

/// A detection and its evidence.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Detection {
    /// The rule.
    pub rule: Rule,
    /// Episode phase.
    pub phase: Phase,
    /// Episode number (per detector instance, increasing).
    pub episode: u64,
    /// Who: the workload identity.
    pub workload: String,
    /// The subject inside the workload: a destination, a registered domain.
    pub subject: Option<String>,
    /// The value the rule measured.
    pub observed: f64,
    /// The threshold it was compared with.
    pub threshold: f64,
    /// Human-readable statement of the rule and its threshold.
    pub condition: String,
    /// The action the policy asks for.
    pub action: Action,
    /// The evidence.
    pub evidence: Evidence,
}

/// A workload's namespace and labels as the detectors keep them, once per
/// workload: boxed, and nothing at all for a workload with neither (every
/// workload until the Pod watch names it, and every one outside
/// Kubernetes).
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct Meta(Option<Box<WorkloadMeta>>);

static NO_META: WorkloadMeta = WorkloadMeta {
    namespace: None,
    labels: BTreeMap::new(),
};

impl Meta {
    pub(crate) fn new(meta: &WorkloadMeta) -> Self {
        Self((*meta != NO_META).then(|| Box::new(meta.clone())))
    }

    pub(crate) fn get(&self) -> &WorkloadMeta {
        self.0.as_deref().unwrap_or(&NO_META)
    }
}

/// Start/update/end bookkeeping per (rule, workload, subject).
#[derive(Debug, Default)]
pub(crate) struct Episodes {
    active: HashMap<(Rule, String, Option<String>), Active>,
    /// Open episodes per rule: with none open for a rule, a rule that is
    /// not firing is answered without building (allocating) a key, which
    /// is every call for every quiet workload and domain.
    open_per_rule: HashMap<Rule, usize>,
    next_id: u64,
}

#[derive(Debug)]
struct Active {
    id: u64,
    last_report_ns: u64,
    last_observed: f64,
}

impl Episodes {
    /// Decides whether a firing (or not) rule reports now. Returns the phase
    /// and the episode id when it does.
    pub(crate) fn step(
        &mut self,
        key: (Rule, &str, Option<&str>),
        firing: bool,
        observed: f64,
        now_ns: u64,
        update_every_ns: u64,
    ) -> Option<(Phase, u64)> {
        if !firing && !self.any_open(key.0) {
            return None;
        }
        let k = (key.0, key.1.to_owned(), key.2.map(str::to_owned));
        match (self.active.get_mut(&k), firing) {
            (None, true) => {
                self.next_id += 1;
                let id = self.next_id;
                *self.open_per_rule.entry(key.0).or_default() += 1;
                self.active.insert(
                    k,
                    Active {
                        id,
                        last_report_ns: now_ns,
                        last_observed: observed,
                    },
                );
                Some((Phase::Start, id))
            }
            (Some(a), true) => {
                // Updates only when the evidence grew and not more often than
                // the policy's interval: one alert per episode, not per poll.
                if now_ns.saturating_sub(a.last_report_ns) >= update_every_ns
                    && observed > a.last_observed
                {
                    a.last_report_ns = now_ns;
                    a.last_observed = observed;
                    Some((Phase::Update, a.id))
                } else {
                    None
                }
            }
            (Some(_), false) => {
                if let Some(n) = self.open_per_rule.get_mut(&key.0) {
                    *n -= 1;
                }
                self.active.remove(&k).map(|a| (Phase::End, a.id))
            }
            (None, false) => None,
        }
    }

    /// True when some episode of `rule` is open.
    fn any_open(&self, rule: Rule) -> bool {
        self.open_per_rule.get(&rule).is_some_and(|&n| n > 0)
    }

    /// True when an episode is open for the key.
    pub(crate) fn is_active(&self, key: (Rule, &str, Option<&str>)) -> bool {
        self.any_open(key.0)
            && self
                .active
                .contains_key(&(key.0, key.1.to_owned(), key.2.map(str::to_owned)))
    }

    /// (workload, subject) pairs with an open episode of `rule`.
    pub(crate) fn open_keys(&self, rule: Rule) -> Vec<(String, Option<String>)> {
        self.active
            .keys()
            .filter(|k| k.0 == rule)
            .map(|k| (k.1.clone(), k.2.clone()))
            .collect()
    }

    /// Workloads with an open episode of `rule`.
    pub(crate) fn open_subjects(&self, rule: Rule) -> Vec<String> {
        self.active
            .keys()
            .filter(|k| k.0 == rule)
            .map(|k| k.1.clone())
            .collect()
    }

    /// Open episodes.
    pub(crate) fn len(&self) -> usize {
        self.active.len()
    }
}

/// Shannon entropy of `s` in bits per byte.
pub fn entropy(s: &[u8]) -> f64 {
    if s.is_empty() {
        return 0.0;
    }
    let mut counts = [0u32; 256];
    for &b in s {
        counts[usize::from(b)] += 1;
    }
    entropy_of_counts(&counts, s.len())
}

/// Shannon entropy (bits per symbol) of `n` symbols with byte `counts`.
pub fn entropy_of_counts(counts: &[u32; 256], n: usize) -> f64 {
    if n == 0 {
        return 0.0;
    }
    let n = n as f64;
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = f64::from(c) / n;
            -p * p.log2()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn episodes_start_update_end() {
        let mut e = Episodes::default();
        let k = (Rule::LargeDataTransfer, "w", None);
        assert_eq!(e.step(k, false, 0.0, 0, 10), None);
        assert_eq!(e.step(k, true, 1.0, 1, 10), Some((Phase::Start, 1)));
        // Firing again right away: silent.
        assert_eq!(e.step(k, true, 2.0, 2, 10), None);
        // After the interval with more evidence: an update.
        assert_eq!(e.step(k, true, 3.0, 12, 10), Some((Phase::Update, 1)));
        // After the interval without growth: silent.
        assert_eq!(e.step(k, true, 3.0, 30, 10), None);
        assert!(e.is_active(k));
        assert_eq!(e.step(k, false, 0.0, 31, 10), Some((Phase::End, 1)));
        assert_eq!(e.len(), 0);
        assert_eq!(e.step(k, true, 1.0, 40, 10), Some((Phase::Start, 2)));
    }

    #[test]
    fn meta_is_kept_boxed_and_only_when_set() {
        let none = Meta::new(&WorkloadMeta::default());
        assert!(none.0.is_none());
        assert_eq!(*none.get(), WorkloadMeta::default());
        let set = WorkloadMeta {
            namespace: Some("data".into()),
            labels: [("app".to_owned(), "etl".to_owned())].into(),
        };
        let m = Meta::new(&set);
        assert_eq!(*m.get(), set);
        assert_ne!(m, none);
    }

    #[test]
    fn entropy_of_known_strings() {
        assert_eq!(entropy(b""), 0.0);
        assert_eq!(entropy(b"aaaa"), 0.0);
        assert!((entropy(b"abab") - 1.0).abs() < 1e-9);
        assert!((entropy(b"0123456789abcdef") - 4.0).abs() < 1e-9);
    }
}
