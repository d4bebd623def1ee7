"""Directions in weight space for loss surfaces: flat [P] vectors in a model's flat-buffer layout.

- `random_direction(theta, spec, norm="filter")`: Li et al. 2018 ("Visualizing the Loss Landscape of
  Neural Nets", Sec. 4) filter normalisation: a standard normal direction d whose every filter d_i
  (a slice along dim 0 of a conv / linear weight: one output channel or one row) is rescaled to the
  norm of the model's filter, d_i <- d_i / ||d_i|| * ||theta_i||. Tensors with <= 1 dimension (biases,
  BatchNorm) get d = 0 (their code's default, `ignore="biasbn"`) or d = theta (`bias="copy"`, their
  code's alternative). norm="layer": d_l = s_l * z with s_l the layer's population std, so that the
  point theta + k*d is the layerwise perturbation sigma = k*S of `ops.perturb_layerwise` (same seed,
  same noise stream). norm="none": d = z.
- `pca_directions(trajectory, origin)`: the top-2 principal axes of the snapshots' differences to the
  origin (Li et al. Sec. 7), from our accurate float64 Gram (`ops.segment_gram`), so late, nearly
  parallel snapshots keep their small differences.
- `project(points, origin, directions)`: least-squares coordinates of models in the plane, for
  drawing a trajectory on a contour plot.

Noise comes from the counter-based stream `ops.philox_normal(P, seed)`: the same seed gives the same
direction on every device.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .. import ops
from ..flat import ParamSpec

NORMS = ("filter", "layer", "none")
BIAS_MODES = ("zero", "copy", "filter")


def _check_theta(theta: torch.Tensor, spec: ParamSpec) -> torch.Tensor:
    if not isinstance(theta, torch.Tensor) or theta.dim() != 1 or theta.numel() != spec.numel:
        shape = tuple(theta.shape) if isinstance(theta, torch.Tensor) else type(theta).__name__
        raise ValueError(f"theta must be a flat [P={spec.numel}] tensor for this model, got {shape}")
    return theta.detach()


def normalize_filters(d: torch.Tensor, theta: torch.Tensor, spec: ParamSpec, *, bias: str = "zero") -> torch.Tensor:
    """Li et al.'s filter normalisation of a direction d [P] against weights theta [P] (new tensor).

    A filter is a slice along dim 0 of a tensor with >= 2 dims. A zero filter of d (or of theta)
    gives a zero filter. bias: "zero" (d = 0 on tensors with <= 1 dims), "copy" (d = theta there),
    "filter" (treat each 1-D tensor as one filter: rescale it to ||theta_t||).
    """
    if bias not in BIAS_MODES:
        raise ValueError(f"bias must be one of {BIAS_MODES}, got {bias!r}")
    theta = _check_theta(theta, spec)
    out = torch.empty_like(d)
    start = 0
    for shape, n in zip(spec.shapes, spec.sizes):
        dv, tv, ov = d[start:start + n], theta[start:start + n], out[start:start + n]
        start += n
        if len(shape) <= 1 and bias != "filter":
            ov.copy_(tv if bias == "copy" else torch.zeros_like(tv))
            continue
        rows = shape[0] if len(shape) >= 2 else 1
        dm = dv.reshape(rows, -1).double()
        tm = tv.reshape(rows, -1).double()
        dn = torch.linalg.vector_norm(dm, dim=1, keepdim=True)
        tn = torch.linalg.vector_norm(tm, dim=1, keepdim=True)
        scale = torch.where(dn > 0, tn / torch.where(dn > 0, dn, torch.ones_like(dn)), torch.zeros_like(dn))
        ov.copy_((dm * scale).reshape(-1).to(d.dtype))
    return out


def random_direction(theta: torch.Tensor, spec: ParamSpec, *, seed: int, norm: str = "filter",
                     bias: str = "zero") -> torch.Tensor:
    """One random direction [P] (theta's dtype and device); see the module docstring for `norm`.

    The raw noise is ops.philox_normal(P, seed): identical on CPU and CUDA for one seed.
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    theta = _check_theta(theta, spec)
    z = ops.philox_normal(spec.numel, int(seed), 0, torch.float64 if theta.dtype == torch.float64 else torch.float32)
    z = z.to(device=theta.device, dtype=theta.dtype)
    if norm == "filter":
        return normalize_filters(z, theta, spec, bias=bias)
    if norm == "layer":
        std = ops.layer_stats(theta, spec.offsets.to(theta.device))[:, 1].nan_to_num(0.0)
        sizes = torch.tensor(spec.sizes, device=theta.device)
        return (z.double() * torch.repeat_interleave(std, sizes)).to(theta.dtype)
    return z


def random_directions(theta: torch.Tensor, spec: ParamSpec, k: int = 2, *, seed: int = 0,
                      norm: str = "filter", bias: str = "zero") -> torch.Tensor:
    """[k, P]: k independent random directions with seeds seed, seed + 1, ..."""
    return torch.stack([random_direction(theta, spec, seed=seed + i, norm=norm, bias=bias) for i in range(k)])


@dataclass
class PCADirections:
    """Top principal axes of a trajectory's differences to `origin` (unit vectors, orthonormal)."""

    directions: torch.Tensor      # [k, P], theta's dtype
    explained: np.ndarray         # [k] fraction of the (centred) variance each axis explains
    eigenvalues: np.ndarray       # [k] float64 eigenvalues of the centred Gram


def pca_directions(trajectory: torch.Tensor, origin: torch.Tensor, spec: ParamSpec | None = None,
                   k: int = 2) -> PCADirections:
    """Li et al. Sec. 7: PCA of M = [theta_i - origin] (rows centred, as sklearn's PCA), top k axes.

    trajectory [N, P]; origin [P] (usually the final model). The Gram M M^T comes from
    ops.segment_gram (float64, accurate for nearly parallel rows); axis j = M_c^T u_j / sqrt(lambda_j)
    is formed with ops.combine, so nothing of size N x P is ever held in float64.
    """
    if trajectory.dim() != 2 or trajectory.shape[1] != origin.numel():
        raise ValueError(f"trajectory must be [N, P={origin.numel()}], got {tuple(trajectory.shape)}")
    n = trajectory.shape[0]
    if n < k + 1:
        raise ValueError(f"PCA directions need at least {k + 1} trajectory snapshots, got {n}")
    M = (trajectory - origin.to(trajectory.dtype)).contiguous()
    offsets = torch.tensor([0, M.shape[1]], dtype=torch.int64)
    G = ops.segment_gram(M, offsets).sum(0).double().cpu().numpy()
    J = np.eye(n) - 1.0 / n
    B = J @ G @ J
    vals, vecs = np.linalg.eigh((B + B.T) / 2)
    order = np.argsort(vals)[::-1]
    vals, vecs = vals[order], vecs[:, order]
    if vals[k - 1] <= 0:
        raise ValueError(f"the trajectory spans fewer than {k} dimensions around the origin (eigenvalues "
                         f"{vals[:k].tolist()}): cannot form {k} PCA directions")
    total = vals[vals > 0].sum()
    U = vecs[:, :k] - vecs[:, :k].mean(0, keepdims=True)  # exactly orthogonal to 1, as M_c needs
    coeffs = torch.from_numpy((U / np.sqrt(vals[:k])).T.copy())
    D = ops.combine(M, coeffs)
    return PCADirections(D, vals[:k] / total, vals[:k])


def project(points: torch.Tensor, origin: torch.Tensor, directions: torch.Tensor) -> np.ndarray:
    """[N, k] float64 least-squares coordinates c with points_i - origin ~ sum_j c_ij directions_j.

    Exact for points in the plane (e.g. grid points, or the models of --through); for the rest the
    orthogonal projection onto span(directions). Inner products via ops.segment_gram (float64).
    """
    if points.dim() == 1:
        points = points.unsqueeze(0)
    k = directions.shape[0]
    dt = directions.dtype
    X = torch.cat([directions, (points.to(dt) - origin.to(dt))]).contiguous()
    offsets = torch.tensor([0, X.shape[1]], dtype=torch.int64)
    G = ops.segment_gram(X, offsets).sum(0).double().cpu().numpy()
    A, b = G[:k, :k], G[:k, k:]
    return np.linalg.solve(A, b).T

