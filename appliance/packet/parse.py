"""Parsing frames into `Headers`, and flow keys.

A bad frame is never an exception: `parse` returns one of `DROP_REASONS` instead. The parser is
written for a per-packet Python loop: precompiled `struct` unpackers fill one slotted `Headers`
object; `fast_flow_key` is the common case's key straight from the bytes.
"""

from __future__ import annotations

from typing import Final

from appliance.model import IPV4_BASE, is_ipv4
from appliance.packet.headers import (
    _ARP,
    _ETH,
    _FAST4,
    _FAST4_LEN,
    _FAST4_MAGIC,
    _FAST6,
    _FAST6_LEN,
    _FRAG6,
    _IPV4,
    _IPV6,
    _TCP,
    _U16,
    _UDP,
    _VLAN,
    _VXLAN,
    ETH_HLEN,
    ETHERTYPE_ARP,
    ETHERTYPE_IPV4,
    ETHERTYPE_IPV6,
    ETHERTYPE_QINQ,
    ETHERTYPE_VLAN,
    FRAG_FIRST,
    FRAG_LATER,
    FRAG_NONE,
    ICMP_ECHO_REPLY,
    ICMP_ECHO_REQUEST,
    ICMP_ERROR_TYPES,
    ICMPV6_ECHO_REPLY,
    ICMPV6_ECHO_REQUEST,
    ICMPV6_ERROR_TYPES,
    ICMPV6_NA,
    ICMPV6_NS,
    IPV4_MF,
    IPV4_OFFMASK,
    IPV6_AH,
    IPV6_EXT_HEADERS,
    IPV6_FRAGMENT,
    IPV6_HOPOPTS,
    MALFORMED_ARP,
    MALFORMED_ICMP,
    MALFORMED_ICMPV6,
    MALFORMED_IPV4,
    MALFORMED_IPV6,
    MALFORMED_TCP,
    MALFORMED_UDP,
    MALFORMED_VLAN,
    MALFORMED_VXLAN,
    MAX_VLAN_TAGS,
    ND_OPT_SLLA,
    ND_OPT_TLLA,
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_TCP,
    PROTO_UDP,
    TRUNCATED_ETH,
    VXLAN_FLAG_I,
    VXLAN_HLEN,
    VXLAN_PORT,
    Headers,
)

# ==============================================================================================
# Parsing
# ==============================================================================================


def parse(frame: bytes, *, tunnel: bool = True) -> Headers | str:
    """Parse an Ethernet frame; a drop-reason string from `DROP_REASONS` if it is malformed.

    ``tunnel=False`` parses the way a VXLAN inner frame is parsed (UDP to 4789 is plain UDP):
    the frame a decap leaves behind must be read exactly as it was read inside the tunnel.
    """
    return _parse_eth(frame, 0, len(frame), tunnel)


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
    h.src = IPV4_BASE | src
    h.dst = IPV4_BASE | dst
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
        IPV4_BASE | src,
        IPV4_BASE | dst,
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
    h.arp_spa = IPV4_BASE | spa
    h.arp_tha = tha_hi << 32 | tha_lo
    h.arp_tpa = IPV4_BASE | tpa
    return None


# ==============================================================================================
# Flow keys
# ==============================================================================================

_ECHO_TYPES: Final = {
    PROTO_ICMP: (ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY),
    PROTO_ICMPV6: (ICMPV6_ECHO_REQUEST, ICMPV6_ECHO_REPLY),
}


# Positions in a flow key ``(vlan, proto, src, sport, dst, dport, tun)``: a key is a plain tuple
# (it is built for every packet and stored for every flow: no object overhead), read by name.
K_VLAN: Final = 0
K_PROTO: Final = 1
K_SRC: Final = 2
K_SPORT: Final = 3
K_DST: Final = 4
K_DPORT: Final = 5
K_TUN: Final = 6

