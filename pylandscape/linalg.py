"""Linear algebra shared by the theory probes and the Hessian tools.

* `singular_values`, `rank_tolerance`, `numerical_rank` — rank with the NumPy/LAPACK tolerance.
* `output_fn`, `output_jacobian`, `loss_hessian`, `hvp_operator` — a model as a function of its flat
  parameter vector θ [P] (flat.py's order), its Jacobian, its loss Hessian and Hessian-vector products
  (torch.func: any nn.Module, any loss).
* `lanczos`, `lanczos_eigvalsh`, `hessian_spectrum` — extreme eigenvalues of a symmetric operator
  given only v ↦ A v (full reorthogonalisation), and the loss Hessian's spectrum exact or by Lanczos.

Everything is float64 by default where it decides a rank.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call, jacrev

from .flat import flatten_module

__all__ = [
    "singular_values", "rank_tolerance", "numerical_rank",
    "output_fn", "output_jacobian", "squared_loss", "loss_hessian", "hvp_operator",
    "LanczosResult", "lanczos", "lanczos_many", "lanczos_eigvalsh", "HessianSpectrum", "hessian_spectrum",
]


def singular_values(a: torch.Tensor) -> torch.Tensor:
    """Singular values in float64, descending; a is [..., m, n]."""
    if a.dim() < 2:
        raise ValueError(f"expected a matrix [..., m, n], got shape {tuple(a.shape)}")
    return torch.linalg.svdvals(a.to(torch.float64))


def rank_tolerance(sv: torch.Tensor, shape: Sequence[int], *, dtype: torch.dtype = torch.float64,
                   rtol: float | None = None, atol: float = 0.0) -> torch.Tensor:
    """max(atol, rtol·σ_max) with rtol = max(m, n)·eps(dtype) by default (numpy.linalg.matrix_rank).

    `dtype` is the precision the matrix entries were computed in: a float32 Jacobian carries float32
    rounding, so its tolerance uses float32's eps even though the SVD runs in float64."""
    m, n = int(shape[-2]), int(shape[-1])
    if rtol is None:
        rtol = max(m, n) * torch.finfo(dtype).eps
    smax = sv[..., 0] if sv.shape[-1] else torch.zeros(sv.shape[:-1], dtype=sv.dtype, device=sv.device)
    return torch.clamp(smax * rtol, min=atol)


def numerical_rank(a: torch.Tensor, *, rtol: float | None = None, atol: float = 0.0,
                   dtype: torch.dtype | None = None):
    """Number of singular values above `rank_tolerance` (int, or a LongTensor for a batch [..., m, n]).

    The default eps is that of a's own dtype (float64 input → 2.2e-16); pass `dtype` to override."""
    if not isinstance(a, torch.Tensor):
        raise ValueError(f"numerical_rank expects a tensor, got {type(a).__name__}")
    if a.dim() < 2:
        raise ValueError(f"numerical_rank expects a matrix [..., m, n], got shape {tuple(a.shape)}")
    if a.shape[-1] == 0 or a.shape[-2] == 0:
        r = torch.zeros(a.shape[:-2], dtype=torch.int64)
        return int(r) if a.dim() == 2 else r
    src = dtype or (a.dtype if a.dtype.is_floating_point else torch.float64)
    sv = singular_values(a)
    tol = rank_tolerance(sv, a.shape, dtype=src, rtol=rtol, atol=atol)
    r = (sv > tol.unsqueeze(-1)).sum(-1)
    return int(r) if a.dim() == 2 else r


def _theta(model: nn.Module) -> torch.Tensor:
    """θ [P]: the trainable parameters (requires_grad) in flat.py's order."""
    flat, _ = flatten_module(model, trainable_only=True)
    if not flat.numel():
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    return flat


def _unflatten_fn(model: nn.Module):
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = [n for n, _ in named]
    shapes = [p.shape for _, p in named]
    sizes = [p.numel() for _, p in named]
    buffers = dict(model.named_buffers())

    def unflat(theta: torch.Tensor) -> dict:
        parts = torch.split(theta, sizes)
        d = {n: t.view(s) for n, t, s in zip(names, parts, shapes)}
        d.update(buffers)
        return d
    return unflat


