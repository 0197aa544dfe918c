"""Tests of appliance.policy (YAML -> Policy) and the appliance-check-config CLI.

Error cases are tables of small YAML documents with the exact line a user would read, since
those lines are the interface of a config checker.
"""

import hashlib
from pathlib import Path
from typing import Final

import pytest

from appliance.cli.check_config import main
from appliance.model import (
    Allow,
    Count,
    Decap,
    Deny,
    Dnat,
    Encap,
    FieldSet,
    Meter,
    Snat,
    cidr_to_interval,
    ip_to_int,
    mac_to_int,
)
from appliance.policy import ConfigError, load_policy, parse_policy

EXAMPLE: Final = Path(__file__).resolve().parent.parent / "config" / "examples" / "policy.yaml"
SRC: Final = "policy.yaml"
HEAD: Final = "version: 1\nuplink: up0\n"
PORT1: Final = '{name: vm1, interface: p1, mac: "02:00:00:00:00:01", ips: ["10.0.0.1"]}'


def rules(*lines: str, direction: str = "outbound") -> str:
    """A document with one layer 'a' holding `lines` as rules of `direction`."""
    body = "".join(f"      - {line}\n" for line in lines)
    return f"{HEAD}layers:\n  - name: a\n    {direction}:\n{body}"


def match(spec: str) -> str:
    """A document whose only rule has ``match: {spec}``."""
    return rules(f"{{name: r, priority: 1, match: {{{spec}}}, action: allow}}")


def action(spec: str) -> str:
    """A document whose only rule has ``action: spec``."""
    return rules(f"{{name: r, priority: 1, action: {spec}}}")


def ports(*lines: str, extra: str = "") -> str:
    """A document with `lines` as ports (and `extra` top-level YAML)."""
    return HEAD + extra + "ports:\n" + "".join(f"  - {line}\n" for line in lines)


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_policy(text, source=SRC)
    assert str(info.value) == "\n".join(info.value.errors)
    return info.value.errors


R0: Final = "policy.yaml: layers[0].outbound[0]"
MATCH_KEYS: Final = "src, dst, src_port, dst_port, proto, dscp, src_mac, dst_mac, vlan, vni"
ACTIONS: Final = "allow, deny, count, decap, or a mapping with one key: snat, dnat, encap, meter"

