//! Deterministic corpus generator: benign DNS traffic of realistic names (and
//! the hard cases) and exfiltration sets, written as pcap / pcapng. Fixed seeds,
//! no downloads: the same bytes on every machine.
#![allow(dead_code, reason = "each test binary uses part of the generator")]
use std::{borrow::Cow, net::IpAddr, time::Duration};

use etherparse::PacketBuilder;
use exfilguard_agent::detect::dns::build_message;
use hickory_proto::{op::ResponseCode, rr::RecordType};
use pcap_file::{
    DataLink,
    pcap::{PcapHeader, PcapPacket, PcapWriter},
    pcapng::{
        PcapNgWriter,
        blocks::{
            enhanced_packet::EnhancedPacketBlock, interface_description::InterfaceDescriptionBlock,
        },
    },
};

/// splitmix64: small, fast, and the same everywhere.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    pub fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }
    /// Zipf-like: small indexes much more often.
    pub fn skewed(&mut self, n: usize) -> usize {
        let u = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        ((n as f64).powf(u) - 1.0) as usize % n
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// RFC 4648 base32, lower case, no padding (what DNS tunnels use).
pub fn base32(data: &[u8]) -> String {
    const A: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut out = String::new();
    let (mut buf, mut bits) = (0u32, 0);
    for &b in data {
        buf = (buf << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            out.push(A[((buf >> (bits - 5)) & 31) as usize] as char);
            bits -= 5;
        }
    }
    if bits > 0 {
        out.push(A[((buf << (5 - bits)) & 31) as usize] as char);
    }
    out
}

/// Splits into DNS labels of at most `max` characters.
pub fn labels(s: &str, max: usize) -> String {
    s.as_bytes()
        .chunks(max)
        .map(|c| std::str::from_utf8(c).expect("ascii"))
        .collect::<Vec<_>>()
        .join(".")
}

const WORDS: &[&str] = &[
    "acme", "alpha", "apex", "arc", "atlas", "aurora", "axis", "beacon", "bell", "birch", "blue",
    "bolt", "bright", "bridge", "brook", "cable", "camp", "canyon", "cedar", "central", "chart",
    "city", "clear", "cloud", "coast", "code", "comet", "core", "craft", "crest", "crown", "data",
    "delta", "desk", "digital", "direct", "dock", "drive", "eagle", "earth", "east", "echo",
    "edge", "elm", "ember", "energy", "field", "first", "fleet", "flow", "forge", "fox", "frame",
    "fresh", "front", "fusion", "garden", "gate", "global", "gold", "green", "grid", "group",
    "harbor", "hawk", "health", "high", "hill", "home", "hub", "idea", "insight", "iron", "island",
    "jet", "key", "king", "lab", "lake", "land", "leaf", "light", "line", "link", "logic", "lunar",
    "maple", "market", "matrix", "media", "metro", "mind", "mint", "mobile", "moon", "motion",
    "mountain", "net", "next", "north", "nova", "oak", "ocean", "omega", "open", "orbit", "pace",
    "park", "path", "peak", "pilot", "pine", "pixel", "planet", "point", "polar", "port", "prime",
    "pulse", "quest", "radar", "rain", "rapid", "red", "ridge", "river", "rock", "root", "route",
    "safe", "sage", "scout", "sea", "secure", "shift", "shop", "signal", "silver", "sky", "smart",
    "snow", "solar", "sound", "south", "spark", "sphere", "spring", "square", "star", "stone",
    "storm", "stream", "summit", "sun", "swift", "system", "tech", "terra", "tide", "titan",
    "trade", "trail", "travel", "tree", "true", "union", "unity", "urban", "valley", "vector",
    "venture", "view", "vista", "wave", "west", "wild", "wind", "wise", "wolf", "works", "yard",
    "zen", "zone", "bank", "care", "food", "law", "news", "play", "sport",
];
const TLDS: &[&str] = &[
    "com", "com", "com", "com", "net", "org", "io", "co", "de", "fr", "co.uk", "com.au", "co.jp",
    "ca", "nl", "se", "ch", "it", "es", "com.br", "in", "info", "dev", "app",
];
const HOSTS: &[&str] = &[
    "www",
    "www",
    "www",
    "api",
    "cdn",
    "static",
    "img",
    "mail",
    "m",
    "app",
    "login",
    "auth",
    "assets",
    "media",
    "edge",
    "gateway",
    "ws",
    "docs",
    "blog",
    "shop",
    "status",
    "images",
    "accounts",
    "portal",
    "support",
    "help",
    "news",
    "video",
    "search",
    "analytics",
    "ads",
    "metrics",
    "update",
    "download",
    "files",
    "secure",
    "my",
    "id",
    "pay",
    "checkout",
];
const REGIONS: &[&str] = &[
    "us-east-1",
    "us-west-2",
    "eu-west-1",
    "eu-central-1",
    "ap-southeast-1",
    "ap-northeast-1",
];

/// A registered domain made of real-looking words.
pub fn domain(rng: &mut Rng) -> String {
    let a = rng.pick(WORDS);
    let b = rng.pick(WORDS);
    let tld = rng.pick(TLDS);
    match rng.below(4) {
        0 => format!("{a}{b}.{tld}"),
        1 => format!("{a}-{b}.{tld}"),
        2 => format!("{a}.{tld}"),
        _ => format!(
            "{a}{b}{}.{tld}",
            rng.pick(&["hq", "labs", "app", "online", "group"])
        ),
    }
}

/// One DNS query or answer on the wire.
#[derive(Clone, Debug)]
pub struct Msg {
    pub ts: Duration,
    pub client: IpAddr,
    pub server: IpAddr,
    pub client_port: u16,
    pub tcp: bool,
    pub answer: bool,
    pub payload: Vec<u8>,
}

/// A query and, unless `rcode` is None, its answer 2 ms later.
#[expect(clippy::too_many_arguments, reason = "one DNS exchange, spelled out")]
pub fn exchange(
    out: &mut Vec<Msg>,
    ts: Duration,
    client: IpAddr,
    server: IpAddr,
    id: u16,
    name: &str,
    qtype: RecordType,
    rcode: Option<ResponseCode>,
    tcp: bool,
) {
    let port = 30000 + (id % 30000);
    let q = build_message(id, name, qtype, None).unwrap_or_else(|e| panic!("{name}: {e}"));
    out.push(Msg {
        ts,
        client,
        server,
        client_port: port,
        tcp,
        answer: false,
        payload: q,
    });
    if let Some(rc) = rcode {
        let a = build_message(id, name, qtype, Some(rc)).expect("answer");
        out.push(Msg {
            ts: ts + Duration::from_millis(2),
            client,
            server,
            client_port: port,
            tcp,
            answer: true,
            payload: a,
        });
    }
}

/// Hash-like labels of CDN and cloud hostnames.
fn hashy(rng: &mut Rng, n: usize, alphabet: &[u8]) -> String {
    (0..n).map(|_| *rng.pick(alphabet) as char).collect()
}

const B32: &[u8] = b"abcdefghijklmnopqrstuvwxyz234567";
const HEX: &[u8] = b"0123456789abcdef";
const ALNUM: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";

/// Per workload: the names it uses, with weights by position.
fn workload_names(rng: &mut Rng, domains: &[String], w: usize) -> Vec<(String, RecordType, bool)> {
    // (name, type, nxdomain)
    let mut v = Vec::new();
    let n_domains = 900 + rng.below(600);
    for i in 0..n_domains {
        // Half popular (shared by every workload), half the long tail.
        let d = if i % 2 == 0 {
            &domains[rng.skewed(domains.len())]
        } else {
            &domains[rng.below(domains.len())]
        };
        for _ in 0..1 + rng.below(3) {
            let h = rng.pick(HOSTS);
            let t = if rng.below(4) == 0 {
                RecordType::AAAA
            } else {
                RecordType::A
            };
            v.push((format!("{h}.{d}"), t, false));
        }
        if rng.below(10) == 0 {
            v.push((d.clone(), RecordType::MX, false));
            v.push((d.clone(), RecordType::TXT, false)); // SPF
        }
        if rng.below(15) == 0 {
            v.push((format!("_dmarc.{d}"), RecordType::TXT, false));
            v.push((
                format!("selector{}._domainkey.{d}", 1 + rng.below(2)),
                RecordType::TXT,
                false,
            ));
        }
        if rng.below(20) == 0 {
            v.push((format!("_sip._tcp.{d}"), RecordType::SRV, false));
            v.push((format!("_xmpp-client._tcp.{d}"), RecordType::SRV, false));
        }
        if rng.below(6) == 0 {
            v.push((
                format!("{}.{}.{d}", rng.pick(HOSTS), rng.pick(REGIONS)),
                RecordType::A,
                false,
            ));
        }
    }
    // Kubernetes: services, and search-path expansions of external names
    // (ndots:5) that come back NXDOMAIN.
    for s in 0..30 {
        let ns = [
            "default",
            "payments",
            "web",
            "data",
            "monitoring",
            "kube-system",
        ][s % 6];
        let svc = format!(
            "{}-{}",
            rng.pick(WORDS),
            rng.pick(&["api", "db", "cache", "worker", "svc"])
        );
        v.push((
            format!("{svc}.{ns}.svc.cluster.local"),
            RecordType::A,
            false,
        ));
        v.push((
            format!("{svc}.{ns}.svc.cluster.local"),
            RecordType::AAAA,
            false,
        ));
    }
    let extern_names: Vec<String> = v.iter().take(60).map(|x| x.0.clone()).collect();
    for n in &extern_names {
        for suffix in [
            "default.svc.cluster.local",
            "svc.cluster.local",
            "cluster.local",
        ] {
            v.push((format!("{n}.{suffix}"), RecordType::A, true));
        }
        v.push((format!("{n}.ec2.internal"), RecordType::A, true));
    }
    // CDN and cloud hostnames with hash-like labels, a stable set per
    // workload (an app talks to the same few distributions).
    for _ in 0..12 {
        v.push((
            format!("{}.cloudfront.net", hashy(rng, 14, B32)),
            RecordType::A,
            false,
        ));
        v.push((
            format!("e{}.dscb.akamaiedge.net", 1000 + rng.below(90000)),
            RecordType::A,
            false,
        ));
        v.push((
            format!(
                "{}.execute-api.{}.amazonaws.com",
                hashy(rng, 10, ALNUM),
                rng.pick(REGIONS)
            ),
            RecordType::A,
            false,
        ));
        v.push((
            format!(
                "{}-{}.{}.elb.amazonaws.com",
                rng.pick(WORDS),
                hashy(rng, 10, HEX),
                rng.pick(REGIONS)
            ),
            RecordType::A,
            false,
        ));
        v.push((
            format!("{}.blob.core.windows.net", hashy(rng, 16, ALNUM)),
            RecordType::A,
            false,
        ));
        v.push((
            format!("{}.azureedge.net", hashy(rng, 20, ALNUM)),
            RecordType::A,
            false,
        ));
        v.push((
            format!(
                "r{}---sn-{}.googlevideo.com",
                rng.below(9),
                hashy(rng, 8, ALNUM)
            ),
            RecordType::A,
            false,
        ));
        v.push((
            format!("{}.s3.{}.amazonaws.com", rng.pick(WORDS), rng.pick(REGIONS)),
            RecordType::A,
            false,
        ));
    }
    // Reverse lookups of peers.
    for _ in 0..40 {
        v.push((
            format!(
                "{}.{}.{}.10.in-addr.arpa",
                rng.below(256),
                rng.below(256),
                w % 256
            ),
            RecordType::PTR,
            false,
        ));
    }
    let nib: String = (0..32).map(|_| format!("{:x}.", rng.below(16))).collect();
    v.push((format!("{nib}ip6.arpa"), RecordType::PTR, false));
    v
}

/// The benign set: `queries` queries from `workloads` clients over
/// `duration`, each answered (NXDOMAIN where a real resolver says so).
pub fn benign(seed: u64, workloads: usize, queries: usize, duration: Duration) -> Vec<Msg> {
    let mut rng = Rng::new(seed);
    let mut domains: Vec<String> = (0..14_000).map(|_| domain(&mut rng)).collect();
    domains.sort();
    domains.dedup();
    // Shuffle so popularity is not alphabetical.
    for i in (1..domains.len()).rev() {
        let j = rng.below(i + 1);
        domains.swap(i, j);
    }
    let names: Vec<_> = (0..workloads)
        .map(|w| workload_names(&mut rng, &domains, w))
        .collect();
    let server: IpAddr = "10.96.0.10".parse().expect("addr");
    let mut out = Vec::with_capacity(queries * 2);
    let step = duration.as_nanos() as u64 / queries as u64;
    for i in 0..queries {
        let w = rng.below(workloads);
        let client: IpAddr = format!("10.244.{}.{}", w / 200, 10 + w % 200)
            .parse()
            .expect("addr");
        let list = &names[w];
        // Most queries go to the first names (popular), all get some.
        let k = if rng.below(3) == 0 {
            rng.below(list.len())
        } else {
            rng.skewed(list.len())
        };
        let (name, t, nx) = &list[k];
        let rc = if *nx {
            ResponseCode::NXDomain
        } else {
            ResponseCode::NoError
        };
        let ts = Duration::from_nanos(1_700_000_000_000_000_000 + i as u64 * step);
        exchange(
            &mut out,
            ts,
            client,
            server,
            i as u16,
            name,
            *t,
            Some(rc),
            false,
        );
    }
    out
}

/// Data as base32 chunks under `domains` (round robin), `bytes_per_query`
/// raw bytes per query, one query every `interval`. A sequence label first,
/// as real tools do.
#[expect(
    clippy::too_many_arguments,
    reason = "every knob of a leak, spelled out"
)]
pub fn leak(
    seed: u64,
    client: IpAddr,
    server: IpAddr,
    domains: &[&str],
    total: usize,
    bytes_per_query: usize,
    interval: Duration,
    qtype: RecordType,
    tcp: bool,
    start: Duration,
) -> Vec<Msg> {
    let mut rng = Rng::new(seed);
    let data = rng.bytes(total);
    let mut out = Vec::new();
    for (i, chunk) in data.chunks(bytes_per_query).enumerate() {
        let d = domains[i % domains.len()];
        let name = format!("{i:x}.{}.{d}", labels(&base32(chunk), 60));
        let ts = start + interval * i as u32;
        exchange(
            &mut out,
            ts,
            client,
            server,
            i as u16,
            &name,
            qtype,
            Some(ResponseCode::NoError),
            tcp,
        );
    }
    out
}

