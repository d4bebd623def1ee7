"""Public wrappers of the kernels: validate arguments, then call torch.ops.pylandscape.* or, when the
extension is unavailable, the pure-torch twin in `pylandscape._reference` (same results).
"""
from __future__ import annotations

import torch

from . import _ext
from . import _reference as ref


# ======================================================================================
# Section: argument checks shared by every op
# (owned by the kernels work; the Gram section below may use these helpers)
# ======================================================================================


# ======================================================================================
# Section: layer statistics and layerwise perturbation
# ======================================================================================


# ======================================================================================
# Section: interpolation and weighted combinations of models
# ======================================================================================


# ======================================================================================
# Section: per-layer Gram matrices of snapshots (segment_gram)
# ======================================================================================

from . import gram as _gram  # noqa: E402  (the streaming driver and the Gram -> distance helpers)

cosine_distance_from_gram = _gram.cosine_distance_from_gram
layer_gram = _gram.layer_gram


def _gram_check_offsets(offsets, P: int) -> torch.Tensor:
    if not isinstance(offsets, torch.Tensor):
        offsets = torch.as_tensor(offsets, dtype=torch.int64)
    if offsets.dtype != torch.int64 or offsets.dim() != 1 or offsets.numel() < 2:
        raise ValueError(f"offsets must be a 1-D int64 tensor [L+1] with L >= 1, got dtype {offsets.dtype}, "
                         f"shape {tuple(offsets.shape)}")
    o = offsets.cpu()
    if int(o[0]) != 0 or int(o[-1]) != P or bool((o[1:] < o[:-1]).any()):
        raise ValueError(f"offsets must increase from 0 to P = {P} (the rows' length); got "
                         f"{o.tolist() if o.numel() <= 20 else [int(o[0]), '...', int(o[-1])]}")
    return offsets


def _gram_check_rows(T: torch.Tensor, name: str) -> torch.Tensor:
    if T.dim() != 2:
        raise ValueError(f"{name} must be [N, P], got shape {tuple(T.shape)}")
    if T.dtype in (torch.float16, torch.bfloat16):
        T = T.float()  # exact; the kernels take fp32 or fp64
    if T.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{name} must be float32 or float64, got {T.dtype}")
    return T


def _gram_pair(A: torch.Tensor, offsets: torch.Tensor, B: torch.Tensor | None) -> torch.Tensor:
    A = _gram_check_rows(A, "X")
    if B is not None:
        B = _gram_check_rows(B, "Y")
        if B.dtype != A.dtype:
            raise ValueError(f"X and Y must have the same dtype, got {A.dtype} and {B.dtype}")
        if B.shape[1] != A.shape[1]:
            raise ValueError(f"X and Y must have the same row length P, got {A.shape[1]} and {B.shape[1]}")
        if B.device != A.device:
            raise ValueError(f"X and Y must be on the same device, got {A.device} and {B.device}")
    offsets = _gram_check_offsets(offsets, A.shape[1]).to(A.device)
    if _ext.use_extension():
        return torch.ops.pylandscape.segment_gram(A, offsets, B)
    _gram_check_finite(A, offsets, "X")
    if B is not None:
        _gram_check_finite(B, offsets, "Y")
    return ref.segment_gram(A, offsets, B)


def _gram_check_finite(T: torch.Tensor, offsets: torch.Tensor, name: str) -> None:
    if T.numel() and not bool(torch.isfinite(T).all()):
        bad = (~torch.isfinite(T)).any(0).nonzero()[0, 0].item()
        layer = int(torch.searchsorted(offsets.cpu(), torch.tensor([bad]), right=True)[0]) - 1
        raise ValueError(f"{name} holds NaN or inf in layer {layer} (column {bad})")


def segment_gram(X, offsets, *, Y=None, device=None, progress: bool = False,
                 memory_budget: int | None = None) -> torch.Tensor:
    """[L, N, M] float64: per-layer dot products G[l, i, j] = x_i[layer l] . y_j[layer l].

    X (and Y): a [N, P] tensor, or row blocks (a list, or any re-iterable of [rows, P] tensors, e.g.
    snapshots read from disk; a one-shot iterator is buffered in memory). Y=None means Y = X (symmetric;
    only one triangle of block pairs is computed). The products stay accurate for nearly parallel rows
    (1 - cos from them is good to ~1e-3 relative down to 1 - cos = 1e-10), unlike a plain fp32 X @ X.T.
    device: where to compute (blocks are moved there); the result lives there too.
    memory_budget: bytes of input rows to hold at once for row blocks or for tensors moved to `device`
    (default 1 GiB). A tensor already on the compute device is processed in one call unless a budget is
    given; the op then needs about one more copy of the largest layer's columns as workspace. Use cosine_distance_from_gram(layer_gram(G, layers)) for 1 - cos.
    """
    budget = (1 << 30) if memory_budget is None else int(memory_budget)
    if budget <= 0:
        raise ValueError(f"memory_budget must be positive, got {memory_budget}")
    if isinstance(X, torch.Tensor) and (Y is None or isinstance(Y, torch.Tensor)) and not progress:
        X = _gram_check_rows(X, "X")
        dev = X.device if device is None else torch.device(device)
        tot = X.numel() * X.element_size() + (0 if Y is None else Y.numel() * Y.element_size())
        # resident on the compute device already: one call (the op's workspace is about one copy of the
        # largest layer's columns); otherwise only what fits the budget is moved at a time
        if (dev == X.device and (Y is None or Y.device == dev) and memory_budget is None) or tot <= budget:
            return _gram_pair(X.to(dev), offsets, None if Y is None else Y.to(dev))
    if isinstance(X, torch.Tensor):
        X = _gram_check_rows(X, "X")
        _gram_check_offsets(offsets, X.shape[1])
    if not isinstance(offsets, torch.Tensor):
        offsets = torch.as_tensor(offsets, dtype=torch.int64)
    return _gram.streamed_gram(_gram_pair, X, offsets, Y=Y, device=device, progress=progress,
                               memory_budget=budget)


if _ext.loaded() and hasattr(torch.ops.pylandscape, "segment_gram"):
    @torch.library.register_fake("pylandscape::segment_gram")
    def _segment_gram_fake(X, offsets, Y=None):
        M = X.shape[0] if Y is None else Y.shape[0]
        return X.new_empty((offsets.shape[0] - 1, X.shape[0], M), dtype=torch.float64)



# ======================================================================================
# Section: torch.compile support (register_fake), guarded on the extension being loaded
# ======================================================================================
