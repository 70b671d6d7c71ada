//! Named network namespaces and a two-namespace lab joined by a veth pair.
//!
//! Namespaces are created with `ip netns add` (so they are visible to `ip netns list`
//! and enterable with `ip netns exec`), and the veth pair is created directly inside
//! them: no interface ever appears in the host namespace, and the addresses used exist
//! only inside these namespaces, which have no default route. Traffic generated in a
//! lab therefore cannot leave it.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::Mutex,
    thread,
    time::{Duration, Instant},
};

use crate::{
    cgroup::TestCgroup,
    naming::UniqueId,
    process::{self, ChildGuard, DEFAULT_TIMEOUT},
    traffic::Family,
};

/// How long [`Netns::spawn`] waits for a child to join its cgroup.
const JOIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Where `ip netns add` bind-mounts namespace handles.
const NETNS_RUN_DIR: &str = "/run/netns";

/// A named network namespace with `lo` up, deleted (`ip netns del`) on `Drop`.
///
/// Processes still running inside keep the namespace itself alive after `Drop` until
/// they exit, but its name is gone; drop server guards before their namespace (declare
/// them after it).
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a namespace named `eg{pid}x{counter}` with only `lo`, up.
    pub fn new() -> Self {
        Self::named(UniqueId::next().prefix())
    }

    /// Creates a namespace with the given (caller-made unique) name.
    fn named(name: String) -> Self {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "add", &name]);
        process::run_ok(cmd, &format!("create netns {name}"), DEFAULT_TIMEOUT);
        // From here on `Drop` owns the cleanup, also if the next step panics.
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// The namespace's name, as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace handle `ip netns add` created (its inode identifies the namespace).
    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_RUN_DIR).join(&self.name)
    }

    /// Runs `ip -n NS ARGS…` and returns its stdout; panics on failure.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut cmd = Command::new("ip");
        cmd.args(["-n", &self.name]).args(args);
        process::run_ok(
            cmd,
            &format!("ip -n {} {}", self.name, args.join(" ")),
            DEFAULT_TIMEOUT,
        )
    }

    /// Sets a per-namespace sysctl (e.g. `net.ipv4.tcp_timestamps`) inside this namespace.
    pub fn sysctl(&self, key: &str, value: &str) {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        // Written from inside: `ip netns exec` remounts /proc/sys for the namespace.
        self.run_ok(
            None,
            &["sh", "-c", r#"printf '%s\n' "$1" > "$0""#, &path, value],
        );
    }

    /// A command running `argv` inside this namespace and, if given, inside `cgroup`.
    ///
    /// With a cgroup, a shell first moves itself into the cgroup (writing `$$` to
    /// `cgroup.procs`) and then execs `ip netns exec`, which keeps the caller's cgroup;
    /// both exec in place, so the child's PID is that of `argv[0]`. Arguments are passed
    /// as positional parameters, never spliced into shell text.
    pub fn command(&self, cgroup: Option<&TestCgroup>, argv: &[&str]) -> Command {
        assert!(!argv.is_empty(), "empty command for netns {}", self.name);
        match cgroup {
            None => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", &self.name]).args(argv);
                cmd
            }
            Some(cg) => {
                let mut cmd = Command::new("sh");
                cmd.arg("-c")
                    .arg(r#"echo $$ > "$0" || exit 125; ns=$1; shift; exec ip netns exec "$ns" "$@""#)
                    .arg(cg.procs_file())
                    .arg(&self.name)
                    .args(argv);
                cmd
            }
        }
    }

    /// Runs `argv` here (and in `cgroup`) within `timeout`; returns the output whatever
    /// the exit status.
    pub fn output(&self, cgroup: Option<&TestCgroup>, argv: &[&str], timeout: Duration) -> Output {
        process::output(
            self.command(cgroup, argv),
            &self.describe(cgroup, argv),
            timeout,
        )
    }

    /// Runs `argv` here (and in `cgroup`); returns stdout, panics unless it succeeds.
    pub fn run_ok(&self, cgroup: Option<&TestCgroup>, argv: &[&str]) -> String {
        process::run_ok(
            self.command(cgroup, argv),
            &self.describe(cgroup, argv),
            DEFAULT_TIMEOUT,
        )
    }

    /// Starts a long-lived `argv` here (and in `cgroup`), killed when the guard drops.
    ///
    /// With a cgroup, returns only once the child is a member (the wrapper shell joins
    /// it asynchronously), so whatever the caller does next is attributed to it. The
    /// exec of `argv[0]` itself may still be under way.
    pub fn spawn(&self, cgroup: Option<&TestCgroup>, argv: &[&str]) -> ChildGuard {
        let child = ChildGuard::spawn(self.command(cgroup, argv), self.describe(cgroup, argv));
        if let Some(cg) = cgroup {
            let deadline = Instant::now() + JOIN_TIMEOUT;
            while !cg.pids().contains(&child.pid()) {
                assert!(
                    Instant::now() < deadline,
                    "{}: pid {} not in {} after {JOIN_TIMEOUT:?}; transcript:\n{}",
                    self.describe(Some(cg), argv),
                    child.pid(),
                    cg.procs_file().display(),
                    child.transcript()
                );
                thread::sleep(Duration::from_millis(2));
            }
        }
        child
    }

    fn describe(&self, cgroup: Option<&TestCgroup>, argv: &[&str]) -> String {
        match cgroup {
            None => format!("[netns {}] {}", self.name, argv.join(" ")),
            Some(cg) => format!(
                "[netns {} cgroup {}] {}",
                self.name,
                cg.name(),
                argv.join(" ")
            ),
        }
    }
}

