//! Sans-IO builders for the L2 announcement frames sent after a VM runs at the destination.
//!
//! Everything here is a pure function from addresses to bytes: no sockets, no clocks. The frames
//! are complete Ethernet frames without FCS (the NIC adds it), padded to the 60-byte Ethernet
//! minimum where they would be shorter, so what [`frames`] returns is exactly what goes on the
//! wire and exactly what a capture on the segment sees.
//!
//! Three kinds of frame are built for one [`Announcement`]:
//!
//! 1. **RARP announce** ([`rarp_announce`]), byte-for-byte the frame QEMU's `announce-self`
//!    (`net/announce.c`, `announce_self_create`) emits: broadcast, ethertype 0x8035, op 3
//!    (reverse request), sender HW = target HW = the MAC, both protocol addresses 0.0.0.0. It lets
//!    switches relearn the MAC's port; it updates no ARP cache.
//! 2. **Gratuitous ARP** ([`gratuitous_arp`]), one per known IPv4 address, to refresh neighbours'
//!    ARP caches. See that function for why it is a *request* rather than a reply.
//! 3. **Unsolicited IPv6 neighbour advertisement** ([`unsolicited_na`]), one per known IPv6
//!    address, with the override flag set so neighbours replace a cached link-layer address.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// Minimum Ethernet frame length without the 4-byte FCS.
pub const ETH_MIN_FRAME_LEN: usize = 60;
/// Length of an Ethernet II header (dst, src, ethertype).
pub const ETH_HEADER_LEN: usize = 14;
/// Ethertype of RARP.
pub const ETHERTYPE_RARP: u16 = 0x8035;
/// Ethertype of ARP.
pub const ETHERTYPE_ARP: u16 = 0x0806;
/// Ethertype of IPv6.
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
/// The Ethernet broadcast address.
pub const BROADCAST_MAC: MacAddr = MacAddr([0xff; 6]);
/// Ethernet multicast address for the IPv6 all-nodes group `ff02::1` (RFC 2464 §7).
pub const ALL_NODES_MAC: MacAddr = MacAddr([0x33, 0x33, 0x00, 0x00, 0x00, 0x01]);
/// The IPv6 link-local all-nodes multicast address.
pub const ALL_NODES_IPV6: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);

/// ARP/RARP hardware type for Ethernet.
const ARP_HTYPE_ETHERNET: u16 = 1;
/// ARP/RARP protocol type for IPv4.
const ARP_PTYPE_IPV4: u16 = 0x0800;
/// ARP opcode "request".
const ARP_OP_REQUEST: u16 = 1;
/// RARP opcode "reverse request" (RFC 903), the one QEMU uses.
const RARP_OP_REVERSE_REQUEST: u16 = 3;
/// IPv6 next-header value of ICMPv6.
const IPPROTO_ICMPV6: u8 = 58;
/// ICMPv6 type "neighbour advertisement" (RFC 4861 §4.4).
const ICMPV6_NEIGHBOR_ADVERTISEMENT: u8 = 136;
/// NA flags word with only the override (O) bit set.
const NA_FLAG_OVERRIDE: u32 = 0x2000_0000;
/// ND option "target link-layer address".
const ND_OPT_TARGET_LINK_LAYER_ADDRESS: u8 = 2;
/// Hop limit required on every neighbour-discovery packet.
const ND_HOP_LIMIT: u8 = 255;
/// Length of the ICMPv6 NA message we build: 24-byte NA + 8-byte TLLA option.
const NA_ICMPV6_LEN: usize = 32;
/// Length of an IPv6 header.
const IPV6_HEADER_LEN: usize = 40;
/// The largest frame built here (the NA), used to size buffers once.
const LARGEST_FRAME_LEN: usize = ETH_HEADER_LEN + IPV6_HEADER_LEN + NA_ICMPV6_LEN;

