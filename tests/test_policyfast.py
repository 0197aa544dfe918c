"""The fast loading path (appliance.fastyaml + appliance.policyfast) against the full one:
the same tree as PyYAML or none, the same policy as pydantic or none, and never a document
accepted that the full path refuses."""

from __future__ import annotations

import hashlib
import string
from pathlib import Path

import pytest
import yaml
from daemon_lab import POLICY as LAB_POLICY
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_policy import EXAMPLE, SINGLE_ERRORS

from appliance import fastyaml, policyfast
from appliance.policy import ConfigError, _build_checked, _StrictLoader, parse_policy

ryml = pytest.importorskip("ryml")


def pyyaml(text: str):
    return yaml.load(text, Loader=_StrictLoader)


def old(text: str, source: str = "<string>"):
    """The loader as it was: pydantic for everything."""
    return _build_checked(text, source, hashlib.sha256(text.encode()).hexdigest())


def outcome(fn, text: str):
    try:
        return "ok", fn(text)
    except ConfigError as e:
        return "error", e.errors


def assert_same(text: str) -> None:
    fast_doc = fastyaml.load(text)
    if fast_doc is not None:
        assert fast_doc == pyyaml(text)
        assert [type(x) for x in _leaves(fast_doc)] == [type(x) for x in _leaves(pyyaml(text))]
    assert outcome(parse_policy, text) == outcome(old, text)


def _leaves(node):
    if isinstance(node, dict):
        for k, v in node.items():
            yield k
            yield from _leaves(v)
    elif isinstance(node, list):
        for v in node:
            yield from _leaves(v)
    else:
        yield node


@pytest.mark.parametrize("name, text", [("lab", LAB_POLICY),
                                        ("example", Path(EXAMPLE).read_text())])
def test_real_policies_load_the_same(name, text):
    assert_same(text)
    assert parse_policy(text) == old(text)


def test_the_fast_path_is_taken_for_a_plain_policy():
    doc = fastyaml.load(LAB_POLICY)
    assert doc is not None
    digest = hashlib.sha256(LAB_POLICY.encode()).hexdigest()
    assert policyfast.build(doc, "<string>", digest) == old(LAB_POLICY)


@pytest.mark.parametrize(("text", "expected"), SINGLE_ERRORS)
def test_every_refused_document_is_refused_by_the_fast_path_too(text, expected):
    for doc in (fastyaml.load(text), _safe(pyyaml, text)):
        if doc is not None:
            assert policyfast.build(doc, "x", "d") is None
    assert_same(text)


def _safe(fn, text):
    try:
        return fn(text)
    except yaml.YAMLError:
        return None


@pytest.mark.parametrize("text", [
    "a: yes", "a: 010", "a: 0x1f", "a: 1:30", "a: ~", "a: 2001-01-01", "a: 1e3", "a: 1.5",
    "a: 1_000", "a: True", "a: !!str 1", "a: &x 1\nb: *x", "{a: 1, a: 2}", 'a: "\x01"',
    "a: +1", "yes: 1", "1: a", "a: .inf", "a:\n  - x\n  -  y", "a: 'it''s'", 'a: "\\u00e9"',
    "a: multi\n  line", "a: |\n  x\n  y\n", "a: >\n  x\n  y\n", "---\na: 1\n", "a: 1\n---\nb: 2",
    "a: [1, [2, {b: c}]]", "a: -1", "a: ''", 'a: ""', "a: null", "a:", "a: 0", "a: 00",
    "a: b # c", "a: 'x' # y", "a: [fd00::1, '::1']", "a: {b: fd00::/64}", "a:\tb", "a: b\r\n",
    "a: '!x'", 'a: "!x"', "a: x!y", "? a\n: b", "a: 12:00:00:00:00:01", "- a\n- b", "a",
])
def test_yaml_corner_cases_match_pyyaml_or_are_refused(text):
    fast = fastyaml.load(text)
    if fast is not None:
        assert fast == pyyaml(text)
        assert [type(x) for x in _leaves(fast)] == [type(x) for x in _leaves(pyyaml(text))]


# ------------------------------------------------------------------ generated policies

DSTS = ["10.0.0.0/8", "192.0.2.1", '"!10.1.0.0/16"', "[10.0.0.0/8, fd00::/64]", "10.0.0.1/8",
        "'10.0.0.0/8'", "[]"]
VERSIONS = ["1", "2", '"1"']

WORDS = st.text(string.ascii_lowercase + string.digits + "-_", min_size=1, max_size=6)
ODD = st.sampled_from(["yes", "no", "on", "~", "null", "010", "0x10", "1:30", "1e3", "1.5",
                       "true", "True", "''", "[]", "{}", "-1", "70000", "2001-01-01", "'22'",
                       "\"!10.0.0.0/8\"", "!10.0.0.0/8", "10.0.0.1/8", "fd00::/64", "tcp",
                       "udp", "[tcp, udp]", "\"8000-8080\"", "80-90", "dney", "allow", "deny"])


