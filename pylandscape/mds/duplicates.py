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
    """Rows that may have an identical copy among the others (from the per-tensor Grams [L, n, n])."""
    n = grams.shape[1]
    if n < 2:
        return []
    G = grams.sum(0).to(torch.float64)
    d = torch.diagonal(G)
    scale = torch.maximum(d[:, None], d[None, :]).clamp_min(torch.finfo(torch.float64).tiny)
    close = ((d[:, None] - d[None, :]).abs() <= CANDIDATE_RTOL * scale) & \
            ((G - d[:, None]).abs() <= CANDIDATE_RTOL * scale)
    close.fill_diagonal_(False)
    per_tensor = torch.diagonal(grams, dim1=1, dim2=2).to(torch.float64)  # [L, n] squared norms
    rows = set()
    for i, j in torch.nonzero(torch.triu(close)).tolist():
        di, dj = per_tensor[:, i], per_tensor[:, j]
        if torch.all((di - dj).abs() <= CANDIDATE_RTOL * torch.maximum(di, dj)):
            rows.update((i, j))
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
