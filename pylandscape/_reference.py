"""Pure-PyTorch twins of every kernel: the fallback, the test oracle and the benchmark baseline.

They follow the kernels' definitions exactly (the Philox stream and the normal transform included),
so results match the compiled ops bit for bit where the math is elementwise, and to rounding where
sums are reordered.
"""
from __future__ import annotations

import torch


# ======================================================================================
# Section: Philox counter-based RNG and the normal transform
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


def _shifted_gram64(A: torch.Tensor, B: torch.Tensor | None) -> torch.Tensor:
    """x_i . y_j in fp64 via x_i = r + d_i: the big r.r term is computed once and shared by every
    entry, so the rounding that remains scales with |d_i||d_j|, not |x|^2 (what keeps 1 - cos of
    nearly parallel rows accurate). r is A's first row, so d = x - r is exact in fp64 for fp32 data."""
    r = A[0]
    DA = A - r
    DB = DA if B is None else B - r
    rr = torch.dot(r, r)
    ra = DA @ r
    rb = ra if B is None else DB @ r
    G = DA @ DB.T
    # (r.r + r.d_i + r.d_j) is summed small-terms-first: the d_i.d_j term is the smallest.
    return G + (ra[:, None] + rb[None, :]) + rr


def segment_gram(X: torch.Tensor, offsets: torch.Tensor, Y: torch.Tensor | None = None,
                 block_bytes: int = 1 << 28) -> torch.Tensor:
    """[L, N, M] float64 per-layer dot products of the rows of X [N, P] and Y [M, P] (Y = X when None).

    fp64 products of reference-shifted rows, blocked over rows so that at most ~`block_bytes` of fp64
    copies exist at a time (never N*P*8 bytes). Pure torch: the fallback and a test oracle.
    """
    sym = Y is None
    Yv = X if sym else Y
    N, P = X.shape
    M = Yv.shape[0]
    off = [int(v) for v in offsets.tolist()]
    L = len(off) - 1
    out = torch.zeros(L, N, M, dtype=torch.float64, device=X.device)
    if N == 0 or M == 0:
        return out
    rows = max(1, int(block_bytes // (8 * max(P, 1))))
    for a in range(0, N, rows):
        A = X[a:a + rows].to(torch.float64)
        for c in range(a if sym else 0, M, rows):
            B = Yv[c:c + rows].to(torch.float64)
            same = sym and c == a
            for l in range(L):
                lo, hi = off[l], off[l + 1]
                if hi == lo:
                    continue
                g = _shifted_gram64(A[:, lo:hi], None if same else B[:, lo:hi])
                out[l, a:a + A.shape[0], c:c + B.shape[0]] = g
                if sym and not same:
                    out[l, c:c + B.shape[0], a:a + A.shape[0]] = g.T
            if same:
                # the shifted formula is symmetric in exact arithmetic; make it so bit for bit
                blk = out[:, a:a + A.shape[0], a:a + A.shape[0]]
                blk.copy_(torch.triu(blk) + torch.triu(blk, 1).transpose(1, 2))
    if sym:
        _exact_duplicates(X, off, out)
    return out


def _exact_duplicates(X: torch.Tensor, off: list[int], out: torch.Tensor) -> None:
    """Rows equal on a layer get identical Gram entries there, so their 1 - cos is exactly 0."""
    for l in range(len(off) - 1):
        lo, hi = off[l], off[l + 1]
        if hi == lo or X.shape[0] < 2:
            continue
        _, inv = torch.unique(X[:, lo:hi], dim=0, return_inverse=True)
        if int(inv.max()) + 1 == X.shape[0]:
            continue  # no duplicates
        first = torch.full((int(inv.max()) + 1,), X.shape[0], dtype=torch.long, device=X.device)
        first.scatter_reduce_(0, inv, torch.arange(X.shape[0], device=X.device), reduce="amin")
        rep = first[inv]  # each row's first twin
        g = out[l]
        val = g.diagonal()[rep]
        same = inv[:, None] == inv[None, :]
        g.copy_(torch.where(same, val[:, None].expand_as(g), g))
