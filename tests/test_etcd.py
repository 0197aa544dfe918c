"""The etcd client and the daemon's etcd policy source against a real etcd (no datapath):
reads, watches, invalid revisions, outages, compaction, the disk copy, a 3-member cluster."""

from __future__ import annotations

import json
import random
import signal
from pathlib import Path

import pytest
import trio
from etcd_lab import etcd_cluster, requires_etcd

from appliance.daemon.events import EventBus
from appliance.daemon.policysource import (
    EtcdPolicySource,
    SourceOptions,
    backoff_delay,
    read_cache,
    write_cache,
)
from appliance.daemon.settings import load_settings
from appliance.etcd import Compacted, EtcdClient, EtcdUnavailable, parse_etcd_url
from appliance.policy import ConfigError, parse_policy

KEY = "/appliance/policy"
T = 20.0  # seconds: every test's bound


def policy_text(port: int = 25) -> str:
    return f"""version: 1
uplink: up0
ports:
  - {{name: vm1, interface: p1, mac: "02:00:00:00:00:01", ips: ["10.0.0.1"], layers: [acl]}}
layers:
  - name: acl
    outbound:
      - {{name: no-port, priority: 10, match: {{proto: tcp, dst_port: {port}}}, action: deny}}
"""


INVALID = policy_text().replace("action: deny", "action: dney")


class FakeDaemon:
    """What the source uses of `appliance.daemon.app.Daemon`: the lock, the event bus, the
    failure counter and `apply_policy` (recorded instead of swapped into a pipeline)."""

    def __init__(self) -> None:
        self.policy_lock = trio.Lock()
        self.events = EventBus()
        self.reloads_failed = 0
        self.applied: list[tuple[str, str]] = []  # (reason, digest)
        self.policy = None

    async def apply_policy(self, policy, *, reason: str, text: str | None = None):
        self.policy = policy
        self.applied.append((reason, policy.digest))


def options(tmp: Path, **kw) -> SourceOptions:
    base = dict(cache=tmp / "cache" / "etcd-policy.json", connect_timeout=0.5,
                request_timeout=1.0, health_interval=0.3, backoff_initial=0.05,
                backoff_max=0.3)
    return SourceOptions(**{**base, **kw})


def source_for(url: str, tmp: Path, **kw) -> EtcdPolicySource:
    return EtcdPolicySource(parse_etcd_url(url), options(tmp, **kw), rng=random.Random(1))


async def until(predicate, timeout: float = 10.0, step: float = 0.05) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(step)


def digest_of(text: str) -> str:
    return parse_policy(text).digest


# ----------------------------------------------------------------- no etcd needed

@pytest.mark.parametrize("text, endpoints, key", [
    ("etcd://127.0.0.1:2379/appliance/policy", ("http://127.0.0.1:2379",), "/appliance/policy"),
    ("etcd://a:1,b:2,c/k", ("http://a:1", "http://b:2", "http://c:2379"), "/k"),
    ("etcds://[::1]:2379/k", ("https://[::1]:2379",), "/k"),
])
def test_url_parsing(text, endpoints, key):
    url = parse_etcd_url(text)
    assert (url.endpoints, url.key) == (endpoints, key)


@pytest.mark.parametrize("text, error", [
    ("etcd://h:1", "no key"),
    ("etcd://h:99999/k", "'h:99999' is not HOST:PORT"),
    ("etcd://,h:1/k", "empty endpoint"),
    ("etcd://u:pw@h:1/k", "credentials go in the settings"),
    ("http://h:1/k", "expected etcd://"),
])
def test_bad_urls_say_what_is_wrong(text, error):
    with pytest.raises(ValueError, match=error):
        parse_etcd_url(text)


