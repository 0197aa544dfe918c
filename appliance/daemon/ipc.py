"""Operator IPC server: msgpack frames over a Unix socket (protocol: appliance.ipcproto).

One task per client in the server's nursery; each request is read, checked (envelope, peer
rights, method, parameters) and answered in order. Nothing a client does can stop the daemon
or other clients:

* frames over `ipcproto.MAX_REQUEST` are refused from the header alone (never allocated) and
  the connection closed; a frame whose body does not arrive within `FRAME_TIMEOUT` closes it;
* undecodable msgpack or a bad envelope gets ``bad_request`` (the framing is intact, so the
  connection stays usable);
* every send has `SEND_TIMEOUT`: a client that stops reading is disconnected, it never
  blocks anything but its own task (event streams drop, counted, in the meantime);
* a method raising anything but `IpcError` is logged with its traceback and answered with a
  bare ``internal`` error.

Peers are identified with SO_PEERCRED: uid 0 and members of ``ipc_group`` may call every
method, members of ``ipc_read_group`` the read-only ones; anyone else gets
``permission_denied`` and is disconnected. The socket file is mode 0660, group
``ipc_group`` when set, so the file system already keeps strangers out; with an
``ipc_read_group`` it is 0666 (a file has one group) and the peer check alone decides.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import socket
import stat
import struct
from pathlib import Path
from typing import Any, Final

import structlog
import trio
from pydantic import ValidationError

from appliance.daemon.methods import METHODS, Ctx, Stream, event_wire
from appliance.ipcproto import (
    BAD_REQUEST,
    BUSY,
    HEADER,
    INTERNAL,
    INVALID_PARAMS,
    MAX_REQUEST,
    PERMISSION_DENIED,
    TOO_LARGE,
    UNKNOWN_METHOD,
    IpcError,
    pack,
    parse_request,
    unpack,
    validation_message,
    wire_safe,
)

log = structlog.get_logger(__name__)

SOCKET_MODE: Final = 0o660
SOCKET_MODE_SHARED: Final = 0o666  # when ipc_read_group is set (see run)
BACKLOG: Final = 64  # pending connections
MAX_CLIENTS: Final = 64  # connections served at once; more get "busy" and are closed
IDLE_TIMEOUT: Final = 3600.0  # seconds a connection may wait between requests
SNAPSHOT_IDLE: Final = 30.0  # seconds a flow-dump snapshot is kept between pages
FRAME_TIMEOUT: Final = 10.0  # seconds for the rest of a frame once its header arrived
SEND_TIMEOUT: Final = 5.0  # seconds one answer or event may take to be written
RECV_CHUNK: Final = 65536  # bytes per read
PEERCRED: Final = struct.Struct("3i")  # struct ucred: pid, uid, gid
RESERVED_FULL: Final = 8  # connection slots only full-access peers may use
SO_PEERGROUPS: Final = 59  # <asm-generic/socket.h>; not in the socket module
PEERGROUPS_BUF: Final = 1024  # bytes (CPython caps getsockopt buffers here): 256 groups


class _Closed(Exception):
    """The connection is over (EOF, timeout, protocol violation already answered)."""


class _Conn:
    """A client's byte stream with exact-size reads and bounded sends."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = bytearray()
        self.slow = False  # disconnected because it stopped reading

    async def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            try:
                chunk = await self.stream.receive_some(max(RECV_CHUNK, n - len(self.buf)))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise _Closed from None
            if not chunk:
                raise _Closed
            self.buf += chunk
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def send(self, obj: Any) -> None:
        try:
            data = pack(obj)
        except (OverflowError, TypeError):
            data = pack(wire_safe(obj))
        with trio.move_on_after(SEND_TIMEOUT) as scope:
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise _Closed from None
        if scope.cancelled_caught:
            log.warning("ipc_client_slow", bytes=len(data), timeout=SEND_TIMEOUT)
            self.slow = True
            raise _Closed


def _error(rid: int | None, code: str, message: str, details: Any = None) -> dict[str, Any]:
    return {"id": rid, "ok": False, "error": IpcError(code, message, details).as_dict()}


def _group_gid(name: str | None) -> int | None:
    if name is None:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        log.error("ipc_group_unknown", group=name)
        return None


