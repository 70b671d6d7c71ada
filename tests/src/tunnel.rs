//! Real DNS tunnels from Debian's packages, for the DNS detector's kernel tests:
//! `iodine` (IPv4 over DNS, a tun interface at each end) and `dns2tcp` (a TCP port
//! forward over DNS TXT queries).
//!
//! Servers run in a lab's peer namespace, bound to the peer's address only; clients
//! run in the client namespace (and in the test cgroup) and talk to the server's
//! address directly, so no query ever leaves the lab. Every process is a
//! [`ChildGuard`], killed by PID on `Drop`; iodine's tun interfaces get unique names
//! and vanish with the process that opened them (and with their namespace).

use std::{
    fs,
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    time::Duration,
};

use crate::{cgroup::TestCgroup, naming::UniqueId, netns::Netns, process::ChildGuard};

/// How long a tunnel may take to come up (iodine probes codecs and fragment sizes).
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);

/// iodine's character device for tun interfaces.
pub const TUN_DEVICE: &str = "/dev/net/tun";

/// The password both iodine ends use (a test value; iodine requires one).
const IODINE_PASSWORD: &str = "exfilguard-test";

/// A running `iodined` in a namespace, answering queries for one domain.
pub struct IodineServer {
    child: ChildGuard,
    tunnel_ip: Ipv4Addr,
    ifname: String,
}

impl IodineServer {
    /// Starts `iodined` in `ns`, listening on `listen` port 53 for `topdomain`.
    ///
    /// Its tunnel subnet is `10.251.Y.0/27` (`Y` from the per-process counter; the lab
    /// subnets use `10.1-250.*`, so it never overlaps them) and exists only in the two
    /// namespaces. Returns once the server listens.
    pub fn start(ns: &Netns, listen: IpAddr, topdomain: &str) -> Self {
        assert!(
            std::path::Path::new(TUN_DEVICE).exists(),
            "iodine needs {TUN_DEVICE} (modprobe tun)"
        );
        let id = UniqueId::next();
        let ifname = format!("{}s", id.prefix());
        let y = u8::try_from(id.n % 256).expect("< 256");
        let tunnel_ip = Ipv4Addr::new(10, 251, y, 1);
        let subnet = format!("{tunnel_ip}/27");
        let listen = listen.to_string();
        let child = ns.spawn(
            None,
            &[
                "iodined",
                // Foreground, so the guard's PID is the server's.
                "-f",
                "-P",
                IODINE_PASSWORD,
                "-l",
                &listen,
                "-p",
                "53",
                "-d",
                &ifname,
                &subnet,
                topdomain,
            ],
        );
        child.wait_for_line(
            "iodined listening",
            |l| l.starts_with("Listening to dns for domain"),
            SETUP_TIMEOUT,
        );
        Self {
            child,
            tunnel_ip,
            ifname,
        }
    }

    /// The server's address inside the tunnel (on its tun interface).
    pub fn tunnel_ip(&self) -> Ipv4Addr {
        self.tunnel_ip
    }

    /// The server's tun interface name.
    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    /// The server's output so far.
    pub fn log(&self) -> String {
        self.child.transcript()
    }
}

/// A connected `iodine` client in a namespace (and cgroup).
pub struct IodineClient {
    child: ChildGuard,
    ifname: String,
}

impl IodineClient {
    /// Starts `iodine` in `ns` and `cgroup`, sending its queries for `topdomain` straight
    /// to `server` (port 53), and returns once the tunnel carries data.
    ///
    /// Raw UDP mode is off (`-r`): every packet goes as a DNS query, as it would
    /// through a resolver. Codecs, query type and fragment size are iodine's own
    /// choices (autodetected), as an attacker would run it.
    pub fn connect(ns: &Netns, cgroup: &TestCgroup, server: IpAddr, topdomain: &str) -> Self {
        Self::try_connect(ns, cgroup, server, topdomain, SETUP_TIMEOUT)
            .unwrap_or_else(|log| panic!("iodine did not connect within {SETUP_TIMEOUT:?}:\n{log}"))
    }

