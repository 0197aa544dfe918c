#!/usr/bin/env python3
"""Host memory per connection: bytes the switch keeps for each UDP connection through ACL + SNAT.

Replays new UDP connections through the shared pipeline (`appliance.pipeline.Pipeline`) with
a simulated NIC (`appliance.datapath.sim.SimNic`, capacity above the flow count, so every flow
is also a cache entry, as in the kernel) under the demo policy (config/examples/policy.yaml:
vm1's stateful ``acl``, ``nat`` with SNAT to 198.51.100.7, ``vnet``). Each connection is one
packet from vm1 to a new (destination, source port) and its reply from the uplink, so each
holds a flow pair with counters, a connection, its SNAT binding, timer entries and two cache
entries. Nothing expires during the replay (the whole run lasts 1 s of packet time).

Each size runs in a fresh child process measuring resident memory (RSS from
/proc/self/statm); the smallest size also runs once more with tracemalloc (live Python
allocations, and where they were made; ~5x slower, so not at 1M). The baseline is the same
child right before the replay (pipeline built, policy loaded, nothing replayed), so the
growth is what the connections hold. Prints bytes per connection and per flow, and the top
allocation sites per connection. Asserts nothing.

    tools/bench/memory.py [--quick] [--sizes 100000,1000000] [--no-tracemalloc]

Target (issue 11): <= 300 bytes per flow.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Final

ROOT: Final = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from appliance import packet as pk  # noqa: E402
from appliance.datapath.sim import SimNic  # noqa: E402
from appliance.model import ip_to_int, mac_to_int  # noqa: E402
from appliance.pipeline import Pipeline  # noqa: E402
from appliance.policy import load_policy  # noqa: E402

POLICY: Final = ROOT / "config" / "examples" / "policy.yaml"
SIZES: Final = (100_000, 1_000_000)  # connections
QUICK_SIZES: Final = (100_000,)
VM_PORT: Final = "vm1"
UPLINK: Final = "up0"
VM_MAC: Final = mac_to_int("02:00:00:00:00:01")
GW_MAC: Final = mac_to_int("02:00:00:00:00:fe")
ROUTER_MAC: Final = mac_to_int("02:00:00:00:01:01")
VM_IP: Final = ip_to_int("10.0.0.1")
SNAT_IP: Final = ip_to_int("198.51.100.7")
DST_BASE: Final = ip_to_int("100.64.0.0")  # outside 10/8 (SNAT applies) and the overlay
DPORT: Final = 9999
SPORT_LO, SPORT_HI = 1024, 65535  # one destination per 64,512 source ports
START_NS: Final = 1_700_000_000 * 10**9
STEP_NS: Final = 1_000  # packet time between connections (1M connections in 1 s)
TOP_SITES: Final = 12
PAGE: Final = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    """Resident set size in bytes."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * PAGE


def endpoints(i: int) -> tuple[int, int]:
    """(destination, source port) of connection ``i``: every connection a new 5-tuple."""
    span = SPORT_HI - SPORT_LO + 1
    return DST_BASE + i // span, SPORT_LO + i % span


