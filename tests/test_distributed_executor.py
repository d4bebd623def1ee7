"""How train_units cuts the trajectories into tasks (pylandscape.distributed.executor.slices); no Ray
needed."""
from __future__ import annotations

import pytest

from pylandscape.distributed.executor import slices


@pytest.mark.parametrize("n,size,slots,want", [
    (8, None, 2, [4, 4]), (8, None, 3, [3, 2, 3]), (3, None, 2, [2, 1]), (5, None, 8, [1] * 5),
    (8, 1, 2, [1] * 8), (8, 3, 2, [3, 2, 3]), (7, 8, 2, [7]), (0, None, 2, []),
])
def test_slices_are_contiguous_and_cover_once(n, size, slots, want):
    got = slices(n, size, slots)
    assert [len(r) for r in got] == want
    assert [i for r in got for i in r] == list(range(n))  # contiguous, in order, each unit once
