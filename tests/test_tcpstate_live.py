"""TCP state kept by the kernel program, through applianced with real connections (issue 11).

The kernel no longer copies SYN/FIN/RST up: a connection costs one upcall (its first SYN),
the ager derives its state from the flags the program gathered, and the idle timeouts follow
(closing after FINs, closed after a RST, half-open on the SYN timeout, established for
long). The originator's SYN on a finished connection misses, so a reused 5-tuple is a new
connection, evaluated against the policy of the moment.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import time

import pytest
from daemon_lab import Daemon, lab
from nstools import packet_socket, tcp_listener

from appliance import packet as pk
from appliance.daemon.upcall import split_tag
from appliance.ipcproto import Client
from appliance.model import ip_to_int, mac_to_int

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(not os.path.exists(
        os.path.join(os.path.dirname(__file__), "..", "appliance", "datapath", "bpf",
                     "flowcache.bpf.o")), reason="BPF object not built (tools/build-bpf.sh)"),
]

T = 3.0  # seconds: socket timeouts
TIMEOUTS = {"tcp_syn": 4, "tcp_closing": 2, "tcp_closed": 1}  # seconds, short for the test
SWEEP = 0.3  # seconds between ager sweeps
EXT = "192.0.2.10"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    extra = "[timeouts]\n" + "".join(f"{k} = {v}\n" for k, v in TIMEOUTS.items())
    with lab(tmp_path_factory.mktemp("tcpstate")) as the_lab:
        d = Daemon(the_lab, sweep=SWEEP, extra=extra).start()
        try:
            with Client(d.config.parent / "appliance.sock", T) as c:
                yield the_lab, d, c
        finally:
            d.stop()


def connect(ns, port: int, sport: int) -> socket.socket:
    def make() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.settimeout(T)
        try:
            s.bind(("10.0.0.1", sport))
            s.connect((EXT, port))
        except OSError:
            s.close()
            raise
        return s
    return ns.call(make)


def exchange(client: socket.socket, lst: socket.socket) -> socket.socket:
    lst.settimeout(T)
    server, _ = lst.accept()
    server.settimeout(T)
    client.sendall(b"GET /")
    assert server.recv(100) == b"GET /"
    server.sendall(b"200 OK")
    assert client.recv(100) == b"200 OK"
    return server


def reset(s: socket.socket) -> None:
    """Close with a RST (SO_LINGER 0): no TIME_WAIT, the 5-tuple can be used again at once."""
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def conn_rows(c: Client, sport: int) -> list[dict]:
    return [f for f in c.call("flows", port="vm1", l4_port=sport, limit=10)["flows"]
            if f["key"]["proto"] == "tcp"]


def wait_state(c: Client, sport: int, state: str, timeout: float = 5.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        rows = conn_rows(c, sport)
        if rows and all(r["tcp_state"] == state for r in rows):
            return rows
        assert time.monotonic() < deadline, (state, rows)
        time.sleep(0.1)


def wait_gone(c: Client, sport: int, timeout: float) -> float:
    start = time.monotonic()
    while conn_rows(c, sport):
        assert time.monotonic() - start < timeout, conn_rows(c, sport)
        time.sleep(0.1)
    return time.monotonic() - start


def kernel(c: Client) -> dict:
    return c.call("nic")["kernel"]


@contextlib.contextmanager
def upcall_capture(the_lab):
    """Frames the kernel sends up, read off the upcall TAP: `count(port)` gives how many
    were TCP to or from ``port`` (the VMs' own IPv6 chatter goes up too, and is not
    counted)."""
    sock = packet_socket(the_lab.hv, "apl-upcall")

    def count(port: int) -> int:
        n = 0
        while (frame := sock.recv(timeout=0.2, outgoing=True)) is not None:
            up = split_tag(frame)  # AF_PACKET usually shows the tag as metadata only
            key = pk.fast_flow_key(up.frame if up is not None else frame)
            n += key is not None and key[pk.K_PROTO] == pk.PROTO_TCP and port in (
                key[pk.K_SPORT], key[pk.K_DPORT])
        return n

    try:
        yield count
    finally:
        sock.close()


def test_a_connection_life_costs_one_upcall_and_ends_on_the_closing_timeout(world):
    the_lab, _, c = world
    sport = 41001
    with tcp_listener(the_lab.ext, EXT, 7401) as lst, upcall_capture(the_lab) as upcalls:
        k0 = kernel(c)
        cl = connect(the_lab.vms[1], 7401, sport)
        srv = exchange(cl, lst)
        rows = wait_state(c, sport, "established")  # the handshake, seen by the kernel only
        assert len(rows) == 2 and all(r["offloaded"] for r in rows)
        cl.close()  # FIN from the originator ...
        assert srv.recv(100) == b""
        srv.close()  # ... and from the responder
        wait_state(c, sport, "closing")
        k1 = kernel(c)
        assert upcalls(sport) == 1  # one miss (the SYN): nothing else of it goes up
    assert k1["copy"] == k0["copy"]
    assert k1["tcp_restart"] == k0["tcp_restart"]
    wait_gone(c, sport, TIMEOUTS["tcp_closing"] + 3)


def test_many_connections_send_nothing_but_their_first_syn_up(world):
    the_lab, _, c = world
    n = 20
    with tcp_listener(the_lab.ext, EXT, 7402) as lst, upcall_capture(the_lab) as upcalls:
        k0 = kernel(c)
        for i in range(n):
            cl = connect(the_lab.vms[1], 7402, 42000 + i)
            srv = exchange(cl, lst)
            cl.close()
            assert srv.recv(100) == b""
            srv.close()
        time.sleep(0.5)
        k1 = kernel(c)
        # GFT's copy-on-flags sent ~4 per connection up (SYN, SYN-ACK, FIN, FIN)
        assert upcalls(7402) == n
    assert k1["upcall"] - k0["upcall"] >= n
    assert k1["copy"] == k0["copy"]


def test_a_reset_connection_is_closed_and_goes_on_the_closed_timeout(world):
    the_lab, _, c = world
    sport = 41003
    with tcp_listener(the_lab.ext, EXT, 7403) as lst:
        cl = connect(the_lab.vms[1], 7403, sport)
        srv = exchange(cl, lst)
        wait_state(c, sport, "established")
        reset(cl)
        wait_state(c, sport, "closed")
        srv.close()
    wait_gone(c, sport, TIMEOUTS["tcp_closed"] + 3)


def test_a_half_open_connection_goes_on_the_syn_timeout(world):
    """A SYN nobody answers: syn_sent, kept past the closed/closing timeouts, gone after
    tcp_syn."""
    the_lab, _, c = world
    sport = 41004
    syn = pk.build_frame(src_mac=mac_to_int("02:00:00:00:00:01"),
                         dst_mac=mac_to_int("02:00:00:00:00:fe"), src=ip_to_int("10.0.0.1"),
                         dst=ip_to_int("192.0.2.99"), proto=pk.PROTO_TCP, sport=sport,
                         dport=7404, tcp_flags=0x02, tcp_seq=1)
    tx = packet_socket(the_lab.vms[1], "eth0")
    try:
        tx.send(syn)
    finally:
        tx.close()
    wait_state(c, sport, "syn_sent")
    time.sleep(max(TIMEOUTS["tcp_closing"], TIMEOUTS["tcp_closed"]) + 2 * SWEEP + 0.5)
    assert [r["tcp_state"] for r in conn_rows(c, sport)] == ["syn_sent", "syn_sent"]
    wait_gone(c, sport, TIMEOUTS["tcp_syn"] + 3)


def test_an_established_connection_outlives_the_short_timeouts(world):
    the_lab, _, c = world
    sport = 41005
    with tcp_listener(the_lab.ext, EXT, 7405) as lst:
        cl = connect(the_lab.vms[1], 7405, sport)
        srv = exchange(cl, lst)
        with cl, srv:
            wait_state(c, sport, "established")
            time.sleep(TIMEOUTS["tcp_syn"] + 1)  # idle longer than any short timeout
            assert len(conn_rows(c, sport)) == 2
            cl.sendall(b"still there")
            assert srv.recv(100) == b"still there"


def test_a_reused_5_tuple_is_a_new_connection_under_the_policy_of_the_moment(world):
    the_lab, _, c = world
    sport = 41006
    with tcp_listener(the_lab.ext, EXT, 7406) as lst:
        cl = connect(the_lab.vms[1], 7406, sport)
        srv = exchange(cl, lst)
        first = wait_state(c, sport, "established")
        reset(cl)  # over (a RST), at once: before any sweep folded it
        srv.close()
        # an operator allows the port by a rule of its own between the two connections
        rule = {"name": "web-7406", "priority": 5,
                "match": {"proto": "tcp", "dst_port": 7406}, "action": "allow"}
        c.call("rule_add", layer="acl", direction="out", rule=rule)
        k0, created0 = kernel(c), c.call("status")["flows"]["created"]
        cl = connect(the_lab.vms[1], 7406, sport)  # the same 5-tuple
        srv = exchange(cl, lst)
        with cl, srv:
            second = wait_state(c, sport, "established")
            assert kernel(c)["tcp_restart"] == k0["tcp_restart"] + 1  # the kernel sent it up
            assert c.call("status")["flows"]["created"] == created0 + 1  # counted as new
            assert min(r["age"] for r in second) < min(r["age"] for r in first) + 1
            tr = [s for s in c.call("flows", port="vm1", l4_port=sport)["flows"]
                  if s["forward"]]
            assert len(tr) == 1 and tr[0]["offloaded"]
        c.call("rule_delete", layer="acl", direction="out", name="web-7406")


def test_a_port_denied_between_two_connections_refuses_the_second(world):
    the_lab, _, c = world
    sport = 41007
    with tcp_listener(the_lab.ext, EXT, 7407) as lst:
        cl = connect(the_lab.vms[1], 7407, sport)
        srv = exchange(cl, lst)
        wait_state(c, sport, "established")
        reset(cl)
        srv.close()
        rule = {"name": "no-7407", "priority": 5,
                "match": {"proto": "tcp", "dst_port": 7407}, "action": "deny"}
        c.call("rule_add", layer="acl", direction="out", rule=rule)
        try:
            with pytest.raises(OSError):
                connect(the_lab.vms[1], 7407, sport).close()
        finally:
            c.call("rule_delete", layer="acl", direction="out", name="no-7407")
        cl = connect(the_lab.vms[1], 7407, sport)  # allowed again: a new connection again
        exchange(cl, lst).close()
        cl.close()


def test_a_connection_that_ended_while_no_daemon_ran_is_adopted_as_over(tmp_path):
    """Headless restart: the kernel kept the flags while no daemon ran; the next daemon
    adopts the connection with its slot, sees it is over and lets it go on that timeout."""
    extra = "[timeouts]\n" + "".join(f"{k} = {v}\n" for k, v in TIMEOUTS.items())
    sport = 41010
    with lab(tmp_path) as the_lab:
        d = Daemon(the_lab, headless=True, sweep=SWEEP, extra=extra, name="h").start()
        with tcp_listener(the_lab.ext, EXT, 7410) as lst:
            cl = connect(the_lab.vms[1], 7410, sport)
            srv = exchange(cl, lst)
            with Client(d.config.parent / "appliance.sock", T) as c:
                wait_state(c, sport, "established")
            assert d.stop() == 0  # headless: the kernel keeps forwarding
            cl.close()  # FIN both ways, seen by the kernel only
            assert srv.recv(100) == b""
            srv.close()
        d2 = Daemon(the_lab, sweep=SWEEP, extra=extra, name="h")
        d2.config.write_text(d2.config.read_text().replace("headless = true",
                                                           "headless = false"))
        d2.start()
        try:
            assert d2.wait_event("adopted_flows")["flows"] >= 1
            with Client(d2.config.parent / "appliance.sock", T) as c:
                rows = conn_rows(c, sport)
                assert [r["tcp_state"] for r in rows] == ["closing", "closing"], rows
                wait_gone(c, sport, TIMEOUTS["tcp_closing"] + 3)
        finally:
            assert d2.stop() == 0
