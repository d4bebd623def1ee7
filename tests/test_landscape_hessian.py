"""Hessian estimators against closed forms: softmax regression (H = mean_i (diag p_i - p_i p_i^T) kron x_i x_i^T)
and the exact Hessian of a small network (torch.func.hessian), all in float64."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pylandscape.landscape.hessian import (
    HessianOperator,
    curvature,
    hutchinson_trace,
    layer_blocks,
    spectral_density,
    top_eigen,
)
from pylandscape.models import dcnn

pytestmark = pytest.mark.usefixtures("one_thread")


def softmax_regression(n=40, d=6, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = nn.Sequential(nn.Flatten(), nn.Linear(d, c, bias=False)).double()
    with torch.no_grad():
        m[1].weight.copy_(torch.randn(c, d, generator=g, dtype=torch.float64))
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (n,), generator=g)
    return m, x, y


def closed_form_hessian(m, x):
    """numpy float64: H[(a,i),(b,j)] = mean_n (p_a delta_ab - p_a p_b) x_i x_j for W [c, d] row-major."""
    W = m[1].weight.detach().numpy()
    X = x.numpy()
    z = X @ W.T
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    c, d = W.shape
    H = np.zeros((c * d, c * d))
    for pn, xn in zip(p, X):
        H += np.kron(np.diag(pn) - np.outer(pn, pn), np.outer(xn, xn))
    return H / len(X)


def test_products_match_the_closed_form():
    m, x, y = softmax_regression()
    H = closed_form_hessian(m, x)
    op = HessianOperator(m, x, y, batch_size=7)  # batches: the sum over batches is the full Hessian
    v = torch.randn(H.shape[0], dtype=torch.float64)
    np.testing.assert_allclose(op(v).numpy(), H @ v.numpy(), rtol=1e-11, atol=1e-13)


def test_top_eigenpairs_trace_and_density_match_the_closed_form():
    m, x, y = softmax_regression()
    H = closed_form_hessian(m, x)
    ev = np.linalg.eigvalsh(H)[::-1]
    op = HessianOperator(m, x, y)
    te = top_eigen(op, 3, steps=18)  # P = 18: Lanczos spans everything
    np.testing.assert_allclose(te.values, ev[:3], rtol=1e-9)
    assert (te.residuals < 1e-8 * ev[0]).all()
    for lam, v in zip(te.values, te.vectors.numpy()):
        np.testing.assert_allclose(H @ v, lam * v, atol=1e-8 * ev[0])
    tr = hutchinson_trace(op, 400, seed=3)
    assert abs(tr.value - np.trace(H)) < 4 * tr.stderr
    assert tr.stderr > 0
    sd = spectral_density(op, runs=3, steps=18)
    P = H.shape[0]
    # Gauss quadrature with P nodes is exact for z^T H^k z / P; averaged over probes its mean is trace(H^k) / P
    for k in (1, 2):
        assert sd.moment(k) == pytest.approx(np.trace(np.linalg.matrix_power(H, k)) / P, rel=0.25)
    grid = np.linspace(ev[-1] - 1, ev[0] + 1, 4001)
    assert np.trapezoid(sd.density(grid), grid) == pytest.approx(1.0, abs=1e-3)


def test_exact_moments_with_one_probe():
    """One Rademacher probe, full Lanczos: sum_j w_j node_j^k = z^T H^k z / ||z||^2 exactly."""
    m, x, y = softmax_regression(seed=1)
    H = closed_form_hessian(m, x)
    op = HessianOperator(m, x, y)
    sd = spectral_density(op, runs=1, steps=18, seed=5)
    g = torch.Generator().manual_seed(5)
    z = (torch.randint(0, 2, (18,), generator=g) * 2 - 1).double().numpy()
    for k in (1, 2, 3):
        want = z @ np.linalg.matrix_power(H, k) @ z / (z @ z)
        assert sd.moment(k) == pytest.approx(want, rel=1e-8)


def test_network_with_batchnorm_matches_torch_func_hessian():
    torch.manual_seed(0)
    m = dcnn(widths=(3, 4, 3, 2), num_classes=3, image_size=8).double()
    x = torch.randn(30, 3, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 3, (30,))
    op = HessianOperator(m, x, y, batch_size=11)  # BN statistics re-estimated on x, then eval mode
    names = [n for n, _ in op.m.named_parameters()]
    shapes = [p.shape for _, p in op.m.named_parameters()]
    sizes = [p.numel() for _, p in op.m.named_parameters()]
    bufs = dict(op.m.named_buffers())

    def loss(theta):
        ps = dict(zip(names, [t.view(s) for t, s in zip(torch.split(theta, sizes), shapes)]))
        return F.cross_entropy(torch.func.functional_call(op.m, (ps, bufs), (x,)), y)
    H = torch.func.hessian(loss)(op.theta.detach()).numpy()
    v = torch.randn(H.shape[0], dtype=torch.float64)
    np.testing.assert_allclose(op(v).numpy(), H @ v.numpy(), rtol=1e-9, atol=1e-12)
    # per-layer block = the diagonal block of the full Hessian
    blocks = layer_blocks(op.spec)
    assert [b[0] for b in blocks][:2] == ["layer 2 (conv1)", "layer 3 (conv2)"]
    _, a, b = blocks[1]
    bop = HessianOperator(op.m, x, y, bn="keep", block=(a, b))
    w = torch.randn(b - a, dtype=torch.float64)
    np.testing.assert_allclose(bop(w).numpy(), H[a:b, a:b] @ w.numpy(), rtol=1e-9, atol=1e-12)
    rep = curvature(m, x, y, top_k=2, trace_probes=0, density_runs=0, per_layer=True, layer_probes=0,
                    lanczos_steps=60)
    ev = np.linalg.eigvalsh((H + H.T) / 2)[::-1]
    np.testing.assert_allclose(rep.top.values, ev[:2], rtol=1e-6)
    lam_block = np.linalg.eigvalsh(H[a:b, a:b])[-1]
    assert rep.layers[1]["lambda_1"] == pytest.approx(lam_block, rel=1e-6)


def test_batched_products_and_lockstep_lanczos_equal_one_at_a_time():
    """matmat shares one forward pass and gradient graph per batch among k vectors: each row must equal
    the single product; SLQ's lockstep runs must equal linalg.lanczos run by run; the trace must not
    depend on how many probes share a pass."""
    from pylandscape.landscape.hessian import rademacher
    from pylandscape.linalg import lanczos, lanczos_many

    torch.manual_seed(0)
    m = dcnn(0.125, image_size=8).double()
    x, y = torch.randn(24, 3, 8, 8, dtype=torch.float64), torch.randint(0, 10, (24,))
    op = HessianOperator(m, x, y, batch_size=10)
    V = torch.randn(3, op.dim, dtype=torch.float64)
    HV = op.matmat(V)
    for i in range(3):
        torch.testing.assert_close(HV[i], op(V[i]), rtol=1e-12, atol=1e-14)
    gen = torch.Generator().manual_seed(5)
    starts = torch.stack([rademacher(op.dim, gen) for _ in range(3)])
    runs = lanczos_many(op.matmat, starts, 12)
    for r in range(3):
        ref = lanczos(op, op.dim, 12, v0=starts[r], dtype=torch.float64)
        torch.testing.assert_close(runs[r].alpha, ref.alpha, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(runs[r].beta, ref.beta, rtol=1e-10, atol=1e-12)
    t1 = hutchinson_trace(op, 6, seed=3, probes_per_pass=1)
    t4 = hutchinson_trace(op, 6, seed=3, probes_per_pass=4)
    np.testing.assert_allclose(t4.samples, t1.samples, rtol=1e-10)
