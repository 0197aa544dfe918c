"""Tenant isolation (issue 9), offline: a port is who its policy says and gets only its share.

Port security, VLAN access/trunk ports, destination-chosen ports, distinct ICMP keys, flow and
fragment shares, mid-stream pickups. The kernel side is in test_tenant_isolation_live.py.
"""

from __future__ import annotations

from helpers import EXT_MAC, GW_MAC, POLICY, UPLINK_MAC, VM1_MAC, VM2_MAC, icmp_echo, ip, tcp, udp

from appliance import guard
from appliance import packet as pk
from appliance.datapath.sim import SimNic
from appliance.fragments import FRAG_PORT_MAX
from appliance.pipeline import Pipeline
from appliance.policy import parse_policy
from appliance.timeouts import NS, TcpState, Timeouts

SYN, ACK = 0x02, 0x10


def make(policy: str = POLICY, **kw) -> Pipeline:
    return Pipeline(parse_policy(policy), SimNic(), **kw)


def with_port(option: str, port: str = "vm1") -> str:
    """POLICY with ``option`` (YAML flow-mapping items) added to ``port``."""
    old = f"{{name: {port}, interface: p{port[-1]},"
    assert old in POLICY
    return POLICY.replace(old, f"{{name: {port}, {option}, interface: p{port[-1]},")


# --- 1. source guard ----------------------------------------------------------------------------

def test_a_spoofed_source_address_is_dropped_and_counted_before_the_rules():
    p = make()
    # the report: vm2 pretends to be 192.0.2.9 (inside vm1's inbound allow-list for ssh)
    r = p.process(tcp("192.0.2.9", 40000, "10.0.0.1", 22, flags=SYN, src_mac=VM2_MAC,
                      dst_mac=VM1_MAC), "vm2", NS)
    assert (r.verdict, r.reason, r.steps, r.port) == ("drop", guard.SPOOFED_SOURCE, (), "vm2")
    # ... and as vm1's own address: no reverse flow on the uplink steals vm1's replies
    r = p.process(udp("10.0.0.1", 5000, "192.0.2.1", 53, src_mac=VM2_MAC), "vm2", NS)
    assert r.reason == guard.SPOOFED_SOURCE
    assert len(p.flows) == 0
    assert p.counters.port_drops[("vm2", guard.SPOOFED_SOURCE)] == 2


def test_a_spoofed_mac_is_dropped_and_counted():
    p = make()
    r = p.process(udp("10.0.0.2", 5000, "192.0.2.1", 53, src_mac=VM1_MAC), "vm2", NS)
    assert (r.verdict, r.reason) == ("drop", guard.SPOOFED_MAC)
    assert p.counters.port_drops[("vm2", guard.SPOOFED_MAC)] == 1


def test_allowed_sources_and_the_opt_out():
    p = make(with_port("allowed_sources: [10.9.0.0/16]"))
    assert p.process(udp("10.9.1.1", 5, "192.0.2.1", 53), "vm1", NS).verdict == "forward"
    assert p.process(udp("10.8.1.1", 5, "192.0.2.1", 53), "vm1", NS).reason == \
        guard.SPOOFED_SOURCE
    router = make(with_port("port_security: false", "vm2"))
    r = router.process(udp("172.16.0.5", 5, "192.0.2.1", 53, src_mac=0x02BEEF000001), "vm2",
                       NS)
    assert r.verdict == "forward"


def test_a_port_losing_an_address_loses_its_connections_on_revalidation():
    policy = with_port("allowed_sources: [10.9.0.0/16]")
    p = make(policy)
    assert p.process(udp("10.9.1.1", 5, "192.0.2.1", 53), "vm1", NS).verdict == "forward"
    p.set_policy(parse_policy(POLICY))
    p.revalidate(2 * NS)
    assert len(p.flows) == 0
    r = p.process(udp("10.9.1.1", 5, "192.0.2.1", 53), "vm1", 3 * NS)
    assert r.reason == guard.SPOOFED_SOURCE


