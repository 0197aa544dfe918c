"""Every shared capture through appliance-trace, forced through a port both ways: no tracebacks.

The captures in ``../shared/captures`` (see its MANIFEST.tsv) are third-party test files of
tcpdump, Wireshark-adjacent projects, gopacket, dpkt and pcapng generators: truncated records,
fuzzed packets, odd link types, tunnels, IPv6 extension headers. Each one is replayed in-process
with ``appliance-trace`` (`appliance.cli.trace.run`) under a policy whose layers do everything
to everyone -- a stateful ACL, SNAT of every IPv4 and IPv6 destination, DNAT of every
destination into the port, VXLAN encap of private destinations and decap of every VNI -- once
as sent by the port (``--port vm1 --direction out``, JSON output) and once as arriving from
the uplink (``--direction in``, text output). A capture may be refused with a clear message
(exit 1, e.g. a file cut short); nothing may raise.
"""

from __future__ import annotations

import contextlib
import io
import time
import traceback
from pathlib import Path

import pytest

from appliance.cli import trace

HERE = Path(__file__).resolve()
CANDIDATES = (HERE.parents[2] / "shared" / "captures", Path("/work/shared/captures"))
CAPTURES = next((p for p in CANDIDATES if (p / "MANIFEST.tsv").is_file()), None)

POLICY = """
version: 1
uplink: up0
gateway_mac: "02:00:00:00:00:fe"
uplink_mac: "02:bb:00:00:00:01"
next_hop_mac: "02:aa:00:00:00:01"
ports:
  - {name: vm1, interface: p1, mac: "02:00:00:00:00:01", ips: ["10.0.0.1", "fd00::1"],
     layers: [acl, nat, vnet]}
  - {name: vm2, interface: p2, mac: "02:00:00:00:00:02", ips: ["10.0.0.2"], layers: [acl]}
layers:
  - name: acl
    stateful: true
    default: allow
    outbound:
      - {name: no-smtp, priority: 10, match: {proto: tcp, dst_port: 25}, action: deny}
      - {name: dns, priority: 20, match: {proto: [udp, tcp], dst_port: 53}, action: count}
    inbound:
      - {name: no-telnet, priority: 10, match: {proto: tcp, dst_port: 23}, action: deny}
      - {name: ping, priority: 20, match: {proto: [icmp, icmpv6]}, action: count}
  - name: nat
    default: allow
    outbound:
      - {name: snat4, priority: 10, match: {dst: 0.0.0.0/0}, action: {snat: {ip: 198.51.100.7}}}
      - {name: snat6, priority: 20, match: {dst: "::/0"}, action: {snat: {ip: "2001:db8::7"}}}
    inbound:
      - {name: vip-web, priority: 10, match: {proto: tcp, dst_port: 80, dst: 198.51.100.80},
         action: {dnat: {ip: 10.0.0.1, port: 8080}}}
      - {name: vip4, priority: 20, match: {dst: 0.0.0.0/0}, action: {dnat: {ip: 10.0.0.1}}}
      - {name: vip6, priority: 30, match: {dst: "::/0"}, action: {dnat: {ip: "fd00::1"}}}
  - name: vnet
    default: allow
    outbound:
      - {name: overlay, priority: 10, match: {dst: [10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16]},
         action: {encap: {vxlan: {vni: 5001, local: 203.0.113.1, remote: 203.0.113.2}}}}
    inbound:
      - {name: decap, priority: 10, match: {vni: "0-16777215"}, action: decap}
"""


def _captures() -> list[Path]:
    if CAPTURES is None:
        return []
    return sorted(p for p in CAPTURES.rglob("*") if p.is_file() and p.name != "MANIFEST.tsv")


