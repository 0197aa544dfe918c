"""The invariant OVS's revalidator lives by, as a property: after any policy change and
revalidation, every connection is what a fresh switch under the new policy would make of it,
and no counter ever goes down.

A live pipeline sees random connections (TCP/UDP/ICMP echo, from the ports and from the
uplink, IPv4 and IPv6, later packets of the same connections with other TCP flags) and
random edits of a small random policy (ACL allow/deny/count on ports, prefixes and
protocols, stateful or not; SNAT and DNAT; a counting layer; port layer lists; an address
moving between ports). After each edit it revalidates, and a fresh pipeline built with the
new policy replays every packet the live one saw, at the same times. Each live connection
must exist there with the same forward and reverse keys, compiled actions, layer steps, TCP
state and expiry deadline (OVS: a revalidator re-translates each datapath flow and deletes
or fixes the ones whose actions differ). The NIC's own copy of every entry (`MapNic`) must
match the flow table, and the per-rule and per-port counters (`appliance.counters`) and the
pipeline's own counters never decrease, across packets and edits alike.

The traffic never makes one connection's packet the reply of another (client ports are
unique, inbound packets never go to a SNAT address): a reply seen under one policy and
replayed under another would legitimately be a different connection.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from helpers import EXT_MAC, GW_MAC, VM1_MAC, VM2_MAC, ip
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance import packet as pk
from appliance.flows import Conn, Flow
from appliance.pipeline import Pipeline
from appliance.policy import parse_policy
from appliance.timeouts import TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN

MS = 1_000_000  # ns: events are a millisecond apart (nothing expires during a scenario)
VIP = "198.51.100.80"
SNAT_IPS = ("198.51.100.7", "198.51.100.9")
FLAGS = (TCP_SYN, TCP_ACK, TCP_ACK | 0x08, TCP_FIN | TCP_ACK, TCP_RST)

# --------------------------------------------------------------------------------- policies

PROTOS = ["proto: tcp", "proto: udp", "proto: [tcp, udp]", "proto: [icmp, icmpv6]", ""]
PORTS = ["dst_port: 80", 'dst_port: "80-81"', "dst_port: 22", 'dst_port: "8000-8080"',
         "dst_port: '!53'", 'src_port: "40000-40009"', ""]
ADDRESSES = ["dst: 192.0.2.0/24", "dst: '!10.0.0.0/8'", "src: 192.0.2.0/24", "dst: 10.0.0.3",
             "src: 10.0.0.0/24", f"dst: {VIP}", "dst: '2001:db8::/32'", ""]


@st.composite
def matches(draw: st.DrawFn) -> str:
    proto = draw(st.sampled_from(PROTOS))
    ports = draw(st.sampled_from(PORTS)) if proto in PROTOS[:3] else ""
    return ", ".join(c for c in (proto, ports, draw(st.sampled_from(ADDRESSES))) if c)


def rule_sets(actions: list[str]) -> st.SearchStrategy[tuple[tuple[str, str, int], ...]]:
    """0-3 rules as (match, action, priority), priorities distinct."""
    rule = st.tuples(matches(), st.sampled_from(actions), st.integers(1, 40))
    return st.lists(rule, max_size=3, unique_by=lambda r: r[2]).map(tuple)


@dataclass(frozen=True)
class Spec:
    """A small policy: ports vm1/vm2, layers acl, nat (vm1 only) and cnt."""

    acl_stateful: bool = True
    acl_default: tuple[str, str] = ("allow", "deny")  # outbound, inbound
    acl_out: tuple[tuple[str, str, int], ...] = ()
    acl_in: tuple[tuple[str, str, int], ...] = ()
    snat: str | None = None  # the SNAT address, None: no SNAT rule
    snat_match: str = ""  # extra condition of the SNAT rule
    dnat: str | None = None  # the VIP's translation ("ip: ..., port: ..."), None: no VIP
    cnt_stateful: bool = False
    cnt_out: tuple[tuple[str, str, int], ...] = ()
    cnt_in: tuple[tuple[str, str, int], ...] = ()
    vm1_layers: tuple[str, ...] = ("acl", "nat")
    vm2_layers: tuple[str, ...] = ("acl",)
    owner_of_3: str | None = None  # the port that owns 10.0.0.3

    def render(self) -> str:
        def rules(prefix: str, items: tuple[tuple[str, str, int], ...]) -> list[str]:
            out = []
            for i, (match, action, prio) in enumerate(items):
                m = f"match: {{{match}}}, " if match else ""
                out.append(f"      - {{name: {prefix}{i}, priority: {prio}, {m}action: {action}}}")
            return out

        def layer(name: str, stateful: bool, default: tuple[str, str], out: list[str],
                  inb: list[str]) -> list[str]:
            return [f"  - name: {name}", f"    stateful: {str(stateful).lower()}",
                    f"    default: {{outbound: {default[0]}, inbound: {default[1]}}}",
                    "    outbound:" + ("" if out else " []"), *out,
                    "    inbound:" + ("" if inb else " []"), *inb]

        ips = {"vm1": ["10.0.0.1", "fd00::1"], "vm2": ["10.0.0.2"]}
        if self.owner_of_3 is not None:
            ips[self.owner_of_3].append("10.0.0.3")
        nat_out, nat_in = [], []
        if self.snat is not None:
            extra = f", {self.snat_match}" if self.snat_match else ""
            nat_out.append(f"      - {{name: snat, priority: 10, match: {{dst: '!10.0.0.0/8'"
                           f"{extra}}}, action: {{snat: {{ip: {self.snat}}}}}}}")
        if self.dnat is not None:
            nat_in.append(f"      - {{name: vip, priority: 10, match: {{dst: {VIP}, proto: tcp,"
                          f" dst_port: 80}}, action: {{dnat: {{{self.dnat}}}}}}}")
        lines = [
            "version: 1", "uplink: up0", 'gateway_mac: "02:00:00:00:00:fe"', "ports:",
            *(f'  - {{name: {name}, interface: p{name[-1]}, mac: "02:00:00:00:00:0{name[-1]}",'
              f" ips: [{', '.join(repr(a) for a in ips[name])}],"
              f" layers: [{', '.join(layers)}]}}"
              for name, layers in (("vm1", self.vm1_layers), ("vm2", self.vm2_layers))),
            "layers:",
            *layer("acl", self.acl_stateful, self.acl_default, rules("o", self.acl_out),
                   rules("i", self.acl_in)),
            *layer("nat", False, ("allow", "allow"), nat_out, nat_in),
            *layer("cnt", self.cnt_stateful, ("allow", "allow"), rules("co", self.cnt_out),
                   rules("ci", self.cnt_in)),
        ]
        return "\n".join(lines) + "\n"


# each policy component and how to draw a value for it (an edit redraws one of them)
COMPONENTS: dict[str, st.SearchStrategy] = {
    "acl_stateful": st.booleans(),
    "acl_default": st.tuples(st.sampled_from(["allow", "deny"]),
                             st.sampled_from(["allow", "deny"])),
    "acl_out": rule_sets(["allow", "deny", "count"]),
    "acl_in": rule_sets(["allow", "deny", "count"]),
    "snat": st.sampled_from([None, *SNAT_IPS]),
    "snat_match": st.sampled_from(["", "proto: tcp", "proto: [tcp, udp]", "src: 10.0.0.1"]),
    "dnat": st.sampled_from([None, "ip: 10.0.0.1, port: 8080", "ip: 10.0.0.1"]),
    "cnt_stateful": st.booleans(),
    "cnt_out": rule_sets(["count", "allow", "deny"]),
    "cnt_in": rule_sets(["count", "allow", "deny"]),
    "vm1_layers": st.sampled_from([("acl", "nat"), ("acl", "nat", "cnt"), ("cnt", "acl", "nat"),
                                   ("nat", "acl")]),
    "vm2_layers": st.sampled_from([("acl",), ("cnt", "acl"), ("acl", "cnt")]),
    "owner_of_3": st.sampled_from([None, "vm1", "vm2"]),
}

# ---------------------------------------------------------------------------------- traffic


@dataclass(frozen=True)
class Packet:
    """The first packet of a new connection (``again`` is None) or a later packet, with
    ``flags``, of the connection started by event number ``again``."""

    ingress: str
    proto: int
    src: str
    dst: str
    dport: int
    flags: int
    again: int | None = None


@dataclass(frozen=True)
class Edit:
    spec: Spec


OUTBOUND_DST = {"vm1": ["192.0.2.1", "93.184.216.34", "10.0.0.2", "10.0.0.3", "2001:db8::5"],
                "vm2": ["192.0.2.1", "10.0.0.1", "10.0.0.3"]}
INBOUND_DST = ["10.0.0.1", "10.0.0.2", "10.0.0.3", VIP, "fd00::1"]


@st.composite
def first_packets(draw: st.DrawFn) -> Packet:
    proto = draw(st.sampled_from([6, 17, 1]))
    flags = draw(st.sampled_from(FLAGS[:3])) if proto == 6 else 0
    if draw(st.booleans()):  # a port opens it
        port = draw(st.sampled_from(["vm1", "vm2"]))
        dst = draw(st.sampled_from(OUTBOUND_DST[port]))
        src = "10.0.0.1" if port == "vm1" else "10.0.0.2"
        if ":" in dst:
            src = "fd00::1"
        return Packet(port, proto, src, dst, draw(st.sampled_from([22, 25, 53, 80, 81, 8080])),
                      flags)
    dst = draw(st.sampled_from(INBOUND_DST))
    src = "2001:db8::9" if ":" in dst else draw(st.sampled_from(["192.0.2.9", "203.0.113.9"]))
    return Packet("up0", proto, src, dst, draw(st.sampled_from([22, 53, 80, 8080])), flags)


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[Spec, list[Packet | Edit]]:
    spec = Spec(**{name: draw(strategy) for name, strategy in COMPONENTS.items()})
    first = spec
    events: list[Packet | Edit] = []
    starts: list[int] = []  # events that opened a connection
    for _ in range(draw(st.integers(2, 18))):
        kind = draw(st.sampled_from(["packet", "packet", "again", "edit"]))
        if kind == "edit":
            name = draw(st.sampled_from(sorted(COMPONENTS)))
            spec = dataclasses.replace(spec, **{name: draw(COMPONENTS[name])})
            events.append(Edit(spec))
        elif kind == "again" and starts:
            n = draw(st.sampled_from(starts))
            p = events[n]
            assert isinstance(p, Packet)
            flags = draw(st.sampled_from(FLAGS)) if p.proto == 6 else 0
            events.append(dataclasses.replace(p, flags=flags, again=n))
        else:
            starts.append(len(events))
            events.append(draw(first_packets()))
    events.append(Edit(dataclasses.replace(spec, **{
        name: draw(COMPONENTS[name]) for name in draw(st.sets(st.sampled_from(sorted(
            COMPONENTS)), min_size=1, max_size=3))})))  # always end on an edit
    return first, events


def frame_of(p: Packet, n: int) -> bytes:
    """Event ``n``'s frame. A connection's client port (or echo id) is unique: 40000 + the
    event that opened it for ports, 50000 + it for the uplink."""
    opener = p.again if p.again is not None else n
    client = (40000 if p.ingress != "up0" else 50000) + opener
    src_mac = {"vm1": VM1_MAC, "vm2": VM2_MAC, "up0": EXT_MAC}[p.ingress]
    kw: dict = {}
    if p.proto == 1:
        v6 = ":" in p.src
        kw = {"proto": 58 if v6 else 1, "icmp_type": 128 if v6 else 8, "icmp_id": client,
              "icmp_seq": n}
    else:
        kw = {"proto": p.proto, "sport": client, "dport": p.dport, "tcp_flags": p.flags}
    return pk.build_frame(src_mac=src_mac, dst_mac=GW_MAC, src=ip(p.src), dst=ip(p.dst), **kw)


# -------------------------------------------------------------------------------- the views

def steps_of(f: Flow) -> list[tuple]:
    """A flow's layer decisions, lookup values as the flow reads them (template-decided
    connections share the template's steps)."""
    return [(s.port, s.layer, str(s.direction), s.rule, s.action, s.priority,
             f.lookup_values(s)) for s in f.steps]


