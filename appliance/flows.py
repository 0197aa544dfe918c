"""The host flow table: exact-match flows, created in pairs, aged by idle time.

A *flow* maps one exact key -- ``(ingress, packet_key)`` where ``ingress`` is the port name or
the uplink's name and ``packet_key`` is `appliance.packet.flow_key` (VLAN, protocol,
addresses, ports, tunnel) -- to the flat compiled actions of the layer walk. A *connection*
(`Conn`) holds the forward flow and its reverse; they share idle time and TCP state, and are
created and removed together (the seed's pair of flows, [0044]).

Ageing uses a coarse timer wheel keyed by whole seconds: each connection sits in the bucket of
its earliest possible expiry; a sweep pops due buckets and either expires the connection or
moves it to its new bucket. Packets only stamp ``last_seen``; they never touch the wheel, so
the per-packet cost of ageing is zero and a sweep costs O(connections due).

Full table: when ``max_flows`` flows exist, connections idle for more than a quarter of their
timeout are expired at once (at most once a second: it is a full scan); if that frees no room,
the new connection is refused (the packet is dropped with reason ``flow_limit`` and counted),
as conntrack does when its table is full. Active connections are never pushed out.

Fair shares: each ingress (a port, or the uplink) may hold at most ``port_max`` flows (a
share of ``max_flows``), counting both flows of the connections it started; past that its new
connections are refused as ``port_flow_limit`` while every other ingress still has room.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Final

from appliance.actions import CompiledActions
from appliance.model import FIELD_INDEX, Action, Direction
from appliance.timeouts import (
    NS,
    TCP_CONTROL,
    TcpState,
    Timeouts,
    next_tcp_state,
    tcp_state_from_flags,
)

_SRC_PORT: Final = FIELD_INDEX["src_port"]  # in a classifier lookup tuple
_DST_PORT: Final = FIELD_INDEX["dst_port"]
NEVER: Final = 1 << 126  # a time after every real one (ns)
DEFAULT_MAX_FLOWS: Final = 1_000_000  # flows (a connection is 1 or 2); Azure allows 500k/dir
DEFAULT_PORT_SHARE: Final = 0.25  # of max_flows, what one port (or the uplink) may hold


@dataclass(frozen=True, slots=True)
class LayerStep:
    """One layer's decision on the slow path, as shown by traces."""

    port: str
    layer: str
    direction: Direction
    rule: str  # rule name, "default", or "(reverse of NAME)" for stateful inverses
    action: Action  # the action taken (appliance.pipeline.describe_action shows it)
    priority: int | None = None  # of the matched rule (None: default or stateful inverse)
    values: tuple | None = None  # classifier lookup tuple: lets revalidation test new rules


@dataclass(slots=True, eq=False)
class Flow:
    key: tuple
    port: str  # port whose layers were walked first (the sender, or the receiver from uplink)
    direction: Direction
    actions: CompiledActions
    steps: tuple[LayerStep, ...]
    conn: Conn = field(repr=False, default=None)  # type: ignore[assignment]
    packets: int = 0
    bytes: int = 0
    offloaded: bool = False  # currently in the datapath's cache
    nic_refused: str | None = None  # why the datapath cannot take it (not retried)
    macs: tuple[int, int] = (0, 0)  # (src, dst) MACs of the packet that created it
    dscp: tuple[int | None, int | None] = (0, None)  # its DSCP (outer, inner if tunnelled)
    kernel_packets: int = 0  # datapath counters already folded into packets/bytes
    kernel_bytes: int = 0
    # steps shared with a decision template: their lookup values hold the template's client
    # port; this flow's is this one (src_port of a forward flow, dst_port of a reverse one)
    template_port: int | None = None

    @property
    def reverse(self) -> Flow | None:
        fwd, rev = self.conn.forward, self.conn.reverse
        return rev if self is fwd else fwd

    @property
    def is_forward(self) -> bool:
        return self is self.conn.forward

    def lookup_values(self, step: LayerStep) -> tuple | None:
        """The classifier lookup tuple ``step`` was decided with, for this flow."""
        values = step.values
        port = self.template_port
        if values is None or port is None:
            return values
        i = _SRC_PORT if self.is_forward else _DST_PORT
        return (*values[:i], port, *values[i + 1:])