def test_settings_keep_etcd_urls_and_tls_switches_to_https(tmp_path):
    s = load_settings(None, policy="etcd://a:1,b:2/appliance/policy")
    assert s.policy == "etcd://a:1,b:2/appliance/policy"
    assert s.policy_url.endpoints == ("http://a:1", "http://b:2")
    toml = tmp_path / "s.toml"
    toml.write_text('policy = "etcd://a:1/k"\n[etcd]\nca = "/ca.pem"\n')
    assert load_settings(toml).policy_url.endpoints == ("https://a:1",)
    assert load_settings(None, policy="/etc/p.yaml").policy_url is None
    with pytest.raises(ConfigError, match=r"<defaults>: policy: 'etcd://h:1': no key"):
        load_settings(None, policy="etcd://h:1")
    toml.write_text('[etcd]\nbackoff_max = 0\n')
    with pytest.raises(ConfigError, match=r"etcd.backoff_max"):
        load_settings(toml)


def test_backoff_is_capped_and_jittered():
    rng = random.Random(5)
    delays = [backoff_delay(n, 0.2, 5.0, rng) for n in range(40) for _ in range(20)]
    assert all(0 <= d <= 5.0 for d in delays)
    assert max(delays) > 4.0 and min(delays) < 0.1  # full jitter: spread over the range
    assert all(backoff_delay(1, 0.2, 5.0, rng) <= 0.4 for _ in range(50))


def test_cache_round_trip_and_damage_is_detected(tmp_path):
    path = tmp_path / "d" / "cache.json"
    write_cache(path, KEY, 7, policy_text())
    assert path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["cache.json"]  # no temp left
    cached = read_cache(path, KEY)
    assert (cached.revision, cached.text, cached.policy.source) == (7, policy_text(),
                                                                    f"etcd {KEY}@7")
    with pytest.raises(ValueError, match="holds key"):
        read_cache(path, "/other")
    doc = json.loads(path.read_text())
    path.write_text(json.dumps({**doc, "text": policy_text(26)}))
    with pytest.raises(ValueError, match="digest mismatch"):
        read_cache(path, KEY)
    path.write_text(path.read_text()[:50])  # torn (what the rename protocol prevents)
    with pytest.raises(ValueError, match="unreadable"):
        read_cache(path, KEY)
    with pytest.raises(ValueError, match="no cached copy"):
        read_cache(tmp_path / "none.json", KEY)


# --------------------------------------------------------------------- real etcd



@requires_etcd
async def test_client_reads_writes_watches_and_reports_compaction(tmp_path):
    with etcd_cluster(tmp_path) as cluster, trio.fail_after(T):
        async with EtcdClient([cluster.members[0].client_url]) as client:
            rev = await client.put(KEY, "one")
            got = await client.get(KEY)
            assert (got.kv.value, got.kv.mod_revision, got.revision) == (b"one", rev, rev)
            assert (await client.get("/missing")).kv is None
            assert await client.put_if(KEY, "two", rev) == rev + 1
            assert await client.put_if(KEY, "three", rev) is None  # someone wrote meanwhile
            seen = []
            async with client.watch(KEY, rev) as batches:
                async for batch in batches:
                    seen += [(ev.kind, ev.kv.value) for ev in batch.events]
                    if len(seen) == 2:
                        break
            assert seen == [("put", b"one"), ("put", b"two")]
            cluster.compact()
            with pytest.raises(Compacted):
                async with client.watch(KEY, rev) as batches:
                    async for _ in batches:
                        pass
        async with EtcdClient(["http://127.0.0.1:1"], connect_timeout=0.5) as client:
            with pytest.raises(EtcdUnavailable):
                await client.get(KEY)


