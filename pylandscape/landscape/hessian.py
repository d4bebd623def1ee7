"""Curvature of the training loss at one weight vector: Hessian-vector products, top eigenpairs
(Lanczos), trace (Hutchinson) and spectral density (stochastic Lanczos quadrature), for the whole
model or one layer's block of the Hessian.

The loss is the mean cross-entropy over the given images (x [N, ...], y [N]); the Hessian is the
exact second derivative of that function of the weights, accumulated over batches (H = sum_b n_b/N H_b),
with the network in eval mode so samples do not interact: BatchNorm uses running statistics, which
`bn="reestimate"` (default) first recomputes exactly on x for these weights (pylandscape.evaluate),
`bn="keep"` takes from the model as given. PyHessian uses eval mode too.

Products are reverse-over-reverse autograd through `torch.func.functional_call` on one flat leaf
theta [P]; `dtype=torch.float64` evaluates the whole network in float64.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..evaluate import reestimate_bn_
from ..flat import ParamSpec, flatten_module
from ..linalg import lanczos, lanczos_many
from .batched import bn_layers

HESSIAN_BN = ("reestimate", "keep")


class HessianOperator:
    """v [P] -> H v for the mean cross-entropy of `model` on (x, y) at its current weights.

    model is copied (and converted to dtype); `block` = (start, stop) restricts the operator to one
    diagonal block H[start:stop, start:stop] (a layer), acting on vectors of length stop - start.
    """

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, bn: str = "reestimate",
                 batch_size: int = 500, dtype: torch.dtype | None = None,
                 block: tuple[int, int] | None = None):
        if bn not in HESSIAN_BN:
            raise ValueError(f"bn must be one of {HESSIAN_BN} for the Hessian (train-mode BatchNorm couples "
                             f"the samples of a batch), got {bn!r}")
        if y.dim() != 1 or y.shape[0] != x.shape[0] or x.shape[0] == 0:
            raise ValueError(f"labels y must be [N={x.shape[0]}] with N >= 1, got {tuple(y.shape)}")
        m = copy.deepcopy(model)
        if dtype is not None:
            m = m.to(dtype)
        dt = next(m.parameters()).dtype
        self.x, self.y = x.to(dt), y
        if bn == "reestimate" and bn_layers(m):
            reestimate_bn_(m, self.x, batch_size)
        self.m = m.eval()
        self.theta, self.spec = flatten_module(m)
        self.buffers = dict(m.named_buffers())
        self.batch_size = int(batch_size)
        self.block = block
        self.num_products = 0
        P = self.theta.numel()
        a, b = block if block is not None else (0, P)
        if not 0 <= a < b <= P:
            raise ValueError(f"block {block} outside 0..{P}")
        self.dim = b - a
        self.dtype = dt

    def _params(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        out, start = {}, 0
        for name, shape, n in zip(self.spec.names, self.spec.shapes, self.spec.sizes):
            out[name] = theta[start:start + n].view(shape)
            start += n
        return out

    def loss(self) -> float:
        with torch.no_grad():
            tot = 0.0
            for s in range(0, self.x.shape[0], self.batch_size):
                out = functional_call(self.m, (self._params(self.theta), self.buffers), (self.x[s:s + self.batch_size],))
                tot += float(F.cross_entropy(out, self.y[s:s + self.batch_size], reduction="sum"))
        return tot / self.x.shape[0]

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        return self.matmat(v.reshape(1, -1))[0]

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """H V^T for k vectors V [k, dim] -> [k, dim]. Per batch of images, the forward pass and the
        gradient's graph are built once and every vector reuses them (one more backward pass each):
        k products cost about one forward, one first-order backward and k second-order backwards
        instead of k of each. Each row equals op(V[i]) (the same operations in the same order)."""
        a, b = self.block if self.block is not None else (0, self.theta.numel())
        V = V.to(self.dtype)
        if V.dim() != 2 or V.shape[1] != self.dim:
            raise ValueError(f"vectors have shape {tuple(V.shape)}, the operator acts on [k, {self.dim}]")
        k, n = V.shape[0], self.x.shape[0]
        out = torch.zeros(k, self.dim, dtype=self.dtype, device=self.theta.device)
        for s in range(0, n, self.batch_size):
            theta = self.theta.detach().clone().requires_grad_(True)
            logits = functional_call(self.m, (self._params(theta), self.buffers), (self.x[s:s + self.batch_size],))
            loss = F.cross_entropy(logits, self.y[s:s + self.batch_size], reduction="sum") / n
            (g,) = torch.autograd.grad(loss, theta, create_graph=True)
            for i in range(k):
                (hv,) = torch.autograd.grad(torch.dot(g[a:b], V[i]), theta, retain_graph=i < k - 1)
                out[i] += hv[a:b].detach()
        self.num_products += k
        return out


def layer_blocks(spec: ParamSpec) -> list[tuple[str, int, int]]:
    """(name, start, stop) of each layer: a module's weight with its bias (contiguous in flat order),
    named as the paper numbers them for our networks ("layer 2" = the first conv/linear); tensors that
    belong to no such module (e.g. BatchNorm affine parameters) form blocks of their own."""
    offs = spec.offsets.tolist()
    groups: list[tuple[str, list[int]]] = []
    seen: set[int] = set()
    k = 2
    for i, (name, shape) in enumerate(zip(spec.names, spec.shapes)):
        if i in seen:
            continue
        mod = name.rsplit(".", 1)[0] if "." in name else ""
        if name.endswith("weight") and len(shape) >= 2:
            idx = [i] + [j for j in (i + 1,) if j < len(spec) and spec.names[j] == f"{mod}.bias"]
            groups.append((f"layer {k} ({mod})", idx))
            k += 1
        else:
            idx = [i]
            groups.append((name, idx))
        seen.update(idx)
    return [(g, offs[min(ix)], offs[max(ix) + 1]) for g, ix in groups]


# --------------------------------------------------------------------------------------- estimators
@dataclass
class TopEigen:
    values: np.ndarray          # [k] descending
    vectors: torch.Tensor       # [k, dim]
    residuals: np.ndarray       # [k] ||H v - lambda v|| (one extra product each)
    steps: int


def top_eigen(op, k: int = 1, *, steps: int | None = None, seed: int = 0, residuals: bool = True) -> TopEigen:
    """The k largest (algebraic) eigenpairs by Lanczos with full reorthogonalisation from a random start."""
    steps = int(steps or max(2 * k + 20, 30))
    gen = torch.Generator().manual_seed(int(seed))
    v0 = torch.randn(op.dim, generator=gen, dtype=torch.float64)
    res = lanczos(op, op.dim, steps, v0=v0, dtype=torch.float64, device=op.theta.device, keep_basis=True)
    T = torch.diag(res.alpha)
    if res.beta.numel():
        T = T + torch.diag(res.beta, 1) + torch.diag(res.beta, -1)
    vals, vecs = torch.linalg.eigh(T)
    order = torch.argsort(vals, descending=True)[:k]
    V = (vecs[:, order].T.to(res.basis.dtype) @ res.basis)  # [k, dim]
    lam = vals[order].numpy()
    r = np.full(len(lam), np.nan)
    if residuals and len(lam):
        HV = _matmat(op, V).double()
        for i in range(len(lam)):
            r[i] = float(torch.linalg.vector_norm(HV[i] - lam[i] * V[i].double()))
    return TopEigen(lam, V, r, len(res.alpha))


@dataclass
class TraceEstimate:
    value: float
    stderr: float
    probes: int
    samples: np.ndarray = field(repr=False)


def rademacher(n: int, gen: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    return (torch.randint(0, 2, (n,), generator=gen) * 2 - 1).to(dtype)


def _matmat(op, V: torch.Tensor) -> torch.Tensor:
    """op.matmat(V) when the operator has one (HessianOperator), else one product per row."""
    if hasattr(op, "matmat"):
        return op.matmat(V)
    return torch.stack([op(v) for v in V])


def hutchinson_trace(op, probes: int = 100, *, seed: int = 0, probes_per_pass: int = 8) -> TraceEstimate:
    """trace(H) ~ mean of z^T H z over Rademacher probes z; stderr = sample std / sqrt(probes).
    probes_per_pass probes share one forward pass and gradient graph (HessianOperator.matmat); the
    probes and the estimate do not depend on it."""
    if probes < 2:
        raise ValueError(f"probes must be >= 2 to state a standard error, got {probes}")
    if probes_per_pass < 1:
        raise ValueError(f"probes_per_pass must be >= 1, got {probes_per_pass}")
    gen = torch.Generator().manual_seed(int(seed))
    s = np.empty(probes)
    for c in range(0, probes, probes_per_pass):
        Z = torch.stack([rademacher(op.dim, gen) for _ in range(min(probes_per_pass, probes - c))])
        Z = Z.to(op.theta.device)
        HZ = _matmat(op, Z).double()
        for i in range(Z.shape[0]):
            s[c + i] = float(torch.dot(Z[i].double(), HZ[i]))
    return TraceEstimate(float(s.mean()), float(s.std(ddof=1) / math.sqrt(probes)), probes, s)


@dataclass
class SpectralDensity:
    nodes: np.ndarray      # [runs, steps] Ritz values
    weights: np.ndarray    # [runs, steps] squared first components (each run sums to 1)
    sigma: float           # Gaussian smoothing width (eigenvalue units)

    def density(self, grid: np.ndarray) -> np.ndarray:
        """Smoothed density on grid (integrates to ~1): mean over runs of sum_j w_j N(t; node_j, sigma^2)."""
        t = np.asarray(grid, float)[:, None]
        out = np.zeros(len(grid))
        for nd, w in zip(self.nodes, self.weights):
            out += (w[None, :] * np.exp(-0.5 * ((t - nd[None, :]) / self.sigma) ** 2)).sum(1)
        return out / (len(self.nodes) * self.sigma * math.sqrt(2 * math.pi))

    def moment(self, k: int) -> float:
        """Gauss quadrature estimate of (1/P) trace(H^k)."""
        return float(np.mean([(w * nd ** k).sum() for nd, w in zip(self.nodes, self.weights)]))


def spectral_density(op, *, runs: int = 4, steps: int = 80, seed: int = 0, sigma: float | None = None) -> SpectralDensity:
    """Stochastic Lanczos quadrature (Ubaru et al. 2017; PyHessian's `density`): `runs` Lanczos runs of
    `steps` steps from normalised Rademacher starts, advanced in lockstep (linalg.lanczos_many: one data
    pass per step for all runs). sigma defaults to 1% of the spectrum's span."""
    gen = torch.Generator().manual_seed(int(seed))
    starts = torch.stack([rademacher(op.dim, gen) for _ in range(runs)])
    nodes, weights = [], []
    for res in lanczos_many(lambda V: _matmat(op, V), starts, steps, device=op.theta.device):
        T = torch.diag(res.alpha)
        if res.beta.numel():
            T = T + torch.diag(res.beta, 1) + torch.diag(res.beta, -1)
        vals, vecs = torch.linalg.eigh(T)
        nodes.append(vals.numpy())
        weights.append((vecs[0, :] ** 2).numpy())
    L = max(len(n) for n in nodes)
    pad = lambda a, fill: np.concatenate([a, np.full(L - len(a), fill)])
    nd = np.stack([pad(n, 0.0) for n in nodes])
    w = np.stack([pad(x, 0.0) for x in weights])
    span = float(nd.max() - nd.min()) if nd.size else 1.0
    return SpectralDensity(nd, w, float(sigma if sigma is not None else max(0.01 * span, 1e-12)))


# ------------------------------------------------------------------------------------------ reports
@dataclass
class CurvatureReport:
    """Curvature at one weight vector: whole model and, optionally, per layer."""

    loss: float
    num_params: int
    top: TopEigen | None
    trace: TraceEstimate | None
    density: SpectralDensity | None
    layers: list[dict] = field(default_factory=list)   # name, size, lambda_max.., trace, trace_stderr
    info: dict = field(default_factory=dict)


def curvature(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, theta: torch.Tensor | None = None,
              top_k: int = 5, lanczos_steps: int | None = None, trace_probes: int = 100,
              density_runs: int = 4, density_steps: int = 80, per_layer: bool = False,
              layer_top_k: int = 1, layer_probes: int = 30, bn: str = "reestimate", batch_size: int = 500,
              dtype: torch.dtype | None = None, seed: int = 0,
              layers: Sequence[str] | None = None) -> CurvatureReport:
    """Top-k eigenvalues, trace and spectral density of the loss Hessian at theta (default: the model's
    weights); per_layer adds each layer block's top eigenvalue(s) and trace. 0 disables an estimate."""
    m = copy.deepcopy(model)
    if theta is not None:
        with torch.no_grad():
            start = 0
            for p in m.parameters():
                p.copy_(theta[start:start + p.numel()].view_as(p))
                start += p.numel()
    op = HessianOperator(m, x, y, bn=bn, batch_size=batch_size, dtype=dtype)
    top = top_eigen(op, top_k, steps=lanczos_steps, seed=seed) if top_k else None
    tr = hutchinson_trace(op, trace_probes, seed=seed + 1) if trace_probes else None
    dens = spectral_density(op, runs=density_runs, steps=density_steps, seed=seed + 2) if density_runs else None
    rows = []
    if per_layer:
        for name, a, b in layer_blocks(op.spec):
            if layers and not any(sel in name for sel in layers):
                continue
            bop = HessianOperator(op.m, op.x, op.y, bn="keep", batch_size=batch_size, block=(a, b))
            row = {"layer": name, "size": b - a}
            te = top_eigen(bop, min(layer_top_k, b - a), steps=min(max(2 * layer_top_k + 20, 30), b - a),
                           seed=seed, residuals=False)
            for i, v in enumerate(te.values):
                row[f"lambda_{i + 1}"] = float(v)
            if layer_probes:
                t = hutchinson_trace(bop, layer_probes, seed=seed + 1)
                row.update(trace=t.value, trace_stderr=t.stderr)
            rows.append(row)
    info = {"bn": bn, "dtype": str(op.dtype).replace("torch.", ""), "images": int(x.shape[0]),
            "hessian_vector_products": op.num_products, "trace_probes": trace_probes,
            "density_runs": density_runs, "density_steps": density_steps, "seed": seed}
    return CurvatureReport(op.loss(), op.dim, top, tr, dens, rows, info)
