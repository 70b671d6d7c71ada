//! Self-tests of the kernel-test harness: that labs, cgroups, bpffs mounts and servers
//! work, that the byte-accounting rules in `traffic` match what the kernel counts, and
//! that nothing is left behind — also when a test panics.
//!
//! Need root; run one at a time: `cargo test -p exfilguard-tests -- --test-threads=1`.

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::unix::fs::MetadataExt as _,
    panic::{self, AssertUnwindSafe},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use exfilguard_tests::{
    BpfFs, Family, Lab, TestCgroup,
    dns::{self, DnsRecord, DnsServer, Transport},
    kernel_test_guard,
    probe::EgressCounter,
    process,
    traffic::{self, TcpSink, TcpTimestamps, UdpSink},
};
use rstest::rstest;

const NET_TOOLS: &[&str] = &["ip", "ping", "python3", "sleep"];

fn ping(lab: &Lab, from_client: bool, to: IpAddr) {
    let ns = if from_client {
        lab.client()
    } else {
        lab.peer()
    };
    let to = to.to_string();
    ns.run_ok(None, &["ping", "-c", "1", "-W", "2", &to]);
}

#[test]
fn lab_pings_both_ways_v4_and_v6() {
    if !kernel_test_guard(NET_TOOLS) {
        return;
    }
    let lab = Lab::new();
    for family in [Family::V4, Family::V6] {
        ping(&lab, true, lab.peer_addr(family));
        ping(&lab, false, lab.client_addr(family));
    }
}

#[test]
fn extra_peer_addresses_are_reachable_over_the_veth() {
    if !kernel_test_guard(NET_TOOLS) {
        return;
    }
    let lab = Lab::new();
    let internal = IpAddr::V4(Ipv4Addr::new(10, 250, 0, 50));
    let external_v4 = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7));
    let external_v6 = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7));
    for addr in [internal, external_v4, external_v6] {
        lab.add_peer_addr(addr);
        ping(&lab, true, addr);
    }
    assert_eq!(
        lab.extra_peer_addrs(),
        vec![internal, external_v4, external_v6]
    );
    // The peer answers from the extra address itself, over the same interface.
    let route = lab.client().ip(&["route", "get", "198.51.100.7"]);
    assert!(route.contains(lab.client_if()), "{route}");
}

#[test]
fn lab_has_no_default_route() {
    if !kernel_test_guard(NET_TOOLS) {
        return;
    }
    let lab = Lab::new();
    for ns in [lab.client(), lab.peer()] {
        for flag in ["-4", "-6"] {
            let default = ns.ip(&[flag, "route", "show", "default"]);
            assert_eq!(default.trim(), "", "{} has a default route", ns.name());
        }
        // A route lookup sends nothing; it must find no way out of the lab.
        for outside in ["192.0.2.1", "2001:db8:ffff::1"] {
            let mut cmd = Command::new("ip");
            cmd.args(["-n", ns.name(), "route", "get", outside]);
            let out = process::output(cmd, "route get", process::DEFAULT_TIMEOUT);
            assert!(
                !out.status.success(),
                "{} routes {outside}: {}",
                ns.name(),
                String::from_utf8_lossy(&out.stdout)
            );
        }
    }
}

fn ino(path: &Path) -> u64 {
    fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .ino()
}