/// A 48-bit Ethernet MAC address.
///
/// Parses from and displays as six colon-separated two-digit hex groups
/// (`52:54:00:12:34:56`); parsing also accepts `-` as the separator and upper-case digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// The six address bytes, in wire order.
    pub const fn octets(&self) -> [u8; 6] {
        self.0
    }

    /// True for group (multicast or broadcast) addresses: the I/G bit of the first octet is set.
    /// A NIC's own address should never be one.
    pub const fn is_multicast(&self) -> bool {
        self.0[0] & 0x01 != 0
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// Why a string is not a MAC address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MacParseError {
    /// Not six groups separated by `:` (or all by `-`).
    #[error("invalid MAC address {input:?}: expected six hex pairs like 52:54:00:12:34:56")]
    Format {
        /// The rejected input.
        input: String,
    },
    /// A group is not exactly two hex digits.
    #[error("invalid MAC address {input:?}: group {group:?} is not two hex digits")]
    Group {
        /// The rejected input.
        input: String,
        /// The offending group.
        group: String,
    },
}

impl FromStr for MacAddr {
    type Err = MacParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let format_err = || MacParseError::Format {
            input: s.to_owned(),
        };
        let sep = if s.contains(':') { ':' } else { '-' };
        let mut out = [0u8; 6];
        let mut groups = s.split(sep);
        for slot in &mut out {
            let group = groups.next().ok_or_else(format_err)?;
            let valid = group.len() == 2 && group.bytes().all(|b| b.is_ascii_hexdigit());
            if !valid {
                return Err(MacParseError::Group {
                    input: s.to_owned(),
                    group: group.to_owned(),
                });
            }
            *slot = u8::from_str_radix(group, 16).map_err(|_| MacParseError::Group {
                input: s.to_owned(),
                group: group.to_owned(),
            })?;
        }
        if groups.next().is_some() {
            return Err(format_err());
        }
        Ok(MacAddr(out))
    }
}

/// What to announce for one VM NIC: its MAC and the IP addresses known to live behind it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announcement {
    /// The NIC's MAC address (the frames' Ethernet source).
    pub mac: MacAddr,
    /// IPv4 addresses to announce with gratuitous ARP, in sending order.
    pub ipv4: Vec<Ipv4Addr>,
    /// IPv6 addresses to announce with unsolicited neighbour advertisements, in sending order.
    pub ipv6: Vec<Ipv6Addr>,
}

impl Announcement {
    /// An announcement of the MAC alone (the RARP frame only, like QEMU's `announce-self`).
    pub fn mac_only(mac: MacAddr) -> Self {
        Self {
            mac,
            ipv4: Vec::new(),
            ipv6: Vec::new(),
        }
    }
}

/// All frames for one round of `announcement`, in sending order: the RARP announce, then one
/// gratuitous ARP per IPv4 address, then one unsolicited NA per IPv6 address.
pub fn frames(announcement: &Announcement) -> Vec<Vec<u8>> {
    let mac = announcement.mac;
    let mut out = Vec::with_capacity(1 + announcement.ipv4.len() + announcement.ipv6.len());
    out.push(rarp_announce(mac));
    out.extend(announcement.ipv4.iter().map(|ip| gratuitous_arp(mac, *ip)));
    out.extend(announcement.ipv6.iter().map(|ip| unsolicited_na(mac, *ip)));
    out
}

/// The RARP announce frame of QEMU's `announce-self` for `mac` (60 bytes).
///
/// Layout: broadcast dst, src = `mac`, ethertype 0x8035; htype 1, ptype 0x0800, hlen 6, plen 4,
/// op 3; sha = `mac`, spa = 0.0.0.0, tha = `mac`, tpa = 0.0.0.0; zero padding to 60 bytes.
pub fn rarp_announce(mac: MacAddr) -> Vec<u8> {
    let mut f = ethernet_header(BROADCAST_MAC, mac, ETHERTYPE_RARP);
    arp_body(
        &mut f,
        RARP_OP_REVERSE_REQUEST,
        mac,
        Ipv4Addr::UNSPECIFIED,
        mac,
        Ipv4Addr::UNSPECIFIED,
    );
    pad_to_minimum(&mut f);
    f
}

