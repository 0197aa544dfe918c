"""Frame parsing, flow keys, header rewriting and frame builders for the datapath.

Everything here is a pure function over ``bytes``: no I/O, no global state. The parser is
written for a per-packet Python loop, so it reads headers with precompiled `struct` unpackers
and fills one slotted `Headers` object instead of building a tree of layer objects.

Conventions shared with `appliance.model`:

* IP addresses are integers in one 128-bit space; IPv4 is IPv4-mapped (``::ffff:a.b.c.d``).
* MAC addresses are 48-bit integers.
* A bad frame is never an exception: `parse` returns one of `DROP_REASONS` instead, so the
  datapath can count and drop it. Exceptions are reserved for programming errors (for example
  asking `rewrite` to put an IPv6 address into an IPv4 header).

Checksums are always updated incrementally (RFC 1624, eqn. 3) when rewriting, because the
datapath does not always see all the data a checksum covers (IP fragments, truncated quotes in
ICMP errors); only the builders compute checksums from scratch.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from appliance.model import IPV4_MAPPED_BASE, is_ipv4

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

TRUNCATED_ETH: Final = "truncated_eth"
MALFORMED_VLAN: Final = "malformed_vlan"
MALFORMED_IPV4: Final = "malformed_ipv4"
MALFORMED_IPV6: Final = "malformed_ipv6"
MALFORMED_TCP: Final = "malformed_tcp"
MALFORMED_UDP: Final = "malformed_udp"
MALFORMED_ICMP: Final = "malformed_icmp"
MALFORMED_ICMPV6: Final = "malformed_icmpv6"
MALFORMED_ARP: Final = "malformed_arp"
MALFORMED_VXLAN: Final = "malformed_vxlan"
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
    src: int | None = None  # 128-bit space (IPv4-mapped for IPv4)
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
    arp_spa: int | None = None  # 128-bit space (IPv4-mapped)
    arp_tha: int | None = None
    arp_tpa: int | None = None
    nd_target: int | None = None  # ICMPv6 NS/NA target address
    # Additions beyond the shared contract:
    ip_end: int | None = None  # offset just past the IP packet (ignores Ethernet padding)
    inner_end: int | None = None  # VXLAN: offset just past the inner frame (end of UDP)
    nd_ll: int | None = None  # NS source / NA target link-layer address option, if present


# ==============================================================================================
# Parsing
# ==============================================================================================


def parse(frame: bytes) -> Headers | str:
    """Parse an Ethernet frame; a drop-reason string from `DROP_REASONS` if it is malformed."""
    return _parse_eth(frame, 0, len(frame), True)


def _parse_eth(frame: bytes, off: int, end: int, outer: bool) -> Headers | str:
    """Ethernet + up to two VLAN tags, then dispatch on the ethertype.

    ``outer`` is False for a VXLAN inner frame, which stops tunnel recursion at one level.
    """
    if end - off < ETH_HLEN:
        return TRUNCATED_ETH
    d_hi, d_lo, s_hi, s_lo, et = _ETH.unpack_from(frame, off)
    l3 = off + ETH_HLEN
    vlan = None
    if et in (ETHERTYPE_VLAN, ETHERTYPE_QINQ):
        for _ in range(MAX_VLAN_TAGS):
            if l3 + 4 > end:
                return MALFORMED_VLAN
            tci, et = _VLAN.unpack_from(frame, l3)
            if vlan is None:
                vlan = tci & 0x0FFF
            l3 += 4
            if et != ETHERTYPE_VLAN and et != ETHERTYPE_QINQ:
                break
        else:
            return MALFORMED_VLAN  # a third tag: more than we can classify safely
    h = Headers(s_hi << 32 | s_lo, d_hi << 32 | d_lo, vlan, et, l3)
    if et == ETHERTYPE_IPV4:
        err = _parse_ipv4(frame, h, end, outer)
    elif et == ETHERTYPE_IPV6:
        err = _parse_ipv6(frame, h, end, outer)
    elif et == ETHERTYPE_ARP:
        err = _parse_arp(frame, h, end)
    else:
        return h  # non-IP: switched on MACs/VLAN only
    return err or h


def _parse_ipv4(frame: bytes, h: Headers, end: int, outer: bool) -> str | None:
    """IPv4 header with options and fragmentation; bounds L4 parsing by the total length."""
    o = h.l3_off
    if o + 20 > end:
        return MALFORMED_IPV4
    vihl, tos, total, ident, ff, ttl, proto, _csum, src, dst = _IPV4.unpack_from(frame, o)
    ihl = (vihl & 0x0F) << 2
    if vihl >> 4 != 4 or ihl < 20 or total < ihl or o + total > end:
        return MALFORMED_IPV4
    h.ip_version = 4
    h.src = IPV4_MAPPED_BASE | src
    h.dst = IPV4_MAPPED_BASE | dst
    h.proto = proto
    h.dscp = tos >> 2
    h.ttl = ttl
    h.frag_id = ident
    h.ip_end = ip_end = o + total
    if ff & IPV4_OFFMASK:
        h.frag = FRAG_LATER  # no L4 header in here
        return None
    if ff & IPV4_MF:
        h.frag = FRAG_FIRST
    h.l4_off = o + ihl
    return _parse_l4(frame, h, o + ihl, ip_end, proto, outer)


def _parse_ipv6(frame: bytes, h: Headers, end: int, outer: bool) -> str | None:
    """IPv6 fixed header, then the extension-header chain up to the upper-layer protocol."""
    o = h.l3_off
    if o + 40 > end:
        return MALFORMED_IPV6
    vtf, plen, nh, hlim, s_hi, s_lo, d_hi, d_lo = _IPV6.unpack_from(frame, o)
    if vtf >> 28 != 6 or o + 40 + plen > end:
        return MALFORMED_IPV6
    h.ip_version = 6
    h.src = s_hi << 64 | s_lo
    h.dst = d_hi << 64 | d_lo
    h.dscp = (vtf >> 22) & 0x3F
    h.ttl = hlim
    h.ip_end = ip_end = o + 40 + plen
    l4 = o + 40
    if nh in IPV6_EXT_HEADERS:
        chain = _walk_ipv6_ext(frame, l4, ip_end, nh)
        if chain is None:
            return MALFORMED_IPV6
        nh, l4, h.frag, h.frag_id = chain
        if h.frag == FRAG_LATER:
            h.proto = nh
            return None
    h.proto = nh
    h.l4_off = l4
    return _parse_l4(frame, h, l4, ip_end, nh, outer)


def _walk_ipv6_ext(
    frame: bytes, off: int, end: int, nh: int
) -> tuple[int, int, int, int | None] | None:
    """Skip extension headers; ``(upper proto, its offset, frag, frag_id)`` or None if bad.

    Stops right after a fragment header of a non-first fragment: what follows is payload.
    Hop-by-hop options anywhere but first is malformed (RFC 8200 4.1).
    """
    frag = FRAG_NONE
    frag_id = None
    first = True
    while nh in IPV6_EXT_HEADERS:
        if off + 8 > end or (nh == IPV6_HOPOPTS and not first):
            return None
        nxt = frame[off]
        if nh == IPV6_FRAGMENT:
            offm, frag_id = _FRAG6.unpack_from(frame, off + 2)
            if offm & 0xFFF8:
                return nxt, off + 8, FRAG_LATER, frag_id
            frag = FRAG_FIRST if offm & 1 else FRAG_NONE  # M=0, offset 0: atomic fragment
            size = 8
        elif nh == IPV6_AH:
            size = (frame[off + 1] + 2) << 2
        else:
            size = (frame[off + 1] + 1) << 3
        if off + size > end:
            return None
        off += size
        nh = nxt
        first = False
    return nh, off, frag, frag_id


def _parse_l4(frame: bytes, h: Headers, l4: int, end: int, proto: int, outer: bool) -> str | None:
    """Dispatch on the upper-layer protocol; unknown protocols are fine (no ports)."""
    if proto == PROTO_TCP:
        if l4 + 20 > end:
            return MALFORMED_TCP
        sport, dport, doff, flags = _TCP.unpack_from(frame, l4)
        doff = (doff >> 4) << 2
        if doff < 20 or l4 + doff > end:
            return MALFORMED_TCP
        h.sport = sport
        h.dport = dport
        h.tcp_flags = flags
        return None
    if proto == PROTO_UDP:
        return _parse_udp(frame, h, l4, end, outer)
    if proto == PROTO_ICMP and h.ip_version == 4:
        return _parse_icmp(frame, h, l4, end)
    if proto == PROTO_ICMPV6 and h.ip_version == 6:
        return _parse_icmpv6(frame, h, l4, end)
    return None


def _parse_udp(frame: bytes, h: Headers, l4: int, end: int, outer: bool) -> str | None:
    """UDP header; a complete datagram to port 4789 is looked at as VXLAN (outer frames only)."""
    if l4 + 8 > end:
        return MALFORMED_UDP
    sport, dport, ulen = _UDP.unpack_from(frame, l4)
    # A first fragment only holds part of the datagram its length field describes.
    if ulen < 8 or (h.frag == FRAG_NONE and l4 + ulen > end):
        return MALFORMED_UDP
    h.sport = sport
    h.dport = dport
    if dport == VXLAN_PORT and outer and h.frag == FRAG_NONE:
        return _parse_vxlan(frame, h, l4 + 8, l4 + ulen)
    return None


def _parse_vxlan(frame: bytes, h: Headers, off: int, end: int) -> str | None:
    """VXLAN header and the inner frame; without the I flag it is plain UDP to port 4789."""
    if off + VXLAN_HLEN > end:
        return MALFORMED_VXLAN
    flags, vni = _VXLAN.unpack_from(frame, off)
    if not flags & VXLAN_FLAG_I:
        return None
    inner = _parse_eth(frame, off + VXLAN_HLEN, end, False)
    if isinstance(inner, str):
        return MALFORMED_VXLAN  # whatever is wrong inside, the tunnel packet is what we drop
    h.vni = vni >> 8
    h.inner = inner
    h.inner_off = off + VXLAN_HLEN
    h.inner_end = end
    return None


def _parse_icmp(frame: bytes, h: Headers, l4: int, end: int) -> str | None:
    """ICMPv4: echo id, or the quoted packet of an error (needed to NAT errors back)."""
    if l4 + 8 > end:
        return MALFORMED_ICMP
    t = h.icmp_type = frame[l4]
    h.icmp_code = frame[l4 + 1]
    if t in (ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY):
        h.icmp_id = _U16.unpack_from(frame, l4 + 4)[0]
    elif t in ICMP_ERROR_TYPES:
        quoted = _parse_quoted_ipv4(frame, h, l4 + 8, end)
        if quoted is None:
            return MALFORMED_ICMP
        h.embedded = quoted
    return None


def _parse_icmpv6(frame: bytes, h: Headers, l4: int, end: int) -> str | None:
    """ICMPv6: echo id, error quote, or neighbor discovery target and link-layer option."""
    if l4 + 8 > end:
        return MALFORMED_ICMPV6
    t = h.icmp_type = frame[l4]
    h.icmp_code = frame[l4 + 1]
    if t in (ICMPV6_ECHO_REQUEST, ICMPV6_ECHO_REPLY):
        h.icmp_id = _U16.unpack_from(frame, l4 + 4)[0]
    elif t in ICMPV6_ERROR_TYPES:
        quoted = _parse_quoted_ipv6(frame, h, l4 + 8, end)
        if quoted is None:
            return MALFORMED_ICMPV6
        h.embedded = quoted
    elif t in (ICMPV6_NS, ICMPV6_NA):
        return _parse_nd(frame, h, l4, end)
    return None


def _parse_nd(frame: bytes, h: Headers, l4: int, end: int) -> str | None:
    """NS/NA target address and the source/target link-layer address option (RFC 4861)."""
    if l4 + 24 > end:
        return MALFORMED_ICMPV6
    h.nd_target = int.from_bytes(frame[l4 + 8 : l4 + 24], "big")
    want = ND_OPT_SLLA if h.icmp_type == ICMPV6_NS else ND_OPT_TLLA
    opt = l4 + 24
    while opt < end:
        if opt + 2 > end:
            return MALFORMED_ICMPV6
        size = frame[opt + 1] << 3
        if size == 0 or opt + size > end:
            return MALFORMED_ICMPV6  # a zero length would loop forever; RFC 4861 discards
        if frame[opt] == want and size >= 8:
            h.nd_ll = int.from_bytes(frame[opt + 2 : opt + 8], "big")
        opt += size
    return None


def _parse_quoted_ipv4(frame: bytes, h: Headers, q: int, end: int) -> Headers | None:
    """The IPv4 header + first L4 bytes quoted in an ICMP error; None if not even a header.

    The quote is usually truncated, so its total length is not checked against the data.
    """
    if q + 20 > end:
        return None
    vihl, tos, _total, ident, ff, ttl, proto, _csum, src, dst = _IPV4.unpack_from(frame, q)
    ihl = (vihl & 0x0F) << 2
    if vihl >> 4 != 4 or ihl < 20 or q + ihl > end:
        return None
    e = Headers(
        h.src_mac,
        h.dst_mac,
        h.vlan,
        ETHERTYPE_IPV4,
        q,
        4,
        IPV4_MAPPED_BASE | src,
        IPV4_MAPPED_BASE | dst,
        proto,
        tos >> 2,
        ttl,
    )
    e.frag_id = ident
    e.ip_end = end
    if ff & IPV4_OFFMASK:
        e.frag = FRAG_LATER
        return e
    if ff & IPV4_MF:
        e.frag = FRAG_FIRST
    _parse_quoted_l4(frame, e, q + ihl, end)
    return e


def _parse_quoted_ipv6(frame: bytes, h: Headers, q: int, end: int) -> Headers | None:
    """The IPv6 packet quoted in an ICMPv6 error; None if its headers are not all there."""
    if q + 40 > end:
        return None
    vtf, _plen, nh, hlim, s_hi, s_lo, d_hi, d_lo = _IPV6.unpack_from(frame, q)
    if vtf >> 28 != 6:
        return None
    chain = _walk_ipv6_ext(frame, q + 40, end, nh)
    if chain is None:
        return None
    proto, l4, frag, frag_id = chain
    e = Headers(
        h.src_mac,
        h.dst_mac,
        h.vlan,
        ETHERTYPE_IPV6,
        q,
        6,
        s_hi << 64 | s_lo,
        d_hi << 64 | d_lo,
        proto,
        (vtf >> 22) & 0x3F,
        hlim,
    )
    e.frag = frag
    e.frag_id = frag_id
    e.ip_end = end
    if frag != FRAG_LATER:
        _parse_quoted_l4(frame, e, l4, end)
    return e


def _parse_quoted_l4(frame: bytes, e: Headers, l4: int, end: int) -> None:
    """Ports / ICMP type and id from whatever part of the quoted L4 header is present."""
    e.l4_off = l4
    proto = e.proto
    if proto in (PROTO_TCP, PROTO_UDP):
        if l4 + 4 <= end:
            e.sport, e.dport = _VLAN.unpack_from(frame, l4)
    elif (
        (proto == PROTO_ICMP and e.ip_version == 4) or (proto == PROTO_ICMPV6 and e.ip_version == 6)
    ) and l4 + 2 <= end:
        e.icmp_type = frame[l4]
        e.icmp_code = frame[l4 + 1]
        if l4 + 6 <= end and e.icmp_type in _ECHO_TYPES[proto]:
            e.icmp_id = _U16.unpack_from(frame, l4 + 4)[0]


def _parse_arp(frame: bytes, h: Headers, end: int) -> str | None:
    """ARP for Ethernet/IPv4 only; anything else is not ours to answer or switch on."""
    o = h.l3_off
    if o + 28 > end:
        return MALFORMED_ARP
    htype, ptype, hlen, plen, op, sha_hi, sha_lo, spa, tha_hi, tha_lo, tpa = _ARP.unpack_from(
        frame, o
    )
    if htype != 1 or ptype != ETHERTYPE_IPV4 or hlen != 6 or plen != 4:
        return MALFORMED_ARP
    h.arp_op = op
    h.arp_sha = sha_hi << 32 | sha_lo
    h.arp_spa = IPV4_MAPPED_BASE | spa
    h.arp_tha = tha_hi << 32 | tha_lo
    h.arp_tpa = IPV4_MAPPED_BASE | tpa
    return None


# ==============================================================================================
# Flow keys
# ==============================================================================================

_ECHO_TYPES: Final = {
    PROTO_ICMP: (ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY),
    PROTO_ICMPV6: (ICMPV6_ECHO_REQUEST, ICMPV6_ECHO_REPLY),
}


def flow_key(h: Headers) -> tuple | None:
    """``(vlan, proto, src, sport, dst, dport, tun)``; None for non-IP (also inside a tunnel).

    For VXLAN the IP part is the inner packet's and ``tun`` is ``(outer src, outer dst, vni)``,
    so flows are tracked per tenant packet while the tunnel endpoints stay part of the key.
    """
    tun = None
    f = h
    if h.vni is not None and h.inner is not None:
        tun = (h.src, h.dst, h.vni)
        f = h.inner
    if f.src is None:
        return None
    sport, dport = _key_ports(f)
    return (h.vlan, f.proto, f.src, sport, f.dst, dport, tun)


def _key_ports(h: Headers) -> tuple[int, int]:
    """Port pair of a flow key; ICMP echo ids are placed so that a reply is the reverse key."""
    if h.l4_off is None:
        return 0, 0  # non-first fragment
    proto = h.proto
    if proto in (PROTO_TCP, PROTO_UDP):
        return h.sport, h.dport  # type: ignore[return-value]
    t = h.icmp_type
    if t is None:
        return 0, 0
    request, reply = _ECHO_TYPES[proto]  # type: ignore[index]
    if t == request:
        return h.icmp_id, 0  # type: ignore[return-value]
    if t == reply:
        return 0, h.icmp_id  # type: ignore[return-value]
    return t, h.icmp_code  # type: ignore[return-value]


def headers_from_key(key: tuple, *, src_mac: int = 0, dst_mac: int = 0) -> Headers:
    """Abstract headers of a packet with this flow key (no bytes behind them).

    Lets the pipeline evaluate policy for a flow without a packet: to adopt the kernel
    entries a previous run left, and to revalidate flows after a policy change. What a key
    does not hold (MACs, DSCP, TTL) is unknown and set neutral.
    """
    vlan, proto, src, sport, dst, dport, tun = key
    v4 = is_ipv4(src)
    h = Headers(src_mac=src_mac, dst_mac=dst_mac, vlan=None if tun else vlan,
                ethertype=ETHERTYPE_IPV4 if v4 else ETHERTYPE_IPV6, l3_off=ETH_HLEN,
                ip_version=4 if v4 else 6, src=src, dst=dst, proto=proto, dscp=0, ttl=64,
                l4_off=ETH_HLEN + (20 if v4 else 40))  # not None: the key has L4 fields
    if proto in (PROTO_TCP, PROTO_UDP):
        h.sport, h.dport = sport, dport
    elif proto in _ECHO_TYPES:
        request, reply = _ECHO_TYPES[proto]
        if dport == 0:
            h.icmp_type, h.icmp_id = request, sport
        elif sport == 0:
            h.icmp_type, h.icmp_id = reply, dport
        else:
            h.icmp_type, h.icmp_code = sport, dport
    if tun is None:
        return h
    outer_v4 = is_ipv4(tun[0])
    return Headers(src_mac=src_mac, dst_mac=dst_mac, vlan=vlan,
                   ethertype=ETHERTYPE_IPV4 if outer_v4 else ETHERTYPE_IPV6, l3_off=ETH_HLEN,
                   ip_version=4 if outer_v4 else 6, src=tun[0], dst=tun[1], proto=PROTO_UDP,
                   dscp=0, ttl=64, sport=0, dport=VXLAN_PORT, vni=tun[2], inner=h)


def reverse_key(key: tuple) -> tuple:
    """The key of the opposite direction: swap addresses, ports and tunnel endpoints."""
    vlan, proto, src, sport, dst, dport, tun = key
    if tun is not None:
        tun = (tun[1], tun[0], tun[2])
    return (vlan, proto, dst, dport, src, sport, tun)


def fast_flow_key(frame: bytes) -> tuple | None:
    """`flow_key(parse(frame))` for plain untagged TCP/UDP; None means "use `parse`".

    Validates exactly what `parse` would for these shapes, so a non-None result is always
    the same key `parse` + `flow_key` give. One unpack reads from the ethertype through the
    ports (IPv4 inline: it is the hot case); fewer unpacked items is what makes it fast.
    """
    if len(frame) < _FAST4_LEN:
        return None
    word, total, ff, proto, src, dst, sport, dport, ulen = _FAST4.unpack_from(frame, 12)
    if word >> 8 != _FAST4_MAGIC:  # ethertype IPv4, version 4, IHL 5
        if word >> 16 == ETHERTYPE_IPV6 and len(frame) >= _FAST6_LEN:
            return _fast6(frame)
        return None
    if ff & (IPV4_MF | IPV4_OFFMASK) or total + ETH_HLEN > len(frame):
        return None
    if proto == PROTO_TCP:
        if total < 40:
            return None
        doff = (frame[46] >> 4) << 2
        if doff < 20 or doff + 20 > total:
            return None
    elif proto == PROTO_UDP:
        if dport == VXLAN_PORT or ulen < 8 or ulen + 20 > total:
            return None
    else:
        return None
    return (None, proto, IPV4_MAPPED_BASE | src, sport, IPV4_MAPPED_BASE | dst, dport, None)


def _fast6(frame: bytes) -> tuple | None:
    """IPv6 with TCP or UDP right after the fixed header (no extension headers)."""
    (_et, vtf, plen, nh, _hlim, s_hi, s_lo, d_hi, d_lo, sport, dport, ulen) = _FAST6.unpack_from(
        frame, 12
    )
    if vtf >> 28 != 6 or plen + 54 > len(frame):
        return None
    if nh == PROTO_TCP:
        if plen < 20:
            return None
        doff = (frame[66] >> 4) << 2
        if doff < 20 or doff > plen:
            return None
    elif nh == PROTO_UDP:
        if dport == VXLAN_PORT or ulen < 8 or ulen > plen:
            return None
    else:
        return None
    return (None, nh, s_hi << 64 | s_lo, sport, d_hi << 64 | d_lo, dport, None)


# ==============================================================================================
# Checksums
# ==============================================================================================


def _sum16(data: bytes | bytearray) -> int:
    """Ones-complement sum of big-endian 16-bit words (odd length padded with a zero byte).

    Uses 2**16 == 1 (mod 0xFFFF): the big integer of the data is congruent to the word sum,
    which runs in C instead of a Python loop. Non-zero data sums to 0xFFFF, never 0.
    """
    if len(data) & 1:
        data = bytes(data) + b"\0"
    v = int.from_bytes(data, "big")
    if not v:
        return 0
    return v % 0xFFFF or 0xFFFF


def checksum(data: bytes | bytearray) -> int:
    """Internet checksum (RFC 1071); 0 when ``data`` already includes a correct checksum."""
    return ~_sum16(data) & 0xFFFF


def _adjust(csum: int, old: bytes | bytearray, new: bytes | bytearray) -> int:
    """RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m') for word-aligned ``old`` -> ``new`` bytes."""
    s = (~csum & 0xFFFF) + (~_sum16(old) & 0xFFFF) + _sum16(new)
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def pseudo_header(src: int, dst: int, proto: int, length: int,
                  version: int | None = None) -> bytes:
    """TCP/UDP/ICMPv6 pseudo-header for addresses in the 128-bit space.

    ``version`` is the IP header's; without it the family of ``src`` decides, which is wrong
    for an IPv6 header carrying an IPv4-mapped address (what a hostile VM can send).
    """
    if version == 4 or (version is None and is_ipv4(src)):
        return struct.pack("!IIBBH", src & 0xFFFF_FFFF, dst & 0xFFFF_FFFF, 0, proto, length)
    return src.to_bytes(16, "big") + dst.to_bytes(16, "big") + struct.pack("!IxxxB", length, proto)