@pytest.mark.skipif(CAPTURES is None, reason="../shared/captures is not here")
@pytest.mark.parametrize(("direction", "fmt"), [("out", "--json"), ("in", "--no-progress")])
def test_every_capture_through_a_port(tmp_path: Path, direction: str, fmt: str) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    captures = _captures()
    assert len(captures) > 100  # the manifest lists ~900 files
    failures: list[str] = []
    refused: list[str] = []
    start = time.perf_counter()
    for cap in captures:
        out, err = io.StringIO(), io.StringIO()
        argv = [str(policy), str(cap), "--port", "vm1", "--direction", direction, fmt,
                "--no-progress"]
        try:
            with contextlib.redirect_stderr(err):
                rc = trace.run(trace.parse_args(argv), out)
        except Exception as exc:  # the finding: a traceback where a drop belonged
            tb = traceback.format_exception(exc)
            failures.append(f"{cap.relative_to(CAPTURES)}: {tb[-1].strip()}\n"
                            + "".join(tb[-4:-1]))
            continue
        if "Traceback" in err.getvalue():
            failures.append(f"{cap.relative_to(CAPTURES)}: traceback on stderr")
        if rc != trace.EXIT_OK:
            assert rc == trace.EXIT_FAILED and "appliance-trace:" in err.getvalue(), (
                cap, rc, err.getvalue())
            refused.append(cap.name)
        else:
            assert "summary" in out.getvalue()
    elapsed = time.perf_counter() - start
    print(f"{len(captures)} captures --direction {direction}: {elapsed:.1f} s, "
          f"{len(refused)} refused with a message, {len(failures)} tracebacks")
    assert not failures, f"{len(failures)} captures raised:\n" + "\n".join(failures)


def test_grammar_capture_through_the_trace_tool(tmp_path: Path) -> None:
    """Hostile frames of the grammar as a capture, replayed with automatic port assignment
    (by source MAC/IP: every port and the uplink get some) and as vm1's outbound traffic,
    with JSON and text output and the leaving packets written back: no traceback."""
    from appliance.capture import PcapWriter
    from appliance.testing import frames as fr
    from appliance.testing import harness as hz

    policy = tmp_path / "policy.yaml"
    policy.write_text(hz.POLICY)
    cap = tmp_path / "hostile.pcap"
    writer = PcapWriter(cap)
    port_macs = fr.PORT_MACS
    for i, frame in enumerate(fr.frames_from_seed(31, 3000)):
        if len(frame) >= 12 and i % 3 == 0:  # a third claim to come from a port
            frame = frame[:6] + port_macs[i % len(port_macs)].to_bytes(6, "big") + frame[12:]
        writer.write(1_000_000_000 + i * 7_919_000, frame)  # ~8 ms apart: meters, expiry
    writer.close()
    for extra in ([], ["--json"], ["--port", "vm1", "--direction", "out", "--json"],
                  ["--direction", "in", "--nic-capacity", "8", "--nic-actions", "allow,deny"]):
        out, err = io.StringIO(), io.StringIO()
        argv = [str(policy), str(cap), "--no-progress", "--write", str(tmp_path / "out.pcap"),
                *extra]
        with contextlib.redirect_stderr(err):
            rc = trace.run(trace.parse_args(argv), out)
        assert rc == trace.EXIT_OK, err.getvalue()
        assert "summary" in out.getvalue()


@pytest.mark.skipif(CAPTURES is None, reason="../shared/captures is not here")
def test_mutated_captures_are_read_or_refused_cleanly(tmp_path: Path) -> None:
    """Shared captures with flipped bits, cut tails, stomped length fields and spliced bytes:
    the reader yields packets or raises CaptureError naming the file, nothing else (the
    module's contract). 146k such files ran clean in a 60 s run; this is the bounded one."""
    import random

    from appliance.capture import CaptureError, open_capture, to_ethernet

    rnd = random.Random(2026)
    small = [p for p in _captures() if p.stat().st_size < 20_000]
    path = tmp_path / "mutated.cap"
    for _ in range(1500):
        data = bytearray(rnd.choice(small).read_bytes())
        for _ in range(rnd.randint(1, 6)):
            if not data:
                break
            i = rnd.randrange(len(data))
            k = rnd.random()
            if k < 0.4:
                data[i] ^= 1 << rnd.randrange(8)
            elif k < 0.6:
                del data[i:]
            elif k < 0.85:
                data[i : i + 4] = rnd.choice((b"\xff\xff\xff\xff", b"\0\0\0\0", b"\0\0\1\0",
                                              rnd.randbytes(4)))
            else:
                data[i:i] = data[rnd.randrange(len(data)):][: rnd.randint(1, 64)]
        path.write_bytes(bytes(data))
        try:
            with open_capture(path) as cap:
                for cp in cap:
                    to_ethernet(cp.linktype, cp.data)
        except CaptureError as e:
            assert str(path) in str(e)
