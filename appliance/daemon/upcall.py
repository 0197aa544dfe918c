"""Upcall I/O: packets the kernel cache missed come up a TAP; answers go out AF_PACKET.

The miss filter on every switch device pushes an 802.1Q tag carrying the device's *port tag*
and redirects the packet to the upcall TAP, so one TAP serves all ports and the ingress is
known without a socket per port. Tag bit 0x800 marks a *copy* (a TCP SYN/FIN/RST the kernel
already forwarded; GFT's copy-on-flags): the daemon follows connection state from it but must
not send it again. The program keeps TCP state itself now and sends no copies; the bit is
still understood. Frame format read from the TAP::

    [dst mac][src mac][0x8100][tag: 0x800 copy | port tag][original ethertype ...]

The reader always drains the TAP (docs/KERNEL.md: one read per wakeup caps at ~35k pkts/s, a drain
loop at ~180k) into a `FairQueue`: one bounded queue per port, served round-robin by the slow
path. Reading costs a few microseconds per frame, evaluating tens, so the TAP (whose queue
all ports share, first come first served) stays empty and a port that floods fills only its
own queue: its excess is dropped there (counted per port) while every other port's upcalls
wait behind at most one of its packets per round. Each port's upcall rate is also capped in
the kernel (`upcall_port_rate`), so the reader's share of the CPU stays bounded too.
Established (offloaded) traffic never waits for the daemon.
"""

from __future__ import annotations

import collections
import os
import socket
from dataclasses import dataclass
from typing import Final

import trio

TAG_COPY: Final = 0x800
TAG_MASK: Final = 0x7FF
MAX_FRAME: Final = 65536 + 64  # bytes; a GSO super-packet can be up to 64 KiB


@dataclass(slots=True)
class Upcall:
    tag: int
    copy: bool
    frame: bytes


@dataclass(slots=True)
class UpcallStats:
    received: int = 0
    copies: int = 0
    untagged: int = 0  # frames on the TAP without our tag (should not happen)
    wakeups: int = 0
    batches: int = 0


def split_tag(frame: bytes) -> Upcall | None:
    """Remove the port tag the miss filter pushed; None if the frame carries none."""
    if len(frame) < 18 or frame[12] != 0x81 or frame[13] != 0x00:
        return None
    tci = (frame[14] << 8 | frame[15]) & 0xFFF
    return Upcall(tci & TAG_MASK, bool(tci & TAG_COPY), frame[:12] + frame[16:])


class FairQueue:
    """Upcalls waiting for the slow path: a bounded FIFO per port tag, taken round-robin.

    ``put_nowait`` never blocks (the reader must keep the TAP empty); a full port queue drops
    the new upcall and counts it under its tag. ``take`` returns up to ``n`` upcalls, one per
    port per round, so a flooding port gets the same share of the slow path as any other.
    """

    def __init__(self, per_port: int) -> None:
        self.per_port = per_port
        self._queues: dict[int, collections.deque[Upcall]] = {}
        self._ready: collections.deque[int] = collections.deque()  # tags with upcalls
        self._event = trio.Event()
        self.depth = 0
        self.drops: collections.Counter[int] = collections.Counter()  # by tag

    def put_nowait(self, up: Upcall) -> bool:
        q = self._queues.get(up.tag)
        if q is None:
            q = self._queues[up.tag] = collections.deque()
        if len(q) >= self.per_port:
            self.drops[up.tag] += 1
            return False
        if not q:
            self._ready.append(up.tag)
        q.append(up)
        self.depth += 1
        self._event.set()
        return True

    def take(self, n: int) -> list[Upcall]:
        """Up to ``n`` upcalls, round-robin across ports (empty if none wait)."""
        out: list[Upcall] = []
        ready = self._ready
        queues = self._queues
        while ready and len(out) < n:
            tag = ready.popleft()
            q = queues[tag]
            out.append(q.popleft())
            if q:
                ready.append(tag)
        self.depth -= len(out)
        return out

    async def wait(self) -> None:
        """Until at least one upcall waits."""
        while not self._ready:
            self._event = trio.Event()
            await self._event.wait()


class UpcallReader:
    """Reads the upcall TAP in trio into a `FairQueue` for the slow path."""

    def __init__(self, fd: int, out: FairQueue, batch: int) -> None:
        self._fd = fd
        self._out = out
        self._batch = batch
        self.stats = UpcallStats()

    def _drain(self) -> list[Upcall]:
        batch: list[Upcall] = []
        stats = self.stats
        for _ in range(self._batch):
            try:
                frame = os.read(self._fd, MAX_FRAME)
            except BlockingIOError:
                break
            up = split_tag(frame)
            if up is None:
                stats.untagged += 1
                continue
            stats.received += 1
            stats.copies += up.copy
            batch.append(up)
        return batch

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started(self)
        put = self._out.put_nowait
        while True:
            await trio.lowlevel.wait_readable(self._fd)
            self.stats.wakeups += 1
            while True:
                batch = self._drain()
                for up in batch:
                    put(up)
                if batch:
                    self.stats.batches += 1
                if len(batch) < self._batch:
                    break
                await trio.sleep(0)  # a full batch: let the slow path in before reading on


class Injector:
    """Sends frames out of a named device with AF_PACKET (re-injection after an upcall)."""

    def __init__(self) -> None:
        # protocol 0: a send-only socket. With ETH_P_ALL the kernel would copy every packet of
        # every device to it, putting the host CPU back in the per-packet path.
        self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW | socket.SOCK_NONBLOCK, 0)
        self.sent = 0
        self.failed = 0

    def send(self, frame: bytes, device: str) -> bool:
        try:
            self._sock.sendto(frame, (device, 0))
        except OSError:
            self.failed += 1  # device gone, queue full: the packet is lost, and counted
            return False
        self.sent += 1
        return True

    def close(self) -> None:
        self._sock.close()
