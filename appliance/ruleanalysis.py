"""Rule-level analysis: what a policy change does to the rules themselves.

`appliance.policydiff` answers "which flows must be re-checked"; this module answers the
operator's questions about the rule sets, before any traffic is looked at:

* rules **added, removed or changed** (by name, per layer and direction), layer defaults and
  statefulness, layers and ports added or removed, global settings;
* rules that **became unreachable**: a higher-priority rule of the same layer and direction
  matches every packet the rule matches, so the rule can never decide anything (or the rule
  matches nothing at all, e.g. ``dst_port: ["80", "!80"]``);
* **overlapping rules with different actions**: some packets match both, and the
  higher-priority one silently takes them.

A rule's match is a conjunction of per-field conditions, so the set of packets it accepts is
a product of per-field interval sets (a "box"), and both questions are exact on boxes: box R
is inside box S iff every field of R is inside the same field of S; two boxes meet iff every
field meets. Two details of the packet path are honoured: a packet may lack a field (no
ports outside TCP/UDP and in later fragments, no VLAN tag, no VNI outside a tunnel) and a
rule that constrains such a field never matches it, so S covers R on that field only if R
constrains it too; and a port condition implies TCP or UDP (its box says so on ``proto``).
Shadowing is judged against one rule at a time: a rule hidden only by the union of several
higher rules is not reported (that question is a set cover over boxes; rarely worth it).

Cost: pairs of rules in one layer direction. A diff only compares the rules it touched with
the others of their layer direction (O(touched x rules)); `lint` of a whole rule set is
quadratic, bounded by ``budget`` pairs (the result says when it stopped early).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final

from appliance.model import (
    FIELD_BITS,
    FIELDS,
    Direction,
    FieldSet,
    Layer,
    Match,
    Policy,
    Port,
    Rule,
    int_to_ip,
    int_to_mac,
)
from appliance.rulefmt import render_match, rule_dict
from appliance.translate import describe_action

Intervals = tuple[tuple[int, int], ...]

PAIR_BUDGET: Final = 2_000_000  # rule pairs compared at most by one analysis
LIST_MAX: Final = 200  # entries of each list kept in a result (the counts stay exact)
ALWAYS_PRESENT: Final = frozenset({"src", "dst", "proto"})  # every IP packet has these
PORT_FIELDS: Final = frozenset({"src_port", "dst_port"})
PORT_PROTOS: Final = ((6, 6), (17, 17))  # TCP, UDP: the protocols whose packets carry ports
FULL: Final = {name: ((0, (1 << FIELD_BITS[name]) - 1),) for name in FIELDS}


# ---------------------------------------------------------------------- interval sets

def _merge(intervals: tuple[tuple[int, int], ...], lo: int, hi: int) -> Intervals:
    """Sorted, disjoint, non-adjacent intervals clipped to ``[lo, hi]``."""
    if len(intervals) == 1:  # the common case: one CIDR, one port
        (a, b), = intervals
        a, b = max(a, lo), min(b, hi)
        return ((a, b),) if a <= b else ()
    out: list[list[int]] = []
    for a, b in sorted(intervals):
        a, b = max(a, lo), min(b, hi)
        if a > b:
            continue
        if out and a <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return tuple((a, b) for a, b in out)


def _subtract(a: Intervals, b: Intervals) -> Intervals:
    out = []
    for lo, hi in a:
        cur = lo
        for blo, bhi in b:
            if bhi < cur or blo > hi:
                continue
            if blo > cur:
                out.append((cur, blo - 1))
            cur = max(cur, bhi + 1)
            if cur > hi:
                break
        if cur <= hi:
            out.append((cur, hi))
    return tuple(out)


def intersect(a: Intervals, b: Intervals) -> Intervals:
    """Intersection of two normalized interval sets."""
    out = []
    i = j = 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if lo <= hi:
            out.append((lo, hi))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return tuple(out)


def subset(a: Intervals, b: Intervals) -> bool:
    """Is every value of ``a`` in ``b``? (both normalized: disjoint, non-adjacent)"""
    starts = [lo for lo, _ in b]
    for lo, hi in a:
        k = bisect.bisect_right(starts, lo) - 1
        if k < 0 or b[k][1] < hi:
            return False
    return True


def accepted(name: str, fs: FieldSet) -> Intervals:
    """The values a field condition accepts, as normalized intervals of the field's space."""
    lo, hi = FULL[name][0]
    pos = _merge(fs.pos, lo, hi) if fs.pos else FULL[name]
    return _subtract(pos, _merge(fs.neg, lo, hi)) if fs.neg else pos


