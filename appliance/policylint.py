"""Warnings about a valid policy: rules that can never match.

A policy that validates can still hold a rule no packet will ever reach, which is nearly always
a mistake (a typo'd family, an IPv6 rule written with an IPv4 source). These are warnings, not
errors: the policy means something, just not what was likely intended. ``appliance-check-config``
prints them and the daemon logs them when it loads a policy.

What is checked, per rule (addresses in `appliance.model`'s space, families kept apart):

* ``src`` allows only one family and ``dst`` only the other: no packet has both.
* ``proto: icmp`` with IPv6-only addresses, or ``icmpv6`` with IPv4-only ones.
* an IPv6 prefix inside ``::ffff:0:0/96`` or ``::/96`` (IPv4-mapped / -compatible): such
  addresses are dropped before any rule sees them (`appliance.guard`); write the IPv4 prefix.
* a field whose exclusions (``!...``) cover everything it includes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final

from appliance.model import IPV4_BASE, FieldSet, Policy, Rule, int_to_ip

V4: Final = "IPv4"
V6: Final = "IPv6"
_V4_LO, _V4_HI = IPV4_BASE, IPV4_BASE | 0xFFFF_FFFF
_ICMP: Final = 1
_ICMPV6: Final = 58


def _families(fs: FieldSet | None) -> set[str] | None:
    """Families a field's positive items can match; None when it has none (any address)."""
    if fs is None or not fs.pos:
        return None
    out = set()
    for lo, hi in fs.pos:
        if lo <= _V4_HI and hi >= _V4_LO:
            out.add(V4)
        if lo < _V4_LO:
            out.add(V6)
    return out


def _empty(fs: FieldSet) -> bool:
    """True when every value the positive intervals allow is excluded by a negation."""
    if not fs.pos or not fs.neg:
        return False
    negs = sorted(fs.neg)
    for lo, hi in fs.pos:
        at = lo
        for nlo, nhi in negs:
            if nlo <= at <= nhi:
                at = nhi + 1
            if at > hi:
                break
        if at <= hi:
            return False
    return True


def _mapped_only(lo: int, hi: int) -> bool:
    """An IPv6 interval inside ::/96 (IPv4-compatible) or ::ffff:0:0/96 (IPv4-mapped)."""
    return lo >> 32 == hi >> 32 and lo >> 32 in (0, 0xFFFF)


def rule_problems(rule: Rule) -> Iterator[str]:
    """Why ``rule`` can never match, if it cannot (one reason per line)."""
    fields = rule.match.fields
    src, dst = _families(fields.get("src")), _families(fields.get("dst"))
    if src is not None and dst is not None and not src & dst:
        yield (f"src is {'/'.join(sorted(src))} only and dst {'/'.join(sorted(dst))} only: "
               "no packet has both")
    fams = src if dst is None else dst if src is None else src & dst
    proto = fields.get("proto")
    if fams and proto is not None:
        protos = {v for lo, hi in proto.pos for v in (lo, hi) if lo == hi}
        if protos == {_ICMP} and fams == {V6}:
            yield "proto icmp (ICMPv4) with IPv6 addresses only: use icmpv6"
        if protos == {_ICMPV6} and fams == {V4}:
            yield "proto icmpv6 with IPv4 addresses only: use icmp"
    for name in ("src", "dst"):
        fs = fields.get(name)
        if fs is None:
            continue
        for lo, hi in fs.pos:
            if _mapped_only(lo, hi):
                yield (f"{name} {int_to_ip(lo)}-{int_to_ip(hi)} is IPv4-mapped/compatible "
                       "IPv6, which never reaches a rule: write the IPv4 prefix")
    for name, fs in fields.items():
        if _empty(fs):
            yield f"{name}: the exclusions cover everything it includes"


def policy_warnings(policy: Policy) -> list[str]:
    """One ``SOURCE: layer L outbound rule R: can never match: WHY`` line per problem."""
    out = []
    for layer in policy.layers.values():
        for direction, rules in (("outbound", layer.outbound), ("inbound", layer.inbound)):
            for rule in rules:
                for why in rule_problems(rule):
                    out.append(f"{policy.source}: layer {layer.name} {direction} rule "
                               f"{rule.name}: can never match: {why}")
    return out
