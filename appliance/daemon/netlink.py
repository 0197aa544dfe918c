"""Link watcher: which netdevs exist, their ifindex and up/down state, followed live.

pyroute2 0.9's IPRoute runs its own asyncio loop and blocks its thread, so this reads a raw
``AF_NETLINK`` socket from trio (``wait_readable``) and lets pyroute2 only *parse* the bytes
(``MarshalRtnl``), as measured in docs/KERNEL.md. A full dump at start and after an overflow
(``ENOBUFS``: the kernel dropped events because we were slow) rebuilds the whole picture; the
watcher then reports the differences, so consumers only ever see consistent events.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass
from typing import Final

import structlog
import trio
from pyroute2.netlink import NLM_F_DUMP, NLM_F_REQUEST
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.marshal import MarshalRtnl

log = structlog.get_logger(__name__)

RTMGRP_LINK: Final = 1
RTM_NEWLINK: Final = 16
RTM_DELLINK: Final = 17
RTM_GETLINK: Final = 18
NLMSG_DONE: Final = 3
NLMSG_ERROR: Final = 2
IFF_UP: Final = 0x1
IFF_LOWER_UP: Final = 0x10000
RCVBUF: Final = 4 * 1024 * 1024  # bytes; large enough for bursts of link events
RECV_SIZE: Final = 256 * 1024  # bytes per recv


@dataclass(frozen=True, slots=True)
class Link:
    name: str
    ifindex: int
    up: bool  # administratively up and carrier (IFF_UP and IFF_LOWER_UP)
    mac: int | None


@dataclass(frozen=True, slots=True)
class LinkEvent:
    kind: str  # "added" | "removed" | "changed" | "resync"
    link: Link | None  # None for "resync" (a marker after a full dump)


def _link_from(msg) -> Link | None:
    name = msg.get_attr("IFLA_IFNAME")
    if name is None:
        return None
    flags = msg["flags"]
    addr = msg.get_attr("IFLA_ADDRESS")
    mac = int(addr.replace(":", ""), 16) if addr and len(addr) == 17 else None
    return Link(name, msg["index"], bool(flags & IFF_UP and flags & IFF_LOWER_UP), mac)


class LinkWatcher:
    """Keeps ``links`` (name -> Link) current and sends `LinkEvent`s on a channel."""

    def __init__(self, events: trio.MemorySendChannel[LinkEvent]) -> None:
        self.links: dict[str, Link] = {}
        self.resyncs = 0
        self._events = events
        self._marshal = MarshalRtnl()
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK,
                                   0)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        self._sock.bind((0, RTMGRP_LINK))
        self._seq = 0

    def close(self) -> None:
        self._sock.close()

    async def _recv(self) -> bytes | None:
        """One datagram, or None after an overflow (the caller must resync)."""
        while True:
            try:
                return self._sock.recv(RECV_SIZE)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self._sock)
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    return None
                raise

    async def _dump(self) -> dict[str, Link]:
        """Full RTM_GETLINK dump; events arriving meanwhile are folded in by the next diff."""
        self._seq += 1
        msg = ifinfmsg()
        msg["family"] = socket.AF_UNSPEC
        msg["header"]["type"] = RTM_GETLINK
        msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_DUMP
        msg["header"]["sequence_number"] = self._seq
        msg.encode()
        self._sock.send(msg.data)
        links: dict[str, Link] = {}
        while True:
            data = await self._recv()
            if data is None:  # overflow during the dump: start over
                return await self._dump()
            done = False
            for m in self._marshal.parse(data):
                t = m["header"]["type"]
                if m["header"]["sequence_number"] != self._seq:
                    continue  # an asynchronous event; the dump supersedes it
                if t in (NLMSG_DONE, NLMSG_ERROR):
                    done = True
                elif t == RTM_NEWLINK:
                    link = _link_from(m)
                    if link is not None:
                        links[link.name] = link
            if done:
                return links

    async def _resync(self) -> None:
        fresh = await self._dump()
        self.resyncs += 1
        old = self.links
        self.links = fresh
        for name, link in old.items():
            if name not in fresh or fresh[name].ifindex != link.ifindex:
                await self._events.send(LinkEvent("removed", link))
        for name, link in fresh.items():
            before = old.get(name)
            if before is None or before.ifindex != link.ifindex:
                await self._events.send(LinkEvent("added", link))
            elif before != link:
                await self._events.send(LinkEvent("changed", link))
        await self._events.send(LinkEvent("resync", None))

    async def _apply(self, msg) -> None:
        link = _link_from(msg)
        if link is None:
            return
        t = msg["header"]["type"]
        before = self.links.get(link.name)
        if t == RTM_DELLINK:
            if before is not None and before.ifindex == link.ifindex:
                del self.links[link.name]
                await self._events.send(LinkEvent("removed", before))
            return
        # a rename shows up as a NEWLINK with a known ifindex under a new name
        for name, other in list(self.links.items()):
            if other.ifindex == link.ifindex and name != link.name:
                del self.links[name]
                await self._events.send(LinkEvent("removed", other))
        self.links[link.name] = link
        if before is None or before.ifindex != link.ifindex:
            if before is not None:
                await self._events.send(LinkEvent("removed", before))
            await self._events.send(LinkEvent("added", link))
        elif before != link:
            await self._events.send(LinkEvent("changed", link))

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Dump, report ready, then follow events forever (resync on overflow)."""
        async with self._events:
            try:
                await self._resync()
                task_status.started(self)
                while True:
                    data = await self._recv()
                    if data is None:
                        log.warning("netlink_overflow_resync")
                        await self._resync()
                        continue
                    for m in self._marshal.parse(data):
                        if m["header"]["type"] in (RTM_NEWLINK, RTM_DELLINK):
                            await self._apply(m)
            finally:
                self.close()
