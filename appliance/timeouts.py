"""Idle timeouts per protocol and TCP state, with the reasoning behind the defaults.

Idle means "no packet in either direction of the connection" for this long. The defaults sit
between a datapath cache that must stay small and a firewall that must not cut quiet but live
sessions:

=================  ========  ==========================================================
state              default   compared with
=================  ========  ==========================================================
tcp_syn            30 s      nftables/conntrack syn_sent 120 s; OVS datapath flows 10 s
                             (OVS megaflows are a cache, conntrack holds the state).
                             A handshake that has not finished in 30 s is dead or a scan.
                             Also a connection picked up mid-stream (its first packet was
                             not a SYN) until a packet is seen the other way.
tcp_established    3600 s    conntrack 432000 s (5 days) is too long for a cache with a
                             capacity; Azure/VFP's load balancer idle timeout is 4 min by
                             default (configurable to 30 min), which surprises long-lived
                             idle SSH sessions. One hour keeps those and still ages out
                             abandoned connections. Applications with longer silences
                             should use keepalives (as they must on Azure).
tcp_closing        30 s      after the first FIN; conntrack fin_wait/time_wait 120 s.
tcp_closed         5 s       after a RST; conntrack close 10 s.
udp                30 s      conntrack udp 30 s (unreplied), 120 s (stream); OPTE 60 s.
icmp               10 s      conntrack icmp 30 s; an echo exchange takes milliseconds.
other              30 s      conntrack generic 600 s; unknown protocols get no favours.
drop               10 s      a denied key's drop flow, whatever its protocol (OVS's 10 s
                             datapath idle): retransmits of a refused connection keep it
                             alive, silence forgets it quickly.
=================  ========  ==========================================================
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, fields, replace
from typing import Final

NS: Final = 1_000_000_000  # nanoseconds per second


class TcpState(enum.StrEnum):
    """Connection state followed from TCP flags: per packet on the host, from the flags a
    kernel datapath gathered for offloaded connections (`tcp_state_from_flags`)."""

    NONE = "none"  # not TCP
    UNCONFIRMED = "unconfirmed"  # picked up mid-stream (no SYN), not yet seen both ways
    SYN_SENT = "syn_sent"  # SYN seen, no reply yet
    SYN_RECEIVED = "syn_received"  # SYN+ACK seen
    ESTABLISHED = "established"
    CLOSING = "closing"  # a FIN seen
    CLOSED = "closed"  # a RST seen


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Idle timeouts in seconds; see the module docstring for the defaults' rationale."""

    tcp_syn: float = 30.0
    tcp_established: float = 3600.0
    tcp_closing: float = 30.0
    tcp_closed: float = 5.0
    udp: float = 30.0
    icmp: float = 10.0
    other: float = 30.0
    drop: float = 10.0

    def with_overrides(self, **overrides: float | None) -> Timeouts:
        """Copy with the given (non-None) values replaced; unknown names raise TypeError."""
        known = {f.name for f in fields(self)}
        unknown = set(overrides) - known
        if unknown:
            raise TypeError(f"unknown timeout(s): {', '.join(sorted(unknown))}")
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def idle_ns(self, proto: int | None, tcp_state: TcpState) -> int:
        """Idle timeout in nanoseconds for a connection of this protocol and TCP state."""
        if proto == 6:
            seconds = {
                TcpState.SYN_SENT: self.tcp_syn,
                TcpState.SYN_RECEIVED: self.tcp_syn,
                TcpState.UNCONFIRMED: self.tcp_syn,
                TcpState.ESTABLISHED: self.tcp_established,
                TcpState.CLOSING: self.tcp_closing,
                TcpState.CLOSED: self.tcp_closed,
            }.get(tcp_state, self.tcp_established)
        elif proto == 17:
            seconds = self.udp
        elif proto in (1, 58):
            seconds = self.icmp
        else:
            seconds = self.other
        return int(seconds * NS)


TCP_FIN: Final = 0x01
TCP_SYN: Final = 0x02
TCP_RST: Final = 0x04
TCP_ACK: Final = 0x10
TCP_CONTROL: Final = TCP_FIN | TCP_SYN | TCP_RST  # flags that move a connection's state


