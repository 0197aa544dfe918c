"""Real etcd for tests and benchmarks: Debian's etcd-server on loopback ports, data in a
temporary directory, every member always stopped (context manager).

    with etcd_cluster(tmp_path, size=3) as cluster:
        cluster.put("/appliance/policy", text)
        cluster.stop(0); cluster.start(0)
        cluster.url("/appliance/policy")   # etcd://127.0.0.1:P1,127.0.0.1:P2,.../KEY

Ports are picked at random in a high range and checked free, so sessions running side by side
do not collide; members use short heartbeat/election timeouts so a lost leader is replaced
within a second. ``netns=NAME`` runs the members inside a test namespace (the daemon lab's
hypervisor: applianced there reaches them on that namespace's loopback), and the helpers
below talk to them from inside it too.
"""

from __future__ import annotations

import base64
import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

ETCD = shutil.which("etcd") or "/usr/bin/etcd"
HOST = "127.0.0.1"
START_TIMEOUT = 15.0  # seconds for a member to serve

requires_etcd = pytest.mark.skipif(not os.path.exists(ETCD),
                                   reason="etcd not installed (tools/setup.sh installs it)")


def free_port(used: set[int]) -> int:
    rng = random.Random()
    while True:
        port = rng.randrange(20000, 40000)
        if port in used:
            continue
        with socket.socket() as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
        used.add(port)
        return port


@dataclass
class Member:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log_path: Path
    proc: subprocess.Popen | None = None

    @property
    def client_url(self) -> str:
        return f"http://{HOST}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{HOST}:{self.peer_port}"


@dataclass
class EtcdCluster:
    tmp: Path
    members: list[Member] = field(default_factory=list)
    netns: str | None = None

    def _inside(self, fn: Callable[[], Any]) -> Any:
        if self.netns is None:
            return fn()
        from nstools import in_netns

        return in_netns(self.netns, fn)

    def _http(self, url: str, body: dict, timeout: float) -> httpx.Response:
        return self._inside(lambda: httpx.post(url, json=body, timeout=timeout))

    @property
    def initial_cluster(self) -> str:
        return ",".join(f"{m.name}={m.peer_url}" for m in self.members)

    def url(self, key: str, members: list[int] | None = None) -> str:
        chosen = [self.members[i] for i in (members if members is not None
                                            else range(len(self.members)))]
        return "etcd://" + ",".join(f"{HOST}:{m.client_port}" for m in chosen) + key

    def start(self, i: int, wait: bool = True) -> None:
        m = self.members[i]
        if m.proc is not None and m.proc.poll() is None:
            return
        m.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(m.log_path, "a")  # noqa: SIM115 - the member owns it while it runs
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []  # execs: same pid
        m.proc = subprocess.Popen(
            [*prefix, ETCD, "--name", m.name, "--data-dir", str(m.data_dir),
             "--listen-client-urls", m.client_url, "--advertise-client-urls", m.client_url,
             "--listen-peer-urls", m.peer_url, "--initial-advertise-peer-urls", m.peer_url,
             "--initial-cluster", self.initial_cluster, "--initial-cluster-state", "new",
             "--initial-cluster-token", f"apl-{self.tmp.name}",
             "--heartbeat-interval", "50", "--election-timeout", "500",
             "--logger", "zap", "--log-level", "warn"],
            stdout=log, stderr=log, start_new_session=True)
        log.close()
        if wait:
            self.wait_serving(i)

    def wait_serving(self, i: int, timeout: float = START_TIMEOUT) -> None:
        """Until member i answers a linearizable read (it has a leader)."""
        m = self.members[i]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if m.proc is not None and m.proc.poll() is not None:
                raise AssertionError(f"etcd {m.name} exited:\n{m.log_path.read_text()[-2000:]}")
            try:
                r = self._http(m.client_url + "/v3/kv/range", {"key": _b64("/")}, 1.0)
                if r.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"etcd {m.name} not serving within {timeout}s:\n"
                             f"{m.log_path.read_text()[-2000:]}")

    def stop(self, i: int, sig: int = signal.SIGTERM) -> None:
        m = self.members[i]
        if m.proc is None or m.proc.poll() is not None:
            return
        m.proc.send_signal(sig)
        try:
            m.proc.wait(10)
        except subprocess.TimeoutExpired:
            m.proc.kill()
            m.proc.wait()

    def close(self) -> None:
        for i in range(len(self.members)):
            self.stop(i, signal.SIGKILL)

    def _post(self, path: str, body: dict, member: int | None = None) -> dict:
        order = [member] if member is not None else range(len(self.members))
        last: Exception | None = None
        for i in order:
            m = self.members[i]
            if m.proc is None or m.proc.poll() is not None:
                continue
            try:
                r = self._http(m.client_url + path, body, 5.0)
                r.raise_for_status()
                return r.json()
            except httpx.HTTPError as e:
                last = e
        raise AssertionError(f"no etcd member answered {path}: {last}")

    def put(self, key: str, value: str | bytes, member: int | None = None) -> int:
        """Write a key; the new revision."""
        answer = self._post("/v3/kv/put", {"key": _b64(key), "value": _b64(value)}, member)
        return int(answer["header"]["revision"])

    def delete(self, key: str) -> int:
        return int(self._post("/v3/kv/deleterange", {"key": _b64(key)})["header"]["revision"])

    def revision(self) -> int:
        return int(self._post("/v3/kv/range", {"key": _b64("/")})["header"]["revision"])

    def compact(self, revision: int | None = None) -> int:
        rev = revision if revision is not None else self.revision()
        self._post("/v3/kv/compaction", {"revision": str(rev), "physical": True})
        return rev

    def leader(self) -> int:
        """Index of the member that is leader now."""
        for i, m in enumerate(self.members):
            if m.proc is None or m.proc.poll() is not None:
                continue
            with contextlib.suppress(httpx.HTTPError):
                st = self._http(m.client_url + "/v3/maintenance/status", {}, 2.0).json()
                if st.get("leader") == st.get("header", {}).get("member_id"):
                    return i
        raise AssertionError("no leader")


def _b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


@contextlib.contextmanager
def etcd_cluster(tmp: Path, size: int = 1, netns: str | None = None) -> Iterator[EtcdCluster]:
    """``size`` members on loopback, started and serving; all stopped on the way out."""
    used: set[int] = set()
    cluster = EtcdCluster(tmp, netns=netns)
    for n in range(size):
        cluster.members.append(Member(f"m{n}", free_port(used), free_port(used),
                                      tmp / f"etcd-m{n}", tmp / f"etcd-m{n}.log"))
    try:
        for i in range(size):
            cluster.start(i, wait=False)
        for i in range(size):
            cluster.wait_serving(i)
        yield cluster
    finally:
        cluster.close()
