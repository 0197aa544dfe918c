"""Regression: adoption left a kernel entry forwarding that no flow owned.

daemon/app.py `_adopt` kept an old kernel entry whenever the host table had a flow for its
key again, offloaded or not. When the policy changed during a headless restart so that the
re-created flow cannot run in the kernel (here: a meter, which the program cannot execute),
the flow stays on the host, and the old entry kept forwarding with the old actions: the meter
was never applied, and the entry (and, since issue 11, its TCP connection slot) belonged to
nobody. Expected: the entry is deleted; the traffic goes through the daemon, metered.
"""

from __future__ import annotations

import os

import pytest
from daemon_lab import POLICY, Daemon, lab
from nstools import udp_socket

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(not os.path.exists(
        os.path.join(os.path.dirname(__file__), "..", "appliance", "datapath", "bpf",
                     "flowcache.bpf.o")), reason="BPF object not built (tools/build-bpf.sh)"),
]

NO_SMTP = ("      - {name: no-smtp, priority: 10, match: {proto: tcp, dst_port: 25}, "
           "action: deny}")
METERED = POLICY.replace(NO_SMTP, NO_SMTP + "\n      - {name: slow, priority: 5, match: "
                         "{proto: udp, dst_port: 6600}, action: {meter: {pps: 1000, "
                         "burst: 100}}}")


def test_an_entry_the_adopted_flow_cannot_take_is_deleted(tmp_path):
    assert METERED != POLICY
    with lab(tmp_path) as the_lab:
        d = Daemon(the_lab, headless=True, name="h").start()
        cli = udp_socket(the_lab.vms[1], "10.0.0.1", 6601)
        srv = udp_socket(the_lab.ext, "192.0.2.10", 6600)
        try:
            cli.sendto(b"one", ("192.0.2.10", 6600))
            assert srv.recvfrom(100)[0] == b"one"
            assert any(k[1][5] == 6600 for k in d.kernel_flows())
            assert d.stop() == 0  # headless
            d.policy_path.write_text(METERED)  # a meter now: the kernel cannot run the flow
            d2 = Daemon(the_lab, policy=METERED, name="h")
            d2.config.write_text(d2.config.read_text().replace("headless = true",
                                                               "headless = false"))
            d2.start()
            try:
                d2.wait_event("adopted_flows")
                assert not any(k[1][5] == 6600 for k in d2.kernel_flows())
                before = d2.upcalls()
                cli.sendto(b"two", ("192.0.2.10", 6600))
                assert srv.recvfrom(100)[0] == b"two"
                assert d2.upcalls() > before  # through the daemon, which meters it
            finally:
                assert d2.stop() == 0
        finally:
            cli.close()
            srv.close()
