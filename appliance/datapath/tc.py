"""The kernel TC datapath: a cls_bpf flow cache on clsact ingress of every switch device.

What runs where (see ``bpf/flowcache.bpf.c``):

* ``flowcache`` (prio `PRIO_FLOWCACHE`) parses each frame into the daemon's exact flow key
  (`appliance.packet.flow_key` plus the ingress ifindex), looks it up in the pinned ``flows``
  hash map and executes the compiled action: decap, NAT, MACs, VXLAN encap over IPv4, then
  ``bpf_redirect`` to the output device, or drop. TCP SYN/FIN/RST of offloaded flows are also
  copied up (tag | `TAG_COPY`) so the daemon can follow connection state (GFT copy-on-flags).
* ``upcall`` (prio `PRIO_UPCALL`, the lowest) takes every miss, pushes an 802.1Q tag carrying
  the ingress port's tag and redirects it to the upcall TAP. The daemon reads frames as
  ``[dst mac][src mac][0x8100][TCI = tag][original ethertype][original payload]``; a tag with
  bit 0x800 set is a copy of a forwarded TCP control packet (never re-inject it). A frame that
  arrived tagged keeps its own tag after ours (``0x8100 tag 0x8100 vid ...``).

The Python side encodes keys/values with `struct` (fast) against ctypes mirrors of the C
structs whose sizes are asserted here and checked against the loaded object's BTF sizes.

Threading: pyroute2's sync `IPRoute` is bound to the thread that creates it, so a
`TcDatapath` must be created and used from one thread (a dedicated worker, or trio's thread
for short calls).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import socket
import struct
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from appliance import packet as pk
from appliance.actions import CompiledActions, EncapSpec
from appliance.datapath import libbpf
from appliance.datapath.base import CacheStats, OffloadResult, unsupported_kinds
from appliance.datapath.cachebook import CacheBook
from appliance.flows import Flow
from appliance.model import IPV4_BASE, IPV6_MAPPED_BASE, ActionKind, is_ipv4

log = logging.getLogger(__name__)

T = TypeVar("T")

BPF_OBJECT: Final = str(Path(__file__).parent / "bpf" / "flowcache.bpf.o")
DEFAULT_CAPACITY: Final = 262144  # flows (BPF hash map max_entries)
PIN_ROOT: Final = libbpf.PIN_ROOT
PINNED_MAPS: Final = ("flows", "tags", "config", "stats", "ports")
PROG_FLOWCACHE: Final = "flowcache"
PROG_UPCALL: Final = "upcall"
PRIO_FLOWCACHE: Final = 1  # tc filter priority (lower runs first)
PRIO_UPCALL: Final = 0xFFFF  # the miss filter: runs only when flowcache returns UNSPEC
FILTER_HANDLE: Final = 1  # explicit, so replace-filter never adds a duplicate (pitfall 5)
TC_INGRESS: Final = 0xFFFFFFF2  # clsact ingress parent
ETH_P_ALL: Final = 0x0003
TAG_MIN: Final = 1
TAG_MAX: Final = 2047  # bit 0x800 of the 12-bit VID marks copies
TAG_COPY: Final = 0x800
TC_ACT_SHOT: Final = 2
TC_ACT_REDIRECT: Final = 7
TC_ACT_UNSPEC: Final = -1
CMD_TIMEOUT: Final = 5.0  # seconds, for `tc`/`ip` subprocesses of the probe
PROBE_IFINDEX: Final = 1  # BPF_PROG_TEST_RUN runs on the loopback device of the caller's netns

# --- map layout: mirrors bpf/flowcache.h ----------------------------------------------------
FV_DECAP: Final = 1 << 0
FV_SRC: Final = 1 << 1
FV_DST: Final = 1 << 2
FV_SPORT: Final = 1 << 3
FV_DPORT: Final = 1 << 4
FV_ICMP_ID: Final = 1 << 5
FV_SMAC: Final = 1 << 6
FV_DMAC: Final = 1 << 7
FV_ENCAP: Final = 1 << 8
FV_ENCAP6: Final = 1 << 9
FV_OSMAC: Final = 1 << 10
FV_ODMAC: Final = 1 << 11
FV_REVERSE: Final = 1 << 31  # userspace bookkeeping only: the program never reads it

ST_HIT, ST_MISS, ST_DROP, ST_UPCALL, ST_COPY, ST_ERROR, ST_NOTAG, ST_LIMITED, ST_SPOOFED = range(9)
STAT_NAMES: Final = ("hit", "miss", "drop", "upcall", "copy", "error", "notag",
                     "upcall_limited", "spoofed_mac")
PORT_CHECK_MAC: Final = 1  # struct port_cfg.flags
NS_PER_S: Final = 1_000_000_000
# struct port_cfg: mac, flags, upcall interval/tolerance (ns), miss tat/drops, copy tat/drops
PORT_CFG: Final = struct.Struct("=6sHQQQQQQ")
CFG_UPCALL_IFINDEX: Final = 0

_U8_16 = ctypes.c_uint8 * 16
_U8_6 = ctypes.c_uint8 * 6


class FlowKeyC(ctypes.Structure):
    """struct flow_key (documentation of the layout; `KEY` packs it)."""

    _fields_ = [("ifindex", ctypes.c_uint32), ("proto", ctypes.c_uint8),
                ("tunnel", ctypes.c_uint8), ("sport", ctypes.c_uint16),
                ("dport", ctypes.c_uint16), ("icmp", ctypes.c_uint16), ("vni", ctypes.c_uint32),
                ("src", _U8_16), ("dst", _U8_16), ("osrc", _U8_16), ("odst", _U8_16)]


class FlowValC(ctypes.Structure):
    """struct flow_val (documentation of the layout; `VAL` packs it)."""

    _fields_ = [("out_ifindex", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("packets", ctypes.c_uint64), ("bytes", ctypes.c_uint64),
                ("last_seen_ns", ctypes.c_uint64),
                ("new_src", _U8_16), ("new_dst", _U8_16), ("new_sport", ctypes.c_uint16),
                ("new_dport", ctypes.c_uint16), ("new_icmp_id", ctypes.c_uint16),
                ("smac", _U8_6), ("dmac", _U8_6), ("osmac", _U8_6), ("odmac", _U8_6),
                ("enc_sport", ctypes.c_uint16), ("enc_dport", ctypes.c_uint16),
                ("pad", ctypes.c_uint16), ("vni", ctypes.c_uint32), ("enc_src", _U8_16),
                ("enc_dst", _U8_16)]


KEY: Final = struct.Struct("=IBBHHHI16s16s16s16s")
VAL: Final = struct.Struct("=IIQQQ16s16sHHH6s6s6s6sHHHI16s16s")
COUNTERS_OFF: Final = 8  # bytes into a VAL
# packets, bytes, last_seen_ns of a whole VAL (VAL-sized, so iter_unpack strides by entries)
COUNTERS: Final = struct.Struct(f"={COUNTERS_OFF}xQQQ{VAL.size - COUNTERS_OFF - 24}x")
assert ctypes.sizeof(FlowKeyC) == KEY.size == 80
assert ctypes.sizeof(FlowValC) == VAL.size == 136
assert FlowValC.packets.offset == COUNTERS_OFF and COUNTERS.size == VAL.size

_ZERO16: Final = bytes(16)
_ZERO6: Final = bytes(6)


class Refused(Exception):
    """A flow this datapath cannot take; ``reason`` becomes `OffloadResult.reason`."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Entry:
    """A decoded map entry, for reconciliation after a restart (`installed_entries`)."""

    ingress: str | int  # port/uplink name if attached, else the ifindex
    packet_key: tuple
    output: str | int | None  # None = drop
    flags: int
    packets: int
    bytes: int
    last_seen_ns: int
    new_sport: int = 0  # translated source port (or ICMP id) the entry writes, 0: none


