"""Tests for appliance.packet: parser, flow keys, rewriting, VXLAN, ARP/ND and builders."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance import packet as pk
from appliance.model import IPV4_BASE, ip_to_int, is_ipv4

MAC_A = 0x02_00_00_00_00_0A
MAC_B = 0x02_00_00_00_00_0B
MAC_GW = 0x02_00_00_00_00_FE
V4_A = ip_to_int("10.0.0.1")
V4_B = ip_to_int("10.0.0.2")
V4_NAT = ip_to_int("192.0.2.7")
V4_R = ip_to_int("10.0.0.254")
V6_A = ip_to_int("fd00::1")
V6_B = ip_to_int("fd00::2")
V6_NAT = ip_to_int("2001:db8::7")
V6_R = ip_to_int("fd00::fe")
VTEP_1 = ip_to_int("172.16.0.1")
VTEP_2 = ip_to_int("172.16.0.2")
VTEP6_1 = ip_to_int("2001:db8:1::1")
VTEP6_2 = ip_to_int("2001:db8:1::2")
CAPTURES = Path("/work/shared/captures")


def frame(src: int = V4_A, dst: int = V4_B, proto: int = 6, **kw: object) -> bytes:
    """A valid frame from MAC_A to MAC_B with the builder's defaults."""
    return pk.build_frame(src_mac=MAC_A, dst_mac=MAC_B, src=src, dst=dst, proto=proto, **kw)


def headers(data: bytes) -> pk.Headers:
    """Parse, failing the test on a drop reason."""
    h = pk.parse(data)
    assert isinstance(h, pk.Headers), h
    return h


def set_l4_proto(data: bytes, proto: int) -> bytes:
    """Change the IPv4 protocol / IPv6 next header of an untagged frame (checksums ignored)."""
    at = 23 if data[12:14] == b"\x08\x00" else 20
    return data[:at] + bytes([proto]) + data[at + 1 :]


def all_ok(data: bytes) -> dict[str, bool]:
    """verify_checksums, asserting every checksum seen is right."""
    result = pk.verify_checksums(data)
    assert result, "nothing was verified"
    assert all(result.values()), result
    return result


# --- parser: protocols --------------------------------------------------------------------------


def test_parse_tcp_ipv4() -> None:
    data = frame(sport=40000, dport=443, payload=b"abc", tcp_flags=0x02, dscp=46, ttl=7, ip_id=9)
    h = headers(data)
    assert (h.src_mac, h.dst_mac, h.vlan, h.ethertype, h.l3_off) == (MAC_A, MAC_B, None, 0x800, 14)
    assert (h.ip_version, h.src, h.dst, h.proto, h.dscp, h.ttl) == (4, V4_A, V4_B, 6, 46, 7)
    assert (h.l4_off, h.sport, h.dport, h.tcp_flags) == (34, 40000, 443, 0x02)
    assert (h.frag, h.frag_id, h.ip_end, h.vni, h.inner) == (0, 9, len(data), None, None)
    assert all_ok(data) == {"ipv4": True, "tcp": True}


def test_parse_udp_ipv6() -> None:
    data = frame(V6_A, V6_B, 17, sport=5353, dport=53, payload=b"q" * 11, dscp=10, ttl=3)
    h = headers(data)
    assert (h.ethertype, h.ip_version, h.src, h.dst, h.proto) == (0x86DD, 6, V6_A, V6_B, 17)
    assert (h.dscp, h.ttl, h.l4_off, h.sport, h.dport) == (10, 3, 54, 5353, 53)
    assert all_ok(data) == {"udp": True}


def test_ethernet_padding_is_not_an_error() -> None:
    data = frame(proto=17, sport=1, dport=2)
    padded = data + b"\0" * (60 - len(data))
    h = headers(padded)
    assert h.ip_end == len(data)
    assert pk.flow_key(h) == pk.flow_key(headers(data)) == pk.fast_flow_key(padded)


def test_non_ip_ethertype_is_fine() -> None:
    data = MAC_B.to_bytes(6, "big") + MAC_A.to_bytes(6, "big") + b"\x88\xcc" + b"\0" * 30
    h = headers(data)
    assert (h.ethertype, h.src, h.ip_version) == (0x88CC, None, None)
    assert pk.flow_key(h) is None
    assert pk.fast_flow_key(data) is None


def test_vlan_and_qinq() -> None:
    base = frame(sport=1, dport=2)
    tagged = pk.push_vlan(base, 100)
    h = headers(tagged)
    assert (h.vlan, h.ethertype, h.l3_off, h.sport) == (100, 0x800, 18, 1)
    qinq = pk.push_vlan(tagged, 200, tpid=pk.ETHERTYPE_QINQ)
    h = headers(qinq)
    assert (h.vlan, h.ethertype, h.l3_off, h.dport) == (200, 0x800, 22, 2)
    assert pk.flow_key(h)[0] == 200
    assert pk.fast_flow_key(tagged) is None  # only untagged frames take the fast path
    assert pk.parse(pk.push_vlan(qinq, 300)) == pk.MALFORMED_VLAN  # three tags
    assert headers(frame(vlan=7)).vlan == 7


def test_ipv4_options() -> None:
    router_alert = b"\x94\x04\x00\x00"
    data = frame(proto=17, sport=7, dport=8, payload=b"x", ip_options=router_alert)
    h = headers(data)
    assert (h.l4_off, h.sport, h.dport) == (14 + 24, 7, 8)
    assert all_ok(data)["udp"]
    assert pk.fast_flow_key(data) is None
    assert pk.flow_key(h) == (None, 17, V4_A, 7, V4_B, 8, None)


