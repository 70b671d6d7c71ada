//! Kernel tests of the node data plane: the real programs, attached by the
//! agent's loader to cgroups the tests create, with real traffic across veth
//! pairs between network namespaces the tests create. Run as root, one at a
//! time (`--test-threads=1`); each test cleans up after itself on drop.
use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use exfilguard_agent::{
    cidr::IpNet,
    datapath::{
        self, Datapath, DatapathConfig, DatapathError, DnsDirection, DnsRecord, Event,
        FlowCounters, FlowId,
    },
};
use exfilguard_common::proto;
use exfilguard_tests::{
    BpfFs, Lab, TestCgroup,
    dns::{self, DnsServer, Transport},
    kernel_test_guard,
    probe::EgressCounter,
    process::python3,
    traffic::{self, Family, TcpSink, TcpTimestamps, UdpSink},
};
use rstest::rstest;

const TOOLS: &[&str] = &["ip", "python3"];

/// Loads the agent's programs onto `cg`, pinned under `pin` if given.
fn attach(cg: &TestCgroup, pin: Option<&BpfFs>) -> Datapath {
    Datapath::load(&DatapathConfig {
        cgroup_path: cg.path().to_owned(),
        pin_dir: pin.map(|b| b.path().join("exfilguard")),
    })
    .unwrap_or_else(|e| panic!("load datapath on {}: {e}", cg.path().display()))
}

fn flow(dp: &Datapath, cg: &TestCgroup, remote: IpAddr, port: u16, proto: u8) -> FlowCounters {
    let id = FlowId {
        cgroup_id: cg.id(),
        remote,
        port,
        proto,
    };
    dp.flow(&id)
        .unwrap_or_else(|e| panic!("read flow {id:?}: {e}"))
        .unwrap_or_else(|| panic!("no flow {id:?}; flows: {:#?}", dp.flows()))
}

/// Every flow of one cgroup.
fn flows_of(dp: &Datapath, cgroup_id: u64) -> Vec<(FlowId, FlowCounters)> {
    dp.flows()
        .unwrap_or_else(|e| panic!("read flows: {e}"))
        .into_iter()
        .filter(|(id, _)| id.cgroup_id == cgroup_id)
        .collect()
}

