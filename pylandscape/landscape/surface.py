"""Loss surfaces: error and loss on a 1-D or 2-D grid of weight vectors, evaluated in batches.

A grid point with coordinates (x[, y]) is a weighted sum of base vectors W [M, P]:
- around a model theta with directions d1[, d2]: W = [theta, d1, d2], point = theta + x d1 + y d2;
- through 2 or 3 models A, B[, C]: W = [A, B, C], point = (1 - x - y) A + x B + y C, so (0, 0),
  (1, 0), (0, 1) are the given models exactly (the kernels compute this in float64, rounded once).
The points are formed chunk by chunk by `ops.combine` and evaluated by `batched.evaluate_points`.
Values are stored as [ny, nx] arrays (row = y) for 2-D grids and [nx] for 1-D ones.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..flat import flatten_module
from .batched import BN_DESCRIPTIONS, evaluate_points
from .directions import pca_directions, project, random_directions
from .points import CombinationPoints

DIRECTION_KINDS = ("filter", "layer", "none", "pca")


@dataclass
class Surface:
    """xs [nx], ys [ny] or None; values name -> [ny, nx] (2-D) or [nx] (1-D), e.g. "train_loss"."""

    xs: np.ndarray
    ys: np.ndarray | None
    values: dict[str, np.ndarray]
    kind: str                                   # "around" or "through"
    info: dict = field(default_factory=dict)
    trajectory: np.ndarray | None = None        # [N, dims] coordinates of projected snapshots
    trajectory_meta: list[dict] | None = None
    anchors: dict[str, list[float]] = field(default_factory=dict)  # named points: "origin", "A", ...

    @property
    def dims(self) -> int:
        return 1 if self.ys is None else 2

    def quantities(self) -> list[str]:
        return list(self.values)


def grid_axis(n: int, lo: float, hi: float) -> np.ndarray:
    if n < 1:
        raise ValueError(f"grid size must be >= 1, got {n}")
    if not hi > lo and n > 1:
        raise ValueError(f"range must be low:high with low < high, got {lo}:{hi}")
    return np.linspace(lo, hi, n) if n > 1 else np.array([(lo + hi) / 2])


def auto_range(c: np.ndarray, pad: float = 0.25) -> tuple[float, float]:
    """[min, max] of coordinates c and 0, widened by `pad` of the span on each side."""
    lo, hi = min(float(np.min(c)), 0.0), max(float(np.max(c)), 0.0)
    span = hi - lo if hi > lo else 1.0
    return lo - pad * span, hi + pad * span


def _coords(xs: np.ndarray, ys: np.ndarray | None) -> np.ndarray:
    if ys is None:
        return xs[:, None]
    X, Y = np.meshgrid(xs, ys)           # [ny, nx]
    return np.stack([X.ravel(), Y.ravel()], 1)


def evaluate_grid(model: nn.Module, W: torch.Tensor, coeff_of, xs: np.ndarray, ys: np.ndarray | None,
                  sets, **eval_kw) -> tuple[dict[str, np.ndarray], dict]:
    """values name -> grid array, and the evaluation's info (bn, route, seconds, ...)."""
    coords = _coords(xs, ys)
    coeffs = torch.from_numpy(np.stack([coeff_of(c) for c in coords]).astype(np.float64))
    res = evaluate_points(model, CombinationPoints(W, coeffs), sets, **eval_kw)
    shape = (len(xs),) if ys is None else (len(ys), len(xs))
    values = {}
    for name in res.losses:
        values[f"{name}_loss"] = res.losses[name].numpy().reshape(shape)
        values[f"{name}_error"] = res.errors[name].numpy().reshape(shape)
    info = {"bn": res.bn, "bn_description": BN_DESCRIPTIONS[res.bn], "route": res.route,
            "models_per_pass": res.models_per_pass, "batch_size": res.batch_size,
            "evaluation_seconds": res.seconds, "num_points": int(coords.shape[0]), **res.info}
    return values, info