@dataclass(frozen=True, slots=True)
class Box:
    """A rule's accepted packets: per constrained field, the accepted values."""

    sets: dict[str, Intervals]

    @property
    def empty(self) -> bool:
        return any(not s for s in self.sets.values())


def box(match: Match) -> Box:
    sets = {name: accepted(name, fs) for name, fs in match.fields.items()}
    if PORT_FIELDS & sets.keys():  # a port condition only ever matches TCP/UDP packets
        sets["proto"] = intersect(sets.get("proto", FULL["proto"]), PORT_PROTOS)
    return Box(sets)


def covers(s: Box, r: Box) -> bool:
    """Does ``s`` match every packet ``r`` matches? (True when ``r`` matches nothing.)"""
    if r.empty:
        return True
    for name, sset in s.sets.items():
        rset = r.sets.get(name)
        if rset is None:
            if name not in ALWAYS_PRESENT:
                return False  # r also matches packets without the field; s never does
            rset = FULL[name]
        if not subset(rset, sset):
            return False
    return True


def common(a: Box, b: Box) -> Box | None:
    """The packets both match (None when there are none)."""
    if a.empty or b.empty:
        return None
    sets: dict[str, Intervals] = {}
    for name in FIELDS:
        x, y = a.sets.get(name), b.sets.get(name)
        if x is None and y is None:
            continue
        both = intersect(x if x is not None else FULL[name], y if y is not None else FULL[name])
        if not both:
            return None
        sets[name] = both
    return Box(sets)


def box_match(b: Box) -> Match:
    """A `Match` accepting exactly the box (for display)."""
    return Match({name: FieldSet(pos=s) for name, s in b.sets.items()
                  if s != FULL[name] or name not in ALWAYS_PRESENT})  # "has the field" stays


# ------------------------------------------------------------------------- findings

@dataclass(frozen=True, slots=True)
class Unreachable:
    layer: str
    direction: Direction
    rule: Rule
    by: Rule | None  # the higher-priority rule that always matches first; None: matches nothing

    def as_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "direction": str(self.direction), **rule_dict(self.rule),
                "by": rule_dict(self.by) if self.by is not None else None,
                "same_action": self.by is not None and self.by.action == self.rule.action}

    def text(self) -> str:
        where = f"{self.layer} {self.direction} {self.rule.name} (priority {self.rule.priority})"
        if self.by is None:
            return f"{where}: matches nothing"
        same = ", same action: redundant" if self.by.action == self.rule.action else ""
        return (f"{where}: never matches first, {self.by.name} (priority {self.by.priority}) "
                f"takes every packet it matches{same}")


@dataclass(frozen=True, slots=True)
class Overlap:
    layer: str
    direction: Direction
    first: Rule  # the higher-priority rule: packets in common take its action
    second: Rule
    common: Match

    def as_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "direction": str(self.direction),
                "first": rule_dict(self.first), "second": rule_dict(self.second),
                "common": render_match(self.common)}

    def text(self) -> str:
        return (f"{self.layer} {self.direction}: {self.first.name} "
                f"({describe_action(self.first.action)}, priority {self.first.priority}) takes "
                f"packets {self.second.name} ({describe_action(self.second.action)}, priority "
                f"{self.second.priority}) also matches: {render_match(self.common)}")


@dataclass(slots=True)
class Lint:
    """Findings in a rule set (see the module docstring)."""

    unreachable: list[Unreachable] = field(default_factory=list)
    overlaps: list[Overlap] = field(default_factory=list)
    pairs: int = 0  # rule pairs compared
    truncated: bool = False  # the pair budget ran out: findings may be missing

    def as_dict(self) -> dict[str, Any]:
        return {"unreachable": [u.as_dict() for u in self.unreachable[:LIST_MAX]],
                "unreachable_count": len(self.unreachable),
                "overlaps": [o.as_dict() for o in self.overlaps[:LIST_MAX]],
                "overlaps_count": len(self.overlaps), "truncated": self.truncated}