SINGLE_ERRORS: Final = [
    # top level
    ("version: 2\nuplink: up0\n", "policy.yaml: version: version 2 is not supported (only 1)"),
    ("uplink: up0\n", "policy.yaml: version: required key missing"),
    ("version: 1\n", "policy.yaml: uplink: required key missing"),
    ("version: '1'\nuplink: up0\n", "policy.yaml: version: expected an integer, got '1'"),
    (
        HEAD + "uplinc: up1\n",
        "policy.yaml: uplinc: unknown key 'uplinc' (allowed: version, uplink, gateway_mac,"
        " uplink_mac, next_hop_mac, ports, layers)",
    ),
    (
        "version: 1\nuplink: eth0/1\n",
        "policy.yaml: uplink: 'eth0/1' is not an interface name (1-15 characters, no '/', ':'"
        " or whitespace)",
    ),
    (
        HEAD + "gateway_mac: '01:00:5e:00:00:01'\n",
        "policy.yaml: gateway_mac: 01:00:5e:00:00:01 is a multicast MAC; a unicast one is"
        " needed here",
    ),
    ("- 1\n", "policy.yaml: top level: must be a mapping, got a list"),
    (HEAD + "1: one\n", "policy.yaml: [1]: keys must be strings, got 1"),
    ("", "policy.yaml: top level: must be a mapping, got an empty document"),
    (HEAD + "ports: {}\n", "policy.yaml: ports: expected a list, got a mapping"),
    # YAML syntax
    (
        "version: 1\nuplink: [up0\nports: []\n",
        "policy.yaml: line 3, column 6: invalid YAML: expected ',' or ']', but got ':'",
    ),
    (
        "version: 1\n  uplink: up0\n",
        "policy.yaml: line 2, column 9: invalid YAML: mapping values are not allowed here",
    ),
    (
        "version: 1\nversion: 1\n",
        "policy.yaml: line 2, column 1: invalid YAML: duplicate key 'version'",
    ),
    # ports
    (ports("{name: vm1, interface: p1}"), "policy.yaml: ports[0].mac: required key missing"),
    (
        ports('{name: vm1, interface: p1, mac: "02:00:00:00:00:01", ip: ["10.0.0.1"]}'),
        "policy.yaml: ports[0].ip: unknown key 'ip' (allowed: name, interface, mac, ips, layers, "
        "port_security, allowed_sources, trunk, steer_by_mac)",
    ),
    (
        ports('{name: vm1, interface: p1, mac: "02:00:00:00:00:0g"}'),
        "policy.yaml: ports[0].mac: '02:00:00:00:00:0g' is not a MAC address"
        " (like 02:00:00:00:00:01)",
    ),
    (
        ports("{name: vm1, interface: p1, mac: 12:34:56:00:00:01}"),
        "policy.yaml: ports[0].mac: 9783936001 is a number, not a MAC address; quote MACs in YAML",
    ),
    (
        ports('{name: vm1, interface: p1, mac: "02:00:00:00:00:01", ips: ["10.0.0.0/24"]}'),
        "policy.yaml: ports[0].ips[0]: '10.0.0.0/24' is not an IP address (a CIDR is not"
        " allowed here)",
    ),
    (
        ports(PORT1, PORT1.replace("p1", "p2").replace(":01", ":02").replace(".1", ".2")),
        "policy.yaml: ports[1].name: port name 'vm1' already used by ports[0]",
    ),
    (
        ports(PORT1, '{name: vm2, interface: p1, mac: "02:00:00:00:00:02"}'),
        "policy.yaml: ports[1].interface: interface 'p1' already used by port 'vm1'",
    ),
    (
        ports('{name: vm1, interface: up0, mac: "02:00:00:00:00:01"}'),
        "policy.yaml: ports[0].interface: interface 'up0' already used by uplink",
    ),
    (
        ports(PORT1, '{name: vm2, interface: p2, mac: "02-00-00-00-00-01"}'),
        "policy.yaml: ports[1].mac: MAC 02:00:00:00:00:01 already used by port 'vm1'",
    ),
    (
        ports('{name: vm1, interface: p1, mac: "02:00:00:00:00:fe"}'),
        "policy.yaml: ports[0].mac: MAC 02:00:00:00:00:fe already used by gateway_mac",
    ),
    (
        ports(PORT1, '{name: vm2, interface: p2, mac: "02:00:00:00:00:02", ips: ["10.0.0.1"]}'),
        "policy.yaml: ports[1].ips[0]: IP 10.0.0.1 already used by port 'vm1'",
    ),
    (
        ports('{name: vm1, interface: p1, mac: "02:00:00:00:00:01", layers: [acl]}'),
        "policy.yaml: ports[0].layers[0]: no layer named 'acl' (no layers are defined)",
    ),
    (
        ports(
            '{name: vm1, interface: p1, mac: "02:00:00:00:00:01", layers: [a, a]}',
            extra="layers: [{name: a}]\n",
        ),
        "policy.yaml: ports[0].layers[1]: layer 'a' is listed twice",
    ),
    (
        ports(
            '{name: vm1, interface: p1, mac: "02:00:00:00:00:01", layers: [acll]}',
            extra="layers: [{name: acl}, {name: nat}]\n",
        ),
        "policy.yaml: ports[0].layers[0]: no layer named 'acll' (defined: acl, nat)",
    ),
    # layers
    (
        HEAD + "layers: [{name: a}, {name: a}]\n",
        "policy.yaml: layers[1].name: layer name 'a' already used by layers[0]",
    ),
    (
        HEAD + "layers: [{name: a, default: count}]\n",
        "policy.yaml: layers[0].default: 'count' is not a default action (allow or deny)",
    ),
    (
        HEAD + "layers: [{name: a, default: {outbound: deny, inbond: deny}}]\n",
        "policy.yaml: layers[0].default.inbond: unknown key 'inbond' (allowed: outbound, inbound)",
    ),
    (
        HEAD + "layers: [{name: a, stateful: 'yes'}]\n",
        "policy.yaml: layers[0].stateful: expected true or false, got 'yes'",
    ),
    (
        HEAD + "layers: [{name: ''}]\n",
        "policy.yaml: layers[0].name: must not be empty",
    ),
    # rules
    (
        rules(
            "{name: ssh, priority: 10, action: allow}",
            "{name: web, priority: 10, action: allow}",
            direction="inbound",
        ),
        "policy.yaml: layers[0].inbound[1].priority: priority 10 already used by rule 'ssh'",
    ),
    (
        rules("{name: r, priority: 1, action: allow}", "{name: r, priority: 2, action: deny}"),
        "policy.yaml: layers[0].outbound[1].name: rule name 'r' already used by"
        " layers[0].outbound[0]",
    ),
    (
        rules("{name: r, priority: 2147483648, action: allow}"),
        f"{R0}.priority: 2147483648 is not a priority (0-2147483647)",
    ),
    (rules("{name: r, action: allow}"), f"{R0}.priority: required key missing"),
    (
        rules("{name: r, priority: 1, action: allow, matches: {}}"),
        f"{R0}.matches: unknown key 'matches' (allowed: name, priority, match, action)",
    ),
    # match
    (
        match("proto: tcp, dstport: 22"),
        f"{R0}.match.dstport: unknown key 'dstport' (allowed: {MATCH_KEYS})",
    ),
    (match("proto: tcp, dst_port: 70000"), f"{R0}.match.dst_port: 70000 is not a port (0-65535)"),
    (
        match("proto: tcp, dst_port: '2000-1000'"),
        f"{R0}.match.dst_port: '2000-1000' is an empty range (2000 > 1000)",
    ),
    (
        match("proto: tcp, src_port: [80, '!1-99999']"),
        f"{R0}.match.src_port: 99999 is not a port (0-65535)",
    ),
    (match("proto: tcp, dst_port: http"), f"{R0}.match.dst_port: 'http' is not a port (0-65535)"),
    (match("dst_port: []"), f"{R0}.match.dst_port: empty list; omit the field to match anything"),
    (
        match("proto: tcpp"),
        f"{R0}.match.proto: 'tcpp' is not a protocol (tcp, udp, icmp, icmpv6 or 0-255)",
    ),
    (
        match("proto: [tcp, 256]"),
        f"{R0}.match.proto: 256 is not a protocol (tcp, udp, icmp, icmpv6 or 0-255)",
    ),
    (
        match("proto: icmp, dst_port: 22"),
        f"{R0}.match: dst_port needs proto tcp or udp, but proto allows neither",
    ),
    (
        match("src: 10.0.0.1/8"),
        f"{R0}.match.src: host bits set in 10.0.0.1/8; did you mean 10.0.0.0/8?",
    ),
    (
        match("dst: ['fd00::1/64']"),
        f"{R0}.match.dst: host bits set in fd00::1/64; did you mean fd00::/64?",
    ),
    (match("dst: 10.0.0.0/33"), f"{R0}.match.dst: '10.0.0.0/33' is not an IP address or CIDR"),
    (match("src: 'ten'"), f"{R0}.match.src: 'ten' is not an IP address or CIDR"),
    (match("src: []"), f"{R0}.match.src: empty list; omit the field to match anything"),
    (match("dscp: 64"), f"{R0}.match.dscp: 64 is not a DSCP value (0-63)"),
    (match("vlan: '!4096'"), f"{R0}.match.vlan: 4096 is not a VLAN id (0-4095)"),
    (match("vni: 16777216"), f"{R0}.match.vni: 16777216 is not a VNI (0-16777215)"),
    (
        match("src_mac: '02:00:00:00:00'"),
        f"{R0}.match.src_mac: '02:00:00:00:00' is not a MAC address (like 02:00:00:00:00:01)",
    ),
    # actions
    (action("alow"), f"{R0}.action: 'alow' is not an action ({ACTIONS})"),
    (action("[allow]"), f"{R0}.action: a list is not an action ({ACTIONS})"),
    (
        action("{snat: {ip: 198.51.100.7}, dnat: {ip: 10.0.0.1}}"),
        f"{R0}.action: an action mapping needs exactly one key (snat, dnat, encap, meter);"
        " got snat, dnat",
    ),
    (
        action("{nat: {ip: 198.51.100.7}}"),
        f"{R0}.action.nat: unknown key 'nat' (allowed: snat, dnat, encap, meter)",
    ),
    (
        action("{snat: {ip: 198.51.100.0/24}}"),
        f"{R0}.action.snat.ip: '198.51.100.0/24' is not an IP address (a CIDR is not allowed here)",
    ),
    (
        action("{snat: {ip: 198.51.100.7, port: 0}}"),
        f"{R0}.action.snat.port: 0 is not a port (1-65535)",
    ),
    (action("{snat: null}"), f"{R0}.action: snat needs its settings as a mapping, got null"),
    (action("{dnat: {port: 80}}"), f"{R0}.action.dnat.ip: required key missing"),
    (
        action("{encap: {vxlan: {vni: 5001, local: 203.0.113.1, remote: 'fd00::2'}}}"),
        f"{R0}.action.encap.vxlan: local 203.0.113.1 and remote fd00::2 are different IP versions",
    ),
    (
        action("{encap: {vxlan: {vni: 16777216, local: 203.0.113.1, remote: 203.0.113.2}}}"),
        f"{R0}.action.encap.vxlan.vni: 16777216 is not a VNI (0-16777215)",
    ),
    (
        action("{encap: {vxlan: {vni: 1, local: 203.0.113.1, remote: 203.0.113.2, ttl: 64}}}"),
        f"{R0}.action.encap.vxlan.ttl: unknown key 'ttl' (allowed: vni, local, remote, dst_port,"
        " src_mac, dst_mac)",
    ),
    (action("{meter: {burst: 10}}"), f"{R0}.action.meter: a meter needs pps or bps (or both)"),
    (action("{meter: {pps: 0}}"), f"{R0}.action.meter.pps: 0 is not a positive integer"),
    (
        action("{meter: {bps: 1000000, burst: 10}}"),
        f"{R0}.action.meter: burst is in packets and needs pps",
    ),
]


