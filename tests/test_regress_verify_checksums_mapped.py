"""Regression: `verify_checksums` of an IPv6 packet with an IPv4-mapped source.

`pseudo_header` chose the family from the source address value, so an IPv6 header carrying
``::ffff:a.b.c.d`` (what a hostile VM can send, issue 8) was checked against an IPv4
pseudo-header: correct checksums were reported wrong (and the fuzz oracle, which compares
checksums before and after the switch, judged from a wrong premise). The header's version now
decides.
"""

from __future__ import annotations

from appliance import packet as pk
from appliance.testing import frames as fr

MAPPED = 0xFFFF_0A00_0001  # ::ffff:10.0.0.1
PEER = fr._v6("2001:db8::10")


def _ipv6(proto: int, seg: bytes) -> bytes:
    return fr.ethernet(1, 2, pk.ETHERTYPE_IPV6,
                       fr.ipv6_header(MAPPED, PEER, proto, len(seg)) + seg)


def test_mapped_source_in_ipv6_header_verifies_with_the_ipv6_pseudo_header() -> None:
    udp = _ipv6(pk.PROTO_UDP, fr.udp_datagram(6, MAPPED, PEER, 1, 2, b"x"))
    tcp = _ipv6(pk.PROTO_TCP, fr.tcp_segment(6, MAPPED, PEER, 1, 2, flags=0x02))
    assert pk.verify_checksums(udp) == {"udp": True}
    assert pk.verify_checksums(tcp) == {"tcp": True}
    # and a wrong one is still caught
    bad = udp[:-1] + bytes([udp[-1] ^ 0xFF])
    assert pk.verify_checksums(bad) == {"udp": False}
