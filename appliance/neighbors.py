"""Proxy ARP and IPv6 neighbour discovery: the switch answers, nothing crosses it.

Like VFP's and OPTE's virtual gateway: a port asking for another port's address gets that
port's MAC; any other address gets ``gateway_mac`` (the VMs' default gateway is the switch; no
flooding between ports). Requests from the uplink for addresses the switch owns (port IPs,
SNAT addresses, DNAT VIPs, tunnel endpoints) are answered with ``uplink_mac`` (or
``gateway_mac``). ARP/ND never cross the switch, never use flows and are never offloaded.
"""

from __future__ import annotations

from typing import Final

from appliance import guard
from appliance import packet as pk
from appliance.outcomes import DropReason
from appliance.translate import Translator

ND_NS: Final = 135
ND_TYPES: Final = frozenset({133, 134, 135, 136, 137})  # RS, RA, NS, NA, redirect


class NeighborProxy:
    """Answers for one policy generation. `arp` / `nd` return ``(reason, None)`` to drop the
    request (a named reason) or ``(None, reply)`` to send ``reply`` back out of the ingress."""

    def __init__(self, tr: Translator) -> None:
        self._tr = tr

    def _answer_mac(self, target: int, ingress: str) -> int | None:
        """The MAC the switch answers with for ``target``, or None to stay silent."""
        tr = self._tr
        policy = tr.policy
        if ingress == tr.uplink:
            if target in tr.owned:
                return policy.uplink_mac or policy.gateway_mac
            return None
        requester = tr.ports.get(ingress)
        if requester is not None and target in requester.port.ips:
            return None  # duplicate address detection / gratuitous: nobody else owns it
        owner = tr.by_ip.get(target)
        return owner.port.mac if owner is not None else policy.gateway_mac

    def _known(self, ingress: str) -> bool:
        return ingress == self._tr.uplink or ingress in self._tr.ports

    def arp(self, frame: bytes, h: pk.Headers, ingress: str) -> tuple[str | None, bytes | None]:
        if not self._known(ingress):
            return DropReason.UNKNOWN_PORT, None
        if h.arp_op != 1 or h.arp_tpa is None:
            return DropReason.ARP_NOT_REQUEST, None
        problem = guard.target_problem(h.arp_tpa)
        if problem is not None:
            return problem, None
        mac = self._answer_mac(h.arp_tpa, ingress)
        if mac is None:
            return DropReason.ARP_NOT_OURS, None
        return None, pk.build_arp_reply(frame, h, mac)

    def nd(self, frame: bytes, h: pk.Headers, ingress: str) -> tuple[str | None, bytes | None]:
        if not self._known(ingress):
            return DropReason.UNKNOWN_PORT, None
        if h.icmp_type != ND_NS or h.nd_target is None:
            return DropReason.ND_NOT_SOLICIT, None
        problem = guard.target_problem(h.nd_target) or guard.address_problem(h.src, h.dst)
        if problem is not None:
            return problem, None
        mac = self._answer_mac(h.nd_target, ingress)
        if mac is None:
            return DropReason.ND_NOT_OURS, None
        return None, pk.build_neighbor_advert(frame, h, mac)
