"""IP fragments: later fragments follow the flow of their datagram's first fragment.

Only the first fragment carries the L4 ports, so it is looked up (or evaluated) like any
packet; the switch then remembers (ingress, src, dst, proto, IP id) -> its flow for
`FRAG_TIMEOUT_NS`, and later fragments of the same datagram follow that flow. A later
fragment seen before its first one is evaluated without ports (rules with port conditions do
not match it) and creates no flow (the pipeline's job). The memory is bounded per ingress
(`FRAG_PORT_MAX`, oldest first): a port flooding first fragments forgets its own, nobody
else's.
"""

from __future__ import annotations

import collections
from typing import Final

from appliance import packet as pk
from appliance.flows import Flow
from appliance.timeouts import NS

FRAG_TIMEOUT_NS: Final = 30 * NS  # how long later fragments may follow their first one
FRAG_PORT_MAX: Final = 4096  # first fragments remembered per ingress (then the oldest goes)


def _key(h: pk.Headers, ingress: str) -> tuple | None:
    if h.frag_id is None:
        return None
    return (ingress, h.src, h.dst, h.proto, h.frag_id)


class FragmentTable:
    """First fragments remembered per ingress, oldest first."""

    def __init__(self) -> None:
        self._by_ingress: dict[str, collections.OrderedDict[tuple, tuple[Flow, int]]] = {}
        self.evictions = 0  # remembered first fragments pushed out by an ingress's cap

    def __len__(self) -> int:
        return sum(len(f) for f in self._by_ingress.values())

    def count(self, ingress: str) -> int:
        frags = self._by_ingress.get(ingress)
        return len(frags) if frags is not None else 0

    def lookup(self, h: pk.Headers, ingress: str, now_ns: int) -> Flow | None:
        """The live flow a later fragment follows, if its first fragment was seen."""
        frags = self._by_ingress.get(ingress)
        fk = _key(h, ingress)
        entry = frags.get(fk) if frags is not None and fk is not None else None
        if entry is not None and entry[1] >= now_ns and not entry[0].conn.removed:
            return entry[0]
        return None

    def remember(self, h: pk.Headers, ingress: str, flow: Flow, now_ns: int) -> None:
        """A first fragment went through ``flow``: its later fragments will follow."""
        fk = _key(h, ingress)
        if fk is None:
            return
        frags = self._by_ingress.get(ingress)
        if frags is None:
            frags = self._by_ingress[ingress] = collections.OrderedDict()
        frags.pop(fk, None)  # re-inserted at the young end: deadlines stay in order
        frags[fk] = (flow, now_ns + FRAG_TIMEOUT_NS)
        while frags and next(iter(frags.values()))[1] < now_ns:
            frags.popitem(last=False)  # expired
        while len(frags) > FRAG_PORT_MAX:
            frags.popitem(last=False)  # a hard cap per ingress: the oldest goes
            self.evictions += 1

    def prune(self) -> None:
        """Forget the fragments of connections that are gone."""
        for ingress, frags in list(self._by_ingress.items()):
            for k in [k for k, v in frags.items() if v[0].conn.removed]:
                del frags[k]
            if not frags:
                del self._by_ingress[ingress]

    def clear(self) -> None:
        self._by_ingress.clear()
