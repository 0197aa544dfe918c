"""Policy files: YAML text -> a validated, frozen `appliance.model.Policy`.

This is the only module that knows the file format (config/examples/policy.yaml shows all of
it). A policy is checked in three passes so that one run reports every problem to fix:

1. YAML parsing: syntax errors name line and column; duplicate keys are rejected, because
   PyYAML would otherwise silently keep the last one.
2. Shape and values, by pydantic models: unknown keys are rejected (a typo must never be a
   silently ignored rule) and types are strict; match fields become `FieldSet`s right there.
3. Cross references (unique names, interfaces, MACs, IPs, rule priorities; ports' layers
   exist). These run on the raw document, so they are reported even when pass 2 failed
   somewhere else in the file.

Each error is one line ``FILE: PATH: REASON``; PATH follows the YAML structure, e.g.
``layers[2].outbound[0].match.dst_port``.
"""

import hashlib
import inspect
import ipaddress
import re
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import (
    TYPE_CHECKING,
    Annotated,
    Any,
    ClassVar,
    Final,
    Literal,
    Self,
    TypeAlias,
    get_args,
)

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    PlainValidator,
    ValidationError,
    model_validator,
)

from appliance.model import (
    FIELDS,
    PROTO_NUMBERS,
    Action,
    Allow,
    Count,
    Decap,
    Deny,
    Dnat,
    Encap,
    FieldSet,
    Layer,
    Match,
    Meter,
    Policy,
    Port,
    Rule,
    Snat,
    cidr_to_interval,
    int_to_ip,
    int_to_mac,
    ip_to_int,
    is_ipv4,
    mac_to_int,
)

SUPPORTED_VERSION: Final = 1
DEFAULT_GATEWAY_MAC: Final = "02:00:00:00:00:fe"
VXLAN_PORT: Final = 4789
PRIORITY_MAX: Final = 2**31 - 1
IFNAMSIZ: Final = 16  # Linux interface names are at most IFNAMSIZ - 1 bytes
BARE_ACTIONS: Final = ("allow", "deny", "count", "decap")
MAPPING_ACTIONS: Final = ("snat", "dnat", "encap", "meter")
DEFAULT_ACTIONS: Final = ("allow", "deny")
ACTION_HINT: Final = (
    "allow, deny, count, decap, or a mapping with one key: snat, dnat, encap, meter"
)
PROTO_ORDER: Final = ("tcp", "udp", "icmp", "icmpv6")  # the order error messages list them in
L4_PROTOS: Final = (PROTO_NUMBERS["tcp"], PROTO_NUMBERS["udp"])
METER_BURST_DIVISOR: Final = 10  # default pps bucket: 100 ms worth of packets
METER_BURST_BYTES_DIVISOR: Final = 80  # default bps bucket: 100 ms worth of bytes (bits / 8 / 10)
METER_MIN_BURST_BYTES: Final = 1500  # a bucket smaller than one full frame would drop it always

_MAC_RE: Final = re.compile(r"[0-9a-fA-F]{2}([:-][0-9a-fA-F]{2}){5}")
_NUMBER_RE: Final = re.compile(r"[0-9]+")
_RANGE_RE: Final = re.compile(r"([0-9]+)\s*-\s*([0-9]+)")
_MERGE_TAG: Final = "tag:yaml.org,2002:merge"

Loc: TypeAlias = tuple[str | int, ...]
Problem: TypeAlias = tuple[Loc, str]  # where in the document, and what is wrong there
Interval: TypeAlias = tuple[int, int]


class ConfigError(Exception):
    """A policy file is unusable; `errors` holds every problem found, one ``FILE: PATH: REASON``
    line each, so a caller can show them all instead of making the user fix them one by one."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = list(errors)


# --- value parsers: plain functions raising ValueError with the message a user should read ---


def _show(value: object) -> str:
    """Render a YAML value for an error message the way the user wrote it, roughly."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)


def _split_negation(text: str) -> tuple[bool, str]:
    """``"!x"`` -> (True, "x"); the ``!`` must be quoted in YAML, where it starts a tag."""
    text = text.strip()
    if text.startswith("!"):
        return True, text[1:].strip()
    return False, text


@dataclass(frozen=True, slots=True)
class _Domain:
    """The integer range of one match field plus the words its error messages use."""

    noun: str  # "a port", completing "70000 is not ..."
    lo: int
    hi: int
    names: Mapping[str, int] = field(default_factory=dict)

    @property
    def hint(self) -> str:
        """What would have been accepted, e.g. ``(0-65535)``."""
        span = f"{self.lo}-{self.hi}"
        return f"({', '.join(self.names)} or {span})" if self.names else f"({span})"

    def check(self, value: int) -> int:
        """`value` if inside the domain; otherwise the user's mistake, in words."""
        if not self.lo <= value <= self.hi:
            raise ValueError(f"{value} is not {self.noun} {self.hint}")
        return value


