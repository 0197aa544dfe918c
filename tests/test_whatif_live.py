"""Policy what-if against a live flow table: the prediction, then the real revalidation.

`LiveDiff` must change nothing, and must predict exactly what `Pipeline.revalidate` then
does to each connection (property-tested on random policy pairs).
"""

from __future__ import annotations

from types import SimpleNamespace

from helpers import EXT_MAC, POLICY, VM2_MAC, tcp, udp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_templates import frames, policies

from appliance.datapath.sim import SimNic
from appliance.pipeline import Pipeline
from appliance.policy import parse_policy
from appliance.whatif import LiveDiff, flow_breaks, signature

SYN, SYNACK, ACK = 0x02, 0x12, 0x10
NO_SMTP = "      - {name: no-smtp, priority: 10, match: {proto: tcp, dst_port: 25}, action: deny}"
DENY_WEB = POLICY.replace(NO_SMTP, NO_SMTP + "\n      - {name: no-web, priority: 5, match: "
                          "{proto: tcp, dst_port: 80}, action: deny}")
OTHER_SNAT = POLICY.replace("snat: {ip: 198.51.100.7}", "snat: {ip: 198.51.100.9}")
UNRELATED = POLICY.replace("dst_port: 22}", "dst_port: 2222}")
FASTER = POLICY.replace("pps: 1000, burst: 100", "pps: 2000, burst: 100")
WEB = "93.184.216.34"


def world() -> Pipeline:
    """Three live connections: vm1 web (SNAT, offloaded), vm1 tls, vm2 UDP (metered)."""
    p = Pipeline(parse_policy(POLICY), SimNic(64))
    for sport, dport in ((40000, 80), (40001, 443)):
        p.process(tcp("10.0.0.1", sport, WEB, dport, flags=SYN), "vm1", 0)
        p.process(tcp(WEB, dport, "198.51.100.7", sport, flags=SYNACK, src_mac=EXT_MAC),
                  "up0", 1)
        p.process(tcp("10.0.0.1", sport, WEB, dport, flags=ACK), "vm1", 2)
    p.process(udp("10.0.0.2", 5, "192.0.2.1", 53, src_mac=VM2_MAC), "vm2", 3)
    return p


def state(p: Pipeline) -> list:
    return sorted((repr(f.key), f.actions.describe(), f.offloaded, f.packets, f.conn.generation,
                   repr(f.steps)) for f in p.flows)


def judge(p: Pipeline, text: str) -> LiveDiff:
    live = LiveDiff(p, parse_policy(text))
    live.check_unseen(10)
    return live


def dports(changes) -> set[int]:
    return {c.key[5] for c in changes}


def test_judging_changes_nothing():
    p = world()
    before, nic, gen = state(p), p.datapath.stats(), p.generation
    for text in (DENY_WEB, OTHER_SNAT, FASTER):
        judge(p, text)
    assert (state(p), p.datapath.stats(), p.generation, p.stale) == (before, nic, gen, False)


def test_new_deny_breaks_the_matching_connection_only_and_revalidation_agrees():
    p = world()
    live = judge(p, DENY_WEB)
    assert live.checked == 3
    assert dports(live.changes) == dports(live.breaking) == {80}
    c = live.changes[0].as_dict()
    assert c["before"]["verdict"] == "forward" and c["after"]["verdict"] == "drop"
    assert c["kinds"] == ["denied"] and c["path"] == "nic" and c["tcp_state"] == "established"
    assert (c["rule_before"], c["rule_after"]) == ("vm1/acl/out/default", "vm1/acl/out/no-web")
    assert c["packets"] == 3  # what the connection carried so far
    p.set_policy(parse_policy(DENY_WEB))
    assert p.revalidate(10).replaced == 1
    r = p.process(tcp("10.0.0.1", 40000, WEB, 80), "vm1", 11)
    assert r.verdict == "drop"
    assert p.process(tcp("10.0.0.1", 40001, WEB, 443), "vm1", 12).verdict == "forward"


def test_snat_address_change_breaks_translated_connections_not_the_others():
    live = judge(world(), OTHER_SNAT)
    assert dports(live.breaking) == {80, 443}
    assert all("nat" in c.kinds for c in live.changes)
    assert len(live.changes) == 2  # vm2's UDP has no SNAT (its port has no nat layer)


def test_unaffected_connections_are_skipped_by_the_policy_diff():
    live = judge(world(), UNRELATED)
    assert live.changes == [] and live.skipped == 3 and live.checked == 3


def test_a_meter_rate_change_is_a_change_that_breaks_nothing():
    live = judge(world(), FASTER)
    assert dports(live.changes) == {53} and live.breaking == []
    assert live.changes[0].kinds == {"meter"}


