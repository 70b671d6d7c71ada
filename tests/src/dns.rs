//! A small authoritative DNS server for a lab's peer namespace, and `dig` to query it.
//!
//! The server is `dnsmasq` (Debian package `dnsmasq-base`: the binary without a system
//! service) answering only from the records given, on one address, UDP and TCP port 53,
//! with no upstream (`--no-resolv`): names outside the records get REFUSED, so nothing is
//! ever forwarded out of the lab.

use std::{net::IpAddr, time::Duration};

use crate::{
    cgroup::TestCgroup,
    netns::Netns,
    process::{ChildGuard, DEFAULT_TIMEOUT},
};

/// One answer the server gives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DnsRecord {
    /// `domain` *and every name below it* resolve to `addr` (A or AAAA by its family);
    /// the other family gets an empty answer. Good for tunnel-like query streams
    /// (`<random>.t.example.test`).
    Address {
        /// The domain, e.g. `example.test`.
        domain: String,
        /// The answer.
        addr: IpAddr,
    },
    /// A TXT record for exactly `name`.
    Txt {
        /// The owner name.
        name: String,
        /// The text (dnsmasq splits it into 255-byte strings).
        text: String,
    },
}

impl DnsRecord {
    /// `domain` and its subdomains resolve to `addr`.
    pub fn address(domain: &str, addr: IpAddr) -> Self {
        Self::Address {
            domain: domain.into(),
            addr,
        }
    }

    /// A TXT record.
    pub fn txt(name: &str, text: &str) -> Self {
        Self::Txt {
            name: name.into(),
            text: text.into(),
        }
    }

    fn to_arg(&self) -> String {
        match self {
            Self::Address { domain, addr } => format!("--address=/{domain}/{addr}"),
            Self::Txt { name, text } => format!("--txt-record={name},{text}"),
        }
    }
}

/// How long to wait for dnsmasq to report that it started.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A running dnsmasq bound to one address in a namespace; killed on `Drop`.
///
/// Queries are logged (`query[A] name from addr`) in [`DnsServer::log`].
pub struct DnsServer {
    child: ChildGuard,
    addr: IpAddr,
}

impl DnsServer {
    /// Starts dnsmasq in `ns`, listening on `listen` port 53 (UDP and TCP), answering
    /// `records`; returns once it is serving.
    pub fn start(ns: &Netns, listen: IpAddr, records: &[DnsRecord]) -> Self {
        let listen_arg = format!("--listen-address={listen}");
        let records: Vec<String> = records.iter().map(DnsRecord::to_arg).collect();
        let mut argv = vec![
            "dnsmasq",
            // Foreground, so the guard's PID is the server's and it can be killed.
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            // No pid file, no /etc/hosts, no upstream servers, no resolv.conf polling.
            "--pid-file=",
            "--no-hosts",
            "--no-resolv",
            "--no-poll",
            // Only the given address (not lo, not 0.0.0.0).
            "--bind-interfaces",
            &listen_arg,
            "--port=53",
            // Answer identically every time; nothing cached between queries.
            "--cache-size=0",
            "--log-queries",
            "--log-facility=-",
        ];
        argv.extend(records.iter().map(String::as_str));
        let child = ns.spawn(None, &argv);
        // dnsmasq binds its sockets before it logs "started".
        child.wait_for_line(
            "dnsmasq: started",
            |l| l.contains("started, version"),
            START_TIMEOUT,
        );
        Self {
            child,
            addr: listen,
        }
    }

    /// The address it listens on.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The server's log so far (queries it saw, errors).
    pub fn log(&self) -> String {
        self.child.transcript()
    }
}

/// Transport for a [`dig`] query.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// UDP (dig's default).
    Udp,
    /// TCP (`+tcp`).
    Tcp,
}

/// Runs `dig +tries=1 +time=2 @server name qtype [+tcp]` in `ns` (and in `cgroup`) and
/// returns its stdout, whatever the outcome (a timeout shows as
/// `;; connection timed out` with a non-zero exit, which is what a block looks like).
pub fn dig(
    ns: &Netns,
    cgroup: Option<&TestCgroup>,
    server: IpAddr,
    name: &str,
    qtype: &str,
    transport: Transport,
) -> String {
    let at = format!("@{server}");
    let mut argv = vec!["dig", "+tries=1", "+time=2", &at, name, qtype];
    if transport == Transport::Tcp {
        argv.push("+tcp");
    }
    let out = ns.output(cgroup, &argv, DEFAULT_TIMEOUT);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Just the answers of a query (`dig +short`), one per line; panics if dig fails.
pub fn dig_short(
    ns: &Netns,
    cgroup: Option<&TestCgroup>,
    server: IpAddr,
    name: &str,
    qtype: &str,
    transport: Transport,
) -> Vec<String> {
    let at = format!("@{server}");
    let mut argv = vec!["dig", "+short", "+tries=1", "+time=2", &at, name, qtype];
    if transport == Transport::Tcp {
        argv.push("+tcp");
    }
    ns.run_ok(cgroup, &argv)
        .lines()
        .map(str::to_owned)
        .collect()
}
