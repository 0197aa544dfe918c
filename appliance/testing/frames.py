"""Hostile Ethernet frames from the packet grammar, for fuzzers and namespace tests.

Every frame is drawn from a `Source` of decisions, so the same seed (`RandomSource`) or the
same fuzzer input bytes (`ByteSource`, `ProviderSource` over atheris' FuzzedDataProvider)
always give the same frame: a crash found once can be replayed from its seed or bytes, and a
coverage-guided fuzzer mutating the bytes mutates the *structure* of the frame, not just its
bits.

The grammar covers what a VM or the wire can send: Ethernet with 0-3 VLAN tags (802.1Q,
802.1ad, the old 0x9100), ARP, IPv4 with options and fragments, IPv6 with extension-header
chains and fragments, TCP (options), UDP, ICMP/ICMPv6 echo and errors quoting packets
(recursively), neighbour discovery with options, VXLAN with any inner frame (non-IP, ARP,
VXLAN again), and addresses of every class: unicast, the switch's own, IPv4-mapped
(``::ffff:0:0/96``), IPv4-compatible (``::/96``), unspecified, loopback, multicast (also as a
source), link-local, broadcast. `mutate` then breaks frames the way attackers and broken
stacks do: bit flips, truncation, length fields off by one, wrong checksums, wrong versions.

IPv6 packets are built here rather than with `appliance.packet.build_frame`, which picks the
family from the address value: an IPv6 header carrying an IPv4-mapped address (exactly what a
hostile VM sends) cannot be expressed with it. Checksums are computed over the pseudo-header
of the header's real version for the same reason.
"""

from __future__ import annotations

import builtins
import random
import struct
import zlib
from collections.abc import Callable, Sequence
from typing import Final, Protocol, TypeVar

from appliance import packet as pk
from appliance.model import ip_to_int, mac_to_int

T = TypeVar("T")

MAX_DEPTH: Final = 2  # VXLAN in VXLAN, or an ICMP error quoting a tunnelled packet
ETH_MIN: Final = 60  # Ethernet minimum frame (without FCS): shorter frames get padding
TPIDS: Final = (pk.ETHERTYPE_VLAN, pk.ETHERTYPE_QINQ, 0x9100)
ETHERTYPE_OTHER: Final = (0x88B5, 0x88CC, 0x8863, 0x8864, 0x8847, 0x88E5, 0x0842, 0x9000, 0x05DC)
IPPROTO_ESP: Final = 50
IPPROTO_GRE: Final = 47
IPPROTO_SCTP: Final = 132


# ==============================================================================================
# Sources of decisions
# ==============================================================================================


class Source(Protocol):
    """Where the grammar's decisions come from."""

    def int(self, lo: int, hi: int) -> int:
        """An integer in the closed range ``[lo, hi]``."""
        ...

    def bytes(self, n: builtins.int) -> bytes:
        """Exactly ``n`` bytes."""
        ...


def pick(s: Source, items: Sequence[T]) -> T:
    return items[s.int(0, len(items) - 1)]


def chance(s: Source, percent: int) -> bool:
    return s.int(0, 99) < percent


def weighted(s: Source, table: Sequence[tuple[int, T]]) -> T:
    """One item of ``(weight, item)`` pairs."""
    total = 0
    for w, _ in table:
        total += w
    x = s.int(0, total - 1)
    for w, item in table:
        if x < w:
            return item
        x -= w
    return table[-1][1]


class RandomSource:
    """Decisions from a seeded PRNG: ``RandomSource(seed)`` always yields the same frames."""

    def __init__(self, seed: int) -> None:
        self._r = random.Random(seed)
        self._random = self._r.random

    def int(self, lo: int, hi: int) -> int:
        # a float draw is 5x cheaper than randint; every range here is below 2**53
        return lo + int(self._random() * (hi - lo + 1))

    def bytes(self, n: builtins.int) -> bytes:
        return self._r.randbytes(n)


class ByteSource:
    """Decisions read from a byte string (a fuzzer's input), then from a PRNG seeded with it.

    Small ranges take one byte, larger ones as many as they need, so a mutated byte changes
    one decision and (mostly) leaves the following ones alone. Once the bytes are used up,
    decisions continue from `RandomSource` seeded by the bytes' CRC: a short input still
    makes a rich case, and the same input always makes the same one.
    """

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0
        self._rest: RandomSource | None = None

    def _tail(self) -> RandomSource:
        if self._rest is None:
            self._rest = RandomSource(zlib.crc32(self._data))
        return self._rest

    def int(self, lo: int, hi: int) -> int:
        span = hi - lo
        if span <= 0:
            return lo
        n = (span.bit_length() + 7) // 8
        if self._pos + n > len(self._data):
            return self._tail().int(lo, hi)
        raw = self._data[self._pos : self._pos + n]
        self._pos += n
        return lo + int.from_bytes(raw, "big") % (span + 1)

    def bytes(self, n: builtins.int) -> bytes:
        if self._pos + n > len(self._data):
            return self._tail().bytes(n)
        raw = self._data[self._pos : self._pos + n]
        self._pos += n
        return raw


class ProviderSource:
    """Decisions from atheris' ``FuzzedDataProvider`` (what its mutators are tuned for)."""

    def __init__(self, provider: object) -> None:
        self._p = provider

    def int(self, lo: int, hi: int) -> int:
        return self._p.ConsumeIntInRange(lo, hi)  # type: ignore[attr-defined]

    def bytes(self, n: builtins.int) -> bytes:
        raw = self._p.ConsumeBytes(n)  # type: ignore[attr-defined]
        return raw + bytes(n - len(raw))


# ==============================================================================================
# Addresses of every class
# ==============================================================================================


def _v4(text: str) -> int:
    """IPv4 as a plain 32-bit integer (the wire value)."""
    return ip_to_int(text) & 0xFFFF_FFFF


def _v6(text: str) -> int:
    return ip_to_int(text)


