"""The kernel flow cache against the Python pipeline, on hostile frames (differential fuzzing).

For each grammar frame with a flow key, an entry for that key is put in the loaded BPF
program's map (plain forward, or a NAT rewrite of source/destination address, port or echo
id plus a MAC rewrite), then the frame and mutations of it run through the program with
BPF_PROG_TEST_RUN. Two rules:

* a kernel hit (redirect) only for a frame the Python parser reads, with the same flow key
  (anything else forwards what the daemon would drop or judge as another flow: a policy
  bypass, like the ones fixed in 671d2f4);
* a hit's output is byte for byte what the software path (`Pipeline._execute`) makes of it.

``APPLIANCE_BPF_FUZZ_SEEDS`` sets the number of frames (default 3000, about 2 s); the report
of 2026-12-01 ran 300k for each rule without a difference.
"""

from __future__ import annotations

import os
from collections import Counter

import nstools
import pytest

from appliance import packet as pk
from appliance.actions import CompiledActions
from appliance.datapath import libbpf, tc, tclayout
from appliance.model import ip_to_int
from appliance.testing import frames as fr
from appliance.testing import harness as hz

pytestmark = [
    nstools.requires_root,
    pytest.mark.skipif(not os.path.exists(
        os.path.join(os.path.dirname(__file__), "..", "appliance", "datapath", "bpf",
                     "flowcache.bpf.o")), reason="BPF object not built (tools/build-bpf.sh)"),
]

SEEDS = int(os.environ.get("APPLIANCE_BPF_FUZZ_SEEDS", "3000"))
MUTATIONS = 3  # per frame
SNAT4, DNAT4 = ip_to_int("198.51.100.7"), ip_to_int("10.0.0.1")
SNAT6, DNAT6 = ip_to_int("2001:db8::7"), ip_to_int("fd00::1")


@pytest.fixture(scope="module")
def dp():
    rid = nstools.run_id()
    with nstools.netns(rid, "bpfd") as ns:
        d = tc.TcDatapath(netns=ns.name, capacity=1024,
                          pin_dir=os.path.join(tc.PIN_ROOT, ns.name))
        try:
            yield d
        finally:
            d.close()


def _actions(s: fr.Source, h: pk.Headers) -> CompiledActions:
    """Forward, or NAT of what the packet has, with the port's MAC as destination."""
    kind = fr.pick(s, ("forward", "snat", "dnat", "both"))
    if kind == "forward":
        return CompiledActions("x")
    v4 = h.ip_version == 4
    kw: dict[str, int] = {"dst_mac": fr.PORT_MACS[0]}
    if kind in ("snat", "both"):
        kw["src"] = SNAT4 if v4 else SNAT6
        if h.sport is not None:
            kw["sport"] = fr.pick(s, (40000, 1, 65535))
        elif h.icmp_id is not None and h.icmp_type in (8, 128):
            kw["icmp_id"] = 4242
    if kind in ("dnat", "both"):
        kw["dst"] = DNAT4 if v4 else DNAT6
        if h.dport is not None:
            kw["dport"] = 8080
    return CompiledActions("x", **kw)  # type: ignore[arg-type]


def test_kernel_agrees_with_the_python_pipeline_on_hostile_frames(dp) -> None:
    fd = dp._obj.prog_fd(tclayout.PROG_FLOWCACHE)
    software = hz.new_pipeline(0, False)
    stats: Counter[str] = Counter()
    problems: list[str] = []
    for i in range(SEEDS):
        s = fr.RandomSource(7_000_003 * 11 + i)
        good = fr.frame(s)
        h = pk.parse(good)
        key = pk.flow_key(h) if not isinstance(h, str) else None
        if key is None or key[6] is not None:  # tunnels: encap/decap use the vxlan device
            continue
        actions = _actions(s, h)  # type: ignore[arg-type]
        try:
            k = tclayout.encode_key(tclayout.PROBE_IFINDEX, key)
            v = tclayout.encode_value(tclayout.PROBE_IFINDEX, actions, key)
        except tclayout.Refused:
            stats["not offloadable"] += 1  # VLAN tags, fragments...: always up to the daemon
            continue
        dp.flows.update(k, v)
        try:
            for n in range(MUTATIONS + 1):
                frame = good if n == 0 else fr.mutate(s, good)
                if len(frame) < pk.ETH_HLEN:
                    continue
                try:
                    rv, out = libbpf.test_run(fd, frame, out_size=max(4096, len(frame) + 256))
                except libbpf.BpfError:
                    stats["too big for a test run"] += 1
                    continue
                if rv != tclayout.TC_ACT_REDIRECT:
                    stats["miss"] += 1
                    continue
                stats["hit"] += 1
                hm = pk.parse(frame)
                if isinstance(hm, str) or pk.flow_key(hm) != key:
                    said = hm if isinstance(hm, str) else "another key"
                    problems.append(f"kernel hit, Python says {said}: {actions.describe()} "
                                    f"{frame.hex()}")
                elif out != software._execute(actions, frame, None):
                    problems.append(f"output differs: {actions.describe()} {frame.hex()}")
        finally:
            dp.flows.delete(k)
    print(f"\n{SEEDS} frames x {MUTATIONS + 1}: {dict(stats)}")
    assert stats["hit"] > SEEDS // 20, stats  # the comparison really ran
    assert not problems, "\n".join(problems[:20])
