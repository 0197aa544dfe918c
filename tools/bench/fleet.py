#!/usr/bin/env python3
"""A fleet on one machine: a real etcd, N agents, the time from ``put`` to "applied" on all N.

Each agent is what a host runs of applianced's control plane: the etcd policy source
(`appliance.daemon.policysource.EtcdPolicySource`, its own HTTP connection and watch) and
policy compilation into its own pipeline (`Pipeline.set_policy`: classifiers + diff) -- no
datapath. Agents are trio tasks spread over ``--procs`` processes (one per core by default).
The policy has ``--rules`` rules (1k by default); each round puts a version in which one rule
changed, at a known monotonic time, and every agent reports when it applied that revision.

Baseline in the same run, same N: "notify" agents that only watch the key and note when the
event arrives (no parse, no compile): etcd's fan-out plus reading the event. The difference
is the agents' own work, which on this machine is N hosts' CPU time squeezed onto 2 cores;
on a real fleet every host has its own, so a host's latency is about fan-out + one apply
(the "one apply" column: apply time of one agent alone).

Prints p50/p99/max of per-agent latencies (all rounds pooled) and the median over rounds of
the time until the last agent applied. Asserts nothing.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools" / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

KEY = "/fleet/policy"
READY_TIMEOUT = 180.0  # seconds for all agents to read and watch
ROUND_TIMEOUT = 300.0  # seconds for all agents to apply one put


def policy_for(rules: int, round_no: int) -> str:
    from revalidate import policy_text, rules_yaml

    lines = rules_yaml(rules)
    # one rule changes per round: a real edit, so set_policy has a diff to compute
    lines[0] = lines[0].rsplit("dst_port:", 1)[0] + f"dst_port: {2000 + round_no}}}, " \
        "action: deny}"
    return policy_text(lines)


# ------------------------------------------------------------------- worker process

class CompileAgent:
    """The parts of `appliance.daemon.app.Daemon` the policy source uses, with a pipeline
    that really compiles each policy (SimNic: no kernel datapath)."""

    def __init__(self, index: int, report: Any) -> None:
        import trio

        from appliance.daemon.events import EventBus

        self.index = index
        self.report = report
        self.policy_lock = trio.Lock()
        self.events = EventBus()
        self.reloads_failed = 0
        self.pipeline: Any = None

    async def apply_policy(self, policy: Any, *, reason: str, text: str | None = None) -> None:
        self.pipeline.set_policy(policy)
        revision = int(policy.source.rsplit("@", 1)[1])
        self.report.put((self.index, revision, time.monotonic()))


async def run_agents(url: str, first: int, count: int, mode: str, cache_dir: str,
                     report: Any, ready: Any) -> None:
    import trio

    from appliance.daemon.policysource import EtcdPolicySource, SourceOptions
    from appliance.datapath.sim import SimNic
    from appliance.etcd import EtcdClient, parse_etcd_url
    from appliance.pipeline import Pipeline

    parsed = parse_etcd_url(url)

    async def compile_agent(i: int, started: trio.Event) -> None:
        agent = CompileAgent(i, report)
        source = EtcdPolicySource(parsed, SourceOptions(
            cache=Path(cache_dir) / f"agent{i}.json", health_interval=3600.0,
            request_timeout=30.0, connect_timeout=10.0))
        policy, _ = await source.initial()
        agent.pipeline = Pipeline(policy, SimNic())
        async with trio.open_nursery() as nursery:
            await nursery.start(source.run, agent)
            while not source.connected:
                await trio.sleep(0.05)
            started.set()

    async def notify_agent(i: int, started: trio.Event) -> None:
        async with EtcdClient(parsed.endpoints, request_timeout=30.0,
                              connect_timeout=10.0) as client:
            rev = (await client.get(KEY)).revision
            async with client.watch(KEY, rev + 1) as batches:
                async for batch in batches:
                    if batch.created:
                        started.set()
                    for ev in batch.events:
                        report.put((i, ev.revision, time.monotonic()))

    agent = compile_agent if mode == "compile" else notify_agent
    async with trio.open_nursery() as nursery:
        events = []
        for i in range(first, first + count):
            started = trio.Event()
            events.append(started)
            nursery.start_soon(agent, i, started)
            await trio.sleep(0)
        for started in events:
            await started.wait()
        ready.put(count)


def worker(url: str, first: int, count: int, mode: str, cache_dir: str, report: Any,
           ready: Any) -> None:
    import trio

    from appliance.daemon import logs

    logs.configure("console", "error")
    trio.run(run_agents, url, first, count, mode, cache_dir, report, ready)


# ------------------------------------------------------------------------ parent

def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def one_apply(rules: int) -> float:
    """Parse + compile of one revision by one agent alone (what a host with its own CPU
    spends after the event arrives), median of 5."""
    from appliance.datapath.sim import SimNic
    from appliance.pipeline import Pipeline
    from appliance.policy import parse_policy

    pipeline = Pipeline(parse_policy(policy_for(rules, 0)), SimNic())
    runs = []
    for r in range(1, 6):
        text = policy_for(rules, r)
        t = time.perf_counter()
        pipeline.set_policy(parse_policy(text, f"etcd {KEY}@{r}"))
        runs.append(time.perf_counter() - t)
    return statistics.median(runs)


def run_fleet(cluster: Any, n: int, mode: str, procs: int, rounds: int, rules: int,
              cache_dir: str) -> tuple[list[float], list[float]]:
    ctx = mp.get_context("spawn")
    report, ready = ctx.Queue(), ctx.Queue()
    per = [n // procs + (1 if i < n % procs else 0) for i in range(procs)]
    workers = []
    first = 0
    for count in per:
        if count:
            p = ctx.Process(target=worker, args=(cluster.url(KEY), first, count, mode,
                                                 cache_dir, report, ready), daemon=True)
            p.start()
            workers.append(p)
        first += count
    try:
        got = 0
        deadline = time.monotonic() + READY_TIMEOUT
        while got < n:
            got += ready.get(timeout=max(0.1, deadline - time.monotonic()))
        latencies: list[float] = []
        all_applied: list[float] = []
        for r in range(1, rounds + 1):
            text = policy_for(rules, r)
            t0 = time.monotonic()
            rev = cluster.put(KEY, text)
            seen: dict[int, float] = {}
            deadline = time.monotonic() + ROUND_TIMEOUT
            while len(seen) < n:
                index, revision, t = report.get(timeout=max(0.1, deadline - time.monotonic()))
                if revision == rev:
                    seen[index] = t - t0
            latencies += seen.values()
            all_applied.append(max(seen.values()))
            time.sleep(0.2)
        return latencies, all_applied
    finally:
        for p in workers:
            p.terminate()
        for p in workers:
            p.join(10)


def main(argv: list[str] | None = None) -> int:
    from etcd_lab import etcd_cluster

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--agents", default="10,100,500", help="N values (comma-separated)")
    p.add_argument("--rules", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--procs", type=int, default=os.cpu_count() or 2)
    args = p.parse_args(argv)
    sizes = [int(x) for x in args.agents.split(",")]
    apply_alone = one_apply(args.rules)
    with tempfile.TemporaryDirectory(prefix="apl-fleet-") as tmp, \
            tempfile.TemporaryDirectory(prefix="apl-fleet-", dir="/dev/shm") as shm, \
            etcd_cluster(Path(tmp)) as cluster:
        cluster.put(KEY, policy_for(args.rules, 0))
        size_kb = len(policy_for(args.rules, 0)) / 1024
        print(f"etcd {cluster.members[0].client_url}; policy {args.rules} rules "
              f"({size_kb:.0f} KiB); {args.rounds} puts per row; {args.procs} processes; "
              f"one agent alone applies a revision in {apply_alone * 1e3:.0f} ms")
        print(f"{'agents':>6} {'mode':<8} {'p50':>8} {'p99':>8} {'max':>8} {'all (med)':>10}")
        for n in sizes:
            for mode in ("notify", "compile"):
                lat, everyone = run_fleet(cluster, n, mode, args.procs, args.rounds,
                                          args.rules, shm)
                print(f"{n:>6} {mode:<8} {percentile(lat, 0.5) * 1e3:>6.0f}ms "
                      f"{percentile(lat, 0.99) * 1e3:>6.0f}ms {max(lat) * 1e3:>6.0f}ms "
                      f"{statistics.median(everyone) * 1e3:>8.0f}ms", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