# The switch's own addresses in tests/helpers.py, tests/daemon_lab.py and tools/fuzz.py:
# ports, SNAT address, DNAT VIP, tunnel endpoints, the "internet" host, overlay hosts.
V4_KNOWN: Final = tuple(_v4(a) for a in (
    "10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.254", "198.51.100.7",
    "198.51.100.80", "203.0.113.1", "203.0.113.2", "203.0.113.50", "192.0.2.10", "10.1.2.3",
    "8.8.8.8"))
V4_CLASSES: Final[dict[str, tuple[int, ...]]] = {
    "known": V4_KNOWN,
    "broadcast": (_v4("255.255.255.255"), _v4("10.0.0.255")),
    "multicast": (_v4("224.0.0.1"), _v4("224.0.0.251"), _v4("239.1.2.3"), _v4("224.0.1.1")),
    "loopback": (_v4("127.0.0.1"), _v4("127.255.255.254")),
    "unspecified": (0,),
    "link_local": (_v4("169.254.1.1"),),
    "reserved": (_v4("240.0.0.1"), _v4("0.1.2.3"), _v4("100.64.0.1")),
}
V6_KNOWN: Final = tuple(_v6(a) for a in (
    "fd00::1", "fd00::2", "fd00::3", "fd00::4", "fd00::fe", "2001:db8::7", "2001:db8::80",
    "2001:db8:1::1", "2001:db8:1::2", "2001:db8::10", "fd00:1::5"))
V6_CLASSES: Final[dict[str, tuple[int, ...]]] = {
    "known": V6_KNOWN,
    "mapped": tuple(0xFFFF_0000_0000 | a for a in V4_KNOWN[:8]),  # ::ffff:a.b.c.d
    "compatible": tuple(a for a in V4_KNOWN[:8]),  # ::a.b.c.d (deprecated, RFC 4291)
    "unspecified": (0,),
    "loopback": (1,),
    "multicast": (_v6("ff02::1"), _v6("ff02::2"), _v6("ff02::1:ff00:1"), _v6("ff05::1:3"),
                  _v6("ff0e::1"), _v6("ff01::1")),
    "link_local": (_v6("fe80::1"), _v6("fe80::200:ff:fe00:1")),
    "nat64": (_v6("64:ff9b::c000:20a"),),
    "6to4": (_v6("2002:c000:20a::1"),),
}

PORT_MACS: Final = tuple(mac_to_int(f"02:00:00:00:00:{n:02x}") for n in (1, 2, 3, 4))
MACS: Final = (*PORT_MACS, mac_to_int("02:00:00:00:00:fe"), mac_to_int("02:bb:00:00:00:01"),
               mac_to_int("02:aa:00:00:00:01"), pk.BROADCAST_MAC, 0x3333_0000_0001,
               0x3333_FF00_0001, 0x0100_5E00_0001, 0, 0x0180_C200_0000)
PORTS: Final = (0, 1, 22, 25, 53, 67, 68, 80, 443, 546, 547, 4789, 8080, 8472, 33434, 49152,
                65535)
VNIS: Final = (0, 1, 5001, 5002, 6001, 9, 0xFF_FFFF)


def v4_address(s: Source) -> int:
    """A 32-bit IPv4 address: mostly the switch's own, sometimes any class or any value."""
    cls = weighted(s, ((10, "known"), (1, "broadcast"), (1, "multicast"), (1, "loopback"),
                       (1, "unspecified"), (1, "link_local"), (1, "reserved"), (2, "random")))
    if cls == "random":
        return s.int(0, 0xFFFF_FFFF)
    return pick(s, V4_CLASSES[cls])


def v6_address(s: Source) -> int:
    """A 128-bit IPv6 address of any class (IPv4-mapped and -compatible included)."""
    cls = weighted(s, ((8, "known"), (3, "mapped"), (2, "compatible"), (1, "unspecified"),
                       (1, "loopback"), (2, "multicast"), (1, "link_local"), (1, "nat64"),
                       (1, "6to4"), (1, "random")))
    if cls == "random":
        return int.from_bytes(s.bytes(16), "big")
    return pick(s, V6_CLASSES[cls])


def mac(s: Source) -> int:
    return pick(s, MACS) if chance(s, 90) else int.from_bytes(s.bytes(6), "big")


def l4_port(s: Source) -> int:
    return pick(s, PORTS) if chance(s, 60) else s.int(0, 0xFFFF)


# ==============================================================================================
# Headers (explicit IP version: no guessing from the address value)
# ==============================================================================================


def pseudo_header(version: int, src: int, dst: int, proto: int, length: int) -> bytes:
    """TCP/UDP/ICMPv6 pseudo-header of an IPv``version`` header (addresses as on the wire)."""
    if version == 4:
        return struct.pack("!IIBBH", src & 0xFFFF_FFFF, dst & 0xFFFF_FFFF, 0, proto,
                           length & 0xFFFF)
    return (src.to_bytes(16, "big") + dst.to_bytes(16, "big")
            + struct.pack("!IxxxB", length, proto))


def with_checksum(seg: bytes, at: int, pseudo: bytes) -> bytes:
    """``seg`` with the Internet checksum over ``pseudo + seg`` stored at ``at``."""
    if at + 2 > len(seg):
        return seg
    buf = bytearray(seg)
    buf[at : at + 2] = b"\0\0"
    csum = pk.checksum(pseudo + buf)
    struct.pack_into("!H", buf, at, csum)
    return bytes(buf)


def tcp_segment(version: int, src: int, dst: int, sport: int, dport: int, *, flags: int,
                seq: int = 0, ack: int = 0, options: bytes = b"", payload: bytes = b"",
                window: int = 65535) -> bytes:
    options += b"\x01" * (-len(options) % 4)  # NOP padding
    doff = (20 + len(options)) // 4
    seg = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, (doff & 0xF) << 4, flags, window,
                      0, 0) + options + payload
    return with_checksum(seg, 16, pseudo_header(version, src, dst, pk.PROTO_TCP, len(seg)))