# ==============================================================================================
# Namespaces and the upcall TAP
# ==============================================================================================

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
    solicitations and DAD never appear among the upcalls (KERNEL.md pitfall 4).
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


# ==============================================================================================
# Key and value encoding
# ==============================================================================================


def _addr16(value: int) -> bytes:
    """An address as the program keys it: 16 bytes, IPv4 as IPv4-mapped IPv6.

    The kernel key has no family field; the program never keys an IPv6 packet whose
    addresses are IPv4-mapped or -compatible (it misses on them), so the two cannot alias.
    """
    if is_ipv4(value):
        return (IPV6_MAPPED_BASE | (value & 0xFFFF_FFFF)).to_bytes(16, "big")
    return value.to_bytes(16, "big")


def _addr_of(raw: bytes) -> int:
    """Inverse of `_addr16`."""
    value = int.from_bytes(raw, "big")
    if value >> 32 == IPV6_MAPPED_BASE >> 32:
        return IPV4_BASE | (value & 0xFFFF_FFFF)
    return value


KEY_ICMP_ECHO_REQUEST: Final = 1  # struct flow_key.icmp
KEY_ICMP_ECHO_REPLY: Final = 2


def _icmp_fields(sport: int, dport: int) -> tuple[int, int, int]:
    """Kernel (sport, dport, icmp kind) of an ICMP key; only echo is ever keyed there."""
    if dport == pk.ICMP_ECHO:
        return sport, 0, KEY_ICMP_ECHO_REQUEST
    if sport == pk.ICMP_ECHO:
        return 0, dport, KEY_ICMP_ECHO_REPLY
    raise Refused("unsupported:icmp_type")  # the program keys echo only


def encode_key(ifindex: int, packet_key: tuple) -> bytes:
    """The map key of ``(ingress ifindex, appliance.packet.flow_key)``; zero padding."""
    vlan, proto, src, sport, dst, dport, tun = packet_key
    if vlan is not None or (tun is not None and tun[3] is not None):
        raise Refused("unsupported:vlan")
    icmp = 0
    if proto in (pk.PROTO_ICMP, pk.PROTO_ICMPV6):
        sport, dport, icmp = _icmp_fields(sport, dport)
    elif proto not in (pk.PROTO_TCP, pk.PROTO_UDP):
        raise Refused("unsupported:proto")
    if tun is None:
        return KEY.pack(ifindex, proto, 0, sport, dport, icmp, 0, _addr16(src), _addr16(dst),
                        _ZERO16, _ZERO16)
    osrc, odst, vni, _inner_vlan = tun
    return KEY.pack(ifindex, proto, 1, sport, dport, icmp, vni, _addr16(src), _addr16(dst),
                    _addr16(osrc), _addr16(odst))