@dataclass(slots=True, eq=False)
class Conn:
    """A connection: forward flow, optional reverse flow, shared state."""

    forward: Flow
    reverse: Flow | None
    proto: int | None
    generation: int
    created_ns: int
    last_seen_ns: int
    tcp_state: TcpState = TcpState.NONE
    deadline_s: int = 0  # wheel bucket the connection sits in
    removed: bool = False
    nic_slot: int = 0  # the datapath's TCP state slot shared by both entries (0: none)

    def flows(self) -> tuple[Flow, ...]:
        return (self.forward,) if self.reverse is None else (self.forward, self.reverse)


def fold_kernel_counters(table: FlowTable, flow: Flow, packets: int, nbytes: int,
                         last_ns: int) -> int:
    """Fold a datapath entry's counters (packets, bytes, last-seen time) into its flow;
    returns how many packets are new since the last fold.

    The datapath counts from its entry's creation: a count below what was folded means a
    fresh entry (the flow was re-offloaded), counted from zero. TCP state comes from the
    kernel's connection slot, not from counters (`follow_kernel_tcp`).
    """
    if packets < flow.kernel_packets:  # a fresh entry (re-offloaded): counts from 0
        flow.kernel_packets = flow.kernel_bytes = 0
    new = packets - flow.kernel_packets
    if new <= 0:
        return 0
    flow.packets += new
    flow.bytes += nbytes - flow.kernel_bytes
    flow.kernel_packets, flow.kernel_bytes = packets, nbytes
    conn = flow.conn
    if last_ns > conn.last_seen_ns:
        conn.last_seen_ns = last_ns
    return new


def follow_kernel_tcp(table: FlowTable, conn: Conn, seen: tuple[int, int] | None) -> None:
    """Derive an offloaded TCP connection's state (and so its idle timeout) from the flags
    the datapath gathered in its connection slot (``seen``: `Datapath.conn_flags`; None:
    no slot, nothing to follow). The kernel copies nothing up: this is how the host learns
    of handshakes, FINs and RSTs on offloaded connections."""
    if seen is None:
        return
    state = tcp_state_from_flags(seen[0], seen[1], conn.tcp_state)
    if state is not conn.tcp_state:
        conn.tcp_state = state
        table.reschedule(conn)


def lone_drop(flow: Flow) -> bool:
    """A drop flow with no reply half: the memory of a refused unsolicited packet. It must
    not block a legitimate connection whose reply would use the same key."""
    return flow.actions.output is None and flow.conn.reverse is None


