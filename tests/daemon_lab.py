"""A lab for daemon tests: VMs, an external host and a hypervisor namespace running applianced.

    vm1 (10.0.0.1) eth0 --- p1 \\
    vm2 (10.0.0.2) eth0 --- p2  hv: applianced (TC flow cache, upcall TAP)  up0 --- eth0 ext
    vm3 (10.0.0.3) eth0 --- p3 /  (p3 is created by the tests that need a late port)

ext is "the internet" and the remote VTEP: 192.0.2.10, 203.0.113.2 and a vxlan0 (VNI 5001)
holding 10.1.2.3. Every address lives inside namespaces this lab made.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from nstools import Netns, cmd, netns, run_id, veth

ROOT = Path(__file__).resolve().parents[1]
GW_MAC = "02:00:00:00:00:fe"
UPLINK_MAC = "02:bb:00:00:00:01"
EXT_MAC = "02:aa:00:00:00:01"
VM_MACS = {1: "02:00:00:00:00:01", 2: "02:00:00:00:00:02", 3: "02:00:00:00:00:03"}

POLICY = f"""
version: 1
uplink: up0
gateway_mac: "{GW_MAC}"
uplink_mac: "{UPLINK_MAC}"
next_hop_mac: "{EXT_MAC}"
ports:
  - {{name: vm1, interface: p1, mac: "{VM_MACS[1]}", ips: ["10.0.0.1", "fd00::1"],
     layers: [acl, nat, vnet]}}
  - {{name: vm2, interface: p2, mac: "{VM_MACS[2]}", ips: ["10.0.0.2", "fd00::2"],
     layers: [acl]}}
  - {{name: vm3, interface: p3, mac: "{VM_MACS[3]}", ips: ["10.0.0.3"], layers: [acl, nat]}}
layers:
  - name: acl
    stateful: true
    default: {{outbound: allow, inbound: deny}}
    outbound:
      - {{name: no-smtp, priority: 10, match: {{proto: tcp, dst_port: 25}}, action: deny}}
    inbound:
      - {{name: ssh, priority: 10, match: {{proto: tcp, src: 192.0.2.0/24, dst_port: 22}},
          action: allow}}
      - {{name: web, priority: 20, match: {{proto: tcp, dst_port: "8000-8080"}}, action: allow}}
      - {{name: icmp, priority: 30, match: {{proto: [icmp, icmpv6], src: [10.0.0.0/8, fd00::/64]}},
          action: allow}}
  - name: nat
    outbound:
      - {{name: snat, priority: 10, match: {{src: 10.0.0.0/24, dst: "!10.0.0.0/8"}},
          action: {{snat: {{ip: 198.51.100.7}}}}}}
    inbound:
      - {{name: vip, priority: 10, match: {{dst: 198.51.100.80, proto: tcp, dst_port: 80}},
          action: {{dnat: {{ip: 10.0.0.1, port: 8080}}}}}}
  - name: vnet
    outbound:
      - {{name: overlay, priority: 10, match: {{dst: 10.1.0.0/16}},
          action: {{encap: {{vxlan: {{vni: 5001, local: 203.0.113.1, remote: 203.0.113.2}}}}}}}}
    inbound:
      - {{name: overlay-in, priority: 10, match: {{vni: 5001}}, action: decap}}
