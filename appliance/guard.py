"""What a frame may claim before any rule sees it: addresses no host may use, and what a port
may send as (port security, VLANs).

Frames from VMs are untrusted input. Before the slow path evaluates a packet against policy,
its addresses (the outer ones and, for VXLAN, the tenant's inner ones) are checked against the
classes that must never be on the wire. The list follows what the Linux stack itself drops
(``ip_route_input_slow`` for IPv4, ``ip6_rcv_core`` for IPv6) plus the RFCs it cites:

* ``mapped_address`` -- an IPv6 header carrying an IPv4-mapped (``::ffff:0:0/96``, RFC 4291
  2.5.5.2: never on the wire) or IPv4-compatible (``::/96`` except ``::`` and ``::1``, RFC 4291
  2.5.5.1: deprecated) address, as source or destination. Such a packet is one family dressed
  as the other: a rule written for IPv4 must never be asked about it, and the kernel flow cache
  (whose keys hold IPv4 as IPv4-mapped bytes) must never key it.
* ``martian_source`` -- a source no host has: IPv4 ``0.0.0.0/8`` (this network, RFC 6890),
  ``127.0.0.0/8`` (loopback), ``224.0.0.0/4`` (multicast) and ``255.255.255.255``; IPv6 ``::1``
  (loopback) and ``ff00::/8`` (multicast, RFC 4291 2.7). The unspecified source (``0.0.0.0`` /
  ``::``) is what DHCP and duplicate address detection send from: it passes here when the
  destination is link-local scope (such frames are then dropped as ``link_local`` by the
  slow path, which never forwards link-local scope) -- DAD's neighbour solicitations are
  answered by the switch's ND proxy before this check.
* ``martian_destination`` -- IPv4 ``0.0.0.0/8`` and ``127.0.0.0/8``; IPv6 ``::`` and ``::1``.

Only the slow path runs these checks: a connection can never be created for such a packet,
so no flow can be hit by one either (the per-packet cost on established flows is zero).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from appliance.model import IPV4_BASE, IPV4_TAG, Port
from appliance.outcomes import DropReason

if TYPE_CHECKING:
    from appliance.packet import Headers

MAPPED_ADDRESS: Final = DropReason.MAPPED_ADDRESS
MARTIAN_SOURCE: Final = DropReason.MARTIAN_SOURCE
MARTIAN_DESTINATION: Final = DropReason.MARTIAN_DESTINATION

_V6_LOOPBACK: Final = 1
_V6_UNSPECIFIED: Final = 0
_V6_MAPPED_HI: Final = 0xFFFF  # value >> 32 of ::ffff:a.b.c.d


def _v6_mapped(addr: int) -> bool:
    """IPv4-mapped or IPv4-compatible (``::`` and ``::1`` excepted: they have their own rules)."""
    hi = addr >> 32
    return hi == _V6_MAPPED_HI or (hi == 0 and addr > _V6_LOOPBACK)


def _v4_local_scope(dst: int) -> bool:
    """Limited broadcast or 224.0.0.0/24 (what DHCP and friends send to)."""
    v4 = dst & 0xFFFF_FFFF
    return v4 == 0xFFFF_FFFF or v4 >> 8 == 0xE00000


def multicast(addr: int) -> bool:
    """224.0.0.0/4 or ff00::/8: a group, which never answers as itself."""
    if addr >> 32 == IPV4_TAG:
        return (addr & 0xFFFF_FFFF) >> 28 == 0xE
    return addr >> 120 == 0xFF


def link_local_scope(dst: int) -> bool:
    """Limited broadcast, IPv4 local-network multicast (224.0.0.0/24), IPv6 ff02::/16: what
    no router forwards (DHCP, mDNS, MLD, router solicitations)."""
    if dst >> 32 == IPV4_TAG:
        return _v4_local_scope(dst)
    return dst >> 112 == 0xFF02


def link_local_source(src: int | None) -> bool:
    """fe80::/10: valid on the link only; no router forwards a packet from it (RFC 4291)."""
    return src is not None and src >> 118 == 0xFE80 >> 6


def link_local(h: Headers) -> bool:
    """A packet of link-local scope (either address): never forwarded, whatever it is in."""
    return h.dst is not None and (link_local_scope(h.dst) or link_local_source(h.src))


def packet_problem(h: Headers) -> str | None:
    """`address_problem` for the outer and, for VXLAN, the inner packet."""
    problem = address_problem(h.src, h.dst)
    if problem is None and h.inner is not None:
        problem = address_problem(h.inner.src, h.inner.dst)
    return problem


def address_problem(src: int | None, dst: int | None) -> str | None:
    """The drop reason for a packet from ``src`` to ``dst``, or None when both may be used.

    Addresses are in `appliance.model`'s shared space; None (non-IP) is never a problem here.
    """
    if src is None or dst is None:
        return None
    if src >> 32 == IPV4_TAG:
        s = src & 0xFFFF_FFFF
        top = s >> 24
        if s == 0:  # unspecified: DHCP clients before they have an address
            return None if _v4_local_scope(dst) else MARTIAN_SOURCE
        if top == 0 or top == 127 or top >> 4 == 0xE or s == 0xFFFF_FFFF:
            return MARTIAN_SOURCE
        if dst >> 32 == IPV4_TAG:
            d_top = (dst & 0xFFFF_FFFF) >> 24
            if d_top == 0 or d_top == 127:
                return MARTIAN_DESTINATION
        return None
    if _v6_mapped(src) or _v6_mapped(dst):
        return MAPPED_ADDRESS
    if src == _V6_UNSPECIFIED:  # DAD and MLD before an address is configured
        return None if dst >> 112 == 0xFF02 else MARTIAN_SOURCE
    if src == _V6_LOOPBACK or src >> 120 == 0xFF:
        return MARTIAN_SOURCE
    if dst in (_V6_UNSPECIFIED, _V6_LOOPBACK):
        return MARTIAN_DESTINATION
    return None


MARTIAN_TARGET: Final = DropReason.MARTIAN_TARGET


def target_problem(target: int) -> str | None:
    """Drop reason for an ARP/ND request asking for an address no host can have, else None.

    RFC 4861 7.1.1 discards a solicitation for a multicast target; a loopback, unspecified,
    "this network" or broadcast target is no more answerable, and an IPv4-mapped one is IPv4
    dressed as IPv6 (`MAPPED_ADDRESS`).
    """
    if target >> 32 == IPV4_TAG:
        t = target & 0xFFFF_FFFF
        top = t >> 24
        if top == 0 or top == 127 or top >> 4 == 0xE or t == 0xFFFF_FFFF:
            return MARTIAN_TARGET
        return None
    if _v6_mapped(target):
        return MAPPED_ADDRESS
    if target in (_V6_UNSPECIFIED, _V6_LOOPBACK) or target >> 120 == 0xFF:
        return MARTIAN_TARGET
    return None


# --- port security (a port is who its policy says) --------------------------------------------

SPOOFED_MAC: Final = DropReason.SPOOFED_MAC
SPOOFED_SOURCE: Final = DropReason.SPOOFED_SOURCE
VLAN_NOT_ALLOWED: Final = DropReason.VLAN_NOT_ALLOWED


def port_problem(port: Port, h: Headers, *, check_mac: bool = True) -> str | None:
    """What a frame sent by ``port`` may not claim: a VLAN it is not on, another MAC, another
    port's (or anybody else's) source address. None when the frame may go on to the rules.

    Only the frame's own (outer) headers: a VM that builds its own VXLAN is judged by the
    outer packet it sends. The unspecified source is left to `address_problem`, which lets it
    through only towards link-local scope (DHCP, DAD), where the slow path drops it anyway.
    """
    if not port.allows_vlan(h.vlan):
        return VLAN_NOT_ALLOWED
    if not port.port_security:
        return None
    if check_mac and h.src_mac != port.mac:
        return SPOOFED_MAC
    src = h.src
    if src is not None and src not in _UNSPECIFIED and not port.owns_source(src):
        return SPOOFED_SOURCE
    return None


_UNSPECIFIED: Final = frozenset({IPV4_BASE, _V6_UNSPECIFIED})