def test_ipv4_fragments() -> None:
    data = frame(proto=17, sport=1000, dport=2000, payload=bytes(range(256)) * 8, ip_id=77)
    frags = pk.fragment_ipv4(data, 600)
    assert len(frags) == 4
    first, *rest = (headers(f) for f in frags)
    assert (first.frag, first.frag_id, first.sport, first.dport, first.l4_off) == (
        1,
        77,
        1000,
        2000,
        34,
    )
    assert pk.flow_key(first) == (None, 17, V4_A, 1000, V4_B, 2000, None)
    for h in rest:
        assert (h.frag, h.frag_id, h.l4_off, h.sport, h.proto) == (2, 77, None, None, 17)
        assert pk.flow_key(h) == (None, 17, V4_A, 0, V4_B, 0, None)
    for f in frags:
        assert pk.fast_flow_key(f) is None
        assert pk.verify_checksums(f)["ipv4"]
    # Reassembling the payloads gives back the original datagram.
    payload = b"".join(f[34:] for f in frags)
    assert payload == data[34:]


def test_non_first_fragment_with_tiny_payload_is_not_malformed() -> None:
    data = frame(proto=6, sport=1, dport=2, payload=b"z" * 40)
    last = pk.fragment_ipv4(data, 20 + 56)[-1]
    assert len(last) - 34 < 20  # less than a TCP header in there
    assert headers(last).frag == 2


def test_first_fragment_with_truncated_tcp_header_is_malformed() -> None:
    data = frame(proto=6, sport=1, dport=2, payload=b"z" * 40)
    assert pk.parse(pk.fragment_ipv4(data, 28)[0]) == pk.MALFORMED_TCP  # RFC 1858 tiny frag


def test_fragment_keeps_copied_options_only() -> None:
    opts = b"\x94\x04\x00\x00" + b"\x07\x07\x04" + b"\0" * 4 + b"\x01"  # RA (copied) + RR
    data = frame(proto=17, sport=1, dport=2, payload=b"p" * 200, ip_options=opts)
    first, second = pk.fragment_ipv4(data, 160)[:2]
    assert (first[14] & 0x0F, second[14] & 0x0F) == (8, 6)
    assert headers(second).frag == 2


def test_ipv6_extension_headers() -> None:
    ext = [
        (pk.IPV6_HOPOPTS, b"\x01\x04\0\0\0\0"),
        (pk.IPV6_ROUTING, bytes(22)),
        (pk.IPV6_DSTOPTS, b"\x01\x04\0\0\0\0"),
        (pk.IPV6_AH, bytes(14)),
    ]
    data = frame(V6_A, V6_B, 6, sport=22, dport=2222, ipv6_ext=ext)
    h = headers(data)
    assert (h.proto, h.sport, h.dport, h.frag, h.l4_off) == (6, 22, 2222, 0, 54 + 8 + 24 + 8 + 16)
    assert pk.fast_flow_key(data) is None
    assert pk.flow_key(h) == (None, 6, V6_A, 22, V6_B, 2222, None)
    assert all_ok(data)["tcp"]


def test_ipv6_fragment_header() -> None:
    first = frame(
        V6_A,
        V6_B,
        17,
        sport=5,
        dport=6,
        ipv6_ext=[(pk.IPV6_FRAGMENT, struct.pack("!HI", 0x0001, 0xABCD))],
    )
    h = headers(first)
    assert (h.frag, h.frag_id, h.proto, h.sport, h.l4_off) == (1, 0xABCD, 17, 5, 62)
    later = frame(
        V6_A,
        V6_B,
        17,
        sport=5,
        dport=6,
        ipv6_ext=[(pk.IPV6_FRAGMENT, struct.pack("!HI", 100 << 3, 0xABCD))],
    )
    h = headers(later)
    assert (h.frag, h.frag_id, h.proto, h.sport, h.l4_off) == (2, 0xABCD, 17, None, None)
    assert pk.flow_key(h) == (None, 17, V6_A, 0, V6_B, 0, None)
    atomic = frame(
        V6_A, V6_B, 17, sport=5, dport=6, ipv6_ext=[(pk.IPV6_FRAGMENT, struct.pack("!HI", 0, 1))]
    )
    assert (headers(atomic).frag, headers(atomic).frag_id) == (0, 1)


def test_ipv6_hop_by_hop_not_first_is_malformed() -> None:
    ext = [(pk.IPV6_DSTOPTS, bytes(6)), (pk.IPV6_HOPOPTS, bytes(6))]
    assert pk.parse(frame(V6_A, V6_B, 17, ipv6_ext=ext)) == pk.MALFORMED_IPV6


def test_icmp_echo_v4_and_v6() -> None:
    h = headers(frame(proto=1, icmp_id=0x1234, icmp_seq=3, payload=b"ping"))
    assert (h.proto, h.icmp_type, h.icmp_code, h.icmp_id, h.sport) == (1, 8, 0, 0x1234, None)
    assert pk.flow_key(h) == (None, 1, V4_A, 0x1234, V4_B, pk.ICMP_ECHO, None)
    h6 = headers(frame(V6_A, V6_B, 58, icmp_id=0x4321))
    assert (h6.proto, h6.icmp_type, h6.icmp_id) == (58, 128, 0x4321)
    assert pk.flow_key(h6) == (None, 58, V6_A, 0x4321, V6_B, pk.ICMP_ECHO, None)
    other = headers(frame(proto=1, icmp_type=13, icmp_code=0))  # timestamp: no echo id
    assert other.icmp_id is None
    assert pk.flow_key(other) == (None, 1, V4_A, pk.ICMP_OTHER | 13, V4_B, 0, None)
    all_ok(frame(proto=1))
    all_ok(frame(V6_A, V6_B, 58))


