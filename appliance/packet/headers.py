"""The vocabulary of frames: protocol numbers, drop reasons, `Headers`, struct unpackers."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from appliance.outcomes import DropReason

# --- protocol numbers -------------------------------------------------------------------------

ETH_HLEN: Final = 14
ETHERTYPE_IPV4: Final = 0x0800
ETHERTYPE_ARP: Final = 0x0806
ETHERTYPE_IPV6: Final = 0x86DD
ETHERTYPE_VLAN: Final = 0x8100  # 802.1Q C-tag
ETHERTYPE_QINQ: Final = 0x88A8  # 802.1ad S-tag
MAX_VLAN_TAGS: Final = 2

PROTO_ICMP: Final = 1
PROTO_TCP: Final = 6
PROTO_UDP: Final = 17
PROTO_ICMPV6: Final = 58

IPV6_HOPOPTS: Final = 0
IPV6_ROUTING: Final = 43
IPV6_FRAGMENT: Final = 44
IPV6_AH: Final = 51
IPV6_NONXT: Final = 59
IPV6_DSTOPTS: Final = 60
IPV6_EXT_HEADERS: Final = frozenset(
    {IPV6_HOPOPTS, IPV6_ROUTING, IPV6_FRAGMENT, IPV6_AH, IPV6_DSTOPTS}
)

VXLAN_PORT: Final = 4789
VXLAN_FLAG_I: Final = 0x08
VXLAN_HLEN: Final = 8
VXLAN_SPORT_MIN: Final = 49152  # RFC 7348: dynamic/private range for the entropy port
VXLAN_SPORT_SPAN: Final = 65536 - VXLAN_SPORT_MIN

ICMP_ECHO_REPLY: Final = 0
ICMP_ECHO_REQUEST: Final = 8
ICMP_ERROR_TYPES: Final = frozenset({3, 4, 5, 11, 12})  # unreach, quench, redirect, time, param
ICMPV6_ECHO_REQUEST: Final = 128
ICMPV6_ECHO_REPLY: Final = 129
ICMPV6_ERROR_TYPES: Final = frozenset({1, 2, 3, 4})  # unreach, too big, time, param
ICMPV6_NS: Final = 135
ICMPV6_NA: Final = 136
ND_OPT_SLLA: Final = 1
ND_OPT_TLLA: Final = 2
NA_FLAG_SOLICITED: Final = 0x40  # first byte of the NA flags word
NA_FLAG_OVERRIDE: Final = 0x20

ARP_REQUEST: Final = 1
ARP_REPLY: Final = 2

IPV4_DF: Final = 0x4000
IPV4_MF: Final = 0x2000
IPV4_OFFMASK: Final = 0x1FFF

FRAG_NONE: Final = 0
FRAG_FIRST: Final = 1
FRAG_LATER: Final = 2

BROADCAST_MAC: Final = 0xFFFF_FFFF_FFFF
IPV6_ALL_NODES: Final = 0xFF02 << 112 | 1
IPV6_SOLICITED_NODE: Final = 0xFF02 << 112 | 1 << 32 | 0xFF << 24  # ff02::1:ff00:0/104
IPV6_MCAST_MAC: Final = 0x3333_0000_0000  # 33:33 + low 32 bits of the group

ICMPV4_QUOTE_MAX: Final = 576 - 20 - 8  # RFC 1812: the error fits in 576 bytes
ICMPV6_QUOTE_MAX: Final = 1280 - 40 - 8  # RFC 4443: the error fits in the minimum MTU

# --- drop reasons -----------------------------------------------------------------------------

TRUNCATED_ETH: Final = DropReason.TRUNCATED_ETH
MALFORMED_VLAN: Final = DropReason.MALFORMED_VLAN
MALFORMED_IPV4: Final = DropReason.MALFORMED_IPV4
MALFORMED_IPV6: Final = DropReason.MALFORMED_IPV6
MALFORMED_TCP: Final = DropReason.MALFORMED_TCP
MALFORMED_UDP: Final = DropReason.MALFORMED_UDP
MALFORMED_ICMP: Final = DropReason.MALFORMED_ICMP
MALFORMED_ICMPV6: Final = DropReason.MALFORMED_ICMPV6
MALFORMED_ARP: Final = DropReason.MALFORMED_ARP
MALFORMED_VXLAN: Final = DropReason.MALFORMED_VXLAN
DROP_REASONS: Final = frozenset(
    {
        TRUNCATED_ETH,
        MALFORMED_VLAN,
        MALFORMED_IPV4,
        MALFORMED_IPV6,
        MALFORMED_TCP,
        MALFORMED_UDP,
        MALFORMED_ICMP,
        MALFORMED_ICMPV6,
        MALFORMED_ARP,
        MALFORMED_VXLAN,
    }
)

# --- precompiled unpackers (one C call per header) --------------------------------------------

_ETH: Final = struct.Struct("!HIHIH")  # dst hi/lo, src hi/lo, ethertype
_VLAN: Final = struct.Struct("!HH")  # TCI, next ethertype
_IPV4: Final = struct.Struct("!BBHHHBBHII")
_IPV6: Final = struct.Struct("!IHBBQQQQ")
_TCP: Final = struct.Struct("!HH8xBB")  # ports, data offset byte, flags
_UDP: Final = struct.Struct("!HHH")  # ports, length
_VXLAN: Final = struct.Struct("!B3xI")  # flags, VNI << 8
_ARP: Final = struct.Struct("!HHBBHHIIHII")
_U16: Final = struct.Struct("!H")
_FRAG6: Final = struct.Struct("!HI")  # offset/flags, identification
# fast_flow_key: ethertype .. first 8 bytes of L4 for IPv4 / IPv6 without extension headers
_FAST4: Final = struct.Struct("!IH2xHxB2xIIHHH")  # type+ver/ihl+tos, len, frag, proto, ...
_FAST4_MAGIC: Final = ETHERTYPE_IPV4 << 8 | 0x45
_FAST6: Final = struct.Struct("!HIHBBQQQQHHH")
_FAST4_LEN: Final = 12 + _FAST4.size
_FAST6_LEN: Final = 12 + _FAST6.size


@dataclass(slots=True)
class Headers:
    """Parsed header state of one frame (what rules match on), plus offsets for rewriting."""

    src_mac: int
    dst_mac: int
    vlan: int | None  # VID of the outermost 802.1Q/802.1ad tag; None if untagged
    ethertype: int  # after all VLAN tags (up to 2 tags, QinQ)
    l3_off: int  # offset of the L3 header in the frame
    ip_version: int | None = None
    src: int | None = None  # shared address space (appliance.model.ip_to_int)
    dst: int | None = None
    proto: int | None = None  # IPv4 protocol / IPv6 upper-layer header after extension headers
    dscp: int | None = None
    ttl: int | None = None
    l4_off: int | None = None  # None for non-first fragments and non-IP
    sport: int | None = None  # TCP/UDP only
    dport: int | None = None
    tcp_flags: int | None = None
    icmp_type: int | None = None
    icmp_code: int | None = None
    icmp_id: int | None = None  # ICMP/ICMPv6 echo request/reply only
    frag: int = FRAG_NONE  # 0 not a fragment, 1 first fragment, 2 non-first
    frag_id: int | None = None  # IPv4 identification (always) / IPv6 fragment header id
    vni: int | None = None  # set iff VXLAN (UDP dst port 4789, I flag set)
    inner: Headers | None = None  # VXLAN inner frame, offsets relative to the OUTER frame
    inner_off: int | None = None  # VXLAN: offset of the inner Ethernet frame
    embedded: Headers | None = None  # ICMP error: the quoted packet (offsets in outer frame)
    arp_op: int | None = None
    arp_sha: int | None = None
    arp_spa: int | None = None  # shared address space (IPv4)
    arp_tha: int | None = None
    arp_tpa: int | None = None
    nd_target: int | None = None  # ICMPv6 NS/NA target address
    # Additions beyond the shared contract:
    ip_end: int | None = None  # offset just past the IP packet (ignores Ethernet padding)
    inner_end: int | None = None  # VXLAN: offset just past the inner frame (end of UDP)
    nd_ll: int | None = None  # NS source / NA target link-layer address option, if present