@pytest.mark.parametrize(("text", "expected"), SINGLE_ERRORS)
def test_single_error(text: str, expected: str) -> None:
    assert errors_of(text) == [expected]


def test_unquoted_negation_is_a_yaml_tag_and_says_so() -> None:
    text = HEAD + "layers:\n  - name: a\n    outbound:\n      - name: r\n        dst_port: !25\n"
    assert errors_of(text) == [
        "policy.yaml: line 7, column 19: invalid YAML: could not determine a constructor for"
        " the tag '!25' (quote negations: \"!...\")"
    ]


def test_all_errors_are_reported_at_once() -> None:
    text = (
        "version: 3\n"
        "uplink: up0\n"
        "ports:\n"
        '  - {name: vm1, interface: p1, mac: "02:00:00:00:00:01", layers: [nope]}\n'
        '  - {name: vm1, interface: p2, mac: "02:00:00:00:00:0x"}\n'
        "layers:\n"
        "  - name: a\n"
        "    outbound:\n"
        "      - {name: r, priority: 10, match: {dst_port: 70000}, action: allow}\n"
        "      - {name: s, priority: 10, action: {snat: {ip: nowhere}}}\n"
    )
    assert errors_of(text) == [
        "policy.yaml: version: version 3 is not supported (only 1)",
        "policy.yaml: ports[1].mac: '02:00:00:00:00:0x' is not a MAC address"
        " (like 02:00:00:00:00:01)",
        "policy.yaml: layers[0].outbound[0].match.dst_port: 70000 is not a port (0-65535)",
        "policy.yaml: layers[0].outbound[1].action.snat.ip: 'nowhere' is not an IP address",
        "policy.yaml: ports[1].name: port name 'vm1' already used by ports[0]",
        "policy.yaml: ports[0].layers[0]: no layer named 'nope' (defined: a)",
        "policy.yaml: layers[0].outbound[1].priority: priority 10 already used by rule 'r'",
    ]