/// Drains the ring until `want` DNS records arrived or 3 s passed.
fn dns_records(dp: &mut Datapath, want: usize) -> Vec<DnsRecord> {
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut out = Vec::new();
    while out.len() < want && Instant::now() < deadline {
        for ev in dp.drain_events(1024) {
            match ev.unwrap_or_else(|e| panic!("malformed kernel event: {e}")) {
                Event::Dns(r) => out.push(r),
                Event::Cap(_) => {}
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    out
}

#[rstest]
#[case::ipv4(Family::V4)]
#[case::ipv6(Family::V6)]
fn udp_egress_bytes_equal_what_was_sent(#[case] family: Family) {
    if !kernel_test_guard(TOOLS) {
        return;
    }
    let lab = Lab::new();
    let cg = TestCgroup::new();
    let dp = attach(&cg, None);
    let reference = EgressCounter::attach(&cg);
    let dst = SocketAddr::new(lab.peer_addr(family), 9000);
    let sink = UdpSink::start(lab.peer(), dst);

    let sent = traffic::send_udp(lab.client(), &cg, dst, 3, 200);
    assert_eq!(sink.collect(3, Duration::from_secs(5)).units, 3);

    let want = traffic::expected_udp_bytes(family, sent.units, 200);
    let got = flow(&dp, &cg, dst.ip(), 9000, proto::UDP);
    assert_eq!((got.bytes, got.packets), (want, 3), "{family:?}");
    assert!(
        got.external,
        "no internal CIDRs configured: everything is external"
    );
    assert!(got.first_seen_ns > 0 && got.last_seen_ns >= got.first_seen_ns);
    // The independent counter saw exactly the same egress from the cgroup.
    let all: u64 = flows_of(&dp, cg.id()).iter().map(|(_, c)| c.bytes).sum();
    assert_eq!(reference.read().bytes, all);
}

#[rstest]
#[case::ipv4(Family::V4)]
#[case::ipv6(Family::V6)]
fn tcp_egress_bytes_equal_what_was_sent(#[case] family: Family) {
    if !kernel_test_guard(TOOLS) {
        return;
    }
    let lab = Lab::new();
    let cg = TestCgroup::new();
    let dp = attach(&cg, None);
    let reference = EgressCounter::attach(&cg);
    let dst = SocketAddr::new(lab.peer_addr(family), 9100);
    let sink = TcpSink::start(lab.peer(), dst);

    let sent = traffic::send_tcp(lab.client(), &cg, dst, 100_000);
    assert_eq!(
        sink.collect(1, Duration::from_secs(10)).payload_bytes,
        100_000
    );

    let got = flow(&dp, &cg, dst.ip(), 9100, proto::TCP);
    // Payload plus one IP + TCP header per skb (GSO super-packets count once),
    // plus the SYN's options: the byte count the kernel must report.
    let want = traffic::expected_tcp_bytes(
        family,
        sent.ip_payload_bytes(),
        got.packets,
        TcpTimestamps::On,
    );
    assert_eq!(got.bytes, want, "{family:?}: {got:?}");
    assert_eq!(reference.read().bytes, got.bytes);
    assert_eq!(reference.read().packets, got.packets);
}

#[test]
fn traffic_outside_the_cgroup_is_not_attributed_to_it() {
    if !kernel_test_guard(TOOLS) {
        return;
    }
    let lab = Lab::new();
    let parent = TestCgroup::new();
    let a = TestCgroup::under(parent.path());
    let b = TestCgroup::under(parent.path());
    let outsider = TestCgroup::new();
    let dp = attach(&parent, None);
    let dst = SocketAddr::new(lab.peer_addr(Family::V4), 9200);
    let _sink = UdpSink::start(lab.peer(), dst);

    traffic::send_udp(lab.client(), &a, dst, 4, 100);
    traffic::send_udp(lab.client(), &b, dst, 6, 100);
    traffic::send_udp(lab.client(), &outsider, dst, 5, 100);

    let per_dgram = traffic::expected_udp_bytes(Family::V4, 1, 100);
    let fa = flow(&dp, &a, dst.ip(), 9200, proto::UDP);
    let fb = flow(&dp, &b, dst.ip(), 9200, proto::UDP);
    assert_eq!((fa.packets, fa.bytes), (4, 4 * per_dgram));
    assert_eq!((fb.packets, fb.bytes), (6, 6 * per_dgram));
    // Outside the attach point: not seen at all, not charged to anyone.
    assert!(flows_of(&dp, outsider.id()).is_empty());
    assert!(flows_of(&dp, parent.id()).is_empty());
    let total: u64 = dp
        .flows()
        .unwrap()
        .iter()
        .filter(|(id, _)| id.port == 9200)
        .map(|(_, c)| c.packets)
        .sum();
    assert_eq!(total, 10);
}

#[rstest]
#[case::ipv4(Family::V4, "198.51.100.7")]
#[case::ipv6(Family::V6, "2001:db8::7")]
fn internal_and_external_follow_the_configured_cidrs(#[case] family: Family, #[case] far: &str) {
    if !kernel_test_guard(TOOLS) {
        return;
    }
    let lab = Lab::new();
    let far: IpAddr = far.parse().unwrap();
    lab.add_peer_addr(far);
    let cg = TestCgroup::new();
    let mut dp = attach(&cg, None);
    let near = lab.peer_addr(family);
    let lab_net: IpNet = match family {
        Family::V4 => format!("{near}/24"),
        Family::V6 => format!("{near}/64"),
    }
    .parse()
    .unwrap();
    dp.set_internal_cidrs(&[lab_net]).unwrap();
    assert_eq!(dp.internal_cidrs().unwrap(), vec![lab_net.trunc()]);

    let _near_sink = UdpSink::start(lab.peer(), SocketAddr::new(near, 9300));
    let _far_sink = UdpSink::start(lab.peer(), SocketAddr::new(far, 9300));
    traffic::send_udp(lab.client(), &cg, SocketAddr::new(near, 9300), 2, 50);
    traffic::send_udp(lab.client(), &cg, SocketAddr::new(far, 9300), 2, 50);
    assert!(!flow(&dp, &cg, near, 9300, proto::UDP).external);
    assert!(flow(&dp, &cg, far, 9300, proto::UDP).external);

    // Policy changes apply to the next packet: the far host becomes internal
    // (an allowlisted destination), the lab subnet external.
    let far_net = IpNet::new(far, family.host_prefix_len()).unwrap();
    dp.set_internal_cidrs(&[far_net]).unwrap();
    traffic::send_udp(lab.client(), &cg, SocketAddr::new(near, 9300), 1, 50);
    traffic::send_udp(lab.client(), &cg, SocketAddr::new(far, 9300), 1, 50);
    assert!(flow(&dp, &cg, near, 9300, proto::UDP).external);
    assert!(!flow(&dp, &cg, far, 9300, proto::UDP).external);
}

/// L4 payloads of port-53 packets in a capture, by direction (to the server
/// = query), in capture order.
fn dns_payloads_from_pcap(path: &Path) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut reader =
        pcap_file::pcap::PcapReader::new(file).unwrap_or_else(|e| panic!("read pcap: {e}"));
    let (mut queries, mut answers) = (Vec::new(), Vec::new());
    while let Some(packet) = reader.next_packet() {
        let packet = packet.unwrap_or_else(|e| panic!("pcap record: {e}"));
        let sliced = etherparse::SlicedPacket::from_ethernet(&packet.data)
            .unwrap_or_else(|e| panic!("decode captured frame: {e}"));
        let (sport, dport, payload) = match sliced.transport {
            Some(etherparse::TransportSlice::Udp(u)) => {
                (u.source_port(), u.destination_port(), u.payload().to_vec())
            }
            Some(etherparse::TransportSlice::Tcp(t)) => {
                (t.source_port(), t.destination_port(), t.payload().to_vec())
            }
            _ => continue,
        };
        if payload.is_empty() {
            continue;
        }
        if dport == 53 {
            queries.push(payload);
        } else if sport == 53 {
            answers.push(payload);
        }
    }
    (queries, answers)
}

#[rstest]
#[case::udp(Transport::Udp)]
#[case::tcp(Transport::Tcp)]
fn dns_queries_and_answers_reach_user_space_byte_identical(#[case] transport: Transport) {
    if !kernel_test_guard(&["ip", "dig", "dnsmasq", "tcpdump"]) {
        return;
    }
    let lab = Lab::new();
    let cg = TestCgroup::new();
    let mut dp = attach(&cg, None);
    let server_ip = lab.peer_addr(Family::V4);
    let _server = DnsServer::start(
        lab.peer(),
        server_ip,
        &[dns::DnsRecord::address(
            "exfil.test",
            "192.0.2.44".parse().unwrap(),
        )],
    );
    let pcap = std::env::temp_dir().join(format!("{}-dns.pcap", cg.name()));
    let pcap_s = pcap.to_string_lossy().into_owned();
    let mut capture = lab.peer().spawn(
        None,
        &[
            "tcpdump",
            "-i",
            lab.peer_if(),
            // Write each packet as it arrives (no ring-block timeout, no buffering).
            "--immediate-mode",
            "-U",
            "-n",
            "-w",
            &pcap_s,
            "port",
            "53",
        ],
    );
    capture.wait_for_line(
        "tcpdump listening",
        |l| l.contains("listening on"),
        Duration::from_secs(10),
    );

    let names = ["a1.exfil.test", "bb22.exfil.test", "ccc333.exfil.test"];
    for name in names {
        let answer = dns::dig_short(lab.client(), Some(&cg), server_ip, name, "A", transport);
        assert_eq!(answer, vec!["192.0.2.44".to_owned()], "{name}");
    }
    std::thread::sleep(Duration::from_millis(200));
    capture.kill();
    let (pcap_queries, pcap_answers) = dns_payloads_from_pcap(&pcap);
    let _ = std::fs::remove_file(&pcap);

    let records = dns_records(&mut dp, pcap_queries.len() + pcap_answers.len());
    let tcp = transport == Transport::Tcp;
    assert!(
        records
            .iter()
            .all(|r| r.tcp == tcp && r.cgroup_id == cg.id() && !r.truncated())
    );
    assert!(
        records
            .iter()
            .all(|r| r.server == SocketAddr::new(server_ip, 53))
    );
    let ours = |dir| -> Vec<Vec<u8>> {
        records
            .iter()
            .filter(|r| r.direction == dir)
            .map(|r| r.payload.clone())
            .collect()
    };
    let (queries, answers) = (ours(DnsDirection::Query), ours(DnsDirection::Answer));
    assert_eq!(
        pcap_queries.len(),
        names.len(),
        "capture saw one query per name"
    );
    // Byte for byte what crossed the wire, in order: TCP payloads keep their
    // two-byte length prefix.
    assert_eq!(queries, pcap_queries, "queries differ from the capture");
    assert_eq!(answers, pcap_answers, "answers differ from the capture");
}

/// A TCP stream that writes 1 KiB every 2 ms for up to `secs`, and a
/// receiver that prints `CLOCK_MONOTONIC` ns of every chunk it receives.
const PY_TRICKLE_SEND: &str = r#"
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
print("connected", flush=True)
end = time.monotonic() + float(sys.argv[3])
while time.monotonic() < end:
    try:
        s.send(b"x" * 1024)
    except OSError:
        break
    time.sleep(0.002)
"#;
const PY_TRICKLE_RECV: &str = r#"
import socket, sys, time
l = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET)
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind((sys.argv[1], int(sys.argv[2]))); l.listen(4)
print("listening", flush=True)
c, _ = l.accept()
c.settimeout(float(sys.argv[3]))
while True:
    try:
        d = c.recv(65536)
    except socket.timeout:
        break
    if not d:
        break
    print(time.monotonic_ns(), len(d), flush=True)
"#;

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[test]
fn block_stops_established_tcp_within_100ms_and_spares_other_cgroups() {
    if !kernel_test_guard(TOOLS) {
        return;
    }
    let lab = Lab::new();
    let parent = TestCgroup::new();
    let victim = TestCgroup::under(parent.path());
    let bystander = TestCgroup::under(parent.path());
    let mut dp = attach(&parent, None);
    let peer = lab.peer_addr(Family::V4);
    let peer_s = peer.to_string();

    let receiver = lab.peer().spawn(
        None,
        &[python3(), "-c", PY_TRICKLE_RECV, &peer_s, "9400", "3"],
    );
    receiver.wait_for_line(
        "receiver listening",
        |l| l == "listening",
        Duration::from_secs(10),
    );
    let sender = lab.client().spawn(
        Some(&victim),
        &[python3(), "-c", PY_TRICKLE_SEND, &peer_s, "9400", "8"],
    );
    sender.wait_for_line(
        "sender connected",
        |l| l == "connected",
        Duration::from_secs(10),
    );
    // Flowing: a few chunks arrive.
    for _ in 0..5 {
        receiver
            .next_line(Duration::from_secs(5))
            .expect("chunks flow before the block");
    }

    let blocked_at = monotonic_ns();
    dp.block_cgroup(victim.id()).unwrap();
    assert_eq!(dp.blocked_cgroups().unwrap(), vec![victim.id()]);

    // Read what arrives until the receiver gives up (3 s without data).
    let mut last = 0u64;
    while let Some(line) = receiver.next_line(Duration::from_secs(6)) {
        if let Some(t) = line
            .split_whitespace()
            .next()
            .and_then(|t| t.parse::<u64>().ok())
        {
            last = last.max(t);
        }
    }
    let after_ms = last.saturating_sub(blocked_at) as f64 / 1e6;
    assert!(
        last < blocked_at + 100_000_000,
        "data still arrived {after_ms:.1} ms after the block"
    );
    assert!(dp.stats().unwrap().blocked_packets > 0);

    // The victim cannot send UDP either (EPERM at once), the bystander can.
    let dst = SocketAddr::new(peer, 9401);
    let sink = UdpSink::start(lab.peer(), dst);
    let err = traffic::try_send_udp(lab.client(), &victim, dst, 1, 10).expect_err("blocked");
    assert_eq!(err.errno(), Some(libc::EPERM), "{err:?}");
    traffic::send_udp(lab.client(), &bystander, dst, 2, 10);
    assert_eq!(sink.collect(2, Duration::from_secs(5)).units, 2);

    // Unblock: the victim's new traffic flows again.
    assert!(dp.unblock_cgroup(victim.id()).unwrap());
    assert!(
        !dp.unblock_cgroup(victim.id()).unwrap(),
        "second unblock is a no-op"
    );
    traffic::send_udp(lab.client(), &victim, dst, 1, 10);
    let tcp_dst = SocketAddr::new(peer, 9402);
    let _tcp_sink = TcpSink::start(lab.peer(), tcp_dst);
    traffic::send_tcp(lab.client(), &victim, tcp_dst, 10_000);
}

#[test]
fn cidr_blocks_apply_per_cgroup_and_globally() {
    if !kernel_test_guard(TOOLS) {
        return;
    }
    let lab = Lab::new();
    let far: IpAddr = "198.51.100.9".parse().unwrap();
    lab.add_peer_addr(far);
    let parent = TestCgroup::new();
    let a = TestCgroup::under(parent.path());
    let b = TestCgroup::under(parent.path());
    let mut dp = attach(&parent, None);
    let near = SocketAddr::new(lab.peer_addr(Family::V4), 9500);
    let far = SocketAddr::new(far, 9500);
    let _s1 = UdpSink::start(lab.peer(), near);
    let _s2 = UdpSink::start(lab.peer(), far);
    let eperm = |cg: &TestCgroup, dst| {
        traffic::try_send_udp(lab.client(), cg, dst, 1, 10)
            .err()
            .and_then(|e| e.errno())
            == Some(libc::EPERM)
    };

    // Per cgroup: a may not reach 198.51.100.0/24, b may.
    let net: IpNet = "198.51.100.0/24".parse().unwrap();
    dp.block_cidr(Some(a.id()), net).unwrap();
    assert!(eperm(&a, far));
    assert!(!eperm(&a, near));
    assert!(!eperm(&b, far));
    // Global: nobody reaches it.
    dp.block_cidr(None, net).unwrap();
    assert!(eperm(&b, far));
    assert!(dp.unblock_cidr(None, net).unwrap());
    assert!(dp.unblock_cidr(Some(a.id()), net).unwrap());
    assert!(!eperm(&a, far));
    assert!(!eperm(&b, far));
}

#[test]
fn hard_cap_lets_through_at_most_the_budget_then_drops_and_reports() {
    if !kernel_test_guard(TOOLS) {
        return;
    }
    let lab = Lab::new();
    let cg = TestCgroup::new();
    let mut dp = attach(&cg, None);
    let dst = SocketAddr::new(lab.peer_addr(Family::V4), 9600);
    let sink = UdpSink::start(lab.peer(), dst);
    let per_dgram = traffic::expected_udp_bytes(Family::V4, 1, 500);
    let budget = 10_000;
    dp.set_cap(cg.id(), budget, Duration::from_secs(600))
        .unwrap();

    // One datagram at a time, as many as the cap allows, then EPERM.
    let mut sent = 0;
    for _ in 0..40 {
        match traffic::try_send_udp(lab.client(), &cg, dst, 1, 500) {
            Ok(_) => sent += 1,
            Err(e) => {
                assert_eq!(e.errno(), Some(libc::EPERM), "{e:?}");
                break;
            }
        }
    }
    let fits = budget / per_dgram;
    assert_eq!(
        sent, fits,
        "a single sender gets exactly the whole datagrams that fit"
    );
    assert_eq!(sink.collect(fits, Duration::from_secs(5)).units, fits);

    // Several senders on every CPU at once: at most one packet per CPU past the budget.
    dp.set_cap(cg.id(), budget, Duration::from_secs(600))
        .unwrap();
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get()) as u64;
    std::thread::scope(|s| {
        for _ in 0..cpus * 2 {
            s.spawn(|| {
                let _ = traffic::try_send_udp(lab.client(), &cg, dst, 30, 500);
            });
        }
    });
    let status = dp.cap_status(cg.id()).unwrap().expect("cap set");
    assert!(
        status.spent_bytes <= budget + cpus * per_dgram,
        "{status:?}: overshoot beyond one packet per CPU"
    );
    assert!(
        status.spent_bytes + per_dgram > budget,
        "{status:?}: budget not used up"
    );
    assert!(status.dropped_packets > 0);
    assert!(dp.stats().unwrap().cap_dropped_packets > 0);

    let notices: Vec<_> = dp
        .drain_events(1024)
        .into_iter()
        .filter_map(|e| match e.unwrap() {
            Event::Cap(c) => Some(c),
            Event::Dns(_) => None,
        })
        .collect();
    assert!(!notices.is_empty(), "the kernel reports a spent cap");
    assert!(
        notices
            .iter()
            .all(|n| n.cgroup_id == cg.id() && n.budget_bytes == budget)
    );

    // Cleared: traffic flows again.
    assert!(dp.clear_cap(cg.id()).unwrap());
    assert_eq!(dp.cap_status(cg.id()).unwrap(), None);
    traffic::send_udp(lab.client(), &cg, dst, 3, 500);
}

