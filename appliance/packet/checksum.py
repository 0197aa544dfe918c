"""Internet checksums: from scratch (builders, tests) and incrementally (RFC 1624 eqn. 3).

Rewrites always update checksums incrementally, because the datapath does not always see all
the data a checksum covers (IP fragments, truncated quotes in ICMP errors).
"""

from __future__ import annotations

import struct
from typing import Final

from appliance.model import is_ipv4
from appliance.packet.headers import (
    _U16,
    FRAG_NONE,
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_TCP,
    PROTO_UDP,
    Headers,
)
from appliance.packet.parse import parse

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


def pseudo_header(src: int, dst: int, proto: int, length: int) -> bytes:
    """TCP/UDP/ICMPv6 pseudo-header for addresses in the shared space (family of ``src``)."""
    if is_ipv4(src):
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
        data = pseudo_header(h.src, h.dst, h.proto, len(data)) + data  # type: ignore[arg-type]
    out[prefix + name] = checksum(data) == 0


_L4_NAMES: Final = {
    (PROTO_TCP, 4): "tcp",
    (PROTO_TCP, 6): "tcp",
    (PROTO_UDP, 4): "udp",
    (PROTO_UDP, 6): "udp",
    (PROTO_ICMP, 4): "icmp",
    (PROTO_ICMPV6, 6): "icmpv6",
}
