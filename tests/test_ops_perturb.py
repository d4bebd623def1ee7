"""Layerwise perturbation: reference equality (bit for bit given the same sigmas), statistics,
seeding, in-place and batched forms, zero scales, and error cases."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import PAPER_SIZES, needs_ext, offsets_of
from pylandscape import _reference as ref
from pylandscape import ops

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _model(sizes, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    parts = [torch.randn(n, generator=g, dtype=torch.float64) * (0.05 * (i + 1)) + 0.01 * i
             for i, n in enumerate(sizes)]
    return torch.cat(parts).to(dtype), offsets_of(sizes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sizes", [PAPER_SIZES, [3, 0, 1, 17, 0, 65, 16385], [1, 2], [70001]])
@pytest.mark.parametrize("mode", ["std", "magnitude"])
def test_kernel_equals_reference_bitwise_given_sigmas(dtype, sizes, mode):
    flat, offs = _model(sizes, dtype)
    L = len(sizes)
    scales = torch.linspace(0.0, 0.3, L, dtype=torch.float64)
    if mode == "std":
        scales[torch.tensor(sizes) == 1] = 0.0  # a one-element layer has std 0
    m = 0 if mode == "std" else 1
    got = ops.perturb_layerwise(flat, offs, scales, mode=mode, seed=77)
    # the same noise with the kernel's own statistics: every element must match bit for bit
    sig = ref.layer_sigmas(ops.layer_stats(flat, offs), offs, scales.unsqueeze(0), m)[0]
    want = ref.apply_noise(flat, offs, sig, 77, 0)
    assert torch.equal(got, want)
    # and the full reference (its own float64 statistics) agrees to rounding
    full = ref.perturb(flat, offs, scales.unsqueeze(0), torch.tensor([77]), 0, m)[0]
    torch.testing.assert_close(got, full, rtol=1e-6 if dtype == torch.float32 else 1e-13, atol=1e-7)


def test_noise_is_sigma_times_stream():
    flat, offs = _model([1000, 3000], torch.float64)
    out = ops.perturb_layerwise(flat, offs, [0.1, 0.2], seed=5)
    st = ops.layer_stats(flat, offs)
    z = ops.philox_normal(4000, 5, 0, torch.float64)
    for l, s in enumerate([0.1, 0.2]):
        a, b = int(offs[l]), int(offs[l + 1])
        torch.testing.assert_close((out - flat)[a:b], s * float(st[l, 1]) * z[a:b], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("mode,col", [("std", 1), ("magnitude", 2)])
def test_per_layer_sample_std_within_bounds(mode, col):
    sizes = [20000, 50000, 30000]
    flat, offs = _model(sizes)
    scales = torch.tensor([0.05, 0.5, 2.0], dtype=torch.float64)
    out = ops.perturb_layerwise(flat, offs, scales, mode=mode, seed=123)
    st = ops.layer_stats(flat, offs)
    for l, n in enumerate(sizes):
        a, b = int(offs[l]), int(offs[l + 1])
        noise = (out[a:b].double() - flat[a:b].double())
        target = float(scales[l]) * float(st[l, col])
        # sample std of n normals: relative standard error 1/sqrt(2n); allow 6 of them
        assert abs(float(noise.std()) / target - 1) < 6 / math.sqrt(2 * n)
        assert abs(float(noise.mean())) < 6 * target / math.sqrt(n)


def test_seeds_and_generators():
    flat, offs = _model(PAPER_SIZES)
    a = ops.perturb_layerwise(flat, offs, 0.1, seed=1)
    assert torch.equal(a, ops.perturb_layerwise(flat, offs, 0.1, seed=1))
    assert not torch.equal(a, ops.perturb_layerwise(flat, offs, 0.1, seed=2))
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    b1 = ops.perturb_layerwise(flat, offs, 0.1, generator=g1)
    b2 = ops.perturb_layerwise(flat, offs, 0.1, generator=g2)
    assert torch.equal(b1, b2)
    assert not torch.equal(b1, ops.perturb_layerwise(flat, offs, 0.1, generator=g1))  # generator advanced
    k1 = ops.perturb_batched(flat, offs, [0.1] * 4, generator=torch.Generator().manual_seed(3))
    k2 = ops.perturb_batched(flat, offs, [0.1] * 4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(k1, k2) and not torch.equal(k1[0], k1[1])


def test_batched_rows_equal_single_and_inplace():
    flat, offs = _model([5, 100, 0, 1000, 33])
    L = 5
    scales = torch.rand(3, L, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    seeds = [11, -3, 2**62]
    out = ops.perturb_batched(flat, offs, scales, seeds=seeds)
    assert out.shape == (3, flat.numel())
    for k in range(3):
        single = ops.perturb_layerwise(flat, offs, scales[k], seed=seeds[k])
        assert torch.equal(out[k], single)
        buf = flat.clone()
        ret = ops.perturb_layerwise(buf, offs, scales[k], seed=seeds[k], inplace=True)
        assert ret is buf and torch.equal(buf, single)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batched_out_buffer_equals_fresh_and_is_reused(dtype):
    flat, offs = _model([5, 100, 0, 1000, 33], dtype)
    scales = torch.rand(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    seeds = [1, 2, 3, -4]
    fresh = ops.perturb_batched(flat, offs, scales, seeds=seeds)
    buf = torch.full((4, flat.numel()), float("nan"), dtype=dtype)
    got = ops.perturb_batched(flat, offs, scales, seeds=seeds, out=buf)
    assert got is buf and torch.equal(buf, fresh)
    # a second batch into the same buffer overwrites every element
    again = ops.perturb_batched(flat, offs, scales * 2, seeds=[5, 6, 7, 8], out=buf)
    assert again is buf and torch.equal(buf, ops.perturb_batched(flat, offs, scales * 2, seeds=[5, 6, 7, 8]))
    ref_buf = torch.empty_like(buf)
    ref.perturb_out(flat, offs, scales, torch.tensor(seeds), 0, 0, ref_buf)
    # the same noise bits; the per-layer sigmas may differ by an ulp of the statistics
    torch.testing.assert_close(ref_buf, fresh)


@pytest.mark.parametrize("bad, match", [
    (lambda f: torch.empty(3, f.numel()), r"\[K, P\] = \[4, "),
    (lambda f: torch.empty(4, f.numel(), dtype=torch.float64), "dtype"),
    (lambda f: torch.empty(f.numel(), 4).T, "contiguous"),
    (lambda f: f.view(1, -1).expand(4, -1), "contiguous|share memory"),
])
def test_batched_out_buffer_errors(bad, match):
    flat, offs = _model([10, 20])
    with pytest.raises(ValueError, match=match):
        ops.perturb_batched(flat, offs, [0.1] * 4, seeds=[1, 2, 3, 4], out=bad(flat))


@needs_ext
def test_perturb_out_kernel_refuses_overlap_and_bad_shape():
    flat, offs = _model([10, 20])
    sc = torch.full((1, 2), 0.1, dtype=torch.float64)
    with pytest.raises(ValueError, match="share memory"):
        torch.ops.pylandscape.perturb_out(flat, offs, sc, torch.tensor([1]), 0, 0, flat.view(1, -1))
    with pytest.raises(ValueError, match=r"\[K, P\]"):
        torch.ops.pylandscape.perturb_out(flat, offs, sc, torch.tensor([1]), 0, 0, torch.empty(2, 30))


def test_batched_scale_per_copy_and_large_k_small_p():
    flat, offs = _model([3, 4])
    out = ops.perturb_batched(flat, offs, torch.linspace(0, 1, 300, dtype=torch.float64), seeds=list(range(300)))
    assert out.shape == (300, 7)
    assert torch.equal(out[0], flat)  # scale 0
    assert len({tuple(r.tolist()) for r in out[1:]}) == 299


def test_zero_scale_leaves_layer_bitwise_and_noncontiguous():
    flat, offs = _model([100, 200, 300])
    flat[0] = -0.0
    out = ops.perturb_layerwise(flat, offs, [0.0, 0.3, 0.0], seed=4)
    assert torch.equal(out[:100], flat[:100]) and torch.signbit(out[0])
    assert torch.equal(out[300:], flat[300:])
    assert not torch.equal(out[100:300], flat[100:300])
    base = torch.randn(1200)
    nc = base[::2]
    torch.testing.assert_close(ops.perturb_layerwise(nc, offs, 0.1, seed=3),
                               ops.perturb_layerwise(nc.contiguous(), offs, 0.1, seed=3), rtol=0, atol=0)


def test_zero_variance_layer_errors_in_std_mode_only():
    flat = torch.cat([torch.randn(10), torch.full((5,), 2.0)])
    offs = [0, 10, 15]
    with pytest.raises(ValueError, match=r"segment 1 \(flat\[10:15\]\) has zero std"):
        ops.perturb_layerwise(flat, offs, 0.1, seed=0)
    ok = ops.perturb_layerwise(flat, offs, [0.1, 0.0], seed=0)  # scale 0 for it: fine
    assert torch.equal(ok[10:], flat[10:])
    mag = ops.perturb_layerwise(flat, offs, 0.1, mode="magnitude", seed=0)
    assert not torch.equal(mag[10:], flat[10:])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_inf_weights_error_naming_layer(bad):
    flat = torch.randn(30)
    flat[17] = bad
    with pytest.raises(ValueError, match=r"segment 1 \(flat\[10:30\]\) contains NaN or Inf"):
        ops.perturb_layerwise(flat, [0, 10, 30], 0.1, seed=0)
    with pytest.raises(ValueError, match="segment 1"):
        ops.perturb_batched(flat, [0, 10, 30], [0.1, 0.1], seeds=[1, 2])


@needs_ext
def test_kernel_checks_without_wrapper():
    # the C++ ops re-check what the wrapper checks (second line of defence): ValueError too
    flat = torch.randn(10)
    with pytest.raises(ValueError, match="offsets"):
        torch.ops.pylandscape.perturb(flat, torch.tensor([0, 11]), torch.ones(1, 1, dtype=torch.float64),
                                      torch.tensor([1]), 0, 0)
    with pytest.raises(ValueError, match="zero std"):
        torch.ops.pylandscape.perturb_(torch.ones(4), torch.tensor([0, 4]), torch.ones(1, dtype=torch.float64), 1, 0, 0)
    with pytest.raises(ValueError, match="mode"):
        torch.ops.pylandscape.perturb(flat, torch.tensor([0, 10]), torch.ones(1, 1, dtype=torch.float64),
                                      torch.tensor([1]), 0, 7)
