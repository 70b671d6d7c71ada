//! Traffic generators and sinks, and what the kernel should count for them.
//!
//! # What `cgroup_skb/egress` counts
//!
//! At `cgroup_skb/egress` an skb starts at the IP header and `skb->len` is IP header +
//! L4 header + payload. It is seen once per GSO/TSO super-packet and before IP
//! fragmentation, so counts are per *socket write unit*, not per wire packet:
//!
//! * **UDP**: exactly one skb per datagram, `payload + 8 + 20` (IPv4) or
//!   `payload + 8 + 40` (IPv6), also for datagrams larger than the MTU (fragmented
//!   later). See [`expected_udp_bytes`].
//! * **TCP**: the number of skbs depends on timing (GSO coalescing, cwnd), so a test
//!   takes the packet count from the counter and checks the bytes against it: every skb
//!   the client's socket sends carries one IP header and one TCP header, and with Linux
//!   defaults the TCP header is 32 bytes (20 + 12 of timestamp option) on every segment
//!   but the SYN, which is 40 (MSS, SACK-permitted, timestamps, window scale). With
//!   `net.ipv4.tcp_timestamps=0` in the client namespace ([`Netns::sysctl`]) they are 20
//!   and 32. Hence `bytes = payload + packets × (ip + tcp) + syn_extra`; see
//!   [`expected_tcp_bytes`] and [`tcp_payload_from_kernel`]. `payload` there is the
//!   payload that left at the IP level, [`Sent::ip_payload_bytes`]: retransmissions
//!   are real egress skbs, and under CPU load a tail-loss probe or RTO does fire even on
//!   a veth. The senders read it from `TCP_INFO` (`tcpi_bytes_sent`, which the kernel
//!   adds to in `__tcp_transmit_skb`, once per skb, just as the hook sees them). Exact
//!   while: one SYN (a SYN retransmission, after 1 s, would add a second 8/12-byte
//!   larger header), and no SACK blocks (the client receives no data, so it has nothing
//!   to SACK; only a duplicate FIN from the server could cause a D-SACK). The skbs are:
//!   SYN, handshake ACK, data skbs, the client's FIN (alone, or set on the last data
//!   skb) and its ACK of the server's FIN — [`send_tcp`] half-closes and waits for the
//!   server's FIN so that this last ACK leaves from the client's own socket (a TIME_WAIT
//!   socket's ACK would not be attributed to the cgroup). Measured: 0 B → 4 skbs, 216 B
//!   (IPv4); 1 B → 5 skbs, 269 B; 100,000 B → 10 skbs, 100,528 B (IPv4), 100,728 B
//!   (IPv6), 100,412 B / 100,612 B without timestamps; 5,000,000 B → 109–110 skbs.
//!
//! Senders run inside a [`TestCgroup`] and the client namespace; sinks run in the peer
//! namespace. All are small inline `python3` programs: deterministic (one `sendto` per
//! datagram), and needing nothing beyond the interpreter.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    process::ExitStatus,
    time::{Duration, Instant},
};

use crate::{
    cgroup::TestCgroup,
    netns::Netns,
    process::{ChildGuard, DEFAULT_TIMEOUT, python3},
};

/// An IP version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl Family {
    /// The family of `addr`.
    pub fn of(addr: IpAddr) -> Self {
        match addr {
            IpAddr::V4(_) => Self::V4,
            IpAddr::V6(_) => Self::V6,
        }
    }

    /// Length of an IP header without options / extension headers: 20 or 40.
    pub fn ip_header_len(self) -> u64 {
        match self {
            Self::V4 => 20,
            Self::V6 => 40,
        }
    }

    /// The `ip` command's family flag: `-4` or `-6`.
    pub fn ip_flag(self) -> &'static str {
        match self {
            Self::V4 => "-4",
            Self::V6 => "-6",
        }
    }

    /// Prefix length of a single-host route: 32 or 128.
    pub fn host_prefix_len(self) -> u8 {
        match self {
            Self::V4 => 32,
            Self::V6 => 128,
        }
    }
}

