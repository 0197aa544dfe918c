"""Decision templates: skip the layer walk for a connection like a recent one (a megaflow).

Most new connections differ from a recent one only in the client's source port (a VM opening
connections to the same service). When no rule consulted by the walk looks at that port --
src_port in the forward lookups, dst_port in the reply's -- and no action depends on it (no
port translation, no VXLAN entropy port), the walk's outcome is the same but for the port
itself: reuse it, swapping the port into the reply key and the recorded lookup values.
Anything else (a port rule, a collision on the reply key, a new generation) takes the full
walk. A `Templates` lives for one policy generation (the pipeline makes a new one with every
policy change). Property-tested against full walks (tests/test_templates.py).
"""

from __future__ import annotations

from typing import Final

from appliance import packet as pk
from appliance.flows import Conn, FlowTable, LayerStep, lone_drop
from appliance.model import FIELD_INDEX, Direction, Policy
from appliance.translate import Decision

TEMPLATE_CACHE: Final = 4096  # decision templates kept (cleared when full)
_SRC_PORT: Final = FIELD_INDEX["src_port"]  # in a classifier lookup tuple
_DST_PORT: Final = FIELD_INDEX["dst_port"]


def template_key(h: pk.Headers, ingress: str) -> tuple | None:
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


class Templates:
    """The templates of one policy generation; see the module docstring."""

    def __init__(self, policy: Policy, flows: FlowTable) -> None:
        self._flows = flows
        self._cache: dict[tuple, tuple[Decision, int]] = {}
        # the port fields each layer/direction's rules look at
        self._port_fields = {
            (name, d): {f for r in layer.rules(d) for f in r.match.fields
                        if f in ("src_port", "dst_port")}
            for name, layer in policy.layers.items() for d in (Direction.OUT, Direction.IN)
        }
        self.hits = 0  # decisions taken from a template (no full walk)

    def lookup(self, tkey: tuple, sport: int, own: Conn | None = None) -> Decision | None:
        """The decision for this client port, if a template covers it and its reply key is
        free (owned by nobody but ``own``)."""
        t = self._cache.get(tkey)
        if t is None:
            return None
        d, _ = t
        rkey = _with_reply_dport(d.rkey, sport)  # type: ignore[arg-type]
        taken = self._flows.get(rkey)
        if taken is not None and not lone_drop(taken) and (own is None or taken.conn is not own):
            return None  # a collision: the full walk knows how to pick another port
        self.hits += 1
        return Decision(d.actions, _with_port(d.steps, _SRC_PORT, sport), d.port, d.direction,
                        d.output, rkey, d.ractions, _with_port(d.rsteps, _DST_PORT, sport),
                        d.rport,
                        d.rdirection)

    def remember(self, tkey: tuple, sport: int, d: Decision) -> None:
        """Keep a full walk's decision as a template, if nothing in it depends on the port."""
        a = d.actions
        if (d.conflict is not None or a.output is None or d.rkey is None or d.ractions is None
                or a.encap is not None or a.sport is not None or a.icmp_id is not None
                or d.rkey[1][pk.K_DPORT] != sport):
            return
        uses = self._port_fields
        if any(st.values is not None and "src_port" in uses.get((st.layer, st.direction), ())
               for st in d.steps):
            return
        if any(st.values is not None and "dst_port" in uses.get((st.layer, st.direction), ())
               for st in d.rsteps):
            return
        if len(self._cache) >= TEMPLATE_CACHE:
            self._cache.clear()
        self._cache[tkey] = (d, sport)
