"""The shared pipeline: layer composition, stateful flows, NAT, tunnels, ageing, the NIC model."""

from __future__ import annotations

import pytest
from helpers import (
    EXT_MAC,
    GW_MAC,
    POLICY,
    VM1_MAC,
    VM2_MAC,
    icmp_echo,
    ip,
    parsed,
    tcp,
    udp,
)

from appliance import packet as pk
from appliance.datapath.sim import SimNic
from appliance.model import ActionKind, Direction
from appliance.pipeline import Pipeline
from appliance.policy import parse_policy
from appliance.timeouts import NS, Timeouts

SYN, SYNACK, ACK, FIN, RST = 0x02, 0x12, 0x10, 0x11, 0x04


def make(capacity: int = 1024, kinds=frozenset(ActionKind), policy: str = "tinylfu",
         **kw) -> Pipeline:
    return Pipeline(parse_policy(POLICY), SimNic(capacity, kinds, policy=policy), **kw)


def test_outbound_snat_then_reply_is_translated_back_on_the_reverse_flow():
    p = make()
    r = p.process(tcp("10.0.0.1", 40000, "93.184.216.34", 80, flags=SYN), "vm1", 0)
    assert (r.path, r.verdict, r.out_port) == ("slow", "forward", "up0")
    assert [(s.layer, s.rule) for s in r.steps] == [
        ("acl", "default"), ("nat", "snat"), ("vnet", "default")]
    out = parsed(r.frame)
    assert (out.src, out.sport, out.dst, out.dport) == (ip("198.51.100.7"), 40000,
                                                       ip("93.184.216.34"), 80)
    assert pk.verify_checksums(r.frame) == {k: True for k in pk.verify_checksums(r.frame)}
    # the reply from the internet hits the reverse flow created with the forward one
    reply = tcp("93.184.216.34", 80, "198.51.100.7", 40000, flags=SYNACK, src_mac=EXT_MAC,
                dst_mac=GW_MAC)
    r2 = p.process(reply, "up0", NS)
    assert (r2.path, r2.verdict, r2.out_port, r2.port, r2.direction) == (
        "nic", "forward", "vm1", "vm1", Direction.IN)
    back = parsed(r2.frame)
    assert (back.dst, back.dport, back.dst_mac) == (ip("10.0.0.1"), 40000, VM1_MAC)
    assert all(pk.verify_checksums(r2.frame).values())


def test_unsolicited_inbound_is_denied_by_the_stateful_acl():
    p = make()
    r = p.process(tcp("93.184.216.34", 80, "10.0.0.1", 5555, src_mac=EXT_MAC,
                      dst_mac=VM1_MAC), "up0", 0)
    assert (r.verdict, r.reason) == ("drop", "deny")
    assert [(s.layer, s.rule) for s in r.steps] == [
        ("vnet", "default"), ("nat", "default"), ("acl", "default")]


def test_deny_stops_the_walk_and_creates_a_drop_flow():
    p = make()
    r = p.process(tcp("10.0.0.1", 40001, "192.0.2.25", 25), "vm1", 0)
    assert (r.verdict, r.reason) == ("drop", "deny")
    assert [(s.layer, s.rule) for s in r.steps] == [("acl", "no-smtp")]
    r2 = p.process(tcp("10.0.0.1", 40001, "192.0.2.25", 25), "vm1", 1)
    assert (r2.path, r2.verdict) == ("nic", "drop")
    assert r2.flow.reverse is None


def test_dnat_vip_inbound_and_reply_source_restored():
    p = make()
    syn = tcp("192.0.2.9", 5000, "198.51.100.80", 80, flags=SYN, src_mac=EXT_MAC,
              dst_mac=GW_MAC)
    r = p.process(syn, "up0", 0)
    assert (r.verdict, r.out_port, r.port) == ("forward", "vm1", "vm1")
    assert [(s.layer, s.rule) for s in r.steps] == [
        ("vnet", "default"), ("nat", "vip"), ("acl", "web")]
    h = parsed(r.frame)
    assert (h.dst, h.dport, h.dst_mac) == (ip("10.0.0.1"), 8080, VM1_MAC)
    reply = tcp("10.0.0.1", 8080, "192.0.2.9", 5000, flags=SYNACK)
    r2 = p.process(reply, "vm1", 1)
    assert (r2.path, r2.verdict, r2.out_port) == ("nic", "forward", "up0")
    h2 = parsed(r2.frame)
    assert (h2.src, h2.sport) == (ip("198.51.100.80"), 80)
    assert all(pk.verify_checksums(r2.frame).values())


