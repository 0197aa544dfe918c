"""appliancectl against a real daemon: one-shot output, exit codes, the interactive shell."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
from daemon_lab import ROOT
from test_ipc import ipc_world

from appliance.cli import appliancectl as ctl

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(not os.path.exists(
        os.path.join(os.path.dirname(__file__), "..", "appliance", "datapath", "bpf",
                     "flowcache.bpf.o")), reason="BPF object not built (tools/build-bpf.sh)"),
]

T = 10.0  # seconds per command
PTY_T = 15.0  # seconds: a shell redraw under a loaded CI machine can be slow
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with ipc_world(tmp_path_factory.mktemp("ctl"), users=False) as w:
        yield w


def ctl_run(world, *argv: str, sock: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "appliance.cli.appliancectl", "--socket",
         str(sock or world.sock), *argv],
        capture_output=True, text=True, timeout=T, cwd=ROOT,
        env={**os.environ, "COLUMNS": "200"})


def test_status_human_and_json(world):
    p = ctl_run(world, "status")
    assert p.returncode == 0, p.stderr
    assert "protocol: 1" in p.stdout and "generation" in p.stdout
    p = ctl_run(world, "-j", "status")
    assert json.loads(p.stdout)["protocol"] == 1


def test_tables(world):
    p = ctl_run(world, "ports")
    assert p.returncode == 0 and "vm1" in p.stdout and "up0" in p.stdout
    p = ctl_run(world, "rules", "acl")
    assert "no-smtp" in p.stdout and "dst_port=25 proto=tcp" in p.stdout
    p = ctl_run(world, "layers")
    assert "acl" in p.stdout and "vnet" in p.stdout
    p = ctl_run(world, "-j", "flows", "--port", "vm1", "--limit", "5")
    assert p.returncode == 0 and "total" in json.loads(p.stdout)
    p = ctl_run(world, "nic")
    assert "capacity" in p.stdout


def test_flows_one_line_each_in_80_columns(world):
    """`appliancectl flows` shows each flow on one line (conntrack -L style), even in an
    80-column terminal; the forward line carries the key, the place and the actions."""
    import contextlib

    from nstools import udp_socket

    srv = udp_socket(world.lab.ext, "192.0.2.10", 5900)
    clis = [udp_socket(world.lab.vms[1], "10.0.0.1", 5910 + i) for i in range(3)]
    with srv, contextlib.ExitStack() as stack:
        for c in clis:
            stack.enter_context(c)
            c.sendto(b"hi", ("192.0.2.10", 5900))
            srv.recvfrom(10)
    p = subprocess.run(
        [sys.executable, "-m", "appliance.cli.appliancectl", "--socket", str(world.sock),
         "flows", "--l4-port", "5900"],
        capture_output=True, text=True, timeout=T, cwd=ROOT, env={**os.environ, "COLUMNS": "80"})
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[-1].startswith("6 of ")  # of all flows in the table
    flows = lines[:-1]
    assert len(flows) == 6  # forward + reverse of each connection, one line each
    assert all(" actions:" in line and "packets=" in line for line in flows)
    forward = [line for line in flows if line.startswith("vm1 ")]
    assert len(forward) == 3
    assert all("udp 10.0.0.1.591" in line and "> 192.0.2.10.5900" in line
               and "set(src=198.51.100.7)" in line for line in forward)
    p = ctl_run(world, "-j", "flows", "--l4-port", "5900")
    assert json.loads(p.stdout)["shown"] == 6


def test_trace_live_and_offline(world):
    argv = ["trace", "--port", "vm1", "--direction", "out", "--proto", "tcp", "--dst",
            "192.0.2.10", "--dport", "25"]
    p = ctl_run(world, *argv)
    assert p.returncode == 0, p.stderr
    assert "rule no-smtp" in p.stdout and "drop (deny)" in p.stdout
    p = ctl_run(world, *argv[:-1], "80", "--policy", str(world.daemon.policy_path))
    assert p.returncode == 0, p.stderr
    assert "set(src=198.51.100.7" in p.stdout and "reply flow" in p.stdout


def test_rule_edit_commands(world):
    p = ctl_run(world, "rule", "add", "acl", "out", "--name", "ctl-deny", "--priority", "7",
                "--match", "proto=udp,dst_port=7777|7778", "--action", "deny")
    assert p.returncode == 0, p.stderr
    assert "not saved" in p.stdout
    assert "dst_port=[7777,7778]" in ctl_run(world, "rules", "acl").stdout
    p = ctl_run(world, "rule", "add", "nat", "out", "--name", "s2", "--priority", "20",
                "--match", "dst=203.0.113.0/24", "--action", "snat:ip=198.51.100.9")
    assert p.returncode == 0, p.stderr
    assert ctl_run(world, "rule", "delete", "nat", "out", "s2").returncode == 0
    assert ctl_run(world, "rule", "delete", "acl", "out", "ctl-deny").returncode == 0


def test_exit_codes(world, tmp_path):
    p = ctl_run(world, "status", sock=tmp_path / "nothing.sock")
    assert p.returncode == 3 and "cannot connect" in p.stderr
    p = ctl_run(world, "frobnicate")
    assert p.returncode == 2
    p = ctl_run(world, "log-level", "loud")
    assert p.returncode == 2
    p = ctl_run(world, "rules", "nope")
    assert p.returncode == 1 and "invalid_params" in p.stderr
    p = ctl_run(world, "rule", "add", "acl", "out", "--name", "bad", "--priority", "3",
                "--match", "proto=icmp,dst_port=1", "--action", "deny")
    assert p.returncode == 1 and "needs proto tcp or udp" in p.stderr


def test_events_count(world):
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance.cli.appliancectl", "--socket", str(world.sock),
         "-j", "events", "--kind", "flush", "--count", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        deadline = time.monotonic() + T
        while time.monotonic() < deadline and proc.poll() is None:
            ctl_run(world, "flush", "--port", "vm2")
            try:
                out, err = proc.communicate(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                continue
        else:
            out, err = proc.communicate(timeout=1)
        assert proc.returncode == 0, err
        assert json.loads(out.splitlines()[0])["kind"] == "flush"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_completion_logic():
    names = ctl.Names(Path("/nonexistent"))
    names.ports, names.layers = ["vm1", "vm2", "up0"], ["acl", "nat"]
    names.rules = {("acl", "out"): ["no-smtp"]}
    assert ctl.complete_words([], "st", names) == ["status"]
    assert ctl.complete_words(["flows", "--port"], "v", names) == ["vm1", "vm2"]
    assert ctl.complete_words(["rule", "delete", "acl", "out"], "", names) == ["no-smtp"]
    assert "--path" in ctl.complete_words(["flows"], "--p", names)


class Screen:
    """A pty running appliancectl's shell; collects everything it prints."""

    def __init__(self, world, home: Path) -> None:
        env = {**os.environ, "HOME": str(home), "TERM": "xterm", "COLUMNS": "160",
               "LINES": "50", "PROMPT_TOOLKIT_NO_CPR": "1"}
        env.pop("XDG_STATE_HOME", None)
        self.pid, self.fd = pty.fork()
        if self.pid == 0:
            os.chdir(ROOT)
            os.execve(sys.executable, [sys.executable, "-m", "appliance.cli.appliancectl",
                                       "--socket", str(world.sock)], env)
        self.text = ""

    def plain(self, start: int = 0) -> str:
        """The screen text from ``start`` without terminal escape sequences (a redraw may
        split a word with cursor moves)."""
        return ANSI.sub("", self.text[start:])

    def read_until(self, needle: str, timeout: float = PTY_T, start: int = 0) -> str:
        deadline = time.monotonic() + timeout
        while needle not in self.plain(start):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{needle!r} not on screen:\n{self.text[-2000:]}")
            r, _, _ = select.select([self.fd], [], [], left)
            if r:
                try:
                    self.text += os.read(self.fd, 65536).decode(errors="replace")
                except OSError:
                    break
        return self.text

    def type(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def close(self) -> int:
        try:
            self.type("exit\r")
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if pid:
                    return os.waitstatus_to_exitcode(status)
                r, _, _ = select.select([self.fd], [], [], 0.05)
                if r:  # keep the child's output flowing; never block on a quiet pty
                    with __import__("contextlib").suppress(OSError):
                        os.read(self.fd, 65536)
            os.kill(self.pid, 9)
            os.waitpid(self.pid, 0)
            return -9
        finally:
            os.close(self.fd)


def test_interactive_shell_in_a_pty(world, tmp_path):
    screen = Screen(world, tmp_path)
    try:
        screen.read_until("appliance>")
        screen.type("ports\r")
        screen.read_until("up0")
        mark = len(screen.text)
        screen.type("rules ac\t")  # Tab completes the layer name from the daemon
        screen.read_until("rules acl", start=mark)
        screen.type("\r")
        screen.read_until("no-smtp")
        screen.type("help\r")
        screen.read_until("log-level")
        screen.type("bogus\r")
        screen.read_until("invalid choice")
    finally:
        assert screen.close() == 0
    assert "rules acl" in (tmp_path / ".appliancectl_history").read_text()