@requires_etcd
async def test_source_starts_from_etcd_and_applies_each_put(tmp_path):
    with etcd_cluster(tmp_path) as cluster, trio.fail_after(T):
        rev = cluster.put(KEY, policy_text())
        src = source_for(cluster.url(KEY), tmp_path)
        policy, text = await src.initial()
        assert (policy.source, text, src.applied_revision) == (f"etcd {KEY}@{rev}",
                                                               policy_text(), rev)
        assert read_cache(src.options.cache, KEY).revision == rev
        daemon = FakeDaemon()
        async with trio.open_nursery() as nursery:
            await nursery.start(src.run, daemon)
            await until(lambda: src.connected)
            rev2 = cluster.put(KEY, policy_text(26))
            await until(lambda: src.applied_revision == rev2)
            assert daemon.applied == [("etcd", digest_of(policy_text(26)))]
            st = src.status()
            assert (st["revision"], st["connected"], st["cached"], st["applied_total"]) == (
                rev2, True, False, 2)
            assert read_cache(src.options.cache, KEY).revision == rev2
            nursery.cancel_scope.cancel()
        # SIGHUP / IPC reload hold the policy lock and read the key now
        rev3 = cluster.put(KEY, policy_text(28))
        async with daemon.policy_lock:
            assert await src.reload(daemon) is True
        assert src.applied_revision == rev3 and len(daemon.applied) == 2
        cluster.put(KEY, INVALID)
        async with daemon.policy_lock:
            assert await src.reload(daemon) is False
        assert src.applied_revision == rev3


@requires_etcd
async def test_invalid_revision_is_refused_reported_and_the_policy_stays(tmp_path):
    with etcd_cluster(tmp_path) as cluster, trio.fail_after(T):
        cluster.put(KEY, policy_text())
        src = source_for(cluster.url(KEY), tmp_path)
        await src.initial()
        daemon = FakeDaemon()
        events = daemon.events.subscribe(frozenset({"policy"}))
        async with trio.open_nursery() as nursery:
            await nursery.start(src.run, daemon)
            await until(lambda: src.connected)
            bad = cluster.put(KEY, INVALID)
            await until(lambda: src.rejected is not None)
            expected = (f"etcd {KEY}@{bad}: layers[0].outbound[0].action: 'dney' is not an "
                        "action (allow, deny, count, decap, or a mapping with one key: snat, "
                        "dnat, encap, meter)")
            assert src.rejected["errors"] == [expected]
            assert daemon.applied == [] and daemon.reloads_failed == 1
            event = await events.__aiter__().__anext__()
            assert (event["ok"], event["revision"], event["errors"]) == (False, bad, [expected])
            # the cache still holds the last good revision
            assert read_cache(src.options.cache, KEY).text == policy_text()
            cluster.put(KEY, b"\xff\xfe not text")
            await until(lambda: src.rejected["errors"][0].endswith("not UTF-8 text (byte 0)"))
            good = cluster.put(KEY, policy_text(27))
            await until(lambda: src.applied_revision == good)
            assert src.counts["rejected_total"] == 2
            nursery.cancel_scope.cancel()


@requires_etcd
async def test_etcd_stopped_and_restarted_then_the_next_put_is_applied(tmp_path):
    with etcd_cluster(tmp_path) as cluster, trio.fail_after(T * 2):
        cluster.put(KEY, policy_text())
        src = source_for(cluster.url(KEY), tmp_path)
        await src.initial()
        daemon = FakeDaemon()
        async with trio.open_nursery() as nursery:
            await nursery.start(src.run, daemon)
            await until(lambda: src.connected)
            cluster.stop(0)
            await until(lambda: not src.connected)
            await trio.sleep(1.0)  # several failed attempts with backoff
            assert src.counts["reconnects"] >= 2 and src.last_error
            cluster.start(0)
            await until(lambda: src.connected, timeout=10)
            rev = cluster.put(KEY, policy_text(30))
            await until(lambda: src.applied_revision == rev)
            assert [d for _, d in daemon.applied] == [digest_of(policy_text(30))]
            nursery.cancel_scope.cancel()