def test_icmp_error_embeds_quoted_packet_v4() -> None:
    original = frame(V4_A, V4_B, 17, sport=3333, dport=53, payload=b"d" * 600)
    err = pk.build_icmp_error(
        original, src_mac=MAC_GW, src=V4_R, icmp_type=3, icmp_code=4, mtu=1400
    )
    h = headers(err)
    assert (h.src, h.dst, h.dst_mac, h.icmp_type, h.icmp_code) == (V4_R, V4_A, MAC_A, 3, 4)
    assert len(err) - h.l4_off - 8 == pk.ICMPV4_QUOTE_MAX
    assert struct.unpack_from("!H", err, h.l4_off + 6)[0] == 1400
    e = h.embedded
    assert e is not None
    assert (e.src, e.dst, e.proto, e.sport, e.dport, e.l3_off) == (V4_A, V4_B, 17, 3333, 53, 42)
    assert pk.flow_key(h) == (None, 1, V4_R, pk.ICMP_OTHER | 3, V4_A, 4, None)
    assert all_ok(err) == {"ipv4": True, "icmp": True, "embedded_ipv4": True}


def test_icmp_error_embeds_quoted_packet_v6_and_echo() -> None:
    ping = frame(V6_A, V6_B, 58, icmp_id=99)
    err = pk.build_icmp_error(ping, src_mac=MAC_GW, src=V6_R, icmp_type=3)
    h = headers(err)
    e = h.embedded
    assert e is not None
    assert (e.src, e.dst, e.proto, e.icmp_type, e.icmp_id, e.sport) == (
        V6_A,
        V6_B,
        58,
        128,
        99,
        None,
    )
    all_ok(err)


def test_icmp_error_with_garbage_quote_is_malformed() -> None:
    bad = frame(proto=1, icmp_type=11, payload=b"\x55" * 30)
    assert pk.parse(bad) == pk.MALFORMED_ICMP
    bad6 = frame(V6_A, V6_B, 58, icmp_type=1, payload=b"\x55" * 50)
    assert pk.parse(bad6) == pk.MALFORMED_ICMPV6


def test_arp_request() -> None:
    data = pk.build_arp_request(src_mac=MAC_A, src_ip=V4_A, target_ip=V4_B, vlan=5)
    h = headers(data)
    assert (h.ethertype, h.vlan, h.dst_mac, h.arp_op) == (0x806, 5, pk.BROADCAST_MAC, 1)
    assert (h.arp_sha, h.arp_spa, h.arp_tha, h.arp_tpa) == (MAC_A, V4_A, 0, V4_B)
    assert (h.src, pk.flow_key(h)) == (None, None)


def test_vxlan_parse_inner() -> None:
    inner = frame(V4_A, V4_B, 6, sport=1111, dport=80, vlan=12)
    outer = pk.vxlan_encap(
        inner,
        vni=0x123456,
        src_ip=VTEP_1,
        dst_ip=VTEP_2,
        src_mac=MAC_GW,
        dst_mac=MAC_B,
        src_port=50000,
    )
    h = headers(outer)
    assert (h.src, h.dst, h.proto, h.sport, h.dport, h.vni) == (
        VTEP_1,
        VTEP_2,
        17,
        50000,
        4789,
        0x123456,
    )
    assert (h.inner_off, h.inner_end) == (50, len(outer))
    i = h.inner
    assert i is not None
    assert (i.src, i.dst, i.sport, i.dport, i.vlan, i.l3_off) == (V4_A, V4_B, 1111, 80, 12, 68)
    assert pk.flow_key(h) == (None, 6, V4_A, 1111, V4_B, 80, (VTEP_1, VTEP_2, 0x123456, 12))
    assert pk.fast_flow_key(outer) is None
    result = all_ok(outer)
    assert result["inner_tcp"] and result["inner_ipv4"] and outer[40:42] == b"\0\0"
    assert pk.vxlan_decap(outer, h) == inner
    assert pk.vxlan_decap(outer + bytes(20), headers(outer + bytes(20))) == inner  # padding


def test_vxlan_over_ipv6_outer_and_roundtrip() -> None:
    inner = frame(V6_A, V6_B, 17, sport=9, dport=10, payload=b"v6 inside")
    outer = pk.vxlan_encap(
        inner,
        vni=7,
        src_ip=VTEP6_1,
        dst_ip=VTEP6_2,
        src_mac=MAC_GW,
        dst_mac=MAC_B,
        src_port=60000,
        ttl=9,
    )
    h = headers(outer)
    assert (h.ip_version, h.ttl, h.vni, h.inner.dport) == (6, 9, 7, 10)  # type: ignore[union-attr]
    assert all_ok(outer)["udp"]
    assert pk.vxlan_decap(outer, h) == inner
    with pytest.raises(ValueError):
        pk.vxlan_encap(
            inner, vni=7, src_ip=VTEP_1, dst_ip=VTEP6_2, src_mac=1, dst_mac=2, src_port=1
        )


def test_vxlan_without_i_flag_is_plain_udp() -> None:
    data = frame(proto=17, sport=1, dport=4789, payload=bytes(8) + frame())
    h = headers(data)
    assert (h.vni, h.inner, h.sport) == (None, None, 1)


def test_vxlan_source_port_is_stable_and_in_range() -> None:
    h = headers(frame(sport=1, dport=2))
    port = pk.vxlan_source_port(h)
    assert 49152 <= port <= 65535
    code = (
        "from appliance import packet as pk; from appliance.model import ip_to_int as i;"
        "f = pk.build_frame(src_mac=1, dst_mac=2, src=i('10.0.0.1'), dst=i('10.0.0.2'),"
        " proto=6, sport=1, dport=2); print(pk.vxlan_source_port(pk.parse(f)))"
    )
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
        )
        assert int(out.stdout) == pk.vxlan_source_port(
            headers(
                pk.build_frame(src_mac=1, dst_mac=2, src=V4_A, dst=V4_B, proto=6, sport=1, dport=2)
            )
        )
    ports = {pk.vxlan_source_port(headers(frame(sport=s, dport=80))) for s in range(200)}
    assert len(ports) > 150  # entropy actually varies with the flow
    arp = headers(pk.build_arp_request(src_mac=MAC_A, src_ip=V4_A, target_ip=V4_B))
    assert 49152 <= pk.vxlan_source_port(arp) <= 65535