PORT_DOMAIN: Final = _Domain("a port", 0, 65535)
PROTO_DOMAIN: Final = _Domain("a protocol", 0, 255, {p: PROTO_NUMBERS[p] for p in PROTO_ORDER})
DSCP_DOMAIN: Final = _Domain("a DSCP value", 0, 63)
VLAN_DOMAIN: Final = _Domain("a VLAN id", 0, 4095)
VNI_DOMAIN: Final = _Domain("a VNI", 0, 2**24 - 1)
L4_PORT_DOMAIN: Final = _Domain("a port", 1, 65535)  # rewrite targets: port 0 is not usable
PRIORITY_DOMAIN: Final = _Domain("a priority", 0, PRIORITY_MAX)


def _int_item(domain: _Domain, item: object) -> tuple[bool, Interval]:
    """One item of an integer match field -> (negated, interval).

    Accepts an int, ``"a-b"``, a name from the domain (``tcp``), and ``"!..."`` for any string.
    """
    if isinstance(item, int) and not isinstance(item, bool):
        return False, (domain.check(item), item)
    if not isinstance(item, str):
        raise ValueError(f"{_show(item)} is not {domain.noun} {domain.hint}")
    negated, body = _split_negation(item)
    if body.lower() in domain.names:
        number = domain.names[body.lower()]
        return negated, (number, number)
    if _NUMBER_RE.fullmatch(body):
        number = domain.check(int(body))
        return negated, (number, number)
    if span := _RANGE_RE.fullmatch(body):
        lo, hi = (domain.check(int(bound)) for bound in span.groups())
        if lo > hi:
            raise ValueError(f"{item!r} is an empty range ({lo} > {hi})")
        return negated, (lo, hi)
    raise ValueError(f"{item!r} is not {domain.noun} {domain.hint}")


def _cidr(text: str) -> Interval:
    """A CIDR or single address -> interval; host bits set is an error since it hides typos."""
    try:
        ipaddress.ip_network(text, strict=True)
    except ValueError:
        try:
            net = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ValueError(f"{text!r} is not an IP address or CIDR") from None
        raise ValueError(f"host bits set in {text}; did you mean {net}?") from None
    return cidr_to_interval(text)


def _ip_item(item: object) -> tuple[bool, Interval]:
    """One item of ``src``/``dst`` -> (negated, interval in the shared address space)."""
    if not isinstance(item, str):
        raise ValueError(f"{_show(item)} is not an IP address or CIDR")
    negated, body = _split_negation(item)
    return negated, _cidr(body)


def _mac(value: object) -> int:
    """A MAC string -> 48-bit int. YAML 1.1 reads some unquoted MACs as numbers: say so."""
    if isinstance(value, int) and not isinstance(value, bool):
        raise ValueError(f"{value} is a number, not a MAC address; quote MACs in YAML")
    if not isinstance(value, str) or not _MAC_RE.fullmatch(value.strip()):
        raise ValueError(f"{_show(value)} is not a MAC address (like 02:00:00:00:00:01)")
    return mac_to_int(value.strip())


def _unicast_mac(value: object) -> int:
    """A MAC the switch sends from or to: group or all-zero addresses would break forwarding."""
    mac = _mac(value)
    if mac == 0:
        raise ValueError("00:00:00:00:00:00 is not a usable MAC address")
    if mac & (1 << 40):
        raise ValueError(f"{int_to_mac(mac)} is a multicast MAC; a unicast one is needed here")
    return mac


def _mac_item(item: object) -> tuple[bool, Interval]:
    """One item of ``src_mac``/``dst_mac`` -> (negated, single-value interval)."""
    if isinstance(item, str):
        negated, body = _split_negation(item)
        mac = _mac(body)
        return negated, (mac, mac)
    mac = _mac(item)
    return False, (mac, mac)


