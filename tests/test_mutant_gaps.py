"""The gaps hand-made mutants found (issue 10): one test per realistic one-line bug that the
suite let through, each written so that bug makes it fail.

They go through public entry points only (`Pipeline.process`, `set_policy` + `revalidate`,
`explain`, `age`, `appliance.packet`, `appliance.flows`, `appliance.timeouts`, the policy
loader, the daemon's socket), so they keep their meaning across the pipeline's refactor.
After a revalidation they look at the flow table through `explain` and at the NIC's own copy
of each entry (`MapNic`, tests/conftest.py), never by sending a packet: a packet would
revalidate its own flow on the software path and hide a revalidation that missed it.
"""

from __future__ import annotations

import socket
import time

import msgpack
import pytest
from helpers import EXT_MAC, GW_MAC, POLICY, VM1_MAC, VM2_MAC, ip, parsed, tcp, udp
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from appliance import packet as pk
from appliance.ipcproto import HEADER, MAX_REQUEST, TOO_LARGE, Client, pack
from appliance.model import mac_to_int
from appliance.policy import ConfigError, parse_policy
from appliance.timeouts import NS, TCP_ACK, TCP_SYN, TcpState, Timeouts, next_tcp_state

SYN, ACK, SYNACK = TCP_SYN, TCP_ACK, TCP_SYN | TCP_ACK
NO_SMTP = ("      - {name: no-smtp, priority: 10, match: {proto: tcp, dst_port: 25}, "
           "action: deny}")


def with_acl_outbound(*rules: str) -> str:
    """The helpers' POLICY with ``rules`` added to the acl layer's outbound set."""
    return POLICY.replace(NO_SMTP, "\n".join([NO_SMTP, *rules]))


def key_of(frame: bytes) -> tuple:
    return pk.flow_key(parsed(frame))


# --- a widened deny rule replaces a live flow it now covers ------------------------------------

NO_WEB = "      - {name: no-web, priority: 5, match: {proto: tcp, dst_port: 80}, action: deny}"
NO_WEB_WIDE = NO_WEB.replace("dst_port: 80", 'dst_port: "80-81"')
ALT_WEB = ("      - {name: alt-web, priority: 20, match: {proto: tcp, dst_port: 81}, "
           "action: allow}")


@pytest.mark.parametrize("decided_by", [(), (ALT_WEB,)], ids=["layer-default", "worse-rule"])
def test_widened_deny_rule_replaces_a_live_flow_to_the_newly_covered_port(make_pipeline,
                                                                         decided_by):
    """`dst_port 80` -> `80-81`: the modified rule is a candidate for flows it did not match
    before (policydiff), so the connection to 81 becomes a drop flow in the sweep."""
    p = make_pipeline(with_acl_outbound(NO_WEB, *decided_by))
    to_81 = tcp("10.0.0.1", 40000, "93.184.216.34", 81, flags=SYN)
    assert p.process(to_81, "vm1", 0).verdict == "forward"
    p.set_policy(parse_policy(with_acl_outbound(NO_WEB_WIDE, *decided_by)))
    assert p.revalidate(NS).replaced == 1
    r = p.explain("vm1", tcp("10.0.0.1", 40000, "93.184.216.34", 81, flags=ACK))
    assert (r.path, r.verdict, r.reason) == ("nic", "drop", "deny")
    assert [(s.layer, s.rule) for s in r.steps] == [("acl", "no-web")]
    assert p.datapath.entries[("vm1", key_of(to_81))].output is None  # the NIC drops it
    assert p.datapath.stale() == []
    # and its reply path is gone with it
    reply = tcp("93.184.216.34", 81, "198.51.100.7", 40000, flags=SYNACK, src_mac=EXT_MAC)
    assert p.flows.get(("up0", key_of(reply))) is None


# --- a stateless inbound rule that matched only the reply turns to deny ------------------------

STATELESS = """
version: 1
uplink: up0
ports:
  - {name: vm2, interface: p2, mac: "02:00:00:00:00:02", ips: ["10.0.0.2"], layers: [fw]}
layers:
  - name: fw
    stateful: false
    default: {outbound: allow, inbound: deny}
    outbound: []
    inbound:
      - {name: dns-replies, priority: 10, match: {proto: udp, src_port: 53}, action: ACTION}
"""