/// Length of a UDP header.
pub const UDP_HEADER_LEN: u64 = 8;
/// TCP header without options (`net.ipv4.tcp_timestamps=0`, non-SYN segments).
pub const TCP_HEADER_LEN: u64 = 20;
/// TCP header with the timestamp option (Linux default, non-SYN segments): 20 + 12.
pub const TCP_HEADER_LEN_TIMESTAMPS: u64 = 32;

/// Whether the client namespace negotiates TCP timestamps (`net.ipv4.tcp_timestamps`,
/// default on; the server side is Linux too, so it always agrees).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcpTimestamps {
    /// Default: every segment carries a 12-byte timestamp option.
    On,
    /// `net.ipv4.tcp_timestamps=0` set in the client namespace.
    Off,
}

impl TcpTimestamps {
    /// TCP header length of every non-SYN segment the client sends.
    pub fn header_len(self) -> u64 {
        match self {
            Self::On => TCP_HEADER_LEN_TIMESTAMPS,
            Self::Off => TCP_HEADER_LEN,
        }
    }

    /// How much longer the SYN's header is than [`TcpTimestamps::header_len`].
    ///
    /// Linux's SYN options: MSS (4) + SACK-permitted and timestamps (2 + 10, or 2 NOPs +
    /// 2 without timestamps) + NOP + window scale (3): 20 bytes with timestamps (header
    /// 40), 12 without (header 32).
    pub fn syn_extra(self) -> u64 {
        match self {
            Self::On => 40 - TCP_HEADER_LEN_TIMESTAMPS,
            Self::Off => 32 - TCP_HEADER_LEN,
        }
    }
}

/// Bytes `cgroup_skb/egress` counts for `datagrams` UDP datagrams of `payload` bytes.
pub fn expected_udp_bytes(family: Family, datagrams: u64, payload: u64) -> u64 {
    datagrams * (payload + UDP_HEADER_LEN + family.ip_header_len())
}

/// Bytes `cgroup_skb/egress` counts for one client TCP connection (handshake included)
/// whose skbs carried `ip_payload` bytes ([`Sent::ip_payload_bytes`]) in `packets` skbs,
/// as [`send_tcp`] drives it.
pub fn expected_tcp_bytes(
    family: Family,
    ip_payload: u64,
    packets: u64,
    timestamps: TcpTimestamps,
) -> u64 {
    ip_payload
        + packets * (family.ip_header_len() + timestamps.header_len())
        + timestamps.syn_extra()
}

/// The IP-level payload (retransmissions included, compare with
/// [`Sent::ip_payload_bytes`]) one client TCP connection carried, recovered from what the
/// kernel counted (`bytes` in `packets` skbs); the inverse of [`expected_tcp_bytes`].
/// Saturates at 0 if `bytes` is too small to be such a connection.
pub fn tcp_payload_from_kernel(
    bytes: u64,
    packets: u64,
    family: Family,
    timestamps: TcpTimestamps,
) -> u64 {
    bytes
        .saturating_sub(packets * (family.ip_header_len() + timestamps.header_len()))
        .saturating_sub(timestamps.syn_extra())
}

/// What a sender reports it handed to the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sent {
    /// Datagrams sent (UDP) or connections made (TCP).
    pub units: u64,
    /// Payload bytes the program wrote to the socket(s).
    pub payload_bytes: u64,
    /// TCP only: payload bytes the kernel sent again (`tcpi_bytes_retrans`). On a
    /// lossless veth this is normally 0, but under CPU load a tail-loss probe or an RTO
    /// fires before the (delayed) ACK is processed, and the resent skb is counted at
    /// egress like any other. Measured under load: one extra skb of 844 B, 1108 B or a
    /// whole 65108 B GSO packet.
    pub retransmitted_bytes: u64,
    /// TCP only: segments retransmitted (`tcpi_total_retrans`), SYNs included.
    pub retransmitted_segments: u64,
}

