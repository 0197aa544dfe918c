"""applianced's task tree: one trio nursery, subsystems started in dependency order.

    datapath (probe, upcall TAP, BPF maps)   -- on the netlink thread
      -> link watcher (netlink)  --links-->  port manager (attach/detach, flow cleanup)
      -> upcall reader (TAP)     --batches-> slow path (pipeline, offload, re-inject)
      -> ager (kernel counters -> last seen, idle expiry)
      -> signals (SIGHUP reload, SIGTERM/SIGINT stop)
      -> IPC server (operators; appliance.daemon.ipc) -> metrics (optional)

Channels are bounded; the upcall channel is the upcall budget (see appliance.daemon.upcall).
Everything that touches pyroute2's IPRoute runs on one dedicated thread (`NetlinkThread`):
IPRoute is bound to the thread that created it and blocks it.
"""

from __future__ import annotations

import collections
import gc
import queue
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Final, TypeVar

import structlog
import trio

from appliance import __version__
from appliance.actions import TokenBucket
from appliance.daemon.events import EventBus
from appliance.daemon.histogram import Histogram
from appliance.daemon.ipc import IpcServer
from appliance.daemon.logs import RateLimited
from appliance.daemon.metrics import MetricsServer
from appliance.daemon.netlink import Link, LinkEvent, LinkWatcher
from appliance.daemon.settings import Settings
from appliance.daemon.upcall import Injector, Upcall, UpcallReader
from appliance.model import Policy
from appliance.pipeline import Pipeline, RevalidationStats
from appliance.policy import ConfigError, parse_policy

log = structlog.get_logger(__name__)
T = TypeVar("T")

LINK_EVENTS: Final = 64  # link events buffered between watcher and port manager
MAX_TAG: Final = 0x7FF  # port tags fit in 11 bits (bit 0x800 marks copies)
REVALIDATE_CHUNK: Final = 5000  # connections revalidated between yields to other tasks
SYNC_CHUNK: Final = 1000  # flows folded between yields to other tasks (~1 ms of work)
SLOW_PATH_SLICE: Final = 32  # upcalls evaluated between yields to other tasks


def _read_policy(path: Path) -> str:
    try:
        return Path(path).read_text()
    except OSError as e:
        raise ConfigError([f"{path}: cannot read: {e.strerror}"]) from None
    except UnicodeDecodeError as e:
        raise ConfigError([f"{path}: not UTF-8 text (byte {e.start})"]) from None


class StartupError(Exception):
    """The daemon cannot start (reported without a traceback, exit status 1)."""


DATAPATH_HINT: Final = ("applianced needs root (CAP_NET_ADMIN, CAP_BPF), clsact/cls_bpf in the "
                        "kernel and the BPF object built by tools/build-bpf.sh")