def test_stateless_reply_rule_turning_to_deny_stops_the_reverse_flow(make_pipeline):
    """The forward flow never consulted `dns-replies`; only the reverse flow's steps name
    it, so revalidation must judge the connection by both flows."""
    p = make_pipeline(STATELESS.replace("ACTION", "allow"))
    query = udp("10.0.0.2", 5000, "192.0.2.1", 53, src_mac=VM2_MAC)
    answer = udp("192.0.2.1", 53, "10.0.0.2", 5000, src_mac=EXT_MAC, dst_mac=VM2_MAC)
    r = p.process(query, "vm2", 0)
    assert r.verdict == "forward"
    assert [s.rule for s in r.steps] == ["default"]  # the query never met the rule
    assert p.explain("up0", answer).verdict == "forward"
    p.set_policy(parse_policy(STATELESS.replace("ACTION", "deny")))
    p.revalidate(NS)
    back = p.explain("up0", answer)
    assert (back.path, back.verdict, back.reason) == ("nic", "drop", "deny")
    assert [s.rule for s in back.steps] == ["dns-replies"]
    assert p.datapath.entries[("up0", key_of(answer))].output is None
    assert p.explain("vm2", query).verdict == "forward"  # queries still leave
    assert p.datapath.stale() == []


# --- an IP moving between ports re-evaluates its flows -----------------------------------------

VM1_IPS = 'ips: ["10.0.0.1", "fd00::1"],'
VM2_IPS = 'ips: ["10.0.0.2"],'
THREE_ON_VM2 = POLICY.replace(VM2_IPS, 'ips: ["10.0.0.2", "10.0.0.3"],')
THREE_ON_VM1 = POLICY.replace(VM1_IPS, 'ips: ["10.0.0.1", "fd00::1", "10.0.0.3"],')


def test_an_address_moving_to_another_port_moves_its_connections(make_pipeline):
    """A change of ``ips`` alone (same ports, same layers) decides where packets go and who
    may send them: inbound flows follow the address, the old owner's own flows end."""
    assert THREE_ON_VM2 != POLICY and THREE_ON_VM1 != POLICY
    p = make_pipeline(THREE_ON_VM2)
    inbound = tcp("192.0.2.9", 5000, "10.0.0.3", 8080, flags=SYN, src_mac=EXT_MAC)
    assert p.process(inbound, "up0", 0).out_port == "vm2"
    sent = udp("10.0.0.3", 6000, "192.0.2.1", 53, src_mac=VM2_MAC)
    assert p.process(sent, "vm2", 1).verdict == "forward"
    p.set_policy(parse_policy(THREE_ON_VM1))
    p.revalidate(2 * NS)
    r = p.explain("up0", tcp("192.0.2.9", 5000, "10.0.0.3", 8080, flags=ACK, src_mac=EXT_MAC))
    assert (r.path, r.verdict, r.out_port) == ("nic", "forward", "vm1")
    assert [s.port for s in r.steps] == ["vm1", "vm1", "vm1"]
    assert p.flows.get(("vm2", key_of(sent))) is None  # vm2 no longer owns 10.0.0.3
    assert ("vm2", key_of(sent)) not in p.datapath.entries
    assert p.datapath.stale() == []
    assert p.process(sent, "vm2", 3 * NS).reason == "spoofed_source"


# --- decision templates respect rules on DSCP and MACs -----------------------------------------

TEMPLATE_HEAD = """
version: 1
uplink: up0
ports:
  - {name: vm1, interface: p1, mac: "02:00:00:00:00:01", ips: ["10.0.0.1"], layers: [acl, nat],
     port_security: false}
  - {name: vm2, interface: p2, mac: "02:00:00:00:00:02", ips: ["10.0.0.2"], layers: [acl]}
layers:
"""
OTHER_MAC = mac_to_int("02:00:00:00:00:99")  # vm1 may send from it (no port security)
EXT2_MAC = mac_to_int("02:aa:00:00:00:02")
FIELD_CONDS = ["dscp: 8", "dscp: [0, 46]", "dscp: '!8'", 'src_mac: "02:00:00:00:00:99"',
               'src_mac: "!02:aa:00:00:00:01"', 'dst_mac: "02:00:00:00:00:fe"',
               'dst_mac: ["02:00:00:00:00:02", "02:00:00:00:00:01"]', "proto: udp", ""]