def udp_datagram(version: int, src: int, dst: int, sport: int, dport: int,
                 payload: bytes, *, zero_checksum: bool = False) -> bytes:
    ulen = (8 + len(payload)) & 0xFFFF  # a 64 KiB payload wraps, as on a hostile wire
    seg = struct.pack("!HHHH", sport, dport, ulen, 0) + payload
    if zero_checksum:
        return seg
    seg = with_checksum(seg, 6, pseudo_header(version, src, dst, pk.PROTO_UDP, len(seg)))
    if seg[6:8] == b"\0\0":
        seg = seg[:6] + b"\xff\xff" + seg[8:]
    return seg


def icmp_message(version: int, src: int, dst: int, icmp_type: int, code: int, rest: bytes,
                 body: bytes) -> bytes:
    """ICMP (v4) or ICMPv6 message: type, code, checksum, 4 bytes ``rest``, ``body``."""
    seg = struct.pack("!BBH", icmp_type, code, 0) + rest[:4].ljust(4, b"\0") + body
    if version == 4:
        return with_checksum(seg, 2, b"")
    return with_checksum(seg, 2, pseudo_header(6, src, dst, pk.PROTO_ICMPV6, len(seg)))


def ipv4_header(src: int, dst: int, proto: int, payload_len: int, *, tos: int = 0,
                ident: int = 0, flags_off: int = 0, ttl: int = 64, options: bytes = b"") -> bytes:
    options += b"\0" * (-len(options) % 4)
    ihl = 5 + len(options) // 4
    hdr = bytearray(struct.pack("!BBHHHBBHII", 0x40 | (ihl & 0xF), tos,
                                (ihl * 4 + payload_len) & 0xFFFF, ident, flags_off, ttl, proto, 0,
                                src & 0xFFFF_FFFF, dst & 0xFFFF_FFFF) + options)
    struct.pack_into("!H", hdr, 10, pk.checksum(hdr))
    return bytes(hdr)


def ipv6_header(src: int, dst: int, nh: int, payload_len: int, *, tclass: int = 0,
                flow: int = 0, hlim: int = 64) -> bytes:
    return (struct.pack("!IHBB", 6 << 28 | (tclass & 0xFF) << 20 | (flow & 0xFFFFF),
                        payload_len & 0xFFFF, nh, hlim)
            + src.to_bytes(16, "big") + dst.to_bytes(16, "big"))


def ethernet(dst_mac: int, src_mac: int, ethertype: int, payload: bytes,
             tags: Sequence[tuple[int, int]] = (), pad: bytes | None = None) -> bytes:
    """Ethernet header with ``tags`` ((TPID, TCI) outermost first); padded to 60 bytes with
    ``pad`` (zeros by default; garbage padding is legal and must be ignored)."""
    out = dst_mac.to_bytes(6, "big") + src_mac.to_bytes(6, "big")
    for tpid, tci in tags:
        out += struct.pack("!HH", tpid, tci)
    out += struct.pack("!H", ethertype) + payload
    if len(out) < ETH_MIN:
        fill = pad if pad is not None else b""
        out += (fill + bytes(ETH_MIN))[: ETH_MIN - len(out)]
    return out


# ==============================================================================================
# The grammar
# ==============================================================================================


def _tcp_options(s: Source) -> bytes:
    out = b""
    for _ in range(s.int(0, 4)):
        kind = weighted(s, ((3, "mss"), (2, "ws"), (2, "sackok"), (2, "ts"), (1, "sack"),
                            (2, "nop"), (1, "eol"), (1, "junk")))
        if kind == "mss":
            out += struct.pack("!BBH", 2, 4, s.int(0, 0xFFFF))
        elif kind == "ws":
            out += struct.pack("!BBB", 3, 3, s.int(0, 20))
        elif kind == "sackok":
            out += b"\x04\x02"
        elif kind == "ts":
            out += struct.pack("!BBII", 8, 10, s.int(0, 0xFFFF_FFFF), s.int(0, 0xFFFF_FFFF))
        elif kind == "sack":
            out += bytes([5, 10]) + s.bytes(8)
        elif kind == "nop":
            out += b"\x01"
        elif kind == "eol":
            out += b"\x00"
        else:
            out += bytes([s.int(0, 255), s.int(0, 40)]) + s.bytes(s.int(0, 6))
    return out[:40]


def _ipv4_options(s: Source) -> bytes:
    if not chance(s, 20):
        return b""
    out = b""
    for _ in range(s.int(1, 3)):
        kind = weighted(s, ((2, "nop"), (1, "eol"), (2, "ra"), (1, "rr"), (1, "ts"),
                            (1, "lsrr"), (1, "junk")))
        if kind == "nop":
            out += b"\x01"
        elif kind == "eol":
            out += b"\x00"
        elif kind == "ra":
            out += b"\x94\x04\x00\x00"  # router alert (copied)
        elif kind == "rr":
            out += bytes([7, 11, 4]) + s.bytes(8)
        elif kind == "ts":
            out += bytes([0x44, 12, 5, 0]) + s.bytes(8)
        elif kind == "lsrr":
            out += bytes([0x83, 7, 4]) + s.bytes(4)
        else:
            out += bytes([s.int(0, 255), s.int(0, 40)]) + s.bytes(s.int(0, 6))
    return out[:40]


BIG_PAYLOADS: Final = (1372, 1452, 1460, 1472, 1480, 1500, 8952, 8972, 9000, 65000, 65467,
                       65487, 65507, 65515, 65527)  # around MTUs, jumbo, the IPv4 maximum


def _payload(s: Source, limit: int = 64) -> bytes:
    """Empty, small, a few times ``limit``, or (rarely) MTU-sized up to the IP maximum."""
    n = weighted(s, ((4, 0), (6, 1), (2, 2), (1 if chance(s, 10) else 0, 3)))
    if n == 0:
        return b""
    if n == 1:
        return s.bytes(s.int(1, limit))
    if n == 2:
        return s.bytes(s.int(limit, 4 * limit))
    return s.bytes(pick(s, BIG_PAYLOADS))


def _icmp_rest(s: Source) -> bytes:
    return s.bytes(4)


