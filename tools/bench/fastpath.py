"""Kernel fast path benchmark: packets/s veth -> TC flowcache -> veth by flow-table size.

Topology (namespaces made here, always deleted)::

    gen eth0 ── in0 [hv: flowcache on ingress, N entries] out0 ── sink eth0

trafgen (netsniff-ng) sends 60-byte UDP frames from one CPU, spread over exactly N flows: the
destination address's last byte counts through A values and the source port through B values,
each advancing per packet; with gcd(A, B) == 1 every one of the A*B == N combinations recurs.
Delivered packets are the sink's rx counter over the measuring window. The 1-flow baseline runs
in the same invocation, so the ratio compares like with like. Also prints the map install rate
(Python offload() calls) and the read_counters time per table size. Asserts nothing.

Usage: tools/bench/fastpath.py [--quick] [--seconds S] [--rounds R]   (root; needs trafgen)
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Final

ROOT: Final = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import nstools  # noqa: E402

from appliance.actions import CompiledActions  # noqa: E402
from appliance.datapath import tc  # noqa: E402
from appliance.flows import Flow  # noqa: E402
from appliance.model import Direction, ip_to_int  # noqa: E402
from appliance.packet import PROTO_UDP  # noqa: E402

# (flows, A = destination last-byte values, B = source ports): A * B == flows, gcd(A, B) == 1.
# The baseline is 6 flows, not 1: trafgen's dinc() needs min < max, and the generator must do
# the same per-packet work in every row (it shares the CPU with the forwarding softirq).
SIZES: Final = ((6, 2, 3), (10_000, 16, 625), (100_000, 32, 3125))
SRC: Final = "10.0.0.1"
DST_PREFIX: Final = "10.2.0."
SPORT_BASE: Final = 1000
DPORT: Final = 9
WARMUP: Final = 0.5  # seconds before counting
SECONDS: Final = 3.0  # measuring window per size
QUICK_SECONDS: Final = 1.0
ROUNDS: Final = 3  # interleaved repetitions; the table shows medians
STOP_TIMEOUT: Final = 5.0  # seconds to wait for trafgen to exit
CAPACITY: Final = 131072  # flows map entries
GEN_MAC: Final = "02:00:00:00:00:01"
OTHER_MAC: Final = "02:00:00:00:00:99"  # the sink drops frames early (PACKET_OTHERHOST)


@dataclass
class Row:
    flows: int
    pps: float
    offered: float
    install_rate: float
    read_ms: float
    misses: int


def trafgen_config(a: int, b: int) -> str:
    """One frame description whose counters walk through a*b flows."""
    # Same shape for every size, so only the table size differs between rows.
    dst = f"{DST_PREFIX}1, da[3]=dinc(1, {a})"
    sport = f"dinc({SPORT_BASE}, {SPORT_BASE + b - 1})"
    return (f"{{ eth(da={OTHER_MAC}, sa={GEN_MAC}), ipv4(sa={SRC}, da={dst}, ttl=64), "
            f"udp(sp={sport}, dp={DPORT}), fill(0x00, 18) }}\n")


def flows_for(a: int, b: int) -> Iterator[tuple]:
    for i in range(a):
        for j in range(b):
            yield (None, PROTO_UDP, ip_to_int(SRC), SPORT_BASE + j,
                   ip_to_int(f"{DST_PREFIX}{1 + i}"), DPORT, None)


def install(dp: tc.TcDatapath, a: int, b: int) -> tuple[list[Flow], float]:
    actions = CompiledActions("out0")
    flows = [Flow(("in0", k), "in0", Direction.OUT, actions, ()) for k in flows_for(a, b)]
    t0 = time.perf_counter()
    for f in flows:
        if not dp.offload(f, 0).ok:
            raise RuntimeError("offload refused")
    return flows, len(flows) / (time.perf_counter() - t0)


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def signal_all(pid: int, sig: int) -> None:
    """Signal trafgen's worker processes, then trafgen (docs/KERNEL.md pitfall 6)."""
    for p in [*children(pid), pid]:
        with suppress(ProcessLookupError):
            os.kill(p, sig)


