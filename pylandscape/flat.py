"""A model's parameters as one flat buffer plus offsets: the layout every kernel works on.

`offsets` is int64 [L+1]: layer l occupies flat[offsets[l]:offsets[l+1]]. The order is the module's
`named_parameters()` order (or the state_dict's key order), so it is stable across runs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
from torch import nn

# Buffers that appear in state_dicts but are not weights (BatchNorm running statistics and counters).
NON_PARAMETER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


@dataclass(frozen=True)
class ParamSpec:
    """Names and shapes of the tensors in a flat buffer; `offsets` follows from the shapes."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @property
    def sizes(self) -> list[int]:
        return [math.prod(int(d) for d in s) for s in self.shapes]

    @property
    def offsets(self) -> torch.Tensor:
        sizes = torch.tensor([0] + self.sizes, dtype=torch.int64)
        return torch.cumsum(sizes, 0)

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    def __len__(self) -> int:
        return len(self.names)

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"no tensor named {name!r}; have: {', '.join(self.names)}") from None

    def to_json(self) -> dict:
        return {"names": list(self.names), "shapes": [list(s) for s in self.shapes]}

    @classmethod
    def from_json(cls, d: Mapping) -> "ParamSpec":
        return cls(tuple(d["names"]), tuple(tuple(int(x) for x in s) for s in d["shapes"]))

    @classmethod
    def from_module(cls, module: nn.Module, trainable_only: bool = False) -> "ParamSpec":
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad or not trainable_only]
        return cls(tuple(n for n, _ in named), tuple(tuple(p.shape) for _, p in named))

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], params_only: bool = True) -> "ParamSpec":
        keys = [k for k in sd if not (params_only and is_non_parameter(k))]
        return cls(tuple(keys), tuple(tuple(sd[k].shape) for k in keys))


def is_non_parameter(name: str) -> bool:
    """True for state_dict entries that are buffers, not weights (BatchNorm statistics)."""
    return name.rsplit(".", 1)[-1] in NON_PARAMETER_SUFFIXES


def flatten_tensors(tensors: Iterable[torch.Tensor], dtype: torch.dtype | None = None) -> torch.Tensor:
    ts = [t.detach().reshape(-1) for t in tensors]
    if not ts:
        return torch.zeros(0, dtype=dtype or torch.float32)
    return torch.cat([t.to(dtype) if dtype is not None else t for t in ts])


def flatten_module(module: nn.Module, dtype: torch.dtype | None = None, *,
                   trainable_only: bool = False) -> tuple[torch.Tensor, ParamSpec]:
    """(flat [P], spec) from a module's parameters (not its buffers), detached.

    trainable_only keeps only parameters with requires_grad (the θ of linalg's Jacobians)."""
    spec = ParamSpec.from_module(module, trainable_only)
    params = dict(module.named_parameters())
    return flatten_tensors((params[n] for n in spec.names), dtype), spec


def unflatten(flat: torch.Tensor, spec: ParamSpec) -> dict[str, torch.Tensor]:
    """Views of `flat` shaped as the spec's tensors."""
    if flat.dim() != 1 or flat.numel() != spec.numel:
        raise ValueError(f"flat buffer has shape {tuple(flat.shape)}, spec expects [{spec.numel}]")
    out, start = {}, 0
    for name, shape, n in zip(spec.names, spec.shapes, spec.sizes):
        out[name] = flat[start:start + n].view(shape)
        start += n
    return out


@torch.no_grad()
def load_flat_(module: nn.Module, flat: torch.Tensor, *, trainable_only: bool = False) -> nn.Module:
    """Copy a flat buffer into a module's parameters in place (only requires_grad ones if trainable_only)."""
    params = [p for p in module.parameters() if p.requires_grad or not trainable_only]
    total = sum(p.numel() for p in params)
    if flat.dim() != 1 or flat.numel() != total:
        raise ValueError(f"flat buffer has shape {tuple(flat.shape)}, module has {total} parameters")
    start = 0
    for p in params:
        n = p.numel()
        p.copy_(flat[start:start + n].view_as(p))
        start += n
    return module