# An ICMP key's port pair says which kind of message it is, so no kind can ride another's flow:
# echo request (id, ICMP_ECHO), echo reply (ICMP_ECHO, id) -- a reply is the reverse key of its
# request -- and any other message (ICMP_OTHER | type, code). Both marks lie outside 0..65535,
# so they never equal an id, a type or a TCP/UDP port.
ICMP_ECHO: Final = 1 << 16
ICMP_OTHER: Final = 2 << 16


def flow_key(h: Headers) -> tuple | None:
    """``(vlan, proto, src, sport, dst, dport, tun)``; None for non-IP (also inside a tunnel).

    For VXLAN the IP part is the inner packet's and ``tun`` is ``(outer src, outer dst, vni,
    inner vlan)``, so flows are tracked per tenant packet while the tunnel endpoints and the
    tenant's own VLAN tag stay part of the key (an inner-tagged frame never rides the flow of
    an untagged one). ICMP port pairs: see `ICMP_ECHO`.
    """
    tun = None
    f = h
    if h.vni is not None and h.inner is not None:
        f = h.inner
        tun = (h.src, h.dst, h.vni, f.vlan)
    if f.src is None:
        return None
    sport, dport = _key_ports(f)
    return (h.vlan, f.proto, f.src, sport, f.dst, dport, tun)


def _key_ports(h: Headers) -> tuple[int, int]:
    """Port pair of a flow key (see `ICMP_ECHO` for ICMP)."""
    if h.l4_off is None:
        return 0, 0  # non-first fragment
    proto = h.proto
    if proto in (PROTO_TCP, PROTO_UDP):
        return h.sport, h.dport  # type: ignore[return-value]
    t = h.icmp_type
    if t is None:
        return 0, 0
    request, reply = _ECHO_TYPES[proto]  # type: ignore[index]
    if t == request and h.icmp_id is not None:
        return h.icmp_id, ICMP_ECHO
    if t == reply and h.icmp_id is not None:
        return ICMP_ECHO, h.icmp_id
    return ICMP_OTHER | t, h.icmp_code  # type: ignore[return-value]


def headers_from_key(key: tuple, *, src_mac: int = 0, dst_mac: int = 0) -> Headers:
    """Abstract headers of a packet with this flow key (no bytes behind them).

    Lets the pipeline evaluate policy for a flow without a packet: to adopt the kernel
    entries a previous run left, and to revalidate flows after a policy change. What a key
    does not hold (MACs, DSCP, TTL) is unknown and set neutral.
    """
    vlan, proto, src, sport, dst, dport, tun = key
    v4 = is_ipv4(src)
    h = Headers(src_mac=src_mac, dst_mac=dst_mac, vlan=tun[3] if tun else vlan,
                ethertype=ETHERTYPE_IPV4 if v4 else ETHERTYPE_IPV6, l3_off=ETH_HLEN,
                ip_version=4 if v4 else 6, src=src, dst=dst, proto=proto, dscp=0, ttl=64,
                l4_off=ETH_HLEN + (20 if v4 else 40))  # not None: the key has L4 fields
    if proto in (PROTO_TCP, PROTO_UDP):
        h.sport, h.dport = sport, dport
    elif proto in _ECHO_TYPES:
        request, reply = _ECHO_TYPES[proto]
        if dport == ICMP_ECHO:
            h.icmp_type, h.icmp_id = request, sport
        elif sport == ICMP_ECHO:
            h.icmp_type, h.icmp_id = reply, dport
        elif sport & ICMP_OTHER:
            h.icmp_type, h.icmp_code = sport & 0xFF, dport
        else:
            h.l4_off = None  # a later fragment: no ICMP header in it
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
        tun = (tun[1], tun[0], tun[2], tun[3])
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
    return (None, proto, IPV4_BASE | src, sport, IPV4_BASE | dst, dport, None)


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


class PacketInvariantError(Exception):
    """A frame that was parsed before does not parse again: a bug, never input."""


def parse_known(frame: bytes, *, tunnel: bool = True) -> Headers:
    """Parse a frame that is known to be well-formed (it was parsed or keyed before)."""
    h = parse(frame, tunnel=tunnel)
    if isinstance(h, str):
        raise PacketInvariantError(f"re-parsing a known frame failed: {h}")
    return h
