"""Network-namespace test utilities: unique namespaces, veth pairs, raw frames, cleanup.

Shared by the datapath and daemon tests. Everything made here has a unique name under
`PREFIX` (``apl-t-<run>-<role>``) and is removed in ``finally`` blocks; `sweep_leftovers`
removes what a killed run left behind. Traffic only ever goes to addresses inside namespaces
the test created, so these tests never touch the host's networking.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Final, TypeVar

import pytest

from appliance.datapath.tcdev import in_netns as tc_in_netns

T = TypeVar("T")

PREFIX: Final = "apl-t-"
NETNS_DIR: Final = "/var/run/netns"
PIN_ROOT: Final = "/sys/fs/bpf/appliance"  # where TcDatapath pins maps (per pin_dir)
CMD_TIMEOUT: Final = 10.0  # seconds per `ip`/`tc` command
RECV_TIMEOUT: Final = 2.0  # seconds to wait for an expected frame
QUIET: Final = 0.3  # seconds of silence that prove a frame did NOT arrive
CLONE_NEWNET: Final = 0x40000000
ETH_P_ALL: Final = 0x0003
PACKET_OUTGOING: Final = 4
IFNAMSIZ: Final = 15  # usable characters of a device name
LEFTOVER_AGE: Final = 3600.0  # seconds: older apl-t-* namespaces are from dead runs

_libc = ctypes.CDLL(None, use_errno=True)

requires_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root for network namespaces, veth and BPF")


def run_id() -> str:
    """A short random id shared by one test run's namespaces and devices."""
    return uuid.uuid4().hex[:4]


def cmd(*argv: str, timeout: float = CMD_TIMEOUT, check: bool = True) -> str:
    """Run a command, return stdout; raise with stderr on failure (when ``check``)."""
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: rc={p.returncode}: {p.stderr.strip()}")
    return p.stdout


def sweep_leftovers(prefix: str = PREFIX, min_age: float = LEFTOVER_AGE) -> list[str]:
    """Delete namespaces named ``prefix*`` and BPF pin directories of the same names under
    `PIN_ROOT` left by killed runs; returns what was removed.

    Only what is older than ``min_age`` seconds goes: another test session may be running
    on the same machine right now, and its namespaces are young.
    """
    gone = []
    now = time.time()

    def old(path: str) -> bool:
        try:
            return now - os.stat(path).st_mtime > min_age
        except FileNotFoundError:
            return False

    for line in cmd("ip", "netns", "list").splitlines():
        name = line.split()[0] if line.strip() else ""
        if name.startswith(prefix) and old(os.path.join(NETNS_DIR, name)):
            cmd("ip", "netns", "del", name, check=False)
            gone.append(name)
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(PIN_ROOT):
            if entry.name.startswith(prefix) and entry.is_dir() and old(entry.path):
                for pin in os.scandir(entry.path):
                    os.unlink(pin.path)
                os.rmdir(entry.path)
                gone.append(entry.path)
    return gone


# setns on a throwaway thread: the same helper the datapath uses (one place for it)
in_netns = tc_in_netns