def template_policy(stateful: bool, inbound_default: str, out_rules: list[tuple[str, str]],
                    in_rules: list[tuple[str, str]], nat_cond: str) -> str:
    def rules(prefix: str, items: list[tuple[str, str]]) -> list[str]:
        return [f"      - {{name: {prefix}{i}, priority: {10 + i}, match: {{{cond}}}, "
                f"action: {action}}}" for i, (cond, action) in enumerate(items)] or ["      []"]

    nat_match = f"{nat_cond}, dst: '!10.0.0.0/8'" if nat_cond else "dst: '!10.0.0.0/8'"
    lines = ["  - name: acl", f"    stateful: {str(stateful).lower()}",
             f"    default: {{outbound: allow, inbound: {inbound_default}}}",
             "    outbound:", *rules("o", out_rules), "    inbound:", *rules("i", in_rules),
             "  - name: nat", "    outbound:",
             f"      - {{name: snat, priority: 10, match: {{{nat_match}}}, "
             "action: {snat: {ip: 198.51.100.7}}}"]
    text = TEMPLATE_HEAD + "\n".join(lines) + "\n"
    return text.replace("    outbound:\n      []", "    outbound: []").replace(
        "    inbound:\n      []", "    inbound: []")


@st.composite
def template_policies(draw: st.DrawFn) -> str:
    rule = st.tuples(st.sampled_from(FIELD_CONDS), st.sampled_from(["allow", "deny", "count"]))
    return template_policy(draw(st.booleans()), draw(st.sampled_from(["allow", "deny"])),
                           draw(st.lists(rule, max_size=3)), draw(st.lists(rule, max_size=3)),
                           draw(st.sampled_from(FIELD_CONDS)))


# (ingress, src, dst, proto, dport, dscp, src_mac, dst_mac): sports are added per packet
SHAPES = st.one_of(
    st.tuples(st.just("vm1"), st.just("10.0.0.1"), st.sampled_from(["192.0.2.1", "10.0.0.2"]),
              st.sampled_from([6, 17]), st.sampled_from([53, 80]),
              st.sampled_from([0, 8, 46]), st.sampled_from([VM1_MAC, OTHER_MAC]),
              st.sampled_from([GW_MAC, VM2_MAC])),
    st.tuples(st.just("vm2"), st.just("10.0.0.2"), st.just("192.0.2.1"),
              st.sampled_from([6, 17]), st.sampled_from([53, 80]),
              st.sampled_from([0, 8, 46]), st.just(VM2_MAC),
              st.sampled_from([GW_MAC, mac_to_int("02:00:00:00:00:fd")])),
    st.tuples(st.just("up0"), st.just("192.0.2.1"), st.sampled_from(["10.0.0.1", "10.0.0.2"]),
              st.sampled_from([6, 17]), st.sampled_from([53, 80]),
              st.sampled_from([0, 8, 46]), st.sampled_from([EXT_MAC, EXT2_MAC]),
              st.sampled_from([GW_MAC, VM1_MAC, VM2_MAC])),
)


def shaped_frame(shape: tuple, sport: int) -> bytes:
    _, src, dst, proto, dport, dscp, src_mac, dst_mac = shape
    return pk.build_frame(src_mac=src_mac, dst_mac=dst_mac, src=ip(src), dst=ip(dst),
                          proto=proto, sport=sport, dport=dport, dscp=dscp,
                          tcp_flags=SYN if proto == 6 else 0)


def decision(flow) -> tuple:
    """What a flow pair was decided to do: actions and steps of both directions (a step's
    lookup values as this flow reads them: connections decided by a template share its
    steps, whose values hold the template's client port)."""
    def steps(f):
        return [(s.port, s.layer, str(s.direction), s.rule, s.priority, f.lookup_values(s))
                for s in f.steps]

    rev = flow.conn.reverse if flow.conn.forward is flow else flow.conn.forward
    return (flow.key, flow.actions, steps(flow),
            None if rev is None else (rev.key, rev.actions, steps(rev)))