def _address(value: object) -> int:
    """A single IP address (no prefix) -> shared address space.

    An IPv4-mapped/compatible IPv6 address is refused: packets carrying one are dropped before
    policy (appliance.guard), so a port, NAT or tunnel address of that form could never work.
    """
    if not isinstance(value, str):
        raise ValueError(f"{_show(value)} is not an IP address")
    try:
        addr = ipaddress.ip_address(value.strip())
    except ValueError:
        if "/" in value:
            raise ValueError(
                f"{value!r} is not an IP address (a CIDR is not allowed here)"
            ) from None
        raise ValueError(f"{value!r} is not an IP address") from None
    v4 = getattr(addr, "ipv4_mapped", None) or (
        addr.version == 6 and int(addr) >> 32 == 0 and int(addr) > 1 and addr)
    if v4:
        raise ValueError(f"{value!r} is an IPv4-mapped/compatible IPv6 address, never used on "
                         f"the wire; write the IPv4 address")
    return ip_to_int(addr)


def _field_set(parse_item: Callable[[object], tuple[bool, Interval]], value: object) -> FieldSet:
    """A scalar or list of items -> FieldSet; reports every bad item, not just the first."""
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ValueError("empty list; omit the field to match anything")
    pos: list[Interval] = []
    neg: list[Interval] = []
    problems: list[str] = []
    for item in items:
        try:
            negated, interval = parse_item(item)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        (neg if negated else pos).append(interval)
    if problems:
        raise ValueError("; ".join(problems))
    return FieldSet(tuple(pos), tuple(neg))


def _non_empty(text: str) -> str:
    """Names identify things in logs and CLIs; an empty one identifies nothing."""
    if not text.strip():
        raise ValueError("must not be empty")
    return text


def _ifname(text: str) -> str:
    """Linux's own rule for netdev names (dev_valid_name), so typos fail here, not at attach."""
    if not text or len(text) >= IFNAMSIZ or text in (".", "..") or re.search(r"[/:\s]", text):
        raise ValueError(
            f"{text!r} is not an interface name (1-{IFNAMSIZ - 1} characters, no '/', ':' "
            "or whitespace)"
        )
    return text


def _version(value: int) -> int:
    """Only one format exists; refusing others beats misreading them."""
    if value != SUPPORTED_VERSION:
        raise ValueError(f"version {value} is not supported (only {SUPPORTED_VERSION})")
    return value


def _positive(value: int) -> int:
    """Meter rates and buckets of zero would drop everything; that is what `deny` is for."""
    if value <= 0:
        raise ValueError(f"{value} is not a positive integer")
    return value


def _default_word(word: str) -> str:
    """A layer's default may only pass or drop; anything else needs a rule."""
    if word not in DEFAULT_ACTIONS:
        raise ValueError(f"{word!r} is not a default action (allow or deny)")
    return word


def _default_for_both(value: object) -> object:
    """``default: deny`` is shorthand for the same default in both directions."""
    if isinstance(value, str):
        word = _default_word(value)
        return {"outbound": word, "inbound": word}
    return value


def _match_field(parse_item: Callable[[object], tuple[bool, Interval]]) -> Any:
    """The annotation of one match field: anything in, a FieldSet out (None when omitted)."""
    return Annotated[FieldSet | None, PlainValidator(partial(_field_set, parse_item))]


if TYPE_CHECKING:  # what the annotations hold once validated (mypy cannot run the factory)
    IpSet: TypeAlias = FieldSet | None
    PortSet: TypeAlias = FieldSet | None
    ProtoSet: TypeAlias = FieldSet | None
    DscpSet: TypeAlias = FieldSet | None
    VlanSet: TypeAlias = FieldSet | None
    VniSet: TypeAlias = FieldSet | None
    MacSet: TypeAlias = FieldSet | None
else:
    IpSet = _match_field(_ip_item)
    PortSet = _match_field(partial(_int_item, PORT_DOMAIN))
    ProtoSet = _match_field(partial(_int_item, PROTO_DOMAIN))
    DscpSet = _match_field(partial(_int_item, DSCP_DOMAIN))
    VlanSet = _match_field(partial(_int_item, VLAN_DOMAIN))
    VniSet = _match_field(partial(_int_item, VNI_DOMAIN))
    MacSet = _match_field(_mac_item)

Name = Annotated[str, AfterValidator(_non_empty)]
IfName = Annotated[str, AfterValidator(_ifname)]
MacAddr = Annotated[int, PlainValidator(_unicast_mac)]
def _cidr_list(value: object) -> tuple[Interval, ...]:
    """A list of CIDRs (no negations): the extra sources a port may use."""
    if not isinstance(value, list):
        raise ValueError(f"expected a list of CIDRs, got {_show(value)}")
    out: list[Interval] = []
    problems: list[str] = []
    for item in value:
        try:
            if not isinstance(item, str):
                raise ValueError(f"{_show(item)} is not an IP address or CIDR")
            if item.strip().startswith("!"):
                raise ValueError(f"{item!r}: negations are not allowed here")
            out.append(_cidr(item.strip()))
        except ValueError as exc:
            problems.append(str(exc))
    if problems:
        raise ValueError("; ".join(problems))
    return tuple(out)