def decode_key(raw: bytes) -> tuple[int, tuple]:
    """``(ifindex, packet_key)`` of a map key (inverse of `encode_key`)."""
    ifindex, proto, tunnel, sport, dport, icmp, vni, src, dst, osrc, odst = KEY.unpack(raw)
    tun = None
    if tunnel:
        tun = (_addr_of(osrc), _addr_of(odst), vni, None)
    if icmp == KEY_ICMP_ECHO_REQUEST:
        dport = pk.ICMP_ECHO
    elif icmp == KEY_ICMP_ECHO_REPLY:
        sport = pk.ICMP_ECHO
    key = (None, proto, _addr_of(src), sport, _addr_of(dst), dport, tun)
    return ifindex, key


def _mac(value: int | None) -> bytes:
    return _ZERO6 if value is None else value.to_bytes(6, "big")


def _nat_flags(a: CompiledActions, packet_key: tuple) -> int:
    """Flags of the L3/L4 rewrites; refuses what the program cannot do (NAT46, nested)."""
    _vlan, proto, src, _sport, _dst, _dport, tun = packet_key
    v4 = is_ipv4(src)
    flags = 0
    for value, flag in ((a.src, FV_SRC), (a.dst, FV_DST)):
        if value is not None:
            if is_ipv4(value) != v4:
                raise Refused("unsupported:nat_family")
            flags |= flag
    if proto in (pk.PROTO_TCP, pk.PROTO_UDP):
        flags |= (FV_SPORT if a.sport is not None else 0) | (FV_DPORT if a.dport is not None else 0)
    elif a.icmp_id is not None:
        flags |= FV_ICMP_ID
    if flags and tun is not None and not a.decap:
        raise Refused("unsupported:tunnel_rewrite")
    return flags


def _mac_fields(a: CompiledActions) -> tuple[int, bytes, bytes, bytes, bytes]:
    """Frame and outer MACs, resolved the way `Pipeline._execute` applies them."""
    if a.encap is None:
        smac = a.outer_src_mac if a.outer_src_mac is not None else a.src_mac
        dmac = a.outer_dst_mac if a.outer_dst_mac is not None else a.dst_mac
        flags = (FV_SMAC if smac is not None else 0) | (FV_DMAC if dmac is not None else 0)
        return flags, _mac(smac), _mac(dmac), _ZERO6, _ZERO6
    e = a.encap
    osmac = a.outer_src_mac if a.outer_src_mac is not None else e.src_mac
    odmac = a.outer_dst_mac if a.outer_dst_mac is not None else e.dst_mac
    flags = ((FV_SMAC if a.src_mac is not None else 0) | (FV_DMAC if a.dst_mac is not None else 0)
             | (FV_OSMAC if osmac is not None else 0) | (FV_ODMAC if odmac is not None else 0))
    return flags, _mac(a.src_mac), _mac(a.dst_mac), _mac(osmac), _mac(odmac)


def _encap_fields(e: EncapSpec | None, packet_key: tuple) -> tuple[int, bytes, bytes]:
    if e is None:
        return 0, _ZERO16, _ZERO16
    if packet_key[6] is not None:
        raise Refused("unsupported:encap_nested")
    if not (is_ipv4(e.local) and is_ipv4(e.remote)):
        raise Refused("unsupported:encap_ipv6")
    return FV_ENCAP, _addr16(e.local), _addr16(e.remote)


def encode_value(out_ifindex: int, a: CompiledActions, packet_key: tuple,
                 counters: tuple[int, int, int] = (0, 0, 0), *, reverse: bool = False) -> bytes:
    """The map value executing ``a`` on packets of ``packet_key``; ``counters`` carried over.

    ``reverse`` marks the reply half of a connection (`FV_REVERSE`, ignored by the program):
    a restarted daemon rebuilds connections from their forward entries only.
    """
    flags = FV_DECAP if a.decap and packet_key[6] is not None else 0
    if reverse:
        flags |= FV_REVERSE
    flags |= _nat_flags(a, packet_key)
    mflags, smac, dmac, osmac, odmac = _mac_fields(a)
    eflag, esrc, edst = _encap_fields(a.encap, packet_key)
    e = a.encap
    return VAL.pack(
        out_ifindex, flags | mflags | eflag, *counters,
        _addr16(a.src) if a.src is not None else _ZERO16,
        _addr16(a.dst) if a.dst is not None else _ZERO16,
        a.sport or 0, a.dport or 0, a.icmp_id or 0, smac, dmac, osmac, odmac,
        e.src_port if e else 0, e.dst_port if e else 0, 0, e.vni if e else 0, esrc, edst)


# ==============================================================================================
# The datapath
# ==============================================================================================


def _pin_dir(netns: str | None) -> str:
    return os.path.join(PIN_ROOT, netns or "host")


