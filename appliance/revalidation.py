"""Revalidation: bring connections made under older policy generations up to date.

OVS's revalidators re-translate datapath flows after a change and compare; VFP bumps a
generation. Here every policy change (`Pipeline.set_policy`) bumps the generation and
`appliance.policydiff` says which recorded layer decisions could now come out differently:
unaffected connections only get the new generation; affected ones are re-evaluated from
their key (with the MACs and DSCP of the packet that created them) -- unchanged decisions
keep forwarding with no gap, changed actions are updated in place in the datapath, and a
connection whose reply path or verdict changed is replaced (a newly denied one by a drop
flow, so the datapath drops it at once). A connection whose source the port may no longer use
(port security) is removed. Counters never go backwards: packets already carried stay
credited to the rules that decided them then.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from appliance import packet as pk
from appliance.flows import Conn, Flow, LayerStep
from appliance.policydiff import PolicyDiff
from appliance.templates import template_key
from appliance.timeouts import tcp_state_from_flags
from appliance.translate import Decision

if TYPE_CHECKING:
    from appliance.pipeline import Pipeline


@dataclass(slots=True)
class RevalidationStats:
    checked: int = 0
    unchanged: int = 0
    updated: int = 0  # actions changed in place
    replaced: int = 0  # removed, and re-installed when policy still admits the key
    remaining: int = 0  # left for the next call (limit reached)


def headers_of(flow: Flow) -> pk.Headers:
    """Headers to re-evaluate a flow with: its key, plus what the key does not hold but rules
    may match on (MACs and DSCP of the packet that created it)."""
    h = pk.headers_from_key(flow.key[1], src_mac=flow.macs[0], dst_mac=flow.macs[1])
    outer_dscp, inner_dscp = flow.dscp
    h.dscp = outer_dscp
    if h.inner is not None:
        h.inner.dscp = inner_dscp
    return h


def preferred_sport(flow: Flow) -> int | None:
    """The translated source port (or ICMP id) a connection keeps when re-decided."""
    a = flow.actions
    return a.sport if a.sport is not None else a.icmp_id


class Revalidator:
    """The revalidation state of one pipeline; see the module docstring."""

    def __init__(self, pipeline: Pipeline) -> None:
        self._p = pipeline
        self.diff: PolicyDiff | None = None
        self.stale = False  # some connection may predate the current generation
        self._queue: list[Conn] | None = None

    def policy_changed(self, diff: PolicyDiff | None) -> None:
        """A new generation: everything older is stale until revalidated."""
        self.diff = diff
        self.stale = diff is not None
        self._queue = None  # rebuilt for the new generation

    def revalidate(self, now_ns: int, limit: int | None = None) -> RevalidationStats:
        """Revalidate stale connections, ``limit`` per call (callers yield in between)."""
        stats = RevalidationStats()
        if not self.stale:
            return stats
        p = self._p
        gen = p.generation
        if self._queue is None:  # one pass over the table per generation, not per call
            self._queue = [c for c in p.flows.conns() if c.generation != gen]
        queue = self._queue
        while queue and (limit is None or stats.checked < limit):
            conn = queue.pop()
            if conn.generation == gen or conn.removed:
                continue
            stats.checked += 1
            try:
                self.revalidate_conn(conn, now_ns, stats)
            except Exception as exc:  # fail closed: its next packet is evaluated afresh
                p.record_fault("revalidate", exc, ingress=conn.forward.key[0])
                p.discard(conn)
        stats.remaining = len(queue)
        if not queue:
            self.stale = False
            self._queue = None
        return stats

    def revalidate_conn(self, conn: Conn, now_ns: int,
                        stats: RevalidationStats | None = None) -> None:
        stats = stats if stats is not None else RevalidationStats()
        p = self._p
        gen = p.generation
        diff = self.diff
        if diff is not None and conn.generation == gen - 1 and not any(
                diff.affects(f) for f in conn.flows()):
            conn.generation = gen
            stats.unchanged += 1
            return
        fwd, rev = conn.forward, conn.reverse
        ingress, key = fwd.key
        h = headers_of(fwd)
        if p.admit(h, ingress, check_mac=h.inner is None) is not None:
            p.remove_conn(conn)  # e.g. the port no longer owns the source: no flow at all
            stats.replaced += 1
            return
        prefer = preferred_sport(fwd)
        d = None
        tkey = template_key(h, ingress) if prefer is None and p.use_templates else None
        if tkey is not None:  # a full re-evaluation of many similar flows: reuse walks
            d = p.templates.lookup(tkey, h.sport, own=conn)  # type: ignore[arg-type]
        if d is None:
            d = p.translator.evaluate(h, ingress, key, own=conn, prefer_sport=prefer)
            if tkey is not None:
                p.templates.remember(tkey, h.sport, d)  # type: ignore[arg-type]
        # a fresh pipeline keeps no flow for a packet no port owns (the slow path forwards
        # or drops it alone): neither does revalidation, so such a decision replaces below
        same_shape = d.conflict is None and d.port is not None and d.rkey == (
            rev.key if rev is not None else None)
        if same_shape and d.actions == fwd.actions and (
                rev is None or d.ractions == rev.actions):
            # same actions, but possibly decided by other rules (of another port) now:
            # record those, or the next policy diff would reason from rules and ports that
            # no longer decide this flow
            self._restep(fwd, d.steps, d.template_port)
            fwd.port, fwd.direction = d.port, d.direction  # type: ignore[assignment]
            if rev is not None:
                self._restep(rev, d.rsteps, d.template_port)
                rev.port, rev.direction = d.rport, d.rdirection  # type: ignore[assignment]
            conn.generation = gen
            stats.unchanged += 1
            return
        if same_shape and d.actions.output is not None and rev is not None:
            fwd.actions = d.actions
            rev.actions = d.ractions  # type: ignore[assignment]
            self._restep(fwd, d.steps, d.template_port)
            self._restep(rev, d.rsteps, d.template_port)
            fwd.port, fwd.direction = d.port, d.direction  # type: ignore[assignment]
            rev.port, rev.direction = d.rport, d.rdirection  # type: ignore[assignment]
            conn.generation = gen
            for f in (fwd, rev):
                f.nic_refused = None
                if f.offloaded:
                    p.datapath.update(f)
                if f.nic_refused is None and not f.offloaded:
                    p.offload(f, now_ns)
            stats.updated += 1
            return
        seen = p.datapath.conn_flags(conn)  # what the kernel saw since the last fold
        if seen is not None:
            conn.tcp_state = tcp_state_from_flags(seen[0], seen[1], conn.tcp_state)
        p.remove_conn(conn)
        stats.replaced += 1
        if d.conflict is None and d.port is not None:
            new_fwd, new_rev = p.install(d, ingress, key, h, now_ns)
            new_conn = new_fwd.conn
            new_conn.tcp_state = conn.tcp_state
            new_conn.created_ns = conn.created_ns
            new_conn.last_seen_ns = conn.last_seen_ns
            p.flows.reschedule(new_conn)  # its real state decides its timeout
            p.offload(new_fwd, now_ns)
            if new_rev is not None:
                p.offload(new_rev, now_ns)

    def _restep(self, flow: Flow, steps: tuple[LayerStep, ...],
                template_port: int | None) -> None:
        """Replace the layer decisions recorded for ``flow``; the packets it carried so far
        stay credited to the rules that decided them then (counters never go backwards)."""
        if [(s.port, s.layer, s.direction, s.rule) for s in flow.steps] != [
                (s.port, s.layer, s.direction, s.rule) for s in steps]:
            self._p.book.retire_flow(flow)
            flow.packets = flow.bytes = 0
        flow.steps = steps
        flow.template_port = template_port

    def reevaluate(self, conn: Conn) -> Decision:
        """The decision the pipeline's policy gives an existing connection, reached as
        revalidation reaches it, without changing anything (policy what-if: ``conn`` may
        live in another pipeline's table, whose flows the pipeline's ``flows`` then is)."""
        p = self._p
        fwd = conn.forward
        ingress, key = fwd.key
        return p.translator.evaluate(headers_of(fwd), ingress, key, own=conn,
                                     prefer_sport=preferred_sport(fwd), taken=p.flows.get)