def verify_checksums(frame: bytes) -> dict[str, bool]:
    """Recompute every checksum we can see from scratch (for tests); keys like ``ipv4``, ``tcp``.

    VXLAN inner results are prefixed ``inner_``; a quoted IPv4 header is ``embedded_ipv4``.
    L4 checksums are only checked for unfragmented packets (the rest of the data is elsewhere).
    """
    h = parse(frame)
    if isinstance(h, str):
        return {}
    out: dict[str, bool] = {}
    _verify_into(frame, h, out, "")
    if h.inner is not None:
        _verify_into(frame, h.inner, out, "inner_")
    e = h.embedded
    if e is not None and e.ip_version == 4:
        ihl = (frame[e.l3_off] & 0x0F) << 2
        out["embedded_ipv4"] = checksum(frame[e.l3_off : e.l3_off + ihl]) == 0
    return out


def _verify_into(frame: bytes, h: Headers, out: dict[str, bool], prefix: str) -> None:
    """Checksums of one (outer or inner) packet into ``out``."""
    if h.ip_version == 4:
        ihl = (frame[h.l3_off] & 0x0F) << 2
        out[prefix + "ipv4"] = checksum(frame[h.l3_off : h.l3_off + ihl]) == 0
    if h.ip_version is None or h.frag != FRAG_NONE or h.l4_off is None:
        return
    name = _L4_NAMES.get((h.proto, h.ip_version))  # type: ignore[arg-type]
    if name is None:
        return
    l4, end = h.l4_off, h.ip_end
    if h.proto == PROTO_UDP:
        end = l4 + _U16.unpack_from(frame, l4 + 4)[0]
        if h.ip_version == 4 and frame[l4 + 6 : l4 + 8] == b"\0\0":
            out[prefix + name] = True  # checksum not used
            return
    data = frame[l4:end]
    if h.proto != PROTO_ICMP:
        data = pseudo_header(h.src, h.dst, h.proto, len(data),  # type: ignore[arg-type]
                             h.ip_version) + data
    out[prefix + name] = checksum(data) == 0


