"""Policy what-if against a running applianced: real namespaces, real TCP connections.

``appliancectl policy diff`` must list exactly the live connections that a reload of the
candidate then breaks, and ``policy apply`` must refuse such a candidate unless forced.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from daemon_lab import POLICY, ROOT, Daemon, lab
from nstools import tcp_listener
from test_daemon import accept, connect, echo_round_trip

from appliance.ipcproto import Client

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(not os.path.exists(
        os.path.join(os.path.dirname(__file__), "..", "appliance", "datapath", "bpf",
                     "flowcache.bpf.o")), reason="BPF object not built (tools/build-bpf.sh)"),
]

T = 20.0  # seconds per appliancectl command
EXT = "192.0.2.10"
NO_SMTP = "      - {name: no-smtp,"


def deny_ports(ports: str) -> str:
    """The lab policy plus an outbound deny of these TCP destination ports."""
    return POLICY.replace(NO_SMTP, f"      - {{name: no-test, priority: 11, match: {{proto: tcp, "
                                   f"dst_port: {ports}}}, action: deny}}\n" + NO_SMTP)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with lab(tmp_path_factory.mktemp("whatif")) as the_lab:
        d = Daemon(the_lab, sweep=0.3).start()
        try:
            yield the_lab, d
        finally:
            d.stop()


def ctl(d: Daemon, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "appliance.cli.appliancectl", "--socket",
         str(d.config.parent / "appliance.sock"), *argv],
        capture_output=True, text=True, timeout=T, cwd=ROOT,
        env={**os.environ, "COLUMNS": "200"})


def call(d: Daemon, method: str, **params):
    with Client(d.config.parent / "appliance.sock", T) as c:
        return c.call(method, **params)


def restore(d: Daemon) -> None:
    d.policy_path.write_text(POLICY)
    assert ctl(d, "reload").returncode == 0


class Conn:
    """A TCP connection from a VM to the external host, with its 5-tuple as the switch
    keys it on the VM's port."""

    def __init__(self, the_lab, vm: int, port: int, listeners: dict) -> None:
        if port not in listeners:
            listeners[port] = tcp_listener(the_lab.ext, EXT, port)
        self.client = connect(the_lab.vms[vm], EXT, port)
        self.server, _ = accept(listeners[port])
        src, sport = self.client.getsockname()[:2]
        self.tuple = ("tcp", src, sport, EXT, port)
        echo_round_trip(self.client, self.server)

    def works(self) -> bool:
        self.client.settimeout(1.0)
        self.server.settimeout(1.0)
        try:
            echo_round_trip(self.client, self.server)
            return True
        except OSError:
            return False

    def close(self) -> None:
        for s in (self.client, self.server):
            s.close()


def tuples(changes: list[dict]) -> set[tuple]:
    return {(c["flow"]["proto"], c["flow"]["src"], c["flow"]["sport"], c["flow"]["dst"],
             c["flow"]["dport"]) for c in changes}


def forwarding(d: Daemon) -> set[tuple]:
    """Forward flows of live connections that forward (5-tuples), from the daemon."""
    rows = call(d, "flows", limit=10000)["flows"]
    return {(r["key"]["proto"], r["key"]["src"], r["key"]["sport"], r["key"]["dst"],
             r["key"]["dport"]) for r in rows if r["forward"] and r["output"] is not None}


