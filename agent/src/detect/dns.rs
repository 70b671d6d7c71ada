//! DNS tunnelling and exfiltration, per workload and registered domain.
//!
//! Payloads are parsed with hickory-proto and names split at the registered
//! domain with the public suffix list (`psl`). What counts is information
//! the workload pushes out through names: each query name not seen in the
//! window adds the Shannon information of its subdomain part (length × bits
//! per character / 8), which for hex, base32 or base64 carriers is close to the
//! bytes encoded. Ordinary traffic repeats a few names per domain and so adds
//! little; names that carry no client data are skipped: the cluster's own
//! domains (search-path expansions included), reverse lookups, SRV and
//! underscore names (`_dmarc`, DKIM, SRV), allowlisted domains.
use std::{
    collections::{HashMap, VecDeque},
    hash::BuildHasher as _,
    net::SocketAddr,
};

use smallvec::SmallVec;

use hickory_proto::{
    op::{Header, Message, MessageType, Query, ResponseCode},
    rr::{Name, RecordType},
    serialize::binary::{BinDecodable as _, BinDecoder, DecodeError},
};

use super::{
    Destination, Detection, DnsEvidence, Episodes, Evidence, Meta, NS, Rule, entropy_of_counts,
    small_map::{Keyed, SmallMap},
};
use crate::policy::{Action, Policy, WorkloadMeta};

/// Why a payload is not a DNS message we can use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DnsParseError {
    /// Shorter than a TCP length prefix.
    #[error("TCP DNS payload of {0} bytes has no length prefix")]
    NoLengthPrefix(usize),
    /// The TCP length prefix promises more than the payload holds.
    #[error("TCP DNS message claims {claimed} bytes, {present} present")]
    TcpTruncated {
        /// Length in the prefix.
        claimed: usize,
        /// Bytes after the prefix.
        present: usize,
    },
    /// hickory-proto rejected it.
    #[error("malformed DNS message: {0}")]
    Malformed(String),
}

/// The parts of a DNS message the detector uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsMessage {
    /// An answer (QR bit set).
    pub response: bool,
    /// Answer code NXDOMAIN.
    pub nxdomain: bool,
    /// Questions: lower-case name without the trailing dot, and type.
    pub questions: Vec<(String, RecordType)>,
}

/// What [`DnsDetector::observe_payload`] saw in one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DnsSummary {
    /// An answer (QR bit set).
    pub response: bool,
    /// Answer code NXDOMAIN.
    pub nxdomain: bool,
    /// Questions in it.
    pub questions: usize,
}

/// The DNS message inside a UDP payload, or inside a TCP payload after its
/// two-byte length prefix (only the first message of a segment).
fn frame(payload: &[u8], tcp: bool) -> Result<&[u8], DnsParseError> {
    if !tcp {
        return Ok(payload);
    }
    let Some((len, rest)) = payload.split_first_chunk::<2>() else {
        return Err(DnsParseError::NoLengthPrefix(payload.len()));
    };
    let claimed = usize::from(u16::from_be_bytes(*len));
    if claimed > rest.len() {
        return Err(DnsParseError::TcpTruncated {
            claimed,
            present: rest.len(),
        });
    }
    Ok(&rest[..claimed])
}

/// Decodes the header and the question section with hickory-proto, writing
/// each question into `out[i]` (reusing its string) and returning the
/// summary. The sections after the questions are not decoded: the detector
/// uses none of them, and a message damaged only there (or cut at the
/// kernel's capture length) still has readable questions.
fn decode_questions(
    payload: &[u8],
    tcp: bool,
    out: &mut Vec<(String, RecordType)>,
) -> Result<DnsSummary, DnsParseError> {
    let malformed = |e: DecodeError| DnsParseError::Malformed(e.to_string());
    let mut decoder = BinDecoder::new(frame(payload, tcp)?);
    let header = Header::read(&mut decoder).map_err(malformed)?;
    let count = usize::from(header.counts.queries);
    for i in 0..count {
        let q = Query::read(&mut decoder).map_err(malformed)?;
        if i == out.len() {
            out.push((String::new(), RecordType::A));
        }
        let slot = &mut out[i];
        write_name(q.name(), &mut slot.0);
        slot.1 = q.query_type();
    }
    Ok(DnsSummary {
        response: header.metadata.message_type == MessageType::Response,
        nxdomain: header.metadata.response_code == ResponseCode::NXDomain,
        questions: count,
    })
}

/// Writes `name` into `out` as hickory's `Name::to_ascii` presents it, lower
/// case and without the trailing dot: letters, digits, `_`, `-` (not first)
/// and `*` (first) as they are, other printable bytes after a backslash,
/// the rest as `\ooo`. Straight from the wire labels into a reused buffer.
fn write_name(name: &Name, out: &mut String) {
    use std::fmt::Write as _;
    out.clear();
    for (i, label) in name.iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        for (j, &b) in label.iter().enumerate() {
            let c = b.to_ascii_lowercase();
            match c {
                b'a'..=b'z' | b'0'..=b'9' | b'_' => out.push(char::from(c)),
                b'-' if j > 0 => out.push('-'),
                b'*' if j == 0 => out.push('*'),
                0x21..=0x7e => {
                    out.push('\\');
                    out.push(char::from(c));
                }
                _ => {
                    let _ = write!(out, "\\{c:03o}");
                }
            }
        }
    }
}

/// Parses a UDP payload, or a TCP payload with its two-byte length prefix
/// (only the first message of a TCP segment is read).
pub fn parse_payload(payload: &[u8], tcp: bool) -> Result<DnsMessage, DnsParseError> {
    let mut questions = Vec::new();
    let s = decode_questions(payload, tcp, &mut questions)?;
    Ok(DnsMessage {
        response: s.response,
        nxdomain: s.nxdomain,
        questions,
    })
}

/// Why a query name was not scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// Below a cluster domain (service discovery, search-path expansion).
    Cluster,
    /// `in-addr.arpa` / `ip6.arpa`.
    Reverse,
    /// SRV, or a name with an underscore label (`_dmarc`, DKIM, SRV).
    Service,
    /// Allowlisted by policy.
    Allowlisted,
    /// No registered domain (a bare TLD, a single label, not a host name).
    NoRegisteredDomain,
}

/// A query name split at its registered domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split<'a> {
    /// The registered domain (`example.co.uk`).
    pub registered: &'a str,
    /// What is left of it, without the joining dot (may be empty).
    pub subdomain: &'a str,
}

