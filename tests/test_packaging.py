"""The packaging pieces that can be checked in seconds, and `appliancectl flows` rendering.

The packages themselves (built, installed in a throwaway Debian root, upgraded, removed,
purged, linted) are checked by tools/test-packages.sh, a step of tools/test.sh after pytest.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import POLICY, tcp, udp

from appliance.cli.appliancectl import build_parser, flow_lines
from appliance.daemon.methods import flow_row
from appliance.datapath.sim import SimNic
from appliance.pipeline import Pipeline
from appliance.policy import parse_policy

ROOT = Path(__file__).resolve().parent.parent
PACKAGING = ROOT / "packaging"
sys.path.insert(0, str(ROOT / "tools"))

DEB_SCRIPTS = sorted((PACKAGING / "deb").iterdir())
RPM_SCRIPTS = sorted((PACKAGING / "rpm").iterdir())


# ------------------------------------------------------------------- maintainer scripts

@pytest.mark.parametrize("script", DEB_SCRIPTS + RPM_SCRIPTS, ids=lambda p: p.name)
def test_maintainer_scripts_are_posix_sh(script):
    """dash (Debian's /bin/sh) parses each script; the Debian ones are executable."""
    p = subprocess.run(["dash", "-n", str(script)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    if script.parent.name == "deb":
        assert os.access(script, os.X_OK)
        assert script.read_text().startswith("#!/bin/sh\n")


def test_maintainer_scripts_reject_unknown_actions():
    for script in DEB_SCRIPTS:
        p = subprocess.run(["dash", str(script), "bogus-action"], capture_output=True,
                           text=True)
        assert p.returncode == 1 and "unknown argument" in p.stderr, script.name


def test_upgrade_restarts_headless_and_remove_stops_fully():
    """The contract with the daemon, as the scripts spell it (tools/test-packages.sh runs
    them for real in a Debian root)."""
    postinst = (PACKAGING / "deb" / "postinst").read_text()
    touch = postinst.index('touch "$dir/stop-headless"')
    restart = postinst.index('systemctl restart "$UNIT"')
    assert touch < restart < postinst.index('rm -f "$dir/stop-headless"')
    prerm = (PACKAGING / "deb" / "prerm").read_text()
    assert "rm -f /run/appliance/stop-headless" in prerm
    assert prerm.index("rm -f /run/appliance/stop-headless") < prerm.index("systemctl stop")


# --------------------------------------------------------------------------- nfpm file

def test_nfpm_file_names_existing_sources_and_the_conffiles():
    spec = yaml.safe_load((PACKAGING / "nfpm.yaml").read_text())
    contents = spec["contents"]
    for entry in contents:
        src = entry.get("src", "")
        if src.startswith("packaging/"):
            assert (ROOT / src).exists(), src
    conffiles = {e["dst"] for e in contents if e.get("type") == "config|noreplace"}
    assert conffiles == {"/etc/appliance/appliance.toml", "/etc/appliance/policy.yaml"}
    links = {e["dst"] for e in contents if e.get("type") == "symlink"}
    scripts = set(build_parser_scripts())
    assert {f"/usr/bin/{s}" for s in scripts} == links
    for script in spec["scripts"].values():
        assert (ROOT / script).exists()
    for script in spec["overrides"]["rpm"]["scripts"].values():
        assert (ROOT / script).exists()


def build_parser_scripts() -> list[str]:
    import tomllib

    return list(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])


# ----------------------------------------------------------------------------- man pages

def test_man_pages_document_every_option(tmp_path):
    """Generated from the parsers: every option of appliancectl (and its commands) is in its
    page, and man renders each page without a warning."""
    import gen_manpages

    assert gen_manpages.main(["--version", "9.9", "--out", str(tmp_path)]) == 0
    pages = {p.name for p in tmp_path.iterdir()}
    assert pages == {"appliancectl.1", "applianced.8", "appliance-trace.1",
                     "appliance-check-config.1"}
    text = (tmp_path / "appliancectl.1").read_text()
    for option in _all_options(build_parser()):
        assert option.replace("-", "\\-") in text, option
    if shutil.which("man"):
        for page in tmp_path.iterdir():
            p = subprocess.run(["man", "--warnings", "-l", str(page)], capture_output=True,
                               text=True, env={**os.environ, "MANPAGER": "cat",
                                               "MANWIDTH": "80"})
            assert p.returncode == 0 and not p.stderr.strip(), (page.name, p.stderr)
            assert f"{page.stem} - " in " ".join(p.stdout.replace("\u2010", "-").split())


def _all_options(parser):
    import argparse

    for action in parser._actions:
        yield from (o for o in action.option_strings if o.startswith("--"))
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _all_options(sub)


def test_capture_parser_takes_the_parser_without_parsing():
    import gen_manpages

    from appliance.cli import applianced

    parser = gen_manpages.capture_parser(applianced.parse_args)
    assert parser.prog == "applianced"
    assert {"--check", "--config", "--headless"} <= set(parser._option_string_actions)
    with pytest.raises(RuntimeError):
        gen_manpages.capture_parser(lambda argv: None)


# -------------------------------------------------------------- copyright and changelog

def test_copyright_lists_every_bundled_distribution():
    import sysconfig

    import gen_copyright

    site = Path(sysconfig.get_paths()["purelib"])
    text = gen_copyright.render(site, "2025-2026")
    assert text.startswith("Format: https://www.debian.org/doc/packaging-manuals/")
    assert "Copyright: 2025-2026 the appliance developers" in text
    for dist, license in (("trio", "MIT OR Apache-2.0"),
                          ("pyroute2", "GPL-2.0-or-later OR Apache-2.0"),
                          ("msgpack", "Apache-2.0")):
        block = next(b for b in text.split("\n\n") if f"Comment: {dist} " in b)
        assert f"License: {license}" in block, block
    assert "License: UNKNOWN" not in text


@pytest.mark.skipif(not shutil.which("dpkg-parsechangelog"), reason="needs dpkg-dev")
def test_debian_changelog_parses(tmp_path):
    import gen_debchangelog

    path = tmp_path / "changelog"
    path.write_text(gen_debchangelog.render("1.2.3", 1_700_000_000))
    p = subprocess.run(["dpkg-parsechangelog", "-l", str(path), "-S", "Version"],
                       capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.strip() == "1.2.3", p.stderr


# ------------------------------------------------------------------------ bash completion

def _complete(*words: str) -> list[str]:
    script = (f"source {PACKAGING / 'completion' / 'appliancectl'}\n"
              f"COMP_WORDS=({' '.join(repr(w) for w in words)}); "
              f"COMP_CWORD={len(words) - 1}; _appliancectl; printf '%s\\n' \"${{COMPREPLY[@]}}\"")
    p = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30,
                       env={**os.environ, "APPLIANCECTL_PYTHON": sys.executable,
                            "APPLIANCE_SOCKET": "/nonexistent/appliance.sock"})
    assert p.returncode == 0, p.stderr
    return [w for w in p.stdout.splitlines() if w]


def test_bash_completion_follows_the_parser():
    assert _complete("appliancectl", "fl") == ["flows", "flush"]
    assert _complete("appliancectl", "-j", "--socket", "/x", "flows", "--pa") == ["--path"]
    assert _complete("appliancectl", "flows", "--path", "") == ["host", "nic"]
    assert _complete("appliancectl", "rule", "add", "acl", "") == ["in", "out"]
    assert _complete("appliancectl", "--so") == ["--socket"]
    assert "exit" not in _complete("appliancectl", "")


# -------------------------------------------------------------- appliancectl flows output

def test_flow_lines_one_aligned_line_per_flow():
    """Rows as the daemon's ``flows`` method makes them from a real pipeline's flows."""
    pipeline = Pipeline(parse_policy(POLICY), SimNic(1024))
    assert pipeline.process(tcp("10.0.0.1", 40000, "192.0.2.1", 80, flags=0x02), "vm1",
                            0).verdict == "forward"
    assert pipeline.process(udp("10.0.0.1", 5353, "192.0.2.53", 53), "vm1", 0).verdict == "forward"
    rows = [flow_row(f, 1_000_000_000) for f in pipeline.flows]
    lines = flow_lines(rows)
    assert len(lines) == len(rows) == 4
    assert all("\n" not in line and " actions:" in line for line in lines)
    key_at = {line.index(" tcp ") if " tcp " in line else line.index(" udp ") for line in lines}
    assert len(key_at) == 1  # the key column starts at the same place on every line
    out = next(line for line in lines if line.startswith("vm1") and " tcp " in line)
    assert "tcp 10.0.0.1.40000 > 192.0.2.1.80" in out
    assert "set(src=198.51.100.7" in out and "packets=1 " in out
    assert flow_lines([]) == []


def test_flow_lines_say_why_the_nic_refused_a_flow():
    pipeline = Pipeline(parse_policy(POLICY), SimNic(1024, frozenset()))  # the NIC runs nothing
    pipeline.process(tcp("10.0.0.1", 40001, "192.0.2.1", 80, flags=0x02), "vm1", 0)
    lines = flow_lines([flow_row(f, 0) for f in pipeline.flows])
    assert lines and all(" host " in line and "nic_refused=unsupported:" in line
                         for line in lines)