_L4_NAMES: Final = {
    (PROTO_TCP, 4): "tcp",
    (PROTO_TCP, 6): "tcp",
    (PROTO_UDP, 4): "udp",
    (PROTO_UDP, 6): "udp",
    (PROTO_ICMP, 4): "icmp",
    (PROTO_ICMPV6, 6): "icmpv6",
}


# ==============================================================================================
# Rewriting
# ==============================================================================================


def _addr_bytes(value: int, version: int) -> bytes:
    """Wire form of a 128-bit-space address for a header of IP ``version``."""
    if version == 4:
        if not is_ipv4(value):
            raise ValueError(f"IPv6 address {value:#x} for an IPv4 packet")
        return (value & 0xFFFF_FFFF).to_bytes(4, "big")
    if is_ipv4(value):
        raise ValueError(f"IPv4 address {value:#x} for an IPv6 packet")
    return value.to_bytes(16, "big")


def _put(buf: bytearray, off: int, new: bytes, old: bytearray, acc: bytearray) -> None:
    """Overwrite ``buf[off:]`` with ``new``; append the replaced and new bytes to the diffs."""
    end = off + len(new)
    old += buf[off:end]
    acc += new
    buf[off:end] = new


def _rewrite_ip(
    buf: bytearray, h: Headers, src: int | None, dst: int | None
) -> tuple[bytearray, bytearray]:
    """Replace addresses (fixing the IPv4 header checksum); returns the pseudo-header diff."""
    old, new = bytearray(), bytearray()
    if src is None and dst is None:
        return old, new
    version = h.ip_version
    if version is None:
        raise ValueError("address rewrite on a non-IP frame")
    o = h.l3_off
    saddr, size = (o + 12, 4) if version == 4 else (o + 8, 16)
    if src is not None:
        _put(buf, saddr, _addr_bytes(src, version), old, new)
    if dst is not None:
        _put(buf, saddr + size, _addr_bytes(dst, version), old, new)
    if version == 4:
        _store_csum(buf, o + 10, old, new)
    return old, new


