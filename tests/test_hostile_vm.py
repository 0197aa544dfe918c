"""A hostile VM against the live daemon: thousands of bad frames, while its neighbour works.

vm1 sends, through a raw AF_PACKET socket on its eth0, every kind of frame the grammar
(`appliance.testing.frames`) makes -- random and mutated frames, truncations, bad lengths and
checksums, every address class (IPv4-mapped, -compatible, multicast, loopback, unspecified
sources...), VLAN stacks, VXLAN in VXLAN, fragments out of order -- then the packets of every
shared capture, then the frames the fuzzer found to break the pipeline. Meanwhile vm2 keeps a
TCP connection to the external host streaming (every byte counted), a UDP flow with sequence
numbers (every datagram counted) and opens new TCP connections. Afterwards the daemon must be
alive, nothing of vm2's established traffic lost, new connections must work, the IPC must
answer, and the ``internal_error`` drop count (issue 8) must be 0.

Every frame stays inside the lab's namespaces (vm1 -> hv -> ext, whose only link is the
lab's veth): whatever addresses the hostile frames carry, they reach nothing else.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_lab import GW_MAC, VM_MACS, Daemon, lab
from nstools import packet_socket

from appliance.capture import CaptureError, open_capture, to_ethernet
from appliance.ipcproto import Client
from appliance.model import mac_to_int
from appliance.testing import frames as fr

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(not os.path.exists(
        os.path.join(os.path.dirname(__file__), "..", "appliance", "datapath", "bpf",
                     "flowcache.bpf.o")), reason="BPF object not built (tools/build-bpf.sh)"),
]

EXT = "192.0.2.10"
STREAM_PORT = 47123  # vm2's established TCP connection (a port the grammar never draws)
UDP_PORT = 47124
NEW_CONN_PORT = 47125
GRAMMAR_FRAMES = 10000
CAPTURE_FRAMES_PER_FILE = 12
MAX_SEND = 9000  # bytes: larger frames are refused by the veth (EMSGSIZE), counted apart
RATE = 6000  # frames/s: under the per-port upcall budget, so every frame is evaluated
SEED = 8
T = 3.0
HERE = Path(__file__).resolve()
CAPTURES = next((p for p in (HERE.parents[2] / "shared" / "captures",
                             Path("/work/shared/captures")) if p.is_dir()), None)


def _grammar_batches() -> Iterator[tuple[str, list[bytes]]]:
    vm1, gw = mac_to_int(VM_MACS[1]), mac_to_int(GW_MAC)
    yield "address classes", [f for _, f in fr.address_class_frames(vm1, gw)]
    yield "grammar (random and mutated)", fr.frames_from_seed(SEED, GRAMMAR_FRAMES)
    yield "vxlan in vxlan", fr.frames_from_seed(SEED, 200, fr.vxlan_in_vxlan)
    frags: list[bytes] = []
    for i in range(150):
        frags += fr.fragments(fr.RandomSource(SEED * 7919 + i))
    yield "fragments out of order", frags


def _capture_batch() -> list[bytes]:
    out: list[bytes] = []
    if CAPTURES is None:
        return out
    for path in sorted(p for p in CAPTURES.rglob("*") if p.is_file() and
                       p.suffix in (".pcap", ".pcapng", ".cap")):
        try:
            with open_capture(path) as cap:
                for n, cp in enumerate(cap):
                    if n >= CAPTURE_FRAMES_PER_FILE:
                        break
                    frame = to_ethernet(cp.linktype, cp.data)
                    if frame is not None:
                        out.append(frame)
        except (CaptureError, OSError, ValueError):
            continue  # a file the reader refuses is the trace tests' business
    return out


def _fuzz_findings() -> list[bytes]:
    from test_fuzz import FOUND

    return [bytes.fromhex(f[3]) for f in FOUND if f[1] == "vm1" or f[1] == "up0"]


class Stream:
    """vm2 -> ext: one long TCP connection carrying a counted byte stream."""

    def __init__(self, the_lab, chunk: int = 1400) -> None:
        self.listener = the_lab.ext.call(lambda: self._listen())
        self.client = the_lab.vms[2].call(
            lambda: socket.create_connection((EXT, STREAM_PORT), timeout=T))
        self.server, _ = self.listener.accept()
        self.server.settimeout(T)
        self.chunk = b"s" * chunk
        self.sent = 0
        self.received = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._send, daemon=True),
                         threading.Thread(target=self._recv, daemon=True)]
        for t in self._threads:
            t.start()

    @staticmethod
    def _listen() -> socket.socket:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((EXT, STREAM_PORT))
        s.listen(1)
        s.settimeout(T)
        return s

    def _send(self) -> None:
        try:
            while not self._stop.is_set():
                self.client.sendall(self.chunk)
                self.sent += len(self.chunk)
                time.sleep(0.002)
        except OSError as e:
            self.errors.append(f"send: {e}")

    def _recv(self) -> None:
        try:
            while True:
                data = self.server.recv(65536)
                if not data:
                    return
                self.received += len(data)
        except OSError as e:
            self.errors.append(f"recv: {e}")

    def finish(self) -> None:
        self._stop.set()
        self._threads[0].join(T)
        self.client.shutdown(socket.SHUT_WR)
        self._threads[1].join(10)
        for s in (self.client, self.server, self.listener):
            s.close()


class Datagrams:
    """vm2 -> ext: an established UDP flow, one numbered datagram every 2 ms."""

    def __init__(self, the_lab) -> None:
        def rx() -> socket.socket:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((EXT, UDP_PORT))
            s.settimeout(0.5)
            return s

        self.rx = the_lab.ext.call(rx)
        self.tx = the_lab.vms[2].call(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        self.sent = 0
        self.seen: set[int] = set()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._send, daemon=True),
                         threading.Thread(target=self._recv, daemon=True)]
        for t in self._threads:
            t.start()

    def _send(self) -> None:
        while not self._stop.is_set():
            self.tx.sendto(self.sent.to_bytes(4, "big"), (EXT, UDP_PORT))
            self.sent += 1
            time.sleep(0.002)

    def _recv(self) -> None:
        while True:
            try:
                data, _ = self.rx.recvfrom(64)
            except TimeoutError:
                if self._stop.is_set():
                    return
                continue
            self.seen.add(int.from_bytes(data[:4], "big"))

    def finish(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5)
        self.tx.close()
        self.rx.close()


def _new_connection(the_lab, listener: socket.socket) -> bool:
    """vm2 opens a fresh TCP connection to ext and exchanges one message."""
    try:
        c = the_lab.vms[2].call(
            lambda: socket.create_connection((EXT, NEW_CONN_PORT), timeout=T))
        s, _ = listener.accept()
        with c, s:
            s.settimeout(T)
            c.sendall(b"hello")
            return s.recv(16) == b"hello"
    except OSError:
        return False


def _retransmits(ns) -> int:
    """TCP segments retransmitted by the namespace's stack (/proc/net/snmp, per netns)."""
    lines = [ln.split() for ln in ns.run("cat", "/proc/net/snmp").splitlines()
             if ln.startswith("Tcp:")]
    return int(lines[1][lines[0].index("RetransSegs")])


