"""Rule-level analysis: rule diffs, unreachable rules, overlapping rules.

Tables of small inline policies with the exact findings expected, and a property test of
the box algebra against brute force over a universe small enough to enumerate exactly.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.model import FieldSet, Match
from appliance.policy import parse_policy
from appliance.ruleanalysis import box, box_match, common, covers, diff_lines, diff_rules, lint

HEAD = """
version: 1
uplink: up0
ports:
  - {name: vm1, interface: p1, mac: "02:00:00:00:00:01", ips: ["10.0.0.1"], layers: [acl]}
layers:
  - name: acl
    stateful: true
    default: {outbound: allow, inbound: deny}
    inbound: []
    outbound:
"""


def policy(*rules: str, head: str = HEAD):
    return parse_policy(head + "\n".join(f"      - {r}" for r in rules) + "\n")


LINT_CASES = [
    # (rules, unreachable [(rule, by)], overlaps [(first, second, common)])
    (["{name: tcp, priority: 10, match: {proto: tcp}, action: deny}",
      "{name: ssh, priority: 20, match: {proto: tcp, dst_port: 22}, action: allow}"],
     [("ssh", "tcp")], []),
    (["{name: ssh, priority: 10, match: {proto: tcp, dst_port: 22}, action: allow}",
      "{name: tcp, priority: 20, match: {proto: tcp}, action: deny}"],
     [], [("ssh", "tcp", "dst_port=22 proto=tcp")]),
    # a port condition never matches packets without ports (ICMP, later fragments)
    (["{name: ports, priority: 10, match: {dst_port: 0-65535}, action: deny}",
      "{name: all, priority: 20, match: {proto: tcp}, action: allow}"],
     [], [("ports", "all", "dst_port=0-65535 proto=tcp")]),
    # an IPv4 /0 is not every address: IPv6 packets pass it
    (["{name: v4, priority: 10, match: {dst: 0.0.0.0/0}, action: deny}",
      "{name: any, priority: 20, match: {proto: udp}, action: allow}"],
     [], [("v4", "any", "dst=0.0.0.0/0 proto=udp")]),
    (["{name: v4, priority: 10, match: {dst: 0.0.0.0/0}, action: deny}",
      "{name: net, priority: 20, match: {dst: 10.0.0.0/8, proto: udp}, action: allow}"],
     [("net", "v4")], []),
    # same action: redundant, still unreachable; no overlap reported for same actions
    (["{name: a, priority: 10, match: {dst: 10.0.0.0/8}, action: deny}",
      "{name: b, priority: 20, match: {dst: 10.1.0.0/16}, action: deny}",
      "{name: c, priority: 30, match: {dst: [10.0.0.0/8, 192.0.2.0/24]}, action: deny}"],
     [("b", "a")], []),
    # disjoint: no finding; a port rule and an ICMP rule never meet
    (["{name: web, priority: 10, match: {proto: tcp, dst_port: 80}, action: deny}",
      "{name: ping, priority: 20, match: {proto: icmp}, action: count}",
      "{name: p22, priority: 30, match: {dst_port: 22}, action: count}",
      "{name: icmp2, priority: 40, match: {proto: icmp}, action: deny}"],
     [("icmp2", "ping")], []),
    # exclusions: 10/8 except 10.1/16 covers 10.2/16 but not 10.1.2/24
    (["{name: most, priority: 10, match: {dst: [10.0.0.0/8, '!10.1.0.0/16']}, action: deny}",
      "{name: two, priority: 20, match: {dst: 10.2.0.0/16}, action: allow}",
      "{name: one, priority: 30, match: {dst: 10.1.2.0/24}, action: allow}"],
     [("two", "most")], []),
    # a rule that matches nothing
    (["{name: none, priority: 10, match: {proto: tcp, dst_port: [80, '!80']}, action: deny}"],
     [("none", None)], []),
]


@pytest.mark.parametrize(("rules", "unreachable", "overlaps"), LINT_CASES)
def test_lint_finds_exactly_the_unreachable_and_overlapping_rules(rules, unreachable,
                                                                 overlaps):
    found = lint(policy(*rules))
    assert [(u.rule.name, u.by.name if u.by else None) for u in found.unreachable] == \
        unreachable
    assert [(o.first.name, o.second.name, o.as_dict()["common"]) for o in found.overlaps] == \
        overlaps
    assert not found.truncated


def test_lint_budget_stops_early_and_says_so():
    rules = [f"{{name: r{i}, priority: {i + 1}, match: {{dst_port: {i}}}, action: deny}}"
             for i in range(60)]
    found = lint(policy(*rules), budget=100)
    assert found.truncated


BASE = ["{name: no-smtp, priority: 10, match: {proto: tcp, dst_port: 25}, action: deny}",
        "{name: dns, priority: 20, match: {proto: udp, dst_port: 53}, action: count}",
        "{name: ssh, priority: 30, match: {proto: tcp, dst_port: 22, dst: 10.0.0.0/8}, "
        "action: allow}"]


def test_diff_added_removed_changed_rules():
    new = [BASE[0].replace("dst_port: 25", "dst_port: 2525"),  # changed match
           "{name: web, priority: 40, match: {proto: tcp, dst_port: 80}, action: deny}",
           BASE[2]]
    d = diff_rules(policy(*BASE), policy(*new)).as_dict()
    assert [(r["name"], r["layer"], r["direction"]) for r in d["added"]] == [
        ("web", "acl", "out")]
    assert [r["name"] for r in d["removed"]] == ["dns"]
    assert [(c["name"], c["what"]) for c in d["changed"]] == [("no-smtp", ["match"])]
    assert d["changed"][0]["after"]["match"] == "dst_port=2525 proto=tcp"
    assert d["unreachable"] == [] and d["overlaps"] == []


def test_diff_reports_rules_a_new_rule_makes_unreachable_and_new_overlaps():
    new = ["{name: all-tcp, priority: 5, match: {proto: tcp}, action: count}", *BASE]
    d = diff_rules(policy(*BASE), policy(*new))
    assert [(u.rule.name, u.by.name) for u in d.unreachable] == [("no-smtp", "all-tcp"),
                                                                  ("ssh", "all-tcp")]
    assert d.overlaps == []  # covered rules are unreachable, not overlaps
    text = "\n".join(diff_lines(d.as_dict()))
    assert "+ acl out all-tcp (priority 5): proto=tcp -> count" in text
    assert "! unreachable: acl out ssh (priority 30) is behind all-tcp (priority 5)" in text


def test_diff_does_not_blame_a_change_for_what_was_already_unreachable():
    old = ["{name: all-tcp, priority: 5, match: {proto: tcp}, action: deny}", *BASE]
    new = [*old, "{name: more, priority: 50, match: {proto: udp}, action: deny}"]
    d = diff_rules(policy(*old), policy(*new))
    assert d.unreachable == []  # no-smtp and ssh were behind all-tcp before too
    assert [(o.first.name, o.second.name) for o in d.overlaps] == [("dns", "more")]


def test_diff_of_layers_ports_defaults_and_globals():
    old = policy(*BASE)
    head = (HEAD.replace('ips: ["10.0.0.1"], layers: [acl]', 'ips: ["10.0.0.5"], layers: [acl]')
            .replace("default: {outbound: allow, inbound: deny}",
                     "default: {outbound: deny, inbound: deny}")
            .replace("stateful: true", "stateful: false")
            .replace("uplink: up0", "uplink: up1"))
    d = diff_rules(old, policy(*BASE, head=head)).as_dict()
    assert d["global"] == ["uplink up0 -> up1"]
    assert d["ports"]["changed"] == ["vm1: ips 10.0.0.1 -> 10.0.0.5"]
    assert d["layers"]["changed"] == ["acl: stateful true -> false",
                                      "acl: default out allow -> deny"]
    assert d["added"] == d["removed"] == d["changed"] == []


def test_identical_policies_have_an_empty_diff():
    d = diff_rules(policy(*BASE), policy(*BASE))
    assert d.empty and diff_lines(d.as_dict()) == ["  no rule changes"]


# -------------------------------------------------- box algebra against brute force
#
# Rules use only proto and dst_port, with port interval ends in 0..40 or 65535: every port
# above 40 behaves like 41, every protocol outside {1, 6, 17} like 50, so the universe below is
# exhaustive and brute force is exact.

PROTOS = [1, 6, 17, 50]
UNIVERSE = [(proto, port) for proto in PROTOS for port in
            ([None, *range(42)] if proto in (6, 17) else [None])]
SRC, DST = 0xFFFF_0A00_0001, 0xFFFF_C000_0201


def matches(m: Match, proto: int, port: int | None) -> bool:
    return m.matches((SRC, DST, 1000 if port is not None else None, port, proto, 0, 1, 2,
                      None, None))


# interval ends in 0..40 or 65535: every port above 40 still behaves like 41
intervals = st.lists(st.tuples(st.integers(0, 40), st.sampled_from([*range(41), 65535])).map(
    lambda t: (min(t), max(t))), max_size=3)


@st.composite
def matches_(draw) -> Match:
    fields = {}
    if draw(st.booleans()):
        fields["proto"] = FieldSet(pos=tuple((p, p) for p in draw(
            st.lists(st.sampled_from([1, 6, 17]), min_size=1, max_size=2))))
    if draw(st.booleans()):
        pos, neg = draw(intervals), draw(intervals)
        if pos or neg:
            fields["dst_port"] = FieldSet(pos=tuple(pos), neg=tuple(neg))
    return Match(fields)


@settings(max_examples=400, deadline=None)
@given(matches_(), matches_())
def test_covers_and_common_agree_with_brute_force(s, r):
    s_hits = {p for p in UNIVERSE if matches(s, *p)}
    r_hits = {p for p in UNIVERSE if matches(r, *p)}
    assert covers(box(s), box(r)) == (r_hits <= s_hits)
    both = common(box(s), box(r))
    assert (both is not None) == bool(s_hits & r_hits)
    if both is not None:  # the common box is exactly the intersection
        assert {p for p in UNIVERSE if matches(box_match(both), *p)} == s_hits & r_hits