def _store_csum(buf: bytearray, at: int, old: bytes | bytearray, new: bytes | bytearray) -> int:
    """Incrementally update the checksum at ``buf[at:at+2]``; returns the new value."""
    csum = _adjust(_U16.unpack_from(buf, at)[0], old, new)
    _U16.pack_into(buf, at, csum)
    return csum


def _rewrite_l4(
    buf: bytearray,
    h: Headers,
    pseudo: tuple[bytearray, bytearray],
    sport: int | None,
    dport: int | None,
    icmp_id: int | None,
    limit: int,
) -> None:
    """Ports / echo id and the L4 checksum (address change via the pseudo-header diff).

    ``limit`` bounds what exists in ``buf`` (a quoted header may lack its checksum field).
    """
    l4 = h.l4_off
    if l4 is None or h.frag == FRAG_LATER:
        return
    proto = h.proto
    old, new = bytearray(pseudo[0]), bytearray(pseudo[1])
    if proto in (PROTO_TCP, PROTO_UDP):
        if h.sport is None:
            return  # quoted header too short to hold ports
        if sport is not None:
            _put(buf, l4, _U16.pack(sport), old, new)
        if dport is not None:
            _put(buf, l4 + 2, _U16.pack(dport), old, new)
        at = l4 + (16 if proto == PROTO_TCP else 6)
    elif h.icmp_type is not None and proto in (PROTO_ICMP, PROTO_ICMPV6):
        if proto == PROTO_ICMP:
            old, new = bytearray(), bytearray()  # ICMPv4 has no pseudo-header
        if icmp_id is not None and h.icmp_id is not None:
            _put(buf, l4 + 4, _U16.pack(icmp_id), old, new)
        at = l4 + 2
    else:
        return
    if at + 2 > limit or old == new:
        return
    if proto == PROTO_UDP and buf[at : at + 2] == b"\0\0":
        return  # UDP without checksum stays without (IPv4, and RFC 6935 tunnels over IPv6)
    if _store_csum(buf, at, old, new) == 0 and proto == PROTO_UDP:
        _U16.pack_into(buf, at, 0xFFFF)  # 0 would mean "no checksum"; -0 is the same sum


