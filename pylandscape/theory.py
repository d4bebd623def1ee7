"""Probes of the landscape theory: how degenerate are zero-loss minima, and why.

* `minimum_dimension` — the dimension of the set of global minima (Cooper 2018: generically an
  (n - d)-manifold for n parameters, d scalar equations f(x_i; θ) = y_i) is n - rank J at a zero-loss
  point; there the squared-loss Hessian is (2/N) JᵀJ, so it has the same rank and n - rank J zero
  eigenvalues. The rank, Jacobian, Hessian and Lanczos tools are generic: `pylandscape.linalg`.
* `fit_to_zero_loss` — L-BFGS then Gauss–Newton (min-norm) steps: lands on the zero-loss manifold to
  ~1e-15 residual so that "near-zero" eigenvalues are really zero, not a training artefact.
* `two_layer_relu_jacobian`, `activation_region_ranks` — Karhadkar et al. (2023): the Jacobian rank
  of a two-layer ReLU net is constant on an activation region; full rank n there means every
  differentiable critical point in the region is a global minimum.
* `feature_ranks` — Nguyen & Hein (2018): a layer with at least N units has linearly independent
  features (rank N) for almost all weights.
* `bezout_bound`, `polynomial_network_degree` — Liao & Poggio's count of zero-error solutions of a
  polynomial network by Bézout's theorem.

Everything runs on CPU; pass `device=` to batch on a GPU. Linear algebra is float64 by default.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn
from torch.func import jacrev

from .flat import flatten_module, load_flat_
from .linalg import numerical_rank, output_fn, output_jacobian, rank_tolerance, singular_values, squared_loss

__all__ = [
    "fit_to_zero_loss", "minimum_dimension",
    "two_layer_relu_jacobian", "sample_two_layer_params", "sample_1d_regions_by_count",
    "activation_region_ranks",
    "layer_features", "feature_ranks",
    "polynomial_network_degree", "bezout_bound",
]


# ---------------------------------------------------------------------------------------------
# reaching a zero-loss point, and the dimension of the minimum set there
# ---------------------------------------------------------------------------------------------

def _theta(model: nn.Module) -> torch.Tensor:
    return flatten_module(model, trainable_only=True)[0]


def fit_to_zero_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, lbfgs_steps: int = 300,
                     newton_steps: int = 30, tol: float = 1e-28, chunk_size: int | None = None) -> dict:
    """Train in place to (numerically) zero squared loss; returns {"loss", "lbfgs_steps", "newton_steps"}.

    L-BFGS brings the loss down from init; then damped Gauss–Newton steps δ = −Jᵀ(JJᵀ + μI)⁻¹ r (the
    minimum-norm step, cheap when N·outputs ≪ P) converge quadratically onto the manifold of
    solutions as long as J has full row rank, which is what makes the residual ~1e-15 and the
    Hessian's near-zero eigenvalues honest zeros. Use float64 models."""
    f = output_fn(model, x)
    target = y.reshape(-1).to(_theta(model).dtype)

    def loss_of(theta):
        return float(((f(theta) - target) ** 2).sum()) / x.shape[0]

    done_lbfgs = 0
    theta0 = _theta(model).clone()
    if lbfgs_steps > 0:
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.LBFGS(params, lr=1.0,
                                max_iter=lbfgs_steps, tolerance_grad=1e-300, tolerance_change=1e-300,
                                history_size=50, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            l_ = squared_loss(model(x), y)
            l_.backward()
            return l_
        opt.step(closure)
        done_lbfgs = opt.state[params[0]].get("n_iter", lbfgs_steps)
    theta = _theta(model)
    cur = loss_of(theta)
    if not math.isfinite(cur):  # a diverged line search: start the Gauss–Newton phase from init
        theta, cur = theta0, loss_of(theta0)
    done_newton = 0
    mu = 1e-12
    for _ in range(newton_steps):
        if cur <= tol:
            break
        j = jacrev(f, chunk_size=chunk_size)(theta).detach().to(torch.float64)
        r = (f(theta).detach() - target).to(torch.float64)
        g = j @ j.T
        eye = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
        step_ok = False
        for _try in range(12):
            try:
                delta = j.T @ torch.linalg.solve(g + mu * g.diagonal().mean() * eye, r)
            except torch.linalg.LinAlgError:  # J rank-deficient and μ too small: damp more
                mu *= 100
                continue
            cand = theta - delta.to(theta.dtype)
            new = loss_of(cand)
            if new < cur:
                theta, cur, step_ok = cand, new, True
                mu = max(mu / 10, 1e-15)
                break
            mu *= 100
        done_newton += 1
        if not step_ok:
            break
    load_flat_(model, theta, trainable_only=True)
    return {"loss": cur, "lbfgs_steps": int(done_lbfgs), "newton_steps": done_newton}


def minimum_dimension(model: nn.Module, x: torch.Tensor, *, rtol: float | None = None,
                      chunk_size: int | None = None) -> dict:
    """n − rank J at the model's current parameters, next to Cooper's n − (N·outputs).

    Returns num_params, num_equations (N·outputs), jacobian_rank, dim_estimate (= P − rank),
    dim_predicted (= P − num_equations) and the singular values of J (descending)."""
    j = output_jacobian(model, x, chunk_size=chunk_size)
    sv = singular_values(j)
    tol = rank_tolerance(sv, j.shape, dtype=j.dtype, rtol=rtol)
    r = int((sv > tol).sum())
    p, m = j.shape[1], j.shape[0]
    return {"num_params": p, "num_equations": m, "jacobian_rank": r, "dim_estimate": p - r,
            "dim_predicted": p - m, "singular_values": sv, "rank_tol": float(tol)}


# ---------------------------------------------------------------------------------------------
# activation regions of two-layer ReLU networks (Karhadkar et al.)
# ---------------------------------------------------------------------------------------------

_WRT = {"w", "wb", "wbv"}


def two_layer_relu_jacobian(w: torch.Tensor, b: torch.Tensor | None, v: torch.Tensor, x: torch.Tensor,
                            wrt: str = "w") -> torch.Tensor:
    """Closed-form Jacobian of θ ↦ (f(x_1), …, f(x_n)) for f(x) = Σ_j v_j relu(w_j·x + b_j).

    w [R, m, d0], b [R, m] or None, v [R, m] (R parameter draws, i.e. R activation regions), x [n, d0].
    Returns [R, n, cols] with column blocks ∂f/∂w (m·d0, unit-major: column j·d0 + k is w_jk), then
    ∂f/∂b (m) if wrt contains "b", then ∂f/∂v (m) if it contains "v":
    ∂f_i/∂w_jk = v_j a_ij x_ik,  ∂f_i/∂b_j = v_j a_ij,  ∂f_i/∂v_j = relu(w_j·x_i + b_j),
    with a_ij = [w_j·x_i + b_j > 0] the activation pattern that fixes the region."""
    if wrt not in _WRT:
        raise ValueError(f"wrt must be one of {sorted(_WRT)}, got {wrt!r}")
    if w.dim() != 3 or v.dim() != 2 or x.dim() != 2 or w.shape[2] != x.shape[1] or v.shape != w.shape[:2]:
        raise ValueError(f"shapes: w [R, m, d0], v [R, m], x [n, d0]; got w {tuple(w.shape)}, "
                         f"v {tuple(v.shape)}, x {tuple(x.shape)}")
    pre = torch.einsum("rmk,nk->rnm", w, x)
    if b is not None:
        pre = pre + b[:, None, :]
    a = (pre > 0).to(w.dtype)                              # [R, n, m]
    av = a * v[:, None, :]                                 # v_j a_ij
    jw = (av[..., None] * x[None, :, None, :]).flatten(2)  # [R, n, m·d0]
    blocks = [jw]
    if "b" in wrt:
        blocks.append(av)
    if "v" in wrt:
        blocks.append(pre.clamp_min(0))
    return torch.cat(blocks, dim=2)


def sample_two_layer_params(num: int, width: int, in_dim: int, *, bias: bool = True,
                            generator: torch.Generator | None = None, dtype=torch.float64, device=None):
    """R = num Gaussian draws of (w, b, v): each lands in an activation region with probability equal
    to the region's Gaussian volume, so fractions over draws are fractions "by volume"."""
    w = torch.randn(num, width, in_dim, generator=generator, dtype=dtype)
    b = torch.randn(num, width, generator=generator, dtype=dtype) if bias else None
    v = torch.randn(num, width, generator=generator, dtype=dtype)
    mv = lambda t: None if t is None else t.to(device)  # noqa: E731
    return mv(w), mv(b), mv(v)


def sample_1d_regions_by_count(x: torch.Tensor, num: int, width: int, *,
                               generator: torch.Generator | None = None, dtype=torch.float64, device=None):
    """(w [R, m, 1], b [R, m], v [R, m]) drawn uniformly over the activation regions of 1-D data x [n, 1].

    In 1-D a unit's pattern is fixed by the gap between sorted points that holds its breakpoint −b/w
    and by sign(w): 2n distinct patterns (all on, all off, and "on right of gap k" / "on left of gap
    k" for the n − 1 inner gaps). Units are independent, so a uniform pattern per unit is a uniform
    region ("by count", the measure of Karhadkar et al.'s 1-D counting results); the parameters
    realise it with w = ±1 and the breakpoint at the middle of the gap."""
    if x.dim() != 2 or x.shape[1] != 1:
        raise ValueError(f"x must be 1-D data [n, 1], got shape {tuple(x.shape)}")
    xs = torch.sort(x.reshape(-1).to(torch.float64)).values
    n = xs.numel()
    if n < 2 or bool((xs[1:] == xs[:-1]).any()):
        raise ValueError("x must hold at least two distinct points (1-D regions need generic data)")
    t = torch.cat([xs[:1] - 1, (xs[1:] + xs[:-1]) / 2, xs[-1:] + 1])  # [n + 1] breakpoints, one per gap
    u = torch.randint(0, 2 * n, (num, width), generator=generator)
    s = torch.where(u <= n, 1.0, -1.0).to(torch.float64)
    k = torch.where(u <= n, u, u - n)
    w = s[..., None]
    b = -s * t[k]
    v = torch.randn(num, width, generator=generator, dtype=torch.float64)
    return w.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype), v.to(device=device, dtype=dtype)