@dataclass
class Netns:
    """A network namespace made by `netns`; ``role`` is the short name used in tests."""

    name: str
    role: str

    def run(self, *argv: str, timeout: float = CMD_TIMEOUT, check: bool = True) -> str:
        """Run a command inside the namespace."""
        return cmd("ip", "netns", "exec", self.name, *argv, timeout=timeout, check=check)

    def returncode(self, *argv: str, timeout: float = CMD_TIMEOUT) -> int:
        """Run a command inside the namespace; only its exit status matters."""
        return subprocess.run(["ip", "netns", "exec", self.name, *argv], capture_output=True,
                              timeout=timeout, check=False).returncode

    def ip(self, *args: str) -> str:
        return cmd("ip", "-n", self.name, *args)

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` (e.g. socket creation) inside the namespace; see `in_netns`."""
        return in_netns(self.name, fn)

    def python(self, code: str, timeout: float = CMD_TIMEOUT) -> str:
        """Run Python ``code`` in a subprocess inside the namespace; returns its stdout."""
        return self.run(sys.executable, "-c", code, timeout=timeout)

    def ifindex(self, dev: str) -> int:
        return self.call(lambda: socket.if_nametoindex(dev))

    def rx_packets(self, dev: str) -> int:
        """Interface receive counter (what benchmarks and drop tests count)."""
        return int(self.run("cat", f"/sys/class/net/{dev}/statistics/rx_packets").strip())


@contextlib.contextmanager
def netns(rid: str, role: str) -> Iterator[Netns]:
    """A fresh namespace ``apl-t-<rid>-<role>`` with lo up; always deleted afterwards."""
    name = f"{PREFIX}{rid}-{role}"
    cmd("ip", "netns", "add", name)
    try:
        cmd("ip", "-n", name, "link", "set", "lo", "up")
        yield Netns(name, role)
    finally:
        cmd("ip", "netns", "del", name, check=False)


def veth(a: Netns, a_dev: str, b: Netns, b_dev: str, *, a_mac: str | None = None,
         b_mac: str | None = None) -> None:
    """A veth pair created directly inside the two namespaces (no name clash with the host),
    both ends up, IPv6 off (no DAD/RS noise in captures)."""
    if max(len(a_dev), len(b_dev)) > IFNAMSIZ:
        raise ValueError("device name too long")
    cmd("ip", "-n", a.name, "link", "add", a_dev, "type", "veth", "peer", "name", b_dev,
        "netns", b.name)
    for ns, dev, mac in ((a, a_dev, a_mac), (b, b_dev, b_mac)):
        if mac:
            ns.ip("link", "set", dev, "address", mac)
        ns.run("sysctl", "-qw", f"net.ipv6.conf.{dev}.disable_ipv6=1")
        ns.ip("link", "set", dev, "up")


@dataclass
class PacketSocket:
    """An AF_PACKET socket bound to one device of a namespace: send raw frames, capture."""

    sock: socket.socket
    dev: str
    frames: list[bytes] = field(default_factory=list)

    def send(self, frame: bytes) -> None:
        self.sock.send(frame)

    def recv(self, match: Callable[[bytes], bool] = lambda f: True,
             timeout: float = RECV_TIMEOUT, outgoing: bool = False) -> bytes | None:
        """The next frame (received, or sent when ``outgoing``) satisfying ``match``."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            r, _, _ = select.select([self.sock], [], [], left)
            if not r:
                break
            data, addr = self.sock.recvfrom(65535)
            if (addr[2] == PACKET_OUTGOING) == outgoing and match(data):
                return data
        return None

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while True:
                self.sock.recv(65535, socket.MSG_DONTWAIT)

    def close(self) -> None:
        self.sock.close()


def packet_socket(ns: Netns, dev: str) -> PacketSocket:
    """Open an AF_PACKET socket on ``dev`` inside ``ns`` (sees both directions)."""
    def make() -> socket.socket:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        s.bind((dev, 0))
        return s

    return PacketSocket(ns.call(make), dev)


def udp_socket(ns: Netns, addr: str, port: int, timeout: float = RECV_TIMEOUT) -> socket.socket:
    """A UDP socket bound inside ``ns``: the kernel there verifies checksums of what arrives."""
    def make() -> socket.socket:
        s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((addr, port))
        s.settimeout(timeout)
        return s

    return ns.call(make)


def tcp_listener(ns: Netns, addr: str, port: int) -> socket.socket:
    def make() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((addr, port))
        s.listen(8)
        return s

    return ns.call(make)


def read_fd(fd: int, match: Callable[[bytes], bool] = lambda f: True,
            timeout: float = RECV_TIMEOUT) -> bytes | None:
    """The next frame on a (non-blocking) TAP fd that satisfies ``match``."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        r, _, _ = select.select([fd], [], [], left)
        if not r:
            break
        with contextlib.suppress(BlockingIOError):
            data = os.read(fd, 65535)
            if match(data):
                return data
    return None


def drain_fd(fd: int) -> list[bytes]:
    """Everything queued on a non-blocking fd right now."""
    out = []
    with contextlib.suppress(BlockingIOError):
        while True:
            out.append(os.read(fd, 65535))
    return out