def socket_peer_groups(sock: Any, gid: int) -> set[int] | None:
    """The peer's groups as they were when it connected (SO_PEERGROUPS, Linux 4.13+): exact,
    unlike /proc/PID/status read later (the peer may have exited, its pid been reused)."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, PEERGROUPS_BUF)
    except OSError:
        return None
    n = len(raw) // 4
    return {gid, *struct.unpack(f"={n}I", raw[: n * 4])}


def peer_groups(pid: int, uid: int, gid: int) -> set[int]:
    """Fallback without SO_PEERGROUPS: /proc/PID/status, else the user database."""
    groups = {gid}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    groups.update(int(g) for g in line.split()[1:])
                    return groups
    except OSError:
        pass
    with contextlib.suppress(KeyError):
        user = pwd.getpwuid(uid).pw_name
        groups.update(g.gr_gid for g in grp.getgrall() if user in g.gr_mem)
    return groups


class IpcServer:
    """The operator socket; ``run`` serves until cancelled and removes the socket file."""

    def __init__(self, daemon: Any) -> None:
        self.daemon = daemon
        self.clients = 0
        self.connections = 0
        self.requests = 0
        self.errors = 0
        self.refused = 0
        self.disconnected_slow = 0
        self.path = Path(daemon.settings.ipc_socket)
        self._full_gid = _group_gid(daemon.settings.ipc_group)
        self._read_gid = _group_gid(daemon.settings.ipc_read_group)

    def stats(self) -> dict[str, int]:
        return {"clients": self.clients, "connections": self.connections,
                "requests": self.requests, "errors": self.errors, "refused": self.refused,
                "disconnected_slow": self.disconnected_slow}

    def access(self, pid: int, uid: int, gid: int,
               groups: set[int] | None = None) -> str | None:
        """"full", "read" or None for a peer."""
        if uid == 0 or uid == os.geteuid():
            return "full"
        if groups is None:
            groups = peer_groups(pid, uid, gid)
        if self._full_gid is not None and self._full_gid in groups:
            return "full"
        if self._read_gid is not None and self._read_gid in groups:
            return "read"
        return None

    # ----------------------------------------------------------------- socket

    def _remove_stale(self) -> None:
        """Remove a socket file left by a dead daemon; refuse to steal a live one's."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise RuntimeError(f"{self.path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(str(self.path))
        except OSError:
            self.path.unlink(missing_ok=True)
            log.info("ipc_stale_socket_removed", path=str(self.path))
            return
        finally:
            probe.close()
        raise RuntimeError(f"{self.path}: another daemon is serving it")

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._remove_stale()
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        ino = None
        try:
            await sock.bind(str(self.path))
            ino = os.stat(self.path).st_ino
            # with a read-only group the file must let its members in too: the peer check
            # (SO_PEERCRED) is then the gate, as the file can name only one group
            os.chmod(self.path, SOCKET_MODE_SHARED if self._read_gid is not None
                     else SOCKET_MODE)
            if self._full_gid is not None:
                os.chown(self.path, -1, self._full_gid)
            sock.listen(BACKLOG)
            log.info("ipc_listening", path=str(self.path), group=self.daemon.settings.ipc_group,
                     read_group=self.daemon.settings.ipc_read_group)
            async with trio.open_nursery() as nursery:
                task_status.started(self)
                while True:
                    conn, _ = await sock.accept()
                    nursery.start_soon(self._serve_client, conn)
        finally:
            sock.close()
            with contextlib.suppress(OSError):
                if ino is not None and os.stat(self.path).st_ino == ino:
                    self.path.unlink()

    # ----------------------------------------------------------------- client

    async def _serve_client(self, sock: trio.socket.SocketType) -> None:
        stream = trio.SocketStream(sock)
        pid, uid, gid = PEERCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, PEERCRED.size))
        groups = socket_peer_groups(sock, gid)
        conn = _Conn(stream)
        self.connections += 1
        self.clients += 1
        try:
            with structlog.contextvars.bound_contextvars(peer_pid=pid, peer_uid=uid):
                await self._session(conn, pid, uid, gid, groups)
        except _Closed:
            pass
        finally:
            self.clients -= 1
            self.disconnected_slow += conn.slow
            with trio.move_on_after(1) as scope:
                scope.shield = True
                await stream.aclose()

    async def _session(self, conn: _Conn, pid: int, uid: int, gid: int,
                       groups: set[int] | None = None) -> None:
        access = self.access(pid, uid, gid, groups)
        # read-only peers cannot take the last slots: root and ipc_group always get in
        limit = MAX_CLIENTS if access == "full" else MAX_CLIENTS - RESERVED_FULL
        if self.clients > limit:
            await conn.send(_error(None, BUSY, f"more than {limit} clients connected"))
            return
        if access is None:
            self.refused += 1
            log.warning("ipc_refused", uid=uid, gid=gid)
            await conn.send(_error(None, PERMISSION_DENIED,
                                   f"uid {uid} is neither root nor in an IPC group of the "
                                   "daemon (settings ipc_group / ipc_read_group)"))
            return
        ctx = Ctx(self.daemon, self, access=access, peer=(pid, uid, gid))
        while True:
            # a paginated flow dump pins its snapshot (references to every flow) only while
            # the client keeps reading pages: idle longer and the snapshot is let go
            with trio.move_on_after(SNAPSHOT_IDLE if ctx.conn.snapshot is not None
                                    else IDLE_TIMEOUT) as idle:
                header = await conn.read_exact(HEADER.size)
            if idle.cancelled_caught:
                if ctx.conn.snapshot is not None:
                    ctx.conn.snapshot = None  # its cursors now answer "expired"
                    continue
                return
            (length,) = HEADER.unpack(header)
            if length > MAX_REQUEST:
                self.errors += 1
                log.warning("ipc_frame_too_large", length=length)
                await conn.send(_error(None, TOO_LARGE, f"request frame of {length} bytes; "
                                                        f"the limit is {MAX_REQUEST}"))
                return
            with trio.move_on_after(FRAME_TIMEOUT) as slow:
                body = await conn.read_exact(length)
            if slow.cancelled_caught:
                log.warning("ipc_frame_timeout", length=length)
                return
            reply = await self._handle(ctx, body)
            if isinstance(reply, Stream):
                await self._stream(conn, ctx, reply)
                return
            await conn.send(reply)

    async def _handle(self, ctx: Ctx, body: bytes) -> Any:
        """One request -> its response map (or a `Stream` whose first answer is inside)."""
        self.requests += 1
        rid: int | None = None
        try:
            try:
                obj = unpack(body)
            except ValueError as e:
                raise IpcError(BAD_REQUEST, str(e)) from None
            if isinstance(obj, dict) and isinstance(obj.get("id"), int):
                rid = obj["id"]
            req = parse_request(obj)
            m = METHODS.get(req.method)
            if m is None:
                raise IpcError(UNKNOWN_METHOD, f"no method {req.method!r} (see hello)")
            if not m.read_only and ctx.access != "full":
                raise IpcError(PERMISSION_DENIED, f"{req.method} needs full access; this peer "
                                                  "may only use read-only methods")
            try:
                params = m.params.model_validate(req.params)
            except ValidationError as e:
                raise IpcError(INVALID_PARAMS, validation_message(e)) from None
            result = await m.fn(ctx, params)
        except IpcError as e:
            self.errors += 1
            return {"id": rid, "ok": False, "error": e.as_dict()}
        except Exception as exc:
            self.errors += 1
            self.daemon.record_fault("ipc", exc)
            return _error(rid, INTERNAL, "internal error (logged by the daemon)")
        if isinstance(result, Stream):
            result.result = {"id": rid, "ok": True, "result": result.result}
            return result
        return {"id": rid, "ok": True, "result": result}

    async def _stream(self, conn: _Conn, ctx: Ctx, s: Stream) -> None:
        """Answer, then forward events until the client closes (or stops reading)."""
        sub = s.subscription
        rid = s.result["id"]
        try:
            await conn.send(s.result)
            async with trio.open_nursery() as nursery:

                async def until_eof() -> None:
                    with contextlib.suppress(_Closed):
                        while True:  # anything the client sends is ignored; EOF ends
                            await conn.read_exact(len(conn.buf) + 1)
                            conn.buf.clear()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(until_eof)
                try:
                    async for event in sub:
                        await conn.send({"id": rid, "event": event_wire(event)})
                except _Closed:
                    nursery.cancel_scope.cancel()
        finally:
            sub.close()
