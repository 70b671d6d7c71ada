//! CIDRs as the kernel's LPM tries key them: IPv4 as IPv4-mapped IPv6, so one
//! trie serves both families.
use std::net::{IpAddr, Ipv6Addr};

use exfilguard_common::{AddrKey, BLOCK_CGROUP_BITS, BlockCidrKey, V4_MAPPED_BITS};
pub use ipnet::IpNet;

/// The 16-byte form the kernel stores: IPv4 mapped into `::ffff:0:0/96`.
pub fn addr_bytes(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The address a 16-byte kernel form stands for (IPv4-mapped back to IPv4).
pub fn addr_from_bytes(bytes: [u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(bytes);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// Prefix length and address bytes of `net` in the 128-bit mapped space.
fn mapped(net: IpNet) -> (u32, [u8; 16]) {
    let net = net.trunc();
    match net {
        IpNet::V4(v4) => (
            V4_MAPPED_BITS + u32::from(v4.prefix_len()),
            addr_bytes(IpAddr::V4(v4.network())),
        ),
        IpNet::V6(v6) => (u32::from(v6.prefix_len()), v6.network().octets()),
    }
}

/// Key of the internal-CIDR trie for `net`.
pub fn internal_key(net: IpNet) -> aya::maps::lpm_trie::Key<AddrKey> {
    let (bits, addr) = mapped(net);
    aya::maps::lpm_trie::Key::new(bits, AddrKey { addr })
}

/// Key of the blocked-CIDR trie for `net`, for one cgroup or (`None`) for all.
pub fn block_key(cgroup_id: Option<u64>, net: IpNet) -> aya::maps::lpm_trie::Key<BlockCidrKey> {
    let (bits, addr) = mapped(net);
    let cgroup_be = cgroup_id.unwrap_or(0).to_be_bytes();
    aya::maps::lpm_trie::Key::new(BLOCK_CGROUP_BITS + bits, BlockCidrKey { cgroup_be, addr })
}

/// The CIDR a trie key stands for (inverse of [`internal_key`]).
pub fn net_from_mapped(bits: u32, addr: [u8; 16]) -> Option<IpNet> {
    match addr_from_bytes(addr) {
        IpAddr::V4(v4) if bits >= V4_MAPPED_BITS => {
            ipnet::Ipv4Net::new(v4, u8::try_from(bits - V4_MAPPED_BITS).ok()?)
                .ok()
                .map(IpNet::V4)
        }
        IpAddr::V4(_) => None,
        IpAddr::V6(v6) => ipnet::Ipv6Net::new(v6, u8::try_from(bits).ok()?)
            .ok()
            .map(IpNet::V6),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_round_trips_through_mapped_form() {
        let a: IpAddr = "10.1.2.3".parse().unwrap();
        assert_eq!(addr_from_bytes(addr_bytes(a)), a);
        let b: IpAddr = "fd00::1".parse().unwrap();
        assert_eq!(addr_from_bytes(addr_bytes(b)), b);
    }

    #[test]
    fn v4_prefix_gains_96_bits_and_is_truncated() {
        let k = internal_key("10.1.2.3/8".parse().unwrap());
        assert_eq!({ k.prefix_len() }, 104);
        assert_eq!(
            addr_from_bytes(k.data().addr),
            "10.0.0.0".parse::<IpAddr>().unwrap()
        );
        let (bits, addr) = mapped("fd00::/8".parse().unwrap());
        assert_eq!(bits, 8);
        assert_eq!(
            net_from_mapped(bits, addr),
            Some("fd00::/8".parse().unwrap())
        );
        assert_eq!(
            net_from_mapped(104, addr_bytes("10.0.0.0".parse().unwrap())),
            Some("10.0.0.0/8".parse().unwrap())
        );
    }

    #[test]
    fn block_key_puts_cgroup_first_big_endian() {
        let k = block_key(Some(0x0102), "192.0.2.0/24".parse().unwrap());
        assert_eq!({ k.prefix_len() }, 64 + 96 + 24);
        assert_eq!(k.data().cgroup_be, [0, 0, 0, 0, 0, 0, 1, 2]);
        let g = block_key(None, "2001:db8::/32".parse().unwrap());
        assert_eq!({ g.prefix_len() }, 64 + 32);
        assert_eq!(g.data().cgroup_be, [0; 8]);
    }
}