def test_bad_items_of_one_list_are_all_named() -> None:
    assert errors_of(match("proto: tcp, dst_port: [70000, 'x-y']")) == [
        f"{R0}.match.dst_port: 70000 is not a port (0-65535); 'x-y' is not a port (0-65535)"
    ]


def test_negated_proto_allows_ports() -> None:
    policy = parse_policy(match("proto: '!tcp', dst_port: 53"))
    fields = policy.layers["a"].outbound[0].match.fields
    assert fields["proto"] == FieldSet((), ((6, 6),))
    assert fields["dst_port"] == FieldSet(((53, 53),), ())


def test_unreadable_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_policy(missing)
    assert info.value.errors == [f"{missing}: cannot read: No such file or directory"]


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"version: 1\nuplink: \xe9\n")
    with pytest.raises(ConfigError) as info:
        load_policy(path)
    assert info.value.errors == [f"{path}: not UTF-8 text (byte 19)"]


# --- the example file ---


@pytest.fixture(scope="module")
def example():
    return load_policy(EXAMPLE)


def test_example_top_level(example) -> None:
    assert example.version == 1
    assert example.uplink == "up0"
    assert example.gateway_mac == mac_to_int("02:00:00:00:00:fe")
    assert example.uplink_mac is None and example.next_hop_mac is None
    assert example.source == str(EXAMPLE)
    assert example.digest == hashlib.sha256(EXAMPLE.read_bytes()).hexdigest()
    assert list(example.layers) == ["acl", "nat", "vnet", "qos"]