def _directions(layer: Layer) -> Iterator[tuple[Direction, tuple[Rule, ...]]]:
    yield Direction.OUT, layer.outbound
    yield Direction.IN, layer.inbound


class _RuleSet:
    """One layer direction's rules in priority order, with their boxes (built lazily)."""

    def __init__(self, rules: tuple[Rule, ...]) -> None:
        self.rules = rules
        self.index = {r.name: i for i, r in enumerate(rules)}
        self._boxes: list[Box | None] = [None] * len(rules)

    def box(self, i: int) -> Box:
        b = self._boxes[i]
        if b is None:
            b = self._boxes[i] = box(self.rules[i].match)
        return b

    def shadow_of(self, j: int, budget: list[int]) -> tuple[bool, Rule | None]:
        """(unreachable?, by whom) for rule ``j``; by None: it matches nothing."""
        rb = self.box(j)
        if rb.empty:
            return True, None
        for i in range(j):
            budget[0] -= 1
            if covers(self.box(i), rb):
                return True, self.rules[i]
        return False, None

    def overlap(self, i: int, j: int) -> Match | None:
        """Packets matched by rule i (higher) and rule j, when their actions differ and j is
        not simply unreachable behind i."""
        a, b = self.rules[i], self.rules[j]
        if a.action == b.action:
            return None
        both = common(self.box(i), self.box(j))
        if both is None or covers(self.box(i), self.box(j)):
            return None
        return box_match(both)


def lint(policy: Policy, budget: int = PAIR_BUDGET) -> Lint:
    """Unreachable and overlapping rules of a whole policy (quadratic per layer direction)."""
    out = Lint()
    left = [budget]
    for layer in policy.layers.values():
        for direction, rules in _directions(layer):
            rs = _RuleSet(rules)
            for j in range(len(rules)):
                if left[0] <= 0:
                    out.truncated = True
                    break
                dead, by = rs.shadow_of(j, left)
                if dead:
                    out.unreachable.append(Unreachable(layer.name, direction, rules[j], by))
                for i in range(j):
                    left[0] -= 1
                    both = rs.overlap(i, j)
                    if both is not None:
                        out.overlaps.append(Overlap(layer.name, direction, rules[i], rules[j],
                                                    both))
    out.pairs = budget - left[0]
    return out


# ----------------------------------------------------------------------------- diff

@dataclass(slots=True)
class RuleDiff:
    """Everything that differs between two policies, rule by rule."""

    global_changes: list[str] = field(default_factory=list)
    layers_added: list[str] = field(default_factory=list)
    layers_removed: list[str] = field(default_factory=list)
    layer_changes: list[str] = field(default_factory=list)  # "acl: stateful false -> true"
    ports_added: list[str] = field(default_factory=list)
    ports_removed: list[str] = field(default_factory=list)
    port_changes: list[str] = field(default_factory=list)
    added: list[tuple[str, Direction, Rule]] = field(default_factory=list)
    removed: list[tuple[str, Direction, Rule]] = field(default_factory=list)
    changed: list[tuple[str, Direction, Rule, Rule]] = field(default_factory=list)
    unreachable: list[Unreachable] = field(default_factory=list)  # newly unreachable
    overlaps: list[Overlap] = field(default_factory=list)  # new overlaps
    truncated: bool = False

    @property
    def empty(self) -> bool:
        return not (self.global_changes or self.layers_added or self.layers_removed
                    or self.layer_changes or self.ports_added or self.ports_removed
                    or self.port_changes or self.added or self.removed or self.changed)

    def as_dict(self) -> dict[str, Any]:
        def where(layer: str, direction: Direction) -> dict[str, str]:
            return {"layer": layer, "direction": str(direction)}

        return {
            "global": self.global_changes,
            "layers": {"added": self.layers_added, "removed": self.layers_removed,
                       "changed": self.layer_changes},
            "ports": {"added": self.ports_added, "removed": self.ports_removed,
                      "changed": self.port_changes},
            "added": [{**where(layer, d), **rule_dict(r)} for layer, d, r in self.added],
            "removed": [{**where(layer, d), **rule_dict(r)} for layer, d, r in self.removed],
            "changed": [{**where(layer, d), "name": old.name, "what": _what_changed(old, new),
                         "before": rule_dict(old), "after": rule_dict(new)}
                        for layer, d, old, new in self.changed],
            "unreachable": [u.as_dict() for u in self.unreachable[:LIST_MAX]],
            "unreachable_count": len(self.unreachable),
            "overlaps": [o.as_dict() for o in self.overlaps[:LIST_MAX]],
            "overlaps_count": len(self.overlaps),
            "truncated": self.truncated,
        }