impl Default for Netns {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let out = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        // Report, never panic: a Drop may run while a failed test unwinds.
        match out {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "delete netns {}: {}: {}",
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(e) => eprintln!("delete netns {}: spawn ip: {e}", self.name),
        }
    }
}

/// Two namespaces, a *client* and a *peer*, joined by a veth pair, with IPv4 and IPv6
/// addresses on both ends, static neighbour entries, `lo` up and no default route.
///
/// Addresses are `10.X.Y.1/24` (client) and `10.X.Y.2/24` (peer), and
/// `fd65:67:X:Y::1/64` / `::2` (ULA; `65 67` is "eg"), with `X` from the pid and `Y`
/// from the per-process counter. They exist only inside the lab. Static neighbour
/// entries (fixed MACs `02:65:67:X:Y:01/02`) mean no ARP/NDP round trip delays or drops
/// the first packets of a burst.
///
/// The workload under test runs in the client (usually also in a [`TestCgroup`]);
/// servers run in the peer. Fields drop in order: client, then peer (the veth goes
/// with the first).
#[derive(Debug)]
pub struct Lab {
    client: Netns,
    peer: Netns,
    client_if: String,
    peer_if: String,
    peer_mac: String,
    octets: (u8, u8),
    extra: Mutex<Vec<IpAddr>>,
}

impl Lab {
    /// Builds the lab; panics with context if any step fails (and cleans up what was
    /// already made).
    pub fn new() -> Self {
        let id = UniqueId::next();
        let prefix = id.prefix();
        let client_if = format!("{prefix}a");
        let peer_if = format!("{prefix}b");
        assert!(
            peer_if.len() <= 15,
            "interface name {peer_if} is longer than IFNAMSIZ-1"
        );
        // X in 1..=250 from the pid, Y from the counter: distinct subnets for parallel
        // runs, even though separate namespaces would not clash anyway.
        let octets = (
            u8::try_from(id.pid % 250 + 1).expect("< 251"),
            u8::try_from(id.n % 256).expect("< 256"),
        );
        let (x, y) = octets;
        let client_mac = format!("02:65:67:{x:02x}:{y:02x}:01");
        let peer_mac = format!("02:65:67:{x:02x}:{y:02x}:02");

        let client = Netns::named(format!("{prefix}c"));
        let peer = Netns::named(format!("{prefix}p"));
        let mut cmd = Command::new("ip");
        cmd.args(["link", "add", &client_if, "netns", client.name()])
            .args(["address", &client_mac, "type", "veth", "peer", "name"])
            .args([&peer_if, "netns", peer.name(), "address", &peer_mac]);
        process::run_ok(
            cmd,
            &format!("create veth {client_if}/{peer_if}"),
            DEFAULT_TIMEOUT,
        );

        let lab = Self {
            client,
            peer,
            client_if,
            peer_if,
            peer_mac,
            octets,
            extra: Mutex::new(Vec::new()),
        };
        for family in [Family::V4, Family::V6] {
            let len = subnet_prefix_len(family);
            add_addr(&lab.client, &lab.client_if, lab.client_addr(family), len);
            add_addr(&lab.peer, &lab.peer_if, lab.peer_addr(family), len);
            set_neigh(
                &lab.client,
                &lab.client_if,
                lab.peer_addr(family),
                &lab.peer_mac,
            );
            set_neigh(
                &lab.peer,
                &lab.peer_if,
                lab.client_addr(family),
                &client_mac,
            );
        }
        lab.client.ip(&["link", "set", &lab.client_if, "up"]);
        lab.peer.ip(&["link", "set", &lab.peer_if, "up"]);
        lab
    }

