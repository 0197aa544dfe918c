"""The policy model: ports -> layers -> rule sets -> rules, after validation.

These frozen objects are what the rest of appliance works with; `appliance.policy` builds them
from YAML and is the only place that knows the file format. Everything a classifier needs is an
integer here, so matching never parses strings on the packet path:

* IP addresses live in one 129-bit space with the families kept apart: IPv6 as its 128-bit
  value, IPv4 as ``IPV4_BASE + a.b.c.d`` (just above all of IPv6). A CIDR is one closed, aligned
  integer interval, a rule may list both families, and a prefix of one family can never match
  an address of the other: ``::/0`` is all of IPv6 and nothing of IPv4, and an IPv6 packet
  carrying an IPv4-mapped address (``::ffff:a.b.c.d``) is an IPv6 address like any other (the
  pipeline drops those before any rule sees them, see `appliance.guard`).
* MAC addresses are 48-bit integers; ports, protocol, DSCP, VLAN and VNI are plain integers.
* Every condition is a `FieldSet`: any-of positive intervals minus none-of negative intervals.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from dataclasses import dataclass, field
from typing import Final

IPV4_BASE: Final = 1 << 128  # IPv4 address a.b.c.d is IPV4_BASE | a.b.c.d
IPV4_TAG: Final = IPV4_BASE >> 32  # value >> 32 of every IPv4 address
IPV6_MAPPED_BASE: Final = 0xFFFF_0000_0000  # ::ffff:0:0/96, IPv4-mapped IPv6 (never on the wire)

# Order of the fields in a classifier lookup tuple (see `FIELDS`); `Fields` follows it too.
FIELDS: Final = (
    "src",
    "dst",
    "src_port",
    "dst_port",
    "proto",
    "dscp",
    "src_mac",
    "dst_mac",
    "vlan",
    "vni",
)

FIELD_INDEX: Final = {name: i for i, name in enumerate(FIELDS)}  # position in a lookup tuple

# Widths in bits of each field's integer space (used by classifiers and generators).
FIELD_BITS: Final = {
    "src": 129,
    "dst": 129,
    "src_port": 16,
    "dst_port": 16,
    "proto": 8,
    "dscp": 6,
    "src_mac": 48,
    "dst_mac": 48,
    "vlan": 12,
    "vni": 24,
}

PROTO_NUMBERS: Final = {"icmp": 1, "tcp": 6, "udp": 17, "icmpv6": 58}
PROTO_NAMES: Final = {v: k for k, v in PROTO_NUMBERS.items()}


def ip_to_int(addr: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> int:
    """Map an IPv4 or IPv6 address into the shared space (IPv4 -> ``IPV4_BASE | a.b.c.d``)."""
    a = ipaddress.ip_address(addr) if isinstance(addr, str) else addr
    if a.version == 4:
        return IPV4_BASE | int(a)
    return int(a)


def int_to_ip(value: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """Inverse of `ip_to_int`."""
    if value >> 32 == IPV4_TAG:
        return ipaddress.IPv4Address(value & 0xFFFF_FFFF)
    return ipaddress.IPv6Address(value)


def is_ipv4(value: int) -> bool:
    """True when an address value is an IPv4 one (False: IPv6)."""
    return value >> 32 == IPV4_TAG


_OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_PLAIN_IPV4_CIDR: Final = re.compile(
    rf"{_OCTET}\.{_OCTET}\.{_OCTET}\.{_OCTET}(?:/(3[0-2]|[0-2]?[0-9]))?", re.ASCII)


def plain_ipv4_cidr(text: str) -> tuple[int, int] | None:
    """``"a.b.c.d[/n]"`` -> (address, prefix length) when written the plain way, else None.

    Written by hand because policy loading spends a third of its time in `ipaddress` for
    10k-rule documents; it accepts exactly what `ipaddress` accepts in the plain decimal
    form (no leading zeros, octets <= 255, prefix 0-32 without sign or spaces) and leaves
    every other spelling to `ipaddress` (tests compare the two).
    """
    m = _PLAIN_IPV4_CIDR.fullmatch(text)
    if m is None:
        return None
    a, b, c, d, length = m.groups()
    value = int(a) << 24 | int(b) << 16 | int(c) << 8 | int(d)
    return value, 32 if length is None else int(length)


def ipv4_prefix_interval(value: int, length: int) -> tuple[int, int]:
    """IPv4 ``value/length`` (host bits ignored) -> closed interval in the shared space."""
    host = (1 << (32 - length)) - 1
    lo = IPV4_BASE | (value & ~host & 0xFFFF_FFFF)
    return lo, lo | host


def cidr_to_interval(text: str) -> tuple[int, int]:
    """``"10.0.0.0/8"`` -> closed interval in the shared address space (strict=False)."""
    plain = plain_ipv4_cidr(text)
    if plain is not None:
        return ipv4_prefix_interval(*plain)
    net = ipaddress.ip_network(text, strict=False)
    lo = ip_to_int(net.network_address)
    size = net.num_addresses
    return lo, lo + size - 1


def mac_to_int(text: str) -> int:
    """``"02:00:00:00:00:01"`` (or with ``-``) -> 48-bit integer; ValueError if malformed."""
    parts = text.replace("-", ":").split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"{text!r} is not a MAC address")
    return int("".join(parts), 16)


def int_to_mac(value: int) -> str:
    """48-bit integer -> ``"02:00:00:00:00:01"``."""
    return ":".join(f"{(value >> s) & 0xFF:02x}" for s in range(40, -8, -8))


@dataclass(frozen=True, slots=True)
class FieldSet:
    """One condition: value in any ``pos`` interval (or ``pos`` empty) and in no ``neg`` one.

    Intervals are closed ``(lo, hi)`` integer pairs. A packet that lacks the field (no L4
    ports on ICMP, no VNI outside a tunnel, ...) never matches a constrained field.
    """

    pos: tuple[tuple[int, int], ...] = ()
    neg: tuple[tuple[int, int], ...] = ()

    def contains(self, value: int | None) -> bool:
        """Reference semantics; classifiers must agree with this exactly."""
        if value is None:
            return False
        if self.pos and not any(lo <= value <= hi for lo, hi in self.pos):
            return False
        return not any(lo <= value <= hi for lo, hi in self.neg)


@dataclass(frozen=True, slots=True)
class Match:
    """Conditions of a rule; a field absent from ``fields`` is a wildcard."""

    fields: dict[str, FieldSet] = field(default_factory=dict)

    def matches(self, values: tuple) -> bool:
        """Reference matcher over a lookup tuple ordered like `FIELDS`."""
        for i, name in enumerate(FIELDS):
            fs = self.fields.get(name)
            if fs is not None and not fs.contains(values[i]):
                return False
        return True

    def __hash__(self) -> int:  # dicts are not hashable; rules are compared by identity anyway
        return hash(tuple(sorted((k, v) for k, v in self.fields.items())))


class ActionKind(enum.StrEnum):
    """Action kinds, as named in policy files and in NIC capability lists."""

    ALLOW = "allow"
    DENY = "deny"
    COUNT = "count"
    SNAT = "snat"
    DNAT = "dnat"
    ENCAP = "encap"
    DECAP = "decap"
    METER = "meter"


@dataclass(frozen=True, slots=True)
class Allow:
    kind: ActionKind = ActionKind.ALLOW


@dataclass(frozen=True, slots=True)
class Deny:
    kind: ActionKind = ActionKind.DENY


@dataclass(frozen=True, slots=True)
class Count:
    """Allow, and count matches on the rule's own counter."""

    kind: ActionKind = ActionKind.COUNT