def test_the_destination_ip_decides_the_port_not_the_mac():
    p = make(POLICY.replace("default: {outbound: allow, inbound: deny}",
                            "default: {outbound: allow, inbound: allow}"))
    # from the uplink: vm2's MAC, vm1's IP -> vm1 (with vm1's MAC)
    r = p.process(udp("192.0.2.5", 7, "10.0.0.1", 7000, src_mac=EXT_MAC, dst_mac=VM2_MAC),
                  "up0", NS)
    assert (r.out_port, pk.parse(r.frame).dst_mac) == ("vm1", VM1_MAC)
    # to the SNAT address, addressed to vm2's MAC: nobody's (no reply key can be taken)
    r = p.process(udp("192.0.2.5", 7, "198.51.100.7", 7001, src_mac=EXT_MAC,
                      dst_mac=VM2_MAC), "up0", NS)
    assert (r.verdict, r.reason) == ("drop", "no_port")
    # ... unless the policy says so for that port
    p2 = make(with_port("steer_by_mac: true", "vm2").replace(
        "default: {outbound: allow, inbound: deny}", "default: {outbound: allow, inbound: allow}"))
    r = p2.process(udp("192.0.2.5", 7, "172.16.0.9", 7001, src_mac=EXT_MAC, dst_mac=VM2_MAC),
                   "up0", NS)
    assert r.out_port == "vm2"


# --- 2. VLANs -----------------------------------------------------------------------------------

def tagged(frame: bytes, vid: int) -> bytes:
    return pk.push_vlan(frame, vid)


def test_a_tagged_frame_from_an_access_port_is_dropped():
    p = make()
    r = p.process(tagged(udp("10.0.0.1", 5, "192.0.2.1", 53), 100), "vm1", NS)
    assert (r.verdict, r.reason) == ("drop", guard.VLAN_NOT_ALLOWED)


def test_a_trunk_keeps_its_tags_within_its_list():
    p = make(with_port('trunk: [100, "200-210"]'))
    r = p.process(tagged(udp("10.0.0.1", 5, "192.0.2.1", 53), 205), "vm1", NS)
    assert r.verdict == "forward"
    assert pk.parse(r.frame).vlan == 205  # leaves the uplink with its tag
    assert p.process(tagged(udp("10.0.0.1", 6, "192.0.2.1", 53), 300), "vm1", NS).reason == \
        guard.VLAN_NOT_ALLOWED
    assert p.process(udp("10.0.0.1", 7, "192.0.2.1", 53), "vm1", NS).verdict == "forward"


def test_tagged_frames_from_the_uplink_never_reach_an_access_port():
    p = make()
    web = tcp("192.0.2.5", 5555, "10.0.0.2", 8080, flags=SYN, src_mac=EXT_MAC,
              dst_mac=UPLINK_MAC)
    r = p.process(tagged(web, 100), "up0", NS)  # the ACL admits it; the port is access
    assert (r.verdict, r.reason) == ("drop", guard.VLAN_NOT_ALLOWED)
    assert p.process(web, "up0", NS).verdict == "forward"


def test_an_inner_tagged_tunnel_frame_never_rides_the_untagged_flow():
    p = make()
    untagged = udp("10.1.2.3", 6000, "10.0.0.1", 53, src_mac=EXT_MAC, dst_mac=VM1_MAC)
    inner_tagged = tagged(untagged, 7)

    def vx(inner: bytes) -> bytes:
        return pk.vxlan_encap(inner, vni=5001, src_ip=ip("203.0.113.2"),
                              dst_ip=ip("203.0.113.1"), src_mac=EXT_MAC, dst_mac=UPLINK_MAC,
                              src_port=50000)

    pol = POLICY.replace("default: {outbound: allow, inbound: deny}",
                         "default: {outbound: allow, inbound: allow}")
    p = make(pol)
    assert p.process(vx(untagged), "up0", NS).verdict == "forward"
    r = p.process(vx(inner_tagged), "up0", NS)
    assert r.path == "slow" and (r.verdict, r.reason) == ("drop", guard.VLAN_NOT_ALLOWED)
    assert pk.flow_key(pk.parse(vx(inner_tagged)))[6][3] == 7


# --- 3/4/5. shares ------------------------------------------------------------------------------