def test_encap_then_reply_decap_round_trip():
    p = make()
    inner = udp("10.0.0.1", 1111, "10.1.2.3", 2222)
    r = p.process(inner, "vm1", 0)
    assert (r.verdict, r.out_port) == ("forward", "up0")
    out = parsed(r.frame)
    assert (out.vni, out.src, out.dst, out.dport) == (5001, ip("203.0.113.1"),
                                                      ip("203.0.113.2"), 4789)
    assert pk.vxlan_decap(r.frame, out) == inner  # nothing else rewritten (no SNAT: 10/8)
    # the remote VTEP answers, encapsulated
    reply_inner = udp("10.1.2.3", 2222, "10.0.0.1", 1111, src_mac=GW_MAC, dst_mac=VM1_MAC)
    reply = pk.vxlan_encap(reply_inner, vni=5001, src_ip=ip("203.0.113.2"),
                           dst_ip=ip("203.0.113.1"), src_mac=EXT_MAC, dst_mac=GW_MAC,
                           src_port=50000)
    r2 = p.process(reply, "up0", 1)
    assert (r2.path, r2.verdict, r2.out_port) == ("nic", "forward", "vm1")
    assert r2.frame == reply_inner


def test_decap_then_nat_then_acl_composition_for_new_inbound_overlay_traffic():
    """Inbound from the wire walks vnet (decap), nat (dnat), then acl (allow web)."""
    p = make()
    inner = tcp("10.1.2.3", 3333, "198.51.100.80", 80, flags=SYN, src_mac=GW_MAC,
                dst_mac=VM1_MAC)
    outer = pk.vxlan_encap(inner, vni=5001, src_ip=ip("203.0.113.2"), dst_ip=ip("203.0.113.1"),
                           src_mac=EXT_MAC, dst_mac=GW_MAC, src_port=50001)
    r = p.process(outer, "up0", 0)
    assert [(s.layer, s.rule) for s in r.steps] == [
        ("vnet", "overlay-in"), ("nat", "vip"), ("acl", "web")]
    assert r.verdict == "forward"
    h = parsed(r.frame)
    assert h.vni is None and (h.dst, h.dport) == (ip("10.0.0.1"), 8080)
    assert r.flow.actions.decap and r.flow.actions.dst == ip("10.0.0.1")
    # the reply is re-encapsulated towards the sender's VTEP and un-NATed
    reply = tcp("10.0.0.1", 8080, "10.1.2.3", 3333, flags=SYNACK)
    r2 = p.process(reply, "vm1", 1)
    assert (r2.path, r2.verdict, r2.out_port) == ("nic", "forward", "up0")
    o = parsed(r2.frame)
    assert (o.vni, o.src, o.dst) == (5001, ip("203.0.113.1"), ip("203.0.113.2"))
    assert (o.inner.src, o.inner.sport) == (ip("198.51.100.80"), 80)


def test_port_to_port_walks_sender_out_then_receiver_in():
    p = make()
    r = p.process(icmp_echo("10.0.0.1", "10.0.0.2", dst_mac=VM2_MAC), "vm1", 0)
    assert (r.verdict, r.out_port) == ("forward", "vm2")
    assert [(s.port, s.layer, str(s.direction)) for s in r.steps] == [
        ("vm1", "acl", "out"), ("vm1", "nat", "out"), ("vm1", "vnet", "out"),
        ("vm2", "qos", "in"), ("vm2", "acl", "in")]
    assert r.steps[-1].rule == "ping"
    r2 = p.process(icmp_echo("10.0.0.2", "10.0.0.1", reply=True, src_mac=VM2_MAC,
                             dst_mac=VM1_MAC), "vm2", 1)
    assert (r2.path, r2.out_port) == ("nic", "vm1")


def test_ipv6_echo_round_trip_and_no_nat_for_v6():
    p = make()
    r = p.process(icmp_echo("fd00::1", "2001:db8::5"), "vm1", 0)
    assert (r.verdict, r.out_port) == ("forward", "up0")
    assert parsed(r.frame).src == ip("fd00::1")  # the v4 SNAT rule does not match v6
    r2 = p.process(icmp_echo("2001:db8::5", "fd00::1", reply=True, src_mac=EXT_MAC,
                             dst_mac=VM1_MAC), "up0", 1)
    assert (r2.path, r2.verdict, r2.out_port) == ("nic", "forward", "vm1")


