//! Reading pcap and pcapng files with `pcap-file`, record by record, so a
//! damaged file yields everything before the damage and the offset of it.
use pcap_file::{
    DataLink, PcapError,
    pcap::PcapParser,
    pcapng::{Block, PcapNgParser, blocks::interface_description::InterfaceDescriptionOption},
};

/// Why a capture could not be read (to the end).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CaptureError {
    /// Neither pcap nor pcapng magic.
    #[error("not a pcap or pcapng capture (first bytes {0:02x?})")]
    NotACapture(Vec<u8>),
    /// The file ends inside a record.
    #[error("capture truncated at offset {offset}: {what} is incomplete")]
    Truncated {
        /// Byte offset of the incomplete record.
        offset: usize,
        /// Which record.
        what: &'static str,
    },
    /// A record is malformed.
    #[error("capture corrupt at offset {offset}: {problem}")]
    Corrupt {
        /// Byte offset of the bad record.
        offset: usize,
        /// What is wrong.
        problem: String,
    },
}

fn err(offset: usize, what: &'static str, e: PcapError) -> CaptureError {
    match e {
        PcapError::IncompleteBuffer => CaptureError::Truncated { offset, what },
        other => CaptureError::Corrupt {
            offset,
            problem: format!("{what}: {other}"),
        },
    }
}

const PCAP_MAGICS: [[u8; 4]; 4] = [
    [0xd4, 0xc3, 0xb2, 0xa1],
    [0xa1, 0xb2, 0xc3, 0xd4],
    [0x4d, 0x3c, 0xb2, 0xa1],
    [0xa1, 0xb2, 0x3c, 0x4d],
];
const PCAPNG_MAGIC: [u8; 4] = [0x0a, 0x0d, 0x0d, 0x0a];

/// Calls `frame(link type, Unix ns, bytes)` for every packet. Returns the
/// number of packets, or the error that stopped reading (after calling
/// `frame` for every packet before it).
pub fn read_capture(
    bytes: &[u8],
    mut frame: impl FnMut(DataLink, u64, &[u8]),
) -> Result<u64, CaptureError> {
    let magic: [u8; 4] = bytes
        .get(..4)
        .and_then(|m| m.try_into().ok())
        .ok_or_else(|| CaptureError::NotACapture(bytes.to_vec()))?;
    if PCAP_MAGICS.contains(&magic) {
        read_pcap(bytes, &mut frame)
    } else if magic == PCAPNG_MAGIC {
        read_pcapng(bytes, &mut frame)
    } else {
        Err(CaptureError::NotACapture(magic.to_vec()))
    }
}

fn read_pcap(
    bytes: &[u8],
    frame: &mut impl FnMut(DataLink, u64, &[u8]),
) -> Result<u64, CaptureError> {
    let (mut rest, parser) = PcapParser::new(bytes).map_err(|e| err(0, "file header", e))?;
    let link = parser.header().datalink;
    let mut n = 0;
    while !rest.is_empty() {
        let offset = bytes.len() - rest.len();
        let (next, pkt) = parser
            .next_packet(rest)
            .map_err(|e| err(offset, "packet record", e))?;
        frame(link, pkt.timestamp.as_nanos() as u64, &pkt.data);
        n += 1;
        rest = next;
    }
    Ok(n)
}

fn read_pcapng(
    bytes: &[u8],
    frame: &mut impl FnMut(DataLink, u64, &[u8]),
) -> Result<u64, CaptureError> {
    let (mut rest, mut parser) =
        PcapNgParser::new(bytes).map_err(|e| err(0, "section header block", e))?;
    // Per interface: link type and timestamp units per second.
    let mut ifaces: Vec<(DataLink, u64)> = Vec::new();
    let mut n = 0;
    while !rest.is_empty() {
        let offset = bytes.len() - rest.len();
        let (next, block) = parser
            .next_block(rest)
            .map_err(|e| err(offset, "block", e))?;
        match block {
            Block::SectionHeader(_) => ifaces.clear(),
            Block::InterfaceDescription(idb) => {
                let mut per_sec = 1_000_000;
                for o in &idb.options {
                    if let InterfaceDescriptionOption::IfTsResol(r) = o {
                        per_sec = ts_units(*r).ok_or_else(|| CaptureError::Corrupt {
                            offset,
                            problem: format!(
                                "interface timestamp resolution {r:#x} is out of range"
                            ),
                        })?;
                    }
                }
                ifaces.push((idb.linktype, per_sec));
            }
            Block::EnhancedPacket(epb) => {
                let &(link, per_sec) =
                    ifaces
                        .get(epb.interface_id as usize)
                        .ok_or_else(|| CaptureError::Corrupt {
                            offset,
                            problem: format!(
                                "packet names interface {} which was not described",
                                epb.interface_id
                            ),
                        })?;
                // pcap-file hands the raw 64-bit stamp over as nanoseconds;
                // it is in the interface's units.
                let raw = epb.timestamp.as_nanos() as u64;
                let ns = (u128::from(raw) * 1_000_000_000 / u128::from(per_sec)) as u64;
                frame(link, ns, &epb.data);
                n += 1;
            }
            Block::SimplePacket(spb) => {
                let link = ifaces.first().map_or(DataLink::ETHERNET, |i| i.0);
                frame(link, 0, &spb.data);
                n += 1;
            }
            _ => {}
        }
        rest = next;
    }
    Ok(n)
}