impl Sent {
    /// Payload bytes that left at the IP level: written once, plus resent
    /// (`tcpi_bytes_sent` for TCP). This is what the egress hook's payload sums to.
    pub fn ip_payload_bytes(&self) -> u64 {
        self.payload_bytes + self.retransmitted_bytes
    }
}

/// A sender that failed: how, and what it said. `EPERM` from `sendto` and connect
/// timeouts are what a blocking policy looks like.
#[derive(Debug)]
pub struct SendError {
    /// The sender's exit status.
    pub status: ExitStatus,
    /// Its stderr, e.g. `PermissionError errno=1 [Errno 1] Operation not permitted`.
    pub stderr: String,
}

impl SendError {
    /// The `errno` the sender reported, if it got that far.
    pub fn errno(&self) -> Option<i32> {
        let rest = self.stderr.split("errno=").nth(1)?;
        rest.split_whitespace().next()?.parse().ok()
    }
}

impl fmt::Display for SendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sender {}: {}", self.status, self.stderr.trim())
    }
}

impl std::error::Error for SendError {}

/// Failure messages carry `errno=N` so tests can assert on the cause.
const PY_PRELUDE: &str = r#"
import socket, struct, sys
def fail(e):
    print(f"{type(e).__name__} errno={getattr(e, 'errno', None)} {e}", file=sys.stderr, flush=True)
    sys.exit(3)
def family(host):
    return socket.AF_INET6 if ":" in host else socket.AF_INET
"#;

const PY_UDP_SEND: &str = r#"
host, port, count, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
try:
    s = socket.socket(family(host), socket.SOCK_DGRAM)
    payload = b"x" * size
    for _ in range(count):
        if s.sendto(payload, (host, port)) != size:
            raise OSError("short datagram")
except OSError as e:
    fail(e)
print(count * size, flush=True)
"#;

const PY_UDP_SINK: &str = r#"
host, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(family(host), socket.SOCK_DGRAM)
s.bind((host, port))
print("ready", flush=True)
while True:
    data, _ = s.recvfrom(65535)
    print(f"datagram {len(data)}", flush=True)
"#;

const PY_TCP_SEND: &str = r#"
host, port, total, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
try:
    s = socket.socket(family(host), socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect((host, port))
    chunk = b"x" * 65536
    left = total
    while left > 0:
        n = min(left, len(chunk))
        s.sendall(chunk[:n])
        left -= n
    # Half-close, then wait for the server's FIN: the ACK of it then leaves from this
    # (full) socket, so every client packet is attributed to our cgroup.
    s.shutdown(socket.SHUT_WR)
    while s.recv(65536):
        pass
    # Everything we sent, FIN included, is acknowledged now (the server's FIN acks it),
    # so these totals are final. struct tcp_info (linux/tcp.h): tcpi_total_retrans at
    # 100 (u32), tcpi_bytes_sent at 200 and tcpi_bytes_retrans at 208 (u64, Linux 4.19+).
    info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 232)
    if len(info) < 216:
        raise OSError(f"TCP_INFO too short ({len(info)} bytes) for tcpi_bytes_sent")
    (retrans_segs,) = struct.unpack_from("<I", info, 100)
    bytes_sent, bytes_retrans = struct.unpack_from("<QQ", info, 200)
    s.close()
except OSError as e:
    fail(e)
print(total, bytes_sent, bytes_retrans, retrans_segs, flush=True)
"#;

const PY_TCP_SINK: &str = r#"
host, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(family(host), socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, port))
s.listen(16)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    n = 0
    while True:
        data = c.recv(262144)
        if not data:
            break
        n += len(data)
    c.close()
    print(f"connection {n}", flush=True)
"#;

fn script(body: &str) -> String {
    format!("{PY_PRELUDE}{body}")
}

