"""Capabilities of this kernel as a datapath, probed for real at start-up, never assumed.

Two kinds: tc classifiers and actions (each tried on a scratch veth pair: clsact, cls_bpf,
u32, mirred, flower, gact, pedit, tunnel_key, police), and what the flow cache program itself
can do (each action kind run through BPF_PROG_TEST_RUN with a scratch map entry).
"""

from __future__ import annotations

import logging
import subprocess
import uuid
from typing import TYPE_CHECKING, Any, Final

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from appliance import packet as pk
from appliance.actions import CompiledActions, EncapSpec
from appliance.datapath import libbpf
from appliance.datapath.tclayout import (
    CMD_TIMEOUT,
    COUNTERS,
    ETH_P_ALL,
    FILTER_HANDLE,
    PROBE_IFINDEX,
    PROG_FLOWCACHE,
    TC_ACT_REDIRECT,
    TC_ACT_SHOT,
    TC_INGRESS,
    Refused,
    encode_key,
    encode_value,
)
from appliance.model import IPV4_BASE

if TYPE_CHECKING:
    from appliance.datapath.tc import TcDatapath

log = logging.getLogger(__name__)

_TC_PROBES: Final = {
    "u32": ["filter", "add", "dev", "{dev}", "ingress", "prio", "10", "protocol", "ip",
            "u32", "match", "u32", "0", "0"],
    "mirred": ["filter", "add", "dev", "{dev}", "ingress", "prio", "11", "protocol", "ip",
               "u32", "match", "u32", "0", "0", "action", "mirred", "egress", "redirect",
               "dev", "{peer}"],
    "flower": ["filter", "add", "dev", "{dev}", "ingress", "prio", "12", "protocol", "ip",
               "flower", "ip_proto", "udp"],
    "gact": ["filter", "add", "dev", "{dev}", "ingress", "prio", "13", "protocol", "ip",
             "u32", "match", "u32", "0", "0", "action", "drop"],
    "pedit": ["filter", "add", "dev", "{dev}", "ingress", "prio", "14", "protocol", "ip",
              "u32", "match", "u32", "0", "0", "action", "pedit", "ex", "munge", "ip", "ttl",
              "set", "1"],
    "tunnel_key": ["filter", "add", "dev", "{dev}", "ingress", "prio", "15", "protocol", "ip",
                   "u32", "match", "u32", "0", "0", "action", "tunnel_key", "set", "src_ip",
                   "192.0.2.1", "dst_ip", "192.0.2.2", "id", "1"],
    "police": ["filter", "add", "dev", "{dev}", "ingress", "prio", "16", "protocol", "ip",
               "u32", "match", "u32", "0", "0", "action", "police", "rate", "1mbit", "burst",
               "10k", "conform-exceed", "drop"],
}


