"""pylandscape.theory against closed-form ranks, exact eigensolvers and hand-computed Bézout counts."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from pylandscape import linalg, theory
from pylandscape.flat import flatten_module

D64 = torch.float64


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def low_rank(m, n, r, seed=0):
    g = gen(seed)
    return torch.randn(m, r, generator=g, dtype=D64) @ torch.randn(r, n, generator=g, dtype=D64)


def mlp(d0, width, out=1, act=nn.Tanh, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d0, width, bias=bias), act(), nn.Linear(width, out, bias=bias)).double()


# ------------------------------------------------------------------------------------------ rank
@pytest.mark.parametrize("m,n,r", [(7, 5, 3), (5, 9, 5), (20, 30, 1), (6, 6, 6), (40, 12, 11)])
def test_numerical_rank_matches_numpy_and_construction(m, n, r):
    a = low_rank(m, n, r, seed=m * n + r)
    assert linalg.numerical_rank(a) == r
    assert linalg.numerical_rank(a) == np.linalg.matrix_rank(a.numpy())


def test_numerical_rank_batched_zero_and_empty():
    a = torch.stack([low_rank(8, 6, r, seed=r) for r in (1, 2, 4)] + [torch.zeros(8, 6, dtype=D64)])
    assert linalg.numerical_rank(a).tolist() == [1, 2, 4, 0]
    assert linalg.numerical_rank(torch.zeros(0, 4)) == 0
    assert linalg.numerical_rank(torch.zeros(3, 5, 0)).tolist() == [0, 0, 0]


def test_numerical_rank_tolerance_follows_the_entries_precision():
    # a rank-3 matrix plus float32-sized noise: noise is rank in float64, not at float32's eps
    a = low_rank(30, 20, 3) + 1e-7 * torch.randn(30, 20, generator=gen(1), dtype=D64)
    assert linalg.numerical_rank(a) == 20
    assert linalg.numerical_rank(a, dtype=torch.float32) == 3
    assert linalg.numerical_rank(a.float()) == 3  # float32 input: its own eps
    assert linalg.numerical_rank(a, rtol=1e-4) == 3


def test_numerical_rank_rejects_vectors():
    with pytest.raises(ValueError, match="matrix"):
        linalg.numerical_rank(torch.ones(3))


# ------------------------------------------------------------------------------------ Jacobians
@pytest.mark.parametrize("d0,h,k", [(4, 2, 3), (4, 5, 3), (3, 1, 2), (5, 3, 5)])
def test_linear_network_jacobian_rank_is_tangent_dimension(d0, h, k):
    # x -> W2 W1 x: the image is the rank-≤q matrices, q = min(h, k, d0); its tangent space at a
    # generic point has dimension q(k + d0 − q), and M -> M X is injective when X has rank d0.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d0, h, bias=False), nn.Linear(h, k, bias=False)).double()
    x = torch.randn(d0 + 3, d0, generator=gen(2), dtype=D64)
    j = linalg.output_jacobian(model, x)
    assert j.shape == ((d0 + 3) * k, h * d0 + k * h)
    q = min(h, k, d0)
    assert linalg.numerical_rank(j) == q * (k + d0 - q)


def test_output_jacobian_matches_finite_differences():
    model = mlp(3, 4, out=2)
    x = torch.randn(5, 3, generator=gen(3), dtype=D64)
    theta = flatten_module(model)[0]
    f = linalg.output_fn(model, x)
    j = linalg.output_jacobian(model, x)
    e = torch.zeros_like(theta)
    for i in (0, 7, theta.numel() - 1):
        e.zero_()
        e[i] = 1e-6
        fd = (f(theta + e) - f(theta - e)) / 2e-6
        torch.testing.assert_close(j[:, i], fd, rtol=1e-6, atol=1e-8)


def test_duplicated_inputs_lower_the_rank_by_the_duplicates():
    model = mlp(3, 12)
    x = torch.randn(10, 3, generator=gen(4), dtype=D64)
    assert linalg.numerical_rank(linalg.output_jacobian(model, x)) == 10
    x_dup = torch.cat([x, x[:3]])
    assert linalg.numerical_rank(linalg.output_jacobian(model, x_dup)) == 10  # 13 rows, 3 of them repeats


def test_dead_relu_unit_contributes_nothing():
    model = mlp(3, 8, act=nn.ReLU)
    x = torch.randn(12, 3, generator=gen(5), dtype=D64)
    with torch.no_grad():
        model[0].bias[2] = -1e3  # unit 2 never active on these inputs
    j = linalg.output_jacobian(model, x)
    d0, m = 3, 8
    cols = list(range(2 * d0, 3 * d0)) + [m * d0 + 2] + [m * d0 + m + 2]  # w_2, b_2, v_2
    assert j[:, cols].abs().max() == 0
    keep = [c for c in range(j.shape[1]) if c not in cols]
    assert linalg.numerical_rank(j) == linalg.numerical_rank(j[:, keep])


def test_closed_form_two_layer_jacobian_matches_autodiff():
    d0, m, n = 3, 5, 7
    model = mlp(d0, m, act=nn.ReLU, seed=6)
    x = torch.randn(n, d0, generator=gen(6), dtype=D64)
    w = model[0].weight.detach()[None]
    b = model[0].bias.detach()[None]
    v = model[2].weight.detach()[0][None]
    j_auto = linalg.output_jacobian(model, x)  # columns: W1 (unit-major), b1, W2, b2
    for wrt, ncols in (("w", m * d0), ("wb", m * d0 + m), ("wbv", m * d0 + 2 * m)):
        j = theory.two_layer_relu_jacobian(w, b, v, x, wrt=wrt)[0]
        torch.testing.assert_close(j, j_auto[:, :ncols], rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match="wrt"):
        theory.two_layer_relu_jacobian(w, b, v, x, wrt="v")


def test_all_active_region_has_rank_of_the_data():
    # every unit active on every point: J_w = [v_1 X, ..., v_m X] has rank rank(X) ≤ d0
    n, d0, m = 12, 3, 10
    x = torch.randn(n, d0, generator=gen(7), dtype=D64)
    w = torch.randn(1, m, d0, generator=gen(8), dtype=D64)
    b = torch.full((1, m), 100.0, dtype=D64)
    v = torch.randn(1, m, generator=gen(9), dtype=D64)
    assert linalg.numerical_rank(theory.two_layer_relu_jacobian(w, b, v, x, wrt="w")) .item() == d0
    # with the biases: columns [v_j X, v_j 1] span [X, 1]
    assert linalg.numerical_rank(theory.two_layer_relu_jacobian(w, b, v, x, wrt="wb")).item() == d0 + 1


def test_activation_region_ranks_bounds_and_zero_rows():
    x = torch.randn(12, 4, generator=gen(10), dtype=D64)
    few = theory.activation_region_ranks(x, 2, 50, generator=gen(11))   # 8 columns < 12 points
    assert few["columns"] == 8 and few["full_rank_fraction"] == 0 and int(few["ranks"].max()) <= 8
    many = theory.activation_region_ranks(x, 40, 50, generator=gen(12))  # 160 columns, width ≫ log2(12)
    assert many["full_rank_fraction"] > 0.9 and many["zero_row_fraction"] == 0
    one = theory.activation_region_ranks(x, 1, 50, generator=gen(13))    # one unit leaves points unseen
    assert one["zero_row_fraction"] > 0.9


def test_1d_regions_by_count_realise_the_claimed_patterns():
    n = 6
    x = torch.sort(torch.randn(n, 1, generator=gen(14), dtype=D64), dim=0).values
    w, b, v = theory.sample_1d_regions_by_count(x, 4000, 1, generator=gen(15))
    pats = ((w[:, 0, 0:1] * x.T + b) > 0)  # [R, n]
    distinct = {tuple(p.tolist()) for p in pats}
    assert len(distinct) == 2 * n  # all on, all off, and left/right of each of the n-1 inner gaps
    for p in distinct:  # each is a contiguous run touching an end (a half-line)
        s = "".join("1" if a else "0" for a in p)
        assert s.strip("1") in ("", "0" * s.count("0")) and ("01" not in s or "10" not in s)
    counts = torch.tensor([sum(tuple(p.tolist()) == d for p in pats) for d in distinct], dtype=D64)
    assert counts.min() > 0.6 * 4000 / (2 * n)  # roughly uniform


# ---------------------------------------------------------------------------- Hessian, Lanczos
def test_hvp_matches_exact_hessian():
    model = mlp(3, 5, out=2, seed=1)
    x = torch.randn(6, 3, generator=gen(16), dtype=D64)
    y = torch.randn(6, 2, generator=gen(17), dtype=D64)
    h = linalg.loss_hessian(model, x, y)
    hvp = linalg.hvp_operator(model, x, y)
    v = torch.randn(h.shape[0], generator=gen(18), dtype=D64)
    torch.testing.assert_close(hvp(v), h @ v, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(h, h.T, rtol=1e-10, atol=1e-12)


def test_lanczos_full_run_reproduces_all_eigenvalues():
    g = gen(19)
    q, _ = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=D64))
    lam = torch.linspace(-3, 5, 40, dtype=D64)
    a = q @ torch.diag(lam) @ q.T
    ritz = linalg.lanczos_eigvalsh(lambda v: a @ v, 40, 40, generator=g)
    torch.testing.assert_close(ritz, lam, rtol=0, atol=1e-10)


def test_lanczos_extremes_converge_first():
    g = gen(20)
    q, _ = torch.linalg.qr(torch.randn(300, 300, generator=g, dtype=D64))
    lam = torch.cat([torch.rand(295, generator=g, dtype=D64), torch.tensor([5.0, 7, 10, 20, 40], dtype=D64)])
    a = q @ torch.diag(lam) @ q.T
    ritz = linalg.lanczos_eigvalsh(lambda v: a @ v, 300, 40, generator=g)
    torch.testing.assert_close(ritz[-5:], torch.sort(lam).values[-5:], rtol=1e-9, atol=0)


def test_lanczos_on_hvp_matches_exact_hessian_spectrum():
    model = mlp(3, 6, seed=2)
    x = torch.randn(5, 3, generator=gen(21), dtype=D64)
    y = torch.randn(5, generator=gen(22), dtype=D64)
    exact = linalg.hessian_spectrum(model, x, y, method="exact").eigenvalues
    p = exact.numel()
    lz = linalg.hessian_spectrum(model, x, y, method="lanczos", num_steps=p, generator=gen(23)).eigenvalues
    torch.testing.assert_close(lz, exact, rtol=0, atol=1e-9 * float(exact.abs().max()))


def test_lanczos_breaks_down_at_rank_plus_one_on_a_low_rank_matrix():
    b = low_rank(100, 100, 7, seed=3)
    a = b @ b.T  # PSD, rank 7
    res = linalg.lanczos(lambda v: a @ v, 100, 50, generator=gen(24))
    assert res.breakdown and res.alpha.numel() <= 8
    ritz = res.ritz_values()
    ev = torch.linalg.eigvalsh(a)
    torch.testing.assert_close(ritz[-7:], ev[-7:], rtol=1e-9, atol=0)


def test_lanczos_rejects_bad_sizes():
    with pytest.raises(ValueError):
        linalg.lanczos(lambda v: v, 0, 3)
    with pytest.raises(ValueError, match="v0"):
        linalg.lanczos(lambda v: v, 4, 3, v0=torch.ones(5))


# ------------------------------------------------------------------ zero-loss minima (Cooper)
@pytest.mark.parametrize("act", [nn.Tanh, nn.ReLU])
def test_zero_loss_minimum_has_dimension_n_minus_d_and_hessian_is_gauss_newton(act):
    n_pts = 12
    model = mlp(4, 10, act=act, seed=3)  # 61 parameters, 12 equations
    x = torch.randn(n_pts, 4, generator=gen(25), dtype=D64)
    y = torch.randn(n_pts, generator=gen(26), dtype=D64)
    fit = theory.fit_to_zero_loss(model, x, y, lbfgs_steps=200, newton_steps=20)
    assert fit["loss"] < 1e-24
    md = theory.minimum_dimension(model, x)
    assert md["num_params"] == 61 and md["jacobian_rank"] == n_pts and md["dim_estimate"] == 61 - n_pts
    h = linalg.loss_hessian(model, x, y)
    j = linalg.output_jacobian(model, x)
    torch.testing.assert_close(h, 2 / n_pts * j.T @ j, rtol=0, atol=1e-9 * float(h.abs().max()))
    spec = linalg.hessian_spectrum(model, x, y, method="exact")
    assert spec.rank() == n_pts  # 49 eigenvalues are zero to rounding


def test_underparametrised_net_cannot_reach_zero_loss():
    model = mlp(2, 2, seed=4)  # 9 parameters for 20 equations
    x = torch.randn(20, 2, generator=gen(27), dtype=D64)
    y = torch.randn(20, generator=gen(28), dtype=D64)
    assert theory.fit_to_zero_loss(model, x, y, lbfgs_steps=100, newton_steps=5)["loss"] > 1e-3


# -------------------------------------------------------------------- feature ranks (Nguyen & Hein)
@pytest.mark.parametrize("units", [5, 30])
def test_feature_ranks_of_a_relu_layer(units):
    n, d = 20, 3
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(d, units), nn.ReLU()).double()
    x = torch.randn(n, d, generator=gen(29), dtype=D64)
    rows = {r["layer"]: r for r in theory.feature_ranks(model, x)}
    assert rows["0"]["kind"] == "pre" and rows["0"]["rank"] == min(n, d + 1, units)  # affine in x
    assert rows["1"]["kind"] == "post" and rows["1"]["rank"] == min(n, units)        # ReLU lifts it
    with torch.no_grad():
        model[0].bias[0] = -1e3  # a dead unit: a zero column
    rows = {r["layer"]: r for r in theory.feature_ranks(model, x)}
    assert rows["1"]["rank"] == min(n, units - 1)


def test_orthogonal_features_are_full_rank_and_reused_modules_are_split():
    relu = nn.ReLU()
    model = nn.Sequential(nn.Linear(4, 4, bias=False), relu, nn.Linear(4, 4, bias=False), relu).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(4))
        model[2].weight.copy_(torch.eye(4))
    x = torch.eye(4, dtype=D64)  # orthogonal, positive: ReLU keeps them
    feats = theory.layer_features(model, x, batch_size=3)  # two batches: rows must be stitched in order
    assert list(feats) == ["0", "1", "2", "1#1"]
    torch.testing.assert_close(feats["1#1"], x)
    assert all(r["rank"] == 4 for r in theory.feature_ranks(model, x))
    with pytest.raises(ValueError, match="no module"):
        theory.layer_features(model, x, modules=["nope"])


# ---------------------------------------------------------------------------------- Bézout
def test_polynomial_network_degree_closed_form():
    assert [theory.polynomial_network_degree(1, L) for L in (1, 2, 5)] == [1, 2, 5]  # linear nets: L factors
    assert [theory.polynomial_network_degree(2, L) for L in (1, 2, 3, 4)] == [1, 3, 7, 15]
    assert theory.polynomial_network_degree(3, 2) == 4
    with pytest.raises(ValueError):
        theory.polynomial_network_degree(0, 2)
    with pytest.raises(ValueError):
        theory.polynomial_network_degree(2, 0)


@pytest.mark.parametrize("p,L", [(2, 2), (2, 3), (3, 2), (1, 3)])
def test_degree_is_the_homogeneity_of_a_monomial_network(p, L):
    # with σ(t) = t^p and no biases the output is homogeneous in the weights: f(cθ) = c^deg f(θ)
    class Pow(nn.Module):
        def forward(self, t):
            return t ** p
    layers = []
    for i in range(L):
        layers.append(nn.Linear(3, 3 if i < L - 1 else 1, bias=False))
        if i < L - 1:
            layers.append(Pow())
    torch.manual_seed(6)
    model = nn.Sequential(*layers).double()
    x = torch.randn(4, 3, generator=gen(30), dtype=D64)
    f = linalg.output_fn(model, x)
    theta = flatten_module(model)[0]
    c = 1.7
    torch.testing.assert_close(f(c * theta), c ** theory.polynomial_network_degree(p, L) * f(theta), rtol=1e-10, atol=0)


def test_bezout_bound_small_cases():
    assert theory.bezout_bound(2, 2) == 4          # two conics meet in at most 4 points
    assert theory.bezout_bound(3, 3) == 27
    assert theory.bezout_bound(2, [2, 3]) == 6     # a conic and a cubic
    assert theory.bezout_bound(0, 5) == 1          # empty system: one (the whole, 0-dim) space
    assert theory.bezout_bound(40, 3) == 3 ** 40   # exact Python int, no overflow
    assert theory.bezout_bound(2, 2, num_unknowns=2) == 4
    assert theory.bezout_bound(2, 2, num_unknowns=3) == math.inf  # underdetermined: a curve of solutions
    with pytest.raises(ValueError):
        theory.bezout_bound(2, [2])
    with pytest.raises(ValueError):
        theory.bezout_bound(-1, 2)
    with pytest.raises(ValueError):
        theory.bezout_bound(2, 0)