def rewrite(
    frame: bytes,
    h: Headers,
    *,
    src_mac: int | None = None,
    dst_mac: int | None = None,
    src: int | None = None,
    dst: int | None = None,
    sport: int | None = None,
    dport: int | None = None,
    icmp_id: int | None = None,
) -> bytes:
    """Rewrite MACs, addresses, TCP/UDP ports and the ICMP echo id of a plain frame.

    Checksums are updated incrementally, so this is right for first fragments too. Non-first
    fragments only get the L3 change; ports on non-TCP/UDP and ids on non-echo are ignored.
    Raises ValueError for an address of the wrong family (a caller bug, not a packet fault).
    """
    buf = bytearray(frame)
    if dst_mac is not None:
        buf[0:6] = dst_mac.to_bytes(6, "big")
    if src_mac is not None:
        buf[6:12] = src_mac.to_bytes(6, "big")
    pseudo = _rewrite_ip(buf, h, src, dst)
    if h.ip_version is not None and (sport, dport, icmp_id, src, dst) != (None,) * 5:
        _rewrite_l4(buf, h, pseudo, sport, dport, icmp_id, len(buf))
    return bytes(buf)


def rewrite_embedded(
    frame: bytes,
    h: Headers,
    *,
    src: int | None = None,
    dst: int | None = None,
    sport: int | None = None,
    dport: int | None = None,
    icmp_id: int | None = None,
) -> bytes:
    """Rewrite the packet quoted in an ICMP/ICMPv6 error, then the outer ICMP checksum.

    Fixes the quoted IPv4 header checksum and, when present in the quote, the quoted L4
    checksum, so the receiver can match the error to its (translated) connection.
    """
    e = h.embedded
    if e is None or h.l4_off is None or h.ip_end is None:
        raise ValueError("not an ICMP error with a quoted packet")
    buf = bytearray(frame)
    pseudo = _rewrite_ip(buf, e, src, dst)
    _rewrite_l4(buf, e, pseudo, sport, dport, icmp_id, h.ip_end)
    # The quote starts 8 bytes into the ICMP message, so its words are aligned with the sum.
    q, end = e.l3_off, h.ip_end
    _store_csum(buf, h.l4_off + 2, frame[q:end], buf[q:end])
    return bytes(buf)


