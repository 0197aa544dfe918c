"""SNAT port choice: keep the client's port unless the translated connection would collide.

A translated connection's reply key (remote -> SNAT address:port) must belong to no other
connection. The translation keeps the client's source port (or ICMP echo id) when that key is
free, else probes the next ports (wrapping into the ephemeral range, `SNAT_PORT_TRIES` at most)
before the connection is refused as ``nat_exhausted``. ``snat_ports`` is the walk's state:
the port tried per SNAT action (by identity), or `PREFERRED_SPORT` for one to try first (a
connection re-decided after a policy change, or adopted from the kernel, keeps its port).
"""

from __future__ import annotations

from typing import Final

from appliance import packet as pk
from appliance.model import Snat

PREFERRED_SPORT: Final = -1  # key in snat_ports: keep this translated port if free
SNAT_PORT_TRIES: Final = 256  # probes for a free source port before giving up (nat_exhausted)
EPHEMERAL_LO: Final = 1024


def next_snat_port(snat: Snat, h: pk.Headers, snat_ports: dict[int, int]) -> bool:
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
