"""Warnings for rules that validate but can never match (appliance.policylint)."""

from __future__ import annotations

import pytest

from appliance.cli import check_config
from appliance.policy import ConfigError, parse_policy
from appliance.policylint import policy_warnings

HEAD = """
version: 1
uplink: up0
ports:
  - {name: vm1, interface: p1, mac: "02:00:00:00:00:01", ips: ["10.0.0.1"], layers: [acl]}
layers:
  - name: acl
    outbound:
"""


def warnings_for(match: str) -> list[str]:
    text = HEAD + f"      - {{name: r, priority: 1, match: {match}, action: deny}}\n"
    return policy_warnings(parse_policy(text, "p.yaml"))


@pytest.mark.parametrize("match,why", [
    ('{src: 10.0.0.0/8, dst: "fd00::/64"}', "src is IPv4 only and dst IPv6 only"),
    ('{src: "fd00::/64", dst: [192.0.2.0/24, 198.51.100.0/24]}', "src is IPv6 only and dst IPv4"),
    ('{proto: icmp, dst: "fd00::/64"}', "proto icmp (ICMPv4) with IPv6 addresses only"),
    ('{proto: icmpv6, src: 10.0.0.0/8}', "proto icmpv6 with IPv4 addresses only"),
    ('{dst: "::ffff:10.0.0.0/104"}', "IPv4-mapped/compatible IPv6"),
    ('{dst: ["10.0.0.0/8", "!0.0.0.0/0"]}', "dst: the exclusions cover everything"),
    ('{dst_port: ["80", "!0-65535"], proto: tcp}', "dst_port: the exclusions cover everything"),
])
def test_rules_that_can_never_match_are_named(match, why):
    (line,) = warnings_for(match)
    assert line.startswith("p.yaml: layer acl outbound rule r: can never match: ")
    assert why in line


@pytest.mark.parametrize("match", [
    '{src: [10.0.0.0/8, "fd00::/64"], dst: "fd00::/8"}',  # a list holding both families
    '{dst: ["!10.0.0.0/8"]}',  # negations only: matches the rest of IPv4 and all of IPv6
    '{proto: [icmp, icmpv6], dst: "fd00::/64"}',
    '{dst: ["10.0.0.0/8", "!10.1.0.0/16"]}',
    '{dst: "::/0"}',
])
def test_rules_that_can_match_get_no_warning(match):
    assert warnings_for(match) == []


def test_a_mapped_single_address_is_an_error_with_its_path():
    text = HEAD.replace('ips: ["10.0.0.1"]', 'ips: ["10.0.0.1", "::ffff:10.0.0.9"]')
    text += "      - {name: r, priority: 1, match: {}, action: {snat: {ip: \"::ffff:1.2.3.4\"}}}\n"
    with pytest.raises(ConfigError) as info:
        parse_policy(text, "p.yaml")
    assert info.value.errors == [
        "p.yaml: ports[0].ips[1]: '::ffff:10.0.0.9' is an IPv4-mapped/compatible IPv6 address, "
        "never used on the wire; write the IPv4 address",
        "p.yaml: layers[0].outbound[0].action.snat.ip: '::ffff:1.2.3.4' is an "
        "IPv4-mapped/compatible IPv6 address, never used on the wire; write the IPv4 address",
    ]


def test_check_config_prints_warnings_and_still_passes(tmp_path, capsys):
    f = tmp_path / "p.yaml"
    f.write_text(HEAD + '      - {name: r, priority: 1, match: {src: 10.0.0.0/8, dst: "fd00::/64"},'
                 ' action: deny}\n')
    assert check_config.main([str(f)]) == check_config.EXIT_OK
    err = capsys.readouterr().err
    assert "warning: " in err and "rule r: can never match" in err