# --- drop reasons -------------------------------------------------------------------------------


def _patch(data: bytes, at: int, value: bytes) -> bytes:
    return data[:at] + value + data[at + len(value) :]


def _crafted_drops() -> list[tuple[str, bytes]]:
    tcp = frame(sport=1, dport=2)
    udp6 = frame(V6_A, V6_B, 17, sport=1, dport=2)
    return [
        ("truncated_eth", tcp[:13]),
        ("malformed_vlan", tcp[:12] + b"\x81\x00\x00"),
        ("malformed_ipv4", _patch(tcp, 16, b"\x05\xdc")),  # total length beyond the frame
        ("malformed_ipv4", _patch(tcp, 14, b"\x44")),  # IHL 4
        ("malformed_ipv4", _patch(tcp, 14, b"\x65")),  # version 6 in an IPv4 ethertype
        ("malformed_ipv4", tcp[:30]),
        ("malformed_ipv6", _patch(udp6, 18, b"\x05\xdc")),  # payload length beyond the frame
        ("malformed_ipv6", _patch(udp6, 14, b"\x40")),
        ("malformed_tcp", _patch(tcp, 46, b"\x40")),  # data offset 4
        ("malformed_tcp", _patch(tcp, 46, b"\xf0")),  # data offset beyond the packet
        ("malformed_udp", _patch(udp6, 58, b"\x00\x04")),  # UDP length < 8
        ("malformed_udp", _patch(udp6, 58, b"\x00\x40")),  # UDP length beyond the packet
        ("malformed_icmp", set_l4_proto(frame(proto=200, payload=b"\x08\0\0\0"), 1)),
        ("malformed_icmpv6", set_l4_proto(frame(V6_A, V6_B, 200, payload=b"\x80\0\0\0"), 58)),
        ("malformed_icmpv6", frame(V6_A, V6_B, 58, icmp_type=135, payload=bytes(8))),
        ("malformed_icmpv6", frame(V6_A, V6_B, 58, icmp_type=135, payload=bytes(16) + b"\1\0")),
        (
            "malformed_arp",
            _patch(pk.build_arp_request(src_mac=1, src_ip=V4_A, target_ip=V4_B), 14, b"\x00\x06"),
        ),
        ("malformed_arp", pk.build_arp_request(src_mac=1, src_ip=V4_A, target_ip=V4_B)[:40]),
        ("malformed_vxlan", frame(proto=17, sport=1, dport=4789, payload=b"\x08\0\0")),
        (
            "malformed_vxlan",
            pk.vxlan_encap(
                frame()[:30],
                vni=1,
                src_ip=VTEP_1,
                dst_ip=VTEP_2,
                src_mac=1,
                dst_mac=2,
                src_port=50000,
            ),
        ),
        (
            "malformed_vxlan",
            pk.vxlan_encap(
                b"\0" * 10,
                vni=1,
                src_ip=VTEP_1,
                dst_ip=VTEP_2,
                src_mac=1,
                dst_mac=2,
                src_port=50000,
            ),
        ),
    ]


@pytest.mark.parametrize(("reason", "data"), _crafted_drops())
def test_drop_reasons(reason: str, data: bytes) -> None:
    assert pk.parse(data) == reason
    assert pk.fast_flow_key(data) is None


def test_every_drop_reason_is_reachable() -> None:
    assert {r for r, _ in _crafted_drops()} == pk.DROP_REASONS


# --- never raise ---------------------------------------------------------------------------------

VALID_SAMPLES: list[bytes] = [
    frame(sport=1, dport=2, payload=b"x" * 20),
    frame(V6_A, V6_B, 17, sport=3, dport=4),
    frame(proto=1, icmp_id=5),
    frame(V6_A, V6_B, 58, icmp_id=5),
    frame(vlan=3, proto=17, ip_options=b"\x94\x04\0\0"),
    pk.push_vlan(frame(vlan=3), 4, tpid=pk.ETHERTYPE_QINQ),
    pk.build_arp_request(src_mac=MAC_A, src_ip=V4_A, target_ip=V4_B),
    pk.build_neighbor_solicit(src_mac=MAC_A, src_ip=V6_A, target_ip=V6_B),
    pk.build_icmp_error(frame(sport=1, dport=2), src_mac=1, src=V4_R, icmp_type=11),
    pk.build_icmp_error(frame(V6_A, V6_B, 6), src_mac=1, src=V6_R, icmp_type=1),
    pk.fragment_ipv4(frame(proto=17, payload=bytes(100)), 60)[0],
    frame(V6_A, V6_B, 6, ipv6_ext=[(0, bytes(6)), (44, struct.pack("!HI", 1, 2))]),
    pk.vxlan_encap(
        frame(sport=7, dport=8),
        vni=1,
        src_ip=VTEP_1,
        dst_ip=VTEP_2,
        src_mac=1,
        dst_mac=2,
        src_port=50000,
    ),
    pk.vxlan_encap(
        frame(V6_A, V6_B, 58),
        vni=1,
        src_ip=VTEP6_1,
        dst_ip=VTEP6_2,
        src_mac=1,
        dst_mac=2,
        src_port=50000,
    ),
]