/// Frames one message as an IPv4/IPv6 UDP or TCP packet (no link header).
pub fn ip_packet(m: &Msg) -> Vec<u8> {
    let (src, dst, sport, dport) = if m.answer {
        (m.server, m.client, 53, m.client_port)
    } else {
        (m.client, m.server, m.client_port, 53)
    };
    let mut payload = Cow::Borrowed(&m.payload[..]);
    if m.tcp {
        let mut p = (m.payload.len() as u16).to_be_bytes().to_vec();
        p.extend_from_slice(&m.payload);
        payload = Cow::Owned(p);
    }
    let b = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => PacketBuilder::ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => PacketBuilder::ipv6(s.octets(), d.octets(), 64),
        _ => panic!("mixed address families"),
    };
    let mut v = Vec::new();
    if m.tcp {
        b.tcp(sport, dport, 1, 65535)
            .psh()
            .ack(1)
            .write(&mut v, &payload)
            .expect("tcp");
    } else {
        b.udp(sport, dport).write(&mut v, &payload).expect("udp");
    }
    v
}

/// Ethernet framing (for the captures that have it).
pub fn ethernet(ip: &[u8]) -> Vec<u8> {
    let mut v = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1];
    v.extend_from_slice(if ip[0] >> 4 == 6 {
        &[0x86, 0xdd]
    } else {
        &[0x08, 0x00]
    });
    v.extend_from_slice(ip);
    v
}