    /// The client namespace (where the workload under test runs).
    pub fn client(&self) -> &Netns {
        &self.client
    }

    /// The peer namespace (where servers run).
    pub fn peer(&self) -> &Netns {
        &self.peer
    }

    /// The client's veth interface name.
    pub fn client_if(&self) -> &str {
        &self.client_if
    }

    /// The peer's veth interface name.
    pub fn peer_if(&self) -> &str {
        &self.peer_if
    }

    /// The client's IPv4 address, `10.X.Y.1`.
    pub fn client_v4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, self.octets.0, self.octets.1, 1)
    }

    /// The peer's IPv4 address, `10.X.Y.2`.
    pub fn peer_v4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, self.octets.0, self.octets.1, 2)
    }

    /// The client's IPv6 address, `fd65:67:X:Y::1`.
    pub fn client_v6(&self) -> Ipv6Addr {
        Ipv6Addr::new(
            0xfd65,
            0x67,
            self.octets.0.into(),
            self.octets.1.into(),
            0,
            0,
            0,
            1,
        )
    }

    /// The peer's IPv6 address, `fd65:67:X:Y::2`.
    pub fn peer_v6(&self) -> Ipv6Addr {
        Ipv6Addr::new(
            0xfd65,
            0x67,
            self.octets.0.into(),
            self.octets.1.into(),
            0,
            0,
            0,
            2,
        )
    }

    /// The client's address of `family`.
    pub fn client_addr(&self, family: Family) -> IpAddr {
        match family {
            Family::V4 => self.client_v4().into(),
            Family::V6 => self.client_v6().into(),
        }
    }

    /// The peer's primary address of `family`.
    pub fn peer_addr(&self, family: Family) -> IpAddr {
        match family {
            Family::V4 => self.peer_v4().into(),
            Family::V6 => self.peer_v6().into(),
        }
    }

    /// Gives the peer one more address (host route on the client side, static
    /// neighbour), reachable over the same veth.
    ///
    /// Lets a test aim at two "remote hosts" that a classifier should tell apart, e.g.
    /// an "internal" `10.X.Y.50` and an "external" documentation address such as
    /// `198.51.100.7` or `2001:db8::7` (RFC 5737 / RFC 3849: never routed publicly, and
    /// here present only inside the lab). Replies use the client's primary address, so
    /// nothing else needs configuring.
    pub fn add_peer_addr(&self, addr: IpAddr) {
        let family = Family::of(addr);
        add_addr(&self.peer, &self.peer_if, addr, family.host_prefix_len());
        let host = format!("{addr}/{}", family.host_prefix_len());
        self.client.ip(&[
            family.ip_flag(),
            "route",
            "add",
            &host,
            "dev",
            &self.client_if,
        ]);
        set_neigh(&self.client, &self.client_if, addr, &self.peer_mac);
        self.extra
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(addr);
    }

    /// Addresses added with [`Lab::add_peer_addr`], in order.
    pub fn extra_peer_addrs(&self) -> Vec<IpAddr> {
        self.extra.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Default for Lab {
    fn default() -> Self {
        Self::new()
    }
}

/// The lab's on-link subnets: `10.X.Y.0/24` and `fd65:67:X:Y::/64`.
fn subnet_prefix_len(family: Family) -> u8 {
    match family {
        Family::V4 => 24,
        Family::V6 => 64,
    }
}

fn add_addr(ns: &Netns, ifname: &str, addr: IpAddr, prefix_len: u8) {
    let cidr = format!("{addr}/{prefix_len}");
    let family = Family::of(addr);
    let mut args = vec![family.ip_flag(), "addr", "add", &cidr, "dev", ifname];
    if family == Family::V6 {
        // Skip duplicate address detection: otherwise the address stays "tentative"
        // (unusable as a source, unbindable) for about a second.
        args.push("nodad");
    }
    ns.ip(&args);
}

fn set_neigh(ns: &Netns, ifname: &str, addr: IpAddr, mac: &str) {
    let addr = addr.to_string();
    ns.ip(&[
        "neigh",
        "replace",
        &addr,
        "lladdr",
        mac,
        "dev",
        ifname,
        "nud",
        "permanent",
    ]);
}