def test_meter_drops_excess_by_capture_time():
    p = make()
    results = [p.process(udp("10.0.0.2", 7000, "192.0.2.1", 53, src_mac=VM2_MAC), "vm2",
                         i * 1000) for i in range(300)]  # 300 packets within 0.3 ms
    passed = sum(r.verdict == "forward" for r in results)
    assert passed == 100  # the burst
    assert all(r.reason == "meter" for r in results if r.verdict == "drop")
    later = p.process(udp("10.0.0.2", 7000, "192.0.2.1", 53, src_mac=VM2_MAC), "vm2", NS)
    assert later.verdict == "forward"  # tokens refilled after a second


def test_nic_without_meter_capability_keeps_the_flow_on_the_host():
    p = make(kinds=frozenset({ActionKind.ALLOW, ActionKind.DENY, ActionKind.SNAT,
                              ActionKind.DNAT}))
    r = p.process(udp("10.0.0.2", 7000, "192.0.2.1", 53, src_mac=VM2_MAC), "vm2", 0)
    assert r.offload == "unsupported:meter"
    r2 = p.process(udp("10.0.0.2", 7000, "192.0.2.1", 53, src_mac=VM2_MAC), "vm2", 1)
    assert r2.path == "host"
    assert p.datapath.stats().refusals == 1  # asked once, not on every packet


def test_idle_expiry_follows_capture_time_and_removes_from_nic():
    p = make(timeouts=Timeouts(udp=10))
    p.process(udp("10.0.0.1", 1, "192.0.2.1", 2), "vm1", 0)
    assert len(p.flows) == 2 and len(p.datapath) == 2
    assert p.process(udp("10.0.0.1", 1, "192.0.2.1", 2), "vm1", 9 * NS).path == "nic"
    # idle from 9 s: still alive at 18 s, gone at 20 s
    p.age(18 * NS)
    assert len(p.flows) == 2
    p.age(20 * NS)
    assert len(p.flows) == 0 and len(p.datapath) == 0 and p.flows.expired == 1
    assert p.process(udp("10.0.0.1", 1, "192.0.2.1", 2), "vm1",
                     21 * NS).path == "slow"


def test_tcp_rst_shortens_the_timeout():
    p = make(timeouts=Timeouts(tcp_established=100, tcp_closed=2))
    p.process(tcp("10.0.0.1", 5, "10.0.0.2", 8080, flags=SYN, dst_mac=VM2_MAC), "vm1", 0)
    p.process(tcp("10.0.0.2", 8080, "10.0.0.1", 5, flags=SYNACK, src_mac=VM2_MAC,
                  dst_mac=VM1_MAC), "vm2", 0)
    conn = next(p.flows.conns())
    assert conn.tcp_state == "syn_received"
    p.process(tcp("10.0.0.1", 5, "10.0.0.2", 8080, flags=ACK, dst_mac=VM2_MAC), "vm1", 0)
    assert conn.tcp_state == "established"
    p.process(tcp("10.0.0.1", 5, "10.0.0.2", 8080, flags=RST, dst_mac=VM2_MAC), "vm1", NS)
    assert conn.tcp_state == "closed"
    p.age(4 * NS)
    assert len(p.flows) == 0


def test_nic_lru_eviction_keeps_the_flow_in_host_table():
    p = make(capacity=2, policy="lru")
    p.process(udp("10.0.0.1", 1, "192.0.2.1", 2), "vm1", 0)  # 2 entries
    p.process(udp("10.0.0.1", 3, "192.0.2.1", 4), "vm1", 1)  # evicts 2
    assert p.datapath.stats().evictions == 2 and len(p.flows) == 4
    r = p.process(udp("10.0.0.1", 1, "192.0.2.1", 2), "vm1", 2)
    assert r.path == "host"  # evicted, still known to the host, re-offloaded
    r = p.process(udp("10.0.0.1", 1, "192.0.2.1", 2), "vm1", 3)
    assert r.path == "nic"


def test_snat_port_collision_picks_another_port():
    # vm1 may send from its whole /24 here, so two of its inside addresses collide
    p = Pipeline(parse_policy(POLICY.replace('ips: ["10.0.0.1", "fd00::1"],',
                                             'ips: ["10.0.0.1", "fd00::1"], '
                                             'allowed_sources: [10.0.0.0/24],')), SimNic())
    r1 = p.process(tcp("10.0.0.1", 40000, "93.184.216.34", 80, flags=SYN), "vm1", 0)
    assert parsed(r1.frame).sport == 40000
    # same translated tuple from another inside address collides
    r2 = p.process(tcp("10.0.0.9", 40000, "93.184.216.34", 80, flags=SYN), "vm1", 1)
    assert r2.verdict == "forward"
    assert parsed(r2.frame).sport == 40001
    reply = tcp("93.184.216.34", 80, "198.51.100.7", 40001, flags=SYNACK, src_mac=EXT_MAC)
    back = parsed(p.process(reply, "up0", 2).frame)
    assert (back.dst, back.dport) == (ip("10.0.0.9"), 40000)