fn ends_with_domain(name: &str, suffix: &str) -> bool {
    let suffix = suffix.trim_end_matches('.');
    name.len() >= suffix.len()
        && name[name.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
        && (name.len() == suffix.len() || name.as_bytes()[name.len() - suffix.len() - 1] == b'.')
}

/// Decides whether `name` is scored and, if so, splits it.
pub fn classify<'a>(policy: &Policy, name: &'a str, qtype: RecordType) -> Result<Split<'a>, Skip> {
    if policy
        .dns
        .cluster_domains
        .iter()
        .any(|c| ends_with_domain(name, c))
    {
        return Err(Skip::Cluster);
    }
    if ends_with_domain(name, "in-addr.arpa") || ends_with_domain(name, "ip6.arpa") {
        return Err(Skip::Reverse);
    }
    if qtype == RecordType::SRV || name.split('.').any(|l| l.starts_with('_')) {
        return Err(Skip::Service);
    }
    if policy.allowlisted_domain(name) {
        return Err(Skip::Allowlisted);
    }
    let registered = psl::domain_str(name).ok_or(Skip::NoRegisteredDomain)?;
    let subdomain = name[..name.len() - registered.len()].trim_end_matches('.');
    Ok(Split {
        registered,
        subdomain,
    })
}

/// Estimated bytes of data a subdomain part can carry: its characters (dots
/// excluded) times their Shannon entropy, over 8.
pub fn encoded_estimate(subdomain: &str) -> f64 {
    let (chars, bits) = subdomain_entropy(subdomain);
    chars as f64 * bits / 8.0
}

/// Characters of `subdomain` other than dots, and their Shannon entropy in
/// bits per character ([`entropy`] of those characters, without copying
/// them).
fn subdomain_entropy(subdomain: &str) -> (usize, f64) {
    let mut counts = [0u32; 256];
    let mut n = 0usize;
    for b in subdomain.bytes().filter(|&b| b != b'.') {
        counts[usize::from(b)] += 1;
        n += 1;
    }
    (n, entropy_of_counts(&counts, n))
}

/// A subdomain that looks like a carrier of encoded data: long and dense.
fn carrier_like(subdomain: &str, bits: f64) -> bool {
    subdomain.len() >= 12 && bits >= 3.0
}

const BUCKETS: u64 = 60;
const SAMPLES: usize = 5;
/// Names remembered per (workload, domain); past that every query counts as
/// new, which only errs towards detection.
const MAX_NAMES: usize = 50_000;

#[derive(Debug, Default, Clone, Copy)]
struct Bucket {
    idx: u64,
    queries: u64,
    unusual: u64,
    answers: u64,
    nxdomain: u64,
    encoded: f64,
    carrier: f64,
    name_bytes: u64,
}

/// Maps keyed by strings a workload chooses (names, domains): foldhash,
/// seeded per process, so keys cannot be crafted to collide.
type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// DNS servers remembered per domain for the evidence; a workload uses one
/// or two, and past this many the rest go uncounted.
const MAX_SERVERS: usize = 8;

/// A (workload, registered domain)'s window. Sized for the common case of
/// a pod asking for the same name of a domain again and again: one bucket,
/// one name, one server, one sample, no hash table of its own.
#[derive(Debug)]
struct DomainState {
    /// The registered domain (this state's key in its workload's table).
    domain: Box<str>,
    is_dirty: bool,
    buckets: DnsBuckets,
    /// Names seen in the window, as 64-bit fingerprints (seeded hashes):
    /// no copy of each name is kept, and a collision among the at most
    /// [`MAX_NAMES`] of a domain is a ~2^-34 event that only under-counts
    /// one name.
    names: Names,
    /// Usually one name and one server: held inline, no allocation.
    samples: SmallVec<[Box<str>; 1]>,
    servers: SmallVec<[(SocketAddr, u64); 1]>,
    max_label: usize,
    max_name: usize,
    entropy_sum: f64,
    entropy_n: u64,
}

impl Keyed for DomainState {
    type Key = str;
    type Owned = Box<str>;
    fn key(&self) -> &str {
        &self.domain
    }
    fn owned_key(&self) -> Box<str> {
        self.domain.clone()
    }
}

/// A domain's buckets: the newest inline, older ones (oldest first) in a
/// boxed queue made when a second bucket is used.
#[derive(Debug, Default)]
struct DnsBuckets {
    last: Option<Bucket>,
    #[expect(
        clippy::box_collection,
        reason = "8 bytes inline instead of 32 in every domain, most of which never need it"
    )]
    older: Option<Box<VecDeque<Bucket>>>,
}

impl DnsBuckets {
    /// The bucket `idx`, appended after the newest unless it is the newest.
    fn at(&mut self, idx: u64) -> &mut Bucket {
        let fresh = Bucket {
            idx,
            ..Default::default()
        };
        match self.last.as_ref().map(|b| b.idx == idx) {
            Some(true) => {}
            Some(false) => {
                let older = self.older.get_or_insert_default();
                // One bucket more at a time: a domain rarely spans many.
                older.reserve_exact(1);
                older.extend(self.last.replace(fresh));
            }
            None => self.last = Some(fresh),
        }
        self.last.as_mut().expect("set above")
    }

    /// Drops buckets from the front while older than `first_idx`; true
    /// when some were dropped.
    fn expire(&mut self, first_idx: u64) -> bool {
        let mut dropped = false;
        if let Some(older) = &mut self.older {
            while older.front().is_some_and(|b| b.idx < first_idx) {
                older.pop_front();
                dropped = true;
            }
            if !older.is_empty() {
                return dropped;
            }
            self.older = None;
        }
        if self.last.as_ref().is_some_and(|b| b.idx < first_idx) {
            self.last = None;
            dropped = true;
        }
        dropped
    }

    fn is_empty(&self) -> bool {
        self.last.is_none()
    }

    /// Oldest first.
    fn iter(&self) -> impl DoubleEndedIterator<Item = &Bucket> {
        self.older
            .as_deref()
            .into_iter()
            .flatten()
            .chain(self.last.as_ref())
    }
}

/// A domain's name fingerprints with when each was last seen: most
/// domains of most workloads see one name, held inline.
#[derive(Debug, Default)]
enum Names {
    #[default]
    Empty,
    One {
        fingerprint: u64,
        seen: u64,
    },
    Many(Box<Map<u64, u64>>),
}

impl Names {
    fn len(&self) -> usize {
        match self {
            Names::Empty => 0,
            Names::One { .. } => 1,
            Names::Many(m) => m.len(),
        }
    }

    /// When `fingerprint` was last seen, mutable.
    fn get_mut(&mut self, fingerprint: u64) -> Option<&mut u64> {
        match self {
            Names::One {
                fingerprint: f,
                seen,
            } if *f == fingerprint => Some(seen),
            Names::Many(m) => m.get_mut(&fingerprint),
            _ => None,
        }
    }

    /// Adds a fingerprint not present yet.
    fn insert(&mut self, fingerprint: u64, seen: u64) {
        match self {
            Names::Empty => *self = Names::One { fingerprint, seen },
            Names::One {
                fingerprint: f,
                seen: s,
            } => {
                let mut m = Map::default();
                m.insert(*f, *s);
                m.insert(fingerprint, seen);
                *self = Names::Many(Box::new(m));
            }
            Names::Many(m) => {
                m.insert(fingerprint, seen);
            }
        }
    }

