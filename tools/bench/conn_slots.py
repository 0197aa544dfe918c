#!/usr/bin/env python3
"""Connection slots (issue 11): how the ager reads TCP flags, and what a slot costs a TCP hit.

Reading: a kernel datapath (`TcDatapath`, capacity 262144) holds N connections, each a pair
of entries sharing a slot of the ``conns`` array. The ager needs every connection's flags at
each sweep; three ways are timed against the baseline every sweep already pays, reading the
flows map's counters blob (`TcDatapath.counter_blobs`, 2N entries, BPF_MAP_LOOKUP_BATCH):

* ``mmap``: the array is memory-mapped; one load per connection (`TcDatapath.conn_flags`);
* ``batch``: one BPF_MAP_LOOKUP_BATCH pass over the whole array, then one index per connection;
* ``lookup``: one bpf(2) lookup per connection.

Program: BPF_PROG_TEST_RUN runs the flow cache program R times on one frame and reports ns
per run for a UDP hit (the baseline), a TCP hit without a slot, and a TCP hit with a slot in
the steady state (its flags already recorded: a read, no atomic operation).

Prints tables; asserts nothing. Needs root (a scratch namespace holds the pins).

    tools/bench/conn_slots.py [--quick]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import struct
import sys
import time
from pathlib import Path
from typing import Final

ROOT: Final = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import nstools  # noqa: E402

from appliance import packet as pk  # noqa: E402
from appliance.actions import CompiledActions  # noqa: E402
from appliance.datapath import libbpf, tc, tclayout  # noqa: E402
from appliance.model import ip_to_int, mac_to_int  # noqa: E402

CAPACITY: Final = 262144  # the daemon's default nic_capacity
SIZES: Final = (10_000, 100_000)  # connections
QUICK_SIZES: Final = (10_000,)
ROUNDS: Final = 5  # timings per method; the table shows the median
REPEAT: Final = 1_000_000  # program runs per BPF_PROG_TEST_RUN
QUICK_REPEAT: Final = 200_000
MA, MB = mac_to_int("02:00:00:00:00:01"), mac_to_int("02:00:00:00:00:fe")


def fill(dp: tc.TcDatapath, n: int) -> list[int]:
    """N connections: two entries each (keys that never match a packet), one slot each."""
    slots = []
    a = CompiledActions("x")
    for i in range(n):
        slot = dp.slots.take()
        dp.slots.write(slot, 0x1212)
        slots.append(slot)
        for rev in (False, True):
            key = (None, pk.PROTO_TCP, ip_to_int("10.0.0.1") + i, 1000 + rev,
                   ip_to_int("192.0.2.1"), 80, None)
            dp.flows.update(tclayout.encode_key(100, key),
                            tclayout.encode_value(0, a, key, reverse=rev, conn=slot))
    return slots


def timed(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def reading(dp: tc.TcDatapath, n: int, rounds: int) -> list[tuple[str, float]]:
    slots = fill(dp, n)
    read = dp.slots.read
    lookup = dp.conns.lookup
    unpack = struct.Struct("=I").unpack_from

    def by_mmap() -> None:
        for s in slots:
            read(s)

    def by_batch() -> None:
        _kb, vb, _n = dp.conns.items_raw()
        for s in slots:
            unpack(vb, 4 * s)

    def by_lookup() -> None:
        for s in slots:
            lookup(struct.pack("=I", s))

    base = timed(dp.counter_blobs, rounds)
    rows = [("counters blob (baseline)", base)]
    for name, fn in (("mmap", by_mmap), ("batch", by_batch), ("lookup", by_lookup)):
        rows.append((name, timed(fn, rounds)))
    dp.flows.clear()
    for s in slots:
        dp.slots.give(s)
    return rows


def run_ns(prog_fd: int, frame: bytes, repeat: int) -> float:
    """Mean ns per program run over ``repeat`` runs (the kernel's own measurement)."""
    lib = libbpf.lib()
    out = ctypes.create_string_buffer(2048)
    din = ctypes.create_string_buffer(frame, len(frame))
    opts = libbpf.TestRunOpts(sz=ctypes.sizeof(libbpf.TestRunOpts))
    opts.data_in = ctypes.cast(din, ctypes.c_void_p)
    opts.data_size_in = len(frame)
    opts.data_out = ctypes.cast(out, ctypes.c_void_p)
    opts.data_size_out = len(out)
    opts.repeat = repeat
    libbpf.check(lib.bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts)), "prog_test_run")
    assert ctypes.c_int32(opts.retval).value == tclayout.TC_ACT_REDIRECT
    return float(opts.duration)


def program(dp: tc.TcDatapath, repeat: int, rounds: int) -> list[tuple[str, float]]:
    fd = dp._obj.prog_fd(tclayout.PROG_FLOWCACHE)
    frames = {}
    for name, proto, flags, sport in (("UDP hit (baseline)", pk.PROTO_UDP, 0, 5000),
                                      ("TCP hit, no slot", pk.PROTO_TCP, 0x10, 5001),
                                      ("TCP hit, slot", pk.PROTO_TCP, 0x10, 5002)):
        frame = pk.build_frame(src_mac=MA, dst_mac=MB, src=ip_to_int("10.0.0.1"),
                               dst=ip_to_int("192.0.2.9"), proto=proto, sport=sport, dport=80,
                               tcp_flags=flags, payload=b"x" * 18)
        h = pk.parse(frame)
        key = pk.flow_key(h)  # type: ignore[arg-type]
        slot = 0
        if name == "TCP hit, slot":
            slot = dp.slots.take()
            dp.slots.write(slot, tclayout.join_conn_flags(0x12, 0x12))  # ACK recorded already
        dp.flows.update(tclayout.encode_key(tclayout.PROBE_IFINDEX, key),
                        tclayout.encode_value(tclayout.PROBE_IFINDEX, CompiledActions("x"),
                                              key, conn=slot))
        frames[name] = frame
    results = {name: [] for name in frames}
    for _ in range(rounds):  # interleaved: the machine's noise hits every row alike
        for name, frame in frames.items():
            results[name].append(run_ns(fd, frame, repeat))
    return [(name, statistics.median(v)) for name, v in results.items()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="10k connections, fewer runs")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("conn_slots: needs root", file=sys.stderr)
        return 2
    sizes = QUICK_SIZES if args.quick else SIZES
    rounds = 3 if args.quick else ROUNDS
    with nstools.netns(nstools.run_id(), "slots") as ns:
        dp = tc.TcDatapath(netns=ns.name, capacity=CAPACITY,
                           pin_dir=os.path.join(tc.PIN_ROOT, ns.name))
        try:
            print(f"conn_slots: reading every connection's TCP flags (capacity {CAPACITY:,}, "
                  f"median of {rounds})")
            print(f"{'connections':>12}  {'method':<26} {'ms':>9} {'ns/conn':>9} {'ratio':>7}")
            for n in sizes:
                rows = reading(dp, n, rounds)
                base = rows[0][1]
                for name, t in rows:
                    print(f"{n:>12,}  {name:<26} {t * 1e3:>9.2f} {t * 1e9 / n:>9.0f} "
                          f"{t / base:>7.2f}")
            repeat = QUICK_REPEAT if args.quick else REPEAT
            print(f"\nprogram cost per packet (BPF_PROG_TEST_RUN x {repeat:,}, median of "
                  f"{rounds})")
            rows = program(dp, repeat, rounds)
            base = rows[0][1]
            for name, ns in rows:
                print(f"  {name:<22} {ns:>7.1f} ns  {ns / base:>5.2f}")
        finally:
            dp.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