CidrList = Annotated[tuple[Interval, ...], PlainValidator(_cidr_list)]
IpAddr = Annotated[int, PlainValidator(_address)]
L4Port = Annotated[int, AfterValidator(L4_PORT_DOMAIN.check)]
Vni = Annotated[int, AfterValidator(VNI_DOMAIN.check)]
Priority = Annotated[int, AfterValidator(PRIORITY_DOMAIN.check)]
Positive = Annotated[int, AfterValidator(_positive)]
DefaultWord = Annotated[str, AfterValidator(_default_word)]
Version = Annotated[int, AfterValidator(_version)]


# --- the file format, as pydantic models; each converts itself into the model.py object ---


class _Spec(BaseModel):
    """Base of the file-format models: strict types and no unknown keys, because a typo in a
    policy must fail loudly instead of becoming a rule that silently matches something else."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    HIDDEN_KEYS: ClassVar[frozenset[str]] = frozenset()  # internal fields users never write

    @classmethod
    def allowed_keys(cls) -> list[str]:
        """The keys a user may write here, for 'unknown key' messages."""
        return [key for key in cls.model_fields if key not in cls.HIDDEN_KEYS]


class MatchSpec(_Spec):
    """``match:``; every field is optional and an omitted one matches anything."""

    src: IpSet = None
    dst: IpSet = None
    src_port: PortSet = None
    dst_port: PortSet = None
    proto: ProtoSet = None
    dscp: DscpSet = None
    src_mac: MacSet = None
    dst_mac: MacSet = None
    vlan: VlanSet = None
    vni: VniSet = None

    @model_validator(mode="after")
    def _ports_need_tcp_or_udp(self) -> Self:
        """Port conditions with a proto that has no ports would be a rule that never fires."""
        ports = [name for name in ("src_port", "dst_port") if getattr(self, name) is not None]
        if self.proto is None or not ports:
            return self
        if any(self.proto.contains(number) for number in L4_PROTOS):
            return self
        verb = "need" if len(ports) > 1 else "needs"
        raise ValueError(f"{' and '.join(ports)} {verb} proto tcp or udp, but proto allows neither")

    def to_match(self) -> Match:
        """Only constrained fields go into `Match.fields`; absence means wildcard."""
        return Match({name: fs for name in FIELDS if (fs := getattr(self, name)) is not None})


class SnatSpec(_Spec):
    """``snat: {ip, port?}``."""

    ip: IpAddr
    port: L4Port | None = None

    def to_action(self) -> Action:
        return Snat(ip=self.ip, port=self.port)


class DnatSpec(_Spec):
    """``dnat: {ip, port?}``."""

    ip: IpAddr
    port: L4Port | None = None

    def to_action(self) -> Action:
        return Dnat(ip=self.ip, port=self.port)


class VxlanSpec(_Spec):
    """``vxlan: {vni, local, remote, dst_port?, src_mac?, dst_mac?}``."""

    vni: Vni
    local: IpAddr
    remote: IpAddr
    dst_port: L4Port = VXLAN_PORT
    src_mac: MacAddr | None = None
    dst_mac: MacAddr | None = None

    @model_validator(mode="after")
    def _same_family(self) -> Self:
        """An outer header has one IP version; mixed endpoints cannot be encoded."""
        if is_ipv4(self.local) != is_ipv4(self.remote):
            raise ValueError(
                f"local {int_to_ip(self.local)} and remote {int_to_ip(self.remote)} are "
                "different IP versions"
            )
        return self


class EncapSpec(_Spec):
    """``encap: {vxlan: {...}}``; VXLAN is the only tunnel type so far."""

    vxlan: VxlanSpec

    def to_action(self) -> Action:
        v = self.vxlan
        return Encap(v.vni, v.local, v.remote, v.dst_port, v.src_mac, v.dst_mac)


class MeterSpec(_Spec):
    """``meter: {pps?, bps?, burst?, burst_bytes?}``."""

    pps: Positive | None = None
    bps: Positive | None = None
    burst: Positive | None = None
    burst_bytes: Positive | None = None

    @model_validator(mode="after")
    def _rates_and_buckets(self) -> Self:
        """A bucket without its rate would be silently ignored, so it is refused instead."""
        if self.pps is None and self.bps is None:
            raise ValueError("a meter needs pps or bps (or both)")
        if self.burst is not None and self.pps is None:
            raise ValueError("burst is in packets and needs pps")
        if self.burst_bytes is not None and self.bps is None:
            raise ValueError("burst_bytes is in bytes and needs bps")
        return self

    def to_action(self) -> Action:
        """Fill in default buckets of about 100 ms at the configured rate."""
        burst = self.burst or (max(1, self.pps // METER_BURST_DIVISOR) if self.pps else 0)
        burst_bytes = self.burst_bytes or (
            max(METER_MIN_BURST_BYTES, self.bps // METER_BURST_BYTES_DIVISOR) if self.bps else 0
        )
        return Meter(pps=self.pps, bps=self.bps, burst=burst, burst_bytes=burst_bytes)


# Constructors, not instances: every rule gets its own action object, so nothing keyed by
# identity (counters, offload handles) can ever be shared between rules by accident.
_BARE: Final[dict[str, Callable[[], Action]]] = {
    "allow": Allow,
    "deny": Deny,
    "count": Count,
    "decap": Decap,
}


class ActionSpec(_Spec):
    """``action:``: a bare word, or a mapping with exactly one of snat/dnat/encap/meter.

    A bare word is stored in the hidden `word` field so that both spellings share one model
    and nested errors keep their YAML paths (``action.snat.ip``).
    """

    HIDDEN_KEYS: ClassVar[frozenset[str]] = frozenset({"word"})

    word: Literal["allow", "deny", "count", "decap"] | None = None
    snat: SnatSpec | None = None
    dnat: DnatSpec | None = None
    encap: EncapSpec | None = None
    meter: MeterSpec | None = None

    @model_validator(mode="before")
    @classmethod
    def _word_or_one_key(cls, data: object) -> object:
        """Turn a bare word into ``{word: ...}`` and insist on one key in a mapping."""
        if isinstance(data, str):
            if data not in BARE_ACTIONS:
                raise ValueError(f"{data!r} is not an action ({ACTION_HINT})")
            return {"word": data}
        if not isinstance(data, dict):
            raise ValueError(f"{_show(data)} is not an action ({ACTION_HINT})")
        if len(data) != 1:
            got = ", ".join(map(str, data)) or "none"
            raise ValueError(
                f"an action mapping needs exactly one key ({', '.join(MAPPING_ACTIONS)}); got {got}"
            )
        ((key, value),) = data.items()
        if key == "word":
            raise ValueError(f"unknown key 'word' (allowed: {', '.join(MAPPING_ACTIONS)})")
        if key in MAPPING_ACTIONS and value is None:
            raise ValueError(f"{key} needs its settings as a mapping, got null")
        return data

    def to_action(self) -> Action:
        """The one action this spec describes."""
        if self.word is not None:
            return _BARE[self.word]()
        nested = self.snat or self.dnat or self.encap or self.meter
        assert nested is not None  # guaranteed by _word_or_one_key
        return nested.to_action()


class RuleSpec(_Spec):
    """One rule of a layer direction; ``match`` may be omitted to match everything."""

    name: Name
    priority: Priority
    match: MatchSpec = MatchSpec()
    action: ActionSpec

    def to_rule(self) -> Rule:
        return Rule(self.name, self.priority, self.match.to_match(), self.action.to_action())


class DefaultSpec(_Spec):
    """``default: {outbound, inbound}``; each direction defaults to allow."""

    outbound: DefaultWord = "allow"
    inbound: DefaultWord = "allow"


def _default_action(word: str) -> Action:
    return Allow() if word == "allow" else Deny()


def _sorted_rules(rules: Iterable[RuleSpec]) -> tuple[Rule, ...]:
    """Classifiers expect ascending priority (priorities are unique per direction)."""
    return tuple(sorted((r.to_rule() for r in rules), key=lambda rule: rule.priority))


class LayerSpec(_Spec):
    """One layer: its state mode, defaults and the two rule lists."""

    name: Name
    stateful: bool = False
    default: Annotated[DefaultSpec, BeforeValidator(_default_for_both)] = DefaultSpec()
    outbound: list[RuleSpec] = []
    inbound: list[RuleSpec] = []

    def to_layer(self) -> Layer:
        return Layer(
            name=self.name,
            stateful=self.stateful,
            default_out=_default_action(self.default.outbound),
            default_in=_default_action(self.default.inbound),
            outbound=_sorted_rules(self.outbound),
            inbound=_sorted_rules(self.inbound),
        )


class PortSpec(_Spec):
    """One VM port; ``layers`` runs top (VM side) to bottom (wire side)."""

    name: Name
    interface: IfName
    mac: MacAddr
    ips: list[IpAddr] = []
    layers: list[Name] = []
    port_security: bool = True
    allowed_sources: CidrList = ()
    trunk: VlanSet = None
    steer_by_mac: bool = False

    def to_port(self) -> Port:
        return Port(self.name, self.interface, self.mac, tuple(self.ips), tuple(self.layers),
                    self.port_security, self.allowed_sources, self.trunk, self.steer_by_mac)


class PolicySpec(_Spec):
    """The whole file."""

    version: Version
    uplink: IfName
    gateway_mac: MacAddr = mac_to_int(DEFAULT_GATEWAY_MAC)
    uplink_mac: MacAddr | None = None
    next_hop_mac: MacAddr | None = None
    ports: list[PortSpec] = []
    layers: list[LayerSpec] = []

    def to_policy(self, source: str, digest: str) -> Policy:
        return Policy(
            version=self.version,
            uplink=self.uplink,
            ports=tuple(p.to_port() for p in self.ports),
            layers={layer.name: layer.to_layer() for layer in self.layers},
            gateway_mac=self.gateway_mac,
            uplink_mac=self.uplink_mac,
            next_hop_mac=self.next_hop_mac,
            source=source,
            digest=digest,
        )


# --- pydantic errors -> human lines ---

_TYPE_MESSAGES: Final = {
    "string_type": "expected a string, got {}",
    "int_type": "expected an integer, got {}",
    "bool_type": "expected true or false, got {}",
    "list_type": "expected a list, got {}",
    "model_type": "expected a mapping, got {}",
    "dict_type": "expected a mapping, got {}",
    "invalid_key": "keys must be strings, got {}",
}


def format_path(loc: Loc) -> str:
    """``("layers", 2, "outbound", 0)`` -> ``layers[2].outbound[0]``."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path