@requires_etcd
async def test_resume_from_a_compacted_revision_reads_the_key_afresh(tmp_path):
    with etcd_cluster(tmp_path) as cluster, trio.fail_after(T):
        cluster.put(KEY, policy_text())
        src = source_for(cluster.url(KEY), tmp_path)
        await src.initial()
        daemon = FakeDaemon()
        async with trio.open_nursery() as nursery:  # a first run, then the daemon is away
            await nursery.start(src.run, daemon)
            await until(lambda: src.connected)
            nursery.cancel_scope.cancel()
        for port in (31, 32, 33):
            last = cluster.put(KEY, policy_text(port))
        cluster.put("/unrelated", "x")
        cluster.compact()  # the revisions after the one seen are gone from history
        async with trio.open_nursery() as nursery:
            await nursery.start(src.run, daemon)
            await until(lambda: src.applied_revision == last)
            assert src.counts["compactions"] == 1
            assert daemon.applied == [("etcd", digest_of(policy_text(33)))]  # only the newest
            rev = cluster.put(KEY, policy_text(34))  # and the watch goes on from there
            await until(lambda: src.applied_revision == rev)
            nursery.cancel_scope.cancel()


@requires_etcd
async def test_start_with_etcd_down_uses_the_disk_copy_then_catches_up(tmp_path):
    with etcd_cluster(tmp_path) as cluster, trio.fail_after(T * 2):
        rev = cluster.put(KEY, policy_text())
        first = source_for(cluster.url(KEY), tmp_path)
        await first.initial()  # leaves the copy on disk
        await first.client.aclose()
        cluster.stop(0)
        src = source_for(cluster.url(KEY), tmp_path)
        policy, text = await src.initial()
        assert (text, src.cached, src.applied_revision) == (policy_text(), True, rev)
        assert policy.source == f"etcd {KEY}@{rev}" and src.status()["cached"]
        daemon = FakeDaemon()
        async with trio.open_nursery() as nursery:
            await nursery.start(src.run, daemon)
            await trio.sleep(0.5)
            assert src.cached and not src.connected
            cluster.start(0)
            await until(lambda: src.connected and not src.cached, timeout=10)
            assert daemon.applied == []  # etcd holds what the copy holds: nothing to apply
            new = cluster.put(KEY, policy_text(40))
            await until(lambda: src.applied_revision == new)
            nursery.cancel_scope.cancel()


@requires_etcd
async def test_no_copy_and_etcd_down_waits_until_a_valid_policy_exists(tmp_path):
    with etcd_cluster(tmp_path) as cluster, trio.fail_after(T * 2):
        cluster.stop(0)
        src = source_for(cluster.url(KEY), tmp_path)
        async with trio.open_nursery() as nursery:
            got: list = []

            async def start() -> None:
                got.append(await src.initial())

            nursery.start_soon(start)
            await trio.sleep(1.0)
            assert not got and "ConnectError" in src.last_error
            cluster.start(0)
            await trio.sleep(0.5)
            assert not got  # reachable, but no key yet: still waiting
            cluster.put(KEY, INVALID)
            await until(lambda: src.rejected is not None)
            assert not got  # an invalid value is no policy either
            rev = cluster.put(KEY, policy_text())
            await until(lambda: bool(got))
            assert got[0][1] == policy_text() and src.applied_revision == rev


@requires_etcd
async def test_three_members_losing_the_one_in_use(tmp_path):
    with etcd_cluster(tmp_path, size=3) as cluster, trio.fail_after(T * 2):
        leader = cluster.leader()
        order = [leader] + [i for i in range(3) if i != leader]  # talk to the leader first
        cluster.put(KEY, policy_text())
        src = source_for(cluster.url(KEY, order), tmp_path)
        await src.initial()
        daemon = FakeDaemon()
        async with trio.open_nursery() as nursery:
            await nursery.start(src.run, daemon)
            await until(lambda: src.connected)
            in_use = src.client.endpoint
            assert in_use == cluster.members[leader].client_url
            cluster.stop(leader, signal.SIGKILL)
            rest = [i for i in range(3) if i != leader]
            cluster.wait_serving(rest[0])  # a new leader among the two left
            await until(lambda: src.connected and src.client.endpoint != in_use, timeout=10)
            rev = cluster.put(KEY, policy_text(50), member=rest[0])
            await until(lambda: src.applied_revision == rev)
            nursery.cancel_scope.cancel()