# ==============================================================================================
# VXLAN
# ==============================================================================================


def vxlan_encap(
    frame: bytes,
    *,
    vni: int,
    src_ip: int,
    dst_ip: int,
    src_mac: int,
    dst_mac: int,
    src_port: int,
    dst_port: int = VXLAN_PORT,
    ttl: int = 64,
) -> bytes:
    """Wrap ``frame`` in Ethernet + IPv4/IPv6 (family of the addresses) + UDP + VXLAN."""
    if is_ipv4(src_ip) != is_ipv4(dst_ip):
        raise ValueError("VXLAN outer addresses of different families")
    payload = struct.pack("!B3xI", VXLAN_FLAG_I, (vni & 0xFF_FFFF) << 8) + frame
    ulen = 8 + len(payload)
    if is_ipv4(src_ip):
        udp = struct.pack("!HHHH", src_port, dst_port, ulen, 0)  # RFC 7348: zero over IPv4
        ip = _ipv4_header(
            tos=0,
            total=20 + ulen,
            ident=0,
            flags=IPV4_DF,
            ttl=ttl,
            proto=PROTO_UDP,
            src=src_ip,
            dst=dst_ip,
        )
        et = ETHERTYPE_IPV4
    else:
        udp = _udp_with_checksum(src_ip, dst_ip, src_port, dst_port, payload)
        ip = _ipv6_header(dscp=0, plen=ulen, nh=PROTO_UDP, ttl=ttl, src=src_ip, dst=dst_ip)
        et = ETHERTYPE_IPV6
    return _eth_header(dst_mac, src_mac, et) + ip + udp + payload


def vxlan_source_port(h: Headers) -> int:
    """RFC 7348 entropy source port (49152..65535) from a stable hash of the inner flow.

    CRC-32 of the key's text: deterministic across processes, unlike ``hash()``.
    """
    key = flow_key(h)
    material = key if key is not None else (h.src_mac, h.dst_mac, h.ethertype)
    return VXLAN_SPORT_MIN + zlib.crc32(repr(material).encode()) % VXLAN_SPORT_SPAN


def vxlan_decap(frame: bytes, h: Headers) -> bytes:
    """The inner Ethernet frame of a parsed VXLAN packet (outer padding excluded)."""
    if h.inner_off is None:
        raise ValueError("not a VXLAN packet")
    return frame[h.inner_off : h.inner_end]


# ==============================================================================================
# Builders
# ==============================================================================================


def _eth_header(dst_mac: int, src_mac: int, ethertype: int, vlan: int | None = None) -> bytes:
    """Ethernet header, with one 802.1Q tag if ``vlan`` is given."""
    macs = dst_mac.to_bytes(6, "big") + src_mac.to_bytes(6, "big")
    if vlan is None:
        return macs + _U16.pack(ethertype)
    return macs + struct.pack("!HHH", ETHERTYPE_VLAN, vlan & 0x0FFF, ethertype)


def push_vlan(frame: bytes, vid: int, tpid: int = ETHERTYPE_VLAN, pcp: int = 0) -> bytes:
    """Insert a VLAN tag right after the MACs (becomes the outermost tag)."""
    return frame[:12] + struct.pack("!HH", tpid, (pcp & 7) << 13 | (vid & 0x0FFF)) + frame[12:]


def _retag(new: bytes, like: bytes, h: Headers) -> bytes:
    """Give an untagged ``new`` frame the VLAN tags of ``like`` (the frame ``h`` describes)."""
    return new[:12] + like[12 : h.l3_off - 2] + new[12:]


