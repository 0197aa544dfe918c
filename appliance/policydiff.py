"""What changed between two policies, in the terms revalidation needs.

Revalidation (OVS revalidators, VFP generation numbers) must re-check every flow made under
an older policy, but re-walking 100k flows through every layer costs seconds in Python. Most
edits touch one rule, so a flow only needs a full re-evaluation when one of the layer
decisions it recorded could now come out differently:

* the rule it matched was removed or modified;
* it fell to a layer default that changed;
* a new or modified rule with a better (lower) priority than the one it matched now matches
  the headers it had at that layer (its recorded lookup tuple);
* its port's layer list changed, or something global changed (addresses, MACs, port
  security or VLANs of ports, the uplink, DNAT VIPs: they decide where packets go and who
  may send them).

Anything else keeps its compiled actions; only the generation number moves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from appliance.flows import Flow
from appliance.model import Direction, Dnat, Layer, Match, Policy, Rule


@dataclass(slots=True)
class LayerChange:
    full: bool = False  # layer added/removed or its statefulness changed: re-check everything
    default_changed: bool = False
    touched: set[str] = field(default_factory=set)  # rule names removed or modified
    candidates: list[tuple[int, Match]] = field(default_factory=list)  # new/modified rules


@dataclass(slots=True)
class PolicyDiff:
    everything: bool = False  # a global change: re-evaluate every flow
    ports: set[str] = field(default_factory=set)  # ports whose layer list changed
    layers: dict[tuple[str, Direction], LayerChange] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not self.everything and not self.ports and not self.layers

    def affects(self, flow: Flow) -> bool:
        """Could this flow's recorded decision change under the new policy?"""
        if self.everything:
            return True
        if self.ports and (flow.key[0] in self.ports or flow.port in self.ports
                           or flow.actions.output in self.ports):
            return True  # its port's layer list changed (maybe from none: no steps)
        for step in flow.steps:
            if step.port in self.ports:
                return True
            change = self.layers.get((step.layer, step.direction))
            if change is None:
                continue
            if change.full:
                return True
            if step.rule.startswith("("):
                continue  # a stateful inverse consults no rules
            if step.rule == "default":
                if change.default_changed:
                    return True
                limit = math.inf
            else:
                if step.rule in change.touched:
                    return True
                limit = step.priority if step.priority is not None else math.inf
            values = flow.lookup_values(step)
            for prio, match in change.candidates:
                if prio < limit and values is not None and match.matches(values):
                    return True
        return False


def _vips(policy: Policy) -> set[tuple[str, Rule]]:
    out = set()
    for layer in policy.layers.values():
        for rule in layer.inbound:
            if isinstance(rule.action, Dnat):
                out.add((layer.name, rule))
    return out


def _rules_change(old: tuple[Rule, ...], new: tuple[Rule, ...], change: LayerChange) -> None:
    old_by = {r.name: r for r in old}
    new_by = {r.name: r for r in new}
    for name, rule in old_by.items():
        if new_by.get(name) != rule:
            change.touched.add(name)
    for name, rule in new_by.items():
        if old_by.get(name) != rule:
            change.candidates.append((rule.priority, rule.match))


def _layer_change(old: Layer | None, new: Layer | None,
                  direction: Direction) -> LayerChange | None:
    if old is None or new is None or old.stateful != new.stateful:
        return LayerChange(full=True)
    change = LayerChange(default_changed=old.default(direction) != new.default(direction))
    _rules_change(old.rules(direction), new.rules(direction), change)
    if change.default_changed or change.touched or change.candidates:
        return change
    return None


def diff(old: Policy, new: Policy) -> PolicyDiff:
    """Compare two policies; see the module docstring for what counts."""
    d = PolicyDiff()
    if (old.uplink, old.gateway_mac, old.uplink_mac, old.next_hop_mac) != (
            new.uplink, new.gateway_mac, new.uplink_mac, new.next_hop_mac):
        d.everything = True
    old_ports = {p.name: p for p in old.ports}
    new_ports = {p.name: p for p in new.ports}
    if {replace(p, layers=()) for p in old.ports} != {replace(p, layers=()) for p in new.ports}:
        d.everything = True  # who owns which address decides where packets go and who may
        # send what (port security, VLANs)
    if _vips(old) != _vips(new):
        d.everything = True
    for name, port in old_ports.items():
        other = new_ports.get(name)
        if other is None or other.layers != port.layers:
            d.ports.add(name)
    for name in set(old.layers) | set(new.layers):
        for direction in (Direction.OUT, Direction.IN):
            change = _layer_change(old.layers.get(name), new.layers.get(name), direction)
            if change is not None:
                d.layers[(name, direction)] = change
    return d