    /// Keeps the names seen at or after `first_ns`.
    fn retain_since(&mut self, first_ns: u64) {
        match self {
            Names::Empty => {}
            Names::One { seen, .. } => {
                if *seen < first_ns {
                    *self = Names::Empty;
                }
            }
            Names::Many(m) => {
                m.retain(|_, &mut seen| seen >= first_ns);
                // Back to the inline forms once few are left.
                match m.len() {
                    0 => *self = Names::Empty,
                    1 => {
                        let (&fingerprint, &seen) = m.iter().next().expect("one name");
                        *self = Names::One { fingerprint, seen };
                    }
                    _ => {}
                }
            }
        }
    }
}

impl DomainState {
    fn new(domain: &str) -> Self {
        Self {
            domain: domain.into(),
            is_dirty: false,
            buckets: DnsBuckets::default(),
            names: Names::Empty,
            samples: SmallVec::new(),
            servers: SmallVec::new(),
            max_label: 0,
            max_name: 0,
            entropy_sum: 0.0,
            entropy_n: 0,
        }
    }

    fn bucket(&mut self, idx: u64) -> &mut Bucket {
        self.buckets.at(idx)
    }

    fn expire(&mut self, first_idx: u64, first_ns: u64) {
        if self.buckets.expire(first_idx) {
            self.names.retain_since(first_ns);
            if self.buckets.is_empty() {
                self.servers = SmallVec::new();
                self.samples = SmallVec::new();
                self.max_label = 0;
                self.max_name = 0;
                self.entropy_sum = 0.0;
                self.entropy_n = 0;
            }
        }
    }

    fn sum(&self) -> Bucket {
        let mut s = Bucket::default();
        for b in self.buckets.iter() {
            s.queries += b.queries;
            s.unusual += b.unusual;
            s.answers += b.answers;
            s.nxdomain += b.nxdomain;
            s.encoded += b.encoded;
            s.carrier += b.carrier;
            s.name_bytes += b.name_bytes;
        }
        s
    }

    fn last_minute_queries(&self, now_idx: u64, per_minute: u64) -> u64 {
        self.buckets
            .iter()
            .rev()
            .take_while(|b| b.idx + per_minute > now_idx)
            .map(|b| b.queries)
            .sum()
    }
}

/// Counts for the metrics.
#[derive(Debug, Default, Clone, Copy)]
pub struct DnsStats {
    /// Queries scored.
    pub scored: u64,
    /// Queries skipped (cluster, reverse, service, allowlisted, no domain).
    pub skipped: u64,
    /// (workload, domain) pairs tracked.
    pub keys: usize,
}

/// The DNS detector.
#[derive(Debug, Default)]
pub struct DnsDetector {
    workloads: Map<String, WorkloadDns>,
    /// Seed of the name fingerprints.
    fingerprint: foldhash::fast::RandomState,
    /// Workloads with a query since the last evaluation.
    dirty: Vec<String>,
    episodes: Episodes,
    stats: DnsStats,
    last_sweep_ns: u64,
    /// Reused question buffer (no allocation per message once warm).
    questions: Vec<(String, RecordType)>,
}

/// One workload's domains, and its carrier bytes summed over them for the
/// spread rule (kept as its own sliding window so the rule never has to walk
/// every domain).
#[derive(Debug, Default)]
struct WorkloadDns {
    /// Its domains; those with a query since the last evaluation have
    /// `is_dirty` set (a flag, not a list of copied names).
    domains: SmallMap<DomainState>,
    is_dirty: bool,
    /// Made by the first carrier-like name (most workloads send none).
    carrier: Option<Box<Carrier>>,
    /// Namespace and labels, for the policy's overrides.
    meta: Meta,
}

/// A workload's carrier bytes over its domains, as a sliding window.
#[derive(Debug, Default)]
struct Carrier {
    /// (bucket, carrier bytes), oldest first.
    buckets: VecDeque<(u64, f64)>,
    sum: f64,
    /// Domains that carried, with the bucket of their latest carrier name.
    domains: Map<String, u64>,
}

impl WorkloadDns {
    fn expire_carrier(&mut self, first_idx: u64) {
        let Some(c) = &mut self.carrier else {
            return;
        };
        while c.buckets.front().is_some_and(|b| b.0 < first_idx) {
            if let Some((_, v)) = c.buckets.pop_front() {
                c.sum -= v;
            }
        }
        if c.buckets.is_empty() {
            // No float drift left behind.
            c.sum = 0.0;
        }
        c.domains.retain(|_, &mut idx| idx >= first_idx);
        if c.buckets.is_empty() && c.domains.is_empty() {
            self.carrier = None;
        }
    }

    /// Carrier bytes in the window.
    fn carrier_sum(&self) -> f64 {
        self.carrier.as_ref().map_or(0.0, |c| c.sum)
    }

    /// Domains that carried in the window.
    fn carrier_domains(&self) -> usize {
        self.carrier.as_ref().map_or(0, |c| c.domains.len())
    }
}

fn bucket_ns(p: &Policy) -> u64 {
    (p.dns.window.0.as_nanos() as u64 / BUCKETS).max(NS)
}

impl DnsDetector {
    /// An empty detector.
    pub fn new() -> Self {
        Self::default()
    }

    /// Scores one question of a query sent by `workload`.
    pub fn observe_query(
        &mut self,
        policy: &Policy,
        workload: &str,
        name: &str,
        qtype: RecordType,
        server: Option<SocketAddr>,
        now_ns: u64,
    ) -> Result<(), Skip> {
        let split = match classify(policy, name, qtype) {
            Ok(s) => s,
            Err(skip) => {
                self.stats.skipped += 1;
                return Err(skip);
            }
        };
        self.stats.scored += 1;
        let idx = now_ns / bucket_ns(policy);
        // Borrowed look-ups first: no allocation per query once a workload
        // and domain are known.
        let w = match self.workloads.get_mut(workload) {
            Some(w) => w,
            None => self.workloads.entry(workload.to_owned()).or_default(),
        };
        if !w.is_dirty {
            w.is_dirty = true;
            self.dirty.push(workload.to_owned());
        }
        let st = w
            .domains
            .get_or_insert_with(split.registered, || DomainState::new(split.registered));
        st.is_dirty = true;
        let fingerprint = self.fingerprint.hash_one(name);
        let novel = match st.names.get_mut(fingerprint) {
            Some(seen) => {
                *seen = now_ns;
                false
            }
            None => {
                if st.names.len() < MAX_NAMES {
                    st.names.insert(fingerprint, now_ns);
                }
                true
            }
        };
        let unusual = matches!(
            qtype,
            RecordType::TXT | RecordType::NULL | RecordType::CNAME | RecordType::ANY
        );
        let (enc, carrier) = if novel && !split.subdomain.is_empty() {
            let (chars, bits) = subdomain_entropy(split.subdomain);
            let enc = chars as f64 * bits / 8.0;
            st.entropy_sum += bits;
            st.entropy_n += 1;
            if st.samples.len() < SAMPLES {
                st.samples.reserve_exact(1);
                st.samples.push(name.into());
            }
            (
                enc,
                if carrier_like(split.subdomain, bits) {
                    enc
                } else {
                    0.0
                },
            )
        } else {
            (0.0, 0.0)
        };
        st.max_label = st
            .max_label
            .max(name.split('.').map(str::len).max().unwrap_or(0));
        st.max_name = st.max_name.max(name.len());
        if let Some(s) = server {
            if let Some((_, n)) = st.servers.iter_mut().find(|(a, _)| *a == s) {
                *n += 1;
            } else if st.servers.len() < MAX_SERVERS {
                st.servers.reserve_exact(1);
                st.servers.push((s, 1));
            }
        }
        let b = st.bucket(idx);
        b.queries += 1;
        b.unusual += u64::from(unusual);
        b.encoded += enc;
        b.carrier += carrier;
        b.name_bytes += name.len() as u64;
        if carrier > 0.0 {
            let c = w.carrier.get_or_insert_default();
            match c.buckets.back_mut() {
                Some((i, v)) if *i == idx => *v += carrier,
                _ => c.buckets.push_back((idx, carrier)),
            }
            c.sum += carrier;
            match c.domains.get_mut(split.registered) {
                Some(i) => *i = idx,
                None => {
                    c.domains.insert(split.registered.to_owned(), idx);
                }
            }
        }
        Ok(())
    }

