#!/usr/bin/env python3
"""The live demo: applianced switching real traffic between network namespaces.

Builds two "VMs" (vm1, vm2), an external host (ext: the internet and a remote VXLAN
endpoint) and a hypervisor namespace running applianced with the kernel TC/BPF flow cache,
then walks through the product: SNAT, a DNAT VIP, a denied port, the VXLAN overlay, port to
port ICMP, the kernel flow cache and its counters, proof that an established connection's data
never wakes the daemon, and a policy reload. Everything is torn down at the end, even on
failure. Needs root (namespaces, BPF). Traffic stays inside the namespaces it creates.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from daemon_lab import POLICY, Daemon, lab  # noqa: E402  (the test suite's lab, shared)
from nstools import tcp_listener, udp_socket  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from appliance.keyfmt import key_dict  # noqa: E402

# A log file or pipe gets lines wide enough for the flow listings, not 80 columns.
console = Console(width=None if sys.stdout.isatty() else 160)
T = 3.0
LOG_COPY = "/tmp/appliance-demo-applianced.log"


def step(title: str) -> None:
    console.rule(f"[bold cyan]{title}")


def connect(ns, dst: str, port: int, timeout: float = T) -> socket.socket:
    def make() -> socket.socket:
        s = socket.create_connection((dst, port), timeout=timeout)
        s.settimeout(timeout)
        return s
    return ns.call(make)


def appliancectl(d: Daemon, *args: str) -> None:
    """Show an operator command's output, when the operator shell is installed."""
    exe = shutil.which("appliancectl") or str(Path(sys.executable).parent / "appliancectl")
    if not Path(exe).exists():
        return
    sock = d.config.parent / "appliance.sock"
    console.print(f"[dim]$ appliancectl {' '.join(args)}")
    out = subprocess.run([exe, "--socket", str(sock), *args], capture_output=True, text=True,
                         timeout=20)
    # Printed as-is: the operator shell already laid its tables out for a terminal.
    console.print(out.stdout.rstrip() or out.stderr.rstrip(), soft_wrap=True, markup=False,
                  highlight=False)


def kernel_table(d: Daemon, the_lab) -> None:
    names = {int(the_lab.hv.ifindex(dev)): dev for dev in ("p1", "p2", "up0")}
    table = Table(title="kernel flow cache (BPF hash map on clsact ingress)")
    for col in ("ingress", "proto", "src", "sport", "dst", "dport", "tunnel"):
        table.add_column(col)
    for ifindex, key in sorted(d.kernel_flows(), key=lambda e: (e[0], e[1][3])):
        k = key_dict(key) or {}
        sport = f"{k['sport']} ({k['icmp'].replace('_', ' ')})" if "icmp" in k else str(k["sport"])
        table.add_row(names.get(ifindex, str(ifindex)), str(k["proto"]), k["src"], sport,
                      k["dst"], str(k["dport"]),
                      f"vni {k['tunnel']['vni']}" if "tunnel" in k else "")
    console.print(table)


def demo(tmp: Path) -> None:
    with lab(tmp) as the_lab:
        step("start applianced in the hypervisor namespace")
        d = Daemon(the_lab, sweep=0.5).start()
        try:
            ready = d.wait_event("datapath_ready")
            console.print(f"capability probe: {ready['probe']}")
            console.print(f"offloaded action kinds: {', '.join(ready['offloads'])}")
            vm1, _vm2, ext = the_lab.vms[1], the_lab.vms[2], the_lab.ext

            step("vm1 -> internet (192.0.2.10:7000) over TCP, through SNAT")
            with tcp_listener(ext, "192.0.2.10", 7000) as lst:
                c = connect(vm1, "192.0.2.10", 7000)
                lst.settimeout(T)
                s, peer = lst.accept()
                s.settimeout(T)
                console.print(f"server sees the connection from {peer[0]}:{peer[1]} (SNAT)")
                before = d.upcalls()
                for _i in range(500):
                    c.sendall(b"x" * 100)
                    s.recv(100)
                    s.sendall(b"y")
                    c.recv(1)
                console.print(f"500 request/response rounds: {d.upcalls() - before} upcalls "
                              "(data of an established connection never wakes the daemon)")
                c.close()
                s.close()

            step("internet -> VIP 198.51.100.80:80, DNAT to vm1:8080")
            with tcp_listener(vm1, "10.0.0.1", 8080) as lst:
                c = connect(ext, "198.51.100.80", 80)
                lst.settimeout(T)
                s, peer = lst.accept()
                console.print(f"vm1:8080 accepted {peer[0]}; the client talks to "
                              f"{c.getpeername()[0]}:{c.getpeername()[1]}")
                c.close()
                s.close()

            step("vm1 -> SMTP (port 25): denied by the acl layer")
            with tcp_listener(ext, "192.0.2.10", 25):
                try:
                    connect(vm1, "192.0.2.10", 25, timeout=1.0).close()
                    console.print("[red]unexpected: connected")
                except OSError as e:
                    console.print(f"connect failed as it should: {e}")

            step("vm1 -> 10.1.2.3 through the VXLAN overlay (VNI 5001)")
            with udp_socket(ext, "10.1.2.3", 6000) as srv, udp_socket(vm1, "10.0.0.1",
                                                                       6001) as cli:
                cli.sendto(b"hello overlay", ("10.1.2.3", 6000))
                data, peer = srv.recvfrom(100)
                console.print(f"ext's vxlan0 received {data!r} from {peer}")
                srv.sendto(b"hello back", peer)
                console.print(f"vm1 received {cli.recvfrom(100)[0]!r} (decapsulated)")

            step("vm1 pings vm2 (port to port: vm1 outbound layers, then vm2 inbound)")
            console.print(vm1.run("ping", "-c", "3", "-i", "0.2", "10.0.0.2", check=False)
                          .strip().splitlines()[-2])

            step("what the kernel is holding now")
            time.sleep(0.6)
            kernel_table(d, the_lab)
            appliancectl(d, "nic")
            appliancectl(d, "flows", "--limit", "10")

            step("reload: deny vm1 -> TCP 7000 (SIGHUP; flows revalidated, not flushed)")
            d.policy_path.write_text(POLICY.replace(
                "      - {name: no-smtp,",
                "      - {name: no-7000, priority: 11, match: {proto: tcp, dst_port: 7000},"
                " action: deny}\n      - {name: no-smtp,"))
            d.signal(signal.SIGHUP)
            e = d.wait_event("reloaded")
            console.print(f"generation {e['generation']}: {e['checked']} connections checked, "
                          f"{e['unchanged']} unchanged, {e['replaced']} replaced")
            with tcp_listener(ext, "192.0.2.10", 7000):
                try:
                    connect(vm1, "192.0.2.10", 7000, timeout=1.0).close()
                    console.print("[red]unexpected: connected")
                except OSError:
                    console.print("a new connection to port 7000 is refused now")
        finally:
            step("stop applianced (SIGTERM) and tear everything down")
            d.stop()
            shutil.copy(d.log_path, LOG_COPY)
            console.print(f"daemon log (JSON lines): {LOG_COPY}")


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="appliance-demo-") as tmp:
        demo(Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