@dataclass(frozen=True, slots=True)
class Snat:
    """Rewrite the source address (and port, if given); return traffic is translated back."""

    ip: int  # shared address space (see ip_to_int)
    port: int | None = None
    kind: ActionKind = ActionKind.SNAT


@dataclass(frozen=True, slots=True)
class Dnat:
    """Rewrite the destination address (and port, if given); replies are translated back."""

    ip: int
    port: int | None = None
    kind: ActionKind = ActionKind.DNAT


@dataclass(frozen=True, slots=True)
class Encap:
    """VXLAN encapsulation. Outer MACs default to the inner frame's MACs when not given."""

    vni: int
    local: int  # outer source IP, shared address space
    remote: int  # outer destination IP
    dst_port: int = 4789
    src_mac: int | None = None
    dst_mac: int | None = None
    kind: ActionKind = ActionKind.ENCAP


@dataclass(frozen=True, slots=True)
class Decap:
    kind: ActionKind = ActionKind.DECAP


@dataclass(frozen=True, slots=True)
class Meter:
    """Token-bucket policer; packets over the rate are dropped with reason ``meter``.

    ``burst`` is in packets (pps bucket); ``burst_bytes`` in bytes (bps bucket).
    """

    pps: int | None = None
    bps: int | None = None
    burst: int = 0
    burst_bytes: int = 0
    kind: ActionKind = ActionKind.METER


