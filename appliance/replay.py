"""Offline replay: run a capture through the shared pipeline with a simulated NIC.

This is the engine of ``appliance-trace`` (and of ``appliancectl trace`` later): it owns no
policy logic, only the mapping from a captured frame to (ingress, time) and the bookkeeping of a
run. Time is the capture's own timestamps, so ageing and meters behave as they did on the wire.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from appliance import packet as pk
from appliance.capture import Capture, CapturedPacket, to_ethernet
from appliance.datapath.sim import SimNic
from appliance.faults import INTERNAL_ERROR
from appliance.model import IPV4_BASE, Direction, Policy
from appliance.outcomes import DropReason
from appliance.pipeline import Pipeline, Result
from appliance.timeouts import Timeouts

LINKTYPE_ETHERNET: Final = 1


@dataclass(slots=True)
class Assignment:
    """How packets are given to the switch: forced port/direction, or auto (None)."""

    port: str | None = None
    direction: Direction | None = None


@dataclass(slots=True)
class Summary:
    """Capture time span of a run; packet and drop totals come from the pipeline's own
    counters (no per-packet bookkeeping here: replay speed is a feature)."""

    first_ns: int | None = None
    last_ns: int | None = None
    packets: int = 0


class Replayer:
    """Feeds a capture to a `Pipeline` backed by a `SimNic` and yields each result."""

    def __init__(self, policy: Policy, *, nic: SimNic | None = None,
                 timeouts: Timeouts | None = None, max_flows: int | None = None,
                 assignment: Assignment | None = None) -> None:
        self.nic = nic if nic is not None else SimNic()
        kwargs = {} if max_flows is None else {"max_flows": max_flows}
        self.pipeline = Pipeline(policy, self.nic, timeouts=timeouts, **kwargs)
        self.assignment = assignment or Assignment()
        self.summary = Summary()
        self._src_mac = {p.mac: p.name for p in policy.ports}
        self._src_ip = {ip: p.name for p in policy.ports for ip in p.ips}
        if self.assignment.port is not None and policy.port(self.assignment.port) is None:
            raise ValueError(f"--port {self.assignment.port}: no such port in the policy")

    def ingress_for(self, frame: bytes) -> str:
        """Where a frame enters the switch: the port it comes from, else the uplink.

        Auto mode: a frame whose source MAC (or source IP) belongs to a port was sent by that
        port (outbound from it); anything else comes from the uplink (inbound to the port its
        destination names).
        """
        a = self.assignment
        uplink = self.pipeline.policy.uplink
        if a.direction is Direction.IN:
            return uplink
        if a.port is not None:
            return a.port
        port = self._src_mac.get(int.from_bytes(frame[6:12]))
        if port is not None:
            return port
        ethertype = frame[12:14]
        if ethertype == b"\x08\x00" and len(frame) >= 34:  # untagged IPv4: no parse needed
            return self._src_ip.get(IPV4_BASE | int.from_bytes(frame[26:30]), uplink)
        if ethertype == b"\x86\xdd" and len(frame) >= 38:
            return self._src_ip.get(int.from_bytes(frame[22:38]), uplink)
        h = pk.parse(frame)
        if not isinstance(h, str):
            src = h.src if h.src is not None else h.arp_spa
            port = self._src_ip.get(src) if src is not None else None
            if port is not None:
                return port
        return uplink

    def run(self, capture: Capture) -> Iterator[tuple[int, CapturedPacket, bytes | None, Result]]:
        """Yield ``(n, captured, frame, result)`` for each packet (n is 1-based)."""
        process = self.pipeline.process
        ingress_for = self.ingress_for
        summary = self.summary
        n = 0
        cp = None
        try:
            for n, cp in enumerate(capture, 1):
                if summary.first_ns is None:
                    summary.first_ns = cp.ts_ns
                frame = None
                try:
                    frame = cp.data if cp.linktype == LINKTYPE_ETHERNET else to_ethernet(
                        cp.linktype, cp.data)
                    if frame is None:
                        result = self.pipeline.reject("-", DropReason.UNSUPPORTED_LINKTYPE)
                    else:
                        result = process(frame, ingress_for(frame), cp.ts_ns)
                except Exception as exc:  # a bug outside the pipeline: this packet only
                    fault = self.pipeline.record_fault("replay", exc, frame=frame)
                    result = self.pipeline.reject("-", INTERNAL_ERROR)
                    result.note = fault.traceback
                yield n, cp, frame, result
        finally:
            summary.packets = n
            if cp is not None:
                summary.last_ns = cp.ts_ns

    def summary_dict(self) -> dict:
        """The machine-readable summary (the last JSON line of appliance-trace)."""
        s = self.summary
        c = self.pipeline.counters
        nic = self.nic.stats()
        flows = self.pipeline.flows
        dropped = sum(c.drops.values())
        return {
            "packets": c.packets,
            "forwarded": c.packets - dropped,
            "dropped": dropped,
            "drops": dict(sorted(c.drops.items())),
            "paths": {p: c.paths.get(p, 0) for p in ("nic", "host", "slow")},
            "flows": flows.created,
            "flows_active": len(flows),
            "flow_limit_refusals": flows.refused,
            "expiries": flows.expired,
            "evictions": nic.evictions,
            "nic_hits": nic.hits,
            "nic_misses": nic.misses,
            "nic": {
                "capacity": nic.capacity,
                "entries": nic.entries,
                "hits": nic.hits,
                "misses": nic.misses,
                "offloads": nic.offloads,
                "evictions": nic.evictions,
                "refusals": nic.refusals,
                "rejected": nic.rejected,
                "policy": getattr(self.nic.policy, "name", "?"),
                "actions": sorted(str(k) for k in self.nic.capabilities),
            },
            "duration_s": ((s.last_ns - s.first_ns) / 1e9)
            if s.first_ns is not None and s.last_ns is not None else 0.0,
            "internal_errors": dict(sorted(c.faults.items())),
        }
