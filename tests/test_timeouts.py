"""Every idle timeout and TCP state path, driven by packet time (capture-style clock)."""

from __future__ import annotations

import pytest
from helpers import EXT_MAC, POLICY, icmp_echo, tcp, udp

from appliance import packet as pk
from appliance.datapath.sim import SimNic
from appliance.model import ip_to_int, mac_to_int
from appliance.pipeline import Pipeline
from appliance.policy import parse_policy
from appliance.timeouts import (
    NS,
    TcpState,
    Timeouts,
    next_tcp_state,
    tcp_conn_over,
    tcp_flags_for_state,
    tcp_state_from_flags,
)

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


# --- TCP state from the flags a kernel datapath keeps (issue 11) -----------------------------

# SYN, SYN+ACK, ACK, data, FIN, RST, RST+ACK. Not a packet without flags: an OR of flags
# cannot see one (it would let any state pass for "reachable")
FLAG_VALUES = (0x02, 0x12, 0x10, 0x18, 0x11, 0x04, 0x14)
HISTORY = 4  # packets after the first: every sequence up to this length


def _histories():
    """(state after the first packet, originator flags, responder flags) -> every state
    `next_tcp_state` reaches by some packet sequence that leaves exactly these flags, the
    flags starting from what the datapath's record is initialised with."""
    groups: dict[tuple, set[TcpState]] = {}

    def walk(s0, state, fwd, rev, depth):
        groups.setdefault((s0, fwd, rev), set()).add(state)
        if depth == HISTORY:
            return
        for flags in FLAG_VALUES:
            for from_originator in (True, False):
                walk(s0, next_tcp_state(state, flags, from_originator),
                     fwd | flags if from_originator else fwd,
                     rev if from_originator else rev | flags, depth + 1)

    for first in FLAG_VALUES:
        s0 = next_tcp_state(TcpState.NONE, first, True)
        walk(s0, s0, *tcp_flags_for_state(s0), 0)
    return groups


def test_state_from_flags_is_one_that_some_packet_order_reaches():
    """Exhaustive over every sequence of up to HISTORY packets after the first (7 kinds of
    flags, both ways): the flags lose the order, never the truth."""
    groups = _histories()
    assert len(groups) > 400
    for (s0, fwd, rev), reachable in groups.items():
        assert tcp_state_from_flags(fwd, rev, s0) in reachable, (s0, hex(fwd), hex(rev))


def test_state_from_flags_closes_exactly_like_next_tcp_state():
    for (s0, fwd, rev), reachable in _histories().items():
        got = tcp_state_from_flags(fwd, rev, s0)
        if (fwd | rev) & RST:
            assert got is TcpState.CLOSED and reachable == {TcpState.CLOSED}
        elif (fwd | rev) & 0x01:
            assert got is TcpState.CLOSING and reachable == {TcpState.CLOSING}


@pytest.mark.parametrize("current", list(TcpState))
def test_state_from_flags_never_moves_backwards(current):
    order = [TcpState.NONE, TcpState.SYN_SENT, TcpState.SYN_RECEIVED, TcpState.ESTABLISHED,
             TcpState.CLOSING, TcpState.CLOSED]
    for fwd in range(64):
        for rev in range(64):
            got = tcp_state_from_flags(fwd, rev, current)
            if got is not current:
                assert current is TcpState.UNCONFIRMED or order.index(got) > order.index(
                    current), (current, got, fwd, rev)
                assert got is not TcpState.NONE and got is not TcpState.SYN_SENT


@pytest.mark.parametrize("state", list(TcpState))
def test_a_record_started_from_a_state_reads_back_as_that_state(state):
    assert tcp_state_from_flags(*tcp_flags_for_state(state), state) is state


@pytest.mark.parametrize("fwd,rev,expected", [
    (SYN, SYNACK, TcpState.SYN_RECEIVED),
    (SYN | ACK, SYNACK, TcpState.ESTABLISHED),  # the handshake's last ACK
    (SYN | PSH, SYNACK | PSH, TcpState.ESTABLISHED),
    (SYN, ACK, TcpState.ESTABLISHED),  # answered without a SYN: a loose pickup
    (SYN, SYN, TcpState.SYN_SENT),  # simultaneous open: nothing to tell yet
    (SYN | ACK | FIN, SYNACK, TcpState.CLOSING),
    (SYN, RST | ACK, TcpState.CLOSED),
])
def test_state_from_flags_of_a_handshake(fwd, rev, expected):
    assert tcp_state_from_flags(fwd, rev, TcpState.SYN_SENT) is expected


def test_a_mid_stream_pickup_is_confirmed_by_any_reply_but_a_bare_syn():
    assert tcp_state_from_flags(PSH, 0, TcpState.UNCONFIRMED) is TcpState.UNCONFIRMED
    assert tcp_state_from_flags(PSH, ACK, TcpState.UNCONFIRMED) is TcpState.ESTABLISHED
    assert tcp_state_from_flags(PSH, SYN, TcpState.UNCONFIRMED) is TcpState.UNCONFIRMED
    assert tcp_state_from_flags(0, SYNACK, TcpState.UNCONFIRMED) is TcpState.SYN_RECEIVED


@pytest.mark.parametrize("fwd,rev,over", [
    (SYN | ACK, SYNACK, False), (FIN, SYNACK, False), (SYNACK, FIN, False),
    (FIN, FIN, True), (RST, 0, True), (0, RST, True), (SYN | RST, SYNACK | FIN, True),
])
def test_what_the_kernel_calls_over(fwd, rev, over):
    assert tcp_conn_over(fwd, rev) is over
