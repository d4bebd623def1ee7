"""Weight-space operations of the experiments: perturb, interpolate, combine (kernels in pylandscape.ops)
and the MDS embedding of a set of snapshots saved for the figures."""
from __future__ import annotations

from pathlib import Path

import torch

from .. import ops
from ..figures import save_embedding
from ..mds import embed


def perturb(flat: torch.Tensor, offsets: torch.Tensor, scale, *, mode: str = "std", seed: int) -> torch.Tensor:
    """flat + N(0, (scale * s_l)^2) per layer l (s_l = layer std, or mean |w| for mode="magnitude");
    the noise is fixed by `seed`, so a resumed run perturbs identically."""
    return ops.perturb_layerwise(flat, offsets, scale, mode=mode, seed=int(seed))


def interpolate(a: torch.Tensor, b: torch.Tensor, alphas) -> torch.Tensor:
    """[K, P]: row k = (1 - alpha_k) a + alpha_k b (exact at alpha = 0 and 1)."""
    return ops.interpolate(a, b, torch.as_tensor(alphas, dtype=torch.float64))


def combine(W: torch.Tensor, coeffs) -> torch.Tensor:
    """sum_m coeffs[m] W[m] (coeffs [M]) or one such sum per row of coeffs [K, M]."""
    return ops.combine(W, torch.as_tensor(coeffs, dtype=torch.float64))


def embed_and_save(items: list[tuple[dict, torch.Tensor]], path: Path, *, spec, layer: str | None,
                   title: str, device: str = "auto") -> dict:
    """Classical MDS (1 - cosine) of the given snapshots; coordinates and metadata saved to `path`."""
    res = embed(items, spec=spec, layer=layer, metric="cosine", dims=2, annotate="none", title=title,
                device=device, cache=False, progress=False)
    return save_embedding(path, res, title=title)