#[test]
fn default_cap_holds_every_cgroup_from_its_first_packet() {
    if !kernel_test_guard(TOOLS) {
        return;
    }
    let lab = Lab::new();
    let parent = TestCgroup::new();
    let mut dp = attach(&parent, None);
    let dst = SocketAddr::new(lab.peer_addr(Family::V4), 9650);
    let sink = UdpSink::start(lab.peer(), dst);
    let per_dgram = traffic::expected_udp_bytes(Family::V4, 1, 500);
    let budget = 5_000;
    let fits = budget / per_dgram;
    dp.set_default_cap(budget, Duration::from_secs(600))
        .unwrap();
    // Made after the cap was set, never named to the datapath: capped anyway,
    // each with a budget of its own.
    let send_until_refused = |cg: &TestCgroup| {
        let mut sent = 0;
        for _ in 0..40 {
            match traffic::try_send_udp(lab.client(), cg, dst, 1, 500) {
                Ok(_) => sent += 1,
                Err(e) => {
                    assert_eq!(e.errno(), Some(libc::EPERM), "{e:?}");
                    break;
                }
            }
        }
        sent
    };
    let fresh = TestCgroup::under(parent.path());
    let other = TestCgroup::under(parent.path());
    assert_eq!(
        send_until_refused(&fresh),
        fits,
        "the default cap holds a new cgroup"
    );
    assert_eq!(
        send_until_refused(&other),
        fits,
        "each cgroup spends its own budget"
    );
    assert_eq!(
        sink.collect(2 * fits, Duration::from_secs(5)).units,
        2 * fits
    );
    let status = dp
        .cap_status(fresh.id())
        .unwrap()
        .expect("the default applies");
    assert_eq!(status.budget_bytes, budget);
    assert_eq!(status.spent_bytes, fits * per_dgram);

    // A cap of its own wins over the default (here a larger one).
    dp.set_cap(other.id(), 10 * budget, Duration::from_secs(600))
        .unwrap();
    traffic::send_udp(lab.client(), &other, dst, fits + 2, 500);
    // Without a default, new cgroups are uncapped again.
    assert!(dp.clear_default_cap().unwrap());
    assert_eq!(dp.cap_status(fresh.id()).unwrap(), None);
    traffic::send_udp(lab.client(), &fresh, dst, fits + 2, 500);
    assert!(!dp.clear_default_cap().unwrap(), "second clear is a no-op");
}