/// How long a sink waits for its "ready" line (python start + bind).
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Parses what a sender prints on success: the payload byte count, for TCP followed by
/// `tcpi_bytes_sent tcpi_bytes_retrans tcpi_total_retrans`.
fn parse_sent(stdout: &[u8], units: u64) -> Sent {
    let text = String::from_utf8_lossy(stdout);
    let fields: Vec<u64> = text
        .split_whitespace()
        .map(|f| {
            f.parse()
                .unwrap_or_else(|e| panic!("sender printed {text:?}, not byte counts: {e}"))
        })
        .collect();
    match fields[..] {
        [payload_bytes] => Sent {
            units,
            payload_bytes,
            retransmitted_bytes: 0,
            retransmitted_segments: 0,
        },
        [
            payload_bytes,
            bytes_sent,
            retransmitted_bytes,
            retransmitted_segments,
        ] => {
            assert_eq!(
                bytes_sent,
                payload_bytes + retransmitted_bytes,
                "tcpi_bytes_sent is not payload + tcpi_bytes_retrans: {text:?}"
            );
            Sent {
                units,
                payload_bytes,
                retransmitted_bytes,
                retransmitted_segments,
            }
        }
        _ => panic!("sender printed {text:?}, not 1 or 4 byte counts"),
    }
}

