#!/usr/bin/env python3
"""Policy loading: the loader with its fast path against the loader before it, same run.

For 100, 1k and 10k rules (the ACL of tools/bench/revalidate.py: prefix + proto + port per
rule) it times ``parse_policy`` (fast YAML + hand validation when certain, else the full
path) and ``_build_checked`` (PyYAML + pydantic for every document: the loader before), best
and median of ``--repeat`` runs, and the two halves of each: YAML -> tree, tree -> Policy.
It also times a 10k-rule document with one error in its last rule (the fast path gives up
and the full path words the error: what an invalid put costs) and the commented example
policy (its comments hold characters the fast YAML path refuses: PyYAML + hand validation).
Target: 10k rules in <= 0.3 s. Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools" / "bench"))

from revalidate import policy_text, rules_yaml  # noqa: E402

from appliance import fastyaml, policyfast  # noqa: E402
from appliance.policy import (  # noqa: E402
    ConfigError,
    PolicySpec,
    _build_checked,
    _load_yaml,
    parse_policy,
)


def timed(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    runs = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t)
    return min(runs), statistics.median(runs)


def expect_error(fn: Callable[[str], object], text: str) -> Callable[[], None]:
    def run() -> None:
        try:
            fn(text)
        except ConfigError:
            return
        raise AssertionError("the broken document loaded")
    return run


def cases(n: int, with_invalid: bool) -> list[tuple[str, Callable[[], object],
                                                  Callable[[], object]]]:
    """(what, the loader before, the loader now) for a policy of ``n`` rules."""
    text = policy_text(rules_yaml(n))
    digest = hashlib.sha256(text.encode()).hexdigest()
    assert parse_policy(text) == _build_checked(text, "<string>", digest)
    doc = _load_yaml(text, "<string>")
    rows = [
        ("whole load", lambda: _build_checked(text, "<string>", digest),
         lambda: parse_policy(text)),
        ("  YAML -> tree", lambda: _load_yaml(text, "<string>"), lambda: fastyaml.load(text)),
        ("  tree -> Policy", lambda: PolicySpec.model_validate(doc).to_policy("s", digest),
         lambda: policyfast.build(doc, "s", digest)),
    ]
    if with_invalid:
        broken = text[:text.rindex("action:")] + "action: dney}\n"
        rows.append(("invalid (last rule)",
                     expect_error(lambda t: _build_checked(t, "<string>", digest), broken),
                     expect_error(parse_policy, broken)))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="100 and 1k rules, 2 runs")
    args = p.parse_args(argv)
    sizes = (100, 1000) if args.quick else (100, 1000, 10_000)
    repeat = 2 if args.quick else args.repeat
    print(f"{'rules':>6} {'what':<26} {'before best':>12} {'new best':>10} {'before med':>11} "
          f"{'new med':>9} {'speed-up':>9}")
    for n in sizes:
        for what, before, new in cases(n, with_invalid=n == sizes[-1]):
            b_best, b_med = timed(before, repeat)
            n_best, n_med = timed(new, repeat)
            print(f"{n:>6} {what:<26} {b_best:>11.3f}s {n_best:>9.3f}s {b_med:>10.3f}s "
                  f"{n_med:>8.3f}s {b_med / n_med:>8.1f}x", flush=True)
    example = (ROOT / "config" / "examples" / "policy.yaml").read_text()
    digest = hashlib.sha256(example.encode()).hexdigest()
    b_best, b_med = timed(lambda: _build_checked(example, "e", digest), repeat * 4)
    n_best, n_med = timed(lambda: parse_policy(example, "e"), repeat * 4)
    print(f"{'ex.':>6} {'commented example':<26} {b_best * 1e3:>10.2f}ms {n_best * 1e3:>8.2f}ms "
          f"{b_med * 1e3:>9.2f}ms {n_med * 1e3:>7.2f}ms {b_med / n_med:>8.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