def _spec_in(annotation: object) -> type[_Spec] | None:
    """The model class inside an annotation such as ``list[RuleSpec]`` or ``X | None``."""
    if inspect.isclass(annotation) and issubclass(annotation, _Spec):
        return annotation
    for arg in get_args(annotation):
        if found := _spec_in(arg):
            return found
    return None


def _spec_at(loc: Loc) -> type[_Spec] | None:
    """The model that validated the mapping at `loc`, to list its keys in messages."""
    spec: type[_Spec] | None = PolicySpec
    for part in loc:
        if isinstance(part, int):
            continue
        if spec is None or part not in spec.model_fields:
            return None
        spec = _spec_in(spec.model_fields[part].annotation)
    return spec


def _unknown_key(loc: Loc) -> str:
    """'unknown key' plus the keys that would have been accepted there."""
    spec = _spec_at(loc[:-1])
    allowed = f" (allowed: {', '.join(spec.allowed_keys())})" if spec else ""
    return f"unknown key {loc[-1]!r}{allowed}"


def _describe(error: Mapping[str, Any]) -> Problem:
    """One pydantic error -> (loc, message in the file's own terms)."""
    loc: Loc = tuple(error["loc"])
    kind = error["type"]
    if kind == "missing":
        return loc, "required key missing"
    if kind == "extra_forbidden":
        return loc, _unknown_key(loc)
    if kind == "value_error":
        return loc, str(error["ctx"]["error"])
    if template := _TYPE_MESSAGES.get(kind):
        return loc, template.format(_show(error.get("input")))
    return loc, str(error["msg"])


