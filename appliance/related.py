"""ICMP errors about known connections ("related" traffic, as conntrack calls it).

An ICMP error (destination unreachable, time exceeded, packet too big, ...) quotes the packet
that caused it. When that packet belongs to a connection this switch knows, the error follows
the connection's reply flow -- the quoted packet is one the switch sent out (as translated),
so the reply flow is keyed by its reverse -- and is translated like a reply: the outer
destination and the quoted source take the original sender's address and port, the outer
source and the quoted destination the address the sender talked to (a VIP, for DNAT). The
error then gets the MACs any frame to that output gets.
"""

from __future__ import annotations

from appliance import packet as pk
from appliance.flows import Flow, FlowTable
from appliance.translate import Translator


def reply_flow_of(h: pk.Headers, ingress: str, flows: FlowTable) -> Flow | None:
    """The reply flow an ICMP error (parsed ``h``) belongs to, if any."""
    e = h.embedded
    emb_key = pk.flow_key(e) if e is not None and e.src is not None else None
    if emb_key is None:
        return None
    return flows.get((ingress, pk.reverse_key(emb_key)))


def translate_error(frame: bytes, h: pk.Headers, reply: Flow, tr: Translator) -> bytes:
    """The error ``frame`` as it leaves through ``reply``'s output (see the module docstring)."""
    a = reply.actions
    out = frame
    if a.dst is not None or a.src is not None:
        out = pk.rewrite(out, h, src=a.src, dst=a.dst)
        out = pk.rewrite_embedded(out, pk.parse_known(out), src=a.dst, sport=a.dport,
                                  dst=a.src, dport=a.sport)
    dest = tr.ports.get(a.output)  # type: ignore[arg-type]
    if dest is not None:  # delivered to a VM: its own MAC, like the reply flow does
        return pk.set_macs(out, None, dest.port.mac)
    if a.output == tr.uplink:  # to the wire: the uplink's MACs, like any frame
        return pk.set_macs(out, tr.policy.uplink_mac, tr.policy.next_hop_mac)
    return out
