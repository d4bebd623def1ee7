"""Snapshots with identical weights (Lightning's last.ckpt, timm's last/model_best.pth.tar,
torchvision's checkpoint.pth, HF's final model.safetensors): found, so that each is drawn once.

Candidates come from the per-tensor Grams at no cost (equal norms in every tensor and cos = 1 up to
1e-6); each candidate is then confirmed by a hash of its float32 weights, so a distinct snapshot is
never dropped. Only candidate rows are read again, and their hashes go into the Gram cache, so a cached
run reads no weights.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch

#: Relative tolerance for candidates (only a pre-filter: the hash decides).
CANDIDATE_RTOL = 1e-6


def candidates(grams: torch.Tensor) -> list[int]:
    """Rows that may have an identical copy among the others (from the per-tensor Grams [L, n, n]).

    A pair qualifies when its squared norms agree (|d_i - d_j| <= rtol max(d_i, d_j)), its dot product
    matches (|G_ij - d_i| <= rtol max(d_i, d_j)) and so does every tensor's squared norm. Only pairs
    whose norms are that close are looked at: they sit side by side once the norms are sorted, so no
    [n, n] temporaries are built (a dozen of them took 0.4-0.7 s at n = 2,000, mostly finding none).
    """
    n = grams.shape[1]
    if n < 2:
        return []
    per_tensor = torch.diagonal(grams, dim1=1, dim2=2).to(torch.float64)  # [L, n] squared norms
    d = per_tensor.sum(0).numpy()  # not the summed [n, n] Gram: 32 MB of fresh pages at n = 2,000
    tiny = np.finfo(np.float64).tiny
    order = np.argsort(d, kind="stable")
    ds = d[order]
    # every j after k in sorted order with |d_j - d_k| <= rtol max(d_j, d_k, tiny) lies below this bound
    hi = np.searchsorted(ds, ds + 2 * CANDIDATE_RTOL * np.abs(ds) + 2 * tiny, side="right")
    pos = np.arange(n)
    first = pos[hi > pos + 1]
    if first.size == 0:
        return []
    ks = np.repeat(first, hi[first] - first - 1)
    ms = np.concatenate([np.arange(k + 1, hi[k]) for k in first])
    i, j = np.minimum(order[ks], order[ms]), np.maximum(order[ks], order[ms])
    di, dj = d[i], d[j]
    scale = np.maximum(np.maximum(di, dj), tiny)
    gij = grams[:, torch.from_numpy(i), torch.from_numpy(j)].to(torch.float64).sum(0).numpy()
    close = (np.abs(di - dj) <= CANDIDATE_RTOL * scale) & (np.abs(gij - di) <= CANDIDATE_RTOL * scale)
    rows = set()
    for a, b in zip(i[close].tolist(), j[close].tolist()):
        ta, tb = per_tensor[:, a], per_tensor[:, b]
        if torch.all((ta - tb).abs() <= CANDIDATE_RTOL * torch.maximum(ta, tb)):
            rows.update((a, b))
    return sorted(rows)


def row_hashes(sset, rows: list[int], which: list[int]) -> dict[int, str]:
    """sha256 of the float32 weights of rows[w] for w in `which` (read one snapshot at a time)."""
    pieces = sset.plan_pieces(0, sset.spec.numel)
    out = {}
    for w in which:
        buf = sset.read_block([rows[w]], pieces, progress=False)
        out[w] = hashlib.sha256(np.ascontiguousarray(buf[0]).view(np.uint8)).hexdigest()
    return out


def groups(hashes: dict[int, str]) -> list[list[int]]:
    """Rows with equal hashes, each group sorted (the first is drawn, the others are its aliases)."""
    by_hash: dict[str, list[int]] = {}
    for w, h in sorted(hashes.items()):
        by_hash.setdefault(h, []).append(w)
    return [g for g in by_hash.values() if len(g) > 1]