def check_templates_decide_like_walks(make_pipeline, policy: str, shapes: list[tuple]) -> None:
    """Every new connection of ``live`` (which reuses walks through decision templates)
    must be decided as `explain` decides it by a full walk on a pipeline with no flows."""
    live = make_pipeline(policy)
    walker = make_pipeline(policy)  # never processes a packet: its table stays empty
    for n, shape in enumerate(shapes):
        frame, ingress = shaped_frame(shape, 20000 + n), shape[0]  # every key is new
        r = live.process(frame, ingress, n)
        e = walker.explain(ingress, frame)
        assert (r.path, r.verdict, r.reason, r.out_port) == (
            "slow", e.verdict, e.reason, e.out_port), (n, shape)
        if r.flow is not None:
            assert decision(r.flow) == decision(e.flow), (n, shape)
        else:
            assert r.steps == e.steps, (n, shape)
    assert len(walker.flows) == 0


def _pair(field: str, a: object, b: object) -> list[tuple]:
    """Two packet shapes differing only in ``field`` (a, b), then ``a`` again."""
    base = {"ingress": "vm1", "src": "10.0.0.1", "dst": "192.0.2.1", "proto": 17, "dport": 53,
            "dscp": 0, "src_mac": VM1_MAC, "dst_mac": GW_MAC}
    return [tuple({**base, field: v}.values()) for v in (a, b, a)]


FIELD_CASES = [
    ("dscp", 0, 8, "dscp: 8"),
    ("src_mac", VM1_MAC, OTHER_MAC, 'src_mac: "02:00:00:00:00:99"'),
    ("dst_mac", GW_MAC, VM2_MAC, 'dst_mac: "02:00:00:00:00:02"'),
]


@pytest.mark.parametrize(("field", "a", "b", "cond"), FIELD_CASES,
                         ids=[c[0] for c in FIELD_CASES])
def test_a_template_is_not_reused_across_dscp_or_macs(make_pipeline, field, a, b, cond):
    """A template is keyed by everything but the client's port: a connection that differs
    from a remembered one in DSCP or a MAC must take its own walk."""
    policy = template_policy(True, "deny", [(cond, "deny")], [], "")
    p = make_pipeline(policy)
    results = [p.process(shaped_frame(s, 30000 + n), "vm1", n)
               for n, s in enumerate(_pair(field, a, b))]
    assert [(r.verdict, r.reason) for r in results] == [
        ("forward", None), ("drop", "deny"), ("forward", None)]
    assert p.template_hits == 1  # the third connection reused the first one's walk


@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                HealthCheck.too_slow])
@given(policy=template_policies(), shapes=st.lists(SHAPES, min_size=2, max_size=14))
@example(policy=template_policy(False, "allow", [("dscp: 8", "deny")], [], ""),
         shapes=_pair("dscp", 0, 8))
@example(policy=template_policy(True, "deny", [("dscp: [0, 46]", "count")], [], "dscp: 46"),
         shapes=_pair("dscp", 0, 46))
@example(policy=template_policy(False, "allow", [('src_mac: "02:00:00:00:00:99"', "deny")],
                                [], ""), shapes=_pair("src_mac", VM1_MAC, OTHER_MAC))
@example(policy=template_policy(True, "deny", [('dst_mac: "02:00:00:00:00:fe"', "allow")],
                                [], "proto: udp"), shapes=_pair("dst_mac", VM2_MAC, GW_MAC))
def test_templates_decide_like_full_walks_with_dscp_and_mac_rules(make_pipeline, policy,
                                                                  shapes):
    check_templates_decide_like_walks(make_pipeline, policy, shapes)


# --- expiry at exactly the deadline ------------------------------------------------------------

def test_a_connection_expires_at_exactly_its_deadline(make_pipeline):
    p = make_pipeline(timeouts=Timeouts(udp=10))
    p.process(udp("10.0.0.1", 1, "192.0.2.1", 2), "vm1", 0)
    p.age(10 * NS - 1)
    assert len(p.flows) == 2
    expired = p.age(10 * NS)  # idle for exactly the timeout: gone
    assert len(expired) == 1 and len(p.flows) == 0 and len(p.datapath) == 0


def test_a_packet_at_exactly_the_deadline_starts_a_new_connection(make_pipeline):
    p = make_pipeline(timeouts=Timeouts(udp=10))
    p.process(udp("10.0.0.1", 1, "192.0.2.1", 2), "vm1", 0)
    r = p.process(udp("10.0.0.1", 1, "192.0.2.1", 2), "vm1", 10 * NS)
    assert r.path == "slow" and p.flows.expired == 1  # idle exactly 10 s at that moment


# --- SNAT port choice at the top of the port range ---------------------------------------------