# --- cross-reference checks on the raw document (they must not depend on pass 2 succeeding) ---


def _mappings(container: Mapping[str, Any], key: str, loc: Loc = ()) -> list[tuple[Loc, dict]]:
    """The mapping items of the list at `container[key]`; pass 2 reports anything else."""
    items = container.get(key)
    if not isinstance(items, list):
        return []
    return [((*loc, key, i), item) for i, item in enumerate(items) if isinstance(item, dict)]


def _attempt(parse: Callable[[object], int], value: object) -> int | None:
    """`parse(value)`, or None when invalid (pass 2 already reports why)."""
    try:
        return parse(value)
    except ValueError:
        return None


def _duplicates(claims: Iterable[tuple[Loc, Hashable, str, str]]) -> list[Problem]:
    """Flag every claim whose key an earlier claim holds.

    A claim is ``(loc, key, what, owner)``: `what` names the value in the message
    ("MAC 02:00:00:00:00:01"), `owner` names the claimer when a later one collides with it.
    """
    seen: dict[Hashable, str] = {}
    problems: list[Problem] = []
    for loc, key, what, owner in claims:
        if key in seen:
            problems.append((loc, f"{what} already used by {seen[key]}"))
        else:
            seen[key] = owner
    return problems


def _port_owner(loc: Loc, port: Mapping[str, Any]) -> str:
    name = port.get("name")
    return f"port {name!r}" if isinstance(name, str) else format_path(loc)