def tc_command(netns: str | None, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``tc ARGS`` (in ``netns``); never raises for a failing command."""
    cmd = ["tc", *args] if netns is None else ["ip", "netns", "exec", netns, "tc", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=CMD_TIMEOUT, check=False)


def probe_tc(netns: str | None, prog_fd: int, ipr: IPRoute) -> dict[str, bool]:
    """Try clsact, cls_bpf and each tc classifier/action on a scratch veth pair."""
    suffix = uuid.uuid4().hex[:6]
    dev, peer = f"aplpr{suffix}a", f"aplpr{suffix}b"
    table: dict[str, bool] = {}
    ipr.link("add", ifname=dev, kind="veth", peer=peer)
    try:
        ifindex = ipr.link_lookup(ifname=dev)[0]
        try:
            ipr.tc("add", "clsact", ifindex)
            table["clsact"] = True
        except NetlinkError:
            table["clsact"] = False
        try:
            ipr.tc("add-filter", "bpf", ifindex, FILTER_HANDLE, parent=TC_INGRESS, prio=1,
                   protocol=ETH_P_ALL, fd=prog_fd, name="probe", direct_action=True)
            table["cls_bpf"] = True
        except NetlinkError:
            table["cls_bpf"] = False
        for kind, args in _TC_PROBES.items():
            argv = [a.format(dev=dev, peer=peer) for a in args]
            table[kind] = tc_command(netns, *argv).returncode == 0
    finally:
        ipr.link("del", ifname=dev)
    return table


class ProgramProbe:
    """Crafted packets through the loaded flowcache program with scratch entries."""

    MAC_A: Final = 0x02_00_00_00_00_0A
    MAC_B: Final = 0x02_00_00_00_00_0B
    A: Final = IPV4_BASE | 0xC0000201  # 192.0.2.1
    B: Final = IPV4_BASE | 0xC0000202
    C: Final = IPV4_BASE | 0xC6336401  # 198.51.100.1
    VNI: Final = 4242

    def __init__(self, dp: TcDatapath) -> None:
        self.dp = dp
        self.fd = dp._obj.prog_fd(PROG_FLOWCACHE)

    def _frame(self, proto: int = pk.PROTO_UDP) -> bytes:
        return pk.build_frame(src_mac=self.MAC_A, dst_mac=self.MAC_B, src=self.A, dst=self.B,
                              proto=proto, sport=1000, dport=2000, payload=b"probe" * 4)

    def _run(self, frame: bytes, actions: CompiledActions) -> tuple[int, bytes, bytes]:
        """(retval, output frame, value after) with a scratch entry for ``frame``'s key."""
        h = pk.parse(frame)
        assert not isinstance(h, str)
        pkey = pk.flow_key(h)
        assert pkey is not None
        key = encode_key(PROBE_IFINDEX, pkey)
        self.dp.flows.update(key, encode_value(PROBE_IFINDEX if actions.output else 0,
                                               actions, pkey))
        try:
            rv, out = libbpf.test_run(self.fd, frame)
            after = self.dp.flows.lookup(key) or b""
        finally:
            self.dp.flows.delete(key)
        return rv, out, after

    @staticmethod
    def _checks(out: bytes) -> bool:
        return all(pk.verify_checksums(out).values())

    def run(self) -> dict[str, bool]:
        res = {}
        for name in ("forward", "drop", "count", "snat", "dnat", "encap", "decap"):
            try:
                res[name] = bool(getattr(self, name)())
            except (libbpf.BpfError, Refused, ValueError) as e:
                log.warning("probe %s failed: %s", name, e)
                res[name] = False
        return res

    def forward(self) -> bool:
        frame = self._frame()
        rv, out, _ = self._run(frame, CompiledActions("x"))
        return rv == TC_ACT_REDIRECT and out == frame

    def drop(self) -> bool:
        rv, _, _ = self._run(self._frame(), CompiledActions(None, "probe"))
        return rv == TC_ACT_SHOT

    def count(self) -> bool:
        frame = self._frame()
        _, _, after = self._run(frame, CompiledActions("x"))
        packets, nbytes, last = COUNTERS.unpack(after)
        return packets == 1 and nbytes == len(frame) and last > 0

    def _nat(self, proto: int, **changes: Any) -> bool:
        frame = self._frame(proto)
        rv, out, _ = self._run(frame, CompiledActions("x", **changes))
        h = pk.parse(out)
        if rv != TC_ACT_REDIRECT or isinstance(h, str) or not self._checks(out):
            return False
        return all(getattr(h, k) == v for k, v in changes.items())

    def snat(self) -> bool:
        return (self._nat(pk.PROTO_TCP, src=self.C, sport=40000)
                and self._nat(pk.PROTO_UDP, src=self.C, sport=40000))

    def dnat(self) -> bool:
        return (self._nat(pk.PROTO_TCP, dst=self.C, dport=8080)
                and self._nat(pk.PROTO_UDP, dst=self.C, dport=8080))

    def encap(self) -> bool:
        frame = self._frame()
        spec = EncapSpec(self.VNI, self.A, self.C, 50000, pk.VXLAN_PORT, None, self.MAC_A)
        rv, out, _ = self._run(frame, CompiledActions("x", encap=spec))
        h = pk.parse(out)
        return (rv == TC_ACT_REDIRECT and not isinstance(h, str) and h.vni == self.VNI
                and h.src == self.A and h.dst == self.C and h.sport == 50000
                and h.dst_mac == self.MAC_A and self._checks(out)
                and out[h.inner_off:h.inner_end] == frame)

    def decap(self) -> bool:
        inner = self._frame()
        outer = pk.vxlan_encap(inner, vni=self.VNI, src_ip=self.C, dst_ip=self.A,
                               src_mac=self.MAC_B, dst_mac=self.MAC_A, src_port=50000)
        rv, out, _ = self._run(outer, CompiledActions("x", decap=True))
        return rv == TC_ACT_REDIRECT and out == inner