def activation_region_ranks(x: torch.Tensor, width: int, num_regions: int, *, wrt: str = "w",
                            bias: bool = True, sampling: str = "volume",
                            generator: torch.Generator | None = None, device=None,
                            batch: int = 256, rtol: float | None = None) -> dict:
    """Jacobian ranks over `num_regions` randomly drawn activation regions of a width-m two-layer net.

    sampling="volume": Gaussian parameters (regions weighted by their Gaussian volume);
    "count": uniform over regions, 1-D inputs only (see sample_1d_regions_by_count).
    Returns ranks (LongTensor [R]), full_rank_fraction (rank == n), num_distinct_patterns (distinct
    activation patterns among the draws), zero_row_fraction (regions where some point activates no
    unit), columns (Jacobian width) and n."""
    if x.dim() != 2:
        raise ValueError(f"x must be [n, d0], got shape {tuple(x.shape)}")
    if sampling not in ("volume", "count"):
        raise ValueError(f"sampling must be 'volume' or 'count', got {sampling!r}")
    if sampling == "count" and (x.shape[1] != 1 or not bias):
        raise ValueError("sampling='count' is implemented for 1-D inputs with biases only")
    n, d0 = x.shape
    x = x.to(device=device, dtype=torch.float64)
    ranks, patterns, zero_rows = [], set(), 0
    left = num_regions
    while left > 0:
        k = min(batch, left)
        if sampling == "count":
            w, b, v = sample_1d_regions_by_count(x, k, width, generator=generator, device=device)
        else:
            w, b, v = sample_two_layer_params(k, width, d0, bias=bias, generator=generator, device=device)
        j = two_layer_relu_jacobian(w, b, v, x, wrt=wrt)
        ranks.append(numerical_rank(j, rtol=rtol).cpu())
        pre = torch.einsum("rmk,nk->rnm", w, x) + (b[:, None, :] if b is not None else 0)
        act = pre > 0
        # a point that no unit sees gives a zero row: rank < n whatever the width·d0 count says;
        # avoiding it needs width ≳ log2(n), the logarithmic condition of Karhadkar et al.
        zero_rows += int((~act.any(dim=2)).any(dim=1).sum())
        for row in act.flatten(1).cpu().numpy():
            patterns.add(row.tobytes())
        left -= k
    ranks = torch.cat(ranks)
    cols = width * d0 + (width if "b" in wrt else 0) + (width if "v" in wrt else 0)
    return {"ranks": ranks, "full_rank_fraction": float((ranks == n).double().mean()),
            "num_distinct_patterns": len(patterns), "zero_row_fraction": zero_rows / num_regions,
            "columns": cols, "n": n}