def _ones_sum(data: bytes) -> int:
    """RFC 1071 the slow, obvious way: 16-bit words, carries folded until none is left."""
    if len(data) % 2:
        data += b"\0"
    total = sum(data[i] << 8 | data[i + 1] for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _pseudo(h: pk.Headers, length: int) -> bytes:
    """The TCP/UDP/ICMPv6 pseudo-header, written out from RFC 793 / RFC 8200 section 8.1."""
    if h.ip_version == 4:
        return ((h.src & 0xFFFF_FFFF).to_bytes(4, "big") + (h.dst & 0xFFFF_FFFF).to_bytes(4, "big")
                + bytes([0, h.proto]) + length.to_bytes(2, "big"))
    return (h.src.to_bytes(16, "big") + h.dst.to_bytes(16, "big") + length.to_bytes(4, "big")
            + bytes([0, 0, 0, h.proto]))


def reference_checksums(data: bytes, h: pk.Headers) -> dict[str, bool]:
    """What `pk.verify_checksums` must report for a frame `pk.parse` read as ``h``: each
    checksum it can see, recomputed here with `_ones_sum` (a region is right when its words,
    checksum included, sum to 0xFFFF)."""
    out: dict[str, bool] = {}
    l4_names = {(6, 4): "tcp", (6, 6): "tcp", (17, 4): "udp", (17, 6): "udp", (1, 4): "icmp",
                (58, 6): "icmpv6"}
    for prefix, p in (("", h), ("inner_", h.inner)):
        if p is None:
            continue
        if p.ip_version == 4:
            ihl = (data[p.l3_off] & 0x0F) * 4
            out[prefix + "ipv4"] = _ones_sum(data[p.l3_off:p.l3_off + ihl]) == 0xFFFF
        name = l4_names.get((p.proto, p.ip_version))
        if name is None or p.frag != pk.FRAG_NONE or p.l4_off is None:
            continue
        seg = data[p.l4_off:p.ip_end]
        if p.proto == 17:
            seg = seg[:int.from_bytes(seg[4:6], "big")]
            if p.ip_version == 4 and seg[6:8] == b"\0\0":
                out[prefix + name] = True  # IPv4 UDP without a checksum
                continue
        if p.proto != 1:
            seg = _pseudo(p, len(seg)) + seg
        out[prefix + name] = _ones_sum(seg) == 0xFFFF
    e = h.embedded
    if e is not None and e.ip_version == 4:
        ihl = (data[e.l3_off] & 0x0F) * 4
        out["embedded_ipv4"] = _ones_sum(data[e.l3_off:e.l3_off + ihl]) == 0xFFFF
    return out


def fast_path_shape(h: pk.Headers) -> bool:
    """Frames `pk.fast_flow_key` exists for and must key itself (None would send every
    packet of the common case through the full parser): untagged TCP/UDP in IPv4 without
    options or IPv6 without extension headers, not fragmented, not to the VXLAN port."""
    return (h.l3_off == pk.ETH_HLEN and h.vlan is None and h.inner is None
            and h.frag == pk.FRAG_NONE and h.proto in (6, 17) and h.ip_version in (4, 6)
            and h.l4_off == h.l3_off + (20 if h.ip_version == 4 else 40)
            and not (h.proto == 17 and h.dport == pk.VXLAN_PORT))


def check_parse_result(data: bytes) -> None:
    """The parser's contract on any input: Headers or a documented reason, never an error;
    the fast key agrees with the parser and covers its common case; checksums reported as a
    from-scratch recomputation finds them."""
    h = pk.parse(data)
    if isinstance(h, str):
        assert h in pk.DROP_REASONS
        assert pk.fast_flow_key(data) is None
        assert pk.verify_checksums(data) == {}
        return
    key = pk.flow_key(h)
    fast = pk.fast_flow_key(data)
    if fast_path_shape(h):
        assert fast is not None and fast == key
    else:
        assert fast is None or fast == key
    if key is not None:
        assert pk.reverse_key(pk.reverse_key(key)) == key
    assert pk.verify_checksums(data) == reference_checksums(data, h)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_random_bytes_never_raise(data: bytes) -> None:
    check_parse_result(data)


@settings(max_examples=300)
@given(
    st.sampled_from(
        [
            b"\x08\x00\x45",
            b"\x86\xdd\x60",
            b"\x81\x00\x00\x01\x08\x00\x45",
            b"\x08\x06\x00\x01\x08\x00\x06\x04",
        ]
    ),
    st.binary(max_size=120),
)
def test_random_bytes_behind_real_ethertypes_never_raise(prefix: bytes, rest: bytes) -> None:
    check_parse_result(bytes(12) + prefix + rest)


@settings(max_examples=600)
@given(st.sampled_from(VALID_SAMPLES), st.data())
def test_mutated_and_truncated_packets_never_raise(sample: bytes, data: st.DataObject) -> None:
    buf = bytearray(sample)
    for _ in range(data.draw(st.integers(0, 4))):
        at = data.draw(st.integers(0, len(buf) - 1))
        buf[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(buf)))
    check_parse_result(bytes(buf[:cut]))
    check_parse_result(bytes(buf))


def test_every_truncation_of_valid_samples() -> None:
    for sample in VALID_SAMPLES:
        assert isinstance(pk.parse(sample), pk.Headers)
        for cut in range(len(sample)):
            check_parse_result(sample[:cut])


# --- fast path and flow keys -------------------------------------------------------------------

addresses_v4 = st.integers(0, 2**32 - 1).map(lambda a: IPV4_BASE | a)
addresses_v6 = st.integers(0, 2**128 - 1).filter(lambda a: not is_ipv4(a))
ports = st.integers(0, 65535)


@st.composite
def tcp_udp_frames(draw: st.DrawFn) -> bytes:
    """Valid TCP/UDP frames of either family, sometimes padded, tagged or optioned."""
    v6 = draw(st.booleans())
    addrs = addresses_v6 if v6 else addresses_v4
    kw: dict = {
        "src": draw(addrs),
        "dst": draw(addrs),
        "proto": draw(st.sampled_from([6, 17])),
        "sport": draw(ports),
        "dport": draw(st.sampled_from([80, 4789, 53]) | ports),
        "payload": draw(st.binary(max_size=40)),
        "vlan": draw(st.none() | st.integers(0, 4095)),
    }
    if not v6 and draw(st.booleans()):
        kw["ip_options"] = b"\x01" * draw(st.integers(1, 8))
    data = pk.build_frame(
        src_mac=draw(st.integers(0, 2**48 - 1)), dst_mac=draw(st.integers(0, 2**48 - 1)), **kw
    )
    return data + bytes(draw(st.integers(0, 30)))