def _name_claims(entries: list[tuple[Loc, dict]], noun: str) -> Iterator:
    for loc, entry in entries:
        if isinstance(name := entry.get("name"), str):
            yield (*loc, "name"), name, f"{noun} name {name!r}", format_path(loc)


def _interface_claims(doc: Mapping[str, Any], ports: list[tuple[Loc, dict]]) -> Iterator:
    """The uplink claims its netdev first: a port on it would loop the wire into a VM."""
    if isinstance(uplink := doc.get("uplink"), str):
        yield ("uplink",), uplink, f"interface {uplink!r}", "uplink"
    for loc, port in ports:
        if isinstance(iface := port.get("interface"), str):
            yield (*loc, "interface"), iface, f"interface {iface!r}", _port_owner(loc, port)


def _mac_claims(doc: Mapping[str, Any], ports: list[tuple[Loc, dict]]) -> Iterator:
    """The gateway MAC claims first: a port using it would steal the switch's ARP replies."""
    gateway = _attempt(_mac, doc.get("gateway_mac", DEFAULT_GATEWAY_MAC))
    if gateway is not None:
        yield ("gateway_mac",), gateway, f"MAC {int_to_mac(gateway)}", "gateway_mac"
    for loc, port in ports:
        if (mac := _attempt(_mac, port.get("mac"))) is not None:
            yield (*loc, "mac"), mac, f"MAC {int_to_mac(mac)}", _port_owner(loc, port)


def _ip_claims(ports: list[tuple[Loc, dict]]) -> Iterator:
    """An address on two ports would make delivery to it ambiguous."""
    for loc, port in ports:
        ips = port.get("ips")
        for i, text in enumerate(ips if isinstance(ips, list) else []):
            if (ip := _attempt(_address, text)) is not None:
                yield (*loc, "ips", i), ip, f"IP {int_to_ip(ip)}", _port_owner(loc, port)


def _port_layer_problems(
    ports: list[tuple[Loc, dict]], layers: list[tuple[Loc, dict]]
) -> list[Problem]:
    """Each port's layer list must name defined layers, each at most once."""
    defined = [name for _, layer in layers if isinstance(name := layer.get("name"), str)]
    hint = f"defined: {', '.join(defined)}" if defined else "no layers are defined"
    problems: list[Problem] = []
    for loc, port in ports:
        refs = port.get("layers")
        seen: set[str] = set()
        for i, ref in enumerate(refs if isinstance(refs, list) else []):
            if not isinstance(ref, str):
                continue
            if ref not in defined:
                problems.append(((*loc, "layers", i), f"no layer named {ref!r} ({hint})"))
            elif ref in seen:
                problems.append(((*loc, "layers", i), f"layer {ref!r} is listed twice"))
            seen.add(ref)
    return problems


def _rule_problems(layers: list[tuple[Loc, dict]]) -> list[Problem]:
    """Within one layer and direction, names and priorities are unique: a tie in priority
    would make the winner depend on file order, which nobody reads as intended."""
    problems: list[Problem] = []
    for layer_loc, layer in layers:
        for direction in ("outbound", "inbound"):
            rules = _mappings(layer, direction, layer_loc)
            problems += _duplicates(
                ((*loc, "name"), name, f"rule name {name!r}", format_path(loc))
                for loc, rule in rules
                if isinstance(name := rule.get("name"), str)
            )
            problems += _duplicates(
                ((*loc, "priority"), prio, f"priority {prio}", _rule_owner(loc, rule))
                for loc, rule in rules
                if isinstance(prio := rule.get("priority"), int) and not isinstance(prio, bool)
            )
    return problems


def _rule_owner(loc: Loc, rule: Mapping[str, Any]) -> str:
    name = rule.get("name")
    return f"rule {name!r}" if isinstance(name, str) else format_path(loc)


def _cross_reference_problems(doc: Mapping[str, Any]) -> list[Problem]:
    """Everything that relates one part of the file to another."""
    ports = _mappings(doc, "ports")
    layers = _mappings(doc, "layers")
    return [
        *_duplicates(_name_claims(ports, "port")),
        *_duplicates(_interface_claims(doc, ports)),
        *_duplicates(_mac_claims(doc, ports)),
        *_duplicates(_ip_claims(ports)),
        *_duplicates(_name_claims(layers, "layer")),
        *_port_layer_problems(ports, layers),
        *_rule_problems(layers),
    ]


