"""The packet pipeline shared by the daemon and the trace tool.

``Pipeline.process(frame, ingress, now)`` is pure (no I/O): it takes one Ethernet frame, the
name of the port or uplink it came in on, and the time, and returns a `Result` saying where it
was resolved (``nic`` cache hit, ``host`` flow hit, ``slow`` rule evaluation), the verdict and
the frame as it leaves. Datapath changes go through the `Datapath` object it was given.

The path of a packet::

    frame -> fast_flow_key / parse          (appliance.packet)
          -> flow table hit?                (appliance.flows)   -> execute compiled actions
          -> ARP/ND, fragments              (here)
          -> slow path: layer walk          (here, with appliance.classifier per layer)
               sender's outbound layers top to bottom, then the receiver's inbound layers
               bottom to top; deny stops the walk
          -> compile forward + reverse      (appliance.actions.CompiledActions)
          -> flow pair into the table, offload each to the datapath if it can execute it

ARP and IPv6 neighbour discovery are answered by the switch itself (proxy ARP/ND, like VFP and
OPTE's virtual gateway): a port asking for another port's address gets that port's MAC; any
other address gets ``gateway_mac`` (the VMs' default gateway is the switch). Requests from the
uplink for addresses the switch owns (port IPs, SNAT addresses, DNAT VIPs) are answered with
``uplink_mac`` (or ``gateway_mac``). ARP/ND never cross the switch and are never offloaded.

Fragments: the first fragment carries the ports and is looked up like any packet; the
switch remembers (ingress, src, dst, proto, IP id) -> its flow for `FRAG_TIMEOUT_NS`, and
later fragments of the same datagram follow that flow. A non-first fragment seen before its
first fragment is evaluated with no L4 ports (rules with port conditions do not match it) and
creates no flow.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from appliance import guard, policydiff
from appliance import packet as pk
from appliance.actions import CompiledActions, EncapSpec, TokenBucket
from appliance.classifier import Classifier
from appliance.counters import CounterBook
from appliance.datapath.base import Datapath
from appliance.faults import INTERNAL_ERROR, Fault, make_fault
from appliance.flows import DEFAULT_MAX_FLOWS, DEFAULT_PORT_SHARE, Conn, Flow, FlowTable, LayerStep
from appliance.model import (
    Action,
    ActionKind,
    Allow,
    Count,
    Decap,
    Deny,
    Direction,
    Dnat,
    Encap,
    Layer,
    Meter,
    Policy,
    Port,
    Snat,
    int_to_ip,
    is_ipv4,
)
from appliance.policydiff import PolicyDiff
from appliance.timeouts import (
    NS,
    TCP_ACK,
    TCP_SYN,
    TcpState,
    Timeouts,
    next_tcp_state,
    tcp_conn_over,
    tcp_state_from_flags,
)

FRAG_TIMEOUT_NS: Final = 30 * NS  # how long later fragments may follow their first one
FRAG_PORT_MAX: Final = 4096  # first fragments remembered per ingress (then the oldest goes)
EARLY_AGE_INTERVAL_NS: Final = NS  # at most one early-ageing scan per second
EARLY_AGE_FRACTION: Final = 0.25  # full table: expire what is idle > 1/4 of its timeout
PREFERRED_SPORT: Final = -1  # key in snat_ports: keep this translated port if free
SNAT_PORT_TRIES: Final = 256  # probes for a free source port before giving up (nat_exhausted)
TEMPLATE_CACHE: Final = 4096  # decision templates kept (cleared when full)
EPHEMERAL_LO: Final = 1024
BROADCAST_MAC: Final = 0xFFFF_FFFF_FFFF
ICMP_ECHO_REPLY: Final = {8: 0, 128: 129, 0: 8, 129: 128}
ND_NS: Final = 135
ND_TYPES: Final = frozenset({133, 134, 135, 136, 137})


@dataclass(slots=True)
class Result:
    """What happened to one packet; the trace tool prints it, the daemon acts on it."""

    ingress: str
    path: str  # "nic" | "host" | "slow"
    verdict: str  # "forward" | "drop"
    reason: str | None = None
    port: str | None = None
    direction: Direction | None = None
    out_port: str | None = None
    frame: bytes | None = None  # the packet as it leaves (None when dropped)
    flow: Flow | None = None
    steps: tuple[LayerStep, ...] = ()
    key: tuple | None = None
    offload: str | None = None  # slow path: what the datapath said
    note: str | None = None  # e.g. "arp_reply", "related"


@dataclass(slots=True)
class _Step:
    """A slow-path layer decision with the headers before/after, for the reverse walk."""

    port: Port
    layer: Layer
    direction: Direction
    rule: str
    action: Action
    h_in: pk.Headers
    h_out: pk.Headers
    priority: int | None = None  # the matched rule's priority (None: default or inverse)
    values: tuple | None = None  # the classifier lookup tuple (None: no lookup)


@dataclass(slots=True)
class _Walk:
    steps: list[_Step]
    h: pk.Headers
    drop_reason: str | None = None
    meters: list[TokenBucket] = dataclasses.field(default_factory=list)
    counters: list[str] = dataclasses.field(default_factory=list)
    kinds: set[ActionKind] = dataclasses.field(default_factory=set)
    decapped: bool = False
    encap: Encap | None = None


@dataclass(slots=True)
class _Decision:
    """The outcome of evaluating policy for one flow key (and its reply)."""

    actions: CompiledActions
    steps: tuple[LayerStep, ...]
    port: str | None
    direction: Direction
    output: str | None
    rkey: tuple | None = None
    ractions: CompiledActions | None = None
    rsteps: tuple[LayerStep, ...] = ()
    rport: str | None = None
    rdirection: Direction | None = None
    conflict: str | None = None  # nat_exhausted / flow_collision


@dataclass(slots=True)
class RevalidationStats:
    checked: int = 0
    unchanged: int = 0
    updated: int = 0  # actions changed in place
    replaced: int = 0  # removed, and re-installed when policy still admits the key
    remaining: int = 0  # left for the next call (limit reached)


class Counters:
    """Packets, bytes, drops by reason (also per ingress) and paths, counted per packet;
    per-rule and per-port traffic is derived from flows (`appliance.counters`)."""

    __slots__ = ("bytes", "drops", "faults", "packets", "paths", "port_drops")

    def __init__(self) -> None:
        self.packets = 0
        self.bytes = 0
        self.drops: collections.Counter[str] = collections.Counter()
        self.port_drops: collections.Counter[tuple[str, str]] = collections.Counter()
        self.paths: collections.Counter[str] = collections.Counter()
        self.faults: collections.Counter[str] = collections.Counter()  # by Fault.cause


def _make_copier():
    """An unrolled field-by-field copy of Headers (generated once: no per-field getattr)."""
    body = "\n".join(f"    c.{n} = h.{n}" for n in pk.Headers.__slots__)
    src = f"def copy_headers(h):\n    c = new(Headers)\n{body}\n    return c\n"
    scope: dict = {"new": object.__new__, "Headers": pk.Headers}
    exec(src, scope)
    return scope["copy_headers"]


_copy_headers = _make_copier()


def _clone(h: pk.Headers, **changes: object) -> pk.Headers:
    """Copy of ``h`` with ``changes``; dataclasses.replace costs ~20 us here, this ~1 us."""
    c = _copy_headers(h)
    for name, value in changes.items():
        setattr(c, name, value)
    return c


def _reverse_headers(h: pk.Headers) -> pk.Headers:
    """Headers of the reply to ``h``: addresses, ports, MACs and tunnel endpoints swapped."""
    r = _clone(h, src_mac=h.dst_mac, dst_mac=h.src_mac, src=h.dst, dst=h.src,
               sport=h.dport, dport=h.sport, tcp_flags=None, embedded=None)
    if h.icmp_type in ICMP_ECHO_REPLY and h.icmp_id is not None:
        r.icmp_type = ICMP_ECHO_REPLY[h.icmp_type]
    if h.inner is not None:
        r.inner = _reverse_headers(h.inner)
        r.sport, r.dport = h.sport, h.dport  # the reply is sent to the VXLAN port too
    return r


def _values(h: pk.Headers) -> tuple:
    """Classifier lookup tuple in `appliance.model.FIELDS` order."""
    return (h.src, h.dst, h.sport, h.dport, h.proto, h.dscp, h.src_mac, h.dst_mac, h.vlan, h.vni)


def describe_action(action: Action) -> str:
    """Human form of a policy action, as traces show it."""
    if isinstance(action, Snat | Dnat):
        port = f":{action.port}" if action.port is not None else ""
        return f"{action.kind}({int_to_ip(action.ip)}{port})"
    if isinstance(action, Encap):
        return (f"encap(vxlan vni={action.vni} {int_to_ip(action.local)}->"
                f"{int_to_ip(action.remote)})")
    if isinstance(action, Meter):
        rates = [f"{action.pps}pps" if action.pps else "", f"{action.bps}bps" if action.bps else ""]
        return f"meter({','.join(r for r in rates if r)})"
    return str(action.kind)


def _set_macs(frame: bytes, src: int | None, dst: int | None) -> bytes:
    """Splice Ethernet addresses into a frame (None keeps the frame's own)."""
    if src is None and dst is None:
        return frame
    d = dst.to_bytes(6) if dst is not None else frame[0:6]
    s = src.to_bytes(6) if src is not None else frame[6:12]
    return d + s + frame[12:]


def _template_key(h: pk.Headers, ingress: str) -> tuple | None:
    """Everything a walk may depend on except the client's source port (plain TCP/UDP)."""
    if h.inner is not None or h.frag or h.proto not in (6, 17) or h.sport is None:
        return None
    return (ingress, h.vlan, h.proto, h.src, h.dst, h.dport, h.dscp, h.src_mac, h.dst_mac)


def _with_reply_dport(rkey: tuple, port: int) -> tuple:
    ingress, (vlan, proto, src, sport, dst, _dport, tun) = rkey
    return (ingress, (vlan, proto, src, sport, dst, port, tun))


def _with_port(steps: tuple[LayerStep, ...], index: int, port: int) -> tuple[LayerStep, ...]:
    """Steps with the port at ``index`` of their lookup values replaced."""
    out = []
    for st in steps:
        v = st.values
        if v is not None:
            v = (*v[:index], port, *v[index + 1:])
            st = LayerStep(st.port, st.layer, st.direction, st.rule, st.action, st.priority, v)
        out.append(st)
    return tuple(out)


def _lone_drop(flow: Flow) -> bool:
    """A drop flow with no reply half: the memory of a refused unsolicited packet. It must
    not block a legitimate connection whose reply would use the same key."""
    return flow.actions.output is None and flow.conn.reverse is None


class PacketInvariantError(Exception):
    """A frame the pipeline had already parsed does not parse again: a bug, never input."""


def _parse_known(frame: bytes, *, tunnel: bool = True) -> pk.Headers:
    """Parse a frame that is known to be well-formed (it was parsed or keyed before)."""
    h = pk.parse(frame, tunnel=tunnel)
    if isinstance(h, str):
        raise PacketInvariantError(f"re-parsing a known frame failed: {h}")
    return h


def _address_problem(h: pk.Headers) -> str | None:
    """`appliance.guard.address_problem` for the outer and, for VXLAN, the inner packet."""
    problem = guard.address_problem(h.src, h.dst)
    if problem is None and h.inner is not None:
        problem = guard.address_problem(h.inner.src, h.inner.dst)
    return problem


def _check_delivery(w: _Walk, dest: _PortCtx) -> None:
    """A frame delivered to a port must carry a VLAN tag the port is on (access ports: none);
    after a decap that is the inner frame's tag. Anything else is VLAN hopping."""
    if w.drop_reason is None and not dest.port.allows_vlan(w.h.vlan):
        w.drop_reason = guard.VLAN_NOT_ALLOWED


def _link_local(h: pk.Headers) -> bool:
    """A packet of link-local scope (either address): never forwarded, whatever it is in."""
    return h.dst is not None and (_link_local_scope(h.dst) or _link_local_source(h.src))


def _link_local_source(src: int | None) -> bool:
    """fe80::/10: valid on the link only; no router forwards a packet from it (RFC 4291)."""
    return src is not None and src >> 118 == 0xFE80 >> 6


def _link_local_scope(dst: int) -> bool:
    """Limited broadcast, IPv4 local-network multicast (224.0.0.0/24), IPv6 ff02::/16."""
    if is_ipv4(dst):
        v4 = dst & 0xFFFF_FFFF
        return v4 == 0xFFFF_FFFF or v4 >> 8 == 0xE00000
    return dst >> 112 == 0xFF02


def _is_echo_request(h: pk.Headers) -> bool:
    return h.icmp_id is not None and h.icmp_type in (8, 128)


class _PortCtx:
    """A port with its layers resolved to (layer, outbound classifier, inbound classifier)."""

    __slots__ = ("layers", "port")

    def __init__(self, port: Port, layers: list[tuple[Layer, Classifier, Classifier]]) -> None:
        self.port = port
        self.layers = layers


class Pipeline:
    """Layers, classifiers, flow table and datapath for one policy; see the module docstring."""

    def __init__(self, policy: Policy, datapath: Datapath, *, timeouts: Timeouts | None = None,
                 max_flows: int = DEFAULT_MAX_FLOWS,
                 port_share: float = DEFAULT_PORT_SHARE) -> None:
        self.datapath = datapath
        self.book = CounterBook()
        self.flows = FlowTable(timeouts, max_flows, on_remove=self.book.retire,
                               port_share=port_share)
        self.counters = Counters()
        # called with ("created", conn) / ("expired", conn) / ("evicted", flow) off the
        # per-packet path, and ("fault", Fault); the daemon turns them into operator events
        # and logs
        self.observers: list[Callable[[str, object], None]] = []
        self.generation = 0
        # per ingress, oldest first: fragment key -> (flow of its first fragment, deadline)
        self._frags: dict[str, collections.OrderedDict[tuple, tuple[Flow, int]]] = {}
        self.frag_evictions = 0  # remembered first fragments pushed out by a port's cap
        self._meters: dict[tuple, TokenBucket] = {}
        self._diff: PolicyDiff | None = None
        self._last_early_ns: dict[str | None, int] = {}  # per ingress (None: whole table)
        self._templates: dict[tuple, tuple[_Decision, int]] = {}
        self._port_fields: dict[tuple[str, Direction], set[str]] = {}
        self.template_hits = 0  # new connections decided by a template (no full walk)
        self.stale = False  # some connection may predate the current generation
        self._reval_queue: list[Conn] | None = None
        self.set_policy(policy)

    # ----------------------------------------------------------------- policy

    def set_policy(self, policy: Policy) -> PolicyDiff | None:
        """Activate a validated policy and bump the generation; flows are kept.

        Existing flows are revalidated against the new policy: offloaded ones by
        `revalidate` sweeps (they never come up by themselves), software ones at the latest
        on their next packet. Returns what changed (None for the first policy).
        """
        classifiers = {
            name: (layer, Classifier(layer.outbound), Classifier(layer.inbound))
            for name, layer in policy.layers.items()
        }
        ports = {p.name: _PortCtx(p, [classifiers[n] for n in p.layers]) for p in policy.ports}
        by_mac = {p.mac: ports[p.name] for p in policy.ports if p.steer_by_mac}
        by_ip = {ip: ports[p.name] for p in policy.ports for ip in p.ips}
        prefixes = sorted(((lo, hi, ports[p.name]) for p in policy.ports
                           for lo, hi in p.allowed_sources), key=lambda t: t[1] - t[0])
        vips: list[tuple[int, int, _PortCtx]] = []
        owned: set[int] = set(by_ip)
        for p in policy.ports:
            for layer, _, _ in ports[p.name].layers:
                for rule in layer.outbound:
                    if isinstance(rule.action, Snat):
                        owned.add(rule.action.ip)
                    elif isinstance(rule.action, Encap):
                        owned.add(rule.action.local)  # the switch is the tunnel endpoint
                for rule in layer.inbound:
                    if isinstance(rule.action, Dnat) and "dst" in rule.match.fields:
                        for lo, hi in rule.match.fields["dst"].pos:
                            vips.append((lo, hi, ports[p.name]))
                            if lo == hi:
                                owned.add(lo)
        old = getattr(self, "policy", None)
        self.policy = policy
        self._ports = ports
        self._by_mac = by_mac
        self._by_ip = by_ip
        self._prefixes = prefixes  # narrowest first
        # port security on flow hits: the key holds the source address, not the MAC
        self._port_macs = {p.name: p.mac for p in policy.ports if p.port_security}
        self._vips = vips
        self._owned = owned
        self._uplink = policy.uplink
        self.generation += 1
        self._diff = policydiff.diff(old, policy) if old is not None else None
        self._templates = {}
        self._port_fields = {
            (name, d): {f for r in layer.rules(d) for f in r.match.fields
                        if f in ("src_port", "dst_port")}
            for name, layer in policy.layers.items() for d in (Direction.OUT, Direction.IN)
        }
        self.stale = old is not None
        self._reval_queue = None  # rebuilt for the new generation
        return self._diff

    def revalidate(self, now_ns: int, limit: int | None = None) -> RevalidationStats:
        """Bring connections made under older generations up to date (``limit`` per call).

        Unaffected connections only get the new generation; affected ones are re-evaluated
        from their key: unchanged decisions keep forwarding with no gap, changed actions are
        updated in place in the datapath, and a connection whose reply path or verdict
        changed is replaced (a newly denied one by a drop flow, so the datapath drops it at
        once).
        """
        stats = RevalidationStats()
        if not self.stale:
            return stats
        gen = self.generation
        if self._reval_queue is None:  # one pass over the table per generation, not per call
            self._reval_queue = [c for c in self.flows.conns() if c.generation != gen]
        queue = self._reval_queue
        while queue and (limit is None or stats.checked < limit):
            conn = queue.pop()
            if conn.generation == gen or conn.removed:
                continue
            stats.checked += 1
            try:
                self._revalidate_conn(conn, now_ns, stats)
            except Exception as exc:  # fail closed: its next packet is evaluated afresh
                self.record_fault("revalidate", exc, ingress=conn.forward.key[0])
                self._discard(conn)
        stats.remaining = len(queue)
        if not queue:
            self.stale = False
            self._reval_queue = None
        return stats

    def _revalidate_conn(self, conn: Conn, now_ns: int,
                         stats: RevalidationStats | None = None) -> None:
        stats = stats if stats is not None else RevalidationStats()
        gen = self.generation
        diff = self._diff
        if diff is not None and conn.generation == gen - 1 and not any(
                diff.affects(f) for f in conn.flows()):
            conn.generation = gen
            stats.unchanged += 1
            return
        fwd, rev = conn.forward, conn.reverse
        ingress, key = fwd.key
        h = self._headers_of(fwd)
        if self._admit(h, ingress, check_mac=h.inner is None) is not None:
            self._remove_conn(conn)  # e.g. the port no longer owns the source: no flow at all
            stats.replaced += 1
            return
        prefer = fwd.actions.sport if fwd.actions.sport is not None else fwd.actions.icmp_id
        d = None
        tkey = _template_key(h, ingress) if prefer is None else None
        if tkey is not None:  # a full re-evaluation of many similar flows: reuse walks
            d = self._from_template(tkey, h.sport, own=conn)  # type: ignore[arg-type]
        if d is None:
            d = self._evaluate(h, ingress, key, own=conn, prefer_sport=prefer)
            if tkey is not None:
                self._remember_template(tkey, h.sport, d)  # type: ignore[arg-type]
        same_shape = d.conflict is None and d.rkey == (rev.key if rev is not None else None)
        if same_shape and d.actions == fwd.actions and (
                rev is None or d.ractions == rev.actions):
            # same actions, but possibly decided by other rules now: record those, or the
            # next policy diff would reason from rules that no longer decide this flow
            self._restep(fwd, d.steps)
            if rev is not None:
                self._restep(rev, d.rsteps)
            conn.generation = gen
            stats.unchanged += 1
            return
        if same_shape and d.actions.output is not None and rev is not None:
            fwd.actions = d.actions
            rev.actions = d.ractions  # type: ignore[assignment]
            self._restep(fwd, d.steps)
            self._restep(rev, d.rsteps)
            conn.generation = gen
            for f in (fwd, rev):
                f.nic_refused = None
                if f.offloaded:
                    self.datapath.update(f)
                if f.nic_refused is None and not f.offloaded:
                    self._offload(f, now_ns)
            stats.updated += 1
            return
        seen = self.datapath.conn_flags(conn)  # what the kernel saw since the last fold
        if seen is not None:
            conn.tcp_state = tcp_state_from_flags(seen[0], seen[1], conn.tcp_state)
        self._remove_conn(conn)
        stats.replaced += 1
        if d.conflict is None:
            new_fwd, new_rev = self._install(d, ingress, key, h, now_ns)
            new_conn = new_fwd.conn
            new_conn.tcp_state = conn.tcp_state
            new_conn.created_ns = conn.created_ns
            new_conn.last_seen_ns = conn.last_seen_ns
            self.flows.reschedule(new_conn)  # its real state decides its timeout
            for f in (new_fwd, new_rev):
                if f is not None:
                    self._offload(f, now_ns)

    @staticmethod
    def _headers_of(flow: Flow) -> pk.Headers:
        """Headers to re-evaluate a flow with: its key, plus what the key does not hold but
        rules may match on (MACs and DSCP of the packet that created it)."""
        h = pk.headers_from_key(flow.key[1], src_mac=flow.macs[0], dst_mac=flow.macs[1])
        outer_dscp, inner_dscp = flow.dscp
        h.dscp = outer_dscp
        if h.inner is not None:
            h.inner.dscp = inner_dscp
        return h

    def _restep(self, flow: Flow, steps: tuple[LayerStep, ...]) -> None:
        """Replace the layer decisions recorded for ``flow``; the packets it carried so far
        stay credited to the rules that decided them then (counters never go backwards)."""
        if [(s.port, s.layer, s.direction, s.rule) for s in flow.steps] != [
                (s.port, s.layer, s.direction, s.rule) for s in steps]:
            self.book.retire_flow(flow)
            flow.packets = flow.bytes = 0
        flow.steps = steps

    def flush(self) -> list[Conn]:
        """Remove every flow from the table and the datapath."""
        conns = self.flows.clear()
        for conn in conns:
            for f in conn.flows():
                if f.offloaded:
                    self.datapath.remove(f)
        self._frags.clear()
        return conns

    # ------------------------------------------------------------- per packet

    def age(self, now_ns: int) -> list[Conn]:
        """Expire idle connections at ``now_ns``; removes them from the datapath too."""
        expired = self.flows.expire(now_ns)
        for conn in expired:
            for f in conn.flows():
                if f.offloaded:
                    self.datapath.remove(f)
            self._emit("expired", conn)
        if expired:
            self._prune_frags()
        return expired

    def _prune_frags(self) -> None:
        """Forget fragment bookkeeping of connections that are gone."""
        for ingress, frags in list(self._frags.items()):
            for k in [k for k, v in frags.items() if v[0].conn.removed]:
                del frags[k]
            if not frags:
                del self._frags[ingress]

    def process(self, frame: bytes, ingress: str, now_ns: int) -> Result:
        """Run one frame through the switch; see the module docstring.

        Never raises for a frame: an unexpected exception is a bug, and it costs this one
        packet (dropped as ``internal_error``, see `appliance.faults`), never the switch.
        """
        try:
            result = self._process(frame, ingress, now_ns)
        except Exception as exc:
            result = self.count_drop(ingress, self.record_fault("process", exc, ingress=ingress,
                                                                frame=frame))
        if result.path != "nic":
            self.datapath.miss()
        return result

    def record_fault(self, where: str, exc: BaseException, *, ingress: str | None = None,
                     frame: bytes | None = None) -> Fault:
        """Count an exception caught at a unit-of-work boundary and tell the observers.

        Packets are counted by `_drop` (per port, reason ``internal_error``); this counts the
        cause, for every kind of work (the daemon records its own boundaries here too).
        """
        fault = make_fault(where, exc, ingress=ingress, frame=frame)
        self.counters.faults[fault.cause] += 1
        self._emit("fault", fault)
        return fault

    def count_drop(self, ingress: str, fault: Fault) -> Result:
        """Account the packet a fault cost (reason ``internal_error``, per port)."""
        return self._drop(ingress, "host", INTERNAL_ERROR, note=fault.traceback)

    def _discard(self, conn: Conn) -> None:
        """Remove a connection whose handling failed; a failure here is recorded, not raised."""
        try:
            self._remove_conn(conn)
        except Exception as exc:
            self.record_fault("discard", exc, ingress=conn.forward.key[0])
            self.flows.remove(conn)

    def _process(self, frame: bytes, ingress: str, now_ns: int) -> Result:
        if now_ns >= self.flows.next_sweep_ns:
            self.age(now_ns)
        c = self.counters
        c.packets += 1
        c.bytes += len(frame)
        key = pk.fast_flow_key(frame)
        if key is not None:
            flow = self.flows.get((ingress, key))
            if flow is not None and flow.conn.generation != self.generation:
                flow = self._refresh(flow, now_ns)
            if flow is not None:
                mac = self._port_macs.get(ingress)
                if mac is not None and mac != int.from_bytes(frame[6:12]):
                    return self._refuse(ingress, guard.SPOOFED_MAC, key)
                flags = None
                if key[1] == 6:
                    flags = frame[47] if frame[12] == 0x08 else frame[67]
                    if self._restarts(flow, flags):
                        return self._slow(frame, None, ingress, key, now_ns)
                return self._run(flow, frame, None, ingress, now_ns, flags)
            return self._slow(frame, None, ingress, key, now_ns)
        h = pk.parse(frame)
        if isinstance(h, str):
            return self._drop(ingress, "host", h)
        if h.arp_op is not None:
            return self._arp(frame, h, ingress)
        if h.src is None:
            return self._drop(ingress, "host", "non_ip")
        if h.proto == 58 and h.icmp_type in ND_TYPES and h.vni is None:
            return self._nd(frame, h, ingress)
        if h.frag == 2:
            return self._later_fragment(frame, h, ingress, now_ns)
        key = pk.flow_key(h)
        flow = self.flows.get((ingress, key))
        if flow is not None and flow.conn.generation != self.generation:
            flow = self._refresh(flow, now_ns)
        if flow is not None:
            mac = self._port_macs.get(ingress)
            if mac is not None and mac != h.src_mac:
                return self._refuse(ingress, guard.SPOOFED_MAC, key)
            if h.frag == 1:  # every datagram's later fragments follow its first one
                self._remember_fragment(h, ingress, flow, now_ns)
            flags = h.inner.tcp_flags if h.inner is not None else h.tcp_flags
            if flags is not None and self._restarts(flow, flags):
                return self._slow(frame, h, ingress, key, now_ns)
            return self._run(flow, frame, h, ingress, now_ns, flags)
        problem = self._admit(h, ingress)
        if problem is not None:
            return self._refuse(ingress, problem, key)
        if h.embedded is not None:
            related = self._related(frame, h, ingress, now_ns)
            if related is not None:
                return related
        return self._slow(frame, h, ingress, key, now_ns)

    def install_key(self, ingress: str, key: tuple, now_ns: int,
                    prefer_sport: int | None = None) -> Result:
        """Evaluate policy for a flow key with no packet and install the flow pair.

        Used to adopt kernel entries left by a previous run (headless restart). A key that
        already has a flow is left alone.
        """
        existing = self.flows.get((ingress, key))
        if existing is not None:
            return Result(ingress, "host", "forward" if existing.actions.output else "drop",
                          existing.actions.drop_reason, existing.port, existing.direction,
                          existing.actions.output, None, existing, key=key)
        return self._slow(None, pk.headers_from_key(key), ingress, key, now_ns,
                          prefer_sport=prefer_sport, check_mac=False)  # a key has no MACs

    def starts_connection(self, frame: bytes, ingress: str) -> bool:
        """Cheap check: would this frame cost a policy evaluation? True for a frame of no
        known flow (common case only: anything the fast key does not cover counts as "maybe
        new"), and for a SYN that restarts a closed connection on its forward flow. Lets the
        daemon charge exactly the evaluations (restarts included) to a port's slow-path
        budget, never the packets of established software-path flows."""
        key = pk.fast_flow_key(frame)
        if key is None:
            return True
        flow = self.flows.get((ingress, key))
        if flow is None:
            return True
        if key[1] != 6:
            return False
        flags = frame[47] if frame[12] == 0x08 else frame[67]
        return self._reopens(flow, flags)

    def observe(self, frame: bytes, ingress: str, now_ns: int) -> Flow | None:
        """Follow a copy of a packet the datapath already forwarded (TCP control flags).

        Never raises for a frame (see `process`); a failure is recorded as a fault.
        """
        try:
            return self._observe(frame, ingress, now_ns)
        except Exception as exc:
            self.record_fault("observe", exc, ingress=ingress, frame=frame)
            return None

    def _observe(self, frame: bytes, ingress: str, now_ns: int) -> Flow | None:
        """The work of `observe`.

        Updates the connection's TCP state and last-seen time; executes nothing. A copy of a
        SYN that starts a new connection on a closed one replaces the old pair right away
        (evaluated afresh, installed, offloaded), so the server's SYN-ACK finds the new reply
        flow instead of being refused as unsolicited.
        """
        key = pk.fast_flow_key(frame)
        h = None
        if key is None:
            h = pk.parse(frame)
            if isinstance(h, str) or h.src is None:
                return None
            key = pk.flow_key(h)
        flow = self.flows.get((ingress, key))
        if flow is None:
            return None
        if h is None:
            flags = frame[47] if frame[12] == 0x08 else frame[67]
        else:
            t = h.inner if h.inner is not None else h
            flags = t.tcp_flags or 0
        if self._restarts(flow, flags):
            if h is None:
                h = _parse_known(frame)
            new = self._slow(None, h, ingress, key, now_ns)
            if new.flow is not None:
                self.flows.touch(new.flow, 0, now_ns, flags)  # SYN_SENT, counted by the kernel
                new.flow.packets -= 1
            return new.flow
        conn = flow.conn
        self.flows.touch(flow, 0, now_ns, flags)
        flow.packets -= 1  # the datapath counted it already
        return None if conn.removed else flow

    def remove_port(self, name: str) -> int:
        """Forget every connection that enters or leaves through ``name``; returns how many."""
        doomed = [c for c in self.flows.conns()
                  if any(f.key[0] == name or f.actions.output == name for f in c.flows())]
        for conn in doomed:
            self._remove_conn(conn)
        self._prune_frags()
        return len(doomed)

    def reject(self, ingress: str, reason: str) -> Result:
        """Account a frame dropped before it could be parsed (e.g. unsupported link type)."""
        self.counters.packets += 1
        self.datapath.miss()
        return self._drop(ingress, "host", reason)

    def _refresh(self, flow: Flow, now_ns: int) -> Flow | None:
        """Revalidate a stale flow's connection before using it (software path)."""
        key = flow.key
        self._revalidate_conn(flow.conn, now_ns)
        return self.flows.get(key)

    def _restarts(self, flow: Flow, flags: int) -> bool:
        """A new SYN on a closed/closing connection's forward flow starts a new connection."""
        if self._reopens(flow, flags):
            self._remove_conn(flow.conn)
            return True
        return False

    def _reopens(self, flow: Flow, flags: int) -> bool:
        """A SYN (no ACK) on the forward flow of a connection that is over: as the host
        followed it, or as the datapath judged it from the flags it keeps (a SYN that missed
        an offloaded entry: the kernel saw the end before the ager folded it here)."""
        conn = flow.conn
        if flags & (TCP_SYN | TCP_ACK) != TCP_SYN or flow is not conn.forward:
            return False
        if conn.tcp_state in (TcpState.CLOSING, TcpState.CLOSED):
            return True
        seen = self.datapath.conn_flags(conn) if flow.offloaded else None
        return seen is not None and tcp_conn_over(*seen)

    def remove_conn(self, conn: Conn) -> None:
        """Remove a connection from the table and the datapath (flush, operator request)."""
        self._remove_conn(conn)

    def explain(self, ingress: str, frame: bytes) -> Result:
        """Trace a hypothetical packet (like ``ofproto/trace``) without changing anything.

        Shows the flow it would hit, or the layer walk, compiled actions and reply path the
        slow path would produce; no flow is created, nothing is offloaded, no meter charged.
        """
        h = pk.parse(frame)
        if isinstance(h, str):
            return Result(ingress, "host", "drop", h)
        key = pk.flow_key(h)
        if h.src is None or key is None:
            return Result(ingress, "host", "drop", "non_ip")
        problem = _address_problem(h)
        if problem is not None:
            return Result(ingress, "host", "drop", problem, key=key)
        flow = self.flows.get((ingress, key))
        if flow is not None:
            a = flow.actions
            return Result(ingress, "nic" if flow.offloaded else "host",
                          "forward" if a.output else "drop", a.drop_reason, flow.port,
                          flow.direction, a.output, None, flow, flow.steps, key)
        d = self._evaluate(h, ingress, key, pair=True)
        a = d.actions
        verdict = "forward" if a.output is not None and d.conflict is None else "drop"
        probe = Flow((ingress, key), d.port or "-", d.direction, a, d.steps)
        if d.rkey is not None and d.ractions is not None:
            rev = Flow(d.rkey, d.rport or "-", d.rdirection or d.direction, d.ractions,
                       d.rsteps)
            probe.conn = rev.conn = Conn(probe, rev, None, self.generation, 0, 0)
        else:
            probe.conn = Conn(probe, None, None, self.generation, 0, 0)
        return Result(ingress, "slow", verdict, d.conflict or a.drop_reason, d.port,
                      d.direction, a.output, None, probe, d.steps, key)

    def _refuse(self, ingress: str, reason: str, key: tuple | None) -> Result:
        """Drop a frame `_admit` refused: no flow, counted per port."""
        sender = ingress in self._ports
        return self._drop(ingress, "host", reason, key=key, port=ingress if sender else None,
                          direction=Direction.OUT if sender else Direction.IN)

    def _admit(self, h: pk.Headers, ingress: str, *, check_mac: bool = True) -> str | None:
        """Why a frame may not reach the rules at all (appliance.guard), or None: addresses
        no host may use; link-local scope (a VM's own RS/MLD/DHCP from its link-local or
        unspecified address is not spoofing, and is never forwarded either); then what the
        sending port may not claim (port security, VLAN)."""
        problem = _address_problem(h)
        if problem is None:
            if _link_local(h) or (h.inner is not None and _link_local(h.inner)):
                return "link_local"
            ctx = self._ports.get(ingress)
            if ctx is not None:
                problem = guard.port_problem(ctx.port, h, check_mac=check_mac)
        return problem

    def _remove_conn(self, conn: Conn) -> None:
        self.flows.remove(conn)
        for f in conn.flows():
            if f.offloaded:
                self.datapath.remove(f)

    def _drop(self, ingress: str, path: str, reason: str, **kw) -> Result:
        self.counters.drops[reason] += 1
        self.counters.port_drops[(ingress, reason)] += 1
        self.counters.paths[path] += 1
        return Result(ingress, path, "drop", reason, **kw)

    def _run(self, flow: Flow, frame: bytes, h: pk.Headers | None, ingress: str, now_ns: int,
             tcp_flags: int | None, path: str | None = None, steps: tuple = (),
             offload: str | None = None, note: str | None = None) -> Result:
        """Execute a flow's compiled actions on one packet (NIC hit or host flow hit).

        The hot path of replays: positional construction, no keyword packing.
        """
        length = len(frame)
        if path is None:
            if flow.offloaded and self.datapath.hit(flow, length, now_ns):
                path = "nic"
            else:
                path = "host"
                if flow.nic_refused is None and not flow.offloaded:
                    self._offload(flow, now_ns)
        self.flows.touch(flow, length, now_ns, tcp_flags)
        a = flow.actions
        if a.output is None:
            return self._drop(ingress, path, a.drop_reason or "deny", port=flow.port,
                              direction=flow.direction, flow=flow, key=flow.key[1],
                              steps=steps, offload=offload, note=note)
        for m in a.meters:
            if not m.admit(length, now_ns):
                return self._drop(ingress, path, "meter", port=flow.port,
                                  direction=flow.direction, flow=flow, key=flow.key[1],
                                  steps=steps, offload=offload, note=note)
        if a.encap is not None and not pk.vxlan_fits(length, is_ipv4(a.encap.local)):
            return self._drop(ingress, path, "encap_too_big", port=flow.port,
                              direction=flow.direction, flow=flow, key=flow.key[1],
                              steps=steps, offload=offload, note=note)
        out = self._execute(a, frame, h) if a.touches_frame else frame
        self.counters.paths[path] += 1
        return Result(ingress, path, "forward", None, flow.port, flow.direction, a.output, out,
                      flow, steps, flow.key[1], offload, note)

    def _execute(self, a: CompiledActions, frame: bytes, h: pk.Headers | None) -> bytes:
        """Apply decap, rewrites, encap and uplink MACs to the bytes (software datapath).

        MAC changes are spliced without parsing (no checksum covers them); only L3/L4
        rewrites and decap need the parsed headers.
        """
        if a.decap or a.rewrites:
            if h is None:
                h = _parse_known(frame)
            if a.decap and h.inner is not None:
                frame = pk.vxlan_decap(frame, h)
                h = _parse_known(frame, tunnel=False)  # read as it was inside the tunnel
            if a.rewrites:
                frame = pk.rewrite(frame, h, src=a.src, dst=a.dst, sport=a.sport,
                                   dport=a.dport, icmp_id=a.icmp_id)
        frame = _set_macs(frame, a.src_mac, a.dst_mac)
        if a.encap is not None:
            e = a.encap
            src_mac = e.src_mac if e.src_mac is not None else int.from_bytes(frame[6:12])
            dst_mac = e.dst_mac if e.dst_mac is not None else int.from_bytes(frame[0:6])
            frame = pk.vxlan_encap(frame, vni=e.vni, src_ip=e.local, dst_ip=e.remote,
                                   src_mac=src_mac, dst_mac=dst_mac, src_port=e.src_port,
                                   dst_port=e.dst_port)
        return _set_macs(frame, a.outer_src_mac, a.outer_dst_mac)

    # ------------------------------------------------------------ ARP and ND

    def _answer_mac(self, target: int, ingress: str) -> int | None:
        """The MAC the switch answers with for ``target``, or None to stay silent."""
        if ingress == self._uplink:
            if target in self._owned:
                return self.policy.uplink_mac or self.policy.gateway_mac
            return None
        requester = self._ports.get(ingress)
        if requester is not None and target in requester.port.ips:
            return None  # duplicate address detection / gratuitous: nobody else owns it
        owner = self._by_ip.get(target)
        return owner.port.mac if owner is not None else self.policy.gateway_mac

    def _arp(self, frame: bytes, h: pk.Headers, ingress: str) -> Result:
        if ingress != self._uplink and ingress not in self._ports:
            return self._drop(ingress, "host", "unknown_port")
        if h.arp_op != 1 or h.arp_tpa is None:
            return self._drop(ingress, "host", "arp_not_request")
        problem = guard.target_problem(h.arp_tpa)
        if problem is not None:
            return self._drop(ingress, "host", problem)
        mac = self._answer_mac(h.arp_tpa, ingress)
        if mac is None:
            return self._drop(ingress, "host", "arp_not_ours")
        self.counters.paths["host"] += 1
        return Result(ingress, "host", "forward", None, out_port=ingress,
                      frame=pk.build_arp_reply(frame, h, mac), note="arp_reply")

    def _nd(self, frame: bytes, h: pk.Headers, ingress: str) -> Result:
        if ingress != self._uplink and ingress not in self._ports:
            return self._drop(ingress, "host", "unknown_port")
        if h.icmp_type != ND_NS or h.nd_target is None:
            return self._drop(ingress, "host", "nd_not_solicit")
        problem = (guard.target_problem(h.nd_target)
                   or guard.address_problem(h.src, h.dst))
        if problem is not None:
            return self._drop(ingress, "host", problem)
        mac = self._answer_mac(h.nd_target, ingress)
        if mac is None:
            return self._drop(ingress, "host", "nd_not_ours")
        self.counters.paths["host"] += 1
        return Result(ingress, "host", "forward", None, out_port=ingress,
                      frame=pk.build_neighbor_advert(frame, h, mac), note="nd_advert")

    # -------------------------------------------------------------- fragments

    def _frag_key(self, h: pk.Headers, ingress: str) -> tuple | None:
        if h.frag_id is None:
            return None
        return (ingress, h.src, h.dst, h.proto, h.frag_id)

    def _later_fragment(self, frame: bytes, h: pk.Headers, ingress: str,
                        now_ns: int) -> Result:
        problem = self._admit(h, ingress)  # the fragment key holds no VLAN and no MAC
        if problem is not None:
            return self._refuse(ingress, problem, None)
        fk = self._frag_key(h, ingress)
        frags = self._frags.get(ingress)
        entry = frags.get(fk) if frags is not None and fk is not None else None
        if entry is not None and entry[1] >= now_ns and not entry[0].conn.removed:
            return self._run(entry[0], frame, h, ingress, now_ns, None, note="fragment")
        return self._slow(frame, h, ingress, pk.flow_key(h), now_ns, create=False)

    def _remember_fragment(self, h: pk.Headers, ingress: str, flow: Flow, now_ns: int) -> None:
        fk = self._frag_key(h, ingress)
        if fk is not None:
            frags = self._frags.get(ingress)
            if frags is None:
                frags = self._frags[ingress] = collections.OrderedDict()
            frags.pop(fk, None)  # re-inserted at the young end: deadlines stay in order
            frags[fk] = (flow, now_ns + FRAG_TIMEOUT_NS)
            while frags and next(iter(frags.values()))[1] < now_ns:
                frags.popitem(last=False)  # expired
            while len(frags) > FRAG_PORT_MAX:
                frags.popitem(last=False)  # a hard cap per port: the oldest goes
                self.frag_evictions += 1

    # ------------------------------------------------- ICMP errors (related)

    def _related(self, frame: bytes, h: pk.Headers, ingress: str, now_ns: int) -> Result | None:
        """An ICMP error about a known connection follows that connection's reply flow.

        The quoted packet is one this switch sent out (as translated), so the connection's
        reply flow is keyed by its reverse. The error is translated like a reply: outer
        destination and quoted source take the original sender's address and port.
        """
        emb_key = pk.flow_key(h.embedded) if h.embedded.src is not None else None
        if emb_key is None:
            return None
        reply = self.flows.get((ingress, pk.reverse_key(emb_key)))
        if reply is None:
            return None
        a = reply.actions
        if a.output is None:
            return self._drop(ingress, "host", a.drop_reason or "deny", flow=reply,
                              note="related")
        out = frame
        if a.dst is not None or a.src is not None:
            # the reply flow's translation, applied to the error: its destination (and the
            # quoted packet's source) become the original sender's; its source (and the
            # quoted destination) the address the sender talked to (a VIP, for DNAT)
            out = pk.rewrite(out, h, src=a.src, dst=a.dst)
            h2 = _parse_known(out)
            out = pk.rewrite_embedded(out, h2, src=a.dst, sport=a.dport, dst=a.src,
                                      dport=a.sport)
        dest = self._ports.get(a.output)
        if dest is not None:  # delivered to a VM: its own MAC, like the reply flow does
            out = _set_macs(out, None, dest.port.mac)
        elif a.output == self._uplink:  # to the wire: the uplink's MACs, like any frame
            out = _set_macs(out, self.policy.uplink_mac, self.policy.next_hop_mac)
        self.counters.paths["host"] += 1
        return Result(ingress, "host", "forward", None, reply.port, reply.direction, a.output,
                      out, reply, key=reply.key[1], note="related")

    # -------------------------------------------------------------- slow path

    def _select_port(self, h: pk.Headers) -> _PortCtx | None:
        """The port a packet is for: the destination decides, never the sender.

        By destination IP (a port's ``ips``), then DNAT VIP, then a port's
        ``allowed_sources`` prefixes (a router VM's networks, narrowest first); by destination
        MAC only for ports whose policy says ``steer_by_mac``. A frame addressed to one port's
        MAC but another port's IP goes to the owner of the IP, so nobody can steer traffic
        (or create flows occupying reply keys) in another port's name. Tunnelled packets are
        looked at by their inner headers (after decap, [0072]).
        """
        t = h.inner if h.inner is not None else h
        dst = t.dst
        if dst is not None:
            ctx = self._by_ip.get(dst)
            if ctx is not None:
                return ctx
            for lo, hi, vctx in self._vips:
                if lo <= dst <= hi:
                    return vctx
            for lo, hi, pctx in self._prefixes:
                if lo <= dst <= hi:
                    return pctx
        return self._by_mac.get(t.dst_mac) if self._by_mac else None

    def _meter(self, port: Port, layer: Layer, direction: Direction, rule: str,
               m: Meter) -> TokenBucket:
        name = (port.name, layer.name, str(direction), rule)
        key = (*name, m.pps, m.bps, m.burst, m.burst_bytes)  # same meter across reloads
        bucket = self._meters.get(key)
        if bucket is None:
            bucket = TokenBucket("/".join(name), m.pps, m.bps, m.burst, m.burst_bytes)
            self._meters[key] = bucket
        return bucket

    def _walk_port(self, w: _Walk, ctx: _PortCtx, direction: Direction,
                   snat_ports: dict[int, int], inverse_of: list[_Step] | None = None) -> None:
        """Walk one port's layers in ``direction``, updating ``w`` in place.

        ``inverse_of`` (reverse walks only) gives the forward steps in reverse order: a
        stateful layer, or any NAT, undoes its forward action instead of matching rules.
        """
        layers = ctx.layers if direction is Direction.OUT else ctx.layers[::-1]
        for i, (layer, cls_out, cls_in) in enumerate(layers):
            fwd = inverse_of[i] if inverse_of is not None else None
            h_in = w.h
            if fwd is not None and (layer.stateful or isinstance(fwd.action, Snat | Dnat)):
                w.h = self._undo(fwd, w.h)
                w.steps.append(_Step(ctx.port, layer, direction, f"(reverse of {fwd.rule})",
                                     fwd.action, h_in, w.h))
                continue
            cls = cls_out if direction is Direction.OUT else cls_in
            values = _values(w.h)
            rule = cls.lookup(values)
            if rule is None:
                name, action, prio = "default", layer.default(direction), None
            else:
                name, action, prio = rule.name, rule.action, rule.priority
            self._apply(w, ctx.port, layer, direction, name, action, snat_ports)
            w.steps.append(_Step(ctx.port, layer, direction, name, action, h_in, w.h, prio,
                                 values))
            if w.drop_reason is not None:
                return

    def _apply(self, w: _Walk, port: Port, layer: Layer, direction: Direction, rule: str,
               action: Action, snat_ports: dict[int, int]) -> None:
        h = w.h
        if isinstance(action, Deny):
            w.drop_reason = "deny"
            return
        if isinstance(action, Allow):
            return
        w.kinds.add(action.kind)
        if isinstance(action, Count):
            w.counters.append(f"{port.name}/{layer.name}/{rule}")
        elif isinstance(action, Meter):
            w.meters.append(self._meter(port, layer, direction, rule, action))
        elif isinstance(action, Snat | Dnat):
            if h.src is None or is_ipv4(action.ip) != is_ipv4(h.src):
                w.drop_reason = "nat_family"
                return
            h = _clone(h)
            if isinstance(action, Snat):
                h.src = action.ip
                port_no = action.port
                if port_no is None:
                    port_no = snat_ports.get(id(action), snat_ports.get(PREFERRED_SPORT))
                if port_no is not None:
                    if h.sport is not None:
                        h.sport = port_no
                    elif _is_echo_request(h):
                        h.icmp_id = port_no
            else:
                h.dst = action.ip
                if action.port is not None and h.dport is not None:
                    h.dport = action.port
            w.h = h
        elif isinstance(action, Encap):
            if h.inner is not None:
                w.drop_reason = "encap_nested"
                return
            if is_ipv4(action.local) != is_ipv4(action.remote):
                w.drop_reason = "encap_family"
                return
            w.h = pk.Headers(
                src_mac=action.src_mac if action.src_mac is not None else h.src_mac,
                dst_mac=action.dst_mac if action.dst_mac is not None else h.dst_mac,
                vlan=None, ethertype=0x0800 if is_ipv4(action.local) else 0x86DD, l3_off=14,
                ip_version=4 if is_ipv4(action.local) else 6, src=action.local,
                dst=action.remote, proto=17, dscp=0, ttl=64,
                sport=pk.vxlan_source_port(h), dport=action.dst_port, vni=action.vni, inner=h,
            )
            w.encap = action
        elif isinstance(action, Decap) and h.inner is not None:
            w.h = h.inner
            if w.encap is not None:
                w.encap = None  # decap of our own encap: a no-op pair
            else:
                w.decapped = True

    def _undo(self, fwd: _Step, h: pk.Headers) -> pk.Headers:
        """Reverse-walk a stateful step: the reply gets the inverse of the forward change."""
        a = fwd.action
        if isinstance(a, Snat | Dnat):
            orig = _reverse_headers(fwd.h_in)
            h = _clone(h, src=orig.src, dst=orig.dst, sport=orig.sport,
                                    dport=orig.dport, icmp_id=orig.icmp_id)
        elif isinstance(a, Encap) and h.inner is not None:
            h = h.inner
        elif isinstance(a, Decap) and fwd.h_in.inner is not None:
            outer = _reverse_headers(fwd.h_in)
            h = _clone(outer, inner=h)
        return h

    def _walk(self, ingress: str, h0: pk.Headers,
              snat_ports: dict[int, int]) -> tuple[_Walk, _PortCtx | None, Direction, str | None]:
        """Forward slow-path walk: returns the walk, first port, direction and output."""
        w = _Walk([], h0)
        t = h0.inner if h0.inner is not None else h0
        if t.dst is not None and _link_local_scope(t.dst):
            w.drop_reason = "link_local"  # a router never forwards these (RS, MLD, DHCP...)
            return w, self._ports.get(ingress), Direction.OUT, None
        if ingress == self._uplink:
            ctx = self._select_port(h0)
            if ctx is None:
                w.drop_reason = "no_port"
                return w, None, Direction.IN, None
            self._walk_port(w, ctx, Direction.IN, snat_ports)
            _check_delivery(w, ctx)
            return w, ctx, Direction.IN, ctx.port.name
        ctx = self._ports.get(ingress)
        if ctx is None:
            w.drop_reason = "unknown_port"
            return w, None, Direction.OUT, None
        self._walk_port(w, ctx, Direction.OUT, snat_ports)
        if w.drop_reason is not None:
            return w, ctx, Direction.OUT, None
        dest = self._select_port(w.h) if w.h.inner is None else None
        if dest is None:
            return w, ctx, Direction.OUT, self._uplink
        self._walk_port(w, dest, Direction.IN, snat_ports)
        _check_delivery(w, dest)
        return w, ctx, Direction.OUT, dest.port.name

    def _compile(self, h0: pk.Headers, w: _Walk, output: str | None,
                 ingress: str) -> CompiledActions:
        """Reduce a walk to flat actions: diff the inner headers, note tunnel changes."""
        if w.drop_reason is not None:
            return CompiledActions(None, w.drop_reason,
                                   kinds=frozenset(w.kinds | {ActionKind.DENY}))
        base = h0.inner if w.decapped else h0
        final = w.h.inner if w.encap is not None else w.h
        changes: dict[str, int | None] = {}
        for name in ("src", "dst", "sport", "dport", "icmp_id"):
            v = getattr(final, name)
            if v != getattr(base, name):
                changes[name] = v
        encap = None
        if w.encap is not None:
            e = w.encap
            encap = EncapSpec(e.vni, e.local, e.remote, w.h.sport or 0, e.dst_port, e.src_mac,
                              e.dst_mac)
        outer_src = outer_dst = None
        if output == self._uplink:
            outer_src, outer_dst = self.policy.uplink_mac, self.policy.next_hop_mac
        else:
            # every frame delivered to a port carries the port's MAC: later packets of the
            # flow need not be addressed like its first one (gateway vs port MAC)
            changes["dst_mac"] = self._ports[output].port.mac  # type: ignore[index]
        return CompiledActions(
            output, None, decap=w.decapped, encap=encap, outer_src_mac=outer_src,
            outer_dst_mac=outer_dst, meters=tuple(w.meters), counters=tuple(w.counters),
            kinds=frozenset(w.kinds | {ActionKind.ALLOW}), **changes,
        )

    def _reverse(self, w: _Walk, ctx: _PortCtx, direction: Direction, output: str,
                 ingress: str) -> tuple[_Walk, pk.Headers]:
        """Walk the reply path: reverse order of the forward steps, opposite directions."""
        start = _reverse_headers(w.h)
        rw = _Walk([], start)
        # group the forward steps by port, in reverse order
        groups: list[tuple[_PortCtx, Direction, list[_Step]]] = []
        for step in reversed(w.steps):
            if not groups or groups[-1][0].port is not step.port or (
                    groups[-1][1] is not step.direction):
                groups.append((self._ports[step.port.name], step.direction, []))
            groups[-1][2].append(step)
        for pctx, fdir, steps in groups:
            rdir = Direction.IN if fdir is Direction.OUT else Direction.OUT
            self._walk_port(rw, pctx, rdir, {}, inverse_of=steps)
            if rw.drop_reason is not None:
                break
        return rw, start

    def _make_room(self, now_ns: int, ingress: str | None) -> None:
        """Full table or full share: age ``ingress``'s idle connections early (rate-limited
        per ingress). For a full table that is the heaviest holder: the port (or uplink)
        holding the most pays, not the one that happens to ask."""
        if now_ns - self._last_early_ns.get(ingress, -EARLY_AGE_INTERVAL_NS) < (
                EARLY_AGE_INTERVAL_NS):
            return
        self._last_early_ns[ingress] = now_ns
        for conn in self.flows.expire_early(now_ns, EARLY_AGE_FRACTION, ingress):
            for f in conn.flows():
                if f.offloaded:
                    self.datapath.remove(f)
            self._emit("expired", conn)
        self._prune_frags()

    def _steps(self, w: _Walk) -> tuple[LayerStep, ...]:
        return tuple(LayerStep(s.port.name, s.layer.name, s.direction, s.rule,
                               s.action, s.priority, s.values) for s in w.steps)

    def _evaluate(self, h: pk.Headers, ingress: str, key: tuple, *, pair: bool = True,
                  own: Conn | None = None, prefer_sport: int | None = None) -> _Decision:
        """Walk the layers for a packet with headers ``h``; touches no table.

        With ``pair``, also walks the reply path and finds a translated source port whose
        reply key is free (owned by no connection other than ``own``).
        """
        snat_ports: dict[int, int] = {}
        if prefer_sport is not None:
            snat_ports[PREFERRED_SPORT] = prefer_sport
        for _attempt in range(SNAT_PORT_TRIES):
            w, ctx, direction, output = self._walk(ingress, h, snat_ports)
            d = _Decision(self._compile(h, w, output, ingress), self._steps(w),
                          ctx.port.name if ctx is not None else None, direction, output)
            if ctx is None or d.actions.output is None or not pair:
                return d
            rw, rstart = self._reverse(w, ctx, direction, output, ingress)
            d.rkey = (output, pk.flow_key(rstart))
            taken = self.flows.get(d.rkey)
            if taken is None or (own is not None and taken.conn is own) or _lone_drop(taken):
                d.ractions = self._compile(rstart, rw,
                                           ingress if rw.drop_reason is None else None, output)
                d.rsteps = self._steps(rw)
                rctx = self._ports[output] if output != self._uplink else ctx
                d.rport = rctx.port.name
                d.rdirection = Direction.OUT if output != self._uplink else Direction.IN
                return d
            snat = next((st.action for st in w.steps if isinstance(st.action, Snat)), None)
            if snat is None or snat.port is not None or not self._next_snat_port(
                    snat, h, snat_ports):
                d.conflict = "nat_exhausted" if snat else "flow_collision"
                return d
        d.conflict = "nat_exhausted"
        return d

    # ---------------------------------------------------- decision templates
    #
    # Most new connections differ from a recent one only in the client's source port (a VM
    # opening connections to the same service). When no rule consulted by the walk looks at
    # that port -- src_port in the forward lookups, dst_port in the reply's -- and no action
    # depends on it (no port translation, no VXLAN entropy port), the walk's outcome is the
    # same but for the port itself: reuse it, swapping the port into the reply key and the
    # recorded lookup values. Anything else (a port rule, a collision on the reply key, a new
    # generation) takes the full walk. Templates are dropped with every policy change.

    def _from_template(self, tkey: tuple, sport: int,
                       own: Conn | None = None) -> _Decision | None:
        t = self._templates.get(tkey)
        if t is None:
            return None
        d, _ = t
        rkey = _with_reply_dport(d.rkey, sport)  # type: ignore[arg-type]
        taken = self.flows.get(rkey)
        if taken is not None and not _lone_drop(taken) and (own is None or taken.conn is not own):
            return None  # a collision: the full walk knows how to pick another port
        self.template_hits += 1
        return _Decision(d.actions, _with_port(d.steps, 2, sport), d.port, d.direction,
                         d.output, rkey, d.ractions, _with_port(d.rsteps, 3, sport), d.rport,
                         d.rdirection)

    def _remember_template(self, tkey: tuple, sport: int, d: _Decision) -> None:
        a = d.actions
        if (d.conflict is not None or a.output is None or d.rkey is None or d.ractions is None
                or a.encap is not None or a.sport is not None or a.icmp_id is not None
                or d.rkey[1][5] != sport):
            return
        uses = self._port_fields
        if any(st.values is not None and "src_port" in uses.get((st.layer, st.direction), ())
               for st in d.steps):
            return
        if any(st.values is not None and "dst_port" in uses.get((st.layer, st.direction), ())
               for st in d.rsteps):
            return
        if len(self._templates) >= TEMPLATE_CACHE:
            self._templates.clear()
        self._templates[tkey] = (d, sport)

    def _slow(self, frame: bytes | None, h: pk.Headers | None, ingress: str, key: tuple,
              now_ns: int, create: bool = True, prefer_sport: int | None = None,
              check_mac: bool = True) -> Result:
        """Evaluate the layers, create the flow pair, offload, then execute the new flow."""
        if h is None:
            h = _parse_known(frame)  # type: ignore[arg-type]
        if key is None:  # e.g. a tunnel whose inner frame is not IP: nothing to key a flow on
            return self._drop(ingress, "host", "non_ip")
        problem = self._admit(h, ingress, check_mac=check_mac)
        if problem is not None:
            return self._refuse(ingress, problem, key)
        if create:
            flows = self.flows
            if not flows.has_room(2):
                self._make_room(now_ns, flows.heaviest())
                if not flows.has_room(2):
                    flows.refused += 1
                    return self._drop(ingress, "slow", "flow_limit", key=key)
            if not flows.port_has_room(ingress, 2):
                self._make_room(now_ns, ingress)
                if not flows.port_has_room(ingress, 2):
                    flows.refused += 1
                    return self._drop(ingress, "slow", "port_flow_limit", key=key)
        d = None
        tkey = _template_key(h, ingress) if create and prefer_sport is None else None
        if tkey is not None:
            d = self._from_template(tkey, h.sport)  # type: ignore[arg-type]
        if d is None:
            d = self._evaluate(h, ingress, key, pair=create, prefer_sport=prefer_sport)
            if tkey is not None:
                self._remember_template(tkey, h.sport, d)  # type: ignore[arg-type]
        actions, steps = d.actions, d.steps
        if d.conflict is not None:
            return self._drop(ingress, "slow", d.conflict, port=d.port, direction=d.direction,
                              steps=steps, key=key)
        if not create or d.port is None:
            if actions.output is None:
                return self._drop(ingress, "slow", actions.drop_reason or "deny", port=d.port,
                                  direction=d.direction, steps=steps, key=key)
            out = self._execute(actions, frame, h) if actions.touches_frame else frame
            self.counters.paths["slow"] += 1
            return Result(ingress, "slow", "forward", None, d.port, d.direction,
                          actions.output, out, None, steps, key)
        fwd, rev = self._install(d, ingress, key, h, now_ns)
        first = h.inner.tcp_flags if h.inner is not None else h.tcp_flags
        if frame is not None and first is not None:  # a datapath keeping TCP state starts
            fwd.conn.tcp_state = next_tcp_state(TcpState.NONE, first, True)  # from it
            self.flows.reschedule(fwd.conn)
        offload = self._offload(fwd, now_ns)
        if rev is not None:
            self._offload(rev, now_ns)
        if h.frag == 1:
            self._remember_fragment(h, ingress, fwd, now_ns)
        if frame is None:  # installing from a key (adopt, revalidate): no packet to run
            return Result(ingress, "slow", "forward" if actions.output else "drop",
                          actions.drop_reason, d.port, d.direction, actions.output, None, fwd,
                          steps, key, offload)
        flags = h.inner.tcp_flags if h.inner is not None else h.tcp_flags
        return self._run(fwd, frame, h, ingress, now_ns, flags, path="slow", steps=steps,
                         offload=offload)

    def _install(self, d: _Decision, ingress: str, key: tuple, h: pk.Headers,
                 now_ns: int) -> tuple[Flow, Flow | None]:
        """Put a decided flow pair into the table (not yet into the datapath)."""
        if key is None or (d.rkey is not None and d.rkey[1] is None):
            raise ValueError("a flow needs a key")  # callers drop key-less frames first
        macs = (h.src_mac, h.dst_mac) if h.inner is None else (h.inner.src_mac,
                                                               h.inner.dst_mac)
        dscp = (h.dscp, h.inner.dscp if h.inner is not None else None)
        fwd = Flow((ingress, key), d.port, d.direction, d.actions, d.steps,  # type: ignore
                   macs=macs, dscp=dscp)
        rev = None
        if d.actions.output is not None and d.rkey is not None:
            rev = Flow(d.rkey, d.rport, d.rdirection, d.ractions, d.rsteps,  # type: ignore
                       macs=(macs[1], macs[0]))
        for f in (fwd, rev):  # a lone drop flow of unsolicited traffic gives way
            occupant = self.flows.get(f.key) if f is not None else None
            if occupant is not None and _lone_drop(occupant):
                self._remove_conn(occupant.conn)
        t = h.inner if h.inner is not None else h
        conn = self.flows.add(fwd, rev, proto=t.proto, generation=self.generation,
                              now_ns=now_ns)
        self.book.created(fwd, rev)
        self._emit("created", conn)
        return fwd, rev

    def _emit(self, kind: str, subject: object) -> None:
        for observer in self.observers:
            observer(kind, subject)

    def _next_snat_port(self, snat: Snat, h: pk.Headers, snat_ports: dict[int, int]) -> bool:
        """Pick the next candidate source port after a collision; False when out of tries."""
        t = h.inner if h.inner is not None else h
        orig = t.sport if t.sport is not None else t.icmp_id
        if orig is None:
            return False
        current = snat_ports.get(id(snat), snat_ports.get(PREFERRED_SPORT, orig))
        nxt = current + 1 if current + 1 <= 0xFFFF else EPHEMERAL_LO
        if nxt == orig:
            return False
        snat_ports[id(snat)] = nxt
        return True

    def _offload(self, flow: Flow, now_ns: int) -> str:
        result = self.datapath.offload(flow, now_ns)
        for victim in result.evicted:
            self._emit("evicted", victim)
        if not result.ok:
            if result.reason and result.reason.startswith("unsupported"):
                flow.nic_refused = result.reason
            return result.reason or "refused"
        return "offloaded" + (f" (evicted {len(result.evicted)})" if result.evicted else "")

    def reevaluate(self, conn: Conn) -> _Decision:
        """The decision this pipeline's policy gives an existing connection, reached as
        revalidation reaches it (its key, MACs and DSCP; its translated source port
        preferred), without changing anything: no table, datapath, template or counter is
        touched. ``conn`` may live in another pipeline's table (policy what-if: a pipeline
        built for a candidate policy, reading the live table, see `appliance.whatif`)."""
        fwd = conn.forward
        ingress, key = fwd.key
        prefer = fwd.actions.sport if fwd.actions.sport is not None else fwd.actions.icmp_id
        return self._evaluate(self._headers_of(fwd), ingress, key, own=conn,
                              prefer_sport=prefer)
