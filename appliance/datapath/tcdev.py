"""Network namespaces and the upcall TAP, for the kernel datapath and its tests.

setns() changes only the calling thread, so work in another namespace runs on a throwaway
thread (`in_netns`); the upcall TAP is made with TUNSETIFF and brought up with ioctls, no
`ip` subprocess.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Final, TypeVar

T = TypeVar("T")

CLONE_NEWNET: Final = 0x40000000
NETNS_RUN_DIR: Final = "/var/run/netns"
TUNSETIFF: Final = 0x400454CA
IFF_TAP: Final = 0x0002
IFF_NO_PI: Final = 0x1000
IFF_UP: Final = 0x1
SIOCGIFFLAGS: Final = 0x8913
SIOCSIFFLAGS: Final = 0x8914
_libc = ctypes.CDLL(None, use_errno=True)


def in_netns(netns: str | None, fn: Callable[[], T]) -> T:
    """Run ``fn`` in network namespace ``netns`` (None: here) on a throwaway thread.

    setns() changes only the calling thread, so a fresh thread keeps the caller's namespace
    untouched; sockets and devices created by ``fn`` stay in ``netns``.
    """
    if netns is None:
        return fn()
    box: dict[str, object] = {}

    def body() -> None:
        try:
            fd = os.open(os.path.join(NETNS_RUN_DIR, netns), os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns {netns}")
            finally:
                os.close(fd)
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    t = threading.Thread(target=body, name=f"netns-{netns}")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


def _set_up(name: str) -> int:
    """Bring ``name`` up with SIOCSIFFLAGS and return its ifindex (current thread's netns)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sH14x", name.encode(), 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s, SIOCGIFFLAGS, req))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH14x", name.encode(), flags | IFF_UP))
    return socket.if_nametoindex(name)


def open_upcall_tap(name: str, netns: str | None = None) -> tuple[int, int]:
    """Create TAP ``name`` (IFF_TAP|IFF_NO_PI), non-blocking, up, IPv6 off: ``(fd, ifindex)``.

    The TAP lives only while ``fd`` is open. IPv6 is disabled so the host's router
    solicitations and DAD never appear among the upcalls (docs/KERNEL.md pitfall 4).
    """
    def make() -> tuple[int, int]:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI))
            with contextlib.suppress(FileNotFoundError):  # IPv6 disabled in this kernel
                Path(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6").write_text("1\n")
            return fd, _set_up(name)
        except BaseException:
            os.close(fd)
            raise

    return in_netns(netns, make)