class TcDatapath:
    """cls_bpf flow cache; implements `appliance.datapath.base.Datapath`.

    ``adopt``: reuse the pinned maps a previous (headless-closed) run left, entries included;
    otherwise whatever a previous run left (entries, pins, its filters on the devices it had
    attached) is removed first. ``capacity`` is the flows map's max_entries.
    """

    name = "tc"

    def __init__(self, *, capacity: int = DEFAULT_CAPACITY, netns: str | None = None,
                 pin_dir: str | None = None, adopt: bool = False,
                 obj_path: str = BPF_OBJECT, upcall_ifindex: int = 0,
                 policy: str = "tinylfu", per_port: int | None = None) -> None:
        self.netns = netns
        self.capacity = capacity
        self.book = CacheBook(capacity, per_port=per_port, policy=policy)
        self.pin_dir = pin_dir or _pin_dir(netns)
        self._ipr = IPRoute(netns=netns) if netns else IPRoute()
        self._ports: dict[str, int] = {}  # attached name -> ifindex
        self._names: dict[int, str] = {}
        self._installed: dict[tuple, bytes] = {}  # flow.key -> map key
        self._by_raw: dict[bytes, tuple] = {}  # map key -> flow.key
        self._stats = CacheStats(capacity=capacity)
        self._host_misses = 0
        self._closed = False
        if not adopt:
            self._clear_previous()
        self._obj = libbpf.BpfObject(obj_path, max_entries={"flows": capacity},
                                     pin_dir=self.pin_dir, reuse_pins=adopt,
                                     pinned_maps=PINNED_MAPS)
        try:
            self.flows = self._obj.map("flows")
            self.tags = self._obj.map("tags")
            self.port_cfg = self._obj.map("ports")
            if self.port_cfg.value_size != PORT_CFG.size:
                raise RuntimeError(f"port map layout mismatch: {self.port_cfg.value_size} bytes")
            self.config = self._obj.map("config")
            self.stats_map = self._obj.map("stats", percpu=True)
            if (self.flows.key_size, self.flows.value_size) != (KEY.size, VAL.size):
                raise RuntimeError(f"flow map layout mismatch: object has "
                                   f"{self.flows.key_size}/{self.flows.value_size} bytes")
            self.adopted = "flows" in self._obj.reused
            if upcall_ifindex:
                self.set_upcall(upcall_ifindex)
            self.capabilities: frozenset[ActionKind] = self._probe_program()[0]
        except BaseException:
            if "flows" not in self._obj.reused:
                self._obj.unpin(PINNED_MAPS)  # ours and half-made: leave nothing behind
            self._obj.close()
            self._ipr.close()
            raise

    # ------------------------------------------------------------ lifecycle

    def _clear_previous(self) -> None:
        """Remove a previous run's filters (devices from its pinned tag map), entries, pins."""
        tags_pin = os.path.join(self.pin_dir, "tags")
        if os.path.exists(tags_pin):
            with contextlib.suppress(OSError):
                fd = libbpf.check(libbpf.lib().bpf_obj_get(tags_pin.encode()), "open old tags")
                old = libbpf.Map(fd, 4, 4, 0, "old-tags")
                for raw, _ in list(old.items()):
                    self._del_filters(struct.unpack("=I", raw)[0])
                os.close(fd)
        flows_pin = os.path.join(self.pin_dir, "flows")
        if os.path.exists(flows_pin):
            with contextlib.suppress(OSError):
                fd = libbpf.check(libbpf.lib().bpf_obj_get(flows_pin.encode()), "open old flows")
                libbpf.Map(fd, KEY.size, VAL.size, 0, "old-flows").clear()
                os.close(fd)
        for name in PINNED_MAPS:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.pin_dir, name))

    def set_upcall(self, ifindex: int) -> None:
        """Point the miss filter (and TCP control copies) at the upcall device ``ifindex``."""
        self.config.update(struct.pack("=I", CFG_UPCALL_IFINDEX), struct.pack("=I", ifindex))

    def close(self, headless: bool = False) -> None:
        """Stop. ``headless``: leave filters and pinned maps so traffic keeps flowing and a
        later ``TcDatapath(adopt=True)`` takes over; otherwise remove everything we made."""
        if self._closed:
            return
        self._closed = True
        try:
            if not headless:
                for name in list(self._ports):
                    self.detach(name)
                # devices an adopted run attached but this one never re-attached
                for raw, _ in list(self.tags.items()):
                    self._del_filters(struct.unpack("=I", raw)[0])
                self.flows.clear()
                self._obj.unpin(PINNED_MAPS)
        finally:
            self._obj.close()
            self._ipr.close()

    def __enter__(self) -> TcDatapath:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ devices

    def attach(self, name: str, ifindex: int, tag: int, *, mac: int | None = None,
               upcall_pps: int = 0, upcall_burst: int = 0) -> None:
        """Put clsact + flowcache + the miss filter on ingress of ``ifindex`` (port ``name``).

        ``mac``: port security in the kernel (only frames from this source MAC can hit).
        ``upcall_pps``/``upcall_burst``: the port's upcall budget, enforced by the program
        (misses and TCP control copies over it are dropped in the kernel; 0: no budget).
        replace-filter with explicit handles: attaching twice (or after a restart) replaces
        the old programs instead of adding a second copy (KERNEL.md pitfall 5).
        """
        if not TAG_MIN <= tag <= TAG_MAX:
            raise ValueError(f"tag {tag} outside {TAG_MIN}..{TAG_MAX}")
        with contextlib.suppress(NetlinkError):  # EEXIST: clsact already there
            self._ipr.tc("add", "clsact", ifindex)
        self.configure_port(ifindex, mac=mac, upcall_pps=upcall_pps, upcall_burst=upcall_burst)
        self.tags.update(struct.pack("=I", ifindex), struct.pack("=I", tag))
        for prio, prog in ((PRIO_UPCALL, PROG_UPCALL), (PRIO_FLOWCACHE, PROG_FLOWCACHE)):
            self._ipr.tc("replace-filter", "bpf", ifindex, FILTER_HANDLE, parent=TC_INGRESS,
                         prio=prio, protocol=ETH_P_ALL, fd=self._obj.prog_fd(prog),
                         name=f"appliance-{prog}", direct_action=True)
        old = self._ports.pop(name, None)
        if old is not None:
            self._names.pop(old, None)
        self._ports[name] = ifindex
        self._names[ifindex] = name

    def configure_port(self, ifindex: int, *, mac: int | None = None, upcall_pps: int = 0,
                       upcall_burst: int = 0) -> None:
        """Write a port's kernel settings (see `attach`); the upcall drop count is kept."""
        interval = NS_PER_S // upcall_pps if upcall_pps > 0 else 0
        tolerance = interval * max(1, upcall_burst)
        k = struct.pack("=I", ifindex)
        old = self.port_cfg.lookup(k)
        drops, copy_drops = (PORT_CFG.unpack(old)[5::2] if old is not None else (0, 0))
        self.port_cfg.update(k, PORT_CFG.pack(
            (mac or 0).to_bytes(6, "big"), PORT_CHECK_MAC if mac is not None else 0,
            interval, tolerance, 0, drops, 0, copy_drops))

    def port_upcall_drops(self) -> dict[str, tuple[int, int]]:
        """(misses, copies) each attached port lost to its kernel budgets, by name."""
        out = {}
        for name, ifindex in self._ports.items():
            raw = self.port_cfg.lookup(struct.pack("=I", ifindex))
            if raw is not None:
                f = PORT_CFG.unpack(raw)
                out[name] = (f[5], f[7])
        return out

    def adopted_tags(self) -> dict[int, int]:
        """ifindex -> port tag of the devices a previous run attached (pinned tag map)."""
        return {struct.unpack("=I", k)[0]: struct.unpack("=I", v)[0]
                for k, v in self.tags.items()}

    def _del_filters(self, ifindex: int) -> None:
        for prio in (PRIO_FLOWCACHE, PRIO_UPCALL):
            with contextlib.suppress(NetlinkError):  # gone already (device deleted, ...)
                self._ipr.tc("del-filter", "bpf", ifindex, FILTER_HANDLE, parent=TC_INGRESS,
                             prio=prio, protocol=ETH_P_ALL)

    def detach(self, name: str) -> None:
        """Remove our two filters from port ``name`` (clsact stays: others may use it)."""
        ifindex = self._ports.pop(name, None)
        if ifindex is None:
            return
        self._names.pop(ifindex, None)
        self._del_filters(ifindex)
        self.tags.delete(struct.pack("=I", ifindex))
        self.port_cfg.delete(struct.pack("=I", ifindex))

    def filters(self, ifindex: int) -> list[tuple[int, str]]:
        """(prio, kind) of every ingress filter on ``ifindex`` (tests, diagnostics)."""
        out = []
        for msg in self._ipr.get_filters(ifindex, parent=TC_INGRESS):
            kind = msg.get_attr("TCA_KIND")
            if kind and msg.get_attr("TCA_OPTIONS") is not None:
                out.append((msg["info"] >> 16, kind))
        return out

    # ------------------------------------------------------------ flows

    def _ifindex(self, name: str) -> int:
        ifindex = self._ports.get(name)
        if ifindex is None:
            raise Refused(f"not_attached:{name}")
        return ifindex

    def _encode(self, flow: Flow) -> tuple[bytes, bytes]:
        missing = unsupported_kinds(flow.actions, self.capabilities)
        if missing:
            raise Refused("unsupported:" + ",".join(sorted(missing)))
        ingress, packet_key = flow.key
        key = encode_key(self._ifindex(ingress), packet_key)
        out = 0 if flow.actions.output is None else self._ifindex(flow.actions.output)
        counters = (0, 0, 0)
        if key in self._by_raw:  # in-place change (e.g. drop -> forward): keep the counters
            old = self.flows.lookup(key)
            if old is not None:
                counters = COUNTERS.unpack(old)
        return key, encode_value(out, flow.actions, packet_key, counters,
                                 reverse=flow.conn is not None and not flow.is_forward)

    def offload(self, flow: Flow, now_ns: int) -> OffloadResult:
        """Install ``flow`` with one map update, or say why not (never raises for a flow).

        When the cache is full the book's policy decides: a colder resident is evicted (its
        entry deleted; the flow stays in the host table) or the newcomer is turned down.
        """
        try:
            key, value = self._encode(flow)
        except Refused as r:
            self._stats.refusals += 1
            return OffloadResult(False, r.reason)
        verdict = self.book.admit(flow)
        if not verdict.ok:
            self._stats.rejected += 1
            return OffloadResult(False, verdict.reason)
        for victim in verdict.victims:
            self.book.evict(victim)
            self._delete(victim)
        try:
            self.flows.update(key, value)
        except libbpf.BpfError as e:
            if e.errno in (errno.E2BIG, errno.ENOSPC, errno.ENOMEM):
                self._stats.refusals += 1
                self.book.policy.forget(flow.key)  # admitted on paper only: no ghost entry
                return OffloadResult(False, "full", verdict.victims)
            raise
        old = self._by_raw.get(key)
        if old is not None and old != flow.key:
            self._installed.pop(old, None)
        self._installed[flow.key] = key
        self._by_raw[key] = flow.key
        self.book.add(flow)
        flow.offloaded = True
        self._stats.offloads += 1
        self._stats.evictions += len(verdict.victims)
        return OffloadResult(True, None, verdict.victims)

    def _delete(self, flow: Flow) -> None:
        key = self._installed.pop(flow.key, None)
        flow.offloaded = False
        if key is not None:
            self._by_raw.pop(key, None)
            with contextlib.suppress(libbpf.BpfError):  # already gone (device removed, ...)
                self._fold_last(flow, key)
                self.flows.delete(key)
        flow.kernel_packets = flow.kernel_bytes = 0  # a new entry counts from zero again

    def _fold_last(self, flow: Flow, key: bytes) -> None:
        """What the kernel forwarded since the last sweep, read before the entry goes, so
        evicted and expired flows keep exact totals."""
        raw = self.flows.lookup(key)
        if raw is None:
            return
        packets, nbytes, _last = COUNTERS.unpack(raw)
        if packets > flow.kernel_packets:
            flow.packets += packets - flow.kernel_packets
            flow.bytes += nbytes - flow.kernel_bytes

    def used(self, flow: Flow, packets: int) -> None:
        """The kernel forwarded ``packets`` of ``flow`` since the last sweep (feeds the
        replacement policy: kernel hits are invisible otherwise)."""
        self.book.used(flow, packets)

    def remove(self, flow: Flow) -> None:
        """Forget ``flow``: delete its map entry (packets then miss and go up)."""
        self.book.drop(flow)
        if flow.key in self._installed:
            self._stats.removals += 1
        self._delete(flow)

    def update(self, flow: Flow) -> None:
        """New actions for an installed flow: one map update, in place (no forwarding gap);
        removed instead when the new actions cannot run here."""
        if flow.key not in self._installed:
            return
        result = self.offload(flow, 0)
        if not result.ok:
            self.remove(flow)
            if result.reason and result.reason.startswith("unsupported"):
                flow.nic_refused = result.reason

    def remove_raw(self, entry: Entry) -> None:
        """Delete an entry found by `installed_entries` that no flow owns (reconciliation)."""
        ifindex = entry.ingress if isinstance(entry.ingress, int) else self._ports.get(
            entry.ingress)
        if ifindex is None:
            return
        with contextlib.suppress(libbpf.BpfError):
            self.flows.delete(encode_key(ifindex, entry.packet_key))

    def hit(self, flow: Flow, length: int, now_ns: int) -> bool:
        """The kernel's hits never reach the daemon: whatever arrives here missed."""
        return False

    def miss(self) -> None:
        """Account a packet the daemon saw (an upcall)."""
        self._host_misses += 1

    def kernel_stats(self) -> dict[str, int]:
        """Program counters summed over CPUs: hit, miss, drop, upcall, copy, error, notag."""
        out = {}
        ncpu = self.stats_map.value_size // 8
        for i, name in enumerate(STAT_NAMES):
            raw = self.stats_map.lookup(struct.pack("=I", i)) or bytes(8 * ncpu)
            out[name] = sum(struct.unpack(f"={ncpu}Q", raw))
        return out

    def stats(self) -> CacheStats:
        """Cache statistics; hits/misses are the kernel's own counters."""
        k = self.kernel_stats()
        s = self._stats
        return CacheStats(entries=len(self._installed), capacity=self.capacity, hits=k["hit"],
                          misses=k["miss"], offloads=s.offloads, evictions=s.evictions,
                          refusals=s.refusals, rejected=s.rejected, removals=s.removals)

    def read_counters(self) -> dict[tuple | bytes, tuple[int, int, int]]:
        """``{flow.key (or raw map key if not ours): (packets, bytes, last_seen_ns)}``.

        One batched pass over the map (BPF_MAP_LOOKUP_BATCH); last_seen is CLOCK_MONOTONIC
        ns (bpf_ktime_get_ns), comparable with ``time.monotonic_ns()``.
        """
        kb, vb, n = self.counter_blobs()
        by_raw = self._by_raw
        return {by_raw.get(raw, raw): c for raw, c in self.decode_counters(kb, vb, 0, n)}

    def counter_blobs(self) -> tuple[bytes, bytes, int]:
        """The whole map as (keys, values, count) blobs: syscalls only, so a worker thread
        can do it without holding the GIL; decode with `decode_counters` in small slices."""
        return self.flows.items_raw()

    def decode_counters(self, kb: bytes, vb: bytes, start: int,
                        stop: int) -> Iterator[tuple[bytes, tuple[int, int, int]]]:
        """(raw key, (packets, bytes, last_seen_ns)) for entries ``start:stop`` of the blobs."""
        ks, vs = KEY.size, VAL.size
        unpack = COUNTERS.unpack_from
        for i in range(start, stop):
            yield kb[i * ks:(i + 1) * ks], unpack(vb, i * vs)

    def flow_key_of(self, raw: bytes) -> tuple | None:
        """The flow key an installed raw map key belongs to (None: not ours)."""
        return self._by_raw.get(raw)

    def installed_entries(self) -> list[Entry]:
        """Decode the whole map (ingress name when attached), e.g. to reconcile on adopt."""
        entries = []
        for raw, val in self.flows.items():
            ifindex, packet_key = decode_key(raw)
            fields = VAL.unpack(val)
            out, flags, packets, nbytes, last = fields[:5]
            new_sport = fields[7] if flags & FV_SPORT else fields[9] if flags & FV_ICMP_ID else 0
            entries.append(Entry(self._names.get(ifindex, ifindex), packet_key,
                                 None if out == 0 else self._names.get(out, out), flags,
                                 packets, nbytes, last, new_sport))
        return entries

    def forget_installed(self) -> None:
        """Drop the record of installed flows without touching the map (after adopt)."""
        self._installed.clear()
        self._by_raw.clear()
        self.book = CacheBook(self.capacity, per_port=self.book.per_port,
                              policy=self.book.policy.name)

    # ------------------------------------------------------------ probing

    def _probe_program(self) -> tuple[frozenset[ActionKind], dict[str, bool]]:
        """Run each action kind through BPF_PROG_TEST_RUN with a scratch entry (ifindex 1)."""
        results = _ProgramProbe(self).run()
        kinds = {ActionKind.ALLOW: results["forward"], ActionKind.DENY: results["drop"],
                 ActionKind.COUNT: results["count"], ActionKind.SNAT: results["snat"],
                 ActionKind.DNAT: results["dnat"], ActionKind.ENCAP: results["encap"],
                 ActionKind.DECAP: results["decap"], ActionKind.METER: False}
        return frozenset(k for k, ok in kinds.items() if ok), results

    def probe(self) -> dict[str, bool]:
        """What this kernel can do, tried rather than assumed: tc pieces and program actions.

        tc kinds are tried on a scratch veth pair with the `tc` command (pyroute2 has no
        flower/pedit/tunnel_key encoders); program actions with BPF_PROG_TEST_RUN. Refreshes
        `capabilities` and returns the whole table (log it for operators).
        """
        table = _probe_tc(self.netns, self._obj.prog_fd(PROG_FLOWCACHE), self._ipr)
        caps, prog = self._probe_program()
        self.capabilities = caps
        table.update({f"prog:{k}": v for k, v in prog.items()})
        log.info("tc datapath probe: %s", " ".join(f"{k}={'yes' if v else 'no'}"
                                                   for k, v in table.items()))
        return table