/// Units per second of an `if_tsresol` value: 10^r, or 2^r with the top bit.
fn ts_units(r: u8) -> Option<u64> {
    if r & 0x80 == 0 {
        10u64
            .checked_pow(u32::from(r))
            .filter(|&u| u <= 1_000_000_000_000)
    } else {
        1u64.checked_shl(u32::from(r & 0x7f))
            .filter(|&u| u <= 1 << 40)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pcap_file::{
        pcap::{PcapHeader, PcapPacket, PcapWriter},
        pcapng::{
            PcapNgWriter,
            blocks::{
                enhanced_packet::EnhancedPacketBlock,
                interface_description::InterfaceDescriptionBlock,
            },
        },
    };
    use std::{borrow::Cow, time::Duration};

    fn pcap(n: usize) -> Vec<u8> {
        let header = PcapHeader {
            datalink: DataLink::RAW,
            ..Default::default()
        };
        let mut w = PcapWriter::with_header(Vec::new(), header).unwrap();
        for i in 0..n {
            let data = vec![0x45u8; 20 + i];
            w.write_packet(&PcapPacket::new(
                Duration::from_secs(100 + i as u64),
                data.len() as u32,
                &data,
            ))
            .unwrap();
        }
        w.into_writer()
    }

    #[test]
    fn pcap_reads_all_and_reports_truncation_offset() {
        let bytes = pcap(3);
        let mut seen = Vec::new();
        assert_eq!(
            read_capture(&bytes, |l, t, d| seen.push((l, t, d.len()))),
            Ok(3)
        );
        assert_eq!(seen[1], (DataLink::RAW, 101_000_000_000, 21));
        // Cut inside the third record: two packets, then the error at the
        // third record's offset (24-byte header, 16-byte record headers).
        let third = 24 + (16 + 20) + (16 + 21);
        let mut seen = 0;
        let e = read_capture(&bytes[..bytes.len() - 3], |_, _, _| seen += 1).unwrap_err();
        assert_eq!(seen, 2);
        assert_eq!(
            e,
            CaptureError::Truncated {
                offset: third,
                what: "packet record"
            }
        );
        assert!(e.to_string().contains(&format!("offset {third}")));
    }

    #[test]
    fn pcapng_timestamps_use_interface_resolution() {
        let mut w = PcapNgWriter::new(Vec::new()).unwrap();
        w.write_pcapng_block(InterfaceDescriptionBlock {
            linktype: DataLink::RAW,
            snaplen: 0,
            options: vec![],
        })
        .unwrap();
        // Default resolution is microseconds: the writer's "nanos" are µs.
        w.write_pcapng_block(EnhancedPacketBlock {
            interface_id: 0,
            timestamp: Duration::from_nanos(5_000_000),
            original_len: 20,
            data: Cow::Borrowed(&[0x45; 20]),
            options: vec![],
        })
        .unwrap();
        let bytes = w.into_inner();
        let mut ts = Vec::new();
        assert_eq!(read_capture(&bytes, |_, t, _| ts.push(t)), Ok(1));
        assert_eq!(ts, vec![5_000_000_000]);
        let e = read_capture(&bytes[..bytes.len() - 1], |_, _, _| {}).unwrap_err();
        assert!(matches!(e, CaptureError::Truncated { .. }), "{e}");
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(matches!(
            read_capture(b"", |_, _, _| {}),
            Err(CaptureError::NotACapture(_))
        ));
        assert!(matches!(
            read_capture(b"hello world", |_, _, _| {}),
            Err(CaptureError::NotACapture(_))
        ));
        // Valid magic, then nonsense, at every length: an error, never a panic.
        let good = pcap(2);
        for n in 0..good.len() {
            let _ = read_capture(&good[..n], |_, _, _| {});
        }
        let mut bad = good.clone();
        bad[24 + 8..24 + 12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(read_capture(&bad, |_, _, _| {}).is_err());
    }
}