    /// [`IodineClient::connect`], returning the client's output instead of
    /// panicking when the tunnel does not come up within `timeout` (e.g.
    /// because the workload was contained during the handshake).
    pub fn try_connect(
        ns: &Netns,
        cgroup: &TestCgroup,
        server: IpAddr,
        topdomain: &str,
        timeout: Duration,
    ) -> Result<Self, String> {
        let ifname = format!("{}i", UniqueId::next().prefix());
        let server = server.to_string();
        let child = ns.spawn(
            Some(cgroup),
            &[
                "iodine",
                "-f",
                "-r",
                "-P",
                IODINE_PASSWORD,
                "-d",
                &ifname,
                &server,
                topdomain,
            ],
        );
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match child.next_line(left) {
                Some(l) if l.starts_with("Connection setup complete") => {
                    return Ok(Self { child, ifname });
                }
                Some(_) => {}
                None => return Err(child.transcript()),
            }
        }
    }

    /// The client's tun interface name.
    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    /// The client's output so far.
    pub fn log(&self) -> String {
        self.child.transcript()
    }
}

/// A running `dns2tcpd` in a namespace, forwarding one resource.
///
/// Its configuration file lives in a per-test temporary directory, removed on `Drop`.
pub struct Dns2tcpServer {
    // Fields drop in order: the process first, then its configuration.
    child: ChildGuard,
    _dir: TempDir,
}

/// A directory removed (with its contents) on `Drop`.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(UniqueId::next().prefix());
        fs::create_dir(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.0) {
            eprintln!("remove {}: {e}", self.0.display());
        }
    }
}

/// The resource name the server offers and the client asks for.
pub const DNS2TCP_RESOURCE: &str = "sink";

impl Dns2tcpServer {
    /// Starts `dns2tcpd` in `ns`, listening on `listen` port 53 for `domain`, forwarding
    /// the resource [`DNS2TCP_RESOURCE`] to `target` (as seen from `ns`).
    pub fn start(ns: &Netns, listen: IpAddr, domain: &str, target: std::net::SocketAddr) -> Self {
        let dir = TempDir::new();
        let config = dir.0.join("dns2tcpd.conf");
        fs::write(
            &config,
            format!(
                "listen = {listen}\nport = 53\ndomain = {domain}\n\
                 resources = {DNS2TCP_RESOURCE}:{}:{}\n",
                target.ip(),
                target.port()
            ),
        )
        .unwrap_or_else(|e| panic!("write {}: {e}", config.display()));
        let config = config.to_string_lossy().into_owned();
        // It prints nothing when it is ready, so readiness is its socket appearing.
        let child = ns.spawn(None, &["dns2tcpd", "-F", "-d", "1", "-f", &config]);
        wait_for_udp_port(ns, listen, 53);
        Self { child, _dir: dir }
    }

    /// The server's output so far.
    pub fn log(&self) -> String {
        self.child.transcript()
    }
}

/// A running `dns2tcpc` in a namespace (and cgroup): a local TCP port whose
/// connections are carried to the server's resource over DNS.
pub struct Dns2tcpClient {
    child: ChildGuard,
    port: u16,
}

impl Dns2tcpClient {
    /// Starts `dns2tcpc` in `ns` and `cgroup`, listening on `127.0.0.1:port`, sending its
    /// queries for `domain` to `server` (TXT queries, dns2tcp's default).
    pub fn start(ns: &Netns, cgroup: &TestCgroup, server: IpAddr, domain: &str, port: u16) -> Self {
        let (server, local) = (server.to_string(), port.to_string());
        let child = ns.spawn(
            Some(cgroup),
            &[
                "dns2tcpc",
                // No ~/.dns2tcprc.
                "-f",
                "/dev/null",
                "-d",
                "1",
                "-z",
                domain,
                "-r",
                DNS2TCP_RESOURCE,
                "-l",
                &local,
                &server,
            ],
        );
        child.wait_for_line(
            "dns2tcpc listening",
            |l| l.starts_with("Listening on port"),
            SETUP_TIMEOUT,
        );
        Self { child, port }
    }

    /// The local port it forwards.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The client's output so far.
    pub fn log(&self) -> String {
        self.child.transcript()
    }
}

/// Waits (bounded) until something in `ns` has bound UDP `addr:port`.
fn wait_for_udp_port(ns: &Netns, addr: IpAddr, port: u16) {
    let want = match addr {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    };
    let deadline = std::time::Instant::now() + SETUP_TIMEOUT;
    loop {
        let out = ns.run_ok(None, &["ss", "-Hlun"]);
        if out.split_whitespace().any(|f| f == want) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "nothing bound UDP {want} in {} within {SETUP_TIMEOUT:?}:\n{out}",
            ns.name()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