# ==============================================================================================
# Probes
# ==============================================================================================

_TC_PROBES: Final = {
    "u32": ["filter", "add", "dev", "{dev}", "ingress", "prio", "10", "protocol", "ip",
            "u32", "match", "u32", "0", "0"],
    "mirred": ["filter", "add", "dev", "{dev}", "ingress", "prio", "11", "protocol", "ip",
               "u32", "match", "u32", "0", "0", "action", "mirred", "egress", "redirect",
               "dev", "{peer}"],
    "flower": ["filter", "add", "dev", "{dev}", "ingress", "prio", "12", "protocol", "ip",
               "flower", "ip_proto", "udp"],
    "gact": ["filter", "add", "dev", "{dev}", "ingress", "prio", "13", "protocol", "ip",
             "u32", "match", "u32", "0", "0", "action", "drop"],
    "pedit": ["filter", "add", "dev", "{dev}", "ingress", "prio", "14", "protocol", "ip",
              "u32", "match", "u32", "0", "0", "action", "pedit", "ex", "munge", "ip", "ttl",
              "set", "1"],
    "tunnel_key": ["filter", "add", "dev", "{dev}", "ingress", "prio", "15", "protocol", "ip",
                   "u32", "match", "u32", "0", "0", "action", "tunnel_key", "set", "src_ip",
                   "192.0.2.1", "dst_ip", "192.0.2.2", "id", "1"],
    "police": ["filter", "add", "dev", "{dev}", "ingress", "prio", "16", "protocol", "ip",
               "u32", "match", "u32", "0", "0", "action", "police", "rate", "1mbit", "burst",
               "10k", "conform-exceed", "drop"],
}