def _ipv4_header(
    *,
    tos: int,
    total: int,
    ident: int,
    flags: int,
    ttl: int,
    proto: int,
    src: int,
    dst: int,
    options: bytes = b"",
) -> bytes:
    """IPv4 header with a correct checksum; ``options`` padded with EOL to 4 bytes."""
    options += b"\0" * (-len(options) % 4)
    vihl = 0x40 | (5 + len(options) // 4)
    hdr = bytearray(
        struct.pack(
            "!BBHHHBBHII",
            vihl,
            tos,
            total,
            ident,
            flags,
            ttl,
            proto,
            0,
            src & 0xFFFF_FFFF,
            dst & 0xFFFF_FFFF,
        )
        + options
    )
    _U16.pack_into(hdr, 10, checksum(hdr))
    return bytes(hdr)


def _ipv6_header(*, dscp: int, plen: int, nh: int, ttl: int, src: int, dst: int) -> bytes:
    """IPv6 fixed header."""
    return (
        struct.pack("!IHBB", 6 << 28 | dscp << 22, plen, nh, ttl)
        + src.to_bytes(16, "big")
        + dst.to_bytes(16, "big")
    )


def _ipv6_ext_chain(ext: Sequence[tuple[int, bytes]], upper: int) -> tuple[int, bytes]:
    """Encode ``(type, body)`` extension headers; returns (first next-header, bytes).

    ``body`` is what follows the next-header/length bytes; it is zero-padded (Pad1 options)
    to the header's unit. A fragment header body is 6 bytes: offset/flags word + id.
    """
    out = b""
    for i in range(len(ext) - 1, -1, -1):
        kind, body = ext[i]
        body += b"\0" * (-(len(body) + 2) % 8)
        size = len(body) + 2
        hlen = size // 4 - 2 if kind == IPV6_AH else (0 if kind == IPV6_FRAGMENT else size // 8 - 1)
        out = bytes([upper, hlen]) + body + out
        upper = kind
    return upper, out


def _udp_with_checksum(src: int, dst: int, sport: int, dport: int, payload: bytes) -> bytes:
    """UDP header with the pseudo-header checksum (0 sent as 0xFFFF)."""
    ulen = 8 + len(payload)
    hdr = struct.pack("!HHHH", sport, dport, ulen, 0)
    csum = checksum(pseudo_header(src, dst, PROTO_UDP, ulen) + hdr + payload) or 0xFFFF
    return struct.pack("!HHHH", sport, dport, ulen, csum)


def _l4_segment(
    proto: int,
    src: int,
    dst: int,
    sport: int,
    dport: int,
    payload: bytes,
    *,
    tcp_flags: int,
    tcp_seq: int,
    tcp_ack: int,
    icmp_type: int | None,
    icmp_code: int,
    icmp_id: int,
    icmp_seq: int,
) -> bytes:
    """TCP/UDP/ICMP/ICMPv6 header + payload with a correct checksum; other protocols raw."""
    if proto == PROTO_UDP:
        return _udp_with_checksum(src, dst, sport, dport, payload) + payload
    if proto == PROTO_TCP:
        seg = bytearray(
            struct.pack(
                "!HHIIBBHHH", sport, dport, tcp_seq, tcp_ack, 5 << 4, tcp_flags, 65535, 0, 0
            )
            + payload
        )
        at, pseudo = 16, pseudo_header(src, dst, proto, len(seg))
    elif proto in (PROTO_ICMP, PROTO_ICMPV6):
        if icmp_type is None:
            icmp_type = ICMP_ECHO_REQUEST if proto == PROTO_ICMP else ICMPV6_ECHO_REQUEST
        seg = bytearray(struct.pack("!BBHHH", icmp_type, icmp_code, 0, icmp_id, icmp_seq) + payload)
        at = 2
        pseudo = b"" if proto == PROTO_ICMP else pseudo_header(src, dst, proto, len(seg))
    else:
        return payload
    _U16.pack_into(seg, at, checksum(pseudo + seg))
    return bytes(seg)


def build_frame(
    *,
    src_mac: int,
    dst_mac: int,
    src: int,
    dst: int,
    proto: int,
    sport: int = 0,
    dport: int = 0,
    payload: bytes = b"",
    tcp_flags: int = 0x18,
    tcp_seq: int = 0,
    tcp_ack: int = 0,
    icmp_type: int | None = None,
    icmp_code: int = 0,
    icmp_id: int = 0,
    icmp_seq: int = 0,
    vlan: int | None = None,
    dscp: int = 0,
    ttl: int = 64,
    ip_id: int = 0,
    df: bool = False,
    ip_options: bytes = b"",
    ipv6_ext: Sequence[tuple[int, bytes]] = (),
) -> bytes:
    """A complete frame with correct checksums (tests, demo captures, benchmarks).

    IPv4 or IPv6 by the family of ``src``. ICMP defaults to an echo request; for other ICMP
    types bytes 4..8 of the message are ``icmp_id, icmp_seq`` (e.g. the next-hop MTU).
    """
    v4 = is_ipv4(src)
    if v4 != is_ipv4(dst):
        raise ValueError("src and dst of different families")
    seg = _l4_segment(
        proto,
        src,
        dst,
        sport,
        dport,
        payload,
        tcp_flags=tcp_flags,
        tcp_seq=tcp_seq,
        tcp_ack=tcp_ack,
        icmp_type=icmp_type,
        icmp_code=icmp_code,
        icmp_id=icmp_id,
        icmp_seq=icmp_seq,
    )
    if v4:
        opts = ip_options + b"\0" * (-len(ip_options) % 4)
        ip = _ipv4_header(
            tos=dscp << 2,
            total=20 + len(opts) + len(seg),
            ident=ip_id,
            flags=IPV4_DF if df else 0,
            ttl=ttl,
            proto=proto,
            src=src,
            dst=dst,
            options=opts,
        )
        return _eth_header(dst_mac, src_mac, ETHERTYPE_IPV4, vlan) + ip + seg
    nh, chain = _ipv6_ext_chain(ipv6_ext, proto)
    ip = _ipv6_header(dscp=dscp, plen=len(chain) + len(seg), nh=nh, ttl=ttl, src=src, dst=dst)
    return _eth_header(dst_mac, src_mac, ETHERTYPE_IPV6, vlan) + ip + chain + seg


def build_icmp_error(
    packet: bytes, *, src_mac: int, src: int, icmp_type: int, icmp_code: int = 0, mtu: int = 0
) -> bytes:
    """An ICMP/ICMPv6 error from router ``src`` about ``packet``, sent back to its source.

    Quotes as much of the offending IP packet as fits the RFC size limit; ``mtu`` goes where
    "fragmentation needed" (v4) / "packet too big" (v6) put it.
    """
    h = parse(packet)
    if isinstance(h, str) or h.ip_version is None:
        raise ValueError("not an IP packet")
    v4 = h.ip_version == 4
    quote = packet[h.l3_off : h.ip_end][: ICMPV4_QUOTE_MAX if v4 else ICMPV6_QUOTE_MAX]
    frame = build_frame(
        src_mac=src_mac,
        dst_mac=h.src_mac,
        src=src,
        dst=h.src,  # type: ignore[arg-type]
        proto=PROTO_ICMP if v4 else PROTO_ICMPV6,
        icmp_type=icmp_type,
        icmp_code=icmp_code,
        icmp_id=mtu >> 16,
        icmp_seq=mtu & 0xFFFF,
        payload=quote,
    )
    return _retag(frame, packet, h)


def fragment_ipv4(frame: bytes, mtu: int) -> list[bytes]:
    """Split an IPv4 frame into fragments whose IP packets fit ``mtu`` (DF is ignored).

    Later fragments carry only the options with the "copied" bit; MF/offset continue those
    of ``frame`` so fragmenting a fragment works as well.
    """
    h = parse(frame)
    if isinstance(h, str) or h.ip_version != 4 or h.ip_end is None:
        raise ValueError("not an IPv4 frame")
    o = h.l3_off
    ihl = (frame[o] & 0x0F) << 2
    payload = frame[o + ihl : h.ip_end]
    if ihl + len(payload) <= mtu:
        return [frame]
    _vihl, tos, _t, ident, ff, ttl, proto, _c, src, dst = _IPV4.unpack_from(frame, o)
    base = (ff & IPV4_OFFMASK) << 3
    options = frame[o + 20 : o + ihl]
    copied = _copied_options(options)
    out = []
    i = 0
    while i < len(payload):
        opts = options if i == 0 else copied
        chunk = (mtu - 20 - len(opts)) // 8 * 8
        if chunk <= 0:
            raise ValueError(f"MTU {mtu} too small to fragment")
        piece = payload[i : i + chunk]
        last = i + chunk >= len(payload)
        flags = (ff & IPV4_MF if last else IPV4_MF) | ((base + i) >> 3)
        hdr = _ipv4_header(
            tos=tos,
            total=20 + len(opts) + len(piece),
            ident=ident,
            flags=flags,
            ttl=ttl,
            proto=proto,
            src=src,
            dst=dst,
            options=opts,
        )
        out.append(frame[:o] + hdr + piece)
        i += chunk
    return out


def _copied_options(options: bytes) -> bytes:
    """The IPv4 options with the copied flag (RFC 791), padded to 4 bytes."""
    out = b""
    i = 0
    while i < len(options):
        kind = options[i]
        if kind == 0:
            break
        if kind == 1:
            i += 1
            continue
        if i + 1 >= len(options) or options[i + 1] < 2:
            break
        size = options[i + 1]
        if kind & 0x80:
            out += options[i : i + size]
        i += size
    return out + b"\0" * (-len(out) % 4)


def build_arp_request(
    *, src_mac: int, src_ip: int, target_ip: int, vlan: int | None = None
) -> bytes:
    """Broadcast "who has ``target_ip``, tell ``src_ip``"."""
    arp = _arp_body(ARP_REQUEST, src_mac, src_ip, 0, target_ip)
    return _eth_header(BROADCAST_MAC, src_mac, ETHERTYPE_ARP, vlan) + arp


def _arp_body(op: int, sha: int, spa: int, tha: int, tpa: int) -> bytes:
    """Ethernet/IPv4 ARP packet."""
    return struct.pack(
        "!HHBBH6sI6sI",
        1,
        ETHERTYPE_IPV4,
        6,
        4,
        op,
        sha.to_bytes(6, "big"),
        spa & 0xFFFF_FFFF,
        tha.to_bytes(6, "big"),
        tpa & 0xFFFF_FFFF,
    )


def build_arp_reply(frame: bytes, h: Headers, mac: int) -> bytes:
    """Answer the ARP request ``frame``: "target IP is at ``mac``", unicast to the requester."""
    if h.arp_op != ARP_REQUEST:
        raise ValueError("not an ARP request")
    arp = _arp_body(ARP_REPLY, mac, h.arp_tpa, h.arp_sha, h.arp_spa)  # type: ignore[arg-type]
    return _retag(_eth_header(h.src_mac, mac, ETHERTYPE_ARP) + arp, frame, h)


def _solicited_node(target: int) -> int:
    """ff02::1:ffXX:XXXX for the low 24 bits of ``target``."""
    return IPV6_SOLICITED_NODE | (target & 0xFF_FFFF)


def build_neighbor_solicit(
    *, src_mac: int, src_ip: int, target_ip: int, vlan: int | None = None
) -> bytes:
    """NS for ``target_ip`` to its solicited-node group (no SLLA option from ``::``, DAD)."""
    group = _solicited_node(target_ip)
    option = b"" if src_ip == 0 else bytes([ND_OPT_SLLA, 1]) + src_mac.to_bytes(6, "big")
    return build_frame(
        src_mac=src_mac,
        dst_mac=IPV6_MCAST_MAC | (group & 0xFFFF_FFFF),
        src=src_ip,
        dst=group,
        proto=PROTO_ICMPV6,
        icmp_type=ICMPV6_NS,
        payload=target_ip.to_bytes(16, "big") + option,
        ttl=255,
        vlan=vlan,
    )


def build_neighbor_advert(frame: bytes, h: Headers, mac: int) -> bytes:
    """NA answering the NS ``frame``: target is at ``mac`` (solicited + override, hop limit 255).

    An NS from ``::`` (duplicate address detection) is answered to all-nodes, unsolicited.
    """
    if h.icmp_type != ICMPV6_NS or h.nd_target is None or h.src is None:
        raise ValueError("not a neighbor solicitation")
    if h.src == 0:
        dst, dst_mac, flags = IPV6_ALL_NODES, IPV6_MCAST_MAC | 1, NA_FLAG_OVERRIDE
    else:
        dst = h.src
        dst_mac = h.nd_ll if h.nd_ll is not None else h.src_mac
        flags = NA_FLAG_SOLICITED | NA_FLAG_OVERRIDE
    option = bytes([ND_OPT_TLLA, 1]) + mac.to_bytes(6, "big")
    na = build_frame(
        src_mac=mac,
        dst_mac=dst_mac,
        src=h.nd_target,
        dst=dst,
        proto=PROTO_ICMPV6,
        icmp_type=ICMPV6_NA,
        icmp_id=flags << 8,
        payload=h.nd_target.to_bytes(16, "big") + option,
        ttl=255,
    )
    return _retag(na, frame, h)