@st.composite
def rule_line(draw, i: int) -> str:
    name = draw(st.one_of(WORDS, ODD)) if draw(st.booleans()) else f"r{i}"
    prio = draw(st.one_of(st.integers(0, 20).map(str), ODD)) if draw(st.booleans()) \
        else str(10 + i)
    fields = []
    if draw(st.booleans()):
        fields.append("dst: " + draw(st.sampled_from(DSTS)))
    if draw(st.booleans()):
        fields.append(f"proto: {draw(st.sampled_from(['tcp', 'udp', 'icmp', '6', '[tcp, udp]']))}")
    if draw(st.booleans()):
        fields.append(f"dst_port: {draw(st.one_of(st.integers(0, 70000).map(str), ODD))}")
    if draw(st.booleans()):
        fields.append(f"{draw(st.sampled_from(['vlan', 'dscp', 'vni', 'src_mac', 'bogus']))}: "
                      f"{draw(st.one_of(st.integers(0, 5000).map(str), ODD))}")
    action = draw(st.one_of(st.sampled_from(
        ["allow", "deny", "count", "{snat: {ip: 198.51.100.7}}", "{dnat: {ip: 10.0.0.1, "
         "port: 8080}}", "{meter: {pps: 100}}", "{meter: {burst: 5}}", "{snat: null}"]), ODD))
    match = f", match: {{{', '.join(fields)}}}" if fields else ""
    return f"      - {{name: {name}, priority: {prio}{match}, action: {action}}}"


@st.composite
def policy_doc(draw) -> str:
    n = draw(st.integers(0, 6))
    lines = [draw(rule_line(i)) for i in range(n)]
    stateful = draw(st.sampled_from(["true", "false", "yes", "1"]))
    default = draw(st.sampled_from(["allow", "deny", "{outbound: deny}", "dney"]))
    mac = draw(st.sampled_from(['"02:00:00:00:00:01"', '"02:00:00:00:00:fe"', "02:00:00:00:00:01",
                                '"12:00:00:00:00:01"', '"03:00:00:00:00:01"']))
    layers = draw(st.sampled_from(["[acl]", "[acl, acl]", "[nope]", "[]", "acl"]))
    body = "\n".join(lines)
    rules = f"    outbound:\n{body}\n" if lines else ""
    version = draw(st.sampled_from(VERSIONS))
    return (f"version: {version}\nuplink: up0\n"
            f"ports:\n  - {{name: vm1, interface: p1, mac: {mac}, ips: [10.0.0.1], "
            f"layers: {layers}}}\n"
            f"layers:\n  - name: acl\n    stateful: {stateful}\n    default: {default}\n"
            f"{rules}")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policy_doc())
def test_generated_policies_load_the_same_both_ways(text):
    assert_same(text)


@pytest.mark.parametrize("option", [
    'port_security: false', 'allowed_sources: [10.9.0.0/16, "fd09::/64"]',
    'trunk: [100, "200-210"]', 'steer_by_mac: true', 'port_security: "no"',
    'allowed_sources: ["!10.0.0.0/8"]', 'trunk: [5000]', 'allowed_sources: 10.0.0.0/8',
    'ips: ["::ffff:10.0.0.9"]',
])
def test_port_options_load_the_same_both_ways(option):
    # a fast path that forgot a field would build a Port with its default silently
    text = "\n".join(line.replace("interface: p2,", f"{option}, interface: p2,", 1)
                     for line in LAB_POLICY.splitlines()) + "\n"
    assert option in text
    assert_same(text)
    if option.startswith(("port_security: f", "allowed_sources: [1", "trunk: [1", "steer")):
        doc = fastyaml.load(text)
        assert doc is not None
        digest = hashlib.sha256(text.encode()).hexdigest()
        assert policyfast.build(doc, "<string>", digest) == old(text)


_OCTET_TEXT = st.one_of(st.integers(0, 300).map(str), st.sampled_from(["00", "01", "010", "1a",
                                                                       "", " 1", "+1", "٣"]))


@settings(max_examples=3000, deadline=None)
@given(st.lists(_OCTET_TEXT, min_size=3, max_size=5),
       st.one_of(st.none(), st.integers(0, 40).map(str),
                 st.sampled_from(["", "08", "00", "-1", "+8", " 8", "8 ", "٣", "255.0.0.0"])))
def test_plain_ipv4_prefixes_read_as_ipaddress_reads_them(octets, prefix):
    """The hand-written IPv4 reader (policy loading's hot spot) agrees with `ipaddress`
    on every spelling: the same interval, or both refuse."""
    import ipaddress

    from appliance.model import cidr_to_interval, ip_to_int

    text = ".".join(octets) + ("" if prefix is None else "/" + prefix)
    try:
        net = ipaddress.ip_network(text, strict=False)
        expected: object = (ip_to_int(net.network_address),
                            ip_to_int(net.network_address) + net.num_addresses - 1)
    except ValueError:
        expected = ValueError
    try:
        got: object = cidr_to_interval(text)
    except ValueError:
        got = ValueError
    assert got == expected, text
