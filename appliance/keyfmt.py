"""Flow keys for people and scripts: the JSON form and a one-line tcpdump-like form.

Shared by appliance-trace, the daemon's IPC methods and appliancectl.
"""

from __future__ import annotations

from typing import Any

from appliance.model import PROTO_NAMES, int_to_ip
from appliance.packet import ICMP_ECHO, ICMP_OTHER, PROTO_ICMP, PROTO_ICMPV6


def _icmp_ports(sport: int, dport: int) -> tuple[int, int, str | None]:
    """ICMP key ports as people read them: echo (id, 0) / (0, id), others (type, code)."""
    if dport == ICMP_ECHO:
        return sport, 0, "echo_request"
    if sport == ICMP_ECHO:
        return 0, dport, "echo_reply"
    if sport & ICMP_OTHER:
        return sport & 0xFF, dport, "other"
    return sport, dport, None  # a later fragment


def key_dict(key: tuple | None) -> dict[str, Any] | None:
    """The canonical flow key as JSON: proto, src, sport, dst, dport (+ icmp, vlan, tunnel).

    ICMP keys show the echo id (request: sport, reply: dport) or type/code, with ``icmp``
    naming the kind (``echo_request``, ``echo_reply``, ``other``).
    """
    if key is None:
        return None
    vlan, proto, src, sport, dst, dport, tun = key
    kind = None
    if proto in (PROTO_ICMP, PROTO_ICMPV6):
        sport, dport, kind = _icmp_ports(sport, dport)
    d: dict[str, Any] = {
        "proto": PROTO_NAMES.get(proto, proto),
        "src": str(int_to_ip(src)),
        "sport": sport,
        "dst": str(int_to_ip(dst)),
        "dport": dport,
    }
    if kind is not None:
        d["icmp"] = kind
    if vlan is not None:
        d["vlan"] = vlan
    if tun is not None:
        d["tunnel"] = {"src": str(int_to_ip(tun[0])), "dst": str(int_to_ip(tun[1])),
                       "vni": tun[2]}
        if tun[3] is not None:
            d["tunnel"]["inner_vlan"] = tun[3]
    return d


def key_text(key: tuple | None) -> str:
    """``tcp 10.0.0.1.40000 > 192.0.2.1.80`` (tcpdump-like), tunnel and VLAN in front."""
    return dict_text(key_dict(key))


def dict_text(d: dict[str, Any] | None) -> str:
    """The one-line form of a `key_dict` (what clients get over IPC)."""
    if not d:
        return "-"
    s = f"{d['proto']} {d['src']}.{d['sport']} > {d['dst']}.{d['dport']}"
    if "icmp" in d:
        s += f" ({d['icmp'].replace('_', ' ')})"
    if "tunnel" in d:
        t = d["tunnel"]
        inner = f" vlan {t['inner_vlan']}" if "inner_vlan" in t else ""
        s = f"vxlan(vni {t['vni']} {t['src']} > {t['dst']}{inner}) " + s
    if "vlan" in d:
        s = f"vlan {d['vlan']} " + s
    return s