@settings(max_examples=500)
@given(tcp_udp_frames(), st.data())
def test_fast_flow_key_equals_parse(data: bytes, draw: st.DataObject) -> None:
    check_parse_result(data)  # fast key None or equal to flow_key(parse())
    # Corrupt one byte in the headers: the fast path must still agree or step aside.
    buf = bytearray(data)
    at = draw.draw(st.integers(0, min(len(buf), 80) - 1))
    buf[at] = draw.draw(st.integers(0, 255))
    check_parse_result(bytes(buf))


def test_fast_flow_key_takes_the_common_cases() -> None:
    for data in (
        frame(sport=1, dport=2),
        frame(V6_A, V6_B, 17, sport=1, dport=2, payload=b"x"),
        frame(proto=17, sport=9, dport=10, payload=bytes(30)),
    ):
        assert pk.fast_flow_key(data) == pk.flow_key(headers(data)) is not None
    assert pk.fast_flow_key(frame(proto=17, dport=4789, payload=bytes(30))) is None


def _reply_pairs() -> list[tuple[bytes, bytes]]:
    pairs = []
    for a, b in ((V4_A, V4_B), (V6_A, V6_B)):
        for proto in (6, 17):
            req = frame(a, b, proto, sport=40000, dport=80)
            rep = pk.build_frame(
                src_mac=MAC_B, dst_mac=MAC_A, src=b, dst=a, proto=proto, sport=80, dport=40000
            )
            pairs.append((req, rep))
        icmp = 1 if is_ipv4(a) else 58
        req = frame(a, b, icmp, icmp_id=777)
        rep = pk.build_frame(
            src_mac=MAC_B,
            dst_mac=MAC_A,
            src=b,
            dst=a,
            proto=icmp,
            icmp_type=0 if icmp == 1 else 129,
            icmp_id=777,
        )
        pairs.append((req, rep))
    return pairs


@pytest.mark.parametrize(("request_frame", "reply_frame"), _reply_pairs())
def test_reverse_key_matches_reply(request_frame: bytes, reply_frame: bytes) -> None:
    req, rep = pk.flow_key(headers(request_frame)), pk.flow_key(headers(reply_frame))
    assert req != rep
    assert pk.reverse_key(req) == rep
    assert pk.reverse_key(rep) == req


def test_reverse_key_with_tunnel() -> None:
    req, rep = _reply_pairs()[0]
    out = pk.vxlan_encap(
        req, vni=5, src_ip=VTEP_1, dst_ip=VTEP_2, src_mac=1, dst_mac=2, src_port=50001
    )
    back = pk.vxlan_encap(
        rep, vni=5, src_ip=VTEP_2, dst_ip=VTEP_1, src_mac=2, dst_mac=1, src_port=50002
    )
    assert pk.reverse_key(pk.flow_key(headers(out))) == pk.flow_key(headers(back))


# --- rewriting ---------------------------------------------------------------------------------


@pytest.mark.parametrize("proto", [6, 17, 1])
@pytest.mark.parametrize("v6", [False, True])
def test_rewrite_keeps_checksums(proto: int, v6: bool) -> None:
    if v6:
        proto = 58 if proto == 1 else proto
        src, dst, new_src, new_dst = V6_A, V6_B, V6_NAT, V6_R
    else:
        src, dst, new_src, new_dst = V4_A, V4_B, V4_NAT, V4_R
    data = frame(src, dst, proto, sport=1234, dport=80, icmp_id=55, payload=b"payload!" * 9)
    h = headers(data)
    out = pk.rewrite(
        data,
        h,
        src_mac=MAC_GW,
        dst_mac=MAC_A,
        src=new_src,
        dst=new_dst,
        sport=4321,
        dport=8080,
        icmp_id=66,
    )
    all_ok(out)
    g = headers(out)
    assert (g.src_mac, g.dst_mac, g.src, g.dst) == (MAC_GW, MAC_A, new_src, new_dst)
    if proto in (6, 17):
        assert (g.sport, g.dport) == (4321, 8080)
    else:
        assert g.icmp_id == 66
    assert (
        out[g.l4_off + 8 + (12 if proto == 6 else 0) :]
        == data[h.l4_off + 8 + (12 if proto == 6 else 0) :]
    )


@settings(max_examples=200)
@given(tcp_udp_frames(), st.data())
def test_rewrite_property(data: bytes, draw: st.DataObject) -> None:
    h = pk.parse(data)
    if isinstance(h, str):
        return  # e.g. too short for VXLAN on port 4789
    addrs = addresses_v4 if h.ip_version == 4 else addresses_v6
    out = pk.rewrite(
        data,
        h,
        src=draw.draw(st.none() | addrs),
        dst=draw.draw(st.none() | addrs),
        sport=draw.draw(st.none() | ports),
        dport=draw.draw(st.none() | ports),
    )
    assert all(pk.verify_checksums(out).values())
    if h.vni is None:
        assert len(out) == len(data)


def test_rewrite_udp_zero_checksum_stays_zero() -> None:
    data = bytearray(frame(proto=17, sport=1, dport=2, payload=b"abc"))
    data[40:42] = b"\0\0"
    out = pk.rewrite(bytes(data), headers(bytes(data)), src=V4_NAT, sport=999)
    assert out[40:42] == b"\0\0"
    assert all_ok(out) == {"ipv4": True, "udp": True}


def test_rewrite_udp_never_writes_zero_checksum() -> None:
    # Find a rewrite whose result checksum would be 0: it must go out as 0xFFFF.
    data = frame(proto=17, sport=1, dport=2, payload=b"abc")
    h = headers(data)
    csum = struct.unpack_from("!H", data, 40)[0]
    # Changing sport by +csum (mod ones-complement) drives the checksum to 0 (i.e. -0).
    new_sport = (1 + csum) % 0xFFFF
    out = pk.rewrite(data, h, sport=new_sport)
    assert out[40:42] != b"\0\0"
    assert all_ok(out)["udp"]


