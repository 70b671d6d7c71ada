//! Records from the kernel's event ring buffer: DNS payloads and hard-cap
//! notices. Each record is checked for kind and length before it is read, so
//! a malformed one is an error for that record only.
use std::net::{IpAddr, SocketAddr};

use exfilguard_common::{
    CapEvent, DNS_MAX_PAYLOAD, DnsEventHeader, direction, event_kind, proto as ipproto,
};

use crate::cidr;

/// Why a record could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    /// Empty record.
    #[error("empty event record")]
    Empty,
    /// Unknown kind byte.
    #[error("unknown event kind {0}")]
    UnknownKind(u8),
    /// Shorter than its kind requires.
    #[error("event record of kind {kind} is {len} bytes, needs {need}")]
    Short {
        /// Kind byte.
        kind: u8,
        /// Bytes present.
        len: usize,
        /// Bytes needed.
        need: usize,
    },
    /// A header field out of range.
    #[error("DNS event field {field} is invalid: {value}")]
    Invalid {
        /// Field name.
        field: &'static str,
        /// Its value.
        value: u64,
    },
}

/// Whether a DNS payload was sent (a query) or received (an answer).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DnsDirection {
    /// Sent by the cgroup.
    Query,
    /// Received by the cgroup.
    Answer,
}

/// A DNS payload seen by the kernel. Parsing the DNS message itself is the
/// detectors' job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsRecord {
    /// Query or answer.
    pub direction: DnsDirection,
    /// True for TCP (the payload then starts with the two-byte length prefix).
    pub tcp: bool,
    /// The cgroup that sent or received it.
    pub cgroup_id: u64,
    /// `CLOCK_MONOTONIC` ns.
    pub timestamp_ns: u64,
    /// The DNS server (remote end).
    pub server: SocketAddr,
    /// The client socket's port.
    pub client_port: u16,
    /// L4 payload length in the packet; more than `payload.len()` when truncated.
    pub orig_len: usize,
    /// The captured L4 payload (at most [`DNS_MAX_PAYLOAD`] bytes).
    pub payload: Vec<u8>,
}

impl DnsRecord {
    /// True when the packet's payload was longer than what was captured.
    pub fn truncated(&self) -> bool {
        self.orig_len > self.payload.len()
    }
}

/// A cgroup spent its hard cap; the kernel now drops its external egress
/// until the window ends. Sent once per CPU and window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CapNotice {
    /// The capped cgroup.
    pub cgroup_id: u64,
    /// Index of the spent window.
    pub window: u64,
    /// The budget in force.
    pub budget_bytes: u64,
    /// Bytes let through in the window when the first packet was dropped.
    pub spent_bytes: u64,
    /// `CLOCK_MONOTONIC` ns of that drop.
    pub timestamp_ns: u64,
}

/// One record of the ring buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A DNS query or answer.
    Dns(DnsRecord),
    /// A hard cap was spent.
    Cap(CapNotice),
}

fn read<T: Copy>(bytes: &[u8]) -> T {
    debug_assert!(bytes.len() >= size_of::<T>());
    // SAFETY: the caller checked the length; T is a plain repr(C) type valid
    // for any bit pattern; read_unaligned copes with the ring's alignment.
    unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) }
}

