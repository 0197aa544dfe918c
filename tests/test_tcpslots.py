"""Connection slot allocation (`appliance.datapath.tcpslots`), on a stand-in for the array.

The kernel array is memory-mapped with 8-byte elements; a memfd of the same size stands in
for it here, so no BPF is needed.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from appliance.datapath.tcpslots import ELEM_STRIDE, ConnSlots


@pytest.fixture
def slots():
    size = 6  # slots 1..5 usable
    fd = os.memfd_create("conns")
    os.ftruncate(fd, 4096)
    s = ConnSlots(SimpleNamespace(fd=fd, max_entries=size, value_size=4))
    try:
        yield s, fd
    finally:
        s.close()
        os.close(fd)


def test_slots_are_handed_out_first_in_first_out(slots):
    s, _ = slots
    assert [s.take() for _ in range(5)] == [1, 2, 3, 4, 5]
    assert s.take() == 0 and s.free == 0  # none left (slot 0 is never handed out)
    s.give(2)
    s.give(4)
    assert [s.take(), s.take(), s.take()] == [2, 4, 0]
    s.give(1)
    s.give(3)
    s.give(5)
    s.give(2)
    # a freed slot comes back only after every slot freed before it
    assert [s.take() for _ in range(4)] == [1, 3, 5, 2]


def test_giving_back_what_was_not_taken_is_a_bug(slots):
    s, _ = slots
    with pytest.raises(ValueError):
        s.give(0)
    with pytest.raises(ValueError):
        s.give(1)  # every slot is free already


def test_keep_only_leaves_slots_in_use_out_of_the_pool(slots):
    s, _ = slots
    s.keep_only({2, 5})
    assert s.free == 3
    assert [s.take() for _ in range(4)] == [1, 3, 4, 0]
    s.give(5)
    assert s.take() == 5


def test_slot_values_sit_at_the_arrays_element_stride(slots):
    s, fd = slots
    s.write(3, 0x1B12)
    raw = os.pread(fd, 4, 3 * ELEM_STRIDE)
    assert int.from_bytes(raw, "little") == 0x1B12 and s.read(3) == 0x1B12
    os.pwrite(fd, (0x0412).to_bytes(4, "little"), 4 * ELEM_STRIDE)  # "the program" ORs
    assert s.read(4) == 0x0412