def test_rewrite_first_fragment_checksum_over_whole_datagram() -> None:
    for src, dst, nat in ((V4_A, V4_B, V4_NAT),):
        for proto in (6, 17):
            data = frame(src, dst, proto, sport=1000, dport=2000, payload=bytes(range(256)) * 6)
            frags = pk.fragment_ipv4(data, 500)
            first = frags[0]
            out = pk.rewrite(first, headers(first), src=nat, sport=3000)
            assert all_ok(out)["ipv4"]
            segment = out[34:] + b"".join(f[34:] for f in frags[1:])
            pseudo = pk.pseudo_header(nat, dst, proto, len(segment))
            assert pk.checksum(pseudo + segment) == 0
            later = pk.rewrite(frags[1], headers(frags[1]), src=nat, sport=3000)
            assert later[34:] == frags[1][34:]  # no L4 there: only the address changed
            assert all_ok(later) == {"ipv4": True}
            assert headers(later).src == nat


def test_rewrite_ipv6_first_fragment_checksum() -> None:
    payload = bytes(range(200))
    full = frame(V6_A, V6_B, 17, sport=1, dport=2, payload=payload)
    udp = full[54:]
    cut = 64
    first = frame(
        V6_A, V6_B, 200, payload=udp[:cut], ipv6_ext=[(pk.IPV6_FRAGMENT, struct.pack("!HI", 1, 5))]
    )
    first = first[:54] + bytes([17]) + first[55:]  # fragment header's next header = UDP
    h = headers(first)
    assert (h.frag, h.sport) == (1, 1)
    out = pk.rewrite(first, h, dst=V6_NAT, dport=7)
    segment = out[62:] + udp[cut:]
    assert pk.checksum(pk.pseudo_header(V6_A, V6_NAT, 17, len(segment)) + segment) == 0


def test_rewrite_family_mismatch_raises() -> None:
    with pytest.raises(ValueError):
        pk.rewrite(frame(), headers(frame()), src=V6_A)
    with pytest.raises(ValueError):
        pk.rewrite(frame(V6_A, V6_B), headers(frame(V6_A, V6_B)), dst=V4_A)


def test_rewrite_mac_only_and_ignored_fields() -> None:
    data = frame(proto=1, icmp_id=3)
    out = pk.rewrite(data, headers(data), dst_mac=MAC_GW, sport=5)  # no ports on ICMP
    assert out[:6] == MAC_GW.to_bytes(6, "big") and out[6:] == data[6:]


@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("proto", [6, 17, "echo"])
def test_rewrite_embedded(v6: bool, proto: int | str) -> None:
    a, b, nat, router = (V6_A, V6_B, V6_NAT, V6_R) if v6 else (V4_A, V4_B, V4_NAT, V4_R)
    icmp = 58 if v6 else 1
    # The host sent from its SNAT address; the router's error quotes that. Translate it back.
    sent = frame(
        nat,
        b,
        icmp if proto == "echo" else proto,
        sport=5000,
        dport=53,
        icmp_id=900,
        payload=b"q" * 30,
    )
    err = pk.build_icmp_error(sent, src_mac=MAC_GW, src=router, icmp_type=3 if not v6 else 1)
    h = headers(err)
    out = pk.rewrite(err, h, dst=a)
    out = pk.rewrite_embedded(out, h, src=a, sport=1234, icmp_id=77)
    result = all_ok(out)
    g = headers(out)
    assert (g.dst, g.embedded.src) == (a, a)  # type: ignore[union-attr]
    if proto == "echo":
        assert g.embedded.icmp_id == 77  # type: ignore[union-attr]
    else:
        assert g.embedded.sport == 1234  # type: ignore[union-attr]
    assert result.get("embedded_ipv4", True)
    # The whole original was quoted, so the quoted packet must itself be fully valid.
    quoted = out[:12] + out[12 : g.l3_off] + out[g.embedded.l3_off :]  # type: ignore[union-attr]
    q = all_ok(quoted)
    assert len(q) >= 1


# --- ARP / ND ----------------------------------------------------------------------------------


@pytest.mark.parametrize("vlan", [None, 42])
def test_arp_reply(vlan: int | None) -> None:
    req = pk.build_arp_request(src_mac=MAC_A, src_ip=V4_A, target_ip=V4_R, vlan=vlan)
    rep = pk.build_arp_reply(req, headers(req), MAC_GW)
    h = headers(rep)
    assert (h.src_mac, h.dst_mac, h.vlan, h.arp_op) == (MAC_GW, MAC_A, vlan, 2)
    assert (h.arp_sha, h.arp_spa, h.arp_tha, h.arp_tpa) == (MAC_GW, V4_R, MAC_A, V4_A)
    with pytest.raises(ValueError):
        pk.build_arp_reply(rep, h, MAC_GW)


@pytest.mark.parametrize("vlan", [None, 42])
def test_neighbor_advert(vlan: int | None) -> None:
    ns = pk.build_neighbor_solicit(src_mac=MAC_A, src_ip=V6_A, target_ip=V6_R, vlan=vlan)
    n = headers(ns)
    assert (n.icmp_type, n.nd_target, n.nd_ll, n.ttl, n.vlan) == (135, V6_R, MAC_A, 255, vlan)
    assert n.dst == ip_to_int("ff02::1:ff00:fe") and n.dst_mac == 0x3333FF0000FE
    all_ok(ns)
    na = pk.build_neighbor_advert(ns, n, MAC_GW)
    h = headers(na)
    assert (h.src_mac, h.dst_mac, h.vlan, h.src, h.dst) == (MAC_GW, MAC_A, vlan, V6_R, V6_A)
    assert (h.icmp_type, h.icmp_code, h.ttl, h.nd_target, h.nd_ll) == (136, 0, 255, V6_R, MAC_GW)
    assert na[h.l4_off + 4] == 0x60  # solicited + override
    assert all_ok(na) == {"icmpv6": True}


