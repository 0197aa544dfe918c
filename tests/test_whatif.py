"""Policy what-if over captures: the connections a change would affect, known in advance.

Captures are built with appliance.packet's builders; each test names the connections it
expects to change (and to break) and checks that exactly those are reported.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import EXT_MAC, GW_MAC, POLICY, VM1_MAC, VM2_MAC, icmp_echo, ip, tcp, udp

from appliance import packet as pk
from appliance.capture import PcapWriter, open_capture
from appliance.cli import trace
from appliance.policy import load_policy, parse_policy
from appliance.whatif import compare_capture

ROOT = Path(__file__).resolve().parents[1]
T0 = 1_700_000_000 * 10**9
MS = 10**6
SYN, SYNACK, ACK = 0x02, 0x12, 0x10
WEB = "93.184.216.34"

# the connections of `conversation`, by the 5-tuple of their first packet
C_WEB = ("tcp", "10.0.0.1", 40000, WEB, 80)
C_TLS = ("tcp", "10.0.0.1", 40001, WEB, 443)
C_VIP = ("tcp", "192.0.2.9", 5000, "198.51.100.80", 80)
C_OVERLAY = ("udp", "10.0.0.1", 5353, "10.1.2.3", 9000)
C_PING = ("icmp", "10.0.0.1", 7, "10.0.0.2", 0)
C_SMTP = ("tcp", "10.0.0.1", 40002, "192.0.2.25", 25)
C_SSH = ("tcp", "192.0.2.10", 52000, "10.0.0.2", 22)
ALL = {C_WEB, C_TLS, C_VIP, C_OVERLAY, C_PING, C_SMTP, C_SSH}


def conversation() -> list[tuple[int, bytes]]:
    """Seven connections through the helpers' policy, with their replies, as seen at the
    switch boundary (replies from the internet go to the SNAT address)."""
    reply_inner = udp("10.1.2.3", 9000, "10.0.0.1", 5353, src_mac=GW_MAC, dst_mac=VM1_MAC)
    frames = [
        tcp("10.0.0.1", 40000, WEB, 80, flags=SYN),
        tcp(WEB, 80, "198.51.100.7", 40000, flags=SYNACK, src_mac=EXT_MAC),
        tcp("10.0.0.1", 40000, WEB, 80, flags=ACK, payload=b"GET /"),
        tcp("10.0.0.1", 40001, WEB, 443, flags=SYN),
        tcp(WEB, 443, "198.51.100.7", 40001, flags=SYNACK, src_mac=EXT_MAC),
        tcp("192.0.2.9", 5000, "198.51.100.80", 80, flags=SYN, src_mac=EXT_MAC),
        tcp("10.0.0.1", 8080, "192.0.2.9", 5000, flags=SYNACK),
        udp("10.0.0.1", 5353, "10.1.2.3", 9000),
        pk.vxlan_encap(reply_inner, vni=5001, src_ip=ip("203.0.113.2"),
                       dst_ip=ip("203.0.113.1"), src_mac=EXT_MAC, dst_mac=GW_MAC,
                       src_port=50000),
        icmp_echo("10.0.0.1", "10.0.0.2", dst_mac=VM2_MAC),
        icmp_echo("10.0.0.2", "10.0.0.1", reply=True, src_mac=VM2_MAC, dst_mac=VM1_MAC),
        tcp("10.0.0.1", 40002, "192.0.2.25", 25, flags=SYN),
        tcp("192.0.2.10", 52000, "10.0.0.2", 22, flags=SYN, src_mac=EXT_MAC,
            dst_mac=VM2_MAC),
        tcp("10.0.0.2", 22, "192.0.2.10", 52000, flags=SYNACK, src_mac=VM2_MAC),
        pk.build_arp_request(src_mac=VM1_MAC, src_ip=ip("10.0.0.1"),
                             target_ip=ip("10.0.0.254")),
    ]
    return [(T0 + i * MS, f) for i, f in enumerate(frames)]


def write_pcap(path: Path, frames: list[tuple[int, bytes]]) -> Path:
    with PcapWriter(path) as w:
        for ts, frame in frames:
            w.write(ts, frame)
    return path


def edit(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new)


NO_SMTP = "      - {name: no-smtp, priority: 10, match: {proto: tcp, dst_port: 25}, action: deny}"
DENY_WEB = edit(POLICY, NO_SMTP, NO_SMTP + "\n      - {name: no-web, priority: 5, match: "
                "{proto: tcp, dst_port: 80}, action: deny}")
OTHER_SNAT = edit(POLICY, "snat: {ip: 198.51.100.7}", "snat: {ip: 198.51.100.9}")
OTHER_VTEP = edit(POLICY, "remote: 203.0.113.2", "remote: 203.0.113.3")
COUNT_OVERLAY = edit(POLICY, NO_SMTP, NO_SMTP + "\n      - {name: count-9000, priority: 20, "
                     "match: {proto: udp, dst_port: 9000}, action: count}")
# a count rule in the overlay's own layer takes the packets before the encap rule can
COUNT_IN_VNET = edit(POLICY, "      - {name: overlay, priority: 10,",
                     "      - {name: mdns, priority: 5, match: {proto: udp, dst_port: 9000}, "
                     "action: count}\n      - {name: overlay, priority: 10,")
RENAMED = edit(POLICY, "name: no-smtp", "name: no-mail")
ALLOW_SMTP = edit(POLICY, NO_SMTP, NO_SMTP.replace("no-smtp", "smtp").replace("deny", "allow"))
DENY_SSH_VM2 = edit(POLICY, "      - {name: ssh, priority: 10,",
                    "      - {name: no-ssh, priority: 5, match: {proto: tcp, dst: 10.0.0.2, "
                    "dst_port: 22}, action: deny}\n      - {name: ssh, priority: 10,")
METERED = edit(POLICY, "pps: 1000, burst: 100", "pps: 1, burst: 1")


def flow_tuple(flow: dict) -> tuple:
    return (flow["proto"], flow["src"], flow["sport"], flow["dst"], flow["dport"])


def run_compare(tmp_path: Path, new_text: str, old_text: str = POLICY,
                frames: list | None = None):
    cap = write_pcap(tmp_path / "c.pcap", frames or conversation())
    with open_capture(cap) as capture:
        return compare_capture(parse_policy(old_text), parse_policy(new_text), capture)


def changed(result) -> dict[tuple, dict]:
    return {flow_tuple(c.as_dict()["flow"]): c.as_dict() for c in result.changes}


def test_same_policy_changes_nothing_and_sees_every_connection(tmp_path):
    r = run_compare(tmp_path, POLICY)
    assert r.changes == []
    assert r.connections == len(ALL)
    assert (r.other_packets, r.other_changed) == (1, 0)  # the ARP request


def test_new_deny_rule_breaks_exactly_the_connection_it_matches(tmp_path):
    r = run_compare(tmp_path, DENY_WEB)
    got = changed(r)
    assert set(got) == {C_WEB}
    c = got[C_WEB]
    assert c["breaks"] and "denied" in c["kinds"]
    assert c["before"]["verdict"] == "forward" and c["after"]["verdict"] == "drop"
    assert c["after"]["reason"] == "deny"
    assert (c["rule_before"], c["rule_after"]) == ("vm1/acl/out/default", "vm1/acl/out/no-web")
    assert c["packets"] == 3 and c["connection_packets"] == 3  # SYN, SYN-ACK, ACK
    assert c["port"] == "vm1" and c["direction"] == "out"


def test_changed_snat_address_breaks_every_translated_connection(tmp_path):
    r = run_compare(tmp_path, OTHER_SNAT)
    got = changed(r)
    assert set(got) == {C_WEB, C_TLS}  # the VIP reply, overlay and ping are not SNATed
    for c in got.values():
        assert c["breaks"] and "nat" in c["kinds"]
        assert c["before"]["leaves"]["src"] == "198.51.100.7"
        assert c["after"]["leaves"]["src"] == "198.51.100.9"
        assert (c["rule_before"], c["rule_after"]) == ("vm1/nat/out/snat", "vm1/nat/out/snat")
    # replies captured towards the old address find no flow now: the same connection
    assert got[C_WEB]["connection_packets"] == 3 and got[C_TLS]["connection_packets"] == 2
    s = r.summary()
    assert s["groups"] == [{"port": "vm1", "rule_before": "vm1/nat/out/snat",
                            "rule_after": "vm1/nat/out/snat", "connections": 2,
                            "breaking": 2, "packets": 5,
                            "bytes": got[C_WEB]["bytes"] + got[C_TLS]["bytes"]}]


def test_changed_tunnel_endpoint_breaks_the_overlay_connection_only(tmp_path):
    got = changed(run_compare(tmp_path, OTHER_VTEP))
    assert set(got) == {C_OVERLAY}
    c = got[C_OVERLAY]
    assert c["breaks"] and "encap" in c["kinds"]
    assert c["after"]["leaves"]["tunnel"]["dst"] == "203.0.113.3"


def test_a_count_rule_changes_actions_but_breaks_nothing(tmp_path):
    got = changed(run_compare(tmp_path, COUNT_OVERLAY))
    assert set(got) == {C_OVERLAY}
    c = got[C_OVERLAY]
    assert not c["breaks"] and c["kinds"] == ["count"]
    assert c["before"]["leaves"] == c["after"]["leaves"]


def test_a_count_rule_above_the_encap_rule_breaks_the_overlay(tmp_path):
    got = changed(run_compare(tmp_path, COUNT_IN_VNET))
    assert set(got) == {C_OVERLAY}
    c = got[C_OVERLAY]
    assert c["breaks"] and {"encap", "count"} <= set(c["kinds"])
    assert (c["rule_before"], c["rule_after"]) == ("vm1/vnet/out/overlay", "vm1/vnet/out/mdns")


def test_renamed_rule_with_the_same_decision_is_no_change(tmp_path):
    assert run_compare(tmp_path, RENAMED).changes == []


def test_allowing_a_denied_connection_is_a_change_that_breaks_nothing(tmp_path):
    got = changed(run_compare(tmp_path, ALLOW_SMTP))
    assert set(got) == {C_SMTP}
    assert not got[C_SMTP]["breaks"] and got[C_SMTP]["kinds"] == ["allowed"]


def test_inbound_deny_for_one_port_and_the_other_port_is_untouched(tmp_path):
    got = changed(run_compare(tmp_path, DENY_SSH_VM2))
    assert set(got) == {C_SSH}
    assert got[C_SSH]["port"] == "vm2" and got[C_SSH]["direction"] == "in"
    assert got[C_SSH]["rule_after"] == "vm2/acl/in/no-ssh"


def test_meter_drops_are_changes_not_breaks(tmp_path):
    frames = [(T0 + i * MS, udp("10.0.0.2", 999, "192.0.2.1", 53, src_mac=VM2_MAC))
              for i in range(5)]
    got = changed(run_compare(tmp_path, METERED, frames=frames))
    c = got[("udp", "10.0.0.2", 999, "192.0.2.1", 53)]
    assert c["kinds"] == ["meter"] and not c["breaks"]
    assert c["packets"] == 5  # the actions (meter rate) differ on every packet


def test_example_policy_and_demo_capture(tmp_path):
    """The shipped example: moving the SNAT address breaks the demo's one SNATed TCP
    connection (its replies were captured towards the old address)."""
    example = (ROOT / "config/examples/policy.yaml").read_text()
    new = tmp_path / "new.yaml"
    new.write_text(edit(example, "snat: {ip: 198.51.100.7}", "snat: {ip: 198.51.100.9}"))
    with open_capture(ROOT / "config/examples/demo.pcap") as capture:
        r = compare_capture(load_policy(ROOT / "config/examples/policy.yaml"),
                            load_policy(new), capture)
    got = changed(r)
    assert set(got) == {("tcp", "10.0.0.1", 40000, WEB, 80)}
    assert r.summary()["breaking"] == 1


# ------------------------------------------------------------------------------- CLI

@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    out = {"cap": write_pcap(tmp_path / "c.pcap", conversation())}
    for name, text in (("old", POLICY), ("new", DENY_WEB), ("same", RENAMED)):
        out[name] = tmp_path / f"{name}.yaml"
        out[name].write_text(text)
    return out


def test_cli_json_lines_and_exit_one_when_something_changes(files, capsys):
    rc = trace.main(["--compare", str(files["old"]), str(files["new"]), str(files["cap"]),
                     "--json"])
    assert rc == 1
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(lines) == 2 and "change" in lines[0] and "summary" in lines[1]
    c = lines[0]["change"]
    assert {"port", "direction", "flow", "before", "after", "packets", "bytes"} <= set(c)
    assert set(c["flow"]) == {"proto", "src", "sport", "dst", "dport"}
    for side in (c["before"], c["after"]):
        assert {"verdict", "reason", "rules", "actions"} <= set(side)
    assert c["after"]["rules"][-1] == "vm1/acl/out/no-web"
    s = lines[1]["summary"]
    assert (s["connections"], s["changed"], s["breaking"]) == (len(ALL), 1, 1)
    assert s["rules"]["added"][0]["name"] == "no-web"


def test_cli_exit_zero_when_nothing_changes_and_human_output(files, capsys):
    rc = trace.main(["--compare", str(files["old"]), str(files["same"]), str(files["cap"])])
    out = capsys.readouterr().out
    assert rc == 0
    assert "no-smtp" in out and "no-mail" in out  # the rule-level diff shows the rename
    assert "0 would change" in out


def test_cli_human_output_groups_by_port_and_rule(files, capsys):
    assert trace.main(["--compare", str(files["old"]), str(files["new"]),
                       str(files["cap"])]) == 1
    out = capsys.readouterr().out
    assert "vm1: vm1/acl/out/default -> vm1/acl/out/no-web: 1 connection, 1 breaking" in out
    assert "BREAKS  vm1 out tcp 10.0.0.1.40000 > 93.184.216.34.80" in out
    assert "+ acl out no-web (priority 5): dst_port=80 proto=tcp -> deny" in out


@pytest.mark.parametrize("bad", ["policy", "missing", "capture", "port", "write"])
def test_cli_bad_input_exits_two_with_a_message(files, tmp_path, bad):
    argv = ["--compare", str(files["old"]), str(files["new"]), str(files["cap"])]
    if bad == "policy":
        broken = tmp_path / "broken.yaml"
        broken.write_text("version: 1\nuplink: up0\nports: []\nlayers: [{name: x, bogus: 1}]\n")
        argv[2] = str(broken)
    elif bad == "missing":
        argv[1] = str(tmp_path / "nope.yaml")
    elif bad == "capture":
        garbage = tmp_path / "g.pcap"
        garbage.write_bytes(b"not a capture")
        argv[3] = str(garbage)
    elif bad == "port":
        argv += ["--port", "vm9"]
    else:
        argv += ["--write", str(tmp_path / "out.pcap")]
    proc = subprocess.run([sys.executable, "-m", "appliance.cli.trace", *argv],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.strip()
