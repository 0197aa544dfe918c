"""Policy what-if: what a policy change would do to traffic, before it is applied.

Two ways to ask, one vocabulary (a `Change` per connection, one meaning of "breaks"):

* **A capture** (`CaptureComparison`, ``appliance-trace --compare OLD NEW CAPTURE``): the
  capture is replayed under both policies in lock step, each side with its own pipeline and
  simulated NIC (`appliance.replay`), and the two outcomes of every packet are compared.
  Packets are grouped into connections by the connection tracking of *both* sides (a packet
  ties its old-side connection to its new-side one), so a connection the new policy splits
  or refuses is still one connection in the report.
* **A running switch** (`LiveDiff`, the daemon's ``policy_diff`` and ``policy_apply``): every
  connection in the live flow table is re-evaluated under the candidate policy the way
  revalidation will re-evaluate it after the swap (`Pipeline.reevaluate` on a pipeline built
  for the candidate, which reads the live table to judge NAT port collisions), and nothing is
  changed. The policy diff (`appliance.policydiff`) skips connections whose recorded
  decisions cannot change, exactly as revalidation does.

A connection **changed** when a packet of it would be treated differently: another verdict,
drop reason or output port, other bytes on the wire, or other compiled actions (a counter or
a meter added or removed changes the actions without touching a byte). A connection decided
by other rules but with the same actions has not changed.

A change **breaks** a connection that is forwarded today when, under the new policy,

* its packets (either direction) would be dropped -- denied, NAT ports exhausted, no port --
  except by a meter (a rate limit thins a connection, it does not cut it); or
* they would leave through another port, or with another 5-tuple (addresses, ports, ICMP id)
  or tunnel (VXLAN endpoints, VNI): the peer would see a different connection (SNAT address
  or DNAT target changed, encapsulation changed).

MAC rewrites, counters and meters changing, and dropped traffic becoming allowed, are
changes that break nothing.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final

from appliance import packet as pk
from appliance import policydiff
from appliance.actions import CompiledActions
from appliance.capture import Capture
from appliance.datapath.sim import SimNic
from appliance.flows import Conn, LayerStep
from appliance.keyfmt import dict_text, key_dict
from appliance.model import Policy
from appliance.pipeline import Pipeline, Result
from appliance.replay import Replayer

NO_RULE: Final = "-"  # no rule to blame: the change comes from ports, addresses or the uplink
NOT_BREAKING_DROPS: Final = frozenset({"meter"})  # drop reasons that thin, not cut


# ------------------------------------------------------------------------ comparisons

def signature(a: CompiledActions | None) -> tuple | None:
    """What a flow does, comparable across pipelines (meters by name and rate: two pipelines
    never share token buckets)."""
    if a is None:
        return None
    return (a.output, a.drop_reason, a.decap, a.src_mac, a.dst_mac, a.src, a.dst, a.sport,
            a.dport, a.icmp_id, a.encap, a.outer_src_mac, a.outer_dst_mac,
            tuple((m.name, m.pps, m.bps, m.burst, m.burst_bytes) for m in a.meters),
            a.counters)


def _wire(a: CompiledActions) -> tuple:
    """What the peer sees of a forwarded flow: its 5-tuple rewrites and tunnel."""
    e = a.encap
    tunnel = (e.vni, e.local, e.remote, e.src_port, e.dst_port) if e is not None else None
    return a.output, a.src, a.dst, a.sport, a.dport, a.icmp_id, a.decap, tunnel


def kinds(old: CompiledActions | None, new: CompiledActions | None) -> set[str]:
    """Names of what differs between two compiled actions (None: no flow, nothing known)."""
    if old is None or new is None:
        return set()
    out = set()
    fwd_old, fwd_new = old.output is not None, new.output is not None
    if fwd_old and not fwd_new:
        out.add("denied")
    elif fwd_new and not fwd_old:
        out.add("allowed")
    elif not fwd_old and old.drop_reason != new.drop_reason:
        out.add("reason")
    if fwd_old and fwd_new:
        if old.output != new.output:
            out.add("output")
        if (old.src, old.dst, old.sport, old.dport, old.icmp_id) != (
                new.src, new.dst, new.sport, new.dport, new.icmp_id):
            out.add("nat")
        if old.encap != new.encap:
            out.add("encap")
        if old.decap != new.decap:
            out.add("decap")
        if (old.src_mac, old.dst_mac, old.outer_src_mac, old.outer_dst_mac) != (
                new.src_mac, new.dst_mac, new.outer_src_mac, new.outer_dst_mac):
            out.add("mac")
    if signature(old)[13] != signature(new)[13]:  # type: ignore[index]
        out.add("meter")
    if old.counters != new.counters:
        out.add("count")
    return out


def step_name(s: LayerStep) -> str:
    """``vm1/acl/out/no-smtp``: where a decision was taken."""
    return f"{s.port}/{s.layer}/{s.direction}/{s.rule}"


def responsible(old: Iterable[LayerStep], new: Iterable[LayerStep]) -> tuple[str, str] | None:
    """The first layer decision that differs between two walks, on each side (`NO_RULE`
    where one walk is shorter); None when the walks are the same."""
    for a, b in itertools.zip_longest(old, new):
        if a is None or b is None or (a.port, a.layer, a.direction, a.rule, a.action) != (
                b.port, b.layer, b.direction, b.rule, b.action):
            return (step_name(a) if a is not None else NO_RULE,
                    step_name(b) if b is not None else NO_RULE)
    return None


def leaving_key(frame: bytes | None) -> tuple | None:
    """The flow key of a packet as it leaves the switch (None: dropped or not IP)."""
    if frame is None:
        return None
    h = pk.parse(frame)
    return None if isinstance(h, str) or h.src is None else pk.flow_key(h)


# ----------------------------------------------------------------------------- Change

@dataclass(slots=True)
class Change:
    """One connection whose treatment would change (see the module docstring)."""

    port: str | None
    direction: str | None
    ingress: str
    key: tuple
    before: dict[str, Any]
    after: dict[str, Any]
    rule_before: str = NO_RULE
    rule_after: str = NO_RULE
    kinds: set[str] = field(default_factory=set)
    breaks: bool = False
    packets: int = 0  # capture: packets treated differently; live: packets it carried
    bytes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"port": self.port, "direction": self.direction, "ingress": self.ingress,
                "flow": key_dict(self.key), "before": self.before, "after": self.after,
                "rule_before": self.rule_before, "rule_after": self.rule_after,
                "kinds": sorted(self.kinds), "breaks": self.breaks, "packets": self.packets,
                "bytes": self.bytes, **self.extra}

    def sort_key(self) -> tuple:
        return (self.port or "", self.rule_before, self.rule_after, not self.breaks,
                self.extra.get("first_packet", 0), str(self.key))


def groups(changes: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Changes grouped by port and by the rule responsible on each side, with totals."""
    out: dict[tuple, dict[str, Any]] = {}
    for c in changes:
        k = (c["port"] or "", c["rule_before"], c["rule_after"])
        g = out.setdefault(k, {"port": c["port"], "rule_before": c["rule_before"],
                               "rule_after": c["rule_after"], "connections": 0,
                               "breaking": 0, "packets": 0, "bytes": 0})
        g["connections"] += 1
        g["breaking"] += c["breaks"]
        g["packets"] += c["packets"]
        g["bytes"] += c["bytes"]
    return [out[k] for k in sorted(out)]


