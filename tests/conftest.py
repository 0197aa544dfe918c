"""Shared fixtures: pipelines over the helpers' policy, a NIC that keeps its own copy of each
entry, and the ``kernel`` marker for tests that need root and the built BPF object.

Most pipeline tests build ``Pipeline(parse_policy(POLICY), SimNic(...))`` by hand; new tests
ask for `make_pipeline` (or `pipeline`) instead. The kernel-lab tests each repeat the same
two ``skipif`` lines; new ones say ``@pytest.mark.kernel`` and this file skips them with the
reason when the machine cannot run them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final

import pytest
from helpers import POLICY

from appliance.actions import CompiledActions
from appliance.datapath.base import OffloadResult
from appliance.datapath.sim import SimNic
from appliance.flows import Flow
from appliance.model import ActionKind, Policy
from appliance.pipeline import Pipeline
from appliance.policy import parse_policy

ROOT: Final = Path(__file__).resolve().parents[1]
BPF_OBJECT: Final = ROOT / "appliance" / "datapath" / "bpf" / "flowcache.bpf.o"
ALL_KINDS: Final = frozenset(ActionKind)


class MapNic(SimNic):
    """A `SimNic` that also keeps what it was last told for each key, as the kernel's flow
    map holds its own encoded copy of a flow's actions.

    A `SimNic` reads the actions from the live `Flow` object, so a pipeline that changes a
    flow's actions and forgets `Datapath.update` goes unnoticed there; the kernel would go
    on executing the old entry. `stale` lists such keys.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.entries: dict[tuple, CompiledActions] = {}

    def _forget_if_gone(self, key: tuple) -> None:
        if key not in self.book.flows:
            self.entries.pop(key, None)

    def offload(self, flow: Flow, now_ns: int) -> OffloadResult:
        result = super().offload(flow, now_ns)
        for victim in result.evicted:
            self._forget_if_gone(victim.key)
        if result.ok:
            self.entries[flow.key] = flow.actions
        return result

    def update(self, flow: Flow) -> None:
        super().update(flow)
        if self.book.holds(flow):
            self.entries[flow.key] = flow.actions
        else:
            self._forget_if_gone(flow.key)

    def remove(self, flow: Flow) -> None:
        super().remove(flow)
        self._forget_if_gone(flow.key)

    def stale(self) -> list[tuple]:
        """Keys whose copy differs from the actions of the flow the cache holds for them
        (or that the cache no longer holds at all)."""
        held = self.book.flows
        return [*(self.entries.keys() ^ held.keys()),
                *(k for k, f in held.items() if k in self.entries and self.entries[k] != f.actions)]


PipelineFactory = Callable[..., Pipeline]


@pytest.fixture
def make_pipeline() -> PipelineFactory:
    """``make_pipeline(policy=POLICY, *, capacity=1024, kinds=ALL_KINDS, cache="tinylfu",
    per_port=None, **pipeline_kwargs)``: a pipeline over a fresh `MapNic`.

    ``policy`` is YAML text or a parsed `Policy`; ``pipeline_kwargs`` go to `Pipeline`
    (``timeouts``, ``max_flows``, ``port_share``). Stateless, so hypothesis tests may use it.
    """

    def make(policy: str | Policy = POLICY, *, capacity: int = 1024,
             kinds: frozenset[ActionKind] = ALL_KINDS, cache: str = "tinylfu",
             per_port: int | None = None, **pipeline_kwargs: Any) -> Pipeline:
        pol = parse_policy(policy) if isinstance(policy, str) else policy
        nic = MapNic(capacity, kinds, policy=cache, per_port=per_port)
        return Pipeline(pol, nic, **pipeline_kwargs)

    return make


@pytest.fixture
def pipeline(make_pipeline: PipelineFactory) -> Pipeline:
    """The helpers' POLICY over a `MapNic` with room for 1024 flows and every action kind."""
    return make_pipeline()


# ------------------------------------------------------------------ kernel-lab tests

def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "kernel: needs root (network namespaces, applianced) and the built BPF "
                   "object (tools/build-bpf.sh); skipped with the reason otherwise")


def _kernel_missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root for network namespaces and the kernel datapath"
    if not BPF_OBJECT.exists():
        return "BPF object not built (tools/build-bpf.sh)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _kernel_missing()
    if reason is None:
        return
    for item in items:
        if item.get_closest_marker("kernel") is not None:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="module")
def live_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Any]]:
    """(lab, daemon): the namespaces of `daemon_lab.lab` with applianced running in them,
    shared by one module's ``kernel`` tests and always torn down."""
    from daemon_lab import Daemon, lab

    with lab(tmp_path_factory.mktemp("lab")) as the_lab:
        d = Daemon(the_lab).start()
        try:
            yield the_lab, d
        finally:
            d.stop()
