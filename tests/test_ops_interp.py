"""interpolate and combine: exact endpoints, bit-exact equality with the references, float64 math."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pylandscape import _reference as ref
from pylandscape import ops

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("P", [0, 1, 7, 16385, 188810])
def test_interpolate_endpoints_exact_and_matches_reference(dtype, P):
    g = torch.Generator().manual_seed(P)
    a = torch.randn(P, generator=g, dtype=dtype) * 3
    b = torch.randn(P, generator=g, dtype=dtype) + 100
    alphas = torch.tensor([0.0, 1.0, 0.25, 0.5, -0.5, 1.5, 1e-7], dtype=torch.float64)
    out = ops.interpolate(a, b, alphas)
    assert out.shape == (7, P) and out.dtype == dtype
    assert torch.equal(out[0], a) and torch.equal(out[1], b)
    assert torch.equal(out, ref.interpolate(a, b, alphas))
    exact = (1 - alphas.numpy()[:, None]) * a.double().numpy() + alphas.numpy()[:, None] * b.double().numpy()
    np.testing.assert_allclose(out.double().numpy(), exact, rtol=2e-7 if dtype == torch.float32 else 1e-15, atol=1e-12)


def test_interpolate_scalar_alpha_and_k1_and_noncontiguous():
    a = torch.randn(50)[::2]
    b = torch.randn(25)
    out = ops.interpolate(a, b, 0.5)
    assert out.shape == (1, 25)
    torch.testing.assert_close(out[0], ((0.5 * a.double()) + (0.5 * b.double())).float(), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("M,K,P", [(1, 1, 5), (3, 2, 16385), (20, 64, 1000), (5, 1024, 3), (2, 3, 0)])
def test_combine_matches_reference_and_float64(dtype, M, K, P):
    g = torch.Generator().manual_seed(M * 1000 + K)
    W = torch.randn(M, P, generator=g, dtype=torch.float64).to(dtype)
    c = torch.randn(K, M, generator=g, dtype=torch.float64)
    out = ops.combine(W, c)
    assert out.shape == (K, P) and out.dtype == dtype
    assert torch.equal(out, ref.combine(W, c))
    exact = c.numpy() @ W.double().numpy()
    np.testing.assert_allclose(out.double().numpy(), exact, rtol=1e-6 if dtype == torch.float32 else 1e-12,
                               atol=1e-6 if dtype == torch.float32 else 1e-12)


def test_combine_vector_coeffs_and_average_is_accurate():
    # averaging many nearly equal float32 models: fp64 accumulation keeps the result within one rounding
    g = torch.Generator().manual_seed(0)
    base = torch.randn(10000, generator=g)
    W = base + 1e-4 * torch.randn(100, 10000, generator=g)
    avg = ops.combine(W, torch.full((100,), 0.01, dtype=torch.float64))
    assert avg.shape == (10000,)
    exact = W.double().mean(0)
    assert float((avg.double() - exact).abs().max()) <= float(torch.finfo(torch.float32).eps) * float(exact.abs().max())


def test_combine_identity_rows_reproduce_models():
    W = torch.randn(4, 333)
    out = ops.combine(W, torch.eye(4, dtype=torch.float64))
    assert torch.equal(out, W)