def tc_command(netns: str | None, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``tc ARGS`` (in ``netns``); never raises for a failing command."""
    cmd = ["tc", *args] if netns is None else ["ip", "netns", "exec", netns, "tc", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=CMD_TIMEOUT, check=False)


def _probe_tc(netns: str | None, prog_fd: int, ipr: IPRoute) -> dict[str, bool]:
    """Try clsact, cls_bpf and each tc classifier/action on a scratch veth pair."""
    suffix = uuid.uuid4().hex[:6]
    dev, peer = f"aplpr{suffix}a", f"aplpr{suffix}b"
    table: dict[str, bool] = {}
    ipr.link("add", ifname=dev, kind="veth", peer=peer)
    try:
        ifindex = ipr.link_lookup(ifname=dev)[0]
        try:
            ipr.tc("add", "clsact", ifindex)
            table["clsact"] = True
        except NetlinkError:
            table["clsact"] = False
        try:
            ipr.tc("add-filter", "bpf", ifindex, FILTER_HANDLE, parent=TC_INGRESS, prio=1,
                   protocol=ETH_P_ALL, fd=prog_fd, name="probe", direct_action=True)
            table["cls_bpf"] = True
        except NetlinkError:
            table["cls_bpf"] = False
        for kind, args in _TC_PROBES.items():
            argv = [a.format(dev=dev, peer=peer) for a in args]
            table[kind] = tc_command(netns, *argv).returncode == 0
    finally:
        ipr.link("del", ifname=dev)
    return table


class _ProgramProbe:
    """Crafted packets through the loaded flowcache program with scratch entries."""

    MAC_A: Final = 0x02_00_00_00_00_0A
    MAC_B: Final = 0x02_00_00_00_00_0B
    A: Final = IPV4_BASE | 0xC0000201  # 192.0.2.1
    B: Final = IPV4_BASE | 0xC0000202
    C: Final = IPV4_BASE | 0xC6336401  # 198.51.100.1
    VNI: Final = 4242

    def __init__(self, dp: TcDatapath) -> None:
        self.dp = dp
        self.fd = dp._obj.prog_fd(PROG_FLOWCACHE)

    def _frame(self, proto: int = pk.PROTO_UDP) -> bytes:
        return pk.build_frame(src_mac=self.MAC_A, dst_mac=self.MAC_B, src=self.A, dst=self.B,
                              proto=proto, sport=1000, dport=2000, payload=b"probe" * 4)

    def _run(self, frame: bytes, actions: CompiledActions) -> tuple[int, bytes, bytes]:
        """(retval, output frame, value after) with a scratch entry for ``frame``'s key."""
        h = pk.parse(frame)
        assert not isinstance(h, str)
        pkey = pk.flow_key(h)
        assert pkey is not None
        key = encode_key(PROBE_IFINDEX, pkey)
        self.dp.flows.update(key, encode_value(PROBE_IFINDEX if actions.output else 0,
                                               actions, pkey))
        try:
            rv, out = libbpf.test_run(self.fd, frame)
            after = self.dp.flows.lookup(key) or b""
        finally:
            self.dp.flows.delete(key)
        return rv, out, after

    @staticmethod
    def _checks(out: bytes) -> bool:
        return all(pk.verify_checksums(out).values())

    def run(self) -> dict[str, bool]:
        res = {}
        for name in ("forward", "drop", "count", "snat", "dnat", "encap", "decap"):
            try:
                res[name] = bool(getattr(self, name)())
            except (libbpf.BpfError, Refused, ValueError) as e:
                log.warning("probe %s failed: %s", name, e)
                res[name] = False
        return res

    def forward(self) -> bool:
        frame = self._frame()
        rv, out, _ = self._run(frame, CompiledActions("x"))
        return rv == TC_ACT_REDIRECT and out == frame

    def drop(self) -> bool:
        rv, _, _ = self._run(self._frame(), CompiledActions(None, "probe"))
        return rv == TC_ACT_SHOT

    def count(self) -> bool:
        frame = self._frame()
        _, _, after = self._run(frame, CompiledActions("x"))
        packets, nbytes, last = COUNTERS.unpack(after)
        return packets == 1 and nbytes == len(frame) and last > 0

    def _nat(self, proto: int, **changes: int) -> bool:
        frame = self._frame(proto)
        rv, out, _ = self._run(frame, CompiledActions("x", **changes))
        h = pk.parse(out)
        if rv != TC_ACT_REDIRECT or isinstance(h, str) or not self._checks(out):
            return False
        return all(getattr(h, k) == v for k, v in changes.items())

    def snat(self) -> bool:
        return (self._nat(pk.PROTO_TCP, src=self.C, sport=40000)
                and self._nat(pk.PROTO_UDP, src=self.C, sport=40000))

    def dnat(self) -> bool:
        return (self._nat(pk.PROTO_TCP, dst=self.C, dport=8080)
                and self._nat(pk.PROTO_UDP, dst=self.C, dport=8080))

    def encap(self) -> bool:
        frame = self._frame()
        spec = EncapSpec(self.VNI, self.A, self.C, 50000, pk.VXLAN_PORT, None, self.MAC_A)
        rv, out, _ = self._run(frame, CompiledActions("x", encap=spec))
        h = pk.parse(out)
        return (rv == TC_ACT_REDIRECT and not isinstance(h, str) and h.vni == self.VNI
                and h.src == self.A and h.dst == self.C and h.sport == 50000
                and h.dst_mac == self.MAC_A and self._checks(out)
                and out[h.inner_off:h.inner_end] == frame)

    def decap(self) -> bool:
        inner = self._frame()
        outer = pk.vxlan_encap(inner, vni=self.VNI, src_ip=self.C, dst_ip=self.A,
                               src_mac=self.MAC_B, dst_mac=self.MAC_A, src_port=50000)
        rv, out, _ = self._run(outer, CompiledActions("x", decap=True))
        return rv == TC_ACT_REDIRECT and out == inner


def monotonic_ns() -> int:
    """The clock of ``last_seen_ns`` (bpf_ktime_get_ns is CLOCK_MONOTONIC)."""
    return time.monotonic_ns()