def _what_changed(old: Rule, new: Rule) -> list[str]:
    return [name for name in ("priority", "match", "action")
            if getattr(old, name) != getattr(new, name)]


def _addr_list(values: Iterable[int]) -> str:
    return ",".join(str(int_to_ip(v)) for v in values) or "-"


def _mac_text(value: int | None) -> str:
    return int_to_mac(value) if value is not None else "-"


def _port_changes(old: Port, new: Port) -> list[str]:
    out = []
    if old.interface != new.interface:
        out.append(f"{old.name}: interface {old.interface} -> {new.interface}")
    if old.mac != new.mac:
        out.append(f"{old.name}: mac {_mac_text(old.mac)} -> {_mac_text(new.mac)}")
    if old.ips != new.ips:
        out.append(f"{old.name}: ips {_addr_list(old.ips)} -> {_addr_list(new.ips)}")
    if old.layers != new.layers:
        out.append(f"{old.name}: layers [{', '.join(old.layers)}] -> "
                   f"[{', '.join(new.layers)}]")
    return out


def _global_changes(old: Policy, new: Policy) -> list[str]:
    out = []
    if old.uplink != new.uplink:
        out.append(f"uplink {old.uplink} -> {new.uplink}")
    for name in ("gateway_mac", "uplink_mac", "next_hop_mac"):
        a, b = getattr(old, name), getattr(new, name)
        if a != b:
            out.append(f"{name} {_mac_text(a)} -> {_mac_text(b)}")
    return out


def diff_rules(old: Policy, new: Policy, budget: int = PAIR_BUDGET) -> RuleDiff:
    """Compare two policies rule by rule; see the module docstring."""
    d = RuleDiff(global_changes=_global_changes(old, new))
    old_ports = {p.name: p for p in old.ports}
    new_ports = {p.name: p for p in new.ports}
    d.ports_added = [n for n in new_ports if n not in old_ports]
    d.ports_removed = [n for n in old_ports if n not in new_ports]
    for name, port in new_ports.items():
        if name in old_ports:
            d.port_changes += _port_changes(old_ports[name], port)
    d.layers_added = [n for n in new.layers if n not in old.layers]
    d.layers_removed = [n for n in old.layers if n not in new.layers]
    left = [budget]
    for name, layer in new.layers.items():
        before = old.layers.get(name)
        if before is not None:
            if before.stateful != layer.stateful:
                d.layer_changes.append(f"{name}: stateful {str(before.stateful).lower()} -> "
                                       f"{str(layer.stateful).lower()}")
            for direction in (Direction.OUT, Direction.IN):
                a, b = before.default(direction), layer.default(direction)
                if a != b:
                    d.layer_changes.append(f"{name}: default {direction} {a.kind} -> {b.kind}")
        for direction, rules in _directions(layer):
            old_rules = before.rules(direction) if before is not None else ()
            _diff_rule_set(d, name, direction, old_rules, rules, left)
    for name in d.layers_removed:
        for direction, rules in _directions(old.layers[name]):
            d.removed += [(name, direction, r) for r in rules]
    d.truncated = left[0] <= 0
    return d