class FlowTable:
    """Exact-match flows with paired creation, TCP state and idle expiry."""

    def __init__(self, timeouts: Timeouts | None = None,
                 max_flows: int = DEFAULT_MAX_FLOWS,
                 on_remove: Callable[[Conn], None] | None = None,
                 port_share: float = DEFAULT_PORT_SHARE) -> None:
        self.timeouts = timeouts or Timeouts()
        self._on_remove = on_remove
        self.max_flows = max_flows
        self.port_max = max(2, int(max_flows * port_share))  # flows one ingress may hold
        self.by_ingress: collections.Counter[str] = collections.Counter()  # flows held
        self._flows: dict[tuple, Flow] = {}
        self._wheel: dict[int, list[Conn]] = {}
        self._next_sweep_s: int | None = None
        self.next_sweep_ns = NEVER  # callers may skip `expire` until then (hot path)
        self.created = 0  # connections
        self.expired = 0
        self.refused = 0  # flow_limit
        self.early_expired = 0  # expired early because the table was full

    def __len__(self) -> int:
        return len(self._flows)

    def __iter__(self) -> Iterator[Flow]:
        return iter(list(self._flows.values()))

    def get(self, key: tuple) -> Flow | None:
        return self._flows.get(key)

    def __contains__(self, key: tuple) -> bool:
        return key in self._flows

    def conns(self) -> Iterator[Conn]:
        for f in list(self._flows.values()):
            if f.is_forward:
                yield f.conn

    def has_room(self, n: int) -> bool:
        return len(self._flows) + n <= self.max_flows

    def port_has_room(self, ingress: str, n: int) -> bool:
        """Would ``n`` more flows keep ``ingress`` within its share?"""
        return self.by_ingress[ingress] + n <= self.port_max

    def heaviest(self) -> str | None:
        """The ingress holding the most flows (early ageing takes from it first)."""
        top = self.by_ingress.most_common(1)
        return top[0][0] if top else None

    def add(self, forward: Flow, reverse: Flow | None, *, proto: int | None, generation: int,
            now_ns: int) -> Conn:
        """Insert a connection; the caller checked `has_room` and key collisions."""
        conn = Conn(forward, reverse, proto, generation, now_ns, now_ns)
        for f in conn.flows():
            f.conn = conn
            self._flows[f.key] = f
        self.by_ingress[forward.key[0]] += len(conn.flows())
        self.created += 1
        self._schedule(conn)
        return conn

    def remove(self, conn: Conn) -> None:
        """Remove both flows of a connection (the wheel entry is dropped lazily)."""
        if conn.removed:
            return
        conn.removed = True
        ingress = conn.forward.key[0]
        for f in conn.flows():
            if self._flows.get(f.key) is f:
                del self._flows[f.key]
                self.by_ingress[ingress] -= 1
        if self.by_ingress[ingress] <= 0:
            del self.by_ingress[ingress]
        if self._on_remove is not None:
            self._on_remove(conn)

    def touch(self, flow: Flow, length: int, now_ns: int, tcp_flags: int | None) -> None:
        """Account one packet on a flow; follow TCP state on control flags."""
        flow.packets += 1
        flow.bytes += length
        conn = flow.conn
        if now_ns > conn.last_seen_ns:
            conn.last_seen_ns = now_ns
        if tcp_flags is not None and (tcp_flags & TCP_CONTROL or conn.tcp_state in (
                TcpState.SYN_SENT, TcpState.SYN_RECEIVED, TcpState.NONE,
                TcpState.UNCONFIRMED)):
            state = next_tcp_state(conn.tcp_state, tcp_flags, flow is conn.forward)
            if state is not conn.tcp_state:
                conn.tcp_state = state
                if not conn.removed:
                    self._schedule(conn)  # a RST or FIN may bring the deadline forward

    def reschedule(self, conn: Conn) -> None:
        """The connection's state or last-seen time was set from outside: re-file it."""
        if not conn.removed:
            self._schedule(conn)

    def deadline_ns(self, conn: Conn) -> int:
        if conn.forward.actions.output is None:
            return conn.last_seen_ns + int(self.timeouts.drop * NS)
        return conn.last_seen_ns + self.timeouts.idle_ns(conn.proto, conn.tcp_state)

    def _schedule(self, conn: Conn) -> None:
        bucket = -(-self.deadline_ns(conn) // NS)  # ceil to whole seconds
        conn.deadline_s = bucket
        self._wheel.setdefault(bucket, []).append(conn)
        if self._next_sweep_s is None or bucket < self._next_sweep_s:
            self._next_sweep_s = bucket
            self.next_sweep_ns = bucket * NS

    def expire(self, now_ns: int) -> list[Conn]:
        """Remove and return the connections idle past their timeout at ``now_ns``.

        Cheap to call per packet: it returns at once until the next due bucket.
        """
        now_s = now_ns // NS
        if self._next_sweep_s is None or now_s < self._next_sweep_s:
            return []
        expired: list[Conn] = []
        for bucket in sorted(b for b in self._wheel if b <= now_s):
            for conn in self._wheel.pop(bucket):
                if conn.removed or conn.deadline_s != bucket:
                    continue
                if self.deadline_ns(conn) <= now_ns:
                    self.remove(conn)
                    expired.append(conn)
                else:
                    self._schedule(conn)
        self._next_sweep_s = min(self._wheel) if self._wheel else None
        self.next_sweep_ns = self._next_sweep_s * NS if self._next_sweep_s is not None else NEVER
        self.expired += len(expired)
        return expired

    def expire_early(self, now_ns: int, fraction: float,
                     ingress: str | None = None) -> list[Conn]:
        """Under pressure (table or share full): expire connections idle for more than
        ``fraction`` of their timeout, only those ``ingress`` started if given.
        O(connections), so callers rate-limit it."""
        doomed = [c for c in self.conns()
                  if (ingress is None or c.forward.key[0] == ingress)
                  and now_ns - c.last_seen_ns > fraction * (self.deadline_ns(c) - c.last_seen_ns)]
        for conn in doomed:
            self.remove(conn)
        self.expired += len(doomed)
        self.early_expired += len(doomed)
        return doomed

    def clear(self) -> list[Conn]:
        """Remove every connection (flush); returns them so datapaths can be told."""
        conns = list(self.conns())
        for c in conns:
            self.remove(c)
        self._wheel.clear()
        self._next_sweep_s = None
        self.next_sweep_ns = NEVER
        return conns
