"""A small etcd v3 client over etcd's JSON gateway (``/v3/kv/*``, ``/v3/watch``), on trio.

Why the JSON gateway and httpx rather than grpc: the daemon is a trio program, and every
maintained Python etcd client is either asyncio-bound (aetcd, etcd3-py) or a synchronous
grpcio wrapper (python-etcd3, unmaintained since 2022) that would need a thread per watch and
its own reconnection logic. The gateway ships inside every etcd >= 3.3 on the client port,
speaks the same API (keys and values base64, int64s as strings) and streams a watch as one
JSON object per line; httpx runs on trio through anyio, so a watch is an ordinary trio task
that cancellation stops at once. What we use of the API is five calls: range, put, txn (for
tools that publish only if nothing changed), compaction (tests) and watch.

Errors: `EtcdUnavailable` when an endpoint cannot be reached or dropped the connection (the
caller backs off and tries the next endpoint), `Compacted` when a watch asked for a revision
etcd no longer has (read the key afresh), `EtcdError` for any other refusal.
"""

from __future__ import annotations

import base64
import json
import ssl
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import urlsplit

import httpx

DEFAULT_PORT: Final = 2379
CONNECT_TIMEOUT: Final = 2.0  # seconds to open a connection to one endpoint
REQUEST_TIMEOUT: Final = 5.0  # seconds for one unary request (range, put, ...)
URL_SCHEMES: Final = ("etcd", "etcds")  # etcds: TLS to every endpoint
REQUIRE_LEADER: Final = {"Grpc-Metadata-hasleader": "true"}  # watch ends if no leader


class EtcdError(Exception):
    """etcd answered, but refused or failed the request."""


class EtcdUnavailable(EtcdError):
    """No answer from the endpoint (refused, timed out, connection lost)."""


class Compacted(EtcdError):
    """A watch asked for history etcd has compacted; ``revision`` is the oldest it kept."""

    def __init__(self, revision: int) -> None:
        super().__init__(f"revision compacted (oldest kept: {revision})")
        self.revision = revision


@dataclass(frozen=True, slots=True)
class EtcdUrl:
    """``etcd://HOST:PORT[,HOST:PORT...]/KEY`` parsed: base URLs of the endpoints and a key."""

    endpoints: tuple[str, ...]
    key: str
    tls: bool = False

    def __str__(self) -> str:
        scheme = "etcds" if self.tls else "etcd"
        hosts = ",".join(e.split("://", 1)[1] for e in self.endpoints)
        return f"{scheme}://{hosts}{self.key}"


def is_etcd_url(text: str) -> bool:
    return any(str(text).startswith(f"{s}://") for s in URL_SCHEMES)


def parse_etcd_url(text: str) -> EtcdUrl:
    """Parse a policy source URL; ValueError with what is wrong, in words."""
    parts = urlsplit(text)
    if parts.scheme not in URL_SCHEMES:
        raise ValueError(f"{text!r}: expected etcd://HOST:PORT[,HOST:PORT...]/KEY")
    if parts.query or parts.fragment:
        raise ValueError(f"{text!r}: no query or fragment allowed (put them in the settings)")
    if "@" in parts.netloc:
        raise ValueError(f"{text!r}: credentials go in the settings (etcd.user), not the URL")
    key = parts.path
    if not key or key == "/":
        raise ValueError(f"{text!r}: no key (etcd://HOST:PORT/KEY)")
    tls = parts.scheme == "etcds"
    endpoints = []
    for host in parts.netloc.split(","):
        host = host.strip()
        if not host:
            raise ValueError(f"{text!r}: empty endpoint")
        name, sep, port = host.rpartition(":")
        if not sep or name.endswith(":"):  # no port given (IPv6 needs [..]:PORT)
            name, port = host, str(DEFAULT_PORT)
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{text!r}: {host!r} is not HOST:PORT")
        endpoints.append(f"{'https' if tls else 'http'}://{name}:{port}")
    return EtcdUrl(tuple(endpoints), key, tls)


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """Client TLS material: a CA bundle to verify etcd, and a client certificate and key."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    def context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca) if self.ca else None)
        if self.cert is not None:
            ctx.load_cert_chain(str(self.cert), str(self.key) if self.key else None)
        return ctx


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: str
    value: bytes
    mod_revision: int
    create_revision: int = 0
    version: int = 0


@dataclass(frozen=True, slots=True)
class RangeResult:
    """One key's value (None: no such key) and the store revision the read saw."""

    kv: KeyValue | None
    revision: int