#[test]
fn spawned_process_is_in_the_cgroup_and_the_netns() {
    if !kernel_test_guard(NET_TOOLS) {
        return;
    }
    let lab = Lab::new();
    let cg = TestCgroup::new();
    assert_eq!(cg.id(), ino(cg.path()));

    let mut child = lab.client().spawn(Some(&cg), &["sleep", "30"]);
    let pid = child.pid();
    assert_eq!(cg.pids(), vec![pid], "cgroup.procs of {}", cg.name());
    let own = fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("read /proc/PID/cgroup");
    let v2 = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or_else(|| panic!("no cgroup v2 line in {own}"));
    assert!(v2.ends_with(&format!("/{}", cg.name())), "{v2}");
    // The exec chain (sh → ip netns exec → sleep) keeps one PID; once it reached
    // `sleep`, that PID is in the lab's netns.
    let exec_done = (0..500).any(|_| {
        let comm = fs::read_to_string(format!("/proc/{pid}/comm")).expect("read comm");
        comm.trim() == "sleep" || {
            std::thread::sleep(Duration::from_millis(10));
            false
        }
    });
    assert!(exec_done, "pid {pid} never became `sleep`");
    assert_eq!(
        ino(Path::new(&format!("/proc/{pid}/ns/net"))),
        ino(&lab.client().path())
    );

    assert!(child.is_running());
    child.kill().expect("sleep reaped");
    assert_eq!(cg.pids(), Vec::<u32>::new());
}

#[test]
fn netns_only_command_stays_in_our_cgroup() {
    if !kernel_test_guard(NET_TOOLS) {
        return;
    }
    let lab = Lab::new();
    let ours = fs::read_to_string("/proc/self/cgroup").expect("read own cgroup");
    let theirs = lab.peer().run_ok(None, &["cat", "/proc/self/cgroup"]);
    assert_eq!(ours, theirs);
}

#[test]
fn dropping_a_cgroup_kills_orphaned_members() {
    if !kernel_test_guard(NET_TOOLS) {
        return;
    }
    let lab = Lab::new();
    let cg = TestCgroup::new();
    // The shell exits at once; its background sleep is no child of ours, so only the
    // cgroup's Drop can find it.
    lab.client().run_ok(
        Some(&cg),
        &["sh", "-c", "sleep 60 </dev/null >/dev/null 2>&1 &"],
    );
    let pids = cg.pids();
    assert_eq!(pids.len(), 1, "{pids:?}");
    let path = cg.path().to_owned();
    drop(cg);
    assert!(!path.exists(), "{} left behind", path.display());
    assert!(!alive(pids[0]), "pid {} survived", pids[0]);
}

/// Whether `pid` is a live (not zombie, not gone) process.
fn alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit(") ")
            .next()
            .is_some_and(|rest| !rest.starts_with('Z'))
    })
}

/// Names of everything [`build_world`] made, to check for leftovers.
#[derive(Debug, Default)]
struct World {
    netns: Vec<String>,
    cgroup: PathBuf,
    bpffs: PathBuf,
    pids: Vec<u32>,
}

/// Creates one of each guard (and a server, and a process in the cgroup), and records
/// their names in `world` before `end` decides how the scope ends.
fn build_world(world: &mut World, end: impl FnOnce()) {
    let lab = Lab::new();
    let cg = TestCgroup::new();
    let bpffs = BpfFs::new();
    let sink = UdpSink::start(lab.peer(), SocketAddr::new(lab.peer_v4().into(), 9000));
    let worker = lab.client().spawn(Some(&cg), &["sleep", "60"]);
    world.netns = vec![lab.client().name().into(), lab.peer().name().into()];
    world.cgroup = cg.path().into();
    world.bpffs = bpffs.path().into();
    world.pids = vec![sink.child().pid(), worker.pid()];
    assert!(exfilguard_tests::bpffs::is_bpffs(bpffs.path()));
    end();
}

fn assert_world_gone(world: &World) {
    assert_eq!(world.netns.len(), 2, "world was not built: {world:?}");
    let list = String::from_utf8(
        Command::new("ip")
            .args(["netns", "list"])
            .output()
            .expect("ip netns list")
            .stdout,
    )
    .expect("utf-8");
    for name in &world.netns {
        assert!(
            !list
                .lines()
                .any(|l| l.split_whitespace().next() == Some(name)),
            "netns {name} left behind:\n{list}"
        );
        assert!(!Path::new("/run/netns").join(name).exists());
    }
    assert!(!world.cgroup.exists(), "{} left", world.cgroup.display());
    assert!(!world.bpffs.exists(), "{} left", world.bpffs.display());
    let mounts = fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
    let bpffs = world.bpffs.to_str().expect("utf-8 path");
    assert!(!mounts.contains(bpffs), "{bpffs} still mounted");
    for &pid in &world.pids {
        assert!(!alive(pid), "pid {pid} survived");
    }
}

