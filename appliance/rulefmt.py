"""Rules for people: a rule's match and action as one line of text, and as a JSON map.

Shared by the daemon's IPC methods (``rules``, ``policy_diff``), the rule-level analysis
(`appliance.ruleanalysis`) and the command-line tools, so a rule reads the same everywhere.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from appliance.model import (
    FIELDS,
    IPV4_BASE,
    PROTO_NAMES,
    FieldSet,
    Match,
    Rule,
    int_to_ip,
    int_to_mac,
)
from appliance.translate import describe_action

_V4_LO = IPV4_BASE
_V4_HI = IPV4_BASE | 0xFFFF_FFFF


def _address_pieces(lo: int, hi: int) -> list[tuple[int, int]]:
    """Split an address interval where the IPv4 block starts and ends: each piece is
    then of one family (an analysis may produce intervals that span both)."""
    pieces = []
    for a, b in ((lo, min(hi, _V4_LO - 1)), (max(lo, _V4_LO), min(hi, _V4_HI)),
                 (max(lo, _V4_HI + 1), hi)):
        if a <= b:
            pieces.append((a, b))
    return pieces


def _interval_text(name: str, lo: int, hi: int) -> str:
    if name in ("src", "dst"):
        nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for a, b in _address_pieces(lo, hi):
            first, last = int_to_ip(a), int_to_ip(b)
            nets += ipaddress.summarize_address_range(first, last)  # type: ignore[arg-type]
        return ",".join(str(n) if n.num_addresses > 1 else str(n.network_address)
                        for n in nets)
    if name in ("src_mac", "dst_mac"):
        return int_to_mac(lo) if lo == hi else f"{int_to_mac(lo)}-{int_to_mac(hi)}"
    if name == "proto" and lo == hi:
        return PROTO_NAMES.get(lo, str(lo))
    return str(lo) if lo == hi else f"{lo}-{hi}"


def _field_text(name: str, fs: FieldSet) -> str:
    items = [_interval_text(name, lo, hi) for lo, hi in fs.pos]
    items += ["!" + _interval_text(name, lo, hi) for lo, hi in fs.neg]
    return items[0] if len(items) == 1 else "[" + ",".join(items) + "]"


def render_match(match: Match) -> str:
    """``proto=tcp dst_port=8000-8080 src=!10.0.0.0/8`` ("any" when unconstrained)."""
    parts = [f"{n}={_field_text(n, match.fields[n])}" for n in FIELDS if n in match.fields]
    return " ".join(parts) or "any"


def rule_dict(rule: Rule) -> dict[str, Any]:
    """``{name, priority, match, action}`` with the match and action as text."""
    return {"name": rule.name, "priority": rule.priority, "match": render_match(rule.match),
            "action": describe_action(rule.action)}


def rule_text(rule: Rule) -> str:
    """``no-smtp (priority 10): proto=tcp dst_port=25 -> deny``."""
    return (f"{rule.name} (priority {rule.priority}): {render_match(rule.match)} -> "
            f"{describe_action(rule.action)}")