def replay(pipeline: Pipeline, n: int) -> dict[str, int]:
    """``n`` connections (request + reply); counts of what did not go as expected."""
    bad = {"request_dropped": 0, "reply_dropped": 0, "reply_not_cached": 0}
    process = pipeline.process
    for i in range(n):
        dst, sport = endpoints(i)
        now = START_NS + i * STEP_NS
        out = pk.build_frame(src_mac=VM_MAC, dst_mac=GW_MAC, src=VM_IP, dst=dst, proto=17,
                             sport=sport, dport=DPORT, payload=b"q" * 16)
        if process(out, VM_PORT, now).verdict != "forward":
            bad["request_dropped"] += 1
            continue
        back = pk.build_frame(src_mac=ROUTER_MAC, dst_mac=GW_MAC, src=dst, dst=SNAT_IP,
                              proto=17, sport=DPORT, dport=sport, payload=b"r" * 32)
        r = process(back, UPLINK, now + STEP_NS // 2)
        if r.verdict != "forward":
            bad["reply_dropped"] += 1
        elif r.path != "nic":
            bad["reply_not_cached"] += 1
    return bad


def child(n: int, traced: bool) -> dict:
    """Measure one size in this (fresh) process; returns the figures as a dict."""
    policy = load_policy(POLICY)
    nic = SimNic(capacity=2 * n + 1024)
    pipeline = Pipeline(policy, nic, max_flows=2 * n + 1024, port_share=1.0)  # one port: all
    gc.collect()
    if traced:
        tracemalloc.start()
    before = tracemalloc.take_snapshot() if traced else None
    mem0 = tracemalloc.get_traced_memory()[0] if traced else rss()
    t0 = time.perf_counter()
    bad = replay(pipeline, n)
    took = time.perf_counter() - t0
    gc.collect()
    mem1 = tracemalloc.get_traced_memory()[0] if traced else rss()
    out = {"conns": n, "flows": len(pipeline.flows), "nic_entries": len(nic),
           "created": pipeline.flows.created, "grown": mem1 - mem0, "seconds": took,
           "bad": bad, "sites": []}
    if traced and before is not None:
        diff = tracemalloc.take_snapshot().compare_to(before, "lineno")
        for st in sorted(diff, key=lambda s: -s.size_diff)[:TOP_SITES]:
            frame = st.traceback[0]
            where = os.path.relpath(frame.filename, ROOT) if frame.filename.startswith(
                str(ROOT)) else Path(frame.filename).name
            out["sites"].append({"site": f"{where}:{frame.lineno}", "bytes": st.size_diff,
                                 "blocks": st.count_diff})
    return out


def run_child(n: int, traced: bool) -> dict:
    argv = [sys.executable, __file__, "--child", str(n)] + (["--traced"] if traced else [])
    p = subprocess.run(argv, capture_output=True, text=True, check=False)
    if p.returncode != 0:
        raise RuntimeError(f"child for {n} connections failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def describe(r: dict, what: str) -> str:
    per_conn, per_flow = r["grown"] / r["conns"], r["grown"] / max(1, r["flows"])
    bad = ", ".join(f"{k} {v}" for k, v in r["bad"].items() if v) or "none"
    return (f"{r['conns']:>9,} {what:11} {r['grown'] / 2**20:>9,.1f} MiB {per_conn:>9,.0f} "
            f"{per_flow:>9,.0f} {r['flows']:>10,} {r['nic_entries']:>10,} {r['seconds']:>7.1f}"
            f"  {bad}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="100k connections only")
    p.add_argument("--sizes", help="comma-separated connection counts")
    p.add_argument("--no-tracemalloc", action="store_true", help="RSS only (faster)")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    p.add_argument("--traced", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.child, args.traced)))
        return 0
    sizes = ([int(s) for s in args.sizes.split(",")] if args.sizes
             else QUICK_SIZES if args.quick else SIZES)
    print(f"memory: new UDP connections through {POLICY.relative_to(ROOT)} (vm1: acl, nat "
          "SNAT, vnet), request + reply each, SimNic caching every flow; growth over the same "
          "process before the replay")
    print(f"{'conns':>9} {'measure':11} {'grown':>13} {'B/conn':>9} {'B/flow':>9} "
          f"{'flows':>10} {'nic cache':>10} {'replay s':>7}  unexpected")
    traced_rows = []
    for n in sizes:
        print(describe(run_child(n, False), "RSS"), flush=True)
        if not args.no_tracemalloc and n == min(sizes):
            t = run_child(n, True)
            traced_rows.append(t)
            print(describe(t, "tracemalloc"), flush=True)
    for t in traced_rows:
        print(f"\ntop allocation sites, {t['conns']:,} connections (tracemalloc; bytes and "
              "blocks per connection):")
        for s in t["sites"]:
            print(f"  {s['bytes'] / t['conns']:>8,.1f} B {s['blocks'] / t['conns']:>6.2f} "
                  f"blocks  {s['site']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