/// Sends `datagrams` UDP datagrams of `payload` bytes each to `dst`, from inside `cg`
/// and `ns`; `Err` if a `sendto` fails (e.g. `EPERM` when a policy drops the packet).
pub fn try_send_udp(
    ns: &Netns,
    cg: &TestCgroup,
    dst: SocketAddr,
    datagrams: u64,
    payload: usize,
) -> Result<Sent, SendError> {
    let (host, port) = (dst.ip().to_string(), dst.port().to_string());
    let (count, size) = (datagrams.to_string(), payload.to_string());
    let script = script(PY_UDP_SEND);
    let out = ns.output(
        Some(cg),
        &[python3(), "-c", &script, &host, &port, &count, &size],
        DEFAULT_TIMEOUT,
    );
    if !out.status.success() {
        return Err(SendError {
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(parse_sent(&out.stdout, datagrams))
}

/// [`try_send_udp`], panicking with the sender's message on failure.
pub fn send_udp(
    ns: &Netns,
    cg: &TestCgroup,
    dst: SocketAddr,
    datagrams: u64,
    payload: usize,
) -> Sent {
    try_send_udp(ns, cg, dst, datagrams, payload)
        .unwrap_or_else(|e| panic!("send {datagrams}×{payload} B UDP to {dst}: {e}"))
}

/// Sends `bytes` over one TCP connection to `dst` from inside `cg` and `ns`, half-closes
/// and waits for the server to close; `timeout` bounds the connect and each send/recv.
/// `Err` on any socket error (a dropped SYN shows up as a connect timeout).
pub fn try_send_tcp(
    ns: &Netns,
    cg: &TestCgroup,
    dst: SocketAddr,
    bytes: u64,
    timeout: Duration,
) -> Result<Sent, SendError> {
    let (host, port) = (dst.ip().to_string(), dst.port().to_string());
    let (total, secs) = (bytes.to_string(), timeout.as_secs_f64().to_string());
    let script = script(PY_TCP_SEND);
    let out = ns.output(
        Some(cg),
        &[python3(), "-c", &script, &host, &port, &total, &secs],
        DEFAULT_TIMEOUT + timeout,
    );
    if !out.status.success() {
        return Err(SendError {
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(parse_sent(&out.stdout, 1))
}

/// [`try_send_tcp`] with a 10 s timeout, panicking with the sender's message on failure.
pub fn send_tcp(ns: &Netns, cg: &TestCgroup, dst: SocketAddr, bytes: u64) -> Sent {
    try_send_tcp(ns, cg, dst, bytes, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("send {bytes} B over TCP to {dst}: {e}"))
}

/// What a sink received.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Received {
    /// Datagrams (UDP) or completed connections (TCP).
    pub units: u64,
    /// Payload bytes.
    pub payload_bytes: u64,
}

/// Collects `"<tag> <bytes>"` lines from a sink until `expected` units or the deadline.
fn collect(child: &ChildGuard, tag: &str, expected: u64, timeout: Duration) -> Received {
    let deadline = Instant::now() + timeout;
    let mut got = Received::default();
    while got.units < expected {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let Some(line) = child.next_line(left) else {
            break;
        };
        if let Some(n) = line
            .strip_prefix(tag)
            .and_then(|n| n.trim().parse::<u64>().ok())
        {
            got.units += 1;
            got.payload_bytes += n;
        }
    }
    got
}

/// A UDP receiver in a namespace, bound to one address; killed on `Drop`.
pub struct UdpSink {
    child: ChildGuard,
    addr: SocketAddr,
}

impl UdpSink {
    /// Binds `addr` inside `ns` and returns once the socket is bound.
    pub fn start(ns: &Netns, addr: SocketAddr) -> Self {
        let (host, port) = (addr.ip().to_string(), addr.port().to_string());
        let script = script(PY_UDP_SINK);
        let child = ns.spawn(None, &[python3(), "-c", &script, &host, &port]);
        child.wait_for_line("ready", |l| l == "ready", READY_TIMEOUT);
        Self { child, addr }
    }

    /// The bound address, to send to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Datagrams received since the last call, waiting until `expected` arrived or
    /// `timeout` passed, and returning what arrived. To check that nothing arrives, ask
    /// for 1 and expect 0 units back after `timeout`.
    pub fn collect(&self, expected: u64, timeout: Duration) -> Received {
        collect(&self.child, "datagram", expected, timeout)
    }

    /// The sink's process guard (PID, transcript).
    pub fn child(&self) -> &ChildGuard {
        &self.child
    }
}

/// A TCP server in a namespace that reads each connection to EOF, then closes it;
/// killed on `Drop`.
pub struct TcpSink {
    child: ChildGuard,
    addr: SocketAddr,
}

impl TcpSink {
    /// Listens on `addr` inside `ns` and returns once it is listening.
    pub fn start(ns: &Netns, addr: SocketAddr) -> Self {
        let (host, port) = (addr.ip().to_string(), addr.port().to_string());
        let script = script(PY_TCP_SINK);
        let child = ns.spawn(None, &[python3(), "-c", &script, &host, &port]);
        child.wait_for_line("ready", |l| l == "ready", READY_TIMEOUT);
        Self { child, addr }
    }

    /// The listening address, to connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections completed since the last call, waiting until `expected` completed or
    /// `timeout` passed.
    pub fn collect(&self, expected: u64, timeout: Duration) -> Received {
        collect(&self.child, "connection", expected, timeout)
    }

    /// The server's process guard (PID, transcript).
    pub fn child(&self) -> &ChildGuard {
        &self.child
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn udp_bytes_match_measured() {
        // TOOLCHAIN.md: 3 × 200 B over IPv4 counted as 684 B.
        assert_eq!(expected_udp_bytes(Family::V4, 3, 200), 684);
        assert_eq!(expected_udp_bytes(Family::V6, 3, 200), 744);
    }

    #[test]
    fn tcp_bytes_match_measured() {
        // TOOLCHAIN.md: 100,000 B over IPv4 counted as 100,528 B in 10 skbs.
        let bytes = expected_tcp_bytes(Family::V4, 100_000, 10, TcpTimestamps::On);
        assert_eq!(bytes, 100_528);
        assert_eq!(
            tcp_payload_from_kernel(bytes, 10, Family::V4, TcpTimestamps::On),
            100_000
        );
    }

    #[test]
    fn syn_headers() {
        assert_eq!(
            TcpTimestamps::On.header_len() + TcpTimestamps::On.syn_extra(),
            40
        );
        assert_eq!(
            TcpTimestamps::Off.header_len() + TcpTimestamps::Off.syn_extra(),
            32
        );
    }

    #[test]
    fn send_error_errno() {
        let status = std::process::Command::new("false").status().unwrap();
        let e = SendError {
            status,
            stderr: "PermissionError errno=1 [Errno 1] Operation not permitted\n".into(),
        };
        assert_eq!(e.errno(), Some(1));
    }
}