def around(model: nn.Module, sets, *, theta: torch.Tensor | None = None, directions: str | torch.Tensor = "filter",
           grid: Sequence[int] = (21, 21), ranges: Sequence[Sequence[float]] | None = ((-1.0, 1.0), (-1.0, 1.0)),
           seed: int = 0, bias: str = "zero", trajectory: torch.Tensor | None = None,
           trajectory_meta: list[dict] | None = None, **eval_kw) -> Surface:
    """Surface around theta (default: the model's weights) along 1 or 2 directions (len(grid)).

    directions: "filter" (Li et al.'s filter normalisation), "layer" (sigma = x * S per layer),
    "none" (raw Gaussian), "pca" (top PCA axes of `trajectory` [N, P] around theta), or a [k, P]
    tensor. trajectory: snapshots projected onto the plane (least squares) for the contour plot.
    ranges None: the projected trajectory's extent (with the origin) plus 25% on each side.
    eval_kw: bn, bn_x, route, forward, batch_size, max_memory, chunk, progress (see evaluate_points).
    """
    dims = len(grid)
    if ranges is None and trajectory is None:
        raise ValueError("ranges=None (fit the grid to the trajectory) needs a trajectory")
    if dims not in (1, 2) or (ranges is not None and len(ranges) < dims):
        raise ValueError(f"grid must give 1 or 2 sizes with a range each, got grid={grid}, ranges={ranges}")
    th_model, spec = flatten_module(model)
    theta = th_model if theta is None else theta.detach().to(th_model.dtype)
    info: dict = {"directions": directions if isinstance(directions, str) else "given"}
    if isinstance(directions, torch.Tensor):
        D = directions.to(theta.dtype)
    elif directions == "pca":
        if trajectory is None:
            raise ValueError("directions 'pca' need a trajectory (the snapshots of a training run)")
        pca = pca_directions(trajectory.to(theta.dtype), theta, k=dims)
        D = pca.directions
        info["pca_explained"] = pca.explained.tolist()
    elif directions in DIRECTION_KINDS:
        D = random_directions(theta, spec, dims, seed=seed, norm=directions, bias=bias)
        info.update(seeds=[seed + i for i in range(dims)], bias_directions=bias)
    else:
        raise ValueError(f"directions must be one of {DIRECTION_KINDS} or a [k, P] tensor, got {directions!r}")
    if D.shape != (dims, theta.numel()):
        raise ValueError(f"directions must be [{dims}, {theta.numel()}], got {tuple(D.shape)}")
    traj = project(trajectory.to(theta.dtype), theta, D) if trajectory is not None else None
    if ranges is None:
        ranges = [auto_range(traj[:, j]) for j in range(dims)]
    xs = grid_axis(grid[0], *ranges[0])
    ys = grid_axis(grid[1], *ranges[1]) if dims == 2 else None
    W = torch.cat([theta[None], D]).contiguous()
    values, einfo = evaluate_grid(model, W, lambda c: np.concatenate([[1.0], c]), xs, ys, sets, **eval_kw)
    info.update(einfo)
    info["direction_norms"] = [float(d.double().norm()) for d in D]
    info["theta_norm"] = float(theta.double().norm())
    return Surface(xs, ys, values, "around", info, traj, trajectory_meta, {"origin": [0.0] * dims})


def through(model: nn.Module, models: torch.Tensor, sets, *, grid: Sequence[int] = (21, 21),
            ranges: Sequence[Sequence[float]] = ((-0.5, 1.5), (-0.5, 1.5)),
            names: Sequence[str] | None = None, trajectory: torch.Tensor | None = None,
            trajectory_meta: list[dict] | None = None, **eval_kw) -> Surface:
    """Line (2 models) or plane (3 models) through given weight vectors models [M, P].

    Point (x[, y]) = (1 - x - y) A + x B + y C: A at 0, B at x = 1, C at y = 1.
    """
    if models.dim() != 2 or models.shape[0] not in (2, 3):
        raise ValueError(f"--through takes 2 or 3 models, got {models.shape[0] if models.dim() == 2 else 'a 1-D tensor'}")
    M = models.shape[0]
    dims = M - 1
    P = sum(p.numel() for p in model.parameters())
    if models.shape[1] != P:
        raise ValueError(f"the given models have {models.shape[1]} parameters, the architecture has {P}")
    names = list(names or ["A", "B", "C"][:M])
    xs = grid_axis(grid[0], *ranges[0])
    ys = grid_axis(grid[1] if len(grid) > 1 else grid[0], *(ranges[1] if len(ranges) > 1 else ranges[0])) \
        if dims == 2 else None
    W = models.detach().contiguous()

    def coeff(c):
        return np.concatenate([[1.0 - c.sum()], c])
    values, info = evaluate_grid(model, W, coeff, xs, ys, sets, **eval_kw)
    info.update(directions="through", models=names)
    anchors = {names[0]: [0.0] * dims}
    for i in range(1, M):
        anchors[names[i]] = [1.0 if j == i - 1 else 0.0 for j in range(dims)]
    traj = None
    if trajectory is not None:
        traj = project(trajectory.to(W.dtype), W[0], W[1:] - W[0])
    return Surface(xs, ys, values, "through", info, traj, trajectory_meta, anchors)


def axis_names(s: Surface) -> tuple[str, str]:
    """Axis labels for figures: what x and y mean for this surface."""
    if s.kind == "through":
        names = s.info.get("models", ["A", "B", "C"])
        x = f"toward {names[1]} (0 = {names[0]}, 1 = {names[1]})"
        y = f"toward {names[2]} (1 = {names[2]})" if len(names) > 2 else ""
        return x, y
    d = s.info.get("directions", "")
    if d == "pca":
        ex = s.info.get("pca_explained", [])
        return tuple(f"PC{i + 1}" + (f" ({100 * ex[i]:.1f}% of variance)" if i < len(ex) else "") for i in range(2))
    return f"direction 1 ({d})", f"direction 2 ({d})"


def primary_quantity(surface: Surface) -> str:
    """The quantity figures show first: the training loss when present."""
    for q in ("train_loss",):
        if q in surface.values:
            return q
    return next(q for q in surface.values if q.endswith("_loss"))


def values_at(surface: Surface, point: Sequence[float]) -> Mapping[str, float]:
    """Values at the grid node nearest to `point` (e.g. the origin)."""
    ix = int(np.abs(surface.xs - point[0]).argmin())
    if surface.ys is None:
        return {q: float(v[ix]) for q, v in surface.values.items()}
    iy = int(np.abs(surface.ys - point[1]).argmin())
    return {q: float(v[iy, ix]) for q, v in surface.values.items()}