def test_example_ports(example) -> None:
    vm1, vm2 = example.ports
    assert (vm1.name, vm1.interface, vm1.mac) == ("vm1", "p1", mac_to_int("02:00:00:00:00:01"))
    assert vm1.ips == (ip_to_int("10.0.0.1"), ip_to_int("fd00::1"))
    assert vm1.layers == ("acl", "nat", "vnet")
    assert (vm2.name, vm2.interface, vm2.ips) == ("vm2", "p2", (ip_to_int("10.0.0.2"),))
    assert vm2.layers == ("acl", "qos")
    assert example.port("vm2") is vm2


def test_example_acl(example) -> None:
    acl = example.layers["acl"]
    assert acl.stateful
    assert (acl.default_out, acl.default_in) == (Allow(), Deny())
    assert [r.name for r in acl.outbound] == ["no-smtp", "dns"]
    assert [r.name for r in acl.inbound] == ["ssh", "web", "icmp"]
    ssh, web, icmp = acl.inbound
    assert ssh.match.fields == {
        "src": FieldSet((cidr_to_interval("192.0.2.0/24"),)),
        "dst_port": FieldSet(((22, 22),)),
        "proto": FieldSet(((6, 6),)),
    }
    assert web.match.fields["dst_port"] == FieldSet(((8000, 8080),))
    assert icmp.match.fields["proto"] == FieldSet(((1, 1), (58, 58)))
    v6 = icmp.match.fields["src"].pos[1]
    assert v6 == (ip_to_int("fd00::"), ip_to_int("fd00::ffff:ffff:ffff:ffff"))
    assert acl.outbound[1].action == Count()


def test_example_nat(example) -> None:
    nat = example.layers["nat"]
    assert not nat.stateful
    assert (nat.default_out, nat.default_in) == (Allow(), Allow())
    (snat,) = nat.outbound
    assert snat.action == Snat(ip=ip_to_int("198.51.100.7"))
    assert snat.match.fields == {
        "src": FieldSet((cidr_to_interval("10.0.0.0/24"),)),
        "dst": FieldSet((), (cidr_to_interval("10.0.0.0/8"),)),
    }
    (vip,) = nat.inbound
    assert vip.action == Dnat(ip=ip_to_int("10.0.0.1"), port=8080)
    assert vip.match.fields["dst"] == FieldSet(((ip_to_int("198.51.100.80"),) * 2,))


def test_example_vnet_and_qos(example) -> None:
    vnet = example.layers["vnet"]
    assert vnet.outbound[0].action == Encap(
        vni=5001, local=ip_to_int("203.0.113.1"), remote=ip_to_int("203.0.113.2"), dst_port=4789
    )
    assert vnet.inbound[0].action == Decap()
    assert vnet.inbound[0].match.fields == {"vni": FieldSet(((5001, 5001),))}
    assert example.layers["qos"].outbound[0].action == Meter(pps=1000, burst=100)


# --- conversion details ---


def test_rules_sorted_by_priority_and_defaults() -> None:
    policy = parse_policy(
        rules(
            "{name: late, priority: 300, action: deny}",
            "{name: early, priority: 1, action: count}",
            "{name: mid, priority: 20, action: allow}",
        )
    )
    layer = policy.layers["a"]
    assert [r.priority for r in layer.outbound] == [1, 20, 300]
    assert layer.inbound == ()
    assert not layer.stateful
    assert (layer.default_out, layer.default_in) == (Allow(), Allow())
    assert layer.outbound[0].match.fields == {}
    assert policy.source == "<string>"
    assert policy.ports == ()


def test_single_word_default_applies_to_both_directions() -> None:
    layer = parse_policy(HEAD + "layers: [{name: a, default: deny}]\n").layers["a"]
    assert (layer.default_out, layer.default_in) == (Deny(), Deny())


