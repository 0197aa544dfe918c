"""Classifier must agree with LinearClassifier (which uses Match.matches) on every lookup."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.classifier import Classifier, LinearClassifier
from appliance.model import (
    FIELD_BITS,
    FIELDS,
    IPV4_BASE,
    Allow,
    Deny,
    FieldSet,
    Match,
    Rule,
    cidr_to_interval,
    ip_to_int,
)

IDX = {name: i for i, name in enumerate(FIELDS)}

# Small pools of "anchor" values so that random rules overlap, nest and share boundaries.
V4_ANCHORS = [ip_to_int(a) for a in ("10.0.0.0", "10.1.2.3", "10.1.2.200", "192.168.1.1")]
V6_ANCHORS = [ip_to_int(a) for a in ("2001:db8::", "2001:db8::1:0:0:5", "fe80::1")]
PORT_ANCHORS = [0, 1, 22, 53, 80, 443, 1023, 1024, 8080, 65535]


def block(addr: int, length: int, bits: int) -> tuple[int, int]:
    k = bits - length
    lo = (addr >> k) << k
    return lo, lo + (1 << k) - 1


@st.composite
def ip_interval(draw) -> tuple[int, int]:
    kind = draw(st.sampled_from(["v4", "v4", "v6", "range"]))
    if kind == "v4":
        addr = draw(st.sampled_from(V4_ANCHORS)) ^ draw(st.integers(0, 0xFFFF))
        return block(addr, 96 + draw(st.integers(0, 32)), 128)
    if kind == "v6":
        addr = draw(st.sampled_from(V6_ANCHORS)) ^ draw(st.integers(0, 2**40))
        return block(addr, draw(st.integers(0, 128)), 128)
    lo = draw(st.sampled_from(V4_ANCHORS)) + draw(st.integers(-300, 300))
    return lo, lo + draw(st.integers(0, 70_000))


@st.composite
def small_interval(draw, bits: int, anchors: list[int]) -> tuple[int, int]:
    top = (1 << bits) - 1
    kind = draw(st.sampled_from(["exact", "exact", "range", "prefix"]))
    lo = min(top, draw(st.sampled_from(anchors)) + draw(st.integers(0, 3)))
    if kind == "exact":
        return lo, lo
    if kind == "range":
        return lo, min(top, lo + draw(st.integers(0, 3000)))
    return block(lo, draw(st.integers(0, bits)), bits)


def field_set(interval) -> st.SearchStrategy[FieldSet]:
    pos = st.lists(interval, min_size=1, max_size=4).map(tuple)
    neg = st.lists(interval, min_size=1, max_size=2).map(tuple)
    return st.one_of(
        st.builds(FieldSet, pos=pos),  # plain
        st.builds(FieldSet, pos=pos),
        st.builds(FieldSet, pos=pos, neg=neg),  # with exceptions
        st.builds(FieldSet, neg=neg),  # only exceptions
    )


def interval_for(name: str):
    if name in ("src", "dst"):
        return ip_interval()
    bits = FIELD_BITS[name]
    if name in ("src_port", "dst_port"):
        return small_interval(bits, PORT_ANCHORS)
    if name == "proto":
        return small_interval(bits, [1, 6, 17, 58])
    return small_interval(bits, [0, 1, 5, (1 << bits) - 2])


FIELD_STRATEGIES = {name: field_set(interval_for(name)) for name in FIELDS}
# Rules mostly use the ACL fields; the others appear now and then.
FIELD_CHOICES = [*FIELDS, "src", "dst", "dst", "dst_port", "dst_port", "proto", "proto"]


@st.composite
def rule_sets(draw) -> list[Rule]:
    n = draw(st.integers(0, 40))
    prios = draw(st.lists(st.integers(-1000, 1000), min_size=n, max_size=n, unique=True))
    rules = []
    for i, prio in enumerate(prios):
        names = draw(st.lists(st.sampled_from(FIELD_CHOICES), max_size=4, unique=True))
        fields = {name: draw(FIELD_STRATEGIES[name]) for name in names}
        rules.append(Rule(f"r{i}", prio, Match(fields), Allow() if i % 2 else Deny()))
    return rules


def interesting_values(rules: list[Rule]) -> dict[str, list]:
    """Per field: interval endpoints +-1, midpoints and a few others (None included)."""
    values: dict[str, set] = {name: {None} for name in FIELDS}
    for rule in rules:
        for name, fs in rule.match.fields.items():
            for lo, hi in fs.pos + fs.neg:
                values[name].update((lo - 1, lo, lo + 1, (lo + hi) // 2, hi - 1, hi, hi + 1))
    for name in FIELDS:
        values[name].update((0, (1 << FIELD_BITS[name]) - 1))
    return {name: sorted(vs, key=lambda v: (v is None, v)) for name, vs in values.items()}


def keys_for(rules: list[Rule], rng: random.Random, count: int) -> list[tuple]:
    values = interesting_values(rules)
    keys = []
    for _ in range(count):
        key = [rng.choice(values[name]) for name in FIELDS]
        if rules and rng.random() < 0.5:  # aim inside one rule's positive intervals
            for name, fs in rng.choice(rules).match.fields.items():
                if fs.pos:
                    lo, hi = rng.choice(fs.pos)
                    if lo <= hi:
                        key[IDX[name]] = rng.choice((lo, hi, rng.randint(lo, hi)))
        keys.append(tuple(key))
    return keys


def assert_agree(rules: list[Rule], keys: list[tuple], **tuning: int) -> None:
    ref = LinearClassifier(rules)
    fast = Classifier(rules, **tuning)
    assert len(fast) == len(ref) == len(rules)
    for key in keys:
        expected = ref.lookup(key)
        got = fast.lookup(key)
        assert got is expected, (key, expected, got)


# Tunings that force every code path on small rule sets: splitting down to single-rule
# leaves, covers coarsened after one block, copies capped, prefix lengths rounded.
TUNINGS = [
    {},
    {"leaf_size": 1},
    {"leaf_size": 1, "cover_cap": 1, "dup_cap": 2, "max_levels": 1},
    {"leaf_size": 2, "cover_cap": 3, "max_levels": 2},
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rules=rule_sets(), seed=st.integers(0, 2**32), tuning=st.sampled_from(TUNINGS))
def test_agrees_with_linear(rules, seed, tuning):
    assert_agree(rules, keys_for(rules, random.Random(seed), 60), **tuning)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32))
def test_agrees_with_linear_larger_sets(seed):
    """A few hundred ACL-like rules: deeper trees than the small hypothesis sets."""
    rng = random.Random(seed)
    rules = []
    for i, prio in enumerate(rng.sample(range(100_000), 300)):
        fields = {}
        if rng.random() < 0.8:
            fields["dst"] = FieldSet(
                pos=(block(rng.choice(V4_ANCHORS), rng.choice((104, 112, 120, 128)), 128),)
            )
        if rng.random() < 0.3:
            fields["src"] = FieldSet(
                pos=(block(rng.choice(V6_ANCHORS), rng.choice((48, 64, 128)), 128),)
            )
        if rng.random() < 0.7:
            fields["proto"] = FieldSet(pos=((6, 6),) if rng.random() < 0.6 else ((17, 17),))
        r = rng.random()
        if r < 0.5:
            p = rng.choice(PORT_ANCHORS)
            fields["dst_port"] = FieldSet(pos=((p, p),))
        elif r < 0.6:
            lo = rng.randint(0, 60000)
            fields["dst_port"] = FieldSet(pos=((lo, lo + rng.randint(0, 5000)),))
        elif r < 0.65:
            fields["dst_port"] = FieldSet(neg=((22, 22),))
        rules.append(Rule(f"r{i}", prio, Match(fields), Allow()))
    keys = keys_for(rules, rng, 300)
    assert_agree(rules, keys)
    assert_agree(rules, keys, leaf_size=1)


# --------------------------------------------------------------------------- hand-written


def rule(name: str, prio: int, **fields: FieldSet) -> Rule:
    return Rule(name, prio, Match(fields), Allow())


def key(**values: int | None) -> tuple:
    return tuple(values.get(name) for name in FIELDS)


def net(cidr: str) -> FieldSet:
    return FieldSet(pos=(cidr_to_interval(cidr),))


def one(*values: int) -> FieldSet:
    return FieldSet(pos=tuple((v, v) for v in values))


@pytest.mark.parametrize("cls", [LinearClassifier, Classifier])
def test_empty_rule_set(cls):
    c = cls([])
    assert len(c) == 0
    assert c.lookup(key(dst=ip_to_int("10.0.0.1"))) is None
    assert c.lookup(key()) is None


@pytest.mark.parametrize("cls", [LinearClassifier, Classifier])
def test_rule_without_conditions_matches_everything(cls):
    catch_all = rule("all", 100)
    specific = rule("web", 10, dst=net("10.0.0.0/8"), proto=one(6), dst_port=one(80, 443))
    c = cls([catch_all, specific])
    assert c.lookup(key()) is catch_all
    assert c.lookup(key(dst=ip_to_int("10.1.1.1"), proto=6, dst_port=443)) is specific
    assert c.lookup(key(dst=ip_to_int("10.1.1.1"), proto=6, dst_port=22)) is catch_all
    assert c.lookup(key(dst=ip_to_int("10.1.1.1"), proto=6)) is catch_all  # no port: None


@pytest.mark.parametrize("cls", [LinearClassifier, Classifier])
def test_priority_not_input_order(cls):
    a = rule("a", 20, dst=net("10.0.0.0/8"))
    b = rule("b", 10, dst=net("10.1.0.0/16"))
    c_ = rule("c", 5, dst=net("10.1.2.0/24"), proto=one(17))
    c = cls([a, b, c_])
    assert c.lookup(key(dst=ip_to_int("10.1.2.3"), proto=6)) is b
    assert c.lookup(key(dst=ip_to_int("10.1.2.3"), proto=17)) is c_
    assert c.lookup(key(dst=ip_to_int("10.2.0.1"), proto=17)) is a
    assert c.lookup(key(dst=ip_to_int("11.0.0.1"))) is None


@pytest.mark.parametrize("cls", [LinearClassifier, Classifier])
def test_negations_ranges_and_none(cls):
    not_ssh = rule("not-ssh", 1, dst_port=FieldSet(neg=((22, 22),)))
    except_block = rule(
        "v4-but",
        2,
        dst=FieldSet(pos=(cidr_to_interval("10.0.0.0/8"),), neg=(cidr_to_interval("10.9.0.0/16"),)),
    )
    high = rule("high", 3, src_port=FieldSet(pos=((1024, 65535),)))
    c = cls([not_ssh, except_block, high])
    assert c.lookup(key(dst_port=80)) is not_ssh
    assert c.lookup(key(dst_port=22)) is None
    assert c.lookup(key(dst_port=22, dst=ip_to_int("10.8.0.1"))) is except_block
    assert c.lookup(key(dst_port=22, dst=ip_to_int("10.9.0.1"))) is None
    assert c.lookup(key(dst=ip_to_int("10.9.0.1"), src_port=1024)) is high
    assert c.lookup(key(dst=ip_to_int("10.9.0.1"), src_port=1023)) is None
    # A packet without the field never matches a condition on it, negated or not.
    assert c.lookup(key(dst=ip_to_int("10.9.0.1"))) is None


@pytest.mark.parametrize("cls", [LinearClassifier, Classifier])
def test_ipv4_and_ipv6_share_one_space(cls):
    v4 = rule("v4", 1, dst=net("0.0.0.0/0"))  # only IPv4-mapped addresses
    v6 = rule("v6", 2, dst=net("2001:db8::/32"))
    c = cls([v4, v6])
    assert c.lookup(key(dst=ip_to_int("1.2.3.4"))) is v4
    assert c.lookup(key(dst=ip_to_int("2001:db8::1"))) is v6
    assert c.lookup(key(dst=ip_to_int("2001:db9::1"))) is None
    assert c.lookup(key(dst=IPV4_BASE - 1)) is None


@pytest.mark.parametrize("cls", [LinearClassifier, Classifier])
def test_conditions_that_match_nothing_and_odd_values(cls):
    never = rule("never", 1, proto=FieldSet(pos=((10, 5),)))  # empty interval only
    everything_negated = rule("negated", 2, vlan=FieldSet(pos=((0, 4095),), neg=((0, 4095),)))
    wide = rule("wide", 3, dst_port=FieldSet(pos=((0, 1 << 20),)))  # wider than 16 bits
    c = cls([never, everything_negated, wide])
    assert c.lookup(key(proto=7, vlan=1)) is None
    assert c.lookup(key(dst_port=70_000)) is wide
    assert c.lookup(key(dst_port=-1)) is None


def test_stats_and_len():
    rules = [rule(f"r{i}", i, dst=net(f"10.{i}.0.0/16"), dst_port=one(80)) for i in range(200)]
    c = Classifier(rules)
    st_ = c.stats()
    assert len(c) == 200 and st_["rules"] == 200
    assert st_["inner"] >= 1 and st_["max_leaf"] <= 6
    assert c.lookup(key(dst=ip_to_int("10.7.1.1"), dst_port=80)) is rules[7]
    assert c.lookup(key(dst=ip_to_int("10.7.1.1"), dst_port=81)) is None


def test_many_rules_against_linear():
    """A fixed, larger sample: 2000 mixed rules, 1000 keys."""
    rng = random.Random(7)
    rules = []
    for i, prio in enumerate(rng.sample(range(1_000_000), 2000)):
        fields = {}
        if rng.random() < 0.9:
            length = rng.choice((104, 112, 120, 128, 48, 64))
            anchor = rng.choice(V4_ANCHORS if length > 96 else V6_ANCHORS)
            fields["dst"] = FieldSet(pos=(block(anchor ^ rng.getrandbits(24), length, 128),))
        if rng.random() < 0.4:
            fields["src"] = FieldSet(
                pos=(block(rng.choice(V4_ANCHORS), rng.randint(96, 128), 128),)
            )
        if rng.random() < 0.1:
            fields["src"] = FieldSet(neg=(block(rng.choice(V4_ANCHORS), 120, 128),))
        if rng.random() < 0.8:
            fields["proto"] = one(rng.choice((6, 17, 1)))
        if rng.random() < 0.7:
            ports = rng.sample(PORT_ANCHORS, rng.randint(1, 3))
            fields["dst_port"] = one(*ports)
        rules.append(Rule(f"r{i}", prio, Match(fields), Allow()))
    assert_agree(rules, keys_for(rules, rng, 1000))