def test_hostile_vm_cannot_hurt_the_switch_or_its_neighbours(tmp_path: Path) -> None:
    with lab(tmp_path) as the_lab:
        daemon = Daemon(the_lab).start()
        try:
            _run(the_lab, daemon)
        finally:
            daemon.stop()


def _run(the_lab, daemon: Daemon) -> None:
    sock_path = daemon.policy_path.parent / "appliance.sock"
    new_listener = the_lab.ext.call(lambda: _listener(NEW_CONN_PORT))
    assert _new_connection(the_lab, new_listener), "no TCP through the switch before the test"
    stream = Stream(the_lab)
    udp = Datagrams(the_lab)
    retrans_before = _retransmits(the_lab.vms[2])
    raw = packet_socket(the_lab.vms[1], "eth0")
    sent = refused = 0
    new_ok = new_tried = 0
    started = time.monotonic()
    batches = [*_grammar_batches(), ("shared captures", _capture_batch()),
               ("fuzz findings", _fuzz_findings())]
    last_batch, recent = "", []
    try:
        for name, frames in batches:
            last_batch = name
            for i, frame in enumerate(frames):
                if len(frame) > MAX_SEND or len(frame) < 14:
                    refused += 1
                    continue
                try:
                    raw.send(frame)
                    sent += 1
                except OSError:
                    refused += 1
                if sent % 50 == 0:  # pace: a flood the budget cut short would test less
                    time.sleep(max(0.0, started + sent / RATE - time.monotonic()))
                recent = [*recent[-4:], frame]
                if i % 500 == 499:
                    _assert_alive(daemon, name, recent)
                    new_tried += 1
                    new_ok += _new_connection(the_lab, new_listener)
            _assert_alive(daemon, name, recent)
        elapsed = time.monotonic() - started
        time.sleep(1.0)  # let the upcall queue drain before judging
        alive = daemon.proc is not None and daemon.proc.poll() is None
        after = [_new_connection(the_lab, new_listener) for _ in range(5)]
    finally:
        raw.close()
        stream.finish()
        udp.finish()
        new_listener.close()
    retrans = _retransmits(the_lab.vms[2]) - retrans_before
    lost_udp = udp.sent - len(udp.seen)
    print(f"\nhostile vm1: {sent} frames sent in {elapsed:.1f} s ({sent / elapsed:,.0f}/s), "
          f"{refused} refused by the kernel (too big/short); last batch {last_batch!r}")
    print(f"vm2: TCP stream {stream.sent} bytes sent, {stream.received} received, "
          f"{retrans} retransmitted segments; UDP {udp.sent} sent, {lost_udp} lost; "
          f"new connections during the flood {new_ok}/{new_tried}, after {sum(after)}/5")
    assert alive, "applianced is not running:\n" + daemon.log_path.read_text()[-3000:]
    with Client(sock_path, timeout=T) as c:
        status = c.call("status")
        ports = {p["name"]: p for p in c.call("ports")}
    dropped = sum(p["drops"].get("internal_error", 0) for p in ports.values())
    faults = status.get("internal_errors", {}).get("by_where", {})  # every task's faults
    internal = max(dropped, sum(faults.values()))
    vm1 = ports["vm1"]
    print(f"daemon: vm1 upcalls {vm1['upcalls']}, upcall budget drops "
          f"{vm1['upcall_budget_drops']}, drops {dict(sorted(vm1['drops'].items()))}; "
          f"flows active {status['flows']['active']}; internal_error {internal} {faults}")
    assert not stream.errors, stream.errors
    assert stream.received == stream.sent > 0, "bytes of the established connection lost"
    assert lost_udp == 0, f"{lost_udp} of {udp.sent} datagrams of an established flow lost"
    assert all(after), f"new connections after the flood: {after}"
    assert new_ok == new_tried, f"new connections during the flood: {new_ok}/{new_tried}"
    assert internal == 0, f"internal errors: {dropped} packets dropped, faults {faults}"


def _assert_alive(daemon: Daemon, batch: str, recent: list[bytes]) -> None:
    """Fail at once, naming the batch and the last frames, if applianced has exited."""
    assert daemon.proc is not None and daemon.proc.poll() is None, (
        f"applianced died during the {batch!r} batch; last frames sent:\n"
        + "\n".join(f.hex() for f in recent) + "\n" + daemon.log_path.read_text()[-3000:])


def _listener(port: int) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((EXT, port))
    s.listen(16)
    s.settimeout(T)
    return s
