"""The kernel program's TCP state tracking, run with BPF_PROG_TEST_RUN (issue 11).

Both entries of a connection share a slot of the ``conns`` array; the program ORs the flags
each side sends into its byte, never copies anything up, and turns the originator's SYN
(without ACK) on a finished connection (a RST either way, a FIN both ways) into a miss.
Every case here runs the loaded program on one frame and checks its verdict, the slot and
the program's counters. Needs root (a scratch namespace holds the maps' pins).
"""

from __future__ import annotations

import os

import nstools
import pytest

from appliance import packet as pk
from appliance.actions import CompiledActions
from appliance.datapath import libbpf, tc, tclayout
from appliance.model import ip_to_int, mac_to_int

pytestmark = nstools.requires_root

A, B = ip_to_int("10.0.0.1"), ip_to_int("192.0.2.9")
MA, MB = mac_to_int("02:00:00:00:00:01"), mac_to_int("02:00:00:00:00:fe")
FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10
REDIRECT, MISS = tclayout.TC_ACT_REDIRECT, tclayout.TC_ACT_UNSPEC


@pytest.fixture(scope="module")
def dp():
    rid = nstools.run_id()
    with nstools.netns(rid, "tcps") as ns:
        d = tc.TcDatapath(netns=ns.name, capacity=64, pin_dir=os.path.join(tc.PIN_ROOT, ns.name))
        try:
            yield d
        finally:
            d.close()


def _frame(flags: int, *, reply: bool = False, sport: int = 40000) -> bytes:
    src, dst, sp, dp_ = (B, A, 80, sport) if reply else (A, B, sport, 80)
    return pk.build_frame(src_mac=MA, dst_mac=MB, src=src, dst=dst, proto=pk.PROTO_TCP,
                          sport=sp, dport=dp_, tcp_flags=flags, tcp_seq=1)


def _key(frame: bytes) -> tuple:
    h = pk.parse(frame)
    assert not isinstance(h, str)
    return pk.flow_key(h)


def _connection(d, sport: int, fwd: int, rev: int, *, output: bool = True) -> int:
    """Install both entries of a connection sharing a fresh slot holding (fwd, rev)."""
    slot = d.slots.take()
    assert slot
    d.slots.write(slot, tclayout.join_conn_flags(fwd, rev))
    out = tclayout.PROBE_IFINDEX if output else 0
    for reply in (False, True):
        key = _key(_frame(SYN, reply=reply, sport=sport))
        d.flows.update(tclayout.encode_key(tclayout.PROBE_IFINDEX, key),
                       tclayout.encode_value(out, CompiledActions("x" if output else None),
                                             key, reverse=reply, conn=slot))
    return slot


def _run(d, frame: bytes) -> int:
    return libbpf.test_run(d._obj.prog_fd(tclayout.PROG_FLOWCACHE), frame)[0]


_ports = iter(range(41000, 42000))

CASES = [
    # (slot before (originator, responder), packet from the responder?, its flags,
    #  verdict, slot after, counter that moves)
    ((SYN, 0), True, SYN | ACK, REDIRECT, (SYN, SYN | ACK), None),
    ((SYN, SYN | ACK), False, ACK, REDIRECT, (SYN | ACK, SYN | ACK), None),
    ((SYN | ACK, SYN | ACK), False, PSH | ACK, REDIRECT, (SYN | ACK | PSH, SYN | ACK), None),
    ((SYN | ACK, SYN | ACK), True, FIN | ACK, REDIRECT, (SYN | ACK, SYN | ACK | FIN), None),
    ((SYN, 0), False, SYN, REDIRECT, (SYN, 0), "tcp_syn_open"),  # a retransmitted SYN
    # one FIN only: half closed, a SYN is not judged (forwarded, counted)
    ((SYN | ACK | FIN, SYN | ACK), False, SYN, REDIRECT, (SYN | ACK | FIN, SYN | ACK),
     "tcp_syn_open"),
    # over: FIN both ways, or a RST either way -> the originator's SYN misses
    ((SYN | ACK | FIN, SYN | ACK | FIN), False, SYN, MISS, (SYN | ACK | FIN, SYN | ACK | FIN),
     "tcp_restart"),
    ((SYN | ACK | RST, SYN | ACK), False, SYN, MISS, (SYN | ACK | RST, SYN | ACK),
     "tcp_restart"),
    ((SYN | ACK, SYN | ACK | RST), False, SYN, MISS, (SYN | ACK, SYN | ACK | RST),
     "tcp_restart"),
    # ... but not a SYN+ACK, nor the responder's SYN (the daemon restarts neither)
    ((SYN | ACK, RST), False, SYN | ACK, REDIRECT, (SYN | ACK, RST), None),
    ((SYN | ACK, RST), True, SYN, REDIRECT, (SYN | ACK, RST | SYN), "tcp_syn_open"),
    ((SYN, 0), True, RST, REDIRECT, (SYN, RST), None),
]