def _l4(s: Source, version: int, src: int, dst: int, depth: int) -> tuple[int, bytes]:
    """An upper-layer protocol number and segment for an IPv``version`` packet."""
    icmp = pk.PROTO_ICMP if version == 4 else pk.PROTO_ICMPV6
    kind = weighted(s, ((8, "tcp"), (7, "udp"), (4, "icmp_echo"), (3, "icmp_error"),
                        (3 if version == 6 else 0, "nd"), (2, "vxlan"), (1, "icmp_other"),
                        (1, "other"), (1, "wrong_icmp")))
    if kind == "tcp":
        flags = weighted(s, ((4, 0x02), (2, 0x12), (4, 0x10), (3, 0x18), (2, 0x11), (1, 0x04),
                             (1, 0x14), (1, 0x03), (1, 0x00), (1, 0xFF)))
        return pk.PROTO_TCP, tcp_segment(
            version, src, dst, l4_port(s), l4_port(s), flags=flags, seq=s.int(0, 0xFFFF_FFFF),
            ack=s.int(0, 0xFFFF_FFFF), options=_tcp_options(s) if chance(s, 30) else b"",
            payload=_payload(s))
    if kind == "udp":
        return pk.PROTO_UDP, udp_datagram(version, src, dst, l4_port(s), l4_port(s),
                                          _payload(s), zero_checksum=chance(s, 10))
    if kind == "vxlan" and depth < MAX_DEPTH:
        return pk.PROTO_UDP, udp_datagram(version, src, dst, s.int(49152, 65535),
                                          pick(s, (4789, 4789, 4789, 8472)),
                                          vxlan_payload(s, depth), zero_checksum=chance(s, 50))
    if kind == "icmp_echo":
        t = pick(s, (8, 0)) if version == 4 else pick(s, (128, 129))
        return icmp, icmp_message(version, src, dst, t, 0, struct.pack(
            "!HH", pick(s, (0, 1, 7, 0xFFFF, s.int(0, 0xFFFF))), s.int(0, 0xFFFF)), _payload(s))
    if kind == "icmp_error" and depth < MAX_DEPTH:
        t = pick(s, (3, 4, 5, 11, 12)) if version == 4 else pick(s, (1, 2, 3, 4))
        quote = ip_packet(s, version if chance(s, 85) else 10 - version, depth + 1)
        quote = quote[: s.int(0, len(quote))] if chance(s, 50) else quote
        return icmp, icmp_message(version, src, dst, t, s.int(0, 5), _icmp_rest(s), quote)
    if kind == "nd":
        return pk.PROTO_ICMPV6, nd_message(s, src, dst)
    if kind == "icmp_other":
        t = s.int(0, 255)
        return icmp, icmp_message(version, src, dst, t, s.int(0, 255), _icmp_rest(s), _payload(s))
    if kind == "wrong_icmp":  # ICMP in IPv6 / ICMPv6 in IPv4
        other = pk.PROTO_ICMPV6 if version == 4 else pk.PROTO_ICMP
        return other, icmp_message(10 - version, src, dst, pick(s, (8, 128, 135, 1, 3)), 0,
                                   _icmp_rest(s), _payload(s))
    proto = pick(s, (IPPROTO_ESP, IPPROTO_GRE, IPPROTO_SCTP, 4, 41, 0, 255, 59, 43, 44))
    return proto, _payload(s)


def nd_option(s: Source) -> bytes:
    kind = weighted(s, ((4, "lla"), (1, "zero"), (1, "long"), (1, "prefix"), (1, "junk")))
    if kind == "lla":
        return bytes([pick(s, (1, 2)), 1]) + mac(s).to_bytes(6, "big")
    if kind == "zero":
        return bytes([s.int(1, 2), 0]) + s.bytes(6)  # length 0: RFC 4861 says discard
    if kind == "long":
        return bytes([s.int(1, 2), s.int(2, 255)]) + s.bytes(6)  # claims more than is there
    if kind == "prefix":
        return bytes([3, 4]) + s.bytes(30)
    units = s.int(1, 3)
    return bytes([s.int(0, 255), units]) + s.bytes(units * 8 - 2)


def nd_message(s: Source, src: int, dst: int) -> bytes:
    """Router/neighbour solicitation/advertisement or redirect, with options."""
    t = weighted(s, ((5, 135), (3, 136), (1, 133), (1, 134), (1, 137)))
    target = v6_address(s)
    if t in (135, 136):
        body = target.to_bytes(16, "big")
    elif t == 137:
        body = target.to_bytes(16, "big") + v6_address(s).to_bytes(16, "big")
    elif t == 134:
        body = s.bytes(8)
    else:
        body = b""
    if chance(s, 10):
        body = body[: s.int(0, len(body))]  # target cut short
    for _ in range(s.int(0, 2)):
        body += nd_option(s)
    rest = struct.pack("!I", pick(s, (0, 0x6000_0000, 0x2000_0000, 0xE000_0000)))
    return icmp_message(6, src, dst, t, 0 if chance(s, 90) else s.int(1, 255), rest, body)


def _ipv6_ext(s: Source) -> list[tuple[int, bytes]]:
    """An extension-header chain: usually sane, sometimes out of order or oversized."""
    chain: list[tuple[int, bytes]] = []
    for i in range(weighted(s, ((6, 0), (4, 1), (3, 2), (1, 3), (1, 8)))):
        kind = pick(s, (pk.IPV6_HOPOPTS, pk.IPV6_DSTOPTS, pk.IPV6_ROUTING, pk.IPV6_FRAGMENT,
                        pk.IPV6_AH))
        if kind == pk.IPV6_HOPOPTS and i and chance(s, 70):
            kind = pk.IPV6_DSTOPTS  # hop-by-hop not first is malformed: only sometimes
        if kind in (pk.IPV6_HOPOPTS, pk.IPV6_DSTOPTS):
            opts = pick(s, (b"\x01\x04\0\0\0\0", b"\x05\x02\0\0\x01\x02\0\0\0\0",
                            b"\xc2\x04" + bytes(4), s.bytes(6), s.bytes(14)))
            chain.append((kind, opts))
        elif kind == pk.IPV6_ROUTING:
            rtype = pick(s, (0, 2, 3, 4))
            segs = s.int(0, 2)
            chain.append((kind, bytes([rtype, segs]) + bytes(4) + s.bytes(16 * segs)))
        elif kind == pk.IPV6_FRAGMENT:
            off = pick(s, (0, 0, 1, 8, s.int(0, 0x1FFF)))
            chain.append((kind, struct.pack("!HI", off << 3 | s.int(0, 1), s.int(0, 0xFFFF_FFFF))))
        else:
            chain.append((kind, bytes(2) + s.bytes(4) + s.bytes(4 * s.int(1, 3))))
    return chain


