"""applianced under hostile frames and its own failures (issue 8), in namespaces.

* The frames that used to stop the daemon are named drops, counted per port, the daemon lives.
* A crashed task stops the daemon failing static: the kernel keeps forwarding, the next start
  adopts; only an operator's stop cleans up (and `stop-headless` makes that one headless too).
"""

from __future__ import annotations

import os
import signal
import struct
import time

import pytest
from daemon_lab import GW_MAC, UPLINK_MAC, VM_MACS, Daemon, ingress_filters, lab
from nstools import cmd, packet_socket, tcp_listener
from test_daemon import accept, connect, echo_round_trip

from appliance import guard
from appliance import packet as pk
from appliance.faults import INTERNAL_ERROR
from appliance.ipcproto import Client
from appliance.model import ip_to_int, mac_to_int

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(not os.path.exists(
        os.path.join(os.path.dirname(__file__), "..", "appliance", "datapath", "bpf",
                     "flowcache.bpf.o")), reason="BPF object not built (tools/build-bpf.sh)"),
]

T = 3.0
VM1 = mac_to_int(VM_MACS[1])
GW = mac_to_int(GW_MAC)
EXT = mac_to_int("02:aa:00:00:00:01")
UP = mac_to_int(UPLINK_MAC)


def ports(d: Daemon) -> dict[str, dict]:
    with Client(d.config.parent / "appliance.sock", T) as c:
        return {p["name"]: p for p in c.call("ports")}


def vxlan(inner: bytes) -> bytes:
    return pk.vxlan_encap(inner, vni=5001, src_ip=ip_to_int("203.0.113.2"),
                          dst_ip=ip_to_int("203.0.113.1"), src_mac=EXT, dst_mac=UP,
                          src_port=50000)


def test_the_frames_that_stopped_the_daemon_are_named_drops(tmp_path):
    with lab(tmp_path) as the_lab:
        d = Daemon(the_lab, name="hostile").start()
        try:
            from_vm = [
                # IPv6 with IPv4-mapped addresses, under the lab's SNAT rule (the report's frame)
                pk.build_frame(src_mac=VM1, dst_mac=GW, src=ip_to_int("::ffff:10.0.0.1"),
                               dst=ip_to_int("::ffff:203.0.113.50"), proto=17, sport=5000,
                               dport=53, payload=b"q"),
                # neighbour solicitation for an IPv4-mapped target
                pk.build_neighbor_solicit(src_mac=VM1, src_ip=ip_to_int("fd00::1"),
                                          target_ip=ip_to_int("::ffff:1.2.3.4")),
                # loopback source
                pk.build_frame(src_mac=VM1, dst_mac=GW, src=ip_to_int("127.0.0.1"),
                               dst=ip_to_int("192.0.2.10"), proto=17, sport=1, dport=2),
            ]
            non_ip = struct.pack("!6s6sH", VM1.to_bytes(6), EXT.to_bytes(6), 0x88B5) + bytes(46)
            fake_vxlan = pk.build_frame(src_mac=EXT, dst_mac=VM1, src=ip_to_int("10.1.2.3"),
                                        dst=ip_to_int("10.0.0.1"), proto=17, sport=4000,
                                        dport=pk.VXLAN_PORT, payload=b"\x08\0\0")
            from_uplink = [vxlan(non_ip), vxlan(fake_vxlan)]
            vm = packet_socket(the_lab.vms[1], "eth0")
            ext = packet_socket(the_lab.ext, "eth0")
            try:
                for _ in range(5):
                    for f in from_vm:
                        vm.send(f)
                    for f in from_uplink:
                        ext.send(f)
            finally:
                vm.close()
                ext.close()
            time.sleep(0.5)
            p = ports(d)
            assert p["vm1"]["drops"].get(guard.MAPPED_ADDRESS, 0) >= 10, p["vm1"]["drops"]
            assert p["vm1"]["drops"].get(guard.MARTIAN_SOURCE, 0) >= 5, p["vm1"]["drops"]
            assert p["up0"]["drops"].get("non_ip", 0) >= 5, p["up0"]["drops"]
            assert all(INTERNAL_ERROR not in row["drops"] for row in p.values()), p
            with Client(d.config.parent / "appliance.sock", T) as c:
                assert c.call("status")["internal_errors"] == {"by_where": {}, "by_cause": {}}
            assert d.proc.poll() is None
            # no flow for any of them in the kernel either
            keys = [k for _, k in d.kernel_flows()]
            assert ip_to_int("127.0.0.1") not in {k[2] for k in keys}
            assert not [k for k in keys if k[2] >> 32 == 0xFFFF]
        finally:
            assert d.stop() == 0


def test_a_crashed_task_fails_static_and_the_next_start_adopts(tmp_path):
    with lab(tmp_path) as the_lab:
        d = Daemon(the_lab, name="crash").start()
        lst = tcp_listener(the_lab.ext, "192.0.2.10", 7310)
        with lst:
            c = connect(the_lab.vms[1], "192.0.2.10", 7310)
            s, _ = accept(lst)
            with c, s:
                echo_round_trip(c, s)
                time.sleep(0.6)
                # somebody deletes the daemon's upcall device: its reader cannot go on
                cmd("ip", "-n", the_lab.hv.name, "link", "del", "apl-upcall")
                assert d.proc.wait(15) == 70
                d.wait_event("failing_static")
                d.wait_event("crashed")
                assert "bpf" in ingress_filters(the_lab.hv, "p1")  # the cache stayed
                echo_round_trip(c, s, 5)  # no daemon: established traffic still flows
                d2 = Daemon(the_lab, name="crash").start()
                try:
                    e = d2.wait_event("adopted_flows")
                    assert e["flows"] >= 1
                    echo_round_trip(c, s, 3)
                finally:
                    assert d2.stop() == 0  # an operator's stop: everything removed
        for dev in ("p1", "p2", "up0"):
            assert "bpf" not in ingress_filters(the_lab.hv, dev)
        assert not os.path.exists(f"/sys/fs/bpf/appliance/{the_lab.rid}/flows")


def test_stop_headless_file_makes_one_operator_stop_headless(tmp_path):
    with lab(tmp_path) as the_lab:
        d = Daemon(the_lab, name="upgrade").start()
        flag = d.config.parent / "stop-headless"
        flag.touch()
        d.signal(signal.SIGTERM)
        assert d.proc.wait(15) == 0
        assert not flag.exists()  # consumed
        assert "bpf" in ingress_filters(the_lab.hv, "p1")
        d2 = Daemon(the_lab, name="upgrade").start()
        d2.wait_event("adopted_flows")
        assert d2.stop() == 0
        assert "bpf" not in ingress_filters(the_lab.hv, "p1")