def output_fn(model: nn.Module, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """θ [P] ↦ model outputs on x, flattened [N·outputs] (sample-major), with the model's buffers.

    The model's current train/eval mode is used: call model.eval() first if it has BatchNorm,
    otherwise the outputs of different samples are coupled through the batch statistics."""
    unflat = _unflatten_fn(model)

    def f(theta: torch.Tensor) -> torch.Tensor:
        return functional_call(model, unflat(theta), (x,)).reshape(-1)
    return f


def output_jacobian(model: nn.Module, x: torch.Tensor, *, theta: torch.Tensor | None = None,
                    chunk_size: int | None = None) -> torch.Tensor:
    """Jacobian of θ ↦ (f(x_1; θ), …, f(x_N; θ)): [N·outputs, P] in the model's dtype.

    Row i·K + k is output k of sample i. `chunk_size` bounds how many rows are back-propagated at
    once (memory ∝ chunk_size × activations)."""
    theta = _theta(model) if theta is None else theta
    return jacrev(output_fn(model, x), chunk_size=chunk_size)(theta).detach()


def squared_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(1/N) Σ_i ||f(x_i) − y_i||²: sum over outputs, mean over samples, so H = (2/N) JᵀJ at zero loss."""
    n = out.shape[0]
    return ((out - y.reshape(out.shape)) ** 2).sum() / n


def _loss_fn(model, x, y, loss):
    unflat = _unflatten_fn(model)

    def f(theta):
        return loss(functional_call(model, unflat(theta), (x,)), y)
    return f


def loss_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                 loss: Callable = squared_loss, theta: torch.Tensor | None = None) -> torch.Tensor:
    """Exact Hessian [P, P] of the loss in θ (torch.func.hessian): for small nets (P ≲ a few thousand)."""
    theta = _theta(model) if theta is None else theta
    return torch.func.hessian(_loss_fn(model, x, y, loss))(theta).detach()


def hvp_operator(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, loss: Callable = squared_loss,
                 theta: torch.Tensor | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """v [P] ↦ H v by forward-over-reverse AD: costs about two backward passes, never forms H."""
    theta = _theta(model) if theta is None else theta.detach()
    grad = torch.func.grad(_loss_fn(model, x, y, loss))

    def hvp(v: torch.Tensor) -> torch.Tensor:
        return torch.func.jvp(grad, (theta,), (v.to(theta.dtype),))[1].detach()
    return hvp


@dataclass
class LanczosResult:
    """T = tridiag(beta, alpha, beta) ≈ Qᵀ A Q; eigenvalues of T are the Ritz values."""
    alpha: torch.Tensor        # [k] float64
    beta: torch.Tensor         # [k-1] float64
    basis: torch.Tensor | None  # [k, dim] when keep_basis
    breakdown: bool            # the Krylov space became invariant: the Ritz values are exact eigenvalues

    def ritz_values(self) -> torch.Tensor:
        t = torch.diag(self.alpha)
        if self.beta.numel():
            t = t + torch.diag(self.beta, 1) + torch.diag(self.beta, -1)
        return torch.linalg.eigvalsh(t)


def lanczos(matvec: Callable[[torch.Tensor], torch.Tensor], dim: int, num_steps: int, *,
            v0: torch.Tensor | None = None, generator: torch.Generator | None = None,
            dtype: torch.dtype = torch.float64, device=None, keep_basis: bool = False,
            breakdown_rtol: float = 1e-10) -> LanczosResult:
    """Symmetric Lanczos with full reorthogonalisation (classical Gram–Schmidt, twice).

    Full reorthogonalisation keeps Q orthonormal to rounding, so no ghost copies of converged
    eigenvalues appear; it costs O(k·dim) memory, fine for k ≲ a few hundred even at dim ~ 1e6.
    Stops early when β_j ≤ breakdown_rtol·max|α|: the Krylov space is (numerically) invariant — for a
    matrix of rank r after at most r + 1 steps — and the Ritz values are eigenvalues to within β_j.
    The default 1e-10 sits well above float64 rounding (~1e-14 relative at step r + 1) so that a
    rank-r matrix plus rounding-level terms (a Hessian at a numerically exact minimum) stops there."""
    if v0 is None:
        v0 = torch.randn(dim, generator=generator, dtype=torch.float64)
    elif v0.numel() != dim:
        raise ValueError(f"lanczos: v0 has {v0.numel()} entries, expected dim={dim}")
    return lanczos_many(lambda V: matvec(V[0]).reshape(1, -1), v0.reshape(1, -1), num_steps, dtype=dtype,
                        device=device, keep_basis=keep_basis, breakdown_rtol=breakdown_rtol)[0]


def lanczos_many(matmat: Callable[[torch.Tensor], torch.Tensor], starts: torch.Tensor, num_steps: int, *,
                 dtype: torch.dtype = torch.float64, device=None, keep_basis: bool = False,
                 breakdown_rtol: float = 1e-10) -> list[LanczosResult]:
    """Independent Lanczos runs (as `lanczos`) from the rows of `starts` [R, dim], advanced together: each
    step asks matmat for the products of all live runs at once ([r, dim] -> [r, dim]), so an operator
    that shares work between vectors (a Hessian sharing one pass over the data) pays it once per step.
    A run that breaks down stops; the others go on."""
    R, dim = starts.shape
    if dim < 1 or num_steps < 1:
        raise ValueError(f"lanczos: need dim ≥ 1 and num_steps ≥ 1, got dim={dim}, num_steps={num_steps}")
    k = min(int(num_steps), int(dim))
    q = starts.to(device=device, dtype=dtype)
    q = q / torch.linalg.vector_norm(q, dim=1, keepdim=True)
    Q = torch.empty(R, k, dim, dtype=dtype, device=q.device)
    alphas: list[list[float]] = [[] for _ in range(R)]
    betas: list[list[float]] = [[] for _ in range(R)]
    scale = [0.0] * R
    breakdown = [False] * R
    live = list(range(R))
    for j in range(k):
        for r in live:
            Q[r, j] = q[r]
        W = matmat(q[live]).reshape(len(live), dim).to(dtype)
        still = []
        for i, r in enumerate(live):
            w = W[i]
            a = torch.dot(q[r], w)
            alphas[r].append(float(a))
            scale[r] = max(scale[r], abs(float(a)))
            for _ in range(2):  # twice is enough (Kahan–Parlett), once is not for clustered spectra
                w = w - Q[r, : j + 1].T @ (Q[r, : j + 1] @ w)
            b = float(torch.linalg.vector_norm(w))
            if j == k - 1:
                continue
            if b <= breakdown_rtol * max(scale[r], b, 1e-300):
                breakdown[r] = True
                continue
            betas[r].append(b)
            q[r] = w / b
            still.append(r)
        live = still
        if not live:
            break
    out = []
    for r in range(R):
        n = len(alphas[r])
        out.append(LanczosResult(torch.tensor(alphas[r], dtype=torch.float64),
                                 torch.tensor(betas[r][: n - 1], dtype=torch.float64),
                                 Q[r, :n].clone() if keep_basis else None, breakdown[r]))
    return out


def lanczos_eigvalsh(matvec, dim: int, num_steps: int, **kw) -> torch.Tensor:
    """Ritz values (ascending, float64) after `num_steps` Lanczos steps: the extreme ones converge first."""
    return lanczos(matvec, dim, num_steps, **kw).ritz_values()


@dataclass
class HessianSpectrum:
    eigenvalues: torch.Tensor  # ascending, float64 (all P for "exact"; Ritz values for "lanczos")
    method: str
    num_params: int
    breakdown: bool = False

    def rank(self, rtol: float | None = None) -> int:
        """Eigenvalues with |λ| > rtol·max|λ| (rtol = P·eps(float64) by default)."""
        ev = self.eigenvalues.abs()
        if ev.numel() == 0:
            return 0
        r = self.num_params * torch.finfo(torch.float64).eps if rtol is None else rtol
        return int((ev > r * ev.max()).sum())


def hessian_spectrum(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, method: str = "auto",
                     num_steps: int = 100, loss: Callable = squared_loss, exact_max_params: int = 3000,
                     generator: torch.Generator | None = None) -> HessianSpectrum:
    """Eigenvalues of the loss Hessian: exact eigvalsh for small nets, Lanczos (Ritz values) else."""
    theta = _theta(model)
    p = theta.numel()
    if method == "auto":
        method = "exact" if p <= exact_max_params else "lanczos"
    if method == "exact":
        h = loss_hessian(model, x, y, loss=loss, theta=theta).to(torch.float64)
        return HessianSpectrum(torch.linalg.eigvalsh((h + h.T) / 2), "exact", p)
    if method == "lanczos":
        res = lanczos(hvp_operator(model, x, y, loss=loss, theta=theta), p, num_steps,
                      generator=generator, dtype=theta.dtype, device=theta.device)
        return HessianSpectrum(res.ritz_values(), "lanczos", p, res.breakdown)
    raise ValueError(f"hessian_spectrum: method must be 'auto', 'exact' or 'lanczos', got {method!r}")