def _ipv6_ext_bytes(chain: Sequence[tuple[int, bytes]], upper: int) -> tuple[int, bytes]:
    """Encode an extension-header chain; the first next-header value and the bytes."""
    out = b""
    for kind, body in reversed(chain):
        if kind == pk.IPV6_FRAGMENT:
            hdr = bytes([upper, 0]) + body[:6].ljust(6, b"\0")
        elif kind == pk.IPV6_AH:
            body += b"\0" * (-(len(body) + 2) % 4)
            hdr = bytes([upper, (len(body) + 2) // 4 - 2]) + body
        else:
            body += b"\0" * (-(len(body) + 2) % 8)
            hdr = bytes([upper, (len(body) + 2) // 8 - 1]) + body
        out = hdr + out
        upper = kind
    return upper, out


def ip_packet(s: Source, version: int, depth: int = 0) -> bytes:
    """An IPv4 or IPv6 packet (from the L3 header on) of any shape the grammar knows."""
    if version == 4:
        src, dst = v4_address(s), v4_address(s)
        proto, seg = _l4(s, 4, src, dst, depth)
        frag = weighted(s, ((12, 0), (1, pk.IPV4_DF), (1, pk.IPV4_MF), (1, -1)))
        if frag == -1:
            frag = s.int(0, 0xFFFF)
        return ipv4_header(src, dst, proto, len(seg), tos=s.int(0, 255) if chance(s, 20) else 0,
                           ident=s.int(0, 0xFFFF), flags_off=frag, ttl=pick(s, (64, 1, 0, 255)),
                           options=_ipv4_options(s)) + seg
    src, dst = v6_address(s), v6_address(s)
    proto, seg = _l4(s, 6, src, dst, depth)
    nh, ext = _ipv6_ext_bytes(_ipv6_ext(s), proto)
    return ipv6_header(src, dst, nh, len(ext) + len(seg),
                       tclass=s.int(0, 255) if chance(s, 20) else 0,
                       hlim=pick(s, (64, 255, 1, 0))) + ext + seg


def vxlan_payload(s: Source, depth: int) -> bytes:
    """VXLAN header + inner frame (any kind, VXLAN again included, up to `MAX_DEPTH`)."""
    flags = pk.VXLAN_FLAG_I if chance(s, 90) else s.int(0, 255)
    vni = pick(s, VNIS) if chance(s, 85) else s.int(0, 0xFF_FFFF)
    inner = frame(s, depth + 1) if chance(s, 95) else s.bytes(s.int(0, 20))
    return struct.pack("!B3xI", flags, vni << 8) + inner


def _tags(s: Source) -> list[tuple[int, int]]:
    n = weighted(s, ((14, 0), (4, 1), (2, 2), (1, 3)))
    return [(pick(s, TPIDS), s.int(0, 0xFFFF) if chance(s, 30) else s.int(0, 4095))
            for _ in range(n)]


def arp_packet(s: Source) -> bytes:
    op = weighted(s, ((6, pk.ARP_REQUEST), (2, pk.ARP_REPLY), (1, s.int(0, 0xFFFF))))
    if chance(s, 90):
        htype, ptype, hlen, plen = 1, pk.ETHERTYPE_IPV4, 6, 4
    else:
        htype, ptype, hlen, plen = s.int(0, 6), pick(s, (0x0800, 0x86DD, 0)), s.int(0, 16), s.int(
            0, 16)
    body = struct.pack("!HHBBH6sI6sI", htype, ptype, hlen, plen, op, mac(s).to_bytes(6, "big"),
                       v4_address(s), mac(s).to_bytes(6, "big"), v4_address(s))
    return body[: s.int(0, len(body))] if chance(s, 5) else body


def frame(s: Source, depth: int = 0) -> bytes:
    """One Ethernet frame drawn from the grammar (not mutated; see `mutate`)."""
    kind = weighted(s, ((30, "ipv4"), (30, "ipv6"), (6, "arp"), (6, "nd"), (10, "vxlan"),
                        (4 if depth == 0 else 0, "overlay"), (4, "fragment"), (3, "other"),
                        (1, "junk")))
    src_mac, dst_mac = mac(s), mac(s)
    pad = s.bytes(8) if chance(s, 10) else None
    tags = _tags(s)
    if kind == "ipv4":
        return ethernet(dst_mac, src_mac, pk.ETHERTYPE_IPV4, ip_packet(s, 4, depth), tags, pad)
    if kind == "ipv6":
        return ethernet(dst_mac, src_mac, pk.ETHERTYPE_IPV6, ip_packet(s, 6, depth), tags, pad)
    if kind == "arp":
        return ethernet(dst_mac, src_mac, pk.ETHERTYPE_ARP, arp_packet(s), tags, pad)
    if kind == "nd":
        src = v6_address(s)
        dst = v6_address(s) if chance(s, 50) else pk.IPV6_SOLICITED_NODE | (src & 0xFF_FFFF)
        seg = nd_message(s, src, dst)
        ip = ipv6_header(src, dst, pk.PROTO_ICMPV6, len(seg), hlim=pick(s, (255, 255, 64)))
        return ethernet(dst_mac, src_mac, pk.ETHERTYPE_IPV6, ip + seg, tags, pad)
    if kind == "vxlan" and depth < MAX_DEPTH:
        return vxlan_frame(s, depth, dst_mac, src_mac, tags)
    if kind == "overlay":
        return overlay_frame(s)
    if kind == "fragment":
        return pick(s, fragments(s))
    if kind == "junk":
        return s.bytes(s.int(0, 80))
    et = pick(s, (*ETHERTYPE_OTHER, *TPIDS)) if chance(s, 80) else s.int(0, 0xFFFF)
    return ethernet(dst_mac, src_mac, et, _payload(s), tags, pad)


def vxlan_frame(s: Source, depth: int = 0, dst_mac: int | None = None,
                src_mac: int | None = None, tags: Sequence[tuple[int, int]] = ()) -> bytes:
    """A VXLAN packet over IPv4 or IPv6 whose inner frame is anything (VXLAN included)."""
    version = 4 if chance(s, 75) else 6
    src = v4_address(s) if version == 4 else v6_address(s)
    dst = v4_address(s) if version == 4 else v6_address(s)
    seg = udp_datagram(version, src, dst, s.int(49152, 65535), pk.VXLAN_PORT,
                       vxlan_payload(s, depth), zero_checksum=version == 4 or chance(s, 30))
    if version == 4:
        ip = ipv4_header(src, dst, pk.PROTO_UDP, len(seg), flags_off=pk.IPV4_DF)
        et = pk.ETHERTYPE_IPV4
    else:
        ip = ipv6_header(src, dst, pk.PROTO_UDP, len(seg))
        et = pk.ETHERTYPE_IPV6
    return ethernet(dst_mac if dst_mac is not None else mac(s),
                    src_mac if src_mac is not None else mac(s), et, ip + seg, tags)


TUNNEL_ENDPOINTS: Final = ((4, _v4("203.0.113.2"), _v4("203.0.113.1")),
                            (6, _v6("2001:db8:1::2"), _v6("2001:db8:1::1")))


def overlay_frame(s: Source) -> bytes:
    """VXLAN between the switch's tunnel endpoints, with a VNI it decapsulates and an inner
    frame for one of its ports: what reaches decap (and the layers after it)."""
    version, remote, local = pick(s, TUNNEL_ENDPOINTS)
    inner = bytearray(frame(s, 1))
    if len(inner) >= 12 and chance(s, 70):
        inner[0:6] = pick(s, PORT_MACS).to_bytes(6, "big")
    payload = struct.pack("!B3xI", pk.VXLAN_FLAG_I, pick(s, (5001, 5002, 6001)) << 8)
    seg = udp_datagram(version, remote, local, s.int(49152, 65535), pk.VXLAN_PORT,
                       payload + bytes(inner), zero_checksum=version == 4)
    if version == 4:
        ip = ipv4_header(remote, local, pk.PROTO_UDP, len(seg), flags_off=pk.IPV4_DF)
        return ethernet(MACS[5], MACS[6], pk.ETHERTYPE_IPV4, ip + seg)
    ip = ipv6_header(remote, local, pk.PROTO_UDP, len(seg))
    return ethernet(MACS[5], MACS[6], pk.ETHERTYPE_IPV6, ip + seg)


def vxlan_in_vxlan(s: Source) -> bytes:
    """A tunnel packet whose inner frame is itself a complete VXLAN packet."""
    inner = vxlan_frame(s, MAX_DEPTH - 1)
    outer_src, outer_dst = v4_address(s), v4_address(s)
    payload = struct.pack("!B3xI", pk.VXLAN_FLAG_I, pick(s, VNIS) << 8) + inner
    seg = udp_datagram(4, outer_src, outer_dst, s.int(49152, 65535), pk.VXLAN_PORT, payload,
                       zero_checksum=True)
    ip = ipv4_header(outer_src, outer_dst, pk.PROTO_UDP, len(seg), flags_off=pk.IPV4_DF)
    return ethernet(mac(s), mac(s), pk.ETHERTYPE_IPV4, ip + seg)


def fragments(s: Source) -> list[bytes]:
    """The fragments of one datagram, shuffled, sometimes duplicated or overlapping."""
    version = 4 if chance(s, 60) else 6
    src = v4_address(s) if version == 4 else v6_address(s)
    dst = v4_address(s) if version == 4 else v6_address(s)
    proto, seg = _l4(s, version, src, dst, MAX_DEPTH)
    seg = seg[:2048] + s.bytes(s.int(0, 200))  # a few dozen fragments at most
    ident = s.int(0, 0xFFFF if version == 4 else 0xFFFF_FFFF)
    size = pick(s, (8, 16, 24, 64))
    src_mac, dst_mac = mac(s), mac(s)
    tags = _tags(s) if chance(s, 20) else []
    pieces = []
    offsets = list(range(0, max(len(seg), 1), size))
    for i, off in enumerate(offsets):
        last = i == len(offsets) - 1
        chunk = seg[off : off + size + (8 if chance(s, 10) else 0)]  # sometimes overlapping
        if version == 4:
            ff = (0 if last else pk.IPV4_MF) | (off >> 3)
            ip = ipv4_header(src, dst, proto, len(chunk), ident=ident, flags_off=ff) + chunk
            pieces.append(ethernet(dst_mac, src_mac, pk.ETHERTYPE_IPV4, ip, tags))
        else:
            fh = struct.pack("!BBHI", proto, 0, off | (0 if last else 1), ident)
            ip = ipv6_header(src, dst, pk.IPV6_FRAGMENT, 8 + len(chunk)) + fh + chunk
            pieces.append(ethernet(dst_mac, src_mac, pk.ETHERTYPE_IPV6, ip, tags))
    order = weighted(s, ((1, "in"), (2, "reverse"), (3, "shuffle")))
    if order == "reverse":
        pieces.reverse()
    elif order == "shuffle":
        for i in range(len(pieces) - 1, 0, -1):
            j = s.int(0, i)
            pieces[i], pieces[j] = pieces[j], pieces[i]
    if chance(s, 20):
        pieces.append(pick(s, pieces))
    return pieces


# ==============================================================================================
# Mutations
# ==============================================================================================


def _set(frame: bytes, at: int, value: bytes) -> bytes:
    if at < 0 or at + len(value) > len(frame):
        return frame
    return frame[:at] + value + frame[at + len(value) :]


def _add16(frame: bytes, at: int, delta: int) -> bytes:
    if at < 0 or at + 2 > len(frame):
        return frame
    value = (int.from_bytes(frame[at : at + 2], "big") + delta) & 0xFFFF
    return _set(frame, at, value.to_bytes(2, "big"))


def _targets(frame: bytes) -> list[pk.Headers]:
    """The parsed (outer, inner, quoted) headers of a frame: where field mutations aim."""
    h = pk.parse(frame)
    if isinstance(h, str):
        return []
    return [x for x in (h, h.inner, h.embedded) if x is not None]


def _field_mutation(s: Source, frame: bytes) -> bytes:
    """Off-by-one lengths, wrong checksums, wrong versions, swapped ethertypes."""
    targets = _targets(frame)
    if not targets:
        return _raw_mutation(s, frame)
    h = pick(s, targets)
    o = h.l3_off
    delta = pick(s, (-1, 1, -8, 8, 0x100, -0x100))
    what = s.int(0, 9)
    if h.ip_version == 4:
        if what == 0:
            return _add16(frame, o + 2, delta)  # total length
        if what == 1:
            ihl = frame[o] & 0x0F
            return _set(frame, o, bytes([0x40 | ((ihl + delta) & 0x0F)]))
        if what == 2:
            return _add16(frame, o + 10, pick(s, (1, -1)))  # header checksum
        if what == 3:
            return _set(frame, o, bytes([(pick(s, (0, 5, 6, 15)) << 4) | (frame[o] & 0x0F)]))
        if what == 4:
            return _set(frame, o + 6, struct.pack("!H", s.int(0, 0xFFFF)))  # flags/offset
    elif h.ip_version == 6:
        if what in (0, 1):
            return _add16(frame, o + 4, delta)  # payload length
        if what == 2:
            return _set(frame, o + 6, bytes([pick(s, (0, 43, 44, 59, 60, 6, 17, 58))]))
        if what == 3:
            return _set(frame, o, bytes([(pick(s, (4, 0, 7, 15)) << 4) | (frame[o] & 0x0F)]))
    l4 = h.l4_off
    if l4 is not None and what >= 5:
        if h.proto == pk.PROTO_TCP:
            if what == 5 and l4 + 12 < len(frame):
                doff = ((frame[l4 + 12] >> 4) + delta) & 0xF
                return _set(frame, l4 + 12, bytes([doff << 4]))
            return _add16(frame, l4 + 16, pick(s, (1, -1)))  # checksum
        if h.proto == pk.PROTO_UDP:
            if what in (5, 6):
                return _add16(frame, l4 + 4, delta)  # UDP length
            if what == 7:
                return _set(frame, l4 + 6, b"\0\0")  # no checksum (illegal over IPv6)
            return _add16(frame, l4 + 6, pick(s, (1, -1)))
        if h.proto in (pk.PROTO_ICMP, pk.PROTO_ICMPV6):
            if what == 5:
                return _set(frame, l4, bytes([s.int(0, 255)]))  # type
            return _add16(frame, l4 + 2, pick(s, (1, -1)))
    if what == 9 and len(frame) >= 14:
        et = int.from_bytes(frame[12:14], "big")
        swap = {pk.ETHERTYPE_IPV4: pk.ETHERTYPE_IPV6, pk.ETHERTYPE_IPV6: pk.ETHERTYPE_IPV4}
        return _set(frame, 12, struct.pack("!H", swap.get(et, pk.ETHERTYPE_IPV4)))
    return _raw_mutation(s, frame)


def _raw_mutation(s: Source, frame: bytes) -> bytes:
    """Bit flips, interesting bytes, truncation, extension, tag insertion."""
    what = weighted(s, ((4, "flip"), (2, "byte"), (3, "truncate"), (1, "extend"),
                        (1, "tag"), (1, "duplicate")))
    if not frame:
        return s.bytes(s.int(0, 64))
    if what == "flip":
        buf = bytearray(frame)
        for _ in range(s.int(1, 4)):
            i = s.int(0, len(buf) - 1)
            buf[i] ^= 1 << s.int(0, 7)
        return bytes(buf)
    if what == "byte":
        return _set(frame, s.int(0, len(frame) - 1), bytes([pick(s, (0, 1, 0x7F, 0x80, 0xFF))]))
    if what == "truncate":
        return frame[: s.int(0, len(frame))]
    if what == "extend":
        return frame + s.bytes(s.int(1, 64))
    if what == "tag":
        return pk.push_vlan(frame, s.int(0, 4095), tpid=pick(s, TPIDS))
    i = s.int(0, len(frame) - 1)
    j = s.int(i, min(len(frame), i + 40))
    return frame[:j] + frame[i:j] + frame[j:]


def mutate(s: Source, frame: bytes) -> bytes:
    """One to three mutations: field-aware (lengths, checksums, versions) or raw."""
    for _ in range(s.int(1, 3)):
        frame = _field_mutation(s, frame) if chance(s, 60) else _raw_mutation(s, frame)
    return frame


def hostile_frame(s: Source) -> bytes:
    """A frame from the grammar, mutated about half of the time; sometimes VXLAN in VXLAN."""
    f = vxlan_in_vxlan(s) if chance(s, 3) else frame(s)
    return mutate(s, f) if chance(s, 50) else f


# ==============================================================================================
# Replies and errors about frames already sent (to reach stateful code)
# ==============================================================================================


def reply_to(s: Source, data: bytes) -> bytes | None:
    """A plausible answer to ``data``: addresses, ports, MACs swapped (echo reply for echo
    request, SYN-ACK for SYN, tunnel endpoints swapped for VXLAN); None if not IP."""
    h = pk.parse(data)
    if isinstance(h, str) or h.ip_version is None:
        return None
    if h.inner is not None and h.inner.ip_version is not None and h.inner_off is not None:
        inner = reply_to(s, data[h.inner_off : h.inner_end])
        if inner is None:
            return None
        payload = data[h.inner_off - 8 : h.inner_off] + inner
        version = h.ip_version
        src, dst = _wire(h.dst, version), _wire(h.src, version)
        seg = udp_datagram(version, src, dst, h.dport or 0, h.sport or 0, payload,
                           zero_checksum=version == 4)
        return _l3_frame(h, version, src, dst, pk.PROTO_UDP, seg)
    version = h.ip_version
    src, dst = _wire(h.dst, version), _wire(h.src, version)
    proto = h.proto or 0
    if proto == pk.PROTO_TCP and h.sport is not None:
        flags = 0x12 if h.tcp_flags == 0x02 else pick(s, (0x10, 0x18, 0x11, 0x04))
        seg = tcp_segment(version, src, dst, h.dport or 0, h.sport, flags=flags,
                          payload=_payload(s))
    elif proto == pk.PROTO_UDP and h.sport is not None:
        seg = udp_datagram(version, src, dst, h.dport or 0, h.sport, _payload(s))
    elif h.icmp_id is not None:
        t = {8: 0, 128: 129, 0: 8, 129: 128}.get(h.icmp_type or 0, 0)
        seg = icmp_message(version, src, dst, t, 0, struct.pack("!HH", h.icmp_id, 1), b"pong")
    else:
        return None
    return _l3_frame(h, version, src, dst, proto, seg)


def icmp_error_about(s: Source, data: bytes) -> bytes | None:
    """An ICMP/ICMPv6 error from a router on the path back to the sender of ``data``."""
    h = pk.parse(data)
    if isinstance(h, str) or h.ip_version is None or h.ip_end is None:
        return None
    version = h.ip_version
    quote = data[h.l3_off : h.ip_end]
    quote = quote[: pick(s, (28, 48, 68, len(quote)))]
    router = v4_address(s) if version == 4 else v6_address(s)
    t = pick(s, (3, 11)) if version == 4 else pick(s, (1, 2, 3))
    proto = pk.PROTO_ICMP if version == 4 else pk.PROTO_ICMPV6
    dst = _wire(h.src, version)
    seg = icmp_message(version, router, dst, t, s.int(0, 4), struct.pack("!I", 1400), quote)
    return _l3_frame(h, version, router, dst, proto, seg, swap_macs=True)


def _wire(addr: int | None, version: int) -> int:
    """A 128-bit-space address as the header of ``version`` carries it."""
    if addr is None:
        return 0
    return addr & 0xFFFF_FFFF if version == 4 else addr


def _l3_frame(h: pk.Headers, version: int, src: int, dst: int, proto: int, seg: bytes,
              swap_macs: bool = True) -> bytes:
    if version == 4:
        ip = ipv4_header(src, dst, proto, len(seg))
        et = pk.ETHERTYPE_IPV4
    else:
        ip = ipv6_header(src, dst, proto, len(seg))
        et = pk.ETHERTYPE_IPV6
    dst_mac, src_mac = (h.src_mac, h.dst_mac) if swap_macs else (h.dst_mac, h.src_mac)
    tags = [(pk.ETHERTYPE_VLAN, h.vlan)] if h.vlan is not None else []
    return ethernet(dst_mac, src_mac, et, ip + seg, tags)


# ==============================================================================================
# Fixed sets for tests that want every class, not a random draw
# ==============================================================================================


def address_class_frames(src_mac: int, dst_mac: int, peer4: int = _v4("192.0.2.10"),
                         peer6: int = _v6("2001:db8::10")) -> list[tuple[str, bytes]]:
    """One UDP, TCP SYN and ND frame per address class as source and as destination; the
    other end is ``peer4``/``peer6`` (a port's address for frames from the uplink)."""
    out: list[tuple[str, bytes]] = []
    for cls, addrs in V4_CLASSES.items():
        for a in addrs[:2]:
            for name, src, dst in ((f"v4 src {cls}", a, peer4), (f"v4 dst {cls}", peer4, a)):
                seg = udp_datagram(4, src, dst, 1000, 53, b"q")
                out.append((name, ethernet(dst_mac, src_mac, pk.ETHERTYPE_IPV4,
                                           ipv4_header(src, dst, pk.PROTO_UDP, len(seg)) + seg)))
    for cls, addrs in V6_CLASSES.items():
        for a in addrs[:2]:
            for name, src, dst in ((f"v6 src {cls}", a, peer6), (f"v6 dst {cls}", peer6, a)):
                for proto, seg in (
                        (pk.PROTO_UDP, udp_datagram(6, src, dst, 1000, 53, b"q")),
                        (pk.PROTO_TCP, tcp_segment(6, src, dst, 1000, 80, flags=0x02))):
                    out.append((name, ethernet(dst_mac, src_mac, pk.ETHERTYPE_IPV6,
                                               ipv6_header(src, dst, proto, len(seg)) + seg)))
            ns_src = pick(RandomSource(a), V6_KNOWN[:2])
            seg = icmp_message(6, ns_src, pk.IPV6_SOLICITED_NODE | (a & 0xFF_FFFF), 135, 0,
                               bytes(4), a.to_bytes(16, "big") + bytes([1, 1])
                               + src_mac.to_bytes(6, "big"))
            ip = ipv6_header(ns_src, pk.IPV6_SOLICITED_NODE | (a & 0xFF_FFFF), pk.PROTO_ICMPV6,
                             len(seg), hlim=255)
            out.append((f"nd target {cls}", ethernet(dst_mac, src_mac, pk.ETHERTYPE_IPV6,
                                                     ip + seg)))
    return out


def frames_from_seed(seed: int, count: int,
                     make: Callable[[Source], bytes] = hostile_frame) -> list[bytes]:
    """``count`` frames, deterministic from ``seed`` (one `RandomSource` per frame, so frame
    ``i`` is the same whatever ``count`` is)."""
    return [make(RandomSource(seed * 1_000_003 + i)) for i in range(count)]