def connection(p: Pipeline, conn: Conn) -> tuple:
    """Everything a connection is, as far as packets and the NIC can tell."""
    rev = conn.reverse
    return (conn.forward.key, conn.forward.actions, steps_of(conn.forward),
            None if rev is None else (rev.key, rev.actions, steps_of(rev)),
            conn.tcp_state, p.flows.deadline_ns(conn))


def counters(p: Pipeline) -> dict[tuple, int]:
    """Every counter the pipeline keeps, flattened: per rule and port (appliance.counters),
    and its own per-packet totals, drops and paths."""
    rules, ports = p.book.snapshot(p.flows)
    out: dict[tuple, int] = {}
    for rid, rc in rules.items():
        out.update({("rule", *rid, k): v for k, v in rc.as_dict().items()})
    for name, pc in ports.items():
        out.update({("port", name, k): v for k, v in pc.as_dict().items()})
    c = p.counters
    out.update({("pipeline", "packets"): c.packets, ("pipeline", "bytes"): c.bytes})
    out.update({("drops", k): v for k, v in c.drops.items()})
    out.update({("paths", k): v for k, v in c.paths.items()})
    return out


def assert_not_lower(before: dict[tuple, int], after: dict[tuple, int], when: str) -> None:
    lower = {k: (v, after.get(k, 0)) for k, v in before.items() if after.get(k, 0) < v}
    assert not lower, f"counters went down {when}: {lower}"