    /// Records an answer to `workload` for `name` (for the NXDOMAIN share).
    pub fn observe_answer(
        &mut self,
        policy: &Policy,
        workload: &str,
        name: &str,
        qtype: RecordType,
        nxdomain: bool,
        now_ns: u64,
    ) {
        let Ok(split) = classify(policy, name, qtype) else {
            return;
        };
        let idx = now_ns / bucket_ns(policy);
        if let Some(st) = self
            .workloads
            .get_mut(workload)
            .and_then(|w| w.domains.get_mut(split.registered))
        {
            let b = st.bucket(idx);
            b.answers += 1;
            b.nxdomain += u64::from(nxdomain);
        }
    }

    /// Parses a payload and feeds every question (queries) or the answer
    /// code (answers). Returns the parse error for the caller to count.
    pub fn observe_payload(
        &mut self,
        policy: &Policy,
        workload: &str,
        payload: &[u8],
        tcp: bool,
        server: Option<SocketAddr>,
        now_ns: u64,
    ) -> Result<DnsSummary, DnsParseError> {
        self.observe_payload_of(
            policy,
            workload,
            &WorkloadMeta::default(),
            payload,
            tcp,
            server,
            now_ns,
        )
    }

    /// [`Self::observe_payload`] for a workload whose namespace and labels
    /// are known, so the policy's overrides apply to it.
    #[expect(clippy::too_many_arguments, reason = "one DNS record, spelled out")]
    pub fn observe_payload_of(
        &mut self,
        policy: &Policy,
        workload: &str,
        meta: &WorkloadMeta,
        payload: &[u8],
        tcp: bool,
        server: Option<SocketAddr>,
        now_ns: u64,
    ) -> Result<DnsSummary, DnsParseError> {
        // The question buffer is reused from message to message.
        let mut questions = std::mem::take(&mut self.questions);
        let m = decode_questions(payload, tcp, &mut questions);
        if let Ok(m) = m {
            self.observe_questions(policy, workload, meta, &m, &questions, server, now_ns);
        }
        self.questions = questions;
        m
    }

    #[expect(clippy::too_many_arguments, reason = "one DNS record, spelled out")]
    fn observe_questions(
        &mut self,
        policy: &Policy,
        workload: &str,
        meta: &WorkloadMeta,
        m: &DnsSummary,
        questions: &[(String, RecordType)],
        server: Option<SocketAddr>,
        now_ns: u64,
    ) {
        match self.workloads.get_mut(workload) {
            Some(w) if w.meta.get() != meta => w.meta = Meta::new(meta),
            Some(_) => {}
            None if m.response => {}
            None => {
                self.workloads.insert(
                    workload.to_owned(),
                    WorkloadDns {
                        meta: Meta::new(meta),
                        ..Default::default()
                    },
                );
            }
        }
        for (name, qtype) in &questions[..m.questions] {
            if m.response {
                self.observe_answer(policy, workload, name, *qtype, m.nxdomain, now_ns);
            } else {
                let _ = self.observe_query(policy, workload, name, *qtype, server, now_ns);
            }
        }
    }

    /// Expires old buckets and reports episode changes. Only what can have
    /// changed is looked at: domains queried since the last call, domains and
    /// workloads with an open episode, and, once a minute, everything (to
    /// forget what left the window).
    pub fn evaluate(&mut self, policy: &Policy, now_ns: u64) -> Vec<Detection> {
        let bucket = bucket_ns(policy);
        let now_idx = now_ns / bucket;
        let first_idx = now_idx.saturating_sub(BUCKETS - 1);
        let ctx = EvalCtx {
            policy,
            now_ns,
            now_idx,
            first_idx,
            first_ns: first_idx * bucket,
            window_ns: bucket * BUCKETS,
            per_minute: (60 * NS).div_ceil(bucket).max(1),
            every: policy.update_interval_ns(),
        };
        let sweep = now_ns.saturating_sub(self.last_sweep_ns) >= 60 * NS;
        let mut out = Vec::new();
        // Open per-domain episodes, by workload: evaluated (to end them)
        // even when quiet.
        let mut open: Vec<(String, String)> = Vec::new();
        for rule in [Rule::DnsExfiltration, Rule::DnsTunnel] {
            open.extend(
                self.episodes
                    .open_keys(rule)
                    .into_iter()
                    .filter_map(|(w, d)| Some((w, d?))),
            );
        }
        open.sort_unstable();
        open.dedup();
        // Workloads whose domains are looked at: those queried since the
        // last call (their queried domains), those with an open domain
        // episode, and on a sweep every one (all their domains). In order
        // of (workload, domain), one workload at a time, so no list of
        // every (workload, domain) pair is built.
        let mut workloads: Vec<String> = std::mem::take(&mut self.dirty);
        workloads.extend(open.iter().map(|(w, _)| w.clone()));
        if sweep {
            self.last_sweep_ns = now_ns;
            workloads.extend(self.workloads.keys().cloned());
        }
        workloads.sort_unstable();
        workloads.dedup();
        for workload in &workloads {
            let Some(wd) = self.workloads.get_mut(workload) else {
                continue;
            };
            let mut domains: Vec<Box<str>> = wd
                .domains
                .values()
                .filter(|st| sweep || st.is_dirty)
                .map(|st| st.domain.clone())
                .collect();
            let from = open.partition_point(|(w, _)| w < workload);
            domains.extend(
                open[from..]
                    .iter()
                    .take_while(|(w, _)| w == workload)
                    .map(|(_, d)| d.as_str().into()),
            );
            domains.sort_unstable();
            domains.dedup();
            let eff = policy.effective(wd.meta.get());
            let (threshold, action) = (eff.dns_encoded_bytes, eff.action);
            for domain in domains {
                let Some(st) = wd.domains.get_mut(&domain) else {
                    continue;
                };
                st.is_dirty = false;
                st.expire(ctx.first_idx, ctx.first_ns);
                evaluate_domain(
                    &ctx,
                    &mut self.episodes,
                    (workload, &domain, threshold, action),
                    st,
                    &mut out,
                );
                let keep = !st.buckets.is_empty()
                    || [Rule::DnsExfiltration, Rule::DnsTunnel]
                        .iter()
                        .any(|&r| self.episodes.is_active((r, workload, Some(&domain))));
                if !keep {
                    wd.domains.remove(&domain);
                }
            }
        }
        // The spread rule: workloads queried since the last call (their
        // flag is cleared here), with an open spread episode, or all on a
        // sweep.
        workloads.retain(|w| {
            self.workloads
                .get_mut(w)
                .is_some_and(|wd| std::mem::take(&mut wd.is_dirty) || sweep)
        });
        workloads.extend(self.episodes.open_subjects(Rule::DnsExfiltrationSpread));
        workloads.sort_unstable();
        workloads.dedup();
        for w in workloads {
            let Some(wd) = self.workloads.get_mut(&w) else {
                // Forgotten while an episode was open: end it.
                if let Some((phase, episode)) = self.episodes.step(
                    (Rule::DnsExfiltrationSpread, &w, None),
                    false,
                    0.0,
                    now_ns,
                    ctx.every,
                ) {
                    out.push(spread_detection(
                        &ctx,
                        &w,
                        phase,
                        episode,
                        0.0,
                        DnsEvidence::default(),
                    ));
                }
                continue;
            };
            wd.expire_carrier(ctx.first_idx);
            let carrier_sum = wd.carrier_sum();
            let firing =
                carrier_sum > policy.dns.spread_encoded_bytes as f64 && wd.carrier_domains() >= 2;
            if let Some((phase, episode)) = self.episodes.step(
                (Rule::DnsExfiltrationSpread, &w, None),
                firing,
                carrier_sum,
                now_ns,
                ctx.every,
            ) {
                let ev = spread_evidence(wd);
                out.push(spread_detection(&ctx, &w, phase, episode, carrier_sum, ev));
            }
            let open = self
                .episodes
                .is_active((Rule::DnsExfiltrationSpread, &w, None));
            let no_carrier = wd.carrier.as_ref().is_none_or(|c| c.buckets.is_empty());
            if wd.domains.is_empty() && no_carrier && !open {
                self.workloads.remove(&w);
            }
        }
        self.stats.keys = self.workloads.values().map(|w| w.domains.len()).sum();
        out
    }

