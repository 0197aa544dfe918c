"""The fast path of policy loading: a valid document -> `Policy`, or None at the first doubt.

`appliance.policy` validates with pydantic models and reports every problem of a document;
that costs ~40 us per rule, most of it pydantic's generic machinery, and fleet hosts pay it on
every put. Nearly every document a host sees is valid, so this module builds the model
directly from the YAML tree, checking exactly what the pydantic models and the cross-reference
pass check, and gives up (returns None) as soon as anything is off: then the pydantic path
runs as before and words the errors. Nothing here produces an error message, so every message
stays what it was.

The value parsers are shared with the pydantic path (`appliance.policy._int_item`,
``_ip_item`` -> `appliance.model.cidr_to_interval`, ``_mac``, ``_address``, ...), so a field
cannot mean one thing here and another there; tests/test_policyfast.py checks that both paths
build equal policies and that every document the pydantic path refuses is refused here too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from appliance import policy as spec
from appliance.model import (
    FIELDS,
    Action,
    Allow,
    Deny,
    Dnat,
    Encap,
    FieldSet,
    Layer,
    Match,
    Policy,
    Port,
    Rule,
    Snat,
    cidr_to_interval,
    int_to_ip,
    ip_to_int,
    ipv4_prefix_interval,
    is_ipv4,
    mac_to_int,
    plain_ipv4_cidr,
)

_POLICY_KEYS: Final = frozenset(spec.PolicySpec.model_fields)
_PORT_KEYS: Final = frozenset(spec.PortSpec.model_fields)
_LAYER_KEYS: Final = frozenset(spec.LayerSpec.model_fields)
_RULE_KEYS: Final = frozenset(spec.RuleSpec.model_fields)
_DEFAULT_KEYS: Final = frozenset(spec.DefaultSpec.model_fields)
_NAT_KEYS: Final = frozenset(spec.SnatSpec.model_fields)
_VXLAN_KEYS: Final = frozenset(spec.VxlanSpec.model_fields)
_METER_KEYS: Final = frozenset(spec.MeterSpec.model_fields)
_MATCH_KEYS: Final = frozenset(FIELDS)
def _ip_item(item: object) -> tuple[bool, tuple[int, int]]:
    """`appliance.policy._ip_item` for valid input, with one address parse instead of two:
    the interval comes from `cidr_to_interval`, and "no host bits" is the given address
    being the interval's first one (anything else: doubt, and the slow path explains)."""
    if type(item) is not str:
        raise _Doubt
    negated, body = spec._split_negation(item)
    if "%" in body:  # scoped IPv6 addresses: leave them to the full check
        raise _Doubt
    plain = plain_ipv4_cidr(body)
    if plain is not None:  # the plain IPv4 spelling: host bits are the given address's
        value, length = plain
        if value & ((1 << (32 - length)) - 1):
            raise _Doubt
        return negated, ipv4_prefix_interval(value, length)
    lo, hi = cidr_to_interval(body)
    address, slash, _ = body.partition("/")
    # a bare address has no host bits; a prefix written canonically is its network address
    if slash and str(int_to_ip(lo)) != address and ip_to_int(address) != lo:
        raise _Doubt
    return negated, (lo, hi)


_ITEM_PARSERS: Final[dict[str, Callable[[object], tuple[bool, tuple[int, int]]]]] = {
    "src": _ip_item,
    "dst": _ip_item,
    "src_port": lambda item: spec._int_item(spec.PORT_DOMAIN, item),
    "dst_port": lambda item: spec._int_item(spec.PORT_DOMAIN, item),
    "proto": lambda item: spec._int_item(spec.PROTO_DOMAIN, item),
    "dscp": lambda item: spec._int_item(spec.DSCP_DOMAIN, item),
    "src_mac": spec._mac_item,
    "dst_mac": spec._mac_item,
    "vlan": lambda item: spec._int_item(spec.VLAN_DOMAIN, item),
    "vni": lambda item: spec._int_item(spec.VNI_DOMAIN, item),
}
_BARE: Final[dict[str, Callable[[], Action]]] = spec._BARE
_DEFAULT_GATEWAY: Final = mac_to_int(spec.DEFAULT_GATEWAY_MAC)


class _Doubt(Exception):
    """Not certainly valid: leave it to the pydantic path."""


def _int(value: object, domain: spec._Domain | None = None) -> int:
    """A strict int (pydantic strict mode: no bools, no strings), inside ``domain``."""
    if type(value) is not int:
        raise _Doubt
    if domain is not None and not domain.lo <= value <= domain.hi:
        raise _Doubt
    return value


