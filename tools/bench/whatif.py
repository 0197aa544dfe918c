#!/usr/bin/env python3
"""Benchmark policy what-if: the capture comparison and the live connection diff.

Prints figures, asserts nothing; every figure has a baseline measured in the same run:

* ``capture``: ``appliance-trace --compare`` (two pipelines in lock step, every packet's
  outcomes compared) against one plain replay of the same capture (tools/bench/trace.py's
  generator, SNAT mix: every packet rewritten). The ratio says what the comparison costs
  beyond replaying twice (ideal: 2.0).
* ``live``: `LiveDiff` over the connections of tools/bench/revalidate.py's 10k-rule policy,
  for the same changes that benchmark applies, against what the change itself costs
  (``set_policy`` + ``revalidate`` of the same table): the what-if builds the candidate's
  classifiers and walks the same connections revalidation walks, without installing.

Usage: python tools/bench/whatif.py [--quick] [--packets N] [--flows N] [--rules N]
       [--connections N]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def _sibling(name: str) -> ModuleType:
    """Another benchmark of this directory, as a module (trace.py would shadow the stdlib's
    trace if the directory were put on sys.path)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}",
                                                  Path(__file__).with_name(f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


rv = _sibling("revalidate")
tr = _sibling("trace")

from appliance.capture import open_capture  # noqa: E402
from appliance.datapath.sim import SimNic  # noqa: E402
from appliance.pipeline import Pipeline  # noqa: E402
from appliance.policy import parse_policy  # noqa: E402
from appliance.replay import Replayer  # noqa: E402
from appliance.whatif import CaptureComparison, LiveDiff  # noqa: E402


def _best(runs: int, fn) -> tuple[float, object]:
    """Fastest of ``runs`` timings (other work on the machine only ever slows a run)."""
    best, out = float("inf"), None
    for _ in range(runs):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def bench_capture(packets: int, flows: int, runs: int) -> None:
    old = parse_policy(tr.POLICY)
    new = parse_policy(tr.POLICY.replace("snat: {ip: 198.51.100.7}",
                                         "snat: {ip: 198.51.100.9}"))
    with tempfile.TemporaryDirectory() as tmp:
        cap = Path(tmp) / "snat.pcap"
        tr.make_capture(cap, packets, flows, "snat")

        def replay() -> None:
            replayer = Replayer(old)
            with open_capture(cap) as capture:
                for _ in replayer.run(capture):
                    pass

        def compare(policy) -> object:
            with open_capture(cap) as capture:
                return CaptureComparison(Replayer(old), Replayer(policy)).run(capture)

        t_replay, _ = _best(runs, replay)
        print(f"capture: {packets} packets, {flows} connections (SNAT on every packet), "
              f"best of {runs} runs")
        print(f"  {'run':28} {'seconds':>8} {'pkts/s':>10} {'vs replay':>9}  notes")
        print(f"  {'replay (baseline)':28} {t_replay:8.2f} {packets / t_replay:10.0f} "
              f"{1.0:9.2f}")
        for name, policy in (("compare, nothing changes", old),
                             ("compare, every conn changes", new)):
            dt, result = _best(runs, lambda policy=policy: compare(policy))
            print(f"  {name:28} {dt:8.2f} {packets / dt:10.0f} {dt / t_replay:9.2f}  "
                  f"{len(result.changes)} of {result.connections} "  # type: ignore[attr-defined]
                  "connections changed")


def bench_live(rules: int, connections: int, runs: int) -> None:
    lines = rv.rules_yaml(rules)
    base = parse_policy(rv.policy_text(lines))
    p = Pipeline(base, SimNic(4 * connections))
    rv.install(p, connections)
    print(f"live: {rules} rules, {connections} connections ({len(p.flows)} flows), "
          f"best of {runs} runs")
    print(f"  {'change':18} {'apply s':>8} {'what-if s':>9} {'ratio':>6} {'judged':>7} "
          f"{'walked':>7} {'changed':>7} {'breaking':>8}   what-if = shadow build + judge")
    changes = {
        "one rule added": rv.policy_text([*lines[:1], rv.NEW_DENY, *lines[1:]]),
        "one rule edited": rv.policy_text([lines[0].replace("dst_port: ", "dst_port: 1"),
                                           *lines[1:]]),
        "default flipped": rv.policy_text(lines, default="deny"),
    }
    for name, text in changes.items():
        pol = parse_policy(text)

        def what_if(pol=pol) -> LiveDiff:
            live = LiveDiff(p, pol)
            live.check_unseen(1)
            return live

        def apply(pol=pol) -> None:
            p.set_policy(pol)
            p.revalidate(1)

        def back() -> None:
            p.set_policy(base)
            p.revalidate(2)

        t_what, live = _best(runs, what_if)
        t_apply = float("inf")
        for _ in range(runs):
            t_apply = min(t_apply, _best(1, apply)[0])
            back()
        print(f"  {name:18} {t_apply:8.2f} {t_what:9.2f} {t_what / t_apply:6.2f} "
              f"{live.checked:7d} {live.checked - live.skipped:7d} "  # type: ignore[attr-defined]
              f"{len(live.changes):7d} {len(live.breaking):8d}")  # type: ignore[attr-defined]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--packets", type=int, default=300_000)
    ap.add_argument("--flows", type=int, default=10_000)
    ap.add_argument("--rules", type=int, default=10_000)
    ap.add_argument("--connections", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=3, help="capture timings: best of N")
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    args = ap.parse_args()
    if args.quick:
        args.packets, args.flows, args.rules, args.connections = 20_000, 1000, 1000, 5000
    bench_capture(args.packets, args.flows, args.runs)
    bench_live(args.rules, args.connections, args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
