"""applianced for real: namespaces as VMs and an external host, real TCP/UDP/ICMP traffic."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from daemon_lab import GW_MAC, POLICY, VM_MACS, Daemon, ingress_filters, lab
from nstools import packet_socket, tcp_listener, udp_socket

from appliance import packet as pk
from appliance.ipcproto import Client
from appliance.model import ip_to_int, mac_to_int

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(not os.path.exists(
        os.path.join(os.path.dirname(__file__), "..", "appliance", "datapath", "bpf",
                     "flowcache.bpf.o")), reason="BPF object not built (tools/build-bpf.sh)"),
]

T = 3.0  # seconds: socket timeouts


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with lab(tmp_path_factory.mktemp("lab")) as the_lab:
        d = Daemon(the_lab).start()
        try:
            yield the_lab, d
        finally:
            d.stop()


def connect(ns, dst: str, port: int, timeout: float = T) -> socket.socket:
    def make() -> socket.socket:
        s = socket.create_connection((dst, port), timeout=timeout)
        s.settimeout(timeout)
        return s
    return ns.call(make)


def accept(listener: socket.socket, timeout: float = T) -> tuple[socket.socket, tuple]:
    listener.settimeout(timeout)
    conn, peer = listener.accept()
    conn.settimeout(timeout)
    return conn, peer


def echo_round_trip(client: socket.socket, server: socket.socket, n: int = 1) -> None:
    for i in range(n):
        msg = b"ping %d" % i
        client.sendall(msg)
        assert server.recv(100) == msg
        server.sendall(b"pong %d" % i)
        assert client.recv(100) == b"pong %d" % i


def test_tcp_out_through_snat_both_directions(world):
    the_lab, _ = world
    lst = tcp_listener(the_lab.ext, "192.0.2.10", 7000)
    with lst:
        c = connect(the_lab.vms[1], "192.0.2.10", 7000)
        s, peer = accept(lst)
        with c, s:
            assert peer[0] == "198.51.100.7"  # SNAT
            echo_round_trip(c, s, 3)


def no_smtp_drops(d: Daemon) -> int:
    """Packets the acl's outbound no-smtp rule dropped, from the daemon's ``rules`` method."""
    with Client(d.config.parent / "appliance.sock", T) as c:
        rows = c.call("rules", layer="acl", direction="out")
    return next(r["drops"] for r in rows if r["name"] == "no-smtp")


def test_denied_outbound_port_does_not_connect(world):
    the_lab, d = world
    before = no_smtp_drops(d)
    lst = tcp_listener(the_lab.ext, "192.0.2.10", 25)
    with lst, pytest.raises(OSError):
        connect(the_lab.vms[1], "192.0.2.10", 25, timeout=1.0)
    assert no_smtp_drops(d) > before  # the deny rule dropped it, not a lost packet


def test_inbound_ssh_allowed_from_its_network_only(world):
    the_lab, _ = world
    lst = tcp_listener(the_lab.vms[2], "10.0.0.2", 22)
    with lst:
        c = connect(the_lab.ext, "10.0.0.2", 22)
        s, peer = accept(lst)
        with c, s:
            assert peer[0] == "192.0.2.10"
            echo_round_trip(c, s)
    lst = tcp_listener(the_lab.vms[2], "10.0.0.2", 23)
    with lst, pytest.raises(OSError):
        connect(the_lab.ext, "10.0.0.2", 23, timeout=1.0)


def test_dnat_vip_reaches_vm_and_replies_come_from_the_vip(world):
    the_lab, _ = world
    lst = tcp_listener(the_lab.vms[1], "10.0.0.1", 8080)
    with lst:
        c = connect(the_lab.ext, "198.51.100.80", 80)
        s, peer = accept(lst)
        with c, s:
            assert peer[0] == "192.0.2.10"
            assert c.getpeername() == ("198.51.100.80", 80)
            echo_round_trip(c, s)


def test_udp_snat_and_reply(world):
    the_lab, _ = world
    srv = udp_socket(the_lab.ext, "192.0.2.10", 5300)
    cli = udp_socket(the_lab.vms[1], "10.0.0.1", 5301)
    with srv, cli:
        cli.sendto(b"query", ("192.0.2.10", 5300))
        data, peer = srv.recvfrom(100)
        assert (data, peer) == (b"query", ("198.51.100.7", 5301))
        srv.sendto(b"answer", peer)
        assert cli.recvfrom(100) == (b"answer", ("192.0.2.10", 5300))


def test_icmp_between_ports(world):
    the_lab, _ = world
    out = the_lab.vms[1].run("ping", "-c", "2", "-W", "2", "10.0.0.2", check=False)
    assert " 0% packet loss" in out, out


def test_vxlan_encap_on_the_uplink_and_decap_of_replies(world):
    the_lab, _ = world
    cap = packet_socket(the_lab.ext, "eth0")
    srv = udp_socket(the_lab.ext, "10.1.2.3", 6000)
    cli = udp_socket(the_lab.vms[1], "10.0.0.1", 6001)
    with srv, cli:
        try:
            cli.sendto(b"overlay", ("10.1.2.3", 6000))
            data, peer = srv.recvfrom(100)  # delivered by ext's own VXLAN device
            assert (data, peer) == (b"overlay", ("10.0.0.1", 6001))
            outer = cap.recv(lambda f: len(f) > 50 and f[12:14] == b"\x08\x00"
                             and f[23] == 17 and f[36:38] == (4789).to_bytes(2))
            assert outer is not None
            assert socket.inet_ntoa(outer[26:30]) == "203.0.113.1"
            assert socket.inet_ntoa(outer[30:34]) == "203.0.113.2"
            assert int.from_bytes(outer[46:49]) == 5001  # VNI
        finally:
            cap.close()
        srv.sendto(b"back", peer)
        assert cli.recvfrom(100) == (b"back", ("10.1.2.3", 6000))


def test_established_connection_data_never_reaches_the_daemon(world):
    the_lab, d = world
    lst = tcp_listener(the_lab.ext, "192.0.2.10", 7100)
    with lst:
        c = connect(the_lab.vms[1], "192.0.2.10", 7100)
        s, _ = accept(lst)
        with c, s:
            echo_round_trip(c, s, 2)
            time.sleep(0.2)
            before = d.upcalls()
            echo_round_trip(c, s, 300)  # 600 data segments (plus ACKs) through the kernel
            after = d.upcalls()
    assert after - before <= 5, (before, after)


def test_port_created_after_start_is_attached_and_removed_is_cleaned(world):
    the_lab, d = world
    vm3 = the_lab.add_vm(3)
    d.wait_event("port_attached", name="vm3")
    assert "flowcache" in ingress_filters(the_lab.hv, "p3")
    srv = udp_socket(the_lab.ext, "192.0.2.10", 5400)
    cli = udp_socket(vm3, "10.0.0.3", 5401)
    with srv, cli:
        cli.sendto(b"late", ("192.0.2.10", 5400))
        assert srv.recvfrom(100) == (b"late", ("198.51.100.7", 5401))
    the_lab.hv.ip("link", "del", "p3")
    e = d.wait_event("port_detached", name="vm3")
    assert e["connections_removed"] >= 1


def test_sighup_reload_changes_behaviour_without_restart(world):
    the_lab, d = world
    lst = tcp_listener(the_lab.ext, "192.0.2.10", 7200)
    with lst:
        c = connect(the_lab.vms[1], "192.0.2.10", 7200)
        accept(lst)[0].close()
        c.close()
        d.policy_path.write_text(POLICY.replace(
            "      - {name: no-smtp,",
            "      - {name: no-7200, priority: 11, match: {proto: tcp, dst_port: 7200}, "
            "action: deny}\n      - {name: no-smtp,"))
        d.signal(signal.SIGHUP)
        d.wait_event("reloaded")
        with pytest.raises(OSError):
            connect(the_lab.vms[1], "192.0.2.10", 7200, timeout=1.0)
    # a broken policy is refused and the running one stays
    d.policy_path.write_text("version: 1\nuplink: [\n")
    d.signal(signal.SIGHUP)
    d.wait_event("reload_failed")
    srv = udp_socket(the_lab.ext, "192.0.2.10", 5500)
    cli = udp_socket(the_lab.vms[1], "10.0.0.1", 5501)
    with srv, cli:
        cli.sendto(b"still here", ("192.0.2.10", 5500))
        assert srv.recvfrom(100)[0] == b"still here"
    d.policy_path.write_text(POLICY)
    d.signal(signal.SIGHUP)
    d.wait_event("reloaded")


def test_ipv6_between_ports_with_neighbour_discovery_answered_by_the_switch(world):
    the_lab, _ = world
    out = the_lab.vms[1].run("ping", "-6", "-c", "2", "-W", "2", "fd00::2", check=False)
    assert " 0% packet loss" in out, out
    neigh = the_lab.vms[1].ip("-6", "neigh", "show", "fd00::2")
    assert VM_MACS[2] in neigh.lower()  # the switch answered the solicitation with vm2's MAC


def test_malformed_frames_are_counted_and_the_daemon_keeps_switching(world):
    the_lab, d = world
    good = pk.build_frame(src_mac=mac_to_int(VM_MACS[1]), dst_mac=mac_to_int(GW_MAC),
                          src=ip_to_int("10.0.0.1"), dst=ip_to_int("192.0.2.10"), proto=6,
                          sport=1234, dport=80, tcp_flags=0x02)
    bad = [
        good[:20],  # IPv4 header cut short
        good[:14] + bytes([0x4F]) + good[15:],  # IHL 15: options beyond the packet
        good[:46] + bytes([0x10]) + good[47:],  # TCP data offset 1 (< 5)
        good[:14] + bytes(range(200)),  # random bytes after an IPv4 ethertype
        good[:12] + b"\x81\x00",  # a VLAN tag with nothing behind it
    ]
    sock = packet_socket(the_lab.vms[1], "eth0")
    try:
        for frame in bad * 20:
            sock.send(frame)
    finally:
        sock.close()
    time.sleep(0.5)
    with Client(d.config.parent / "appliance.sock", T) as c:
        vm1 = next(p for p in c.call("ports") if p["name"] == "vm1")
    malformed = {k: v for k, v in vm1["drops"].items() if k.startswith(("malformed", "trunc"))}
    assert sum(malformed.values()) >= 80, vm1["drops"]
    assert d.proc.poll() is None
    test_udp_snat_and_reply(world)  # and it still switches


def test_headless_restart_keeps_established_connections_forwarding(tmp_path):
    with lab(tmp_path) as the_lab:
        d = Daemon(the_lab, headless=True, name="headless").start()
        lst = tcp_listener(the_lab.ext, "192.0.2.10", 7300)
        vip = tcp_listener(the_lab.vms[1], "10.0.0.1", 8080)
        with lst, vip:
            c = connect(the_lab.vms[1], "192.0.2.10", 7300)  # SNAT, opened from inside
            s, _ = accept(lst)
            c2 = connect(the_lab.ext, "198.51.100.80", 80)  # DNAT, opened from outside
            s2, _ = accept(vip)
            with c, s, c2, s2:
                echo_round_trip(c, s)
                echo_round_trip(c2, s2)
                time.sleep(0.6)
                # the TCP connections' entries (VMs' IPv6 chatter comes and goes meanwhile)
                entries = sorted(e for e in d.kernel_flows() if e[1][1] == 6)
                assert d.stop() == 0
                echo_round_trip(c, s, 5)  # no daemon at all: the kernel forwards
                echo_round_trip(c2, s2, 5)
                d2 = Daemon(the_lab, name="headless")
                d2.config.write_text(d2.config.read_text().replace("headless = true",
                                                                   "headless = false"))
                d2.start()
                try:
                    e = d2.wait_event("adopted_flows")
                    assert e["flows"] >= 2 and e["stale"] == 0
                    tcp_entries = sorted(e for e in d2.kernel_flows() if e[1][1] == 6)
                    assert tcp_entries == entries  # no duplicates, no strays
                    before = d2.upcalls()
                    echo_round_trip(c, s, 5)
                    echo_round_trip(c2, s2, 5)
                    assert d2.upcalls() - before <= 2  # still served by the kernel
                finally:
                    assert d2.stop() == 0
        # a normal stop leaves nothing behind
        for dev in ("p1", "p2", "up0"):
            assert "bpf" not in ingress_filters(the_lab.hv, dev)
        assert not os.path.exists(f"/sys/fs/bpf/appliance/{the_lab.rid}/flows")


def test_a_datapath_that_cannot_start_is_a_clear_error_not_a_traceback(tmp_path):
    with lab(tmp_path) as the_lab:
        d = Daemon(the_lab, name="broken")
        d.config.write_text(d.config.read_text().replace(
            f'pin_dir = "/sys/fs/bpf/appliance/{the_lab.rid}"',
            'pin_dir = "/proc/self/status/not-a-directory"'))
        proc = subprocess.run(
            ["nsenter", f"--net=/run/netns/{the_lab.hv.name}", sys.executable, "-m",
             "appliance.cli.applianced", "--config", str(d.config), "--log-format", "json"],
            capture_output=True, text=True, timeout=30)
        assert proc.returncode == 1
        assert "applianced: cannot start the kernel datapath" in proc.stderr
        assert "Traceback" not in proc.stderr
        assert '"event": "datapath_failed"' in proc.stderr


def test_sigterm_during_start_up_leaves_nothing_in_the_kernel(tmp_path):
    with lab(tmp_path) as the_lab:
        d = Daemon(the_lab, name="early")
        log = open(d.log_path, "a")  # noqa: SIM115 - closed below
        d.proc = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{the_lab.hv.name}", sys.executable, "-m",
             "appliance.cli.applianced", "--config", str(d.config)], stdout=log, stderr=log)
        log.close()
        d.wait_event("starting")
        d.signal(signal.SIGTERM)  # while the datapath is being probed/attached
        assert d.proc.wait(15) == 0
        for dev in ("p1", "p2", "up0"):
            assert "bpf" not in ingress_filters(the_lab.hv, dev)
        assert not os.path.exists(f"/sys/fs/bpf/appliance/{the_lab.rid}/flows")