# --- YAML ---


class _NoDuplicateKeys:
    """Loader mixin that refuses duplicate keys instead of silently keeping the last one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[Hashable] = set()
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue  # '<<' merges may legitimately be overridden
            key = self.construct_object(key_node, deep=True)  # type: ignore[attr-defined]
            if isinstance(key, Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            if isinstance(key, Hashable):
                seen.add(key)
        return super().construct_mapping(node, deep)  # type: ignore[misc]


class _StrictLoader(_NoDuplicateKeys, yaml.SafeLoader):
    """The pure-Python parser: slower, but the clearest syntax error messages."""


if getattr(yaml, "__with_libyaml__", False):
    class _FastStrictLoader(_NoDuplicateKeys, yaml.CSafeLoader):
        """libyaml's parser (a 10k-rule policy: ~1.8 s in all instead of ~6 s); same checks."""
else:  # pragma: no cover - PyYAML built without libyaml
    _FastStrictLoader = _StrictLoader  # type: ignore[misc, assignment]


def _yaml_problem(exc: yaml.YAMLError, source: str) -> str:
    """A YAML error as one line naming line and column (1-based, as editors count)."""
    if not isinstance(exc, yaml.MarkedYAMLError) or exc.problem_mark is None:
        return f"{source}: invalid YAML: {' '.join(str(exc).split())}"  # always one line
    mark = exc.problem_mark
    problem = exc.problem or "syntax error"
    if "constructor for the tag '!" in problem:
        problem += ' (quote negations: "!...")'
    return f"{source}: line {mark.line + 1}, column {mark.column + 1}: invalid YAML: {problem}"


def _load_yaml(text: str, source: str) -> dict[str, Any]:
    """YAML text -> the top-level mapping, or ConfigError."""
    try:
        doc = yaml.load(text, Loader=_FastStrictLoader)
    except yaml.YAMLError:
        try:  # the pure-Python parser words syntax errors better: ask it for the message
            doc = yaml.load(text, Loader=_StrictLoader)
        except yaml.YAMLError as exc:
            raise ConfigError([_yaml_problem(exc, source)]) from None
    if not isinstance(doc, dict):
        got = "an empty document" if doc is None else _show(doc)
        raise ConfigError([f"{source}: top level: must be a mapping, got {got}"])
    return doc


# --- public API ---


def _build(text: str, source: str, digest: str) -> Policy:
    """The fast path when it is certain (appliance.fastyaml + appliance.policyfast: ~10x
    faster on large policies), else the passes below, which also word every error."""
    from appliance import fastyaml, policyfast

    doc = fastyaml.load(text)
    if doc is not None and (policy := policyfast.build(doc, source, digest)) is not None:
        return policy
    if doc is None:  # PyYAML's tree; a valid one still skips pydantic
        doc = _load_yaml(text, source)
        if (policy := policyfast.build(doc, source, digest)) is not None:
            return policy
    return _build_checked(text, source, digest)


def _build_checked(text: str, source: str, digest: str) -> Policy:
    """Run all passes, collect every problem, and convert only a fully valid document (the
    loader before the fast path; still what words every error)."""
    doc = _load_yaml(text, source)
    problems: list[Problem] = []
    spec: PolicySpec | None = None
    try:
        spec = PolicySpec.model_validate(doc)
    except ValidationError as exc:
        problems += [_describe(error) for error in exc.errors()]
    problems += _cross_reference_problems(doc)
    if problems:
        raise ConfigError([f"{source}: {format_path(loc)}: {reason}" for loc, reason in problems])
    assert spec is not None  # validation raised otherwise
    return spec.to_policy(source, digest)


def parse_policy(text: str, source: str = "<string>") -> Policy:
    """Validate policy YAML given as text; `source` names it in errors and in `Policy.source`.

    The digest is the sha256 of the UTF-8 text, so it equals `load_policy`'s for the same file.
    """
    return _build(text, source, hashlib.sha256(text.encode()).hexdigest())


def load_policy(path: str | Path) -> Policy:
    """Read and validate a policy file; ConfigError (never OSError) when that fails."""
    source = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError([f"{source}: cannot read: {exc.strerror or exc}"]) from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{source}: not UTF-8 text (byte {exc.start})"]) from None
    return _build(text, source, hashlib.sha256(data).hexdigest())