/// A gratuitous ARP for `ip` at `mac` (60 bytes).
///
/// Built as an ARP **request** (op 1), broadcast, with spa = tpa = `ip` and tha = 00:00:00:00:00:00.
/// This is the "ARP Announcement" of RFC 5227 §3 and what Linux itself sends on address changes
/// and what a Linux guest sends for virtio-net's `VIRTIO_NET_S_ANNOUNCE`. A request is preferred
/// over a reply because every RFC 826 implementation updates an existing cache entry for the
/// sender from any ARP packet, while some stacks ignore unsolicited replies; a request with
/// spa = tpa also draws no answers from anyone but an address conflict.
pub fn gratuitous_arp(mac: MacAddr, ip: Ipv4Addr) -> Vec<u8> {
    let mut f = ethernet_header(BROADCAST_MAC, mac, ETHERTYPE_ARP);
    arp_body(&mut f, ARP_OP_REQUEST, mac, ip, MacAddr([0; 6]), ip);
    pad_to_minimum(&mut f);
    f
}

/// An unsolicited neighbour advertisement for `ip` at `mac` (86 bytes).
///
/// Ethernet dst 33:33:00:00:00:01; IPv6 src = `ip` (the address being announced, as Linux does
/// for its own unsolicited NAs), dst `ff02::1`, hop limit 255; ICMPv6 type 136 code 0 with only
/// the override flag set (not solicited, not router), target = `ip`, and a target link-layer
/// address option carrying `mac`. The ICMPv6 checksum covers the IPv6 pseudo-header.
pub fn unsolicited_na(mac: MacAddr, ip: Ipv6Addr) -> Vec<u8> {
    let src = ip;
    let dst = ALL_NODES_IPV6;

    let mut icmp = Vec::with_capacity(NA_ICMPV6_LEN);
    icmp.push(ICMPV6_NEIGHBOR_ADVERTISEMENT);
    icmp.push(0); // code
    icmp.extend_from_slice(&[0, 0]); // checksum, filled below
    icmp.extend_from_slice(&NA_FLAG_OVERRIDE.to_be_bytes());
    icmp.extend_from_slice(&ip.octets());
    icmp.push(ND_OPT_TARGET_LINK_LAYER_ADDRESS);
    icmp.push(1); // option length in units of 8 bytes
    icmp.extend_from_slice(&mac.0);
    debug_assert_eq!(icmp.len(), NA_ICMPV6_LEN);
    let checksum = icmpv6_checksum(src, dst, &icmp);
    icmp[2..4].copy_from_slice(&checksum.to_be_bytes());

    let mut f = ethernet_header(ALL_NODES_MAC, mac, ETHERTYPE_IPV6);
    f.extend_from_slice(&[0x60, 0, 0, 0]); // version 6, traffic class 0, flow label 0
                                           // NA_ICMPV6_LEN is a small constant (32), so the cast cannot truncate.
    f.extend_from_slice(&(NA_ICMPV6_LEN as u16).to_be_bytes()); // payload length
    f.push(IPPROTO_ICMPV6);
    f.push(ND_HOP_LIMIT);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    f.extend_from_slice(&icmp);
    f
}

/// The ICMPv6 checksum (RFC 4443 §2.3) of `message` (with its checksum field zeroed) sent from
/// `src` to `dst`: the 16-bit one's complement of the one's complement sum of the IPv6
/// pseudo-header (RFC 8200 §8.1) and the message.
pub fn icmpv6_checksum(src: Ipv6Addr, dst: Ipv6Addr, message: &[u8]) -> u16 {
    let mut sum: u64 = 0;
    let mut add = |bytes: &[u8]| {
        let mut chunks = bytes.chunks_exact(2);
        for pair in &mut chunks {
            sum += u64::from(u16::from_be_bytes([pair[0], pair[1]]));
        }
        if let [last] = chunks.remainder() {
            sum += u64::from(u16::from_be_bytes([*last, 0]));
        }
    };
    add(&src.octets());
    add(&dst.octets());
    // Upper-layer packet length as a 32-bit value; ND messages are far below 4 GiB.
    let len = u32::try_from(message.len()).unwrap_or(u32::MAX);
    add(&len.to_be_bytes());
    add(&[0, 0, 0, IPPROTO_ICMPV6]);
    add(message);
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    // The loop above folded `sum` into 16 bits.
    !(sum as u16)
}