def test_connections_made_after_the_first_pass_are_judged_by_check_unseen():
    p = world()
    live = LiveDiff(p, parse_policy(DENY_WEB))
    live.check_all(list(p.flows.conns()), 5)
    assert dports(live.breaking) == {80}
    p.process(tcp("10.0.0.1", 40005, WEB, 80, flags=SYN), "vm1", 6)  # a new connection
    assert live.check_unseen(7) == 1
    assert {c.key[3] for c in live.breaking} == {40000, 40005}


def test_refused_traffic_that_becomes_a_new_reply_is_reported_as_allowed():
    """vm1's UDP flow is not translated until the change; a packet to the SNAT address was
    refused before (a drop flow remembers it). After the change that key is the flow's
    reply: revalidation hands it over, and the what-if says so."""
    from test_templates import HEAD

    nat = ("  - name: acl\n    stateful: true\n    default: {outbound: allow, inbound: deny}\n"
           "    outbound: []\n    inbound: []\n  - name: nat\n    outbound:\n"
           "      - {name: snat, priority: 10, match: {src_port: 1000-1100}, "
           "action: {snat: {ip: 198.51.100.7}}}\n")
    # vm1 takes frames to its MAC whatever their IP (steer_by_mac): so the uplink's packet to
    # the SNAT address reaches its ACL and is refused there, leaving a drop flow
    old = HEAD.replace('{name: vm1, interface: p1,', '{name: vm1, steer_by_mac: true, '
                       'interface: p1,') + nat
    p = Pipeline(parse_policy(old), SimNic(64))
    p.process(udp("10.0.0.1", 990, "192.0.2.1", 80), "vm1", 0)
    refused = p.process(udp("192.0.2.1", 80, "198.51.100.7", 990, src_mac=EXT_MAC,
                            dst_mac=0x020000000001), "up0", 1)
    assert refused.verdict == "drop"
    new = old.replace("src_port: 1000-1100", "src_port: 1-65535")
    live = judge(p, new)
    by_ingress = {c.ingress: c for c in live.changes}
    assert set(by_ingress) == {"vm1", "up0"}
    assert by_ingress["vm1"].breaks and "nat" in by_ingress["vm1"].kinds
    handed = by_ingress["up0"]
    assert handed.kinds == {"allowed"} and not handed.breaks
    assert handed.extra["reply_of"] == "udp 10.0.0.1.990 > 192.0.2.1.80"
    p.set_policy(parse_policy(new))
    p.revalidate(10)
    r = p.process(udp("192.0.2.1", 80, "198.51.100.7", 990, src_mac=EXT_MAC), "up0", 11)
    assert (r.verdict, r.out_port) == ("forward", "vm1")


# ------------------------------------------------------------------ property test

def _after(p: Pipeline, fwd_key: tuple) -> SimpleNamespace:
    """What revalidation left at a connection's key, shaped like a decision."""
    f = p.flows.get(fwd_key)
    if f is None:
        return SimpleNamespace(conflict="removed", actions=None, rkey=None, ractions=None)
    rev = f.reverse
    return SimpleNamespace(conflict=None, actions=f.actions,
                           rkey=rev.key if rev is not None else None,
                           ractions=rev.actions if rev is not None else None)


def _shape(d: SimpleNamespace) -> tuple:
    if d.conflict is not None:
        return ("conflict",)
    fwd = d.actions.output is not None
    return (signature(d.actions), d.rkey if fwd else None,
            signature(d.ractions) if fwd else None)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policy=policies(), later=policies(),
       sports=st.lists(st.integers(990, 1110), min_size=1, max_size=8, unique=True))
def test_prediction_equals_what_revalidation_does(policy, later, sports):
    p = Pipeline(parse_policy(policy), SimNic(1 << 16))
    for n, (frame, ingress) in enumerate(frames(sports)):
        p.process(frame, ingress, n)
    conns = list(p.flows.conns())
    snapshots = {}
    for conn in conns:
        fwd, rev = conn.forward, conn.reverse
        old = SimpleNamespace(
            forward=SimpleNamespace(actions=fwd.actions),
            reverse=None if rev is None else SimpleNamespace(key=rev.key, actions=rev.actions))
        before = SimpleNamespace(conflict=None, actions=fwd.actions,
                                 rkey=rev.key if rev is not None else None,
                                 ractions=rev.actions if rev is not None else None)
        snapshots[fwd.key] = (old, _shape(before))
    live = LiveDiff(p, parse_policy(later))
    live.check_unseen(10**6)
    predicted = {(c.ingress, c.key): c for c in live.changes}
    p.set_policy(parse_policy(later))
    p.revalidate(10**9)
    for key, (old, shape) in snapshots.items():
        after = _after(p, key)
        actually_changed = _shape(after) != shape
        assert (key in predicted) == actually_changed, (policy, later, key)
        if actually_changed:
            assert predicted[key].breaks == flow_breaks(old, after), (policy, later, key)