@dataclass(frozen=True, slots=True)
class WatchEvent:
    kind: Literal["put", "delete"]
    kv: KeyValue

    @property
    def revision(self) -> int:
        return self.kv.mod_revision


@dataclass(frozen=True, slots=True)
class WatchBatch:
    """One watch response: the store revision and the events it carries (may be none:
    the ``created`` confirmation and progress notifications carry only a revision)."""

    revision: int
    events: list[WatchEvent] = field(default_factory=list)
    created: bool = False


def _b64(data: bytes | str) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode()


def _kv(raw: dict[str, Any]) -> KeyValue:
    return KeyValue(
        key=base64.b64decode(raw.get("key", "")).decode("utf-8", "replace"),
        value=base64.b64decode(raw.get("value", "")),
        mod_revision=int(raw.get("mod_revision", 0)),
        create_revision=int(raw.get("create_revision", 0)),
        version=int(raw.get("version", 0)),
    )


def _revision(msg: dict[str, Any]) -> int:
    return int(msg.get("header", {}).get("revision", 0))


def _error_text(body: Any) -> str:
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            return str(err.get("message") or err.get("error") or err)
        return str(err)
    return str(body)


class EtcdClient:
    """Requests to one etcd endpoint at a time; `rotate` moves to the next one.

    The caller decides when to rotate (the policy source does so after a failure, with
    backoff); `request` never retries by itself, so a failure is reported at once.
    """

    def __init__(self, endpoints: Sequence[str], *, tls: TlsFiles | None = None,
                 user: str | None = None, password: str | None = None,
                 connect_timeout: float = CONNECT_TIMEOUT,
                 request_timeout: float = REQUEST_TIMEOUT) -> None:
        if not endpoints:
            raise ValueError("no etcd endpoints")
        self.endpoints = tuple(endpoints)
        self.index = 0
        self.user = user
        self._password = password
        self._token: str | None = None
        self.request_timeout = request_timeout
        self._timeout = httpx.Timeout(request_timeout, connect=connect_timeout)
        verify: ssl.SSLContext | bool = tls.context() if tls is not None else True
        self._http = httpx.AsyncClient(verify=verify, timeout=self._timeout,
                                       limits=httpx.Limits(max_keepalive_connections=2))

    @property
    def endpoint(self) -> str:
        return self.endpoints[self.index]

    def rotate(self) -> str:
        """Use the next endpoint (a new connection; the auth token is per cluster, kept)."""
        self.index = (self.index + 1) % len(self.endpoints)
        return self.endpoint

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> EtcdClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ---------------------------------------------------------------- requests

    def _headers(self) -> dict[str, str]:
        return {"Authorization": self._token} if self._token else {}

    async def _authenticate(self) -> None:
        if self.user is None:
            return
        body = {"name": self.user, "password": self._password or ""}
        answer = await self._post("/v3/auth/authenticate", body, auth=False)
        token = answer.get("token")
        if not token:
            raise EtcdError("authentication answered without a token")
        self._token = token

    async def _post(self, path: str, body: dict[str, Any], *, auth: bool = True
                    ) -> dict[str, Any]:
        url = self.endpoint + path
        try:
            resp = await self._http.post(url, json=body,
                                         headers=self._headers() if auth else {})
        except httpx.TransportError as e:
            raise EtcdUnavailable(f"{self.endpoint}: {type(e).__name__}: {e}") from None
        try:
            answer = resp.json()
        except ValueError:
            answer = {"error": resp.text[:200]}
        if resp.status_code >= 500:  # no leader, timed out, shutting down: try elsewhere
            raise EtcdUnavailable(f"{self.endpoint}: HTTP {resp.status_code}: "
                                  f"{_error_text(answer)}")
        if resp.status_code != 200:
            raise EtcdError(f"{self.endpoint}: {_error_text(answer)}")
        return answer

    async def request(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST one request; with a user set, authenticate first and again when the token
        has expired (etcd's simple tokens last minutes)."""
        if self.user is not None and self._token is None:
            await self._authenticate()
        try:
            return await self._post(path, body)
        except EtcdUnavailable:
            raise
        except EtcdError as e:
            if self.user is None or "auth token" not in str(e):
                raise
        await self._authenticate()
        return await self._post(path, body)

    async def get(self, key: str, *, serializable: bool = False) -> RangeResult:
        """One key. Linearizable by default: a member cut off from its quorum cannot answer,
        which is how a health probe finds out that it should move on."""
        body: dict[str, Any] = {"key": _b64(key)}
        if serializable:
            body["serializable"] = True
        answer = await self.request("/v3/kv/range", body)
        kvs = answer.get("kvs") or []
        return RangeResult(_kv(kvs[0]) if kvs else None, _revision(answer))

    async def put(self, key: str, value: bytes | str) -> int:
        """Write a key; returns the new store revision."""
        answer = await self.request("/v3/kv/put", {"key": _b64(key), "value": _b64(value)})
        return _revision(answer)

    async def put_if(self, key: str, value: bytes | str, mod_revision: int) -> int | None:
        """Write a key only if its mod revision is still ``mod_revision`` (0: only if the key
        does not exist). The new revision, or None when someone else wrote it meanwhile."""
        compare = {"key": _b64(key), "target": "MOD", "result": "EQUAL",
                   "mod_revision": str(mod_revision)}
        body = {"compare": [compare],
                "success": [{"request_put": {"key": _b64(key), "value": _b64(value)}}]}
        answer = await self.request("/v3/kv/txn", body)
        return _revision(answer) if answer.get("succeeded") else None

    async def delete(self, key: str) -> int:
        answer = await self.request("/v3/kv/deleterange", {"key": _b64(key)})
        return _revision(answer)

    async def compact(self, revision: int) -> None:
        await self.request("/v3/kv/compaction", {"revision": str(revision), "physical": True})

    # ------------------------------------------------------------------- watch

    @asynccontextmanager
    async def watch(self, key: str, start_revision: int) -> AsyncIterator[
            AsyncIterator[WatchBatch]]:
        """Watch one key from ``start_revision`` on the current endpoint.

        ``async with client.watch(k, rev) as batches: async for batch in batches: ...``.
        The member is asked to end the watch if it loses its leader (gRPC metadata
        ``hasleader``, forwarded by the gateway), so a watch on a member cut off from the
        quorum fails instead of going silent. Raises `Compacted`, `EtcdUnavailable`.
        """
        if self.user is not None and self._token is None:
            await self._authenticate()
        body = {"create_request": {"key": _b64(key), "start_revision": str(start_revision),
                                   "progress_notify": True}}
        headers = {**REQUIRE_LEADER, **self._headers()}
        timeout = httpx.Timeout(None, connect=self._timeout.connect)
        try:
            async with self._http.stream("POST", self.endpoint + "/v3/watch", json=body,
                                         headers=headers, timeout=timeout) as resp:
                if resp.status_code != 200:
                    text = (await resp.aread()).decode("utf-8", "replace")[:200]
                    if "auth token" in text:
                        self._token = None  # the next attempt authenticates again
                    raise EtcdError(f"{self.endpoint}: watch refused: HTTP "
                                    f"{resp.status_code}: {text}")
                yield self._batches(resp)
        except httpx.TransportError as e:
            raise EtcdUnavailable(f"{self.endpoint}: watch: {type(e).__name__}: {e}") from None

    async def _batches(self, resp: httpx.Response) -> AsyncIterator[WatchBatch]:
        async for line in resp.aiter_lines():
            if not line.strip():
                continue
            try:
                msg = json.loads(line)
            except ValueError:
                raise EtcdUnavailable(f"{self.endpoint}: watch: not JSON: {line[:80]!r}") \
                    from None
            if "error" in msg:
                text = _error_text(msg)
                if "auth token" in text:
                    self._token = None
                raise EtcdUnavailable(f"{self.endpoint}: watch: {text}")
            result = msg.get("result", {})
            if int(result.get("compact_revision", 0) or 0):
                raise Compacted(int(result["compact_revision"]))
            if result.get("canceled"):
                reason = result.get("cancel_reason") or "canceled by the server"
                raise EtcdUnavailable(f"{self.endpoint}: watch: {reason}")
            events = [WatchEvent("delete" if ev.get("type") == "DELETE" else "put",
                                 _kv(ev.get("kv", {})))
                      for ev in result.get("events") or []]
            yield WatchBatch(_revision(result), events, bool(result.get("created")))
        raise EtcdUnavailable(f"{self.endpoint}: watch: connection closed")
