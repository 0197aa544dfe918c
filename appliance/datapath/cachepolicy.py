"""Which flows deserve a place in the NIC cache: replacement and admission policies.

NIC memory is small ([0049]); the host sees every packet the cache does not handle, so it
can count how often each flow comes up and decide whether it *earns* a place. The default,
`FrequencyPolicy`, is TinyLFU-style (Einziger et al., used by Caffeine):

* every packet of a flow, hit or miss, adds to the flow's frequency; all frequencies are
  halved every ``50 x capacity`` packets, so yesterday's elephants fade (10x, as in
  Caffeine, measured 1-5 points worse on Zipf traffic: tools/bench/cache.py);
* resident flows are kept in recency order (LRU);
* when the cache is full, a new flow is admitted only if it is *more frequent* than the
  least recently used resident, which is then evicted; otherwise the newcomer stays in the
  host table and tries again on its next upcall. A scan of one-packet flows therefore cannot
  flush the hot set, which plain LRU lets happen.

`LruPolicy` and `RandomPolicy` exist for comparison (tools/bench/cache.py) and as plain
choices. Policies work on opaque hashable keys and never see packets, so the simulated NIC and
the kernel datapath share them.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Hashable
from typing import Final, Protocol

AGING_FACTOR: Final = 50  # halve all frequencies every AGING_FACTOR x capacity packets


class CachePolicy(Protocol):
    name: str

    def record(self, key: Hashable) -> None:
        """A packet of this flow was seen (anywhere)."""

    def touch(self, key: Hashable) -> None:
        """A resident flow was used by the cache (hit)."""

    def admit(self, key: Hashable, resident: int, capacity: int) -> list[Hashable] | None:
        """Room for ``key``: the keys to evict (maybe none), or None to refuse it."""

    def forget(self, key: Hashable) -> None:
        """``key`` left the cache (removed, expired)."""


class LruPolicy:
    """Always admit; evict the least recently used."""

    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[Hashable, None] = OrderedDict()

    def record(self, key: Hashable) -> None:
        pass

    def touch(self, key: Hashable) -> None:
        self._order.move_to_end(key)

    def admit(self, key: Hashable, resident: int, capacity: int) -> list[Hashable] | None:
        victims: list[Hashable] = []
        while resident - len(victims) >= capacity and self._order:
            victims.append(self._order.popitem(last=False)[0])
        self._order[key] = None
        return victims

    def forget(self, key: Hashable) -> None:
        self._order.pop(key, None)


class RandomPolicy:
    """Always admit; evict a resident chosen at random (seeded for reproducibility)."""

    name = "random"

    def __init__(self, seed: int = 1) -> None:
        self._rng = random.Random(seed)
        self._keys: list[Hashable] = []
        self._pos: dict[Hashable, int] = {}

    def record(self, key: Hashable) -> None:
        pass

    def touch(self, key: Hashable) -> None:
        pass

    def admit(self, key: Hashable, resident: int, capacity: int) -> list[Hashable] | None:
        victims: list[Hashable] = []
        while resident - len(victims) >= capacity and self._keys:
            victim = self._keys[self._rng.randrange(len(self._keys))]
            self.forget(victim)
            victims.append(victim)
        self._pos[key] = len(self._keys)
        self._keys.append(key)
        return victims

    def forget(self, key: Hashable) -> None:
        i = self._pos.pop(key, None)
        if i is None:
            return
        last = self._keys.pop()
        if i < len(self._keys):
            self._keys[i] = last
            self._pos[last] = i


class FrequencyPolicy:
    """TinyLFU-style admission over an LRU order; see the module docstring."""

    name = "tinylfu"

    def __init__(self, capacity: int) -> None:
        self._order: OrderedDict[Hashable, None] = OrderedDict()
        self._freq: dict[Hashable, int] = {}
        self._events = 0
        self._period = max(64, AGING_FACTOR * capacity)

    def frequency(self, key: Hashable) -> int:
        return self._freq.get(key, 0)

    def record(self, key: Hashable) -> None:
        freq = self._freq
        freq[key] = freq.get(key, 0) + 1
        self._events += 1
        if self._events >= self._period:
            self._age()

    def _age(self) -> None:
        """Halve every frequency; flows that fall to zero are forgotten (bounded memory)."""
        self._events = 0
        self._freq = {k: v >> 1 for k, v in self._freq.items() if v > 1 or k in self._order}

    def touch(self, key: Hashable) -> None:
        self._order.move_to_end(key)

    def admit(self, key: Hashable, resident: int, capacity: int) -> list[Hashable] | None:
        victims = []
        if resident >= capacity:
            if not self._order:
                return None
            victim = next(iter(self._order))
            if self._freq.get(key, 0) <= self._freq.get(victim, 0):
                return None  # not hotter than what it would replace: stay on the host
            del self._order[victim]
            victims.append(victim)
        self._order[key] = None
        return victims

    def forget(self, key: Hashable) -> None:
        self._order.pop(key, None)


def make_policy(name: str, capacity: int) -> CachePolicy:
    """Policy by name: ``tinylfu`` (default), ``lru`` or ``random``."""
    if name == "tinylfu":
        return FrequencyPolicy(capacity)
    if name == "lru":
        return LruPolicy()
    if name == "random":
        return RandomPolicy()
    raise ValueError(f"unknown cache policy {name!r} (tinylfu, lru, random)")


POLICIES: Final = ("tinylfu", "lru", "random")