/// Parses one ring-buffer record.
pub fn parse(bytes: &[u8]) -> Result<Event, EventError> {
    let kind = *bytes.first().ok_or(EventError::Empty)?;
    let need = match kind {
        event_kind::DNS => size_of::<DnsEventHeader>(),
        event_kind::CAP => size_of::<CapEvent>(),
        other => return Err(EventError::UnknownKind(other)),
    };
    if bytes.len() < need {
        return Err(EventError::Short {
            kind,
            len: bytes.len(),
            need,
        });
    }
    if kind == event_kind::CAP {
        let ev: CapEvent = read(bytes);
        return Ok(Event::Cap(CapNotice {
            cgroup_id: ev.cgroup_id,
            window: ev.window,
            budget_bytes: ev.budget_bytes,
            spent_bytes: ev.spent_bytes,
            timestamp_ns: ev.timestamp_ns,
        }));
    }
    let h: DnsEventHeader = read(bytes);
    let captured = usize::from(h.captured_len);
    if captured > DNS_MAX_PAYLOAD {
        return Err(EventError::Invalid {
            field: "captured_len",
            value: captured as u64,
        });
    }
    let body = &bytes[need..];
    if body.len() < captured {
        return Err(EventError::Short {
            kind,
            len: bytes.len(),
            need: need + captured,
        });
    }
    let direction = match h.direction {
        direction::EGRESS => DnsDirection::Query,
        direction::INGRESS => DnsDirection::Answer,
        other => {
            return Err(EventError::Invalid {
                field: "direction",
                value: u64::from(other),
            });
        }
    };
    let tcp = match h.proto {
        ipproto::TCP => true,
        ipproto::UDP => false,
        other => {
            return Err(EventError::Invalid {
                field: "proto",
                value: u64::from(other),
            });
        }
    };
    let server: IpAddr = cidr::addr_from_bytes(h.server);
    Ok(Event::Dns(DnsRecord {
        direction,
        tcp,
        cgroup_id: h.cgroup_id,
        timestamp_ns: h.timestamp_ns,
        server: SocketAddr::new(server, h.server_port),
        client_port: h.client_port,
        orig_len: usize::from(h.orig_len),
        payload: body[..captured].to_vec(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn as_bytes<T: Copy>(v: &T) -> Vec<u8> {
        // SAFETY: T is a padding-free repr(C) type.
        unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
    }

    fn dns_header(captured: u16) -> DnsEventHeader {
        DnsEventHeader {
            kind: event_kind::DNS,
            direction: direction::EGRESS,
            proto: ipproto::UDP,
            family: 4,
            captured_len: captured,
            orig_len: captured,
            cgroup_id: 42,
            timestamp_ns: 7,
            server: cidr::addr_bytes("10.0.0.53".parse().unwrap()),
            server_port: 53,
            client_port: 40000,
            _pad: [0; 4],
        }
    }

    #[test]
    fn dns_record_parses() {
        let mut bytes = as_bytes(&dns_header(3));
        bytes.extend_from_slice(&[1, 2, 3]);
        bytes.resize(size_of::<exfilguard_common::DnsEvent>(), 0xee);
        let Event::Dns(r) = parse(&bytes).unwrap() else {
            panic!("not DNS")
        };
        assert_eq!(r.payload, vec![1, 2, 3]);
        assert_eq!(r.server, "10.0.0.53:53".parse().unwrap());
        assert_eq!((r.cgroup_id, r.client_port, r.tcp), (42, 40000, false));
        assert_eq!(r.direction, DnsDirection::Query);
        assert!(!r.truncated());
    }

    #[test]
    fn malformed_records_are_errors_not_panics() {
        assert_eq!(parse(&[]), Err(EventError::Empty));
        assert_eq!(parse(&[9, 0, 0]), Err(EventError::UnknownKind(9)));
        assert!(matches!(
            parse(&[event_kind::DNS; 10]),
            Err(EventError::Short { .. })
        ));
        assert!(matches!(
            parse(&[event_kind::CAP; 10]),
            Err(EventError::Short { .. })
        ));
        // Claims more payload than the record holds.
        let bytes = as_bytes(&dns_header(100));
        assert!(matches!(parse(&bytes), Err(EventError::Short { .. })));
        // Claims more than the kernel can capture.
        let mut bytes = as_bytes(&dns_header(DNS_MAX_PAYLOAD as u16 + 1));
        bytes.resize(2000, 0);
        assert!(matches!(parse(&bytes), Err(EventError::Invalid { .. })));
        let mut h = dns_header(0);
        h.direction = 9;
        assert!(matches!(
            parse(&as_bytes(&h)),
            Err(EventError::Invalid {
                field: "direction",
                ..
            })
        ));
        // Every prefix of a valid record: error or the record, never a panic.
        let mut full = as_bytes(&dns_header(5));
        full.extend_from_slice(b"hello");
        for n in 0..=full.len() {
            let _ = parse(&full[..n]);
        }
    }

    #[test]
    fn cap_notice_parses() {
        let ev = CapEvent {
            kind: event_kind::CAP,
            _pad: [0; 7],
            cgroup_id: 5,
            window: 2,
            budget_bytes: 1000,
            spent_bytes: 990,
            timestamp_ns: 11,
        };
        assert_eq!(
            parse(&as_bytes(&ev)),
            Ok(Event::Cap(CapNotice {
                cgroup_id: 5,
                window: 2,
                budget_bytes: 1000,
                spent_bytes: 990,
                timestamp_ns: 11
            }))
        );
    }
}