def test_snat_collision_from_port_65534_picks_65535_then_wraps(make_pipeline):
    p = make_pipeline(POLICY.replace(VM1_IPS, VM1_IPS + " allowed_sources: [10.0.0.0/24],"))
    chosen = []
    for n, inside in enumerate(["10.0.0.1", "10.0.0.9", "10.0.0.10"]):
        r = p.process(tcp(inside, 65534, "93.184.216.34", 80, flags=SYN), "vm1", n)
        assert r.verdict == "forward"
        chosen.append(parsed(r.frame).sport)
    assert chosen == [65534, 65535, 1024]  # past 65535 the search wraps to 1024
    reply = tcp("93.184.216.34", 80, "198.51.100.7", 65535, flags=SYNACK, src_mac=EXT_MAC)
    back = parsed(p.process(reply, "up0", 3).frame)
    assert (back.dst, back.dport) == (ip("10.0.0.9"), 65534)


# --- drops credited to the denying rule, not the first layer's -----------------------------------

TWO_LAYERS = """
version: 1
uplink: up0
ports:
  - {name: vm1, interface: p1, mac: "02:00:00:00:00:01", ips: ["10.0.0.1"],
     layers: [tally, guard]}
layers:
  - name: tally
    outbound:
      - {name: all-tcp, priority: 10, match: {proto: tcp}, action: count}
  - name: guard
    outbound:
      - {name: no-smtp, priority: 10, match: {proto: tcp, dst_port: 25}, action: deny}
"""


def test_drops_are_credited_to_the_rule_that_denied_in_the_second_layer(make_pipeline):
    p = make_pipeline(TWO_LAYERS, timeouts=Timeouts(drop=5))
    results = [p.process(tcp("10.0.0.1", 40000, "192.0.2.25", 25, flags=SYN), "vm1", n)
               for n in range(3)]
    assert {(r.verdict, r.reason) for r in results} == {("drop", "deny")}
    assert [(s.layer, s.rule) for s in results[0].steps] == [
        ("tally", "all-tcp"), ("guard", "no-smtp")]
    live = p.book.snapshot(p.flows)[0]
    p.age(60 * NS)
    assert len(p.flows) == 0
    retired = p.book.snapshot(p.flows)[0]
    for rules in (live, retired):
        tally = rules[("vm1", "tally", "out", "all-tcp")]
        guard = rules[("vm1", "guard", "out", "no-smtp")]
        assert (tally.packets, tally.drops) == (3, 0)
        assert (guard.packets, guard.drops) == (3, 3)


# --- SYN_RECEIVED stays on the responder's own ACK --------------------------------------------

def test_syn_received_stays_on_an_ack_from_the_responder():
    assert next_tcp_state(TcpState.SYN_RECEIVED, ACK, False) is TcpState.SYN_RECEIVED
    assert next_tcp_state(TcpState.SYN_RECEIVED, ACK, True) is TcpState.ESTABLISHED


def test_handshake_completes_only_with_the_originators_ack(make_pipeline):
    p = make_pipeline(timeouts=Timeouts(tcp_syn=7, tcp_established=100))
    p.process(tcp("10.0.0.1", 5, "10.0.0.2", 8080, flags=SYN, dst_mac=VM2_MAC), "vm1", 0)
    p.process(tcp("10.0.0.2", 8080, "10.0.0.1", 5, flags=SYNACK, src_mac=VM2_MAC,
                  dst_mac=VM1_MAC), "vm2", 1)
    conn = next(p.flows.conns())
    r = p.process(tcp("10.0.0.2", 8080, "10.0.0.1", 5, flags=ACK, src_mac=VM2_MAC,
                      dst_mac=VM1_MAC), "vm2", 2)
    assert r.verdict == "forward"
    assert conn.tcp_state is TcpState.SYN_RECEIVED
    assert p.flows.deadline_ns(conn) == 2 + 7 * NS  # still on the handshake timeout
    p.process(tcp("10.0.0.1", 5, "10.0.0.2", 8080, flags=ACK, dst_mac=VM2_MAC), "vm1", 3)
    assert conn.tcp_state is TcpState.ESTABLISHED
    assert p.flows.deadline_ns(conn) == 3 + 100 * NS


# --- interface names: at most 15 characters -----------------------------------------------------

IFNAME_ERROR = "is not an interface name (1-15 characters, no '/', ':' or whitespace)"