#[test]
fn nothing_is_left_after_drop() {
    if !kernel_test_guard(NET_TOOLS) {
        return;
    }
    let mut world = World::default();
    build_world(&mut world, || {});
    assert_world_gone(&world);
}

#[test]
fn nothing_is_left_after_a_panic() {
    if !kernel_test_guard(NET_TOOLS) {
        return;
    }
    let mut world = World::default();
    let result = panic::catch_unwind(AssertUnwindSafe(|| {
        build_world(&mut world, || panic!("deliberate failure inside a test"));
    }));
    let err = result.expect_err("the closure panics");
    assert_eq!(
        err.downcast_ref::<&str>(),
        Some(&"deliberate failure inside a test")
    );
    assert_world_gone(&world);
}

#[test]
fn bpffs_mounts_are_separate_instances() {
    if !kernel_test_guard(&["bpftool"]) {
        return;
    }
    let a = BpfFs::new();
    let b = BpfFs::new();
    let pin = a.path().join("m");
    let pin_arg = pin.to_str().expect("utf-8 path");
    let mut cmd = Command::new("bpftool");
    cmd.args(["map", "create", pin_arg, "type", "array"]).args([
        "key",
        "4",
        "value",
        "4",
        "entries",
        "1",
        "name",
        "eg_pin_test",
    ]);
    process::run_ok(cmd, "pin a map", process::DEFAULT_TIMEOUT);
    assert!(pin.exists());
    assert!(!b.path().join("m").exists(), "pins leak between instances");
    let path = a.path().to_owned();
    // Unmounting a bpffs with a pin in it frees the pin; the directory goes too.
    drop(a);
    assert!(!path.exists());
}

/// Settles per-cgroup counters: packets are counted synchronously in the sender's
/// context, but the last ACKs of a TCP exchange come from softirq.
const SETTLE: Duration = Duration::from_millis(200);

#[rstest]
#[case::v4(Family::V4)]
#[case::v6(Family::V6)]
fn udp_bytes_are_payload_plus_headers(#[case] family: Family) {
    if !kernel_test_guard(&["ip", "python3"]) {
        return;
    }
    let lab = Lab::new();
    let cg = TestCgroup::new();
    let counter = EgressCounter::attach(&cg);
    let sink = UdpSink::start(lab.peer(), SocketAddr::new(lab.peer_addr(family), 9000));

    // 3 small datagrams, then 2 larger than the 1500-byte MTU (fragmented on the wire,
    // but counted once each, before fragmentation).
    let small = traffic::send_udp(lab.client(), &cg, sink.addr(), 3, 200);
    let large = traffic::send_udp(lab.client(), &cg, sink.addr(), 2, 3000);
    assert_eq!(small.payload_bytes + large.payload_bytes, 6600);
    let got = sink.collect(5, Duration::from_secs(5));
    assert_eq!((got.units, got.payload_bytes), (5, 6600));

    std::thread::sleep(SETTLE);
    let counts = counter.read();
    eprintln!("UDP {family:?}: {counts:?}");
    assert_eq!(counts.packets, 5);
    assert_eq!(
        counts.bytes,
        traffic::expected_udp_bytes(family, 3, 200) + traffic::expected_udp_bytes(family, 2, 3000)
    );
}

