"""Two places where revalidation left a connection unlike what a fresh pipeline under the
new policy makes of it, found by tests/test_revalidation_property.py (issue 10), now fixed:
a drop flow kept its old port when its new decision had equal actions, and revalidation
installed a ``drop(no_port)`` flow (port None) where the slow path keeps none.

Neither changed what the wire sees (the packets are dropped either way); both misled
`appliancectl flows --port`, traces and the next policy diff.
"""

from __future__ import annotations

from helpers import EXT_MAC, POLICY, tcp

from appliance.policy import parse_policy
from appliance.timeouts import NS, TCP_SYN

VM1_IPS = 'ips: ["10.0.0.1", "fd00::1"],'
VM2_IPS = 'ips: ["10.0.0.2"],'
THREE_ON_VM1 = POLICY.replace(VM1_IPS, 'ips: ["10.0.0.1", "fd00::1", "10.0.0.3"],')
THREE_ON_VM2 = POLICY.replace(VM2_IPS, 'ips: ["10.0.0.2", "10.0.0.3"],')


def test_a_drop_flow_follows_its_address_to_the_new_port(make_pipeline):
    """A denied inbound connection to 10.0.0.3 (acl inbound default deny) is a drop flow
    walked through vm1. 10.0.0.3 moves to vm2, which denies it too: the actions are equal,
    so revalidation re-records the steps (now vm2's) but keeps ``flow.port == "vm1"``; a
    fresh pipeline says vm2. `appliancectl flows --port`, traces of later packets
    (`Result.port`) and `PolicyDiff.affects` (``flow.port in ports``) read the stale name."""
    p = make_pipeline(THREE_ON_VM1)
    syn = tcp("192.0.2.9", 5000, "10.0.0.3", 23, flags=TCP_SYN, src_mac=EXT_MAC)
    r = p.process(syn, "up0", 0)
    assert (r.verdict, r.reason, r.port) == ("drop", "deny", "vm1")
    p.set_policy(parse_policy(THREE_ON_VM2))
    p.revalidate(NS)
    flow = p.flows.get(("up0", r.key))
    assert {s.port for s in flow.steps} == {"vm2"}  # the steps did move
    fresh = make_pipeline(THREE_ON_VM2).process(syn, "up0", 0)
    assert fresh.port == "vm2"
    assert flow.port == fresh.port


def test_an_address_nobody_owns_any_more_leaves_no_flow(make_pipeline):
    """An inbound connection to 10.0.0.3 on vm2; the new policy gives 10.0.0.3 to nobody.
    A fresh pipeline drops such packets as ``no_port`` without a flow (the slow path never
    installs one for them); revalidation installs and offloads a ``drop(no_port)`` flow
    whose ``port`` is None (typed ``str``)."""
    p = make_pipeline(THREE_ON_VM2)
    syn = tcp("192.0.2.9", 5000, "10.0.0.3", 8080, flags=TCP_SYN, src_mac=EXT_MAC)
    r = p.process(syn, "up0", 0)
    assert (r.verdict, r.out_port) == ("forward", "vm2")
    p.set_policy(parse_policy(POLICY))
    p.revalidate(NS)
    fresh = make_pipeline(POLICY)
    assert (fresh.process(syn, "up0", 0).reason, len(fresh.flows)) == ("no_port", 0)
    assert p.flows.get(("up0", r.key)) is None