"""


@dataclass
class Lab:
    rid: str
    hv: Netns
    vms: dict[int, Netns]
    ext: Netns
    tmp: Path
    stack: contextlib.ExitStack = field(repr=False)

    def add_vm(self, n: int) -> Netns:
        """A VM namespace attached to the hypervisor as p<n> (hot-plugged), IPv4 and IPv6
        (static: fd00::n/64, default via fd00::fe; neighbour discovery is answered by the
        switch)."""
        ns = self.stack.enter_context(netns(self.rid, f"vm{n}"))
        veth(self.hv, f"p{n}", ns, "eth0", b_mac=VM_MACS[n])
        ns.ip("addr", "add", f"10.0.0.{n}/24", "dev", "eth0")
        ns.ip("route", "add", "default", "via", "10.0.0.254")
        ns.run("sysctl", "-qw", "net.ipv6.conf.eth0.disable_ipv6=0")
        ns.ip("-6", "addr", "add", f"fd00::{n}/64", "dev", "eth0", "nodad")
        ns.ip("-6", "route", "add", "default", "via", "fd00::fe")
        self.vms[n] = ns
        return ns


@contextlib.contextmanager
def lab(tmp: Path) -> Iterator[Lab]:
    rid = run_id()
    with contextlib.ExitStack() as stack:
        hv = stack.enter_context(netns(rid, "hv"))
        ext = stack.enter_context(netns(rid, "ext"))
        the_lab = Lab(rid, hv, {}, ext, tmp, stack)
        for n in (1, 2):
            the_lab.add_vm(n)
        veth(hv, "up0", ext, "eth0", a_mac=UPLINK_MAC, b_mac=EXT_MAC)
        ext.ip("addr", "add", "192.0.2.10/24", "dev", "eth0")
        ext.ip("addr", "add", "203.0.113.2/24", "dev", "eth0")
        ext.ip("route", "add", "198.51.100.0/24", "dev", "eth0")
        ext.ip("route", "add", "10.0.0.0/24", "dev", "eth0")
        ext.ip("link", "add", "vxlan0", "type", "vxlan", "id", "5001", "local", "203.0.113.2",
               "remote", "203.0.113.1", "dstport", "4789")
        ext.ip("link", "set", "vxlan0", "address", GW_MAC, "up")
        ext.ip("addr", "add", "10.1.2.3/16", "dev", "vxlan0")
        ext.ip("route", "add", "10.0.0.1/32", "dev", "vxlan0")
        ext.ip("neigh", "add", "10.0.0.1", "lladdr", VM_MACS[1], "dev", "vxlan0")
        yield the_lab


class Daemon:
    """applianced running inside the hypervisor namespace, logging JSON to a file."""

    def __init__(self, the_lab: Lab, *, policy: str = POLICY, headless: bool = False,
                 sweep: float = 0.5, name: str = "d", extra: str = "") -> None:
        self.lab = the_lab
        d = the_lab.tmp / name
        d.mkdir(exist_ok=True)
        self.policy_path = d / "policy.yaml"
        self.policy_path.write_text(policy)
        self.log_path = d / "applianced.log"
        self.config = d / "appliance.toml"
        self.config.write_text(
            f'policy = "{self.policy_path}"\n'
            f'state_dir = "{d}"\n'
            f'ipc_socket = "{d}/appliance.sock"\n'
            f'pin_dir = "/sys/fs/bpf/appliance/{the_lab.rid}"\n'
            f"headless = {'true' if headless else 'false'}\n"
            f"sweep_interval = {sweep}\n"
            'log_format = "json"\nlog_level = "debug"\n' + extra)
        self.proc: subprocess.Popen | None = None
        self._log_offset = 0

    def start(self, timeout: float = 20.0) -> Daemon:
        log = open(self.log_path, "a")  # noqa: SIM115 - the daemon owns it while running
        self._log_offset = self.log_path.stat().st_size
        self.proc = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{self.lab.hv.name}", sys.executable, "-m",
             "appliance.cli.applianced", "--config", str(self.config)],
            stdout=log, stderr=log, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        log.close()
        self.wait_event("ready", timeout)
        return self

    def events(self) -> list[dict]:
        out = []
        with open(self.log_path) as f:
            f.seek(self._log_offset)
            for line in f:
                with contextlib.suppress(json.JSONDecodeError):
                    out.append(json.loads(line))
        return out

    def wait_event(self, event: str, timeout: float = 10.0, **fields: object) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for e in self.events():
                if e.get("event") == event and all(e.get(k) == v for k, v in fields.items()):
                    return e
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"applianced exited ({self.proc.returncode}):\n"
                                     + self.log_path.read_text()[-3000:])
            time.sleep(0.05)
        raise AssertionError(f"no {event} {fields} in the daemon log within {timeout}s:\n"
                             + self.log_path.read_text()[-3000:])

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)  # nsenter execs: the pid is applianced

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("applianced did not stop within the deadline") from None

    def kernel_flows(self) -> list[tuple]:
        """(ingress ifindex, packet key) of every entry in the kernel flow cache."""
        from appliance.datapath import libbpf, tclayout

        path = f"/sys/fs/bpf/appliance/{self.lab.rid}/flows"
        fd = libbpf.check(libbpf.lib().bpf_obj_get(path.encode()), f"open {path}")
        try:
            m = libbpf.Map(fd, tclayout.KEY.size, tclayout.VAL.size, 0, "flows")
            return [tclayout.decode_key(raw) for raw, _ in m.items()]
        finally:
            os.close(fd)

    def upcalls(self) -> int:
        """Packets the kernel sent up to the daemon (the upcall TAP's tx counter)."""
        out = cmd("ip", "-n", self.lab.hv.name, "-s", "-j", "link", "show", "apl-upcall")
        return json.loads(out)[0]["stats64"]["tx"]["packets"]


def ingress_filters(ns: Netns, dev: str) -> str:
    return ns.run("tc", "filter", "show", "dev", dev, "ingress", check=False)