@requires_etcd
def test_policy_push_validates_then_publishes(tmp_path, capsys):
    from appliance.cli.appliancectl import main

    with etcd_cluster(tmp_path) as cluster:
        url = cluster.url(KEY)
        good = tmp_path / "good.yaml"
        good.write_text(policy_text(60))
        bad = tmp_path / "bad.yaml"
        bad.write_text(INVALID)
        assert main(["policy", "push", str(bad), "--to", url]) == 1
        err = capsys.readouterr().err
        assert "bad.yaml is invalid; nothing was published" in err
        assert f"{bad}: layers[0].outbound[0].action: 'dney' is not an action" in err
        assert cluster.revision() == 1  # nothing written
        assert main(["policy", "push", str(good), "--to", url]) == 0
        out = capsys.readouterr().out
        rev = cluster.revision()
        assert f"to {url} at revision {rev}" in out
        got = trio.run(_get, cluster.members[0].client_url)
        assert got.kv.value == good.read_bytes()
        # compare-and-swap: refused when someone published meanwhile
        assert main(["policy", "push", str(good), "--to", url, "--if-revision",
                     str(rev - 1)]) == 1
        assert "no longer at revision" in capsys.readouterr().err
        assert main(["policy", "push", str(good), "--to", url, "--if-revision", str(rev)]) == 0


async def _get(endpoint: str):
    async with EtcdClient([endpoint]) as client:
        return await client.get(KEY)


def test_metrics_and_status_text_show_the_source(tmp_path):
    from appliance.cli.appliancectl import source_lines
    from appliance.daemon.metrics import _Exposition, _source_families

    src = source_for("etcd://127.0.0.1:1/appliance/policy", tmp_path)
    src.applied_revision, src.applied_at, src.cached = 42, 1.0, True
    src.rejected = {"revision": 43, "errors": ["etcd /appliance/policy@43: x: bad"], "at": 2.0}
    e = _Exposition()
    _source_families(e, src)
    text = e.text()
    assert "appliance_policy_revision 42" in text
    assert "appliance_policy_cached 1" in text and "appliance_policy_watch_connected 0" in text
    assert 'appliance_policy_source_info{kind="etcd",url="etcd://127.0.0.1:1/appliance/policy"' \
        in text
    lines = source_lines(src.status())
    assert any("revision 42 applied" in line and "cached copy" in line for line in lines)
    assert "  watch: DOWN (connecting)" in lines
    assert lines[-1] == "    etcd /appliance/policy@43: x: bad"


@requires_etcd
async def test_start_tries_every_endpoint_before_the_disk_copy(tmp_path):
    with etcd_cluster(tmp_path) as cluster, trio.fail_after(T):
        rev = cluster.put(KEY, policy_text(70))
        write_cache(tmp_path / "cache" / "etcd-policy.json", KEY, 1, policy_text(71))
        live = f"127.0.0.1:{cluster.members[0].client_port}"
        src = source_for(f"etcd://127.0.0.1:1,{live}{KEY}", tmp_path)  # first one is dead
        _, text = await src.initial()
        assert (text, src.cached, src.applied_revision) == (policy_text(70), False, rev)


@requires_etcd
def test_applianced_check_reads_and_validates_the_key(tmp_path, capsys):
    from appliance.cli.applianced import main

    with etcd_cluster(tmp_path) as cluster:
        url = cluster.url(KEY)
        assert main(["--check", "--policy", url]) == 1
        assert f"{url}: no such key" in capsys.readouterr().err
        rev = cluster.put(KEY, policy_text())
        assert main(["--check", "--policy", url]) == 0
        assert f"etcd {KEY}@{rev}: ok (1 ports, 1 layers)" in capsys.readouterr().out
        bad = cluster.put(KEY, INVALID)
        assert main(["--check", "--policy", url]) == 1
        assert f"etcd {KEY}@{bad}: layers[0].outbound[0].action:" in capsys.readouterr().err