# ---------------------------------------------------------------------------------------------
# feature matrices of every layer (Nguyen & Hein)
# ---------------------------------------------------------------------------------------------

_ACTIVATIONS = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Softplus, nn.Sigmoid, nn.Tanh,
                nn.PReLU, nn.Hardtanh, nn.ReLU6, nn.SELU, nn.CELU, nn.Mish)
_LINEAR = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@torch.no_grad()
def layer_features(model: nn.Module, x: torch.Tensor, *, modules: Iterable[str] | None = None,
                   batch_size: int = 256) -> dict[str, torch.Tensor]:
    """name → feature matrix [N, units] (a layer's output flattened per sample), in forward order.

    By default every leaf conv/linear layer (pre-activations) and every activation module
    (post-activations). A module object used twice (one nn.ReLU reused) is recorded per call,
    as "name#0", "name#1", …"""
    named = dict(model.named_modules())
    if modules is None:
        wanted = [n for n, m in named.items() if n and isinstance(m, _ACTIVATIONS + _LINEAR)]
    else:
        wanted = list(modules)
        missing = [n for n in wanted if n not in named]
        if missing:
            raise ValueError(f"no module named {', '.join(map(repr, missing))} in {type(model).__name__}")
    feats: dict[str, list] = {}
    order: list[str] = []
    calls: dict[str, int] = {}

    def hook_for(name):
        def hook(_m, _inp, out):
            c = calls.get(name, 0)
            calls[name] = c + 1
            key = name if c == 0 else f"{name}#{c}"
            if key not in feats:
                feats[key] = []
                order.append(key)
            feats[key].append(out.detach().flatten(1).to(torch.float64).cpu())
        return hook
    handles = [named[n].register_forward_hook(hook_for(n)) for n in wanted]
    try:
        for i in range(0, x.shape[0], batch_size):
            calls.clear()
            model(x[i:i + batch_size])
    finally:
        for h in handles:
            h.remove()
    return {k: torch.cat(feats[k]) for k in order}