def _positive(value: object) -> int | None:
    if value is None:
        return None
    if _int(value) <= 0:
        raise _Doubt
    return value  # type: ignore[return-value]


def _name(value: object) -> str:
    if type(value) is not str or not value.strip():
        raise _Doubt
    return value


def _mapping(value: object, allowed: frozenset[str]) -> dict[str, Any]:
    if type(value) is not dict or not allowed.issuperset(value):
        raise _Doubt
    return value  # type: ignore[return-value]


def _list(value: object) -> list[Any]:
    if type(value) is not list:
        raise _Doubt
    return value  # type: ignore[return-value]


def _call(parse: Callable[[Any], Any], value: object) -> Any:
    try:
        return parse(value)
    except ValueError:
        raise _Doubt from None


def _mac_or_none(value: object) -> int | None:
    return None if value is None else _call(spec._unicast_mac, value)


class _Builder:
    """One document's conversion; caches parsed match values (ports, protocols and prefixes
    repeat across thousands of rules). Actions are never shared: each rule gets its own, as
    the pipeline keys SNAT port state on action identity."""

    def __init__(self) -> None:
        self.field_cache: dict[tuple[str, Any], FieldSet] = {}
        self.l4_protos: dict[int, bool] = {}  # id of a cached proto FieldSet -> has tcp/udp

    def field_set(self, name: str, value: object) -> FieldSet:
        # types in the key: 1 == True == 1.0 in a dict, but only 1 is a valid port
        if type(value) is list:
            key: tuple = (name, list, tuple((type(i), i) for i in value))
        else:
            key = (name, type(value), value)
        try:
            cached = self.field_cache.get(key)
        except TypeError:  # unhashable items (mappings): no cache, and surely invalid
            raise _Doubt from None
        if cached is None:
            parse = _ITEM_PARSERS[name]
            cached = _call(lambda v: spec._field_set(parse, v), value)
            self.field_cache[key] = cached
        return cached  # immutable, and nothing keys on a FieldSet's identity (actions: yes)

    def match(self, value: object) -> Match:
        raw = _mapping(value, _MATCH_KEYS)
        fields: dict[str, FieldSet] = {name: self.field_set(name, raw[name]) for name in FIELDS
                                       if name in raw}
        if ("src_port" in fields or "dst_port" in fields) and "proto" in fields:
            proto = fields["proto"]  # cached, so alive: its id is stable for this document
            l4 = self.l4_protos.get(id(proto))
            if l4 is None:
                l4 = self.l4_protos[id(proto)] = any(proto.contains(number)
                                                     for number in spec.L4_PROTOS)
            if not l4:
                raise _Doubt
        return Match(fields)

    def action(self, value: object) -> Action:
        if type(value) is str:
            if value not in spec.BARE_ACTIONS:
                raise _Doubt
            return _BARE[value]()
        if type(value) is not dict or len(value) != 1:
            raise _Doubt
        ((kind, body),) = value.items()
        if kind in ("snat", "dnat"):
            nat = _mapping(body, _NAT_KEYS)
            if "ip" not in nat:
                raise _Doubt
            ip = _call(spec._address, nat["ip"])
            port = nat.get("port")
            port = None if port is None else _int(port, spec.L4_PORT_DOMAIN)
            return Snat(ip=ip, port=port) if kind == "snat" else Dnat(ip=ip, port=port)
        if kind == "encap":
            vxlan = _mapping(_mapping(body, frozenset({"vxlan"})).get("vxlan"), _VXLAN_KEYS)
            if not {"vni", "local", "remote"} <= vxlan.keys():
                raise _Doubt
            local = _call(spec._address, vxlan["local"])
            remote = _call(spec._address, vxlan["remote"])
            if is_ipv4(local) != is_ipv4(remote):
                raise _Doubt
            return Encap(_int(vxlan["vni"], spec.VNI_DOMAIN), local, remote,
                         _int(vxlan.get("dst_port", spec.VXLAN_PORT), spec.L4_PORT_DOMAIN),
                         _mac_or_none(vxlan.get("src_mac")), _mac_or_none(vxlan.get("dst_mac")))
        if kind == "meter":
            m = _mapping(body, _METER_KEYS)
            pps, bps = _positive(m.get("pps")), _positive(m.get("bps"))
            burst, burst_bytes = _positive(m.get("burst")), _positive(m.get("burst_bytes"))
            if ((pps is None and bps is None) or (burst is not None and pps is None)
                    or (burst_bytes is not None and bps is None)):
                raise _Doubt
            return spec.MeterSpec.model_construct(
                pps=pps, bps=bps, burst=burst, burst_bytes=burst_bytes).to_action()
        raise _Doubt

    def rules(self, value: object) -> tuple[Rule, ...]:
        rules = []
        names: set[str] = set()
        priorities: set[int] = set()
        for raw in _list(value):
            r = _mapping(raw, _RULE_KEYS)
            if "name" not in r or "priority" not in r or "action" not in r:
                raise _Doubt
            name = _name(r["name"])
            priority = _int(r["priority"], spec.PRIORITY_DOMAIN)
            if name in names or priority in priorities:
                raise _Doubt
            names.add(name)
            priorities.add(priority)
            match = self.match(r["match"]) if "match" in r else Match({})
            rules.append(Rule(name, priority, match, self.action(r["action"])))
        rules.sort(key=lambda rule: rule.priority)
        return tuple(rules)

    def layer(self, value: object) -> Layer:
        raw = _mapping(value, _LAYER_KEYS)
        if "name" not in raw:
            raise _Doubt
        stateful = raw.get("stateful", False)
        if type(stateful) is not bool:
            raise _Doubt
        default = raw.get("default", {})
        if type(default) is str:
            default = {"outbound": default, "inbound": default}
        words = _mapping(default, _DEFAULT_KEYS)
        out_word, in_word = words.get("outbound", "allow"), words.get("inbound", "allow")
        if out_word not in spec.DEFAULT_ACTIONS or in_word not in spec.DEFAULT_ACTIONS:
            raise _Doubt
        return Layer(
            name=_name(raw["name"]),
            stateful=stateful,
            default_out=Allow() if out_word == "allow" else Deny(),
            default_in=Allow() if in_word == "allow" else Deny(),
            outbound=self.rules(raw.get("outbound", [])),
            inbound=self.rules(raw.get("inbound", [])),
        )

    def port(self, value: object) -> Port:
        raw = _mapping(value, _PORT_KEYS)
        if not {"name", "interface", "mac"} <= raw.keys():
            raise _Doubt
        if type(raw["interface"]) is not str:
            raise _Doubt
        port_security = raw.get("port_security", True)
        steer_by_mac = raw.get("steer_by_mac", False)
        if type(port_security) is not bool or type(steer_by_mac) is not bool:
            raise _Doubt
        trunk = raw.get("trunk")
        return Port(_name(raw["name"]), _call(spec._ifname, raw["interface"]),
                    _call(spec._unicast_mac, raw["mac"]),
                    tuple(_call(spec._address, ip) for ip in _list(raw.get("ips", []))),
                    tuple(_name(layer) for layer in _list(raw.get("layers", []))),
                    port_security,
                    _call(spec._cidr_list, raw["allowed_sources"])
                    if "allowed_sources" in raw else (),
                    None if trunk is None else self.field_set("vlan", trunk),
                    steer_by_mac)

    def policy(self, doc: dict[str, Any], source: str, digest: str) -> Policy:
        _mapping(doc, _POLICY_KEYS)
        if "version" not in doc or "uplink" not in doc:
            raise _Doubt
        if _int(doc["version"]) != spec.SUPPORTED_VERSION or type(doc["uplink"]) is not str:
            raise _Doubt
        uplink = _call(spec._ifname, doc["uplink"])
        gateway = _call(spec._unicast_mac, doc["gateway_mac"]) if "gateway_mac" in doc \
            else _DEFAULT_GATEWAY
        ports = tuple(self.port(p) for p in _list(doc.get("ports", [])))
        layers = [self.layer(layer) for layer in _list(doc.get("layers", []))]
        _unique(p.name for p in ports)
        _unique([uplink, *(p.interface for p in ports)])
        _unique([gateway, *(p.mac for p in ports)])
        _unique(ip for p in ports for ip in p.ips)
        _unique(layer.name for layer in layers)
        defined = {layer.name for layer in layers}
        for p in ports:
            if not defined.issuperset(p.layers):
                raise _Doubt
            _unique(p.layers)
        return Policy(
            version=spec.SUPPORTED_VERSION,
            uplink=uplink,
            ports=ports,
            layers={layer.name: layer for layer in layers},
            gateway_mac=gateway,
            uplink_mac=_mac_or_none(doc.get("uplink_mac")),
            next_hop_mac=_mac_or_none(doc.get("next_hop_mac")),
            source=source,
            digest=digest,
        )


def _unique(values: Any) -> None:
    seen: set[Any] = set()
    for value in values:
        if value in seen:
            raise _Doubt
        seen.add(value)


def build(doc: object, source: str, digest: str) -> Policy | None:
    """The policy of a document that is certainly valid; None when in doubt."""
    if type(doc) is not dict:
        return None
    try:
        return _Builder().policy(doc, source, digest)
    except (_Doubt, RecursionError):
        return None