def test_neighbor_advert_for_duplicate_address_detection() -> None:
    ns = pk.build_neighbor_solicit(src_mac=MAC_A, src_ip=0, target_ip=V6_R)
    n = headers(ns)
    assert n.nd_ll is None
    na = pk.build_neighbor_advert(ns, n, MAC_GW)
    h = headers(na)
    assert (h.dst, h.dst_mac, na[h.l4_off + 4]) == (ip_to_int("ff02::1"), 0x333300000001, 0x20)
    all_ok(na)


# --- checksums ---------------------------------------------------------------------------------


def test_checksum_known_value() -> None:
    # RFC 1071 example words.
    assert pk.checksum(bytes.fromhex("0001f203f4f5f6f7")) == ~0xDDF2 & 0xFFFF
    assert pk.checksum(b"") == 0xFFFF
    assert pk.checksum(b"\x01") == ~0x0100 & 0xFFFF
    ip_header = bytes.fromhex("450000730000400040110000c0a80001c0a800c7")
    assert pk.checksum(ip_header) == 0xB861


@given(st.binary(max_size=64))
def test_checksum_matches_word_loop(data: bytes) -> None:
    padded = data + b"\0" * (len(data) % 2)
    s = 0
    for i in range(0, len(padded), 2):
        s += padded[i] << 8 | padded[i + 1]
        s = (s & 0xFFFF) + (s >> 16)
    assert pk.checksum(data) == ~s & 0xFFFF


# --- tshark cross-check ------------------------------------------------------------------------


def write_pcap(path: Path, frames: list[bytes]) -> None:
    """Classic little-endian pcap, linktype 1 (Ethernet)."""
    out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)]
    for i, f in enumerate(frames):
        out.append(struct.pack("<IIII", 1_700_000_000 + i, 0, len(f), len(f)) + f)
    path.write_bytes(b"".join(out))


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark not installed")
def test_tshark_agrees_checksums_are_valid(tmp_path: Path) -> None:
    frames = []
    for (a, b, nat), icmp in (((V4_A, V4_B, V4_NAT), 1), ((V6_A, V6_B, V6_NAT), 58)):
        for proto in (6, 17, icmp):
            data = frame(a, b, proto, sport=1234, dport=80, icmp_id=5, payload=b"tshark" * 5)
            frames.append(pk.rewrite(data, headers(data), src=nat, sport=999, icmp_id=6))
            frames.append(
                pk.vxlan_encap(
                    data, vni=9, src_ip=VTEP_1, dst_ip=VTEP_2, src_mac=1, dst_mac=2, src_port=50000
                )
            )
            frames.append(
                pk.vxlan_encap(
                    data,
                    vni=9,
                    src_ip=VTEP6_1,
                    dst_ip=VTEP6_2,
                    src_mac=1,
                    dst_mac=2,
                    src_port=50000,
                )
            )
        sent = frame(nat, b, 17, sport=1, dport=53, payload=b"dns")
        err = pk.build_icmp_error(
            sent, src_mac=MAC_GW, src=V4_R if icmp == 1 else V6_R, icmp_type=3 if icmp == 1 else 1
        )
        h = headers(err)
        frames.append(pk.rewrite_embedded(pk.rewrite(err, h, dst=a), h, src=a, sport=1111))
    ns = pk.build_neighbor_solicit(src_mac=MAC_A, src_ip=V6_A, target_ip=V6_R, vlan=3)
    frames.append(pk.build_neighbor_advert(ns, headers(ns), MAC_GW))
    path = tmp_path / "out.pcap"
    write_pcap(path, frames)
    checks = [
        "-o",
        "tcp.check_checksum:TRUE",
        "-o",
        "udp.check_checksum:TRUE",
        "-o",
        "ip.check_checksum:TRUE",
    ]
    bad = (
        'ip.checksum.status=="Bad" || tcp.checksum.status=="Bad" || '
        'udp.checksum.status=="Bad" || icmp.checksum.status=="Bad" || '
        'icmpv6.checksum.status=="Bad"'
    )
    run = subprocess.run(
        ["tshark", "-r", str(path), *checks, "-Y", bad, "-T", "fields", "-e", "frame.number"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert run.stdout.strip() == ""
    seen = subprocess.run(
        ["tshark", "-r", str(path), *checks, "-T", "fields", "-e", "frame.number"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert len(seen.stdout.split()) == len(frames)


# --- real captures -----------------------------------------------------------------------------


def read_pcap_ethernet(path: Path) -> list[bytes]:
    """Records of a classic pcap file with linktype 1; [] for anything else."""
    data = path.read_bytes()
    if len(data) < 24:
        return []
    magic = data[:4]
    if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
        endian = "<"
    elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
        endian = ">"
    else:
        return []
    if struct.unpack_from(endian + "I", data, 20)[0] & 0xFFFF != 1:
        return []
    out, at = [], 24
    while at + 16 <= len(data):
        incl = struct.unpack_from(endian + "I", data, at + 8)[0]
        at += 16
        if at + incl > len(data):
            break
        out.append(data[at : at + incl])
        at += incl
    return out


@pytest.mark.skipif(not CAPTURES.is_dir(), reason="no shared captures")
def test_real_captures_never_raise() -> None:
    files = sorted(CAPTURES.rglob("*.pcap"))
    total = parsed = 0
    for path in files:
        for data in read_pcap_ethernet(path):
            total += 1
            check_parse_result(data)
            parsed += isinstance(pk.parse(data), pk.Headers)
    assert total > 1000
    assert parsed > total // 2
