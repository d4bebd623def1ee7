"""Weight-space operations of the experiments: perturb, interpolate, combine (kernels in pylandscape.ops)
and the MDS embedding of a set of snapshots saved for the figures."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch

from .. import ops
from ..figures import save_embedding
from ..flat import ParamSpec
from ..mds import embed


def perturb(flat: torch.Tensor, offsets: torch.Tensor, scale, *, mode: str = "std", seed: int) -> torch.Tensor:
    """flat + N(0, (scale_l * s_l)^2) per tensor l (s_l = its std, or mean |w| for mode="magnitude");
    scale: a float or one per tensor [L] (0 leaves a tensor unchanged, see `tensor_scales`). The noise is
    fixed by `seed`, so a resumed run perturbs identically."""
    return ops.perturb_layerwise(flat, offsets, scale, mode=mode, seed=int(seed))


def tensor_scales(spec: ParamSpec, scale: float, frozen: Iterable[str] = ()) -> torch.Tensor:
    """[L] float64: `scale` for every tensor of the spec, 0 for the names in `frozen` (e.g. the biases a
    BatchNorm cancels, models.biases_before_batchnorm), which the perturbation then leaves unchanged."""
    frozen = set(frozen)
    return torch.tensor([0.0 if n in frozen else float(scale) for n in spec.names], dtype=torch.float64)


def paper_layer(spec: ParamSpec, k: int | str, frozen: Iterable[str] = ()) -> str:
    """Tensor names of the paper's layer k (layer 1 is the input; layer k is the (k-1)-th module with
    weights), comma-joined for `embed(layer=...)`, without the tensors in `frozen`."""
    modules: dict[str, list[str]] = {}
    for n in spec.names:
        modules.setdefault(n.rsplit(".", 1)[0], []).append(n)
    k = int(str(k).lower().removeprefix("layer"))
    if not 2 <= k <= len(modules) + 1:
        raise ValueError(f"layer {k}: the network's layers with weights are 2..{len(modules) + 1} "
                         f"({', '.join(modules)})")
    names = [n for n in list(modules.values())[k - 2] if n not in set(frozen)]
    if not names:
        raise ValueError(f"layer {k}: every tensor of it is excluded ({', '.join(frozen)})")
    return ",".join(names)


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
