"""Regression: the kernel flow cache forwards frames the Python parser drops as malformed.

flowcache.bpf.c bounds its L4 reads by skb->len only, never by the IP total length / IPv6
payload length / UDP length that appliance.packet.parse enforces, and it never checks the TCP
data offset against the packet.  So a frame that `parse` calls malformed_tcp / malformed_udp /
malformed_vxlan, but whose first bytes carry the 5-tuple of an established (offloaded) flow,
is a kernel HIT and is redirected (with NAT rewrites applied) instead of missing to the daemon
which would drop it.  A hostile VM can thus push frames the policy engine refuses through the
switch (policy bypass of the "malformed" drops).  Expected: a miss (TC_ACT_UNSPEC).

Runs the loaded program with BPF_PROG_TEST_RUN inside a scratch namespace (needs root).
"""

from __future__ import annotations

import os
import struct

import nstools
import pytest

from appliance import packet as pk
from appliance.actions import CompiledActions
from appliance.datapath import libbpf, tc, tclayout
from appliance.model import ip_to_int, mac_to_int

pytestmark = nstools.requires_root

A = ip_to_int("10.0.0.1")
B = ip_to_int("192.0.2.9")
MA = mac_to_int("02:00:00:00:00:01")
MB = mac_to_int("02:00:00:00:00:fe")


@pytest.fixture(scope="module")
def dp():
    rid = nstools.run_id()
    with nstools.netns(rid, "bpfm") as ns:
        d = tc.TcDatapath(netns=ns.name, capacity=1024,
                          pin_dir=os.path.join(tc.PIN_ROOT, ns.name))
        try:
            yield d
        finally:
            d.close()


def _install(d, frame: bytes) -> None:
    h = pk.parse(frame)
    assert not isinstance(h, str)
    key = pk.flow_key(h)
    d.flows.update(tclayout.encode_key(tclayout.PROBE_IFINDEX, key),
                   tclayout.encode_value(tclayout.PROBE_IFINDEX, CompiledActions("x"), key))


def _frame(proto: int, dport: int = 80, payload: bytes = b"hello world!") -> bytes:
    return pk.build_frame(src_mac=MA, dst_mac=MB, src=A, dst=B, proto=proto, sport=40000,
                          dport=dport, payload=payload)


def _run(d, frame: bytes) -> int:
    rv, _ = libbpf.test_run(d._obj.prog_fd(tclayout.PROG_FLOWCACHE), frame)
    return rv


def _set_ip_total(frame: bytearray, total: int) -> None:
    struct.pack_into("!H", frame, 16, total)


def test_tcp_data_offset_beyond_packet_is_not_a_hit(dp) -> None:
    good = _frame(pk.PROTO_TCP, payload=b"")
    _install(dp, good)
    bad = bytearray(good)
    bad[14 + 20 + 12] = 0xF0  # data offset 60 bytes, packet has 20
    assert pk.parse(bytes(bad)) == pk.MALFORMED_TCP
    assert _run(dp, bytes(bad)) != tclayout.TC_ACT_REDIRECT


def test_tcp_header_in_ethernet_padding_is_not_a_hit(dp) -> None:
    good = _frame(pk.PROTO_TCP, payload=b"")
    _install(dp, good)
    bad = bytearray(good)
    _set_ip_total(bad, 20)  # IP says: no L4 header at all; the "TCP header" is trailer bytes
    assert pk.parse(bytes(bad)) == pk.MALFORMED_TCP
    assert _run(dp, bytes(bad)) != tclayout.TC_ACT_REDIRECT


def test_udp_length_beyond_ip_payload_is_not_a_hit(dp) -> None:
    good = _frame(pk.PROTO_UDP, dport=53)
    _install(dp, good)
    bad = bytearray(good)
    struct.pack_into("!H", bad, 14 + 20 + 4, 1400)  # UDP length far beyond the datagram
    assert pk.parse(bytes(bad)) == pk.MALFORMED_UDP
    assert _run(dp, bytes(bad)) != tclayout.TC_ACT_REDIRECT


def test_short_vxlan_is_not_a_plain_udp_hit(dp) -> None:
    # a plain-UDP flow to port 4789 exists (VXLAN without the I flag is plain UDP to both)
    good = _frame(pk.PROTO_UDP, dport=pk.VXLAN_PORT, payload=bytes(8))
    _install(dp, good)
    bad = _frame(pk.PROTO_UDP, dport=pk.VXLAN_PORT, payload=b"\x08\0\0")  # 3-byte "VXLAN"
    assert pk.parse(bad) == pk.MALFORMED_VXLAN
    assert _run(dp, bad) != tclayout.TC_ACT_REDIRECT


@pytest.mark.parametrize("src,dst", [("::ffff:10.0.0.1", "::ffff:192.0.2.9"),
                                     ("::10.0.0.1", "::192.0.2.9")])
def test_ipv6_with_ipv4_mapped_addresses_never_hits_the_ipv4_flow(dp, src, dst) -> None:
    # Issue 8: the key holds IPv4 as IPv4-mapped bytes, so an IPv6 packet carrying the mapped
    # (or compatible) form of an offloaded IPv4 flow's addresses must miss, not ride it.
    good = _frame(pk.PROTO_UDP, dport=53)
    _install(dp, good)
    assert _run(dp, good) == tclayout.TC_ACT_REDIRECT  # the IPv4 flow itself is a hit
    v6 = pk.build_frame(src_mac=MA, dst_mac=MB, src=ip_to_int(src), dst=ip_to_int(dst),
                        proto=pk.PROTO_UDP, sport=40000, dport=53, payload=b"hello world!")
    assert _run(dp, v6) == tclayout.TC_ACT_UNSPEC
