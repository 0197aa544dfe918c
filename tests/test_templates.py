"""Decision templates must decide exactly what a full layer walk decides.

Two pipelines see the same packets: one reuses walks through templates, the other always
walks. Every result, flow, reply flow and recorded step must be identical, for random
policies that do and do not look at ports.
"""

from __future__ import annotations

from helpers import EXT_MAC, VM1_MAC, VM2_MAC, tcp, udp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.datapath.sim import SimNic
from appliance.pipeline import Pipeline
from appliance.policy import parse_policy

HEAD = """
version: 1
uplink: up0
ports:
  - {name: vm1, interface: p1, mac: "02:00:00:00:00:01", ips: ["10.0.0.1"], layers: [acl, nat]}
  - {name: vm2, interface: p2, mac: "02:00:00:00:00:02", ips: ["10.0.0.2"], layers: [acl]}
layers:
"""

PORT_CONDS = ["", "src_port: 1000-1100, ", "dst_port: 80, ", "src_port: '!1050', ",
              "dst_port: 1000-1100, ", "src_port: 53, "]


@st.composite
def policies(draw) -> str:
    acl_stateful = draw(st.booleans())
    out_rules, in_rules = [], []
    for i in range(draw(st.integers(0, 3))):
        cond = draw(st.sampled_from(PORT_CONDS))
        action = draw(st.sampled_from(["allow", "deny", "count"]))
        out_rules.append(f"      - {{name: o{i}, priority: {10 + i}, match: {{{cond}proto: "
                         f"[tcp, udp]}}, action: {action}}}")
    for i in range(draw(st.integers(0, 3))):
        cond = draw(st.sampled_from(PORT_CONDS))
        action = draw(st.sampled_from(["allow", "deny"]))
        in_rules.append(f"      - {{name: i{i}, priority: {10 + i}, match: {{{cond}proto: "
                        f"[tcp, udp]}}, action: {action}}}")
    snat_port = draw(st.sampled_from(["", ", port: 40000"]))
    nat_cond = draw(st.sampled_from(PORT_CONDS))
    acl = ["  - name: acl", f"    stateful: {str(acl_stateful).lower()}",
           f"    default: {{outbound: allow, inbound: {draw(st.sampled_from(['allow', 'deny']))}}}",
           "    outbound:", *(out_rules or ["      []"][:0]), "    inbound:",
           *(in_rules or [])]
    if not out_rules:
        acl[acl.index("    outbound:")] = "    outbound: []"
    if not in_rules:
        acl[acl.index("    inbound:")] = "    inbound: []"
    nat = ["  - name: nat", "    outbound:",
           f"      - {{name: snat, priority: 10, match: {{{nat_cond}dst: '!10.0.0.0/8'}}, "
           f"action: {{snat: {{ip: 198.51.100.7{snat_port}}}}}}}",
           "    inbound:",
           "      - {name: rdr, priority: 10, match: {dst_port: 1000-1100}, action: allow}"]
    return HEAD + "\n".join(acl + nat) + "\n"


def frames(sports: list[int]) -> list[tuple[bytes, str]]:
    out = []
    for i, sp in enumerate(sports):
        make = tcp if i % 2 else udp
        out.append((make("10.0.0.1", sp, "192.0.2.1", 80), "vm1"))
        out.append((make("10.0.0.1", sp, "10.0.0.2", 80, dst_mac=VM2_MAC), "vm1"))
        out.append((make("10.0.0.2", sp, "192.0.2.1", 53, src_mac=VM2_MAC), "vm2"))
        out.append((make("192.0.2.1", 80, "198.51.100.7", sp, src_mac=EXT_MAC,
                         dst_mac=VM1_MAC), "up0"))
    return out


def snapshot(p: Pipeline, r) -> tuple:
    f = r.flow
    rev = f.reverse if f is not None and f.conn is not None else None

    def steps(fl):
        return [(s.port, s.layer, str(s.direction), s.rule, fl.lookup_values(s))
                for s in fl.steps]

    return (r.verdict, r.reason, r.out_port, r.frame, r.path,
            None if f is None else (f.key, f.actions, steps(f)),
            None if rev is None else (rev.key, rev.actions, steps(rev)))


def table(p: Pipeline) -> list:
    return sorted((repr(f.key), repr(f.actions),
                   repr([(s.rule, f.lookup_values(s)) for s in f.steps]))
                  for f in p.flows)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policy=policies(), later=policies(),
       sports=st.lists(st.integers(990, 1110), min_size=2, max_size=12))
def test_templates_decide_like_full_walks(policy, later, sports):
    pol = parse_policy(policy)
    fast = Pipeline(pol, SimNic(1 << 16))
    slow = Pipeline(pol, SimNic(1 << 16))
    slow.use_templates = False  # always the full walk
    for n, (frame, ingress) in enumerate(frames(sports)):
        a = fast.process(frame, ingress, n)
        b = slow.process(frame, ingress, n)
        assert snapshot(fast, a) == snapshot(slow, b), (policy, n)
    # and revalidation after a policy change, which may reuse walks too
    for p in (fast, slow):
        p.set_policy(parse_policy(later))
        p.revalidate(10**9)
    assert table(fast) == table(slow)


def test_templates_are_used_when_no_rule_looks_at_the_port():
    pol = parse_policy(HEAD + """  - name: acl
    stateful: true
    default: {outbound: allow, inbound: deny}
    outbound:
      - {name: no-smtp, priority: 10, match: {proto: tcp, dst_port: 25}, action: deny}
  - name: nat
    outbound:
      - {name: snat, priority: 10, match: {dst: "!10.0.0.0/8"}, action: {snat: {ip: 198.51.100.7}}}
""")
    p = Pipeline(pol, SimNic(1 << 16))
    for sp in range(2000, 2100):
        assert p.process(udp("10.0.0.1", sp, "192.0.2.1", 53), "vm1", sp).verdict == "forward"
    assert p.template_hits == 99  # all but the first connection skipped the walk
    reply = udp("192.0.2.1", 53, "198.51.100.7", 2050, src_mac=EXT_MAC)
    r = p.process(reply, "up0", 3000)
    assert (r.path, r.out_port) == ("nic", "vm1")