#[test]
fn counters_blocks_and_caps_survive_an_agent_restart() {
    if !kernel_test_guard(TOOLS) {
        return;
    }
    let lab = Lab::new();
    let bpffs = BpfFs::new();
    let parent = TestCgroup::new();
    let worker = TestCgroup::under(parent.path());
    let contained = TestCgroup::under(parent.path());
    let dst = SocketAddr::new(lab.peer_addr(Family::V4), 9700);
    let _sink = UdpSink::start(lab.peer(), dst);

    let mut first = attach(&parent, Some(&bpffs));
    assert!(!first.reused_pins());
    traffic::send_udp(lab.client(), &worker, dst, 3, 100);
    first.block_cgroup(contained.id()).unwrap();
    first
        .set_cap(worker.id(), 1_000_000, Duration::from_secs(600))
        .unwrap();
    drop(first);

    // The agent is down: its pinned programs keep counting and enforcing.
    traffic::send_udp(lab.client(), &worker, dst, 2, 100);
    let err =
        traffic::try_send_udp(lab.client(), &contained, dst, 1, 10).expect_err("still blocked");
    assert_eq!(err.errno(), Some(libc::EPERM));

    let second = attach(&parent, Some(&bpffs));
    assert!(second.reused_pins());
    let f = flow(&second, &worker, dst.ip(), 9700, proto::UDP);
    let per = traffic::expected_udp_bytes(Family::V4, 1, 100);
    assert_eq!(
        (f.packets, f.bytes),
        (5, 5 * per),
        "counted across the restart"
    );
    assert_eq!(second.blocked_cgroups().unwrap(), vec![contained.id()]);
    let cap = second.cap_status(worker.id()).unwrap().expect("cap kept");
    assert_eq!(cap.budget_bytes, 1_000_000);
    assert_eq!(cap.spent_bytes, 2 * per, "spending since the cap was set");
    drop(second);

    // Cleanup detaches and frees everything: the block is gone.
    let pin_dir = bpffs.path().join("exfilguard");
    let removed = datapath::bpffs::remove_pins(&pin_dir).unwrap();
    assert!(removed.len() >= 10, "{removed:?}");
    assert!(!pin_dir.exists());
    traffic::send_udp(lab.client(), &contained, dst, 1, 10);
}