def test_diff_lists_exactly_what_a_reload_breaks_and_apply_refuses_it(world, tmp_path):
    the_lab, d = world
    listeners: dict[int, socket.socket] = {}
    conns = {name: Conn(the_lab, vm, port, listeners)
             for name, vm, port in (("a", 1, 7400), ("b", 1, 7401), ("c", 2, 7402))}
    try:
        candidate = tmp_path / "candidate.yaml"
        candidate.write_text(deny_ports("[7400, 7402]"))
        p = ctl(d, "-j", "policy", "diff", str(candidate))
        assert p.returncode == 0, p.stderr
        diff = json.loads(p.stdout)
        listed = tuples([c for c in diff["changes"] if c["breaks"]])
        assert listed == {conns["a"].tuple, conns["c"].tuple}
        assert diff["breaking"] == 2 and diff["connections"] >= 3
        assert diff["rules"]["added"][0]["name"] == "no-test"
        human = ctl(d, "policy", "diff", str(candidate)).stdout
        assert "2 would break" in human and "+ acl out no-test" in human

        gen = call(d, "status")["policy"]["generation"]
        for flags in ((), ("--if-no-breaks",)):
            p = ctl(d, "policy", "apply", str(candidate), *flags)
            assert p.returncode == 1
            assert "refused: the policy would break 2 live connections" in p.stderr
            assert f"{conns['a'].tuple[2]} > {EXT}.7400" in p.stderr
        assert call(d, "status")["policy"]["generation"] == gen  # nothing applied
        assert all(c.works() for c in conns.values())

        before = forwarding(d)
        d.policy_path.write_text(candidate.read_text())
        assert ctl(d, "reload").returncode == 0
        broken = before - forwarding(d)
        assert broken == listed  # exactly the connections the diff listed
        assert not conns["a"].works() and not conns["c"].works()
        assert conns["b"].works()
    finally:
        for c in conns.values():
            c.close()
        for s in listeners.values():
            s.close()
        restore(d)


def test_apply_of_a_harmless_policy_goes_through_and_force_applies_a_breaking_one(world,
                                                                                 tmp_path):
    the_lab, d = world
    listeners: dict[int, socket.socket] = {}
    conn = Conn(the_lab, 1, 7410, listeners)
    try:
        harmless = tmp_path / "harmless.yaml"
        harmless.write_text(deny_ports("9999"))
        gen = call(d, "status")["policy"]["generation"]
        p = ctl(d, "policy", "apply", str(harmless))
        assert p.returncode == 0, p.stderr
        assert "applied: generation" in p.stdout and "0 broken" in p.stdout
        status = call(d, "status")["policy"]
        assert status["generation"] == gen + 1 and status["unsaved_changes"]
        assert conn.works()
        p = ctl(d, "policy", "apply", str(harmless), "--save")
        assert p.returncode == 0, p.stderr
        assert d.policy_path.read_text() == harmless.read_text()
        assert not call(d, "status")["policy"]["unsaved_changes"]

        breaking = tmp_path / "breaking.yaml"
        breaking.write_text(deny_ports("7410"))
        p = ctl(d, "-j", "policy", "apply", str(breaking), "--force")
        assert p.returncode == 0, p.stderr
        result = json.loads(p.stdout)
        assert tuples(result["what_if"]["changes"]) == {conn.tuple}
        assert result["what_if"]["breaking"] == 1 and result["revalidation"]["replaced"] >= 1
        assert not conn.works()
    finally:
        conn.close()
        for s in listeners.values():
            s.close()
        restore(d)


def test_bad_candidates_are_clear_errors_and_the_daemon_keeps_running(world, tmp_path):
    _, d = world
    bad = tmp_path / "bad.yaml"
    bad.write_text(POLICY.replace("priority: 10, match: {proto: tcp, dst_port: 25}",
                                  "priority: 10, match: {proto: tcp, dst_port: 70000}"))
    for verb in ("diff", "apply"):
        p = ctl(d, "policy", verb, str(bad))
        assert p.returncode == 1 and "invalid policy; nothing changed" in p.stderr
        assert "dst_port" in p.stderr and "Traceback" not in p.stderr
    p = ctl(d, "policy", "diff", str(tmp_path / "missing.yaml"))
    assert p.returncode == 2 and "cannot read" in p.stderr
    garbage = tmp_path / "garbage.yaml"
    garbage.write_bytes(b"\xff\xfe not yaml")
    assert ctl(d, "policy", "diff", str(garbage)).returncode == 2
    assert call(d, "status")["flows"]["active"] >= 0  # still answering
    assert Path(d.policy_path).read_text() == POLICY  # nothing saved