def next_tcp_state(state: TcpState, flags: int, from_originator: bool) -> TcpState:
    """Advance the connection state for one packet's TCP flags.

    Loose like conntrack's ``tcp_loose``, and sequence numbers are not checked (the guest is
    the endpoint, we only need to know when to forget the connection): a connection first
    seen mid-stream is picked up, but as UNCONFIRMED, with the short SYN timeout, until a
    packet comes back the other way. Bare ACKs from spoofed sources (the uplink can send
    those) therefore cost a table slot for `tcp_syn` seconds, not an hour.
    """
    if flags & TCP_RST:
        return TcpState.CLOSED
    if state in (TcpState.CLOSING, TcpState.CLOSED):
        return state
    if flags & TCP_FIN:
        return TcpState.CLOSING
    if flags & TCP_SYN:
        if flags & TCP_ACK and not from_originator:
            return TcpState.SYN_RECEIVED
        return state if state is not TcpState.NONE else TcpState.SYN_SENT
    if state is TcpState.NONE:
        return TcpState.UNCONFIRMED  # picked up mid-stream
    if state is TcpState.UNCONFIRMED:
        return state if from_originator else TcpState.ESTABLISHED
    if state is TcpState.SYN_RECEIVED and from_originator and flags & TCP_ACK:
        return TcpState.ESTABLISHED
    if state is TcpState.SYN_SENT and not from_originator:
        return TcpState.ESTABLISHED  # a reply without SYN: simultaneous open or loose pickup
    return state


# How far along a connection is: the kernel's flags only ever add up, so the state derived
# from them must never step back (a late retransmitted SYN-ACK does not reopen a handshake).
_RANK: Final = {TcpState.NONE: 0, TcpState.UNCONFIRMED: 1, TcpState.SYN_SENT: 1,
                TcpState.SYN_RECEIVED: 2, TcpState.ESTABLISHED: 3, TcpState.CLOSING: 4,
                TcpState.CLOSED: 5}
_SYN_ACK: Final = TCP_SYN | TCP_ACK


def tcp_state_from_flags(fwd: int, rev: int, current: TcpState) -> TcpState:
    """The state of a connection whose datapath saw the TCP flags ``fwd`` (OR of everything
    the originator sent) and ``rev`` (the responder), given the state recorded so far.

    The kernel keeps flags, not order, so this is `next_tcp_state` read loosely: RST any way
    -> CLOSED; FIN any way -> CLOSING; SYN+ACK from the responder -> SYN_RECEIVED, and with
    an ACK from the originator -> ESTABLISHED; a mid-stream pickup (UNCONFIRMED) answered by
    anything but a bare SYN, or a SYN answered without a SYN (loose pickup), -> ESTABLISHED.
    Never moves a state backwards. The result is always a state `next_tcp_state` reaches by
    some sequence of packets with these flags (tests/test_timeouts.py checks exhaustively).
    """
    both = fwd | rev
    if both & TCP_RST:
        derived = TcpState.CLOSED
    elif both & TCP_FIN:
        derived = TcpState.CLOSING
    elif rev & _SYN_ACK == _SYN_ACK:
        derived = TcpState.ESTABLISHED if fwd & TCP_ACK else TcpState.SYN_RECEIVED
    elif (current is TcpState.UNCONFIRMED and rev & ~TCP_SYN) or (
            current is TcpState.SYN_SENT and rev and not rev & TCP_SYN):
        derived = TcpState.ESTABLISHED
    else:
        return current
    return derived if _RANK[derived] > _RANK[current] else current


def tcp_flags_for_state(state: TcpState) -> tuple[int, int]:
    """(originator, responder) flags a datapath starts a connection's record with when the
    host has already followed it to ``state`` (its first packet, a re-offload, a replaced
    connection); `tcp_state_from_flags` maps them back to ``state``. CLOSING sets FIN both
    ways (which side sent it is not recorded), so the datapath treats the connection as over,
    as the host does: a new SYN on it is evaluated afresh."""
    return _RECORD_OF.get(state, (0, 0))


_RECORD_OF: Final = {
    TcpState.UNCONFIRMED: (0, 0),  # its ACK came before any reply: not the handshake's
    TcpState.SYN_SENT: (TCP_SYN, 0),
    TcpState.SYN_RECEIVED: (TCP_SYN, _SYN_ACK),
    TcpState.ESTABLISHED: (_SYN_ACK, _SYN_ACK),
    TcpState.CLOSING: (_SYN_ACK | TCP_FIN, _SYN_ACK | TCP_FIN),
    TcpState.CLOSED: (_SYN_ACK | TCP_RST, _SYN_ACK),
}


def tcp_conn_over(fwd: int, rev: int) -> bool:
    """What the kernel program calls a connection that is over (a new SYN on it misses):
    a RST either way, or a FIN both ways."""
    return bool((fwd | rev) & TCP_RST) or bool(fwd & rev & TCP_FIN)