def feature_ranks(model: nn.Module, x: torch.Tensor, *, modules: Iterable[str] | None = None,
                  rtol: float | None = None, dtype: torch.dtype | None = None,
                  batch_size: int = 256) -> list[dict]:
    """Per layer: name, kind ("pre"/"post"/"other"), units, N, rank, full (rank == min(N, units)).

    The tolerance uses eps of `dtype` (default: the model's dtype). Pass the precision the inputs
    were made in: float32 images fed to a float64 model carry float32 rounding, which would
    otherwise count as rank in linear layers."""
    dt = dtype or next(model.parameters()).dtype
    named = dict(model.named_modules())
    rows = []
    for key, f in layer_features(model, x, modules=modules, batch_size=batch_size).items():
        m = named[key.split("#")[0]]
        kind = "pre" if isinstance(m, _LINEAR) else "post" if isinstance(m, _ACTIVATIONS) else "other"
        r = numerical_rank(f, rtol=rtol, dtype=dt)
        rows.append({"layer": key, "kind": kind, "units": f.shape[1], "N": f.shape[0], "rank": r,
                     "full": r == min(f.shape)})
    return rows


# ---------------------------------------------------------------------------------------------
# Bézout count of zero-error solutions (Liao & Poggio)
# ---------------------------------------------------------------------------------------------

def polynomial_network_degree(activation_degree: int, depth: int) -> int:
    """Degree in the weights of the output of a depth-`depth` net with a polynomial activation of degree p.

    depth = number of weight layers L (a net with L − 1 hidden layers). Each layer multiplies its
    input by a weight (degree + 1) and each hidden activation raises to the p-th power, so
    deg_1 = 1, deg_{l+1} = p·deg_l + 1, i.e. deg_L = 1 + p + … + p^{L−1} = (p^L − 1)/(p − 1)
    (= L for a linear net, p = 1). Biases do not change the degree (they are degree-1 terms added to a
    degree ≥ 1 polynomial). This is an upper bound on the total degree; cancellations can lower it."""
    p, L = int(activation_degree), int(depth)
    if p < 1 or p != activation_degree:
        raise ValueError(f"activation_degree must be an integer ≥ 1, got {activation_degree!r}")
    if L < 1 or L != depth:
        raise ValueError(f"depth must be an integer ≥ 1 (number of weight layers), got {depth!r}")
    return L if p == 1 else (p ** L - 1) // (p - 1)


def bezout_bound(num_equations: int, degree_per_equation, *, num_unknowns: int | None = None):
    """Bézout's bound on the number of isolated complex solutions of f(x_i; θ) = y_i, i = 1..num_equations.

    Assumptions (Liao & Poggio's counting argument): every equation is a polynomial in θ of degree
    `degree_per_equation` (an int, or one degree per equation; see polynomial_network_degree), and
    the system is square or generic. Then the number of isolated solutions in complex projective
    space is at most Π_i deg_i = deg^num_equations (a Python int: exact, may be huge). When
    num_unknowns > num_equations, every non-empty solution set has dimension ≥ num_unknowns −
    num_equations (a variety, infinitely many solutions): then `math.inf` is returned — there are no
    isolated solutions to count, the degenerate zero-error minima of an overparametrized net."""
    m = int(num_equations)
    if m < 0 or m != num_equations:
        raise ValueError(f"num_equations must be a non-negative integer, got {num_equations!r}")
    if num_unknowns is not None and int(num_unknowns) > m:
        return math.inf
    degs = [int(degree_per_equation)] * m if isinstance(degree_per_equation, (int,)) else \
        [int(d) for d in degree_per_equation]
    if len(degs) != m:
        raise ValueError(f"degree_per_equation lists {len(degs)} degrees for {m} equations")
    if any(d < 1 for d in degs):
        raise ValueError(f"degrees must be ≥ 1, got {degs}")
    return math.prod(degs)