def by_port(changes: Iterable[dict[str, Any]]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for c in changes:
        p = out.setdefault(c["port"] or "-", {"changed": 0, "breaking": 0, "packets": 0,
                                              "bytes": 0})
        p["changed"] += 1
        p["breaking"] += c["breaks"]
        p["packets"] += c["packets"]
        p["bytes"] += c["bytes"]
    return dict(sorted(out.items()))


# ------------------------------------------------------------------ capture, offline

def _side(r: Result) -> dict[str, Any]:
    flow = r.flow
    steps = flow.steps if flow is not None else r.steps
    return {"verdict": r.verdict, "reason": r.reason,
            "rules": [step_name(s) for s in steps],
            "actions": flow.actions.describe() if flow is not None else None,
            "out_port": r.out_port,
            "leaves": key_dict(leaving_key(r.frame)) if r.verdict == "forward" else None}


def packet_breaks(old: Result, new: Result) -> bool:
    """Would the peer lose this packet, or see it as part of another connection?"""
    if old.verdict != "forward":
        return False
    if new.verdict != "forward":
        return new.reason not in NOT_BREAKING_DROPS
    if old.out_port != new.out_port:
        return True
    return old.frame != new.frame and leaving_key(old.frame) != leaving_key(new.frame)


def _packet_kinds(old: Result, new: Result) -> set[str]:
    a = old.flow.actions if old.flow is not None else None
    b = new.flow.actions if new.flow is not None else None
    out = kinds(a, b)
    if (old.reason in NOT_BREAKING_DROPS) != (new.reason in NOT_BREAKING_DROPS):
        out.add("meter")  # a rate limit took (or spared) this packet
    elif old.verdict != new.verdict:
        out.add("denied" if old.verdict == "forward" else "allowed")
    elif old.verdict == "drop" and old.reason != new.reason:
        out.add("reason")
    elif old.verdict == "forward" and not out:
        if old.out_port != new.out_port:
            out.add("output")
        if old.frame != new.frame:
            ko, kn = leaving_key(old.frame), leaving_key(new.frame)
            out.add("mac" if ko == kn else "encap" if ko and kn and ko[6] != kn[6] else "nat")
    return out


@dataclass(slots=True, eq=False)
class _Record:
    """A connection of the comparison (a union-find root owns the live record)."""

    first_n: int
    ingress: str
    port: str | None
    direction: str | None
    key: tuple
    packets: int = 0
    bytes: int = 0
    change: Change | None = None
    change_n: int = 0
    judged: set[tuple] = field(default_factory=set)  # outcome pairs already judged

    def absorb(self, other: _Record) -> None:
        """Merge the record of a connection found to be the same as this one."""
        if other.first_n < self.first_n:
            self.first_n, self.ingress, self.port, self.direction, self.key = (
                other.first_n, other.ingress, other.port, other.direction, other.key)
        self.packets += other.packets
        self.bytes += other.bytes
        self.judged |= other.judged
        if other.change is not None:
            if self.change is None:
                self.change, self.change_n = other.change, other.change_n
            else:
                mine, theirs = self.change, other.change
                if other.change_n < self.change_n:
                    mine, theirs = theirs, mine
                    self.change, self.change_n = other.change, other.change_n
                mine.kinds |= theirs.kinds
                mine.breaks |= theirs.breaks
                mine.packets += theirs.packets
                mine.bytes += theirs.bytes


@dataclass(slots=True)
class CompareResult:
    changes: list[Change]
    connections: int
    packets: int
    other_packets: int  # not part of any connection (ARP, ND, malformed, non-IP)
    other_changed: int  # ... of which treated differently
    before: dict[str, Any]  # replay summaries (appliance.replay.Replayer.summary_dict)
    after: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        rows = [c.as_dict() for c in self.changes]
        return {"connections": self.connections, "changed": len(self.changes),
                "breaking": sum(c.breaks for c in self.changes), "packets": self.packets,
                "packets_changed": sum(c.packets for c in self.changes),
                "bytes_changed": sum(c.bytes for c in self.changes),
                "other_packets": self.other_packets, "other_changed": self.other_changed,
                "by_port": by_port(rows), "groups": groups(rows),
                "before": _brief(self.before), "after": _brief(self.after)}


def _brief(s: dict[str, Any]) -> dict[str, Any]:
    return {k: s[k] for k in ("forwarded", "dropped", "drops", "flows")}


class CaptureComparison:
    """Replays one capture under two policies in lock step and collects the `Change`s.

    Both sides get the same options (NIC model, timeouts, flow limit, port assignment);
    ``old`` and ``new`` are `Replayer`s built by the caller.
    """

    def __init__(self, old: Replayer, new: Replayer) -> None:
        self.old = old
        self.new = new
        self._parent: list[int] = []
        self._records: list[_Record | None] = []
        self._nodes_old: dict[object, int] = {}  # Conn or (ingress, key) -> record id
        self._nodes_new: dict[object, int] = {}
        self._sigs: dict[int, tuple[CompiledActions, tuple | None]] = {}
        self.packets = 0
        self.other_packets = 0
        self.other_changed = 0

    def _find(self, i: int) -> int:
        parent = self._parent
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def _sig(self, r: Result) -> tuple | None:
        if r.flow is None:
            return None
        a = r.flow.actions
        cached = self._sigs.get(id(a))
        if cached is None or cached[0] is not a:
            cached = self._sigs[id(a)] = (a, signature(a))
        return cached[1]

    def _record_for(self, n: int, old: Result, new: Result) -> _Record:
        node_o = old.flow.conn if old.flow is not None else (old.ingress, old.key)
        node_n = new.flow.conn if new.flow is not None else (new.ingress, new.key)
        io, inn = self._nodes_old.get(node_o), self._nodes_new.get(node_n)
        if io is None and inn is None:
            rid = len(self._parent)
            self._parent.append(rid)
            base = old if old.port is not None or new.port is None else new
            self._records.append(_Record(n, old.ingress, base.port,
                                         str(base.direction) if base.direction else None,
                                         old.key))  # type: ignore[arg-type]
        elif io is None or inn is None:
            rid = self._find(io if io is not None else inn)  # type: ignore[arg-type]
        else:
            rid, other = self._find(io), self._find(inn)
            if rid != other:
                keep, gone = (rid, other) if rid < other else (other, rid)
                self._records[keep].absorb(self._records[gone])  # type: ignore[union-attr, arg-type]
                self._records[gone] = None
                self._parent[gone] = keep
                rid = keep
        self._nodes_old[node_o] = rid
        self._nodes_new[node_n] = rid
        return self._records[rid]  # type: ignore[return-value]

    def feed(self, n: int, length: int, old: Result, new: Result) -> None:
        """Account one packet's two outcomes."""
        self.packets += 1
        differs = (old.verdict != new.verdict or old.reason != new.reason
                   or old.out_port != new.out_port
                   or (old.frame is not new.frame and old.frame != new.frame)
                   or self._sig(old) != self._sig(new))
        if old.key is None and new.key is None:
            self.other_packets += 1
            self.other_changed += differs
            return
        rec = self._record_for(n, old, new)
        rec.packets += 1
        rec.bytes += length
        if not differs:
            return
        c = rec.change
        if c is None:
            blame = responsible(old.flow.steps if old.flow is not None else old.steps,
                                new.flow.steps if new.flow is not None else new.steps)
            c = rec.change = Change(rec.port, rec.direction, rec.ingress, rec.key,
                                    _side(old), _side(new), *(blame or (NO_RULE, NO_RULE)))
            c.extra["first_packet"] = n
            rec.change_n = n
        c.packets += 1
        c.bytes += length
        # a connection's packets mostly repeat one pair of outcomes: judge each pair once
        seen = (id(old.flow), id(new.flow), old.verdict, new.verdict, old.reason, new.reason,
                old.out_port, new.out_port)
        if old.flow is None or new.flow is None or seen not in rec.judged:
            rec.judged.add(seen)
            c.kinds |= _packet_kinds(old, new)
            c.breaks = c.breaks or packet_breaks(old, new)

    def run(self, capture: Capture, count: int | None = None,
            tick: Any = None) -> CompareResult:
        """Replay ``capture`` (at most ``count`` packets) on both sides."""
        new = self.new
        process, ingress_for = new.pipeline.process, new.ingress_for
        for n, cp, frame, r_old in self.old.run(capture):
            if frame is None:
                r_new = new.pipeline.reject("-", "unsupported_linktype")
            else:
                r_new = process(frame, ingress_for(frame), cp.ts_ns)
            self.feed(n, len(frame) if frame is not None else len(cp.data), r_old, r_new)
            if tick is not None and n & 0x3FFF == 0:
                tick(capture.position)
            if count is not None and n >= count:
                break
        return self.result()

    def result(self) -> CompareResult:
        records = [r for r in self._records if r is not None]
        for r in records:
            if r.change is not None:
                r.change.extra["connection_packets"] = r.packets
        changes = sorted((r.change for r in records if r.change is not None),
                         key=Change.sort_key)
        return CompareResult(changes, len(records), self.packets, self.other_packets,
                             self.other_changed, self.old.summary_dict(),
                             self.new.summary_dict())


def compare_capture(old: Policy, new: Policy, capture: Capture,
                    **replayer_options: Any) -> CompareResult:
    """Convenience for tests and scripts: default simulated NICs on both sides."""
    nic_factory = replayer_options.pop("nic_factory", SimNic)
    cmp = CaptureComparison(Replayer(old, nic=nic_factory(), **replayer_options),
                            Replayer(new, nic=nic_factory(), **replayer_options))
    return cmp.run(capture)


# ------------------------------------------------------------------- live, in daemon

def shadow_pipeline(new: Policy) -> Pipeline:
    """A pipeline for a candidate policy that only ever decides (`Pipeline.reevaluate`);
    its own tables stay empty. Building it compiles the classifiers: seconds for very large
    policies, so callers in an event loop build it on a worker thread."""
    return Pipeline(new, SimNic(0))


def _live_side(a: CompiledActions | None, steps: Iterable[LayerStep], reply: Any,
               conflict: str | None = None) -> dict[str, Any]:
    forward = a is not None and a.output is not None and conflict is None
    return {"verdict": "forward" if forward else "drop",
            "reason": conflict or (a.drop_reason if a is not None else None),
            "rules": [step_name(s) for s in steps],
            "actions": a.describe() if a is not None and conflict is None else None,
            "reply": reply.describe() if reply is not None and conflict is None else None}


class LiveDiff:
    """What swapping ``new`` into ``pipeline`` would do to each of its connections.

    ``check`` judges one connection; ``check_unseen`` every connection not judged yet (the
    daemon checks a snapshot in chunks, then the connections made meanwhile in one
    synchronous pass right before it swaps the policy in).
    """

    def __init__(self, pipeline: Pipeline, new: Policy, shadow: Pipeline | None = None) -> None:
        self.pipeline = pipeline
        self.new = new
        self.shadow = shadow if shadow is not None else shadow_pipeline(new)
        self.shadow.flows = pipeline.flows  # NAT collisions are judged against the live table
        self.diff = policydiff.diff(pipeline.policy, new)
        self.seen: set[Conn] = set()
        self._change_of: dict[Conn, Change] = {}
        self.checked = 0
        self.skipped = 0  # unaffected by the policy diff: not re-evaluated
        self.unchanged = 0  # re-evaluated, same actions
        self.changes: list[Change] = []

    @property
    def breaking(self) -> list[Change]:
        return [c for c in self.changes if c.breaks]

    def check(self, conn: Conn, now_ns: int) -> Change | None:
        """Judge one connection once; returns its `Change` if it would change."""
        if conn.removed or conn in self.seen:
            return None
        self.seen.add(conn)
        self.checked += 1
        pipeline = self.pipeline
        if (conn.generation == pipeline.generation
                and not any(self.diff.affects(f) for f in conn.flows())):
            self.skipped += 1
            return None
        d = self.shadow.reevaluate(conn)
        fwd, rev = conn.forward, conn.reverse
        before = (signature(fwd.actions), rev.key if rev is not None else None,
                  signature(rev.actions) if rev is not None else None, None)
        after = (signature(d.actions), d.rkey if d.actions.output is not None else None,
                 signature(d.ractions) if d.actions.output is not None else None, d.conflict)
        if before == after:
            self.unchanged += 1
            return None
        blame = responsible(fwd.steps, d.steps)
        if blame is None and rev is not None:
            blame = responsible(rev.steps, d.rsteps)
        change = Change(
            fwd.port, str(fwd.direction), fwd.key[0], fwd.key[1],
            _live_side(fwd.actions, fwd.steps, rev.actions if rev is not None else None),
            _live_side(d.actions, d.steps, d.ractions, d.conflict),
            *(blame or (NO_RULE, NO_RULE)))
        if d.conflict is None:
            change.kinds = kinds(fwd.actions, d.actions)
        else:  # NAT ports exhausted or a key collision: revalidation removes it
            change.kinds = {"denied" if fwd.actions.output is not None else "reason"}
        if rev is not None and d.conflict is None and d.ractions is not None:
            change.kinds |= {"reply_" + k for k in kinds(rev.actions, d.ractions)}
        change.breaks = flow_breaks(conn, d)
        change.packets = sum(f.packets for f in conn.flows())
        change.bytes = sum(f.bytes for f in conn.flows())
        change.extra = _live_extra(conn, now_ns)
        self._record(conn, change)
        self._displace(conn, d, now_ns)
        return change

    def _record(self, conn: Conn, change: Change) -> None:
        old = self._change_of.get(conn)
        if old is not None:
            self.changes.remove(old)
        self._change_of[conn] = change
        self.changes.append(change)

    def _displace(self, conn: Conn, d: Any, now_ns: int) -> None:
        """A new reply key may land on a drop flow left by unsolicited traffic: revalidation
        gives that key to the connection, so the refused traffic there becomes its reply."""
        rev = conn.reverse
        if (d.conflict is not None or d.actions.output is None or d.rkey is None
                or (rev is not None and d.rkey == rev.key)):
            return
        occupant = self.pipeline.flows.get(d.rkey)
        if (occupant is None or occupant.conn is conn or occupant.actions.output is not None
                or occupant.conn.reverse is not None
                or signature(occupant.actions) == signature(d.ractions)):
            return  # not a refused packet's memory, or still refused alike
        victim = occupant.conn
        self.seen.add(victim)  # its own re-evaluation no longer decides it
        change = Change(
            occupant.port, str(occupant.direction), occupant.key[0], occupant.key[1],
            _live_side(occupant.actions, occupant.steps, None),
            _live_side(d.ractions, d.rsteps, None),
            *(responsible(occupant.steps, d.rsteps) or (NO_RULE, NO_RULE)))
        change.kinds = {"allowed"} if d.ractions.output is not None else {"reason"}
        change.packets, change.bytes = occupant.packets, occupant.bytes
        change.extra = {**_live_extra(victim, now_ns),
                        "reply_of": dict_text(key_dict(conn.forward.key[1]))}
        self._record(victim, change)

    def check_all(self, conns: Iterable[Conn], now_ns: int) -> None:
        """Judge each of ``conns`` (see `check`)."""
        for conn in conns:
            self.check(conn, now_ns)

    def check_unseen(self, now_ns: int) -> int:
        """Judge every connection of the live table not judged yet; returns how many."""
        before = self.checked
        self.check_all(self.pipeline.flows.conns(), now_ns)
        return self.checked - before

    def result(self, limit: int | None = None) -> dict[str, Any]:
        """The ``policy_diff`` answer: totals, groups and (at most ``limit``) changes."""
        changes = sorted(self.changes, key=Change.sort_key)
        rows = [c.as_dict() for c in changes]
        shown = rows if limit is None else rows[:limit]
        return {"connections": self.checked, "reevaluated": self.checked - self.skipped,
                "changed": len(rows), "breaking": sum(c["breaks"] for c in rows),
                "by_port": by_port(rows), "groups": groups(rows), "changes": shown,
                "truncated": len(shown) < len(rows)}


def _live_extra(conn: Conn, now_ns: int) -> dict[str, Any]:
    return {"path": "nic" if conn.forward.offloaded else "host",
            "tcp_state": str(conn.tcp_state),
            "idle": round(max(0, now_ns - conn.last_seen_ns) / 1e9, 3)}


def flow_breaks(conn: Conn, d: Any) -> bool:
    """Would revalidating ``conn`` into decision ``d`` break it? (module docstring)"""
    fwd, rev = conn.forward, conn.reverse
    if fwd.actions.output is None:
        return False  # not forwarded today: nothing to break
    if d.conflict is not None or d.actions.output is None:
        return True
    if _wire(d.actions) != _wire(fwd.actions):
        return True
    if rev is None:
        return False
    if d.rkey != rev.key or d.ractions is None or d.ractions.output is None:
        return True
    return rev.actions.output is not None and _wire(d.ractions) != _wire(rev.actions)


# ----------------------------------------------------------------------------- text

def change_lines(c: dict[str, Any]) -> list[str]:
    """Human lines for one change (a `Change.as_dict`, possibly received over IPC)."""
    b, a = c["before"], c["after"]

    def verdict(side: dict[str, Any]) -> str:
        return "forward" if side["verdict"] == "forward" else f"drop ({side['reason']})"

    flag = "BREAKS " if c["breaks"] else "changes"
    where = f"{c['port'] or c['ingress']} {c['direction'] or '-'}"
    facts = [", ".join(c["kinds"]) or "actions", f"{c['packets']} packets"]
    if "tcp_state" in c and c["tcp_state"] != "none":
        facts.append(c["tcp_state"])
    if "path" in c:
        facts.append(c["path"])
    lines = [f"  {flag} {where} {dict_text(c['flow'])}  [{'; '.join(facts)}]"]
    for label, side in (("before", b), ("after ", a)):
        acts = side.get("actions") or "-"
        lines.append(f"      {label}: {verdict(side)}  {acts}")
    return lines


def group_line(g: dict[str, Any]) -> str:
    breaking = f", {g['breaking']} breaking" if g["breaking"] else ""
    return (f"{g['port'] or '-'}: {g['rule_before']} -> {g['rule_after']}: "
            f"{g['connections']} connection{'s' if g['connections'] != 1 else ''}{breaking}, "
            f"{g['packets']} packets, {g['bytes']} bytes")


def report_lines(changes: list[dict[str, Any]]) -> Iterator[str]:
    """Changes grouped by port and responsible rules, each group with its connections."""
    current = None
    group_rows = {(g["port"] or "", g["rule_before"], g["rule_after"]): g
                  for g in groups(changes)}
    for c in changes:
        k = (c["port"] or "", c["rule_before"], c["rule_after"])
        if k != current:
            current = k
            yield group_line(group_rows[k])
        yield from change_lines(c)