    /// Counts for the metrics.
    pub fn stats(&self) -> DnsStats {
        self.stats
    }
}

/// What one evaluation needs to know.
struct EvalCtx<'a> {
    policy: &'a Policy,
    now_ns: u64,
    now_idx: u64,
    first_idx: u64,
    first_ns: u64,
    window_ns: u64,
    per_minute: u64,
    every: u64,
}

fn domain_evidence(st: &DomainState, s: &Bucket, domain: &str) -> DnsEvidence {
    DnsEvidence {
        queries: s.queries,
        distinct_names: st.names.len() as u64,
        max_label_len: st.max_label,
        max_name_len: st.max_name,
        mean_entropy: if st.entropy_n > 0 {
            st.entropy_sum / st.entropy_n as f64
        } else {
            0.0
        },
        unusual_type_share: ratio(s.unusual, s.queries),
        nxdomain_share: ratio(s.nxdomain, s.answers),
        domains: vec![domain.to_owned()],
        sample_queries: st.samples.iter().map(|q| q.to_string()).collect(),
    }
}

/// The per-domain rules: encoded bytes and tunnel rate.
fn evaluate_domain(
    ctx: &EvalCtx<'_>,
    episodes: &mut Episodes,
    (workload, domain, threshold, action): (&str, &str, u64, Action),
    st: &DomainState,
    out: &mut Vec<Detection>,
) {
    let s = st.sum();
    let policy = ctx.policy;
    let secs = policy.dns.window.0.as_secs();
    let distinct = st.names.len() as u64;
    let rate = st.last_minute_queries(ctx.now_idx, ctx.per_minute);
    let limit = policy.dns.tunnel_queries_per_minute;
    // Mostly new names: a busy client repeating a few names is not a tunnel.
    let tunnel = rate > limit && distinct * 2 > s.queries;
    let checks = [
        (
            Rule::DnsExfiltration,
            s.encoded > threshold as f64,
            s.encoded,
            threshold as f64,
            format!("estimated bytes encoded in new query names in {secs}s > {threshold}"),
        ),
        (
            Rule::DnsTunnel,
            tunnel,
            rate as f64,
            limit as f64,
            format!("queries per minute to one domain > {limit}, mostly unique names"),
        ),
    ];
    for (rule, firing, observed, threshold, condition) in checks {
        let Some((phase, episode)) = episodes.step(
            (rule, workload, Some(domain)),
            firing,
            observed,
            ctx.now_ns,
            ctx.every,
        ) else {
            continue;
        };
        let mut top: Vec<Destination> = st
            .servers
            .iter()
            .map(|&(sa, n)| Destination {
                addr: sa.ip(),
                port: sa.port(),
                bytes: n,
            })
            .collect();
        top.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.addr.cmp(&b.addr)));
        top.truncate(5);
        out.push(Detection {
            rule,
            phase,
            episode,
            workload: workload.to_owned(),
            subject: Some(domain.to_owned()),
            observed,
            threshold,
            condition,
            action,
            evidence: Evidence {
                window_start_ns: ctx.now_ns.saturating_sub(ctx.window_ns),
                window_end_ns: ctx.now_ns,
                bytes: s.name_bytes,
                allowlisted_bytes: 0,
                top_destinations: top,
                encoded_bytes: s.encoded.round() as u64,
                dns: Some(domain_evidence(st, &s, domain)),
            },
        });
    }
}

/// Evidence of the spread rule: the carrying domains, biggest first.
fn spread_evidence(wd: &WorkloadDns) -> DnsEvidence {
    let mut domains: Vec<(&String, f64, &DomainState)> = wd
        .carrier
        .iter()
        .flat_map(|c| c.domains.keys())
        .filter_map(|d| {
            wd.domains
                .get(d.as_str())
                .map(|st| (d, st.sum().carrier, st))
        })
        .collect();
    domains.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(b.0)));
    let mut ev = DnsEvidence::default();
    for (d, _, st) in &domains {
        let s = st.sum();
        ev.queries += s.queries;
        ev.distinct_names += st.names.len() as u64;
        ev.max_label_len = ev.max_label_len.max(st.max_label);
        ev.max_name_len = ev.max_name_len.max(st.max_name);
        ev.domains.push((*d).clone());
        for q in st.samples.iter().take(2) {
            if ev.sample_queries.len() < SAMPLES {
                ev.sample_queries.push(q.to_string());
            }
        }
    }
    ev
}