#[rstest]
#[case::v4_timestamps(Family::V4, TcpTimestamps::On, 100_000)]
#[case::v6_timestamps(Family::V6, TcpTimestamps::On, 100_000)]
#[case::v4_no_timestamps(Family::V4, TcpTimestamps::Off, 100_000)]
#[case::v6_no_timestamps(Family::V6, TcpTimestamps::Off, 100_000)]
#[case::v4_large(Family::V4, TcpTimestamps::On, 5_000_000)]
#[case::v4_tiny(Family::V4, TcpTimestamps::On, 1)]
#[case::v4_empty(Family::V4, TcpTimestamps::On, 0)]
fn tcp_bytes_are_payload_plus_one_header_per_skb(
    #[case] family: Family,
    #[case] timestamps: TcpTimestamps,
    #[case] payload: u64,
) {
    if !kernel_test_guard(&["ip", "python3"]) {
        return;
    }
    let lab = Lab::new();
    if timestamps == TcpTimestamps::Off {
        // Per-namespace; also covers IPv6 (the knob is shared).
        lab.client().sysctl("net.ipv4.tcp_timestamps", "0");
    }
    let cg = TestCgroup::new();
    let counter = EgressCounter::attach(&cg);
    let sink = TcpSink::start(lab.peer(), SocketAddr::new(lab.peer_addr(family), 9001));

    let sent = traffic::send_tcp(lab.client(), &cg, sink.addr(), payload);
    assert_eq!(sent.payload_bytes, payload);
    if sent.retransmitted_bytes > 0 {
        eprintln!("TCP {family:?} {payload} B: kernel retransmitted: {sent:?}");
    }
    let got = sink.collect(1, Duration::from_secs(10));
    assert_eq!((got.units, got.payload_bytes), (1, payload));

    std::thread::sleep(SETTLE);
    let counts = counter.read();
    eprintln!("TCP {family:?} {timestamps:?} {payload} B: {counts:?}");
    // SYN, handshake ACK, data skbs (the FIN may ride on the last), FIN, ACK of the
    // server's FIN.
    assert!(counts.packets >= 4, "{counts:?}");
    let ip_payload = sent.ip_payload_bytes();
    assert_eq!(
        counts.bytes,
        traffic::expected_tcp_bytes(family, ip_payload, counts.packets, timestamps),
        "{counts:?} {sent:?}"
    );
    assert_eq!(
        traffic::tcp_payload_from_kernel(counts.bytes, counts.packets, family, timestamps),
        ip_payload
    );
}

#[rstest]
#[case::v4(Family::V4)]
#[case::v6(Family::V6)]
fn dns_server_answers_over_udp_and_tcp(#[case] family: Family) {
    if !kernel_test_guard(&["ip", "dnsmasq", "dig"]) {
        return;
    }
    let lab = Lab::new();
    let cg = TestCgroup::new();
    let counter = EgressCounter::attach(&cg);
    let answer = IpAddr::V4(Ipv4Addr::new(10, 250, 0, 9));
    let server = DnsServer::start(
        lab.peer(),
        lab.peer_addr(family),
        &[
            DnsRecord::address("example.test", answer),
            DnsRecord::txt("t.example.test", "hello"),
        ],
    );

    for transport in [Transport::Udp, Transport::Tcp] {
        let got = dns::dig_short(
            lab.client(),
            Some(&cg),
            server.addr(),
            "a1b2.example.test",
            "A",
            transport,
        );
        assert_eq!(got, vec![answer.to_string()], "{transport:?}");
    }
    let txt = dns::dig(
        lab.client(),
        Some(&cg),
        server.addr(),
        "t.example.test",
        "TXT",
        Transport::Udp,
    );
    assert!(txt.contains("\"hello\""), "{txt}");
    // Nothing is forwarded: a name outside the records is refused.
    let other = dns::dig(
        lab.client(),
        Some(&cg),
        server.addr(),
        "example.com",
        "A",
        Transport::Udp,
    );
    assert!(other.contains("status: REFUSED"), "{other}");

    let client = lab.client_addr(family).to_string();
    let log = server.log();
    assert!(
        log.contains(&format!("query[A] a1b2.example.test from {client}")),
        "{log}"
    );
    std::thread::sleep(SETTLE);
    let counts = counter.read();
    eprintln!("DNS {family:?}: {counts:?}");
    assert!(counts.packets >= 4, "{counts:?}");
}
