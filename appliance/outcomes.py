"""What can happen to a packet: where it was resolved, the verdict, and every drop reason.

`StrEnum`s, so the strings on the wire, in the trace tool's JSON and in the metrics stay what
they always were (a member *is* its string), while code names them instead of spelling them,
and `appliancectl reasons` / the docs can list them all from here (OPTE's ``DropReason``).
"""

from __future__ import annotations

import enum


class Path(enum.StrEnum):
    """Where a packet was resolved."""

    NIC = "nic"  # a hit in the datapath's flow cache
    HOST = "host"  # a hit in the host flow table (software path), or answered by the switch
    SLOW = "slow"  # rule evaluation (a new connection)


class Verdict(enum.StrEnum):
    FORWARD = "forward"
    DROP = "drop"


class DropReason(enum.StrEnum):
    """Why a packet was dropped (the ``reason`` of a drop, counted per port)."""

    # malformed frames (appliance.packet)
    TRUNCATED_ETH = "truncated_eth"
    MALFORMED_VLAN = "malformed_vlan"
    MALFORMED_IPV4 = "malformed_ipv4"
    MALFORMED_IPV6 = "malformed_ipv6"
    MALFORMED_TCP = "malformed_tcp"
    MALFORMED_UDP = "malformed_udp"
    MALFORMED_ICMP = "malformed_icmp"
    MALFORMED_ICMPV6 = "malformed_icmpv6"
    MALFORMED_ARP = "malformed_arp"
    MALFORMED_VXLAN = "malformed_vxlan"
    UNSUPPORTED_LINKTYPE = "unsupported_linktype"  # a capture record the trace tool can't read
    # what a frame may not claim (appliance.guard)
    MAPPED_ADDRESS = "mapped_address"
    MARTIAN_SOURCE = "martian_source"
    MARTIAN_DESTINATION = "martian_destination"
    MARTIAN_TARGET = "martian_target"
    SPOOFED_MAC = "spoofed_mac"
    SPOOFED_SOURCE = "spoofed_source"
    VLAN_NOT_ALLOWED = "vlan_not_allowed"
    LINK_LOCAL = "link_local"  # link-local scope: no router forwards it
    NON_IP = "non_ip"  # nothing to key a flow on (also a tunnel carrying non-IP)
    UNKNOWN_PORT = "unknown_port"  # an ingress that is neither a port nor the uplink
    # proxy ARP/ND (appliance.neighbors)
    ARP_NOT_REQUEST = "arp_not_request"
    ARP_NOT_OURS = "arp_not_ours"
    ND_NOT_SOLICIT = "nd_not_solicit"
    ND_NOT_OURS = "nd_not_ours"
    ND_IN_TUNNEL = "nd_in_tunnel"  # neighbour discovery never crosses, tunnelled or not
    # policy (appliance.translate)
    DENY = "deny"
    NO_PORT = "no_port"  # from the uplink, for no port
    NAT_FAMILY = "nat_family"  # a NAT address of the other family than the packet's
    ENCAP_FAMILY = "encap_family"
    ENCAP_NESTED = "encap_nested"
    NAT_EXHAUSTED = "nat_exhausted"  # no free SNAT port
    FLOW_COLLISION = "flow_collision"  # the reply key belongs to another connection
    # resources and execution (appliance.pipeline, appliance.flows)
    FLOW_LIMIT = "flow_limit"  # the host flow table is full
    PORT_FLOW_LIMIT = "port_flow_limit"  # the ingress holds its whole share of it
    METER = "meter"  # over a meter's rate
    ENCAP_TOO_BIG = "encap_too_big"  # the frame cannot fit in a VXLAN packet
    INTERNAL_ERROR = "internal_error"  # a bug, isolated to this packet (appliance.faults)