fn spread_detection(
    ctx: &EvalCtx<'_>,
    workload: &str,
    phase: super::Phase,
    episode: u64,
    carrier: f64,
    ev: DnsEvidence,
) -> Detection {
    let limit = ctx.policy.dns.spread_encoded_bytes;
    let secs = ctx.policy.dns.window.0.as_secs();
    Detection {
        rule: Rule::DnsExfiltrationSpread,
        phase,
        episode,
        workload: workload.to_owned(),
        subject: None,
        observed: carrier,
        threshold: limit as f64,
        condition: format!(
            "estimated bytes encoded in long dense names over several domains in {secs}s > {limit}"
        ),
        action: ctx.policy.action,
        evidence: Evidence {
            window_start_ns: ctx.now_ns.saturating_sub(ctx.window_ns),
            window_end_ns: ctx.now_ns,
            bytes: 0,
            allowlisted_bytes: 0,
            top_destinations: Vec::new(),
            encoded_bytes: carrier.round() as u64,
            dns: Some(ev),
        },
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

/// Builds a DNS message in wire format (for generators, tests and fuzz
/// seeds): a query for `name`, or an answer with `rcode`.
pub fn build_message(
    id: u16,
    name: &str,
    qtype: RecordType,
    answer: Option<ResponseCode>,
) -> Result<Vec<u8>, DnsParseError> {
    let n = Name::from_ascii(name).map_err(|e| DnsParseError::Malformed(e.to_string()))?;
    let mut m = match answer {
        None => Message::new(id, MessageType::Query, hickory_proto::op::OpCode::Query),
        Some(rc) => {
            let mut m = Message::new(id, MessageType::Response, hickory_proto::op::OpCode::Query);
            m.metadata.response_code = rc;
            m
        }
    };
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(n, qtype));
    m.to_vec()
        .map_err(|e| DnsParseError::Malformed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::Phase;

    #[test]
    fn one_name_inline_promoted_on_a_second_and_back_on_expiry() {
        let mut n = Names::default();
        assert_eq!(n.len(), 0);
        assert!(n.get_mut(1).is_none());
        n.insert(1, 10);
        assert!(matches!(n, Names::One { .. }), "one name needs no table");
        *n.get_mut(1).unwrap() = 20;
        assert!(n.get_mut(2).is_none());
        // A second distinct name: the table, with both.
        n.insert(2, 30);
        assert!(matches!(n, Names::Many(_)));
        assert_eq!(n.len(), 2);
        assert_eq!(*n.get_mut(1).unwrap(), 20, "first name's time kept");
        assert_eq!(*n.get_mut(2).unwrap(), 30);
        n.insert(3, 40);
        assert_eq!(n.len(), 3);
        // Window expiry: names last seen before 30 go; back to inline.
        n.retain_since(31);
        assert!(
            matches!(
                n,
                Names::One {
                    fingerprint: 3,
                    seen: 40
                }
            ),
            "{n:?}"
        );
        n.retain_since(40);
        assert_eq!(n.len(), 1, "seen at the window's first instant stays");
        n.retain_since(41);
        assert!(matches!(n, Names::Empty));
        // And from the table straight to empty.
        n.insert(1, 1);
        n.insert(2, 1);
        n.retain_since(2);
        assert!(matches!(n, Names::Empty));
    }

    #[test]
    fn buckets_newest_inline_older_queued_and_expired_in_order() {
        let mut b = DnsBuckets::default();
        assert!(b.is_empty());
        assert!(!b.expire(100), "nothing to drop");
        b.at(5).queries += 1;
        b.at(5).queries += 1;
        assert!(b.older.is_none(), "one bucket needs no queue");
        b.at(7).queries += 10;
        b.at(9).answers += 1;
        let idx: Vec<u64> = b.iter().map(|x| x.idx).collect();
        assert_eq!(idx, vec![5, 7, 9], "oldest first");
        let rev: Vec<u64> = b.iter().rev().map(|x| x.idx).collect();
        assert_eq!(rev, vec![9, 7, 5]);
        assert_eq!(b.iter().map(|x| x.queries).sum::<u64>(), 12);
        assert!(!b.expire(5), "bucket 5 is still in the window");
        assert!(b.expire(6));
        assert_eq!(b.iter().map(|x| x.idx).collect::<Vec<_>>(), vec![7, 9]);
        assert!(b.expire(9));
        assert!(b.older.is_none(), "queue dropped once empty");
        assert_eq!(b.iter().map(|x| x.answers).sum::<u64>(), 1);
        assert!(b.expire(10));
        assert!(b.is_empty());
        // Counts start from zero in a bucket made after expiry.
        assert_eq!(b.at(10).queries, 0);
    }

    #[test]
    fn compact_domain_state_counts_like_the_full_one() {
        // One name asked again and again stays compact; a second name
        // promotes it, and the counts and evidence are those of both.
        let p = Policy::default();
        let mut d = DnsDetector::new();
        let srv = Some(SocketAddr::from(([10, 96, 0, 10], 53)));
        for i in 0..3 {
            d.observe_query(&p, "w", "www.example.com", RecordType::A, srv, i * NS)
                .unwrap();
        }
        let st = d.workloads["w"].domains.get("example.com").unwrap();
        assert!(matches!(st.names, Names::One { .. }));
        assert_eq!(
            (st.sum().queries, st.samples.len(), st.servers.len()),
            (3, 1, 1)
        );
        assert!(!st.samples.spilled() && !st.servers.spilled());
        let other = Some(SocketAddr::from(([10, 96, 0, 11], 53)));
        d.observe_query(&p, "w", "api.example.com", RecordType::TXT, other, 3 * NS)
            .unwrap();
        let st = d.workloads["w"].domains.get("example.com").unwrap();
        assert_eq!(st.names.len(), 2);
        let s = st.sum();
        assert_eq!((s.queries, s.unusual), (4, 1));
        let ev = domain_evidence(st, &s, "example.com");
        assert_eq!(ev.distinct_names, 2);
        assert_eq!(
            ev.sample_queries,
            vec!["www.example.com".to_owned(), "api.example.com".to_owned()]
        );
        assert_eq!(st.servers.len(), 2);
        // The window passes: the state is forgotten at evaluation.
        let window = p.dns.window.0.as_nanos() as u64;
        assert!(d.evaluate(&p, 4 * NS).is_empty());
        assert!(d.evaluate(&p, 4 * NS + window + 61 * NS).is_empty());
        assert_eq!(d.stats().keys, 0);
    }

    fn q(name: &str, t: RecordType) -> Vec<u8> {
        build_message(7, name, t, None).unwrap()
    }

    #[test]
    fn parses_udp_and_tcp_payloads() {
        let wire = q("WWW.Example.COM", RecordType::A);
        let m = parse_payload(&wire, false).unwrap();
        assert!(!m.response);
        assert_eq!(
            m.questions,
            vec![("www.example.com".to_owned(), RecordType::A)]
        );
        let mut tcp = (wire.len() as u16).to_be_bytes().to_vec();
        tcp.extend_from_slice(&wire);
        assert_eq!(parse_payload(&tcp, true).unwrap(), m);
        assert!(matches!(
            parse_payload(&tcp[..tcp.len() - 1], true),
            Err(DnsParseError::TcpTruncated { .. })
        ));
        assert!(matches!(
            parse_payload(&[0], true),
            Err(DnsParseError::NoLengthPrefix(1))
        ));
        let nx = build_message(
            7,
            "nope.example.com",
            RecordType::A,
            Some(ResponseCode::NXDomain),
        )
        .unwrap();
        let m = parse_payload(&nx, false).unwrap();
        assert!(m.response && m.nxdomain);
    }

    /// The detector's own name writer presents names exactly as hickory's
    /// `Name::to_ascii` (lower-cased, no trailing dot) did before it.
    #[test]
    fn names_are_written_as_hickory_presents_them() {
        let labels: &[&[u8]] = &[
            b"WWW",
            b"Example",
            b"com",
            b"-lead",
            b"tail-",
            b"*",
            b"a*b",
            b"_dmarc",
            b"sp ace",
            b"dot.ted",
            b"back\\slash",
            b"\x00\x7f\x80\xff",
            b"j\xe4germeister",
            b"x\"y(z)@;",
        ];
        let mut buf = String::new();
        for first in labels {
            for second in labels {
                let name =
                    Name::from_labels([*first, *second, &b"example"[..], &b"com"[..]]).unwrap();
                let mut want = name.to_ascii();
                if want.ends_with('.') {
                    want.pop();
                }
                want.make_ascii_lowercase();
                write_name(&name, &mut buf);
                assert_eq!(buf, want, "{first:?} {second:?}");
            }
        }
    }

    #[test]
    fn hostile_payloads_are_errors() {
        // Every prefix of a valid message.
        let wire = q("a.b.example.com", RecordType::TXT);
        for n in 0..wire.len() {
            assert!(parse_payload(&wire[..n], false).is_err(), "prefix {n}");
        }
        // A compression pointer to itself in the question name.
        let mut lp = wire[..12].to_vec();
        lp.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
        assert!(parse_payload(&lp, false).is_err());
        // A label length of 64 (labels are at most 63).
        let mut big = wire[..12].to_vec();
        big.push(64);
        big.extend_from_slice(&[b'a'; 64]);
        big.extend_from_slice(&[0, 0, 1, 0, 1]);
        assert!(parse_payload(&big, false).is_err());
    }

    /// The payloads a fuzzer looks for, through the whole detector path:
    /// each is an error, nothing is scored, nothing fires, and it returns
    /// promptly (a pointer loop that was followed would hang here).
    #[test]
    fn nasty_payloads_through_the_detector() {
        let header = |id: u8| vec![0, id, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        let with = |id: u8, name: &[u8]| {
            let mut m = header(id);
            m.extend_from_slice(name);
            m.extend_from_slice(&[0, 1, 0, 1]);
            m
        };
        let mut long = Vec::new();
        for _ in 0..5 {
            long.push(63);
            long.extend_from_slice(&[b'a'; 63]);
        }
        long.push(0);
        let mut cases: Vec<(&str, Vec<u8>, bool)> = vec![
            ("pointer to itself", with(1, &[0xc0, 12]), false),
            // "a" -> "b" -> "a": a loop through two labels.
            (
                "pointer pair loop",
                with(2, &[1, b'a', 0xc0, 16, 1, b'b', 0xc0, 12]),
                false,
            ),
            ("pointer past the end", with(3, &[0xc0, 0xff]), false),
            (
                "label of 64 bytes",
                with(5, &[&[64u8][..], &[b'a'; 64], &[0]].concat()),
                false,
            ),
            ("name over 255 bytes", with(6, &long), false),
            ("reserved label type 0x40", with(7, &[0x41, b'a', 0]), false),
            ("no question at all", header(8), false),
            ("TCP prefix only", vec![0], true),
            (
                "TCP prefix promises more",
                [&[0u8, 200][..], &q("a.example.com", RecordType::A)].concat(),
                true,
            ),
        ];
        let good = q("exfil.example.com", RecordType::TXT);
        for n in 0..good.len() {
            cases.push(("truncated UDP", good[..n].to_vec(), false));
            let mut tcp = (good.len() as u16).to_be_bytes().to_vec();
            tcp.extend_from_slice(&good[..n]);
            cases.push(("truncated TCP", tcp, true));
        }
        let p = Policy::default();
        let mut d = DnsDetector::new();
        for (what, payload, tcp) in &cases {
            let r = d.observe_payload(&p, "w", payload, *tcp, None, NS);
            assert!(r.is_err(), "{what}: {payload:02x?} parsed as {r:?}");
        }
        assert_eq!(d.stats().scored, 0);
        assert!(d.evaluate(&p, 2 * NS).is_empty());
    }

    #[test]
    fn classification() {
        fn c(n: &'static str, t: RecordType) -> Result<Split<'static>, Skip> {
            let p = Policy::from_yaml("allowlist: {domains: [backup.example.net]}").unwrap();
            classify(&p, n, t)
        }
        assert_eq!(
            c("a.b.example.co.uk", RecordType::A),
            Ok(Split {
                registered: "example.co.uk",
                subdomain: "a.b"
            })
        );
        assert_eq!(
            c("example.com", RecordType::A),
            Ok(Split {
                registered: "example.com",
                subdomain: ""
            })
        );
        assert_eq!(
            c("api.ns.svc.cluster.local", RecordType::A),
            Err(Skip::Cluster)
        );
        assert_eq!(
            c("www.google.com.default.svc.cluster.local", RecordType::AAAA),
            Err(Skip::Cluster)
        );
        assert_eq!(
            c("4.3.2.1.in-addr.arpa", RecordType::PTR),
            Err(Skip::Reverse)
        );
        assert_eq!(c("_dmarc.example.com", RecordType::TXT), Err(Skip::Service));
        assert_eq!(
            c("s1._domainkey.example.com", RecordType::TXT),
            Err(Skip::Service)
        );
        assert_eq!(
            c("_sip._tcp.example.com", RecordType::SRV),
            Err(Skip::Service)
        );
        assert_eq!(
            c("x.backup.example.net", RecordType::A),
            Err(Skip::Allowlisted)
        );
        assert_eq!(c("com", RecordType::A), Err(Skip::NoRegisteredDomain));
        // Private PSL entries: buckets are their own registered domains.
        assert_eq!(
            c("mybucket.s3.amazonaws.com", RecordType::A).map(|s| s.registered),
            Ok("mybucket.s3.amazonaws.com")
        );
    }

    #[test]
    fn estimate_tracks_encoded_bytes() {
        // 30 random-ish bytes in hex: 60 characters, ~4 bits each.
        let hex = "3f9a0c7be41d5268af03c9e7b12d46f58a0e3c71d9b4f6022e8c5a17b3d9f0";
        let e = encoded_estimate(hex);
        assert!((25.0..=31.0).contains(&e), "{e}");
        assert!(encoded_estimate("www") < 1.0);
        assert_eq!(encoded_estimate(""), 0.0);
    }

    fn hexname(i: u64, domain: &str) -> String {
        // 20 bytes of a deterministic stream as 40 hex characters.
        let mut x = i.wrapping_mul(0x9e3779b97f4a7c15) | 1;
        let mut s = String::new();
        for _ in 0..20 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            s.push_str(&format!("{:02x}", x & 0xff));
        }
        format!("{s}.{domain}")
    }

    #[test]
    fn low_and_slow_caught_within_ten_minutes_once() {
        let p = Policy::default();
        let mut d = DnsDetector::new();
        let mut starts = Vec::new();
        // 20 bytes every 2 s: 10 B/s.
        for i in 0..300 {
            let t = i * 2 * NS;
            d.observe_query(
                &p,
                "w",
                &hexname(i, "leak.example.org"),
                RecordType::A,
                None,
                t,
            )
            .unwrap();
            for det in d.evaluate(&p, t) {
                if det.phase == Phase::Start {
                    starts.push((t, det));
                }
            }
        }
        assert_eq!(starts.len(), 1, "{starts:?}");
        let (t, det) = &starts[0];
        assert!(*t < 600 * NS, "caught at {}s", t / NS);
        assert_eq!(det.rule, Rule::DnsExfiltration);
        assert_eq!(det.subject.as_deref(), Some("example.org"));
        assert!(det.evidence.encoded_bytes > 2400);
        let dns = det.evidence.dns.as_ref().unwrap();
        assert_eq!(dns.sample_queries.len(), 5);
        assert!(dns.mean_entropy > 3.5);
    }

    #[test]
    fn exactly_at_threshold_and_window_expiry() {
        let p = Policy::from_yaml("dns: {encoded_bytes: 100, window: 60s}").unwrap();
        let mut d = DnsDetector::new();
        // "abcdefgh" x 4 distinct labels: 8 chars x 3 bits / 8 = 3 bytes each.
        let mut total = 0.0;
        let mut i = 0;
        while total + 3.0 <= 100.0 {
            let name = format!("abcdefgh{i:0>0}.x.example.com");
            let sub = name.trim_end_matches(".example.com").to_owned();
            total += encoded_estimate(&sub);
            d.observe_query(&p, "w", &name, RecordType::A, None, NS)
                .unwrap();
            i += 1;
            if i > 1000 {
                break;
            }
        }
        assert!(total <= 100.0);
        assert!(
            d.evaluate(&p, NS).is_empty(),
            "at or below threshold fired ({total})"
        );
        d.observe_query(
            &p,
            "w",
            "zzzzqqqqwwwweeee.example.com",
            RecordType::A,
            None,
            2 * NS,
        )
        .unwrap();
        let ds = d.evaluate(&p, 2 * NS);
        assert_eq!(ds.len(), 1);
        assert_eq!(ds[0].phase, Phase::Start);
        // A minute later everything has left the window: the episode ends.
        let ds = d.evaluate(&p, 62 * NS);
        assert_eq!(
            ds.iter().map(|d| d.phase).collect::<Vec<_>>(),
            vec![Phase::End]
        );
    }

    #[test]
    fn namespace_override_raises_the_threshold_and_sets_the_action() {
        let p = Policy::from_yaml(
            "action: lockdown\noverrides: [{namespace: etl, dns_encoded_bytes: 1000000, action: dry-run}]",
        )
        .unwrap();
        let etl = WorkloadMeta {
            namespace: Some("etl".into()),
            ..Default::default()
        };
        let mut d = DnsDetector::new();
        let mut fired = Vec::new();
        for i in 0..300 {
            let t = i * 2 * NS;
            for (w, meta) in [("etl-pod", &etl), ("web-pod", &WorkloadMeta::default())] {
                let wire =
                    build_message(1, &hexname(i, "leak.example.org"), RecordType::A, None).unwrap();
                d.observe_payload_of(&p, w, meta, &wire, false, None, t)
                    .unwrap();
            }
            fired.extend(d.evaluate(&p, t));
        }
        assert!(fired.iter().all(|x| x.workload == "web-pod"), "{fired:?}");
        assert_eq!(fired[0].action, Action::Lockdown);
    }

    #[test]
    fn fast_tunnel_is_a_tunnel() {
        let p = Policy::default();
        let mut d = DnsDetector::new();
        let mut rules = Vec::new();
        for i in 0..2000u64 {
            let t = i * NS / 40; // 2400 queries a minute
            d.observe_query(
                &p,
                "w",
                &hexname(i, "t.tunnel.example"),
                RecordType::NULL,
                None,
                t,
            )
            .unwrap();
            if i % 40 == 0 {
                rules.extend(d.evaluate(&p, t).into_iter().map(|d| (d.rule, d.phase)));
            }
        }
        assert!(
            rules.contains(&(Rule::DnsTunnel, Phase::Start)),
            "{rules:?}"
        );
        assert!(
            rules.contains(&(Rule::DnsExfiltration, Phase::Start)),
            "{rules:?}"
        );
        assert_eq!(rules.iter().filter(|r| r.1 == Phase::Start).count(), 2);
    }

    #[test]
    fn spread_over_sibling_domains() {
        let p = Policy::default();
        let mut d = DnsDetector::new();
        let domains = [
            "cdn-sync1.com",
            "cdn-sync2.net",
            "cdn-sync3.org",
            "cdn-sync4.io",
        ];
        let mut got = None;
        // 10 B/s over four domains: each stays under the per-domain threshold
        // for the whole window.
        for i in 0..300u64 {
            let t = i * 2 * NS;
            let dom = domains[(i % 4) as usize];
            d.observe_query(&p, "w", &hexname(i, dom), RecordType::A, None, t)
                .unwrap();
            for det in d.evaluate(&p, t) {
                assert_ne!(det.rule, Rule::DnsExfiltration, "per-domain fired: {det:?}");
                if det.rule == Rule::DnsExfiltrationSpread && got.is_none() {
                    got = Some((t, det));
                }
            }
        }
        let (t, det) = got.expect("spread not detected");
        assert!(t < 600 * NS);
        assert_eq!(det.evidence.dns.unwrap().domains.len(), 4);
    }

    #[test]
    fn quiet_on_ordinary_traffic() {
        let p = Policy::default();
        let mut d = DnsDetector::new();
        let names = [
            "www.google.com",
            "api.github.com",
            "d1a2b3c4d5e6f7.cloudfront.net",
            "e12345.dsce9.akamaiedge.net",
            "s3.us-west-2.amazonaws.com",
            "api.ns.svc.cluster.local",
            "www.example.com.default.svc.cluster.local",
            "_dmarc.example.com",
            "sel1._domainkey.example.com",
            "10.1.0.10.in-addr.arpa",
            "_https._tcp.example.com",
        ];
        for i in 0..36_000u64 {
            let t = i * NS / 10;
            let n = names[(i % names.len() as u64) as usize];
            let _ = d.observe_query(&p, "w", n, RecordType::A, None, t);
            if i % 10 == 0 {
                assert!(d.evaluate(&p, t).is_empty(), "fired at {n}");
            }
        }
    }
}