def test_a_bare_ack_is_unconfirmed_with_the_short_timeout_until_seen_both_ways():
    t = Timeouts(tcp_syn=30, tcp_established=3600)
    p = make(timeouts=t)
    r = p.process(tcp("10.0.0.1", 4000, "192.0.2.1", 80, flags=ACK), "vm1", 0)
    conn = r.flow.conn
    assert conn.tcp_state is TcpState.UNCONFIRMED
    p.age(31 * NS)
    assert conn.removed  # an ACK flood ages out in tcp_syn, not in an hour
    r = p.process(tcp("10.0.0.1", 4001, "192.0.2.1", 80, flags=ACK), "vm1", 40 * NS)
    back = tcp("192.0.2.1", 80, "198.51.100.7", 4001, flags=ACK, src_mac=EXT_MAC,
               dst_mac=UPLINK_MAC)
    assert p.process(back, "up0", 41 * NS).verdict == "forward"
    assert r.flow.conn.tcp_state is TcpState.ESTABLISHED


def test_fragment_state_is_capped_per_port_oldest_first():
    p = make()
    for i in range(FRAG_PORT_MAX + 10):
        first = pk.fragment_ipv4(pk.build_frame(src_mac=VM1_MAC, dst_mac=GW_MAC,
                                                src=ip("10.0.0.1"), dst=ip("192.0.2.1"),
                                                proto=17, sport=1000 + i % 50000, dport=53,
                                                payload=bytes(100), ip_id=i), 60)[0]
        p.process(first, "vm1", NS + i)
    assert p.fragments.count("vm1") == FRAG_PORT_MAX
    assert p.fragments.evictions == 10
    # another port's fragments are not touched
    f2 = pk.fragment_ipv4(pk.build_frame(src_mac=VM2_MAC, dst_mac=GW_MAC, src=ip("10.0.0.2"),
                                         dst=ip("192.0.2.1"), proto=17, sport=9, dport=53,
                                         payload=bytes(100), ip_id=7), 60)
    p.process(f2[0], "vm2", 2 * NS)
    assert p.process(f2[1], "vm2", 2 * NS).note == "fragment"


def test_a_restarting_syn_counts_as_a_new_connection_for_the_budget():
    p = make()
    syn = tcp("10.0.0.1", 4000, "192.0.2.1", 80, flags=SYN)
    assert p.starts_connection(syn, "vm1")
    p.process(syn, "vm1", NS)
    assert not p.starts_connection(syn, "vm1")  # a retransmit: no evaluation
    rst = tcp("192.0.2.1", 80, "198.51.100.7", 4000, flags=0x04, src_mac=EXT_MAC,
              dst_mac=UPLINK_MAC)
    p.process(rst, "up0", NS)
    assert p.starts_connection(syn, "vm1")  # a SYN on a reset connection: re-evaluated


# --- 6. ICMP keys -------------------------------------------------------------------------------

ICMP_POLICY = POLICY.replace(
    "      - {name: ping, priority: 30, match: {proto: [icmp, icmpv6]}, action: count}",
    "      - {name: no-ping-in, priority: 30, match: {proto: icmp}, action: deny}")


def test_an_icmp_timestamp_never_opens_the_way_for_echo_requests():
    p = make(ICMP_POLICY.replace("layers: [acl, qos]}", "layers: [acl]}"))
    ts = pk.build_frame(src_mac=VM2_MAC, dst_mac=GW_MAC, src=ip("10.0.0.2"),
                        dst=ip("192.0.2.99"), proto=1, icmp_type=13, icmp_id=0)
    assert p.process(ts, "vm2", NS).verdict == "forward"
    # the outside host pings vm2 with id 13: denied, not carried by the timestamp's flow
    ping = pk.build_frame(src_mac=EXT_MAC, dst_mac=UPLINK_MAC, src=ip("192.0.2.99"),
                          dst=ip("10.0.0.2"), proto=1, icmp_type=8, icmp_id=13)
    r = p.process(ping, "up0", NS)
    assert (r.verdict, r.path) == ("drop", "slow")
    assert r.steps[-1].rule == "no-ping-in"


def test_echo_request_and_reply_with_id_0_have_different_keys():
    req = pk.flow_key(pk.parse(icmp_echo("10.0.0.1", "192.0.2.1", ident=0)))
    rep = pk.flow_key(pk.parse(icmp_echo("10.0.0.1", "192.0.2.1", ident=0, reply=True)))
    assert req != rep
    assert pk.reverse_key(req) == pk.flow_key(pk.parse(
        icmp_echo("192.0.2.1", "10.0.0.1", ident=0, reply=True)))
