"""layer_stats against float64 references and independent math, odd shapes, accuracy."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import PAPER_SIZES, offsets_of
from pylandscape import _reference as ref
from pylandscape import ops

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

SHAPES = {
    "paper": PAPER_SIZES,
    "empty_layers": [0, 5, 0, 0, 7, 0],
    "single_element": [1],
    "L1_odd": [65537],
    "not_vector_multiple": [3, 1, 17, 63, 65, 16385, 7],
    "chunk_edges": [16383, 16385, 32768, 1],
}


def _numpy_stats(x: np.ndarray, sizes) -> np.ndarray:
    out, a = [], 0
    for n in sizes:
        seg = x[a:a + n].astype(np.float64)
        a += n
        out.append([np.nan] * 3 if n == 0 else [seg.mean(), seg.std(), np.abs(seg).mean()])
    return np.array(out).reshape(-1, 3)


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_layer_stats_matches_float64_math(name, dtype):
    sizes = SHAPES[name]
    g = torch.Generator().manual_seed(len(sizes))
    flat = (torch.randn(sum(sizes), generator=g, dtype=torch.float64) * 0.3 - 0.2).to(dtype)
    offs = offsets_of(sizes)
    got = ops.layer_stats(flat, offs)
    assert got.dtype == torch.float64 and got.shape == (len(sizes), 3)
    want = _numpy_stats(flat.numpy(), sizes)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-15, equal_nan=True)
    np.testing.assert_allclose(ref.layer_stats(flat, offs).numpy(), want, rtol=1e-12, atol=1e-15, equal_nan=True)


def test_empty_layer_is_nan():
    st = ops.layer_stats(torch.ones(3), [0, 0, 3, 3])
    assert torch.isnan(st[0]).all() and torch.isnan(st[2]).all()
    assert st[1].tolist() == [1.0, 0.0, 1.0]


def test_large_mean_is_accurate():
    # mean 1e4, std 1e-3 in float32: naive sum-of-squares in float64 would lose most digits of the std
    g = torch.Generator().manual_seed(0)
    x = (1e4 + 1e-3 * torch.randn(200_000, generator=g, dtype=torch.float64)).to(torch.float32)
    st = ops.layer_stats(x, [0, x.numel()])
    x64 = x.double()
    want_std = float(torch.sqrt(((x64 - x64.mean()) ** 2).mean()))
    assert math.isclose(float(st[0, 1]), want_std, rel_tol=1e-9)
    assert math.isclose(float(st[0, 0]), float(x64.mean()), rel_tol=1e-14)


def test_non_contiguous_input():
    base = torch.randn(2000)
    flat = base[::2]
    assert not flat.is_contiguous()
    torch.testing.assert_close(ops.layer_stats(flat, [0, 400, 1000]), ops.layer_stats(flat.contiguous(), [0, 400, 1000]),
                               rtol=0, atol=0)


def test_stats_independent_of_threads():
    # 4 * 16,384-element chunks above the parallel grain (32 chunks): with 2+ threads the chunks are
    # split between threads (a mutation that merged each thread's chunks on its own made this fail)
    flat = torch.randn(4_200_003, generator=torch.Generator().manual_seed(0)) * 3 + 1
    offs = [0, 1_000_000, 4_200_003]
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = ops.layer_stats(flat, offs)
        torch.set_num_threads(max(n, 2))
        b = ops.layer_stats(flat, offs)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(a, b)