Action = Allow | Deny | Count | Snat | Dnat | Encap | Decap | Meter


class Direction(enum.StrEnum):
    OUT = "out"  # packets the port sends: its layers top to bottom
    IN = "in"  # packets for the port: its layers bottom to top


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    priority: int
    match: Match
    action: Action


@dataclass(frozen=True, slots=True)
class Layer:
    name: str
    stateful: bool
    default_out: Action  # Allow() or Deny()
    default_in: Action
    outbound: tuple[Rule, ...]  # sorted by ascending priority
    inbound: tuple[Rule, ...]

    def rules(self, direction: Direction) -> tuple[Rule, ...]:
        return self.outbound if direction is Direction.OUT else self.inbound

    def default(self, direction: Direction) -> Action:
        return self.default_out if direction is Direction.OUT else self.default_in


@dataclass(frozen=True, slots=True)
class Port:
    """A VM's port: who it is (MAC, addresses), what it may send, and its layers.

    With ``port_security`` (the default) the port may send only from ``mac`` and from ``ips``
    or ``allowed_sources``; frames it receives from the uplink are chosen by those addresses
    (``steer_by_mac`` adds: and by MAC, for a destination IP no port owns). ``trunk`` None is
    an access port (untagged frames only); otherwise the VLAN ids its frames may carry.
    """

    name: str
    interface: str
    mac: int
    ips: tuple[int, ...]  # shared address space
    layers: tuple[str, ...]  # top (VM side) to bottom (wire side)
    port_security: bool = True
    allowed_sources: tuple[tuple[int, int], ...] = ()  # extra source prefixes (intervals)
    trunk: FieldSet | None = None  # allowed VLAN ids; None: access port
    steer_by_mac: bool = False

    def owns_source(self, addr: int) -> bool:
        """May this port send from ``addr``? (Port security.)"""
        return addr in self.ips or any(lo <= addr <= hi for lo, hi in self.allowed_sources)

    def allows_vlan(self, vid: int | None) -> bool:
        """May a frame with this VLAN id (None: untagged) enter or leave through the port?"""
        return vid is None or (self.trunk is not None and self.trunk.contains(vid))


@dataclass(frozen=True, slots=True)
class Policy:
    """A whole validated policy file (the pipeline numbers activations: its generation)."""

    version: int
    uplink: str
    ports: tuple[Port, ...]
    layers: dict[str, Layer]
    gateway_mac: int  # answered to ARP/ND from ports for addresses that are not a port's
    uplink_mac: int | None = None  # source MAC of frames sent to the uplink (None: keep)
    next_hop_mac: int | None = None  # destination MAC of frames sent to the uplink (None: keep)
    source: str = "<memory>"  # file the policy came from
    digest: str = ""  # sha256 of the file's bytes

    def port(self, name: str) -> Port | None:
        for p in self.ports:
            if p.name == name:
                return p
        return None
