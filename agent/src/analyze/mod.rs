//! Offline analysis: replays a capture through the same detectors as the
//! live agent. The workload is the client address; time is the capture's.
pub mod capture;

use std::net::{IpAddr, SocketAddr};

use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use ipnet::IpNet;
use pcap_file::DataLink;
use serde::Serialize;

use crate::{
    detect::{Detection, NS, dns::DnsDetector, volume::VolumeDetector},
    policy::{Policy, WorkloadMeta},
};
pub use capture::{CaptureError, read_capture};

/// Counts of what the replay saw.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ReplayStats {
    /// Packets read from the capture.
    pub packets: u64,
    /// Packets that did not decode as IPv4/IPv6 (skipped).
    pub undecodable: u64,
    /// DNS messages parsed.
    pub dns_messages: u64,
    /// DNS payloads that did not parse (skipped, counted).
    pub dns_errors: u64,
    /// Capture time of the first and last packet (Unix ns).
    pub first_ns: u64,
    /// See `first_ns`.
    pub last_ns: u64,
}

/// Feeds packets to the detectors.
#[derive(Debug)]
pub struct Replay {
    policy: Policy,
    internal: Vec<IpNet>,
    volume: VolumeDetector,
    dns: DnsDetector,
    detections: Vec<Detection>,
    next_eval_ns: u64,
    stats: ReplayStats,
}

impl Replay {
    /// A replay under `policy`. With `internal` CIDRs, only sources inside
    /// them are workloads and only destinations outside them are egress;
    /// without, every source is a workload and every destination external.
    pub fn new(policy: Policy, internal: Vec<IpNet>) -> Self {
        Self {
            policy,
            internal,
            volume: VolumeDetector::new(),
            dns: DnsDetector::new(),
            detections: Vec::new(),
            next_eval_ns: 0,
            stats: ReplayStats::default(),
        }
    }

    fn is_internal(&self, a: IpAddr) -> bool {
        self.internal.iter().any(|n| n.contains(&a))
    }

    /// One captured frame of link type `link` at `ts_ns` (Unix ns).
    pub fn frame(&mut self, link: DataLink, ts_ns: u64, data: &[u8]) {
        self.stats.packets += 1;
        if self.stats.first_ns == 0 {
            self.stats.first_ns = ts_ns;
        }
        self.stats.last_ns = self.stats.last_ns.max(ts_ns);
        self.tick(ts_ns);
        let sliced = match link {
            DataLink::ETHERNET => SlicedPacket::from_ethernet(data),
            DataLink::LINUX_SLL => SlicedPacket::from_linux_sll(data),
            DataLink::RAW | DataLink::IPV4 | DataLink::IPV6 => SlicedPacket::from_ip(data),
            // BSD loopback: a 4-byte address family, then the IP packet.
            DataLink::NULL | DataLink::LOOP if data.len() >= 4 => SlicedPacket::from_ip(&data[4..]),
            _ => {
                self.stats.undecodable += 1;
                return;
            }
        };
        let Ok(p) = sliced else {
            self.stats.undecodable += 1;
            return;
        };
        let (src, dst, ip_len) = match &p.net {
            Some(NetSlice::Ipv4(v4)) => (
                IpAddr::V4(v4.header().source_addr()),
                IpAddr::V4(v4.header().destination_addr()),
                u64::from(v4.header().total_len()),
            ),
            Some(NetSlice::Ipv6(v6)) => (
                IpAddr::V6(v6.header().source_addr()),
                IpAddr::V6(v6.header().destination_addr()),
                40 + u64::from(v6.header().payload_length()),
            ),
            _ => {
                self.stats.undecodable += 1;
                return;
            }
        };
        let (sport, dport, tcp, payload) = match &p.transport {
            Some(TransportSlice::Udp(u)) => {
                (u.source_port(), u.destination_port(), false, u.payload())
            }
            Some(TransportSlice::Tcp(t)) => {
                (t.source_port(), t.destination_port(), true, t.payload())
            }
            _ => (0, 0, false, &[][..]),
        };
        let proto_port = if p.transport.is_some() { dport } else { 0 };
        if !payload.is_empty() && (dport == 53 || sport == 53) {
            let (client, server) = if dport == 53 {
                (src, SocketAddr::new(dst, dport))
            } else {
                (dst, SocketAddr::new(src, sport))
            };
            let workload = client.to_string();
            match self.dns.observe_payload(
                &self.policy,
                &workload,
                payload,
                tcp,
                Some(server),
                ts_ns,
            ) {
                Ok(_) => self.stats.dns_messages += 1,
                Err(_) => self.stats.dns_errors += 1,
            }
        }
        let workload_side = self.internal.is_empty() || self.is_internal(src);
        if workload_side {
            let external = self.internal.is_empty() || !self.is_internal(dst);
            self.volume.observe(
                &self.policy,
                &src.to_string(),
                &WorkloadMeta::default(),
                dst,
                proto_port,
                ip_len,
                external,
                ts_ns,
            );
        }
    }

    /// Evaluates the detectors once per second of capture time, as the agent
    /// does once per poll.
    fn tick(&mut self, ts_ns: u64) {
        // A capture's timestamps are whatever its file says, up to the end of
        // u64 nanoseconds: the next second saturates instead of overflowing.
        let next = (ts_ns - ts_ns % NS).saturating_add(NS);
        if self.next_eval_ns == 0 {
            self.next_eval_ns = next;
            return;
        }
        if ts_ns >= self.next_eval_ns {
            self.evaluate(self.next_eval_ns.max(ts_ns - ts_ns % NS));
            self.next_eval_ns = next;
        }
    }

    fn evaluate(&mut self, now_ns: u64) {
        let v = self.volume.evaluate(&self.policy, now_ns);
        let d = self.dns.evaluate(&self.policy, now_ns);
        self.detections.extend(v);
        self.detections.extend(d);
    }

    /// Evaluates at the end of the capture and returns everything found.
    pub fn finish(mut self) -> (Vec<Detection>, ReplayStats) {
        if self.stats.packets > 0 {
            self.evaluate(self.stats.last_ns);
        }
        (self.detections, self.stats)
    }
}

/// The result of analysing a capture.
#[derive(Debug, Serialize)]
pub struct Report {
    /// What was read.
    pub stats: ReplayStats,
    /// Detections, in the order they happened.
    pub detections: Vec<Detection>,
    /// Why reading stopped early, if it did.
    pub error: Option<String>,
}

/// Reads a whole capture (pcap or pcapng) and replays it. On a corrupt or
/// truncated capture the report holds the detections up to the bad record
/// and the error names its offset.
pub fn analyze_bytes(bytes: &[u8], policy: Policy, internal: Vec<IpNet>) -> Report {
    let mut replay = Replay::new(policy, internal);
    let res = read_capture(bytes, |link, ts, data| replay.frame(link, ts, data));
    let (detections, stats) = replay.finish();
    Report {
        stats,
        detections,
        error: res.err().map(|e| e.to_string()),
    }
}