#[test]
fn without_pinning_nothing_stays_behind() {
    if !kernel_test_guard(TOOLS) {
        return;
    }
    let lab = Lab::new();
    let cg = TestCgroup::new();
    let dst = SocketAddr::new(lab.peer_addr(Family::V4), 9800);
    let _sink = UdpSink::start(lab.peer(), dst);
    let mut dp = attach(&cg, None);
    dp.block_cgroup(cg.id()).unwrap();
    assert!(traffic::try_send_udp(lab.client(), &cg, dst, 1, 10).is_err());
    drop(dp);
    // Programs detached with the agent: the block went with them.
    traffic::send_udp(lab.client(), &cg, dst, 1, 10);
    let fresh = attach(&cg, None);
    assert!(!fresh.reused_pins());
    assert!(fresh.flows().unwrap().is_empty());
}

#[test]
fn a_path_that_is_not_cgroup2_is_a_clear_error_and_attaches_nothing() {
    if !kernel_test_guard(&[]) {
        return;
    }
    let err = Datapath::load(&DatapathConfig {
        cgroup_path: "/proc".into(),
        pin_dir: None,
    })
    .err()
    .expect("/proc is not a cgroup");
    assert!(matches!(err, DatapathError::NotCgroup2 { .. }), "{err}");
    assert!(err.to_string().contains("findmnt -t cgroup2"), "{err}");
}