def test_flow_limit_refuses_new_connections():
    p = make(max_flows=2, port_share=1.0)
    assert p.process(udp("10.0.0.1", 1, "192.0.2.1", 2), "vm1", 0).verdict \
        == "forward"
    r = p.process(udp("10.0.0.1", 3, "192.0.2.1", 4), "vm1", 1)
    assert (r.verdict, r.reason) == ("drop", "flow_limit")
    assert p.flows.refused == 1


def test_one_port_full_share_leaves_room_for_the_others():
    p = make(max_flows=40, port_share=0.25)  # 10 flows = 5 connections per ingress
    for i in range(5):
        assert p.process(udp("10.0.0.1", 100 + i, "192.0.2.1", 53), "vm1", 0).verdict == \
            "forward"
    r = p.process(udp("10.0.0.1", 200, "192.0.2.1", 53), "vm1", 0)
    assert (r.verdict, r.reason) == ("drop", "port_flow_limit")
    assert p.process(udp("10.0.0.2", 1, "192.0.2.1", 53, src_mac=VM2_MAC), "vm2", 0).verdict \
        == "forward"
    assert p.flows.by_ingress == {"vm1": 10, "vm2": 2}


def test_a_full_table_ages_the_heaviest_port_first():
    p = make(max_flows=12, port_share=1.0, timeouts=Timeouts(udp=30))
    for i in range(5):  # vm1: 10 flows, idle after t=0
        p.process(udp("10.0.0.1", 100 + i, "192.0.2.1", 53), "vm1", 0)
    p.process(udp("10.0.0.2", 1, "192.0.2.1", 53, src_mac=VM2_MAC), "vm2", 0)
    # full; 20 s later (> 1/4 of the timeout idle) a vm2 connection takes vm1's idle ones
    r = p.process(udp("10.0.0.2", 2, "192.0.2.1", 53, src_mac=VM2_MAC), "vm2", 20 * NS)
    assert r.verdict == "forward"
    assert p.flows.by_ingress["vm2"] == 4 and p.flows.by_ingress["vm1"] == 0


@pytest.mark.parametrize(("target", "mac"), [("10.0.0.2", VM2_MAC), ("10.0.0.254", GW_MAC)])
def test_arp_is_answered_by_the_switch(target, mac):
    p = make()
    req = pk.build_arp_request(src_mac=VM1_MAC, src_ip=ip("10.0.0.1"), target_ip=ip(target))
    r = p.process(req, "vm1", 0)
    assert (r.verdict, r.out_port, r.note) == ("forward", "vm1", "arp_reply")
    h = parsed(r.frame)
    assert (h.arp_op, h.arp_sha, h.arp_spa, h.dst_mac) == (2, mac, ip(target), VM1_MAC)


def test_neighbor_solicitation_is_answered():
    p = make()
    ns = pk.build_neighbor_solicit(src_mac=VM1_MAC, src_ip=ip("fd00::1"),
                                   target_ip=ip("fd00::99"))
    r = p.process(ns, "vm1", 0)
    assert (r.verdict, r.note) == ("forward", "nd_advert")
    assert all(pk.verify_checksums(r.frame).values())


def test_malformed_packets_are_counted_drop_reasons():
    p = make()
    good = udp("10.0.0.1", 1, "10.0.0.2", 2)
    bad = good[:14] + b"\x45" + good[15:20]  # IPv4 cut short
    r = p.process(bad, "vm1", 0)
    assert (r.verdict, r.reason) == ("drop", "malformed_ipv4")
    assert p.counters.drops["malformed_ipv4"] == 1


def test_uplink_packet_for_nobody_is_dropped_no_port():
    p = make()
    r = p.process(udp("192.0.2.1", 1, "192.0.2.200", 2, src_mac=EXT_MAC, dst_mac=GW_MAC),
                  "up0", 0)
    assert (r.verdict, r.reason) == ("drop", "no_port")


def test_fragments_follow_the_first_fragment_flow():
    p = make()
    big = udp("10.0.0.1", 1234, "192.0.2.1", 53, payload=b"z" * 3000)
    frags = pk.fragment_ipv4(big, 1500)
    assert len(frags) >= 3
    results = [p.process(f, "vm1", i) for i, f in enumerate(frags)]
    assert [r.verdict for r in results] == ["forward"] * len(frags)
    assert results[0].path == "slow" and {r.path for r in results[1:]} == {"nic"}


