"""Benchmark `appliance.classifier`: Classifier vs LinearClassifier on ACL-like rule sets.

    python tools/bench/classifier.py [--quick] [--seed N]

Generates seeded random rule sets of 1k, 10k and 50k rules (dst/src prefixes /8 /16 /24 /32
and some IPv6 /48 /64 /128, tcp/udp/icmp/any, mostly exact dst ports with some ranges and
lists, a share of negations, some wildcard rules) and lookup keys (about half built to hit a
rule, the rest random, mostly misses), then prints build time, lookups/s of both classifiers
and their ratio, all measured in this run. The linear classifier is timed over fewer keys.
Both classifiers are compared on every key the linear one was timed on; the mismatch count
must be 0. No assertions about speed: it prints figures. ``--quick`` is a CI smoke run.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from appliance.classifier import Classifier, LinearClassifier
from appliance.model import (
    FIELDS,
    IPV4_BASE,
    PROTO_NUMBERS,
    Allow,
    Deny,
    FieldSet,
    Match,
    Rule,
)

TCP, UDP, ICMP = PROTO_NUMBERS["tcp"], PROTO_NUMBERS["udp"], PROTO_NUMBERS["icmp"]
COMMON_PORTS = (22, 53, 80, 123, 443, 445, 993, 1433, 3306, 3389, 5432, 6379, 8080, 8443, 9000)
IDX = {name: i for i, name in enumerate(FIELDS)}


def v4_prefix(rng: random.Random, length: int) -> tuple[int, int]:
    # Mostly private space so that prefixes overlap and nest like real ACLs.
    base = rng.choice((10 << 24, (172 << 24) | (16 << 16), (192 << 24) | (168 << 16)))
    addr = base | rng.getrandbits(24) if rng.random() < 0.8 else rng.getrandbits(32)
    k = 32 - length
    lo = IPV4_BASE | ((addr >> k) << k)
    return lo, lo + (1 << k) - 1


def v6_prefix(rng: random.Random, length: int) -> tuple[int, int]:
    addr = (0x2001_0DB8 << 96) | (rng.getrandbits(16) << 80) | rng.getrandbits(80)
    k = 128 - length
    lo = (addr >> k) << k
    return lo, lo + (1 << k) - 1


def ip_prefix(rng: random.Random) -> tuple[int, int]:
    r = rng.random()
    if r < 0.9:
        return v4_prefix(rng, rng.choices((8, 16, 24, 32), (1, 3, 5, 2))[0])
    return v6_prefix(rng, rng.choice((48, 64, 128)))


def ip_condition(rng: random.Random, wild_share: float) -> FieldSet | None:
    r = rng.random()
    if r < wild_share:
        return None
    if r < wild_share + 0.05:  # a short list of prefixes
        return FieldSet(pos=tuple(ip_prefix(rng) for _ in range(rng.randint(2, 3))))
    lo, hi = ip_prefix(rng)
    if rng.random() < 0.05 and hi - lo > 255:  # "this prefix except a sub-block"
        size = (hi - lo + 1) >> rng.randint(2, 8)
        nlo = lo + size * rng.randrange((hi - lo + 1) // size)
        return FieldSet(pos=((lo, hi),), neg=((nlo, nlo + size - 1),))
    return FieldSet(pos=((lo, hi),))


def port_condition(rng: random.Random) -> FieldSet | None:
    r = rng.random()
    if r < 0.10:
        return None
    if r < 0.70:
        p = rng.choice(COMMON_PORTS) if rng.random() < 0.6 else rng.randint(1, 65535)
        return FieldSet(pos=((p, p),))
    if r < 0.85:
        lo = rng.randint(1, 60000)
        return FieldSet(pos=((lo, lo + rng.randint(1, 5000)),))
    if r < 0.97:
        ports = rng.sample(COMMON_PORTS, rng.randint(2, 4))
        return FieldSet(pos=tuple((p, p) for p in ports))
    return FieldSet(neg=((22, 22),))  # "any port but ssh"


def make_rules(n: int, rng: random.Random) -> list[Rule]:
    prios = rng.sample(range(n * 10), n)
    rules = []
    for i in range(n):
        fields: dict[str, FieldSet] = {}
        if rng.random() < 0.01:  # wildcard rules: any address, one service
            fields["proto"] = FieldSet(pos=((TCP, TCP),))
            p = rng.randint(1, 65535)
            fields["dst_port"] = FieldSet(pos=((p, p),))
        else:
            dst = ip_condition(rng, 0.10)
            src = ip_condition(rng, 0.55)
            while dst is None and src is None:  # some address is always constrained here
                src = ip_condition(rng, 0.55)
            if dst:
                fields["dst"] = dst
            if src:
                fields["src"] = src
            r = rng.random()
            if r < 0.5:
                proto = TCP
            elif r < 0.8:
                proto = UDP
            elif r < 0.85:
                proto = ICMP
            else:
                proto = None
            if proto is not None:
                fields["proto"] = FieldSet(pos=((proto, proto),))
            if proto in (TCP, UDP):
                port = port_condition(rng)
                if port:
                    fields["dst_port"] = port
                if rng.random() < 0.03:
                    fields["src_port"] = FieldSet(pos=((1024, 65535),))
        action = Allow() if rng.random() < 0.7 else Deny()
        rules.append(Rule(f"r{i}", prios[i], Match(fields), action))
    return rules


def random_value(rng: random.Random, name: str) -> int | None:
    if name in ("src", "dst"):
        r = rng.random()
        if r < 0.5:
            return v4_prefix(rng, 32)[0]
        if r < 0.9:  # anywhere in IPv4
            return IPV4_BASE | rng.getrandbits(32)
        return v6_prefix(rng, 128)[0]
    if name in ("src_port", "dst_port"):
        return rng.choice(COMMON_PORTS) if rng.random() < 0.4 else rng.randint(0, 65535)
    if name == "proto":
        return rng.choice((TCP, TCP, UDP, ICMP))
    if name == "dscp":
        return rng.choice((0, 0, 0, 46))
    return None  # macs, vlan, vni: not set by these keys (the rules do not use them either)


def make_keys(rules: list[Rule], n: int, rng: random.Random) -> list[tuple]:
    keys = []
    for _ in range(n):
        values = [random_value(rng, name) for name in FIELDS]
        if rng.random() < 0.5:  # aim at a rule: pick a value inside each of its conditions
            rule = rng.choice(rules)
            for name, fs in rule.match.fields.items():
                if fs.pos:
                    lo, hi = rng.choice(fs.pos)
                    values[IDX[name]] = rng.randint(lo, hi)
        if values[IDX["proto"]] == ICMP:
            values[IDX["src_port"]] = values[IDX["dst_port"]] = None
        keys.append(tuple(values))
    return keys


def rate(clf, keys: list[tuple]) -> tuple[float, list]:
    lookup = clf.lookup
    t0 = time.perf_counter()
    results = [lookup(k) for k in keys]
    dt = time.perf_counter() - t0
    return len(keys) / dt, results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small, fast smoke run")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)

    if args.quick:
        plan = [(1_000, 2_000, 50), (10_000, 2_000, 10)]
    else:
        plan = [(1_000, 50_000, 2_000), (10_000, 50_000, 300), (50_000, 50_000, 60)]
    print(
        f"{'rules':>7} | {'build s':>8} | {'mem MB':>7} | {'Classifier l/s':>14} | "
        f"{'Linear l/s':>10} | {'ratio':>7} | {'hits':>5} | {'checked':>7} | {'mismatch':>8} | "
        "tree"
    )
    total_mismatch = 0
    for n_rules, n_fast, n_slow in plan:
        rng = random.Random(args.seed * 1_000_003 + n_rules)
        rules = make_rules(n_rules, rng)
        keys = make_keys(rules, n_fast, rng)

        t0 = time.perf_counter()
        fast = Classifier(rules)
        build = time.perf_counter() - t0
        mem = "-"
        if not args.quick:  # a second build under tracemalloc (slower, so not timed)
            tracemalloc.start()
            again = Classifier(rules)
            mem = f"{tracemalloc.get_traced_memory()[0] / 1e6:.1f}"
            tracemalloc.stop()
            del again
        slow = LinearClassifier(rules)

        fast_rate, fast_results = rate(fast, keys)
        slow_keys = keys[:: max(1, len(keys) // n_slow)][:n_slow]
        slow_rate, slow_results = rate(slow, slow_keys)
        check_results = [fast.lookup(k) for k in slow_keys]
        mismatch = sum(a is not b for a, b in zip(check_results, slow_results, strict=True))
        total_mismatch += mismatch
        hits = sum(r is not None for r in fast_results) / len(fast_results)
        st = fast.stats()
        tree = (
            f"inner={st['inner']} leaves={st['leaves']} entries={st['entries']} "
            f"max_leaf={st['max_leaf']} depth={st['depth']}"
        )
        print(
            f"{n_rules:>7} | {build:>8.3f} | {mem:>7} | {fast_rate:>14,.0f} | "
            f"{slow_rate:>10,.0f} | {fast_rate / slow_rate:>6,.0f}x | {hits:>5.0%} | "
            f"{len(slow_keys):>7} | {mismatch:>8} | {tree}",
            flush=True,
        )
    print(f"mismatches: {total_mismatch}")
    return 1 if total_mismatch else 0


if __name__ == "__main__":
    sys.exit(main())