@pytest.mark.parametrize("before,reply,flags,verdict,after,counter", CASES)
def test_program_tracks_tcp_flags_per_connection(dp, before, reply, flags, verdict, after,
                                                 counter) -> None:
    sport = next(_ports)
    slot = _connection(dp, sport, *before)
    k0 = dp.kernel_stats()
    assert _run(dp, _frame(flags, reply=reply, sport=sport)) == verdict
    assert tclayout.split_conn_flags(dp.slots.read(slot)) == after
    k1 = dp.kernel_stats()
    moved = {n for n in ("tcp_restart", "tcp_syn_open", "copy") if k1[n] != k0[n]}
    assert moved == ({counter} if counter else set())
    assert k1["miss"] - k0["miss"] == (1 if verdict == MISS else 0)
    assert k1["hit"] - k0["hit"] == (1 if verdict == REDIRECT else 0)


def test_entries_without_a_slot_are_not_tracked(dp) -> None:
    sport = next(_ports)
    key = _key(_frame(SYN, sport=sport))
    dp.flows.update(tclayout.encode_key(tclayout.PROBE_IFINDEX, key),
                    tclayout.encode_value(tclayout.PROBE_IFINDEX, CompiledActions("x"), key))
    k0 = dp.kernel_stats()
    assert _run(dp, _frame(SYN, sport=sport)) == REDIRECT
    assert _run(dp, _frame(RST | ACK, sport=sport)) == REDIRECT
    assert _run(dp, _frame(SYN, sport=sport)) == REDIRECT  # nothing to judge by
    k1 = dp.kernel_stats()
    assert k1["tcp_syn_open"] == k0["tcp_syn_open"] and k1["tcp_restart"] == k0["tcp_restart"]


def test_a_drop_entry_drops_every_packet_and_touches_no_slot(dp) -> None:
    sport = next(_ports)
    slot = _connection(dp, sport, SYN | ACK | RST, SYN | ACK, output=False)
    assert _run(dp, _frame(PSH | ACK, sport=sport)) == tclayout.TC_ACT_SHOT
    assert _run(dp, _frame(SYN, sport=sport)) == tclayout.TC_ACT_SHOT  # nothing to reopen
    assert tclayout.split_conn_flags(dp.slots.read(slot)) == (SYN | ACK | RST, SYN | ACK)


def test_a_connection_life_in_the_program(dp) -> None:
    """SYN (the daemon saw it), handshake, data, FIN both ways: forwarded, the slot says it
    is over, and the originator's next SYN on the same 5-tuple misses."""
    sport = next(_ports)
    slot = _connection(dp, sport, SYN, 0)
    life = [(True, SYN | ACK), (False, ACK), (False, PSH | ACK), (True, PSH | ACK),
            (False, FIN | ACK), (True, FIN | ACK), (False, ACK)]
    for reply, flags in life:
        assert _run(dp, _frame(flags, reply=reply, sport=sport)) == REDIRECT
    fwd, rev = tclayout.split_conn_flags(dp.slots.read(slot))
    assert (fwd, rev) == (SYN | ACK | PSH | FIN, SYN | ACK | PSH | FIN)
    assert _run(dp, _frame(SYN, sport=sport)) == MISS