def test_later_fragment_without_first_is_evaluated_without_ports():
    p = make()
    big = tcp("10.0.0.1", 1234, "192.0.2.25", 25, payload=b"z" * 3000)
    frags = pk.fragment_ipv4(big, 1500)
    r = p.process(frags[1], "vm1", 0)  # the no-smtp rule needs a port: does not match
    assert (r.path, r.verdict) == ("slow", "forward")
    assert len(p.flows) == 0


def test_new_syn_after_close_reevaluates_policy():
    p = make()
    p.process(tcp("10.0.0.1", 5, "10.0.0.2", 8080, flags=SYN, dst_mac=VM2_MAC), "vm1", 0)
    p.process(tcp("10.0.0.1", 5, "10.0.0.2", 8080, flags=RST, dst_mac=VM2_MAC), "vm1", 1)
    r = p.process(tcp("10.0.0.1", 5, "10.0.0.2", 8080, flags=SYN, dst_mac=VM2_MAC), "vm1", 2)
    assert r.path == "slow" and p.flows.created == 2


def test_tinylfu_admits_a_new_flow_only_once_it_is_hotter_than_the_coldest():
    p = make(capacity=2)
    hot = udp("10.0.0.1", 1, "192.0.2.1", 2)
    for i in range(5):
        p.process(hot, "vm1", i)  # 2 entries (forward + reverse), forward is hot
    new = udp("10.0.0.1", 3, "192.0.2.1", 4)
    r = p.process(new, "vm1", 10)
    assert r.offload == "cold" and p.datapath.stats().evictions == 0
    assert p.process(hot, "vm1", 11).path == "nic"  # the hot flow kept its place
    # the newcomer keeps coming up; once hotter than the coldest resident it gets in
    paths = [p.process(new, "vm1", 12 + i).path for i in range(3)]
    assert paths[0] == "host" and "nic" in paths
    assert p.process(hot, "vm1", 20).path == "nic"  # the cold reverse entry was evicted


def test_per_port_quota_refuses_without_evicting_other_ports():
    p = Pipeline(parse_policy(POLICY), SimNic(100, per_port=2))
    for i in range(2):  # each connection: one entry on vm1 (forward), one on up0 (reverse)
        assert p.process(udp("10.0.0.1", i, "192.0.2.1", 2), "vm1", i).offload == "offloaded"
    r = p.process(udp("10.0.0.1", 9, "192.0.2.1", 2), "vm1", 3)
    assert r.offload == "port_full"
    assert p.datapath.entries_of("vm1") == 2 and p.datapath.stats().evictions == 0
    assert p.process(udp("10.0.0.1", 9, "192.0.2.1", 2), "vm1", 4).path == "host"


def test_icmp_error_about_a_snat_connection_is_translated_back_to_the_vm():
    p = make()
    r = p.process(udp("10.0.0.1", 5000, "192.0.2.1", 53), "vm1", 0)
    sent = r.frame  # as it left: 198.51.100.7:5000 -> 192.0.2.1:53
    err = pk.build_icmp_error(sent, src_mac=EXT_MAC, src=ip("192.0.2.254"), icmp_type=3,
                              icmp_code=3)
    r2 = p.process(err, "up0", 1)
    assert (r2.verdict, r2.out_port, r2.note) == ("forward", "vm1", "related")
    h = parsed(r2.frame)
    assert (h.dst, h.icmp_type, h.dst_mac) == (ip("10.0.0.1"), 3, VM1_MAC)
    assert (h.embedded.src, h.embedded.sport) == (ip("10.0.0.1"), 5000)
    assert all(pk.verify_checksums(r2.frame).values())
    # an error about a connection nobody has is just unsolicited inbound ICMP
    other = pk.build_icmp_error(udp("198.51.100.7", 1, "192.0.2.1", 2), src_mac=EXT_MAC,
                                src=ip("192.0.2.254"), icmp_type=3, icmp_code=3)
    assert p.process(other, "up0", 2).note != "related"


@pytest.mark.parametrize("dst", ["255.255.255.255", "224.0.0.251", "ff02::16"])
def test_link_local_scope_is_never_forwarded(dst):
    p = make()
    src = "fd00::1" if ":" in dst else "10.0.0.1"
    r = p.process(udp(src, 5353, dst, 5353, dst_mac=0xFFFFFFFFFFFF), "vm1", 0)
    assert (r.verdict, r.reason) == ("drop", "link_local")