@contextmanager
def trafgen(ns: nstools.Netns, config: str) -> Iterator[None]:
    """Run trafgen in ``ns`` until the block ends; stop it by signalling its own pids."""
    with tempfile.NamedTemporaryFile("w", suffix=".cfg", delete=False) as f:
        f.write(config)
    proc = subprocess.Popen(["ip", "netns", "exec", ns.name, "trafgen", "--no-sock-mem", "-Q",
                             "--cpus", "1", "-o", "eth0", "-i", f.name],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        yield
    finally:
        signal_all(proc.pid, signal.SIGINT)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            signal_all(proc.pid, signal.SIGKILL)
            proc.wait(STOP_TIMEOUT)
        os.unlink(f.name)


def tx_packets(ns: nstools.Netns, dev: str) -> int:
    return int(ns.run("cat", f"/sys/class/net/{dev}/statistics/tx_packets").strip())


def measure(gen: nstools.Netns, sink: nstools.Netns, config: str, seconds: float) -> tuple[
        float, float]:
    """(delivered pps at the sink, offered pps at the generator) over ``seconds``."""
    with trafgen(gen, config):
        time.sleep(WARMUP)
        r0, t0, w0 = sink.rx_packets("eth0"), tx_packets(gen, "eth0"), time.monotonic()
        time.sleep(seconds)
        r1, t1, w1 = sink.rx_packets("eth0"), tx_packets(gen, "eth0"), time.monotonic()
    return (r1 - r0) / (w1 - w0), (t1 - t0) / (w1 - w0)


def run(seconds: float, rounds: int) -> list[Row]:
    rows: list[Row] = []
    rid = nstools.run_id()
    with ExitStack() as stack:
        gen = stack.enter_context(nstools.netns(rid, "gen"))
        hv = stack.enter_context(nstools.netns(rid, "hv"))
        sink = stack.enter_context(nstools.netns(rid, "sink"))
        nstools.veth(gen, "eth0", hv, "in0", a_mac=GEN_MAC)
        nstools.veth(hv, "out0", sink, "eth0")
        dp = tc.TcDatapath(netns=hv.name, capacity=CAPACITY)
        stack.callback(dp.close)
        dp.attach("in0", hv.ifindex("in0"), 1)
        dp.attach("out0", hv.ifindex("out0"), 2)
        for _ in range(rounds):  # interleaved rounds: VM noise hits every size alike
            for n, a, b in SIZES:
                rows.append(one_size(dp, gen, sink, n, a, b, seconds))
    return [median_row([r for r in rows if r.flows == n]) for n, _, _ in SIZES]


def one_size(dp: tc.TcDatapath, gen: nstools.Netns, sink: nstools.Netns, n: int, a: int,
             b: int, seconds: float) -> Row:
    """Install ``n`` flows, time a counter read, measure, remove them again."""
    flows, rate = install(dp, a, b)
    t0 = time.perf_counter()
    dp.read_counters()
    read_ms = (time.perf_counter() - t0) * 1000
    miss0 = dp.kernel_stats()["miss"]
    pps, offered = measure(gen, sink, trafgen_config(a, b), seconds)
    for f in flows:
        dp.remove(f)
    return Row(n, pps, offered, rate, read_ms, dp.kernel_stats()["miss"] - miss0)


def median_row(rows: list[Row]) -> Row:
    """Per-field median over the rounds of one size."""
    def med(name: str) -> float:
        return statistics.median(getattr(r, name) for r in rows)
    return Row(rows[0].flows, med("pps"), med("offered"), med("install_rate"), med("read_ms"),
               sum(r.misses for r in rows))


def print_table(rows: list[Row]) -> None:
    base = rows[0].pps or 1.0
    print(f"{'flows':>8} {'delivered pps':>14} {'offered pps':>12} {'ratio':>6} "
          f"{'install/s':>10} {'read_counters':>14} {'misses':>7}")
    for r in rows:
        print(f"{r.flows:>8,} {r.pps:>14,.0f} {r.offered:>12,.0f} {r.pps / base:>6.2f} "
              f"{r.install_rate:>10,.0f} {r.read_ms:>11.1f} ms {r.misses:>7}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="short measuring windows")
    p.add_argument("--seconds", type=float, default=None, help="measuring window per size")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (median)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("fastpath: needs root (namespaces, BPF)", file=sys.stderr)
        return 2
    subprocess.run([str(ROOT / "tools" / "build-bpf.sh")], check=True, stdout=subprocess.DEVNULL)
    seconds = args.seconds or (QUICK_SECONDS if args.quick else SECONDS)
    rounds = args.rounds or (1 if args.quick else ROUNDS)
    print(f"fastpath: {rounds} round(s) x {seconds:g} s per size, trafgen on 1 CPU, 60-byte UDP")
    print_table(run(seconds, rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