def _diff_rule_set(d: RuleDiff, layer: str, direction: Direction, old: tuple[Rule, ...],
                   new: tuple[Rule, ...], left: list[int]) -> None:
    old_by = {r.name: r for r in old}
    new_by = {r.name: r for r in new}
    touched: list[int] = []
    for i, rule in enumerate(new):
        before = old_by.get(rule.name)
        if before is None:
            d.added.append((layer, direction, rule))
            touched.append(i)
        elif before != rule:
            d.changed.append((layer, direction, before, rule))
            touched.append(i)
    d.removed += [(layer, direction, r) for r in old if r.name not in new_by]
    if not touched:
        return  # nothing new can be unreachable or overlap (removals only reveal rules)
    rs, was = _RuleSet(new), _RuleSet(old)
    dead: set[int] = set()
    for t in touched:
        if left[0] <= 0:
            return
        # the touched rule itself, behind a higher one; and lower rules now behind it
        for j in [t, *range(t + 1, len(new))]:
            if j in dead:
                continue
            if j != t:
                left[0] -= 1
                if not covers(rs.box(t), rs.box(j)) or rs.box(j).empty:
                    continue
                by: Rule | None = new[t]
            else:
                is_dead, by = rs.shadow_of(j, left)
                if not is_dead:
                    continue
            k = was.index.get(new[j].name)
            if k is not None and was.rules[k] == new[j] and was.shadow_of(k, left)[0]:
                continue  # it was unreachable before the change too
            dead.add(j)
            d.unreachable.append(Unreachable(layer, direction, new[j], by))
        if t in dead:
            continue  # an unreachable rule overlaps nothing that matters
        for j in range(len(new)):
            if j == t or j in dead:
                continue
            left[0] -= 1
            hi, lo = (j, t) if j < t else (t, j)
            both = rs.overlap(hi, lo)
            if both is None or _overlapped_before(was, new[hi], new[lo]):
                continue
            d.overlaps.append(Overlap(layer, direction, new[hi], new[lo], both))
    d.overlaps = _unique_overlaps(d.overlaps)


def _overlapped_before(was: _RuleSet, first: Rule, second: Rule) -> bool:
    i, j = was.index.get(first.name), was.index.get(second.name)
    if i is None or j is None or was.rules[i] != first or was.rules[j] != second or i > j:
        return False
    return was.overlap(i, j) is not None


def _unique_overlaps(overlaps: list[Overlap]) -> list[Overlap]:
    seen: set[tuple[str, str, str, str]] = set()
    out = []
    for o in overlaps:
        k = (o.layer, str(o.direction), o.first.name, o.second.name)
        if k not in seen:
            seen.add(k)
            out.append(o)
    return out


# ----------------------------------------------------------------------------- text

def diff_lines(d: dict[str, Any]) -> list[str]:
    """The human form of `RuleDiff.as_dict` (works on what came over IPC, too)."""
    lines = [f"  global: {c}" for c in d["global"]]
    lines += [f"  + layer {n}" for n in d["layers"]["added"]]
    lines += [f"  - layer {n}" for n in d["layers"]["removed"]]
    lines += [f"  ~ layer {c}" for c in d["layers"]["changed"]]
    lines += [f"  + port {n}" for n in d["ports"]["added"]]
    lines += [f"  - port {n}" for n in d["ports"]["removed"]]
    lines += [f"  ~ port {c}" for c in d["ports"]["changed"]]

    def rule(r: dict[str, Any]) -> str:
        return f"{r['name']} (priority {r['priority']}): {r['match']} -> {r['action']}"

    lines += [f"  + {r['layer']} {r['direction']} {rule(r)}" for r in d["added"]]
    lines += [f"  - {r['layer']} {r['direction']} {rule(r)}" for r in d["removed"]]
    for c in d["changed"]:
        lines.append(f"  ~ {c['layer']} {c['direction']} {c['name']} "
                     f"({', '.join(c['what'])}): {rule(c['before'])}")
        lines.append(f"      now {rule(c['after'])}")
    for u in d["unreachable"]:
        where = f"{u['layer']} {u['direction']} {u['name']} (priority {u['priority']})"
        if u["by"] is None:
            lines.append(f"  ! unreachable: {where} matches nothing")
        else:
            lines.append(f"  ! unreachable: {where} is behind {u['by']['name']} (priority "
                         f"{u['by']['priority']}){' (same action)' if u['same_action'] else ''}")
    for o in d["overlaps"]:
        f, s = o["first"], o["second"]
        lines.append(f"  ! overlap: {o['layer']} {o['direction']} {f['name']} ({f['action']}) "
                     f"takes from {s['name']} ({s['action']}): {o['common']}")
    hidden = (d["unreachable_count"] - len(d["unreachable"])
              + d["overlaps_count"] - len(d["overlaps"]))
    if hidden > 0:
        lines.append(f"  ... {hidden} more findings (see --json)")
    if d["truncated"]:
        lines.append("  (analysis stopped early: too many rule pairs)")
    return lines or ["  no rule changes"]