class NetlinkThread:
    """One worker thread that owns pyroute2 objects; ``await call(fn, ...)`` runs fn there.

    A daemon thread (not a ThreadPoolExecutor, whose workers are joined at exit): a netlink
    call stuck in the kernel must not keep the process alive past the shutdown deadline.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name="netlink", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fut, fn, args, kwargs = job
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args, **kwargs))
            except BaseException as e:
                fut.set_exception(e)

    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> Future:
        fut: Future = Future()
        self._jobs.put((fut, fn, args, kwargs))
        return fut

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        fut = self.submit(fn, *args, **kwargs)
        return await trio.to_thread.run_sync(fut.result, abandon_on_cancel=True)

    def close(self) -> None:
        self._jobs.put(None)


class Daemon:
    """The live switch: owns the pipeline, the kernel datapath and the tasks around them."""

    def __init__(self, settings: Settings, policy: Policy, policy_text: str = "") -> None:
        self.settings = settings
        self.policy = policy
        self.started = time.time()
        self.reloads_ok = 0
        self.reloads_failed = 0
        self.netlink = NetlinkThread()
        self.datapath: Any = None
        self.pipeline: Pipeline | None = None
        self.injector = Injector()
        self.watcher: LinkWatcher | None = None
        self.reader: UpcallReader | None = None
        self.attached: dict[str, int] = {}  # switch name (port or uplink) -> ifindex
        self.tags: dict[str, int] = {}  # switch name -> port tag
        self.by_tag: dict[int, str] = {}
        self.devices: dict[str, str] = {}  # switch name -> netdev name
        self.events = EventBus()
        self._root: trio.CancelScope | None = None
        self.policy_lock = trio.Lock()  # reloads and operator edits: one at a time
        self.stopping = trio.Event()
        self.links_synced = trio.Event()
        self.ready = trio.Event()
        self.upcall_drops = 0
        self.upcall_fd = -1
        self.upcalls: collections.Counter[str] = collections.Counter()  # per port
        self.budget_drops: collections.Counter[str] = collections.Counter()
        self.budgets: dict[str, TokenBucket] = {}
        self._warn = RateLimited(10.0)
        self.ipc: IpcServer | None = None
        self.metrics: MetricsServer | None = None
        self.setup_latency = Histogram()  # upcall batch read -> decision made, slow path only
        self.upcall_channel: trio.MemorySendChannel[list[Upcall]] | None = None
        self.policy_text = policy_text  # the YAML the running policy was parsed from
        self.probe: dict[str, bool] = {}
        self.policy_source: Any = None  # e.g. policysource.EtcdPolicySource; None: the file

    # ------------------------------------------------------------------ names

    def _switch_names(self, policy: Policy) -> dict[str, str]:
        """netdev name -> switch name (port name, or the uplink's own name)."""
        names = {p.interface: p.name for p in policy.ports}
        names[policy.uplink] = policy.uplink
        return names

    def _tag_for(self, name: str) -> int:
        tag = self.tags.get(name)
        if tag is None:
            used = set(self.by_tag)
            tag = next(t for t in range(1, MAX_TAG + 1) if t not in used)
            self.tags[name] = tag
            self.by_tag[tag] = name
        return tag

    # --------------------------------------------------------------- datapath

    async def _open_datapath(self) -> None:
        from appliance.datapath import tc

        s = self.settings
        # shielded: a SIGTERM arriving now must not abandon a half-made datapath (maps pinned,
        # filters on the way) that the shutdown would then not know to remove
        with trio.CancelScope(shield=True):
            fd, ifindex = await self.netlink.call(tc.open_upcall_tap, s.upcall_device)
            self.upcall_fd = fd
            self.datapath = await self.netlink.call(
                tc.TcDatapath, capacity=s.nic_capacity, adopt=s.adopt, pin_dir=str(s.pin_dir),
                upcall_ifindex=ifindex, policy=s.nic_policy, per_port=s.nic_port_quota)
            self.probe = await self.netlink.call(self.datapath.probe)
        log.info("datapath_ready", backend="tc", upcall_device=s.upcall_device,
                 upcall_ifindex=ifindex, probe=self.probe,
                 offloads=sorted(str(k) for k in self.datapath.capabilities),
                 adopted=getattr(self.datapath, "adopted", False))

    async def _attach(self, name: str, link: Link) -> None:
        if self.attached.get(name) == link.ifindex:
            return
        tag = self._tag_for(name)
        try:
            await self.netlink.call(self.datapath.attach, name, link.ifindex, tag)
        except Exception as e:  # a device that vanished meanwhile: the next event fixes it
            log.warning("attach_failed", name=name, device=link.name, error=str(e))
            return
        self.attached[name] = link.ifindex
        self.devices[name] = link.name
        log.info("port_attached", name=name, device=link.name, ifindex=link.ifindex, tag=tag)
        self.events.publish("port", action="attached", name=name, device=link.name,
                            ifindex=link.ifindex)

    async def _detach(self, name: str, reason: str) -> None:
        if name not in self.attached:
            return
        del self.attached[name]
        try:
            await self.netlink.call(self.datapath.detach, name)
        except Exception as e:
            log.warning("detach_failed", name=name, error=str(e))
        removed = self.pipeline.remove_port(name) if self.pipeline else 0
        log.info("port_detached", name=name, reason=reason, connections_removed=removed)
        self.events.publish("port", action="detached", name=name, reason=reason,
                            connections_removed=removed)

    # ------------------------------------------------------------------ tasks

    async def port_manager(self, events: trio.MemoryReceiveChannel[LinkEvent], *,
                           task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Attach policy ports and the uplink as their netdevs appear; clean up on removal."""
        task_status.started()
        async with events:
            async for ev in events:
                if ev.link is None:
                    self.links_synced.set()  # a full dump has been applied
                    continue
                names = self._switch_names(self.policy)
                name = names.get(ev.link.name)
                if name is None:
                    continue
                if ev.kind == "removed":
                    await self._detach(name, "device_removed")
                elif ev.kind in ("added", "changed"):
                    if ev.kind == "changed":
                        log.info("link_state", name=name, device=ev.link.name, up=ev.link.up)
                    await self._attach(name, ev.link)

    async def slow_path(self, batches: trio.MemoryReceiveChannel[list[Upcall]], *,
                        task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Evaluate missed packets, install their flows, re-inject them."""
        task_status.started()
        pipeline = self.pipeline
        assert pipeline is not None
        async with batches:
            async for batch in batches:
                now = time.monotonic_ns()
                for i, up in enumerate(batch):
                    if i and i % SLOW_PATH_SLICE == 0:
                        await trio.sleep(0)  # operators and the ager get in between
                        now = time.monotonic_ns()
                    ingress = self.by_tag.get(up.tag)
                    if ingress is None:
                        self.upcall_drops += 1
                        continue
                    self.upcalls[ingress] += 1
                    if up.copy:
                        pipeline.observe(up.frame, ingress, now)
                        continue
                    if not pipeline.knows(up.frame, ingress) and not self._budget(
                            ingress).admit(1, now):
                        self.budget_drops[ingress] += 1
                        if self._warn.allow(f"budget:{ingress}"):
                            log.warning("upcall_budget_exceeded", port=ingress,
                                        rate=self.settings.upcall_rate,
                                        dropped=self.budget_drops[ingress])
                        continue
                    result = pipeline.process(up.frame, ingress, now)
                    if result.path == "slow":
                        self.setup_latency.observe((time.monotonic_ns() - now) / 1e9)
                    if result.frame is not None and result.out_port is not None:
                        device = self.devices.get(result.out_port)
                        if device is None or not self.injector.send(result.frame, device):
                            self.upcall_drops += 1
                await trio.sleep(0)  # let the IPC server and ager in between batches

    def _budget(self, ingress: str) -> TokenBucket:
        """Per-port slow-path budget: one port's flood of new flows cannot starve the others'
        (established traffic is in the kernel and never waits for the daemon anyway)."""
        bucket = self.budgets.get(ingress)
        if bucket is None:
            rate = self.settings.upcall_rate
            bucket = TokenBucket(f"upcall/{ingress}", rate, None, max(1, rate // 10), 0)
            self.budgets[ingress] = bucket
        return bucket

    async def ager(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Fold kernel per-flow counters into the flows, then expire idle connections."""
        task_status.started()
        interval = self.settings.sweep_interval
        while True:
            await trio.sleep(interval)
            await self.sync_counters_async()
            await self.revalidate_all()  # leftovers of a reload, if any
            expired = self.pipeline.age(time.monotonic_ns()) if self.pipeline else []
            if expired:
                log.debug("flows_expired", connections=len(expired))

    async def sync_counters_async(self) -> None:
        """Kernel hits never reach the daemon: fold the datapath's per-flow counters into the
        flows (ager sweeps, operator requests). The map is read on a worker thread (bpf(2)
        only), then decoded and folded `SYNC_CHUNK` entries at a time, yielding in between,
        so even a 100k-flow table never holds up a first packet for more than a ms or so."""
        if self.datapath is None:
            return
        kb, vb, n = await trio.to_thread.run_sync(self.datapath.counter_blobs)
        for start in range(0, n, SYNC_CHUNK):
            self._fold_counters(kb, vb, start, min(n, start + SYNC_CHUNK))
            await trio.sleep(0)

    def _fold_counters(self, kb: bytes, vb: bytes, start: int, stop: int) -> None:
        pipeline = self.pipeline
        if pipeline is None:
            return
        datapath = self.datapath
        lookup = pipeline.flows.get
        for raw, (packets, nbytes, last_ns) in datapath.decode_counters(kb, vb, start, stop):
            key = datapath.flow_key_of(raw)
            flow = lookup(key) if key is not None else None
            if flow is None or not flow.offloaded:
                continue
            if packets < flow.kernel_packets:  # a fresh entry (re-offloaded): counts from 0
                flow.kernel_packets = flow.kernel_bytes = 0
            new = packets - flow.kernel_packets
            if new > 0:
                flow.packets += new
                flow.bytes += nbytes - flow.kernel_bytes
                flow.kernel_packets, flow.kernel_bytes = packets, nbytes
                datapath.used(flow, new)
                if last_ns > flow.conn.last_seen_ns:
                    flow.conn.last_seen_ns = last_ns

    async def signals(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGHUP, signal.SIGTERM, signal.SIGINT) as sigs:
            task_status.started()
            async for signum in sigs:
                if signum == signal.SIGHUP:
                    async with self.policy_lock:
                        await self.reload()
                else:
                    log.info("stopping", signal=signal.Signals(signum).name)
                    self.stopping.set()
                    if not self.ready.is_set() and self._root is not None:
                        self._root.cancel()  # still starting: stop now, then clean up
                    return

    async def reload(self) -> bool:
        """Re-read the policy file; a bad file is logged and the running policy stays."""
        if self.policy_source is not None:
            return await self.policy_source.reload(self)
        path = self.settings.policy
        try:
            text = await trio.to_thread.run_sync(_read_policy, path)
            policy = await trio.to_thread.run_sync(parse_policy, text, str(path))
        except ConfigError as e:
            self.reloads_failed += 1
            log.error("reload_failed", policy=str(path), errors=e.errors)
            self.events.publish("reload", ok=False, errors=e.errors)
            return False
        await self.apply_policy(policy, reason="reload", text=text)
        return True

    async def apply_policy(self, policy: Policy, *, reason: str,
                           text: str | None = None) -> RevalidationStats:
        """Swap in a validated policy atomically, attach/detach ports, revalidate flows.

        ``text`` is the policy's YAML (kept for operators' edits and for saving).
        """
        old_names = self._switch_names(self.policy)
        self.policy = policy
        if text is not None:
            self.policy_text = text
        if self.pipeline is not None:
            self.pipeline.set_policy(policy)
        self.reloads_ok += 1
        new_names = self._switch_names(policy)
        for dev, name in old_names.items():
            if new_names.get(dev) != name:
                await self._detach(name, "removed_from_policy")
        if self.watcher is not None:
            for dev, name in new_names.items():
                link = self.watcher.links.get(dev)
                if link is not None:
                    await self._attach(name, link)
        stats = await self.revalidate_all()
        generation = self.pipeline.generation if self.pipeline else 0
        log.info("reloaded", reason=reason, policy=policy.source, digest=policy.digest[:12],
                 generation=generation, checked=stats.checked, unchanged=stats.unchanged,
                 updated=stats.updated, replaced=stats.replaced)
        self.events.publish("reload", ok=True, reason=reason, generation=generation,
                            digest=policy.digest, checked=stats.checked,
                            updated=stats.updated, replaced=stats.replaced)
        return stats

    async def revalidate_all(self) -> RevalidationStats:
        """Revalidate every stale connection now, yielding to other tasks between chunks."""
        total = RevalidationStats()
        if self.pipeline is None:
            return total
        while True:
            stats = self.pipeline.revalidate(time.monotonic_ns(), limit=REVALIDATE_CHUNK)
            for name in ("checked", "unchanged", "updated", "replaced"):
                setattr(total, name, getattr(total, name) + getattr(stats, name))
            if not stats.remaining:
                return total
            await trio.sleep(0)

    # -------------------------------------------------------------------- run

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        s = self.settings
        log.info("starting", version=__version__, policy=str(s.policy),
                 digest=self.policy.digest[:12])
        try:
            async with trio.open_nursery() as nursery:
                self._root = nursery.cancel_scope
                # first, so a SIGTERM during start-up (slow probe, adoption) still cleans up
                await nursery.start(self.signals)
                try:
                    await self._open_datapath()
                except Exception as e:  # no BPF object, no privileges, no TC, ...
                    log.error("datapath_failed", error=str(e), hint=DATAPATH_HINT)
                    raise StartupError(f"cannot start the kernel datapath: {e}") from None
                self.pipeline = Pipeline(self.policy, self.datapath,
                                         timeouts=s.idle_timeouts(), max_flows=s.max_flows)
                self.pipeline.observers.append(self._flow_event)
                link_send, link_recv = trio.open_memory_channel[LinkEvent](LINK_EVENTS)
                up_send, up_recv = trio.open_memory_channel[list[Upcall]](
                    max(1, s.upcall_queue // s.upcall_batch))
                self.upcall_channel = up_send
                await nursery.start(self.port_manager, link_recv)
                self.watcher = LinkWatcher(link_send)
                await nursery.start(self.watcher.run)
                await self.links_synced.wait()  # ports present at start are attached
                self._adopt()
                await nursery.start(self.slow_path, up_recv)
                self.reader = UpcallReader(self.upcall_fd, up_send, s.upcall_batch)
                await nursery.start(self.reader.run)
                await nursery.start(self.ager)
                self.ipc = IpcServer(self)
                await nursery.start(self.ipc.run)
                if self.policy_source is not None:
                    await nursery.start(self.policy_source.run, self)
                if s.metrics_address:
                    self.metrics = MetricsServer(self, s.metrics_address)
                    await nursery.start(self.metrics.run)
                gc.freeze()  # start-up objects never need scanning again
                self.ready.set()
                log.info("ready", attached=sorted(self.attached))
                task_status.started(self)
                await self.stopping.wait()
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await self._shutdown()

    def _flow_event(self, kind: str, subject: Any) -> None:
        """Pipeline observer: flow lifecycle events for operators (nothing per packet)."""
        if not self.events.subscribers:
            return
        flow = subject.forward if kind in ("created", "expired") else subject
        self.events.publish(f"flow_{kind}", ingress=flow.key[0], key=list(flow.key[1][:6]),
                            output=flow.actions.output, actions=flow.actions.describe())

    def _adopt(self) -> None:
        """Rebuild host connections from the kernel entries a headless run left behind.

        Each forward entry's key is evaluated against the current policy
        (`Pipeline.install_key`), which re-creates the pair and rewrites both entries; reply
        entries follow their forward one. Entries nobody re-created (a device gone from the
        policy, a reply whose forward vanished or changed) are deleted: no stale entries.
        """
        from appliance.datapath.tc import FV_REVERSE

        if not getattr(self.datapath, "adopted", False) or self.pipeline is None:
            return
        entries = self.datapath.installed_entries()
        self.datapath.forget_installed()
        by_index = {link.ifindex: link.name for link in self.watcher.links.values()}
        names = self._switch_names(self.policy)
        now = time.monotonic_ns()
        adopted = stale = 0

        def switch_name(ingress: str | int) -> str | None:
            if isinstance(ingress, str):  # attached already: the datapath knows its name
                return ingress
            device = by_index.get(ingress)
            return names.get(device) if device is not None else None

        entries.sort(key=lambda e: bool(e.flags & FV_REVERSE))  # forward entries first
        for e in entries:
            name = switch_name(e.ingress)
            if name is not None and not e.flags & FV_REVERSE:
                # keep the translated port the connection already uses (it may have been
                # moved off a collision), or its peer would see a new 5-tuple and reset it
                r = self.pipeline.install_key(name, e.packet_key, now,
                                              prefer_sport=e.new_sport or None)
                if r.flow is not None:
                    adopted += 1
                    continue
            if name is None or self.pipeline.flows.get((name, e.packet_key)) is None:
                self.datapath.remove_raw(e)
                stale += 1
        log.info("adopted_flows", entries=len(entries), flows=adopted, stale=stale)

    async def _shutdown(self) -> None:
        """Remove what we put in the kernel (unless headless), within the deadline."""
        headless = self.settings.headless
        closed = False
        try:
            if self.datapath is not None:
                with trio.move_on_after(self.settings.shutdown_deadline):
                    try:
                        await self.netlink.call(self.datapath.close, headless)
                        closed = True
                    except Exception as e:
                        log.error("datapath_close_failed", error=str(e))
                if not closed:
                    log.error("shutdown_deadline_exceeded",
                              deadline=self.settings.shutdown_deadline)
        finally:
            self.injector.close()
            self.netlink.close()
            log.info("stopped", headless=headless, clean=closed or self.datapath is None)
