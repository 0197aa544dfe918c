"""applianced with its policy in etcd: real daemon in namespaces, real etcd in the hypervisor
namespace, real TCP connections. A put is applied live (a newly denied connection stops, an
unrelated one loses nothing), an invalid put is refused and reported, etcd outages and the
loss of the member in use leave forwarding alone, and a start with etcd down uses the copy
on disk (or waits, not ready, without one)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from daemon_lab import POLICY, ROOT, Daemon, lab
from etcd_lab import etcd_cluster, requires_etcd
from nstools import tcp_listener
from test_daemon import accept, connect, echo_round_trip

from appliance.ipcproto import Client

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    requires_etcd,
]

KEY = "/appliance/policy"
DENY_7400 = POLICY.replace(
    "      - {name: no-smtp,",
    "      - {name: no-7400, priority: 11, match: {proto: tcp, dst_port: 7400}, action: deny}\n"
    "      - {name: no-smtp,")
INVALID = POLICY.replace("action: deny}", "action: dney}", 1)


def etcd_daemon(the_lab, url: str, name: str = "d", cache: str | None = None) -> Daemon:
    """A lab daemon whose policy setting is ``url`` (the lab's file is left unused)."""
    d = Daemon(the_lab, name=name, sweep=0.3)
    cache = cache or str(the_lab.tmp / name / "etcd-policy.json")
    d.config.write_text(
        d.config.read_text().replace(f'policy = "{d.policy_path}"', f'policy = "{url}"')
        + f'[etcd]\ncache = "{cache}"\nhealth_interval = 0.5\nrequest_timeout = 1.0\n'
          "connect_timeout = 0.5\nbackoff_initial = 0.05\nbackoff_max = 0.5\n")
    return d


def status(d: Daemon) -> dict:
    with Client(d.config.parent / "appliance.sock") as c:
        return c.call("status")


def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


@contextmanager
def steady_connection(the_lab, port: int) -> Iterator[list[int]]:
    """A TCP connection vm1 -> ext echoing in a loop on a thread; any loss or stall fails the
    test at the end. Yields the round-trip counter."""
    lst = tcp_listener(the_lab.ext, "192.0.2.10", port)
    c = connect(the_lab.vms[1], "192.0.2.10", port)
    s, _ = accept(lst)
    rounds = [0]
    failures: list[BaseException] = []
    stop = threading.Event()

    def keep() -> None:
        try:
            while not stop.is_set():
                echo_round_trip(c, s)
                rounds[0] += 1
                time.sleep(0.01)
        except BaseException as e:
            failures.append(e)

    t = threading.Thread(target=keep)
    t.start()
    try:
        yield rounds
    finally:
        stop.set()
        t.join(10)
        for sock in (c, s, lst):
            sock.close()
    assert not failures, failures


def still_going(rounds: list[int], wait: float = 0.5) -> bool:
    before = rounds[0]
    time.sleep(wait)
    return rounds[0] > before


def test_puts_are_applied_live_invalid_ones_refused_and_outages_change_nothing(tmp_path):
    with lab(tmp_path) as the_lab, etcd_cluster(tmp_path, netns=the_lab.hv.name) as cluster:
        rev = cluster.put(KEY, POLICY)
        d = etcd_daemon(the_lab, cluster.url(KEY)).start()
        try:
            st = status(d)["policy"]
            assert st["source"]["kind"] == "etcd" and st["source"]["revision"] == rev
            assert st["source"]["connected"] is True or d.wait_event("etcd_watch_connected")
            lst_a = tcp_listener(the_lab.ext, "192.0.2.10", 7400)
            ca = connect(the_lab.vms[1], "192.0.2.10", 7400)
            sa, _ = accept(lst_a)
            with steady_connection(the_lab, 7401) as rounds:
                echo_round_trip(ca, sa)
                # a put denying 7400: that connection stops, 7401 loses nothing
                deny = cluster.put(KEY, DENY_7400)
                time.sleep(1.0)
                ca.settimeout(1.0)
                with pytest.raises(OSError):
                    echo_round_trip(ca, sa)
                e = d.wait_event("etcd_policy_applied", revision=deny)
                assert e["key"] == KEY
                assert d.wait_event("reloaded", reason="etcd")["replaced"] >= 1
                assert status(d)["policy"]["source"]["revision"] == deny

                # an invalid put: refused, reported, the running policy stays
                digest = status(d)["policy"]["digest"]
                bad = cluster.put(KEY, INVALID)
                e = d.wait_event("etcd_policy_rejected", revision=bad)
                assert e["errors"] == [
                    f"etcd {KEY}@{bad}: layers[0].outbound[0].action: 'dney' is not an action "
                    "(allow, deny, count, decap, or a mapping with one key: snat, dnat, encap, "
                    "meter)"]
                st = status(d)["policy"]
                assert st["digest"] == digest and st["source"]["revision"] == deny
                assert st["source"]["rejected"]["revision"] == bad
                out = subprocess.run(
                    [sys.executable, "-m", "appliance.cli.appliancectl", "--socket",
                     str(d.config.parent / "appliance.sock"), "status"],
                    capture_output=True, text=True, cwd=ROOT, check=True,
                    env={**os.environ, "COLUMNS": "300"}).stdout
                assert f"rejected revision {bad}" in out and "'dney' is not an action" in out
                assert still_going(rounds)

                # etcd stopped: forwarding goes on, the status says the watch is down
                cluster.stop(0)
                d.wait_event("etcd_watch_lost")
                assert status(d)["policy"]["source"]["connected"] is False
                assert still_going(rounds, 1.5)
                cluster.start(0)
                wait_until(lambda: status(d)["policy"]["source"]["connected"])
                # the next put is applied (the deny is lifted: 7400 connects again)
                again = cluster.put(KEY, POLICY)
                d.wait_event("etcd_policy_applied", revision=again)
                c2 = connect(the_lab.vms[1], "192.0.2.10", 7400)
                s2, _ = accept(lst_a)
                with c2, s2:
                    echo_round_trip(c2, s2)
                d.signal(signal.SIGHUP)  # re-reads the key (nothing new: nothing changes)
                assert d.wait_event("etcd_reread")["running_revision"] == again
                assert still_going(rounds)
            for sock in (ca, sa, lst_a):
                sock.close()
        finally:
            assert d.stop() == 0


def test_three_members_losing_the_one_the_daemon_talks_to(tmp_path):
    with lab(tmp_path) as the_lab, \
            etcd_cluster(tmp_path, size=3, netns=the_lab.hv.name) as cluster:
        leader = cluster.leader()
        order = [leader] + [i for i in range(3) if i != leader]
        cluster.put(KEY, POLICY)
        d = etcd_daemon(the_lab, cluster.url(KEY, order)).start()
        try:
            d.wait_event("etcd_watch_connected")
            assert status(d)["policy"]["source"]["endpoint"].endswith(
                f":{cluster.members[leader].client_port}")
            with steady_connection(the_lab, 7402) as rounds:
                cluster.stop(leader, signal.SIGKILL)
                d.wait_event("etcd_watch_lost")
                rest = [i for i in range(3) if i != leader]
                cluster.wait_serving(rest[0])
                wait_until(lambda: status(d)["policy"]["source"]["connected"])
                assert not status(d)["policy"]["source"]["endpoint"].endswith(
                    f":{cluster.members[leader].client_port}")
                rev = cluster.put(KEY, DENY_7400, member=rest[0])
                d.wait_event("etcd_policy_applied", revision=rev)
                assert still_going(rounds)
        finally:
            assert d.stop() == 0


def test_start_with_etcd_down_runs_on_the_disk_copy_or_waits_without_one(tmp_path):
    with lab(tmp_path) as the_lab, etcd_cluster(tmp_path, netns=the_lab.hv.name) as cluster:
        rev = cluster.put(KEY, DENY_7400)
        d = etcd_daemon(the_lab, cluster.url(KEY)).start()
        assert d.stop() == 0  # it left its copy on disk
        cluster.stop(0)
        d2 = etcd_daemon(the_lab, cluster.url(KEY))
        d2.start()
        try:
            e = d2.wait_event("policy_from_cache")
            assert e["revision"] == rev
            st = status(d2)["policy"]["source"]
            assert st["cached"] is True and st["connected"] is False and st["revision"] == rev
            # the cached policy is the one in force: 7400 denied, others forward
            lst = tcp_listener(the_lab.ext, "192.0.2.10", 7401)
            c = connect(the_lab.vms[1], "192.0.2.10", 7401)
            s, _ = accept(lst)
            with c, s, lst:
                echo_round_trip(c, s)
            with pytest.raises(OSError):
                connect(the_lab.vms[1], "192.0.2.10", 7400, timeout=1.0)
            cluster.start(0)
            wait_until(lambda: not status(d2)["policy"]["source"]["cached"])
            assert status(d2)["policy"]["source"]["connected"] is True
        finally:
            assert d2.stop() == 0

        # no copy (another cache path) and etcd down: no readiness, it says why, it waits
        cluster.stop(0)
        d3 = etcd_daemon(the_lab, cluster.url(KEY), name="nocopy",
                         cache=str(the_lab.tmp / "nocopy-cache.json"))
        with pytest.raises(AssertionError, match="no ready"):
            d3.start(timeout=3.0)
        try:
            assert d3.proc.poll() is None
            assert "etcd unreachable" in d3.wait_event("policy_waiting")["reason"]
            cluster.start(0)
            d3.wait_event("ready", timeout=15.0)
            d3.wait_event("etcd_watch_connected")
        finally:
            d3.stop()
