"""Every idle timeout and TCP state path, driven by packet time (capture-style clock)."""

from __future__ import annotations

import pytest
from helpers import EXT_MAC, POLICY, icmp_echo, tcp, udp

from appliance import packet as pk
from appliance.datapath.sim import SimNic
from appliance.model import ip_to_int, mac_to_int
from appliance.pipeline import Pipeline
from appliance.policy import parse_policy
from appliance.timeouts import NS, TcpState, Timeouts, next_tcp_state

SYN, SYNACK, ACK, FIN, RST, PSH = 0x02, 0x12, 0x10, 0x11, 0x04, 0x18
T = Timeouts(tcp_syn=3, tcp_established=40, tcp_closing=7, tcp_closed=2, udp=5, icmp=4,
             other=6, drop=9)


def gre(src: str, dst: str) -> bytes:
    frame = pk.build_frame(src_mac=mac_to_int("02:00:00:00:00:01"),
                           dst_mac=mac_to_int("02:00:00:00:00:fe"), src=ip_to_int(src),
                           dst=ip_to_int(dst), proto=47, payload=b"\0" * 8)
    return frame


def out_tcp(flags: int) -> bytes:
    return tcp("10.0.0.1", 4000, "192.0.2.1", 80, flags=flags)


def in_tcp(flags: int) -> bytes:
    return tcp("192.0.2.1", 80, "198.51.100.7", 4000, flags=flags, src_mac=EXT_MAC)


# (packets: [(frame, ingress)], expected state, timeout seconds)
CASES = {
    "tcp_syn": ([(out_tcp(SYN), "vm1")], TcpState.SYN_SENT, T.tcp_syn),
    "tcp_syn_received": ([(out_tcp(SYN), "vm1"), (in_tcp(SYNACK), "up0")],
                         TcpState.SYN_RECEIVED, T.tcp_syn),
    "tcp_established": ([(out_tcp(SYN), "vm1"), (in_tcp(SYNACK), "up0"),
                         (out_tcp(ACK), "vm1")], TcpState.ESTABLISHED, T.tcp_established),
    # picked up mid-stream: short timeout until seen both ways (conntrack's loose mode)
    "tcp_midstream": ([(out_tcp(PSH), "vm1")], TcpState.UNCONFIRMED, T.tcp_syn),
    "tcp_midstream_confirmed": ([(out_tcp(PSH), "vm1"), (in_tcp(ACK), "up0")],
                                TcpState.ESTABLISHED, T.tcp_established),
    "tcp_closing": ([(out_tcp(SYN), "vm1"), (in_tcp(SYNACK), "up0"), (out_tcp(ACK), "vm1"),
                     (out_tcp(FIN), "vm1")], TcpState.CLOSING, T.tcp_closing),
    "tcp_closed": ([(out_tcp(SYN), "vm1"), (in_tcp(RST), "up0")], TcpState.CLOSED,
                   T.tcp_closed),
    "udp": ([(udp("10.0.0.1", 5, "192.0.2.1", 53), "vm1")], TcpState.NONE, T.udp),
    "icmp": ([(icmp_echo("10.0.0.1", "192.0.2.1"), "vm1")], TcpState.NONE, T.icmp),
    "other": ([(gre("10.0.0.1", "192.0.2.1"), "vm1")], TcpState.NONE, T.other),
    "drop": ([(tcp("10.0.0.1", 4000, "192.0.2.1", 25, flags=SYN), "vm1")], TcpState.SYN_SENT,
             T.drop),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_state_expires_after_its_own_timeout(case):
    packets, state, timeout = CASES[case]
    p = Pipeline(parse_policy(POLICY), SimNic(64), timeouts=T)
    for frame, ingress in packets:
        r = p.process(frame, ingress, 0)
        assert r.verdict == ("drop" if case == "drop" else "forward"), (case, r.reason)
    conn = next(p.flows.conns())
    assert conn.tcp_state is state
    p.age(int((timeout - 0.5) * NS))
    assert len(p.flows) > 0, "expired too early"
    p.age(int((timeout + 1.0) * NS))  # the wheel has one-second buckets
    assert len(p.flows) == 0, "not expired"
    assert len(p.datapath) == 0


def test_a_packet_restarts_the_idle_clock():
    p = Pipeline(parse_policy(POLICY), SimNic(64), timeouts=T)
    frame = udp("10.0.0.1", 5, "192.0.2.1", 53)
    p.process(frame, "vm1", 0)
    p.process(frame, "vm1", 4 * NS)
    p.age(8 * NS)
    assert len(p.flows) == 2  # idle only 4 s
    p.age(10 * NS)
    assert len(p.flows) == 0


@pytest.mark.parametrize(("state", "flags", "from_originator", "expected"), [
    (TcpState.NONE, SYN, True, TcpState.SYN_SENT),
    (TcpState.NONE, PSH, True, TcpState.UNCONFIRMED),
    (TcpState.UNCONFIRMED, ACK, True, TcpState.UNCONFIRMED),
    (TcpState.UNCONFIRMED, ACK, False, TcpState.ESTABLISHED),
    (TcpState.UNCONFIRMED, RST, False, TcpState.CLOSED),
    (TcpState.SYN_SENT, SYNACK, False, TcpState.SYN_RECEIVED),
    (TcpState.SYN_SENT, ACK, False, TcpState.ESTABLISHED),
    (TcpState.SYN_RECEIVED, ACK, True, TcpState.ESTABLISHED),
    (TcpState.SYN_RECEIVED, SYNACK, False, TcpState.SYN_RECEIVED),
    (TcpState.ESTABLISHED, FIN, True, TcpState.CLOSING),
    (TcpState.ESTABLISHED, FIN, False, TcpState.CLOSING),
    (TcpState.ESTABLISHED, RST, False, TcpState.CLOSED),
    (TcpState.CLOSING, ACK, True, TcpState.CLOSING),
    (TcpState.CLOSING, RST, True, TcpState.CLOSED),
    (TcpState.CLOSED, SYN, True, TcpState.CLOSED),
])
def test_tcp_state_transitions(state, flags, from_originator, expected):
    assert next_tcp_state(state, flags, from_originator) is expected