@pytest.mark.parametrize("where", ["uplink", "port"])
def test_a_16_character_interface_name_is_rejected(where):
    def doc(name: str) -> str:
        if where == "uplink":
            return f"version: 1\nuplink: {name}\n"
        return ("version: 1\nuplink: up0\nports:\n  - {name: vm1, interface: " + name
                + ', mac: "02:00:00:00:00:01"}\n')

    ok = parse_policy(doc("a" * 15), source="policy.yaml")
    assert "a" * 15 in (ok.uplink, *(p.interface for p in ok.ports))
    with pytest.raises(ConfigError) as info:
        parse_policy(doc("b" * 16), source="policy.yaml")
    path = "uplink" if where == "uplink" else "ports[0].interface"
    assert info.value.errors == [f"policy.yaml: {path}: {'b' * 16!r} {IFNAME_ERROR}"]


# --- incremental checksum: a sum of exactly 0x1FFFF -------------------------------------------

def test_incremental_checksum_when_the_sum_is_exactly_0x1ffff():
    """RFC 1624 eqn. 3 sums three 16-bit terms: ~HC + ~m + m' can reach 0x1FFFF, whose first
    fold gives 0x10000 and needs a second fold. Pick the new port so the sum is exactly that."""
    for sport in range(1000, 2000):
        frame = udp("10.0.0.1", sport, "192.0.2.1", 53, payload=b"boundary")
        h = parsed(frame)
        old_csum = int.from_bytes(frame[h.l4_off + 6:h.l4_off + 8], "big")
        new_port = old_csum + sport + 1
        if new_port <= 0xFFFF and new_port != sport:
            break
    else:
        raise AssertionError("no frame with a reachable 0x1FFFF sum")
    assert (~old_csum & 0xFFFF) + (~sport & 0xFFFF) + new_port == 0x1FFFF
    out = pk.rewrite(frame, h, sport=new_port)
    assert parsed(out).sport == new_port
    assert pk.verify_checksums(out) == {"ipv4": True, "udp": True}
    rebuilt = udp("10.0.0.1", new_port, "192.0.2.1", 53, payload=b"boundary")
    assert out == rebuilt  # the same bytes a from-scratch checksum gives


# --- the daemon's IPC frame limit ---------------------------------------------------------------

def hello_frame(size: int) -> bytes:
    """A ``hello`` request whose body is exactly ``size`` bytes (padded with a parameter
    hello does not take: the answer is invalid_params, from a frame the daemon read)."""
    pad = size
    while True:
        body = msgpack.packb({"id": 7, "method": "hello", "params": {"pad": b"x" * pad}},
                             use_bin_type=True)
        if len(body) == size:
            return HEADER.pack(size) + body
        pad -= len(body) - size


def read_frame(s: socket.socket) -> dict | None:
    buf = b""
    while len(buf) < HEADER.size:
        chunk = s.recv(HEADER.size - len(buf))
        if not chunk:
            return None
        buf += chunk
    (n,) = HEADER.unpack(buf)
    body = b""
    while len(body) < n:
        chunk = s.recv(n - len(body))
        assert chunk, "EOF inside a frame"
        body += chunk
    return msgpack.unpackb(body, strict_map_key=False)


@pytest.mark.kernel
def test_ipc_frame_of_exactly_the_limit_is_read_and_one_byte_more_is_refused(live_daemon):
    _, d = live_daemon
    path = str(d.config.parent / "appliance.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(hello_frame(MAX_REQUEST))
        reply = read_frame(s)
        assert reply is not None and reply["id"] == 7  # read and decoded: answered by id
        assert reply["error"]["code"] == "invalid_params" and "pad" in reply["error"]["message"]
        s.sendall(pack({"id": 8, "method": "hello", "params": {}}))
        again = read_frame(s)
        assert again is not None and again["id"] == 8 and again["ok"]  # connection kept
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        t0 = time.monotonic()
        s.sendall(HEADER.pack(MAX_REQUEST + 1) + b"\x80" * 64)  # refused from the header
        reply = read_frame(s)
        assert reply is not None and reply["id"] is None
        assert reply["error"]["code"] == TOO_LARGE
        assert read_frame(s) is None  # and the connection closed
        assert time.monotonic() - t0 < 5
    with Client(path, 10) as c:
        assert c.call("hello")["protocol"] >= 1  # the daemon serves on