@pytest.mark.parametrize(
    ("spec", "field", "expected"),
    [
        ("dst_port: 22", "dst_port", FieldSet(((22, 22),))),
        ("dst_port: ['!25', '1000-2000']", "dst_port", FieldSet(((1000, 2000),), ((25, 25),))),
        ("proto: [tcp, 17]", "proto", FieldSet(((6, 6), (17, 17)))),
        ("dscp: '10-20'", "dscp", FieldSet(((10, 20),))),
        ("vlan: ['!0']", "vlan", FieldSet((), ((0, 0),))),
        ("vni: [5001, '6000-6010']", "vni", FieldSet(((5001, 5001), (6000, 6010)))),
        ("src: 'fd00::1'", "src", FieldSet(((ip_to_int("fd00::1"),) * 2,))),
        (
            "dst: ['10.0.0.0/8', '!10.1.0.0/16', '::/0']",
            "dst",
            FieldSet(
                (cidr_to_interval("10.0.0.0/8"), (0, 2**128 - 1)),
                (cidr_to_interval("10.1.0.0/16"),),
            ),
        ),
        (
            "src_mac: ['02:00:00:00:00:01', '!ff:ff:ff:ff:ff:ff']",
            "src_mac",
            FieldSet(((2**41 + 1, 2**41 + 1),), ((2**48 - 1, 2**48 - 1),)),
        ),
    ],
)
def test_match_field_conversion(spec: str, field: str, expected: FieldSet) -> None:
    fields = parse_policy(match(spec)).layers["a"].outbound[0].match.fields
    assert fields == {field: expected}


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("{meter: {pps: 5}}", Meter(pps=5, burst=1)),
        ("{meter: {pps: 1000}}", Meter(pps=1000, burst=100)),
        ("{meter: {bps: 8000}}", Meter(bps=8000, burst_bytes=1500)),
        ("{meter: {bps: 800000000}}", Meter(bps=800_000_000, burst_bytes=10_000_000)),
        (
            "{meter: {pps: 10, bps: 1000000, burst: 3, burst_bytes: 9000}}",
            Meter(pps=10, bps=1_000_000, burst=3, burst_bytes=9000),
        ),
        ("{snat: {ip: '2001:db8::7', port: 4000}}", Snat(ip=ip_to_int("2001:db8::7"), port=4000)),
        (
            "{encap: {vxlan: {vni: 7, local: 'fd00::1', remote: 'fd00::2', dst_port: 8472,"
            " src_mac: '02:00:00:00:00:0a', dst_mac: '02:00:00:00:00:0b'}}}",
            Encap(7, ip_to_int("fd00::1"), ip_to_int("fd00::2"), 8472, 2**41 + 10, 2**41 + 11),
        ),
    ],
)
def test_action_conversion(spec: str, expected: object) -> None:
    assert parse_policy(action(spec)).layers["a"].outbound[0].action == expected


def test_optional_top_level_macs() -> None:
    policy = parse_policy(
        HEAD + 'gateway_mac: "02:00:00:00:00:aa"\nuplink_mac: "02:bb:00:00:00:01"\n'
        'next_hop_mac: "02:aa:00:00:00:01"\n'
    )
    assert policy.gateway_mac == mac_to_int("02:00:00:00:00:aa")
    assert policy.uplink_mac == mac_to_int("02:bb:00:00:00:01")
    assert policy.next_hop_mac == mac_to_int("02:aa:00:00:00:01")


def test_digest_matches_between_text_and_file(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(HEAD)
    assert load_policy(path).digest == parse_policy(HEAD).digest
    assert load_policy(str(path)).source == str(path)


# --- CLI ---


def test_cli_ok(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(EXAMPLE)]) == 0
    out, err = capsys.readouterr()
    assert out == f"{EXAMPLE}: ok (2 ports, 4 layers, 10 rules)\n"
    assert err == ""


def test_cli_reports_every_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nuplink: up0\nports: [{name: vm1}]\n")
    assert main([str(bad), str(EXAMPLE)]) == 1
    out, err = capsys.readouterr()
    assert err.splitlines() == [
        f"{bad}: ports[0].interface: required key missing",
        f"{bad}: ports[0].mac: required key missing",
    ]
    assert out == f"{EXAMPLE}: ok (2 ports, 4 layers, 10 rules)\n"


def test_cli_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "nope.yaml")]) == 1
    assert "cannot read: No such file or directory" in capsys.readouterr().err


def test_cli_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert "usage: appliance-check-config" in capsys.readouterr().err
