"""Rewriting frames: MACs, addresses, ports and ICMP ids, with incremental checksums."""

from __future__ import annotations

from appliance.model import is_ipv4
from appliance.packet.checksum import _adjust
from appliance.packet.headers import (
    _U16,
    FRAG_LATER,
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_TCP,
    PROTO_UDP,
    Headers,
)

# ==============================================================================================
# Rewriting
# ==============================================================================================


def _addr_bytes(value: int, version: int) -> bytes:
    """Wire form of a shared-space address for a header of IP ``version``."""
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


def set_macs(frame: bytes, src: int | None, dst: int | None) -> bytes:
    """Splice Ethernet addresses into a frame (None keeps the frame's own); no checksum
    covers them, so nothing needs parsing."""
    if src is None and dst is None:
        return frame
    d = dst.to_bytes(6) if dst is not None else frame[0:6]
    s = src.to_bytes(6) if src is not None else frame[6:12]
    return d + s + frame[12:]