/// A 14-byte Ethernet II header in a buffer with room for a minimum-size frame.
fn ethernet_header(dst: MacAddr, src: MacAddr, ethertype: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(LARGEST_FRAME_LEN);
    f.extend_from_slice(&dst.0);
    f.extend_from_slice(&src.0);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

/// Appends a 28-byte ARP/RARP body for Ethernet/IPv4.
fn arp_body(f: &mut Vec<u8>, op: u16, sha: MacAddr, spa: Ipv4Addr, tha: MacAddr, tpa: Ipv4Addr) {
    f.extend_from_slice(&ARP_HTYPE_ETHERNET.to_be_bytes());
    f.extend_from_slice(&ARP_PTYPE_IPV4.to_be_bytes());
    f.push(6); // hardware address length
    f.push(4); // protocol address length
    f.extend_from_slice(&op.to_be_bytes());
    f.extend_from_slice(&sha.0);
    f.extend_from_slice(&spa.octets());
    f.extend_from_slice(&tha.0);
    f.extend_from_slice(&tpa.octets());
}

/// Zero-pads `f` to the Ethernet minimum of 60 bytes (without FCS).
fn pad_to_minimum(f: &mut Vec<u8>) {
    if f.len() < ETH_MIN_FRAME_LEN {
        f.resize(ETH_MIN_FRAME_LEN, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: MacAddr = MacAddr([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);

    #[test]
    fn rarp_matches_qemu_announce_self() {
        #[rustfmt::skip]
        let expected: [u8; 60] = [
            // Ethernet: dst broadcast, src MAC, ethertype RARP
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0x52, 0x54, 0x00, 0x12, 0x34, 0x56,
            0x80, 0x35,
            // htype 1, ptype 0x0800, hlen 6, plen 4, op 3
            0x00, 0x01, 0x08, 0x00, 0x06, 0x04, 0x00, 0x03,
            // sha = MAC, spa = 0.0.0.0
            0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 0, 0, 0, 0,
            // tha = MAC, tpa = 0.0.0.0
            0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 0, 0, 0, 0,
            // 18 bytes of padding
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        assert_eq!(rarp_announce(MAC), expected);
    }

    #[test]
    fn gratuitous_arp_is_request_with_spa_eq_tpa() {
        #[rustfmt::skip]
        let expected: [u8; 60] = [
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0x52, 0x54, 0x00, 0x12, 0x34, 0x56,
            0x08, 0x06,
            // htype 1, ptype 0x0800, hlen 6, plen 4, op 1 (request)
            0x00, 0x01, 0x08, 0x00, 0x06, 0x04, 0x00, 0x01,
            // sha = MAC, spa = 192.0.2.10
            0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 192, 0, 2, 10,
            // tha = 00:00:00:00:00:00, tpa = 192.0.2.10
            0, 0, 0, 0, 0, 0, 192, 0, 2, 10,
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        assert_eq!(gratuitous_arp(MAC, Ipv4Addr::new(192, 0, 2, 10)), expected);
    }

    /// Checksums in these vectors were computed independently (Python, RFC 4443 pseudo-header).
    #[test]
    fn unsolicited_na_bytes() {
        #[rustfmt::skip]
        let expected: [u8; 86] = [
            // Ethernet: dst 33:33:00:00:00:01, src MAC, ethertype IPv6
            0x33, 0x33, 0x00, 0x00, 0x00, 0x01,
            0x52, 0x54, 0x00, 0x12, 0x34, 0x56,
            0x86, 0xdd,
            // IPv6: v6, payload length 32, next header 58, hop limit 255
            0x60, 0x00, 0x00, 0x00, 0x00, 0x20, 0x3a, 0xff,
            // src 2001:db8::10
            0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x00, 0x10,
            // dst ff02::1
            0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x00, 0x01,
            // ICMPv6: type 136, code 0, checksum 0x7451, flags O
            0x88, 0x00, 0x74, 0x51, 0x20, 0x00, 0x00, 0x00,
            // target 2001:db8::10
            0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x00, 0x10,
            // option: target link-layer address, length 1, MAC
            0x02, 0x01, 0x52, 0x54, 0x00, 0x12, 0x34, 0x56,
        ];
        let ip: Ipv6Addr = "2001:db8::10".parse().expect("literal");
        assert_eq!(unsolicited_na(MAC, ip), expected);
    }

    #[test]
    fn na_checksum_second_vector_and_verifies_to_zero() {
        let ip: Ipv6Addr = "fe80::5054:ff:fe12:3456".parse().expect("literal");
        let f = unsolicited_na(MAC, ip);
        assert_eq!(&f[56..58], &[0xcb, 0x68]);
        // Re-summing a message with its checksum in place must give 0 (i.e. !0xffff).
        assert_eq!(icmpv6_checksum(ip, ALL_NODES_IPV6, &f[54..]), 0);
    }

    #[test]
    fn checksum_handles_odd_length() {
        // Sum of pseudo-header for ::/:: with length 1 and next header 58, plus 0xab00.
        let sum: u32 = 1 + 58 + 0xab00;
        let expected = !(sum as u16);
        assert_eq!(
            icmpv6_checksum(Ipv6Addr::UNSPECIFIED, Ipv6Addr::UNSPECIFIED, &[0xab]),
            expected
        );
    }

    #[test]
    fn frames_order_and_count() {
        let ann = Announcement {
            mac: MAC,
            ipv4: vec![Ipv4Addr::new(192, 0, 2, 10), Ipv4Addr::new(192, 0, 2, 11)],
            ipv6: vec!["2001:db8::10".parse().expect("literal")],
        };
        let fs = frames(&ann);
        assert_eq!(fs.len(), 4);
        assert_eq!(fs[0], rarp_announce(MAC));
        assert_eq!(fs[1], gratuitous_arp(MAC, ann.ipv4[0]));
        assert_eq!(fs[2], gratuitous_arp(MAC, ann.ipv4[1]));
        assert_eq!(fs[3], unsolicited_na(MAC, ann.ipv6[0]));
        assert_eq!(
            frames(&Announcement::mac_only(MAC)),
            vec![rarp_announce(MAC)]
        );
    }

    #[test]
    fn mac_parse_and_display() {
        let mac: MacAddr = "52:54:00:12:34:56".parse().expect("valid");
        assert_eq!(mac, MAC);
        assert_eq!(mac.to_string(), "52:54:00:12:34:56");
        assert_eq!(
            "52-54-00-AB-cd-EF"
                .parse::<MacAddr>()
                .expect("valid")
                .to_string(),
            "52:54:00:ab:cd:ef"
        );
        assert!(!mac.is_multicast());
        assert!(BROADCAST_MAC.is_multicast());
        assert!(ALL_NODES_MAC.is_multicast());
    }

    #[test]
    fn mac_parse_errors() {
        for bad in [
            "",
            "52:54:00:12:34",
            "52:54:00:12:34:56:78",
            "52:54:00:12:34:5",
            "52:54:00:12:34:567",
            "52:54:00:12:34:zz",
            "52:54:00:12:34:+5",
            "52:54-00:12:34:56",
            "525400123456",
            "52:54:00:12:34:56:",
            "ü2:54:00:12:34:56",
        ] {
            let err = bad.parse::<MacAddr>().expect_err(bad);
            assert!(
                err.to_string().contains("invalid MAC address"),
                "{bad}: {err}"
            );
        }
        let err = "52:54:00:12:34:zz".parse::<MacAddr>().expect_err("bad hex");
        assert_eq!(
            err,
            MacParseError::Group {
                input: "52:54:00:12:34:zz".into(),
                group: "zz".into()
            }
        );
    }
}
