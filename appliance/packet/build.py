"""Building frames: VXLAN encapsulation, ARP/ND answers, ICMP errors, test and demo frames."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence

from appliance.model import is_ipv4
from appliance.packet.checksum import checksum, pseudo_header
from appliance.packet.headers import (
    _IPV4,
    _U16,
    ARP_REPLY,
    ARP_REQUEST,
    BROADCAST_MAC,
    ETHERTYPE_ARP,
    ETHERTYPE_IPV4,
    ETHERTYPE_IPV6,
    ETHERTYPE_VLAN,
    ICMP_ECHO_REQUEST,
    ICMPV4_QUOTE_MAX,
    ICMPV6_ECHO_REQUEST,
    ICMPV6_NA,
    ICMPV6_NS,
    ICMPV6_QUOTE_MAX,
    IPV4_DF,
    IPV4_MF,
    IPV4_OFFMASK,
    IPV6_AH,
    IPV6_ALL_NODES,
    IPV6_FRAGMENT,
    IPV6_MCAST_MAC,
    IPV6_SOLICITED_NODE,
    NA_FLAG_OVERRIDE,
    NA_FLAG_SOLICITED,
    ND_OPT_SLLA,
    ND_OPT_TLLA,
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_TCP,
    PROTO_UDP,
    VXLAN_FLAG_I,
    VXLAN_HLEN,
    VXLAN_PORT,
    VXLAN_SPORT_MIN,
    VXLAN_SPORT_SPAN,
    Headers,
)
from appliance.packet.parse import flow_key, parse

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


def vxlan_fits(frame_len: int, outer_v4: bool) -> bool:
    """Can a frame of ``frame_len`` bytes be carried in VXLAN at all? The outer IPv4 total
    length (or IPv6 payload length) is 16 bits; a bigger frame (a GSO super-packet, a
    hostile jumbo) is dropped, never wrapped into a corrupt header."""
    overhead = 20 + 8 + VXLAN_HLEN if outer_v4 else 8 + VXLAN_HLEN
    return frame_len + overhead <= 0xFFFF


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
