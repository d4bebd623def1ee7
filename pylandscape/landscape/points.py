"""Sets of weight vectors formed on demand, chunk by chunk, by our kernels.

A 51 x 51 surface of the paper's network is 2,601 x 188,810 floats (2 GB): never held at once. A
point set knows its length and forms rows [start, stop) when the evaluator asks for them:

- `StackedPoints(flats)`: rows already in memory [K, P].
- `CombinationPoints(W, coeffs)`: row k = sum_m coeffs[k, m] W[m] (`ops.combine`); a plane around
  theta with directions d1, d2 is W = [theta, d1, d2], coeffs = [1, a, b]; the plane through three
  models A, B, C is W = [A, B, C], coeffs = [1 - a - b, a, b] (exact at the models).
- `InterpolationPoints(a, b, alphas)`: row k = (1 - alpha_k) a + alpha_k b (`ops.interpolate`).
- `PerturbedPoints(flat, offsets, scales, seeds)`: row k = layerwise perturbation of flat with
  sigma_l = scales[k, l] * s_l and noise stream seeds[k] (`ops.perturb_batched`), the perturb-sweep's
  random copies.
"""
from __future__ import annotations

import torch

from .. import ops


class PointSet:
    """K weight vectors [K, P]; `rows(start, stop)` forms rows [start, stop) as a new [n, P] tensor."""

    num_params: int
    dtype: torch.dtype
    device: torch.device

    def __len__(self) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def rows(self, start: int, stop: int) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def _check_range(self, start: int, stop: int) -> None:
        if not 0 <= start <= stop <= len(self):
            raise IndexError(f"rows [{start}, {stop}) outside 0..{len(self)}")


class StackedPoints(PointSet):
    def __init__(self, flats: torch.Tensor):
        if not isinstance(flats, torch.Tensor) or flats.dim() != 2:
            raise ValueError(f"flats must be a [K, P] tensor, got "
                             f"{tuple(flats.shape) if isinstance(flats, torch.Tensor) else type(flats).__name__}")
        self.flats = flats.detach()
        self.num_params, self.dtype, self.device = flats.shape[1], flats.dtype, flats.device

    def __len__(self) -> int:
        return self.flats.shape[0]

    def rows(self, start: int, stop: int) -> torch.Tensor:
        self._check_range(start, stop)
        return self.flats[start:stop]


class CombinationPoints(PointSet):
    def __init__(self, W: torch.Tensor, coeffs):
        ops.check_float_tensor(W, "W", dims=2)
        c = torch.as_tensor(coeffs, dtype=torch.float64).detach().cpu()
        if c.dim() != 2 or c.shape[1] != W.shape[0]:
            raise ValueError(f"coeffs must be [K, M={W.shape[0]}], got {tuple(c.shape)}")
        self.W, self.coeffs = W.detach().contiguous(), c.contiguous()
        self.num_params, self.dtype, self.device = W.shape[1], W.dtype, W.device

    def __len__(self) -> int:
        return self.coeffs.shape[0]

    def rows(self, start: int, stop: int) -> torch.Tensor:
        self._check_range(start, stop)
        return ops.combine(self.W, self.coeffs[start:stop])


class InterpolationPoints(PointSet):
    def __init__(self, a: torch.Tensor, b: torch.Tensor, alphas):
        self.a, self.b = a.detach(), b.detach()
        self.alphas = torch.as_tensor(alphas, dtype=torch.float64).detach().cpu().reshape(-1)
        self.num_params, self.dtype, self.device = a.numel(), a.dtype, a.device

    def __len__(self) -> int:
        return self.alphas.shape[0]

    def rows(self, start: int, stop: int) -> torch.Tensor:
        self._check_range(start, stop)
        return ops.interpolate(self.a, self.b, self.alphas[start:stop])


class PerturbedPoints(PointSet):
    def __init__(self, flat: torch.Tensor, offsets, scales, seeds, *, mode: str = "std"):
        self.flat = flat.detach()
        self.offsets = ops.check_offsets(offsets, flat.numel())
        sc = torch.as_tensor(scales, dtype=torch.float64).detach().cpu()
        sd = torch.as_tensor(seeds).detach().cpu().to(torch.int64).reshape(-1)
        if sc.dim() not in (1, 2) or sc.shape[0] != sd.shape[0]:
            raise ValueError(f"scales must be [K] or [K, L] with K = len(seeds) = {sd.shape[0]}, got {tuple(sc.shape)}")
        self.scales, self.seeds, self.mode = sc, sd, mode
        self.num_params, self.dtype, self.device = flat.numel(), flat.dtype, flat.device

    def __len__(self) -> int:
        return self.seeds.shape[0]

    def rows(self, start: int, stop: int) -> torch.Tensor:
        self._check_range(start, stop)
        return ops.perturb_batched(self.flat, self.offsets, self.scales[start:stop],
                                   seeds=self.seeds[start:stop], mode=self.mode)


def as_points(points) -> PointSet:
    """A PointSet, or a [K, P] tensor wrapped as StackedPoints."""
    if isinstance(points, PointSet):
        return points
    return StackedPoints(points)