/// Collects `log` records: aya-log hands kernel log records to the global
/// `log` logger (which, in the agent, forwards into `tracing`).
struct Capture(std::sync::Mutex<Vec<String>>);

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(record.args().to_string());
    }
    fn flush(&self) {}
}

static CAPTURE: Capture = Capture(std::sync::Mutex::new(Vec::new()));

#[test]
fn kernel_log_records_are_forwarded() {
    if !kernel_test_guard(TOOLS) {
        return;
    }
    // Before the load: the logger is bound when the datapath starts.
    if log::set_logger(&CAPTURE).is_ok() {
        log::set_max_level(log::LevelFilter::Trace);
    }
    let lab = Lab::new();
    let cg = TestCgroup::new();
    let mut dp = attach(&cg, None);
    let dst = SocketAddr::new(lab.peer_addr(Family::V4), 9900);
    let _sink = UdpSink::start(lab.peer(), dst);
    dp.set_cap(cg.id(), 100, Duration::from_secs(600)).unwrap();
    assert!(traffic::try_send_udp(lab.client(), &cg, dst, 1, 200).is_err());
    let deadline = Instant::now() + Duration::from_secs(3);
    let want = format!("hard cap of cgroup {} spent", cg.id());
    loop {
        dp.flush_logs();
        let seen = CAPTURE.0.lock().unwrap().iter().any(|m| m.contains(&want));
        if seen {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no kernel log record {want:?}; got {:?}",
            CAPTURE.0.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends one small UDP datagram to each port in `first..first+count` on
/// `host`, as fast as it can; prints how many `sendto` calls succeeded.
const PY_PORT_SWEEP: &str = r#"
import socket, sys
host, first, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
ok = 0
for p in range(first, first + count):
    try:
        s.sendto(b"q" * 32, (host, p)); ok += 1
    except OSError:
        pass
print(ok)
"#;

/// Sends `count` small UDP datagrams to `host`:53 (no server needed: the
/// kernel captures every port-53 payload); prints how many were sent.
const PY_DNS_FLOOD: &str = r#"
import socket, sys
host, count = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
ok = 0
for i in range(count):
    try:
        s.sendto(i.to_bytes(4, "big") + b"\x01\x00\x00\x01" + b"\x00" * 24, (host, 53)); ok += 1
    except OSError:
        pass
print(ok)
"#;

#[test]
fn a_full_ring_buffer_counts_every_event_it_loses() {
    if !kernel_test_guard(TOOLS) {
        return;
    }
    let lab = Lab::new();
    let cg = TestCgroup::new();
    let mut dp = attach(&cg, None);
    let peer = lab.peer_addr(Family::V4).to_string();
    // The 4 MiB ring holds ~7,000 DNS records; nobody drains it meanwhile.
    let sent: u64 = lab
        .client()
        .run_ok(Some(&cg), &[python3(), "-c", PY_DNS_FLOOD, &peer, "12000"])
        .trim()
        .parse()
        .expect("sender prints a count");
    assert_eq!(sent, 12_000);
    let stats = dp.stats().unwrap();
    assert!(stats.ring_drops > 0, "{stats:?}");
    // Nothing lost silently: every query was either captured or counted as dropped.
    assert_eq!(stats.dns_events + stats.ring_drops, sent, "{stats:?}");
    let mut drained = 0u64;
    loop {
        let batch = dp.drain_events(4096);
        if batch.is_empty() {
            break;
        }
        for ev in batch {
            assert!(matches!(ev, Ok(Event::Dns(_))), "{ev:?}");
            drained += 1;
        }
    }
    assert_eq!(drained, stats.dns_events);
}

#[test]
fn the_flow_map_is_bounded_and_counts_evictions() {
    if !kernel_test_guard(TOOLS) {
        return;
    }
    let lab = Lab::new();
    let cg = TestCgroup::new();
    let dp = attach(&cg, None);
    // Ports stop at 65,535: sweep them on both peer addresses.
    let per_host = (u64::from(exfilguard_common::MAX_FLOWS) + 4_000) / 2;
    let mut flows = 0;
    for family in [Family::V4, Family::V6] {
        let host = lab.peer_addr(family).to_string();
        let sent: u64 = lab
            .client()
            .run_ok(
                Some(&cg),
                &[
                    python3(),
                    "-c",
                    PY_PORT_SWEEP,
                    &host,
                    "1",
                    &per_host.to_string(),
                ],
            )
            .trim()
            .parse()
            .expect("sender prints a count");
        assert_eq!(sent, per_host);
        flows += sent;
    }
    let stats = dp.stats().unwrap();
    let live = dp.flow_count().unwrap();
    assert!(live <= u64::from(exfilguard_common::MAX_FLOWS), "{live}");
    assert!(stats.flows_inserted >= flows, "{stats:?}");
    let evicted = stats.flows_inserted - live;
    assert!(
        evicted >= flows - u64::from(exfilguard_common::MAX_FLOWS),
        "{evicted}"
    );
    assert_eq!(stats.flow_insert_errors, 0);
}