/// A classic pcap (`RAW` or `ETHERNET`).
pub fn write_pcap(msgs: &[Msg], link: DataLink) -> Vec<u8> {
    let header = PcapHeader {
        datalink: link,
        ..Default::default()
    };
    let mut w = PcapWriter::with_header(Vec::new(), header).expect("header");
    for m in msgs {
        let ip = ip_packet(m);
        let data = if link == DataLink::ETHERNET {
            ethernet(&ip)
        } else {
            ip
        };
        w.write_packet(&PcapPacket::new(m.ts, data.len() as u32, &data))
            .expect("packet");
    }
    w.into_writer()
}

/// A pcapng with one Ethernet interface (microsecond stamps, the default).
pub fn write_pcapng(msgs: &[Msg]) -> Vec<u8> {
    let mut w = PcapNgWriter::new(Vec::new()).expect("shb");
    w.write_pcapng_block(InterfaceDescriptionBlock {
        linktype: DataLink::ETHERNET,
        snaplen: 0,
        options: vec![],
    })
    .expect("idb");
    for m in msgs {
        let data = ethernet(&ip_packet(m));
        // In microseconds: the file's default resolution.
        let micros = m.ts.as_micros() as u64;
        w.write_pcapng_block(EnhancedPacketBlock {
            interface_id: 0,
            timestamp: Duration::from_nanos(micros),
            original_len: data.len() as u32,
            data: Cow::Owned(data),
            options: vec![],
        })
        .expect("epb");
    }
    w.into_inner()
}

/// Merges message lists by time.
pub fn merge(mut a: Vec<Msg>, b: Vec<Msg>) -> Vec<Msg> {
    a.extend(b);
    a.sort_by_key(|m| m.ts);
    a
}