# ------------------------------------------------------------------------------- the property

@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                HealthCheck.too_slow])
@given(scenario=scenarios())
def test_revalidated_connections_equal_a_fresh_pipeline_and_counters_never_drop(
        make_pipeline, scenario):
    first, events = scenario
    live = make_pipeline(first.render())
    history: list[tuple[bytes, str, int]] = []
    for n, event in enumerate(events):
        now = (n + 1) * MS
        before = counters(live)
        if isinstance(event, Packet):
            frame = frame_of(event, n)
            if live.process(frame, event.ingress, now).flow is not None:
                history.append((frame, event.ingress, now))  # part of a connection
            assert_not_lower(before, counters(live), f"at packet {n}")
            continue
        text = event.spec.render()
        live.set_policy(parse_policy(text))
        assert live.revalidate(now).remaining == 0
        assert_not_lower(before, counters(live), f"at edit {n}")
        assert live.datapath.stale() == [], "the NIC holds entries the table does not"
        fresh = make_pipeline(text)
        frames: dict[tuple, bytes] = {}
        for frame, ingress, t in history:
            fresh.process(frame, ingress, t)
            frames[(ingress, pk.flow_key(pk.parse(frame)))] = frame
        for conn in live.flows.conns():
            assert conn.generation == live.generation
            twin = fresh.flows.get(conn.forward.key)
            assert twin is not None and twin.conn.forward is twin, (
                f"edit {n}: {connection(live, conn)} has no twin in a fresh pipeline")
            assert connection(live, conn) == connection(fresh, twin.conn), f"edit {n}"

