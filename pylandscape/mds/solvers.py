"""Top-k eigenpairs of the double-centred matrix B = -1/2 J Δ² J, and the eigenvalue mass they hold.

``dense``: float64 LAPACK (one tridiagonalisation, all eigenvalues, top-k eigenvectors; torch.linalg.eigh
on CUDA), for N <= DENSE_MAX_N. ``iterative``: Lanczos (ARPACK) with the centering J applied matrix-free,
top-k only; its positive/negative mass comes from trace(B) and the most negative eigenvalues it also
computes (not exact then). Each solver returns (eigenvalues descending, eigenvectors [N, k],
(captured, negative_mass, mass_exact)).
"""
from __future__ import annotations

import contextlib
import warnings

import numpy as np
import torch

from ..devices import resolve_device
from . import lapack
from .dissimilarity import double_center

# Optional dependencies: without numpy's OpenBLAS and scipy a full numpy eigh gives the same numbers
# (~3x slower) and the iterative solver falls back to the dense one; without threadpoolctl BLAS keeps
# its thread count. The dense solver's LAPACK comes through lapack.py, without importing scipy.linalg
# (0.25-0.6 s on a 2-core VM after numpy and torch); the iterative solver imports scipy.sparse.linalg
# when it runs, not here, so that `--help` and every import of pylandscape.mds do not pay for it.
try:
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover - depends on the environment
    threadpool_limits = None

DENSE_MAX_N = 3000


def fix_signs(V: np.ndarray) -> np.ndarray:
    """Deterministic orientation: the largest-|.| entry of each eigenvector is positive."""
    idx = np.argmax(np.abs(V), axis=0)
    s = np.sign(V[idx, np.arange(V.shape[1])])
    s[s == 0] = 1
    return V * s


def mass_shares(vals_all: np.ndarray, k: int) -> tuple[float, float]:
    pos = vals_all[vals_all > 0].sum()
    neg = -vals_all[vals_all < 0].sum()
    top = vals_all[:k]
    captured = float(top[top > 0].sum() / pos) if pos > 0 else 0.0
    negative = float(neg / (pos + neg)) if pos + neg > 0 else 0.0
    return captured, negative


def dense_topk(B: np.ndarray, k: int, device) -> tuple[np.ndarray, np.ndarray, tuple]:
    """All eigenvalues and the top-k eigenvectors of a dense symmetric B.

    CPU: one Householder tridiagonalisation (LAPACK dsytrd), all eigenvalues from the tridiagonal
    (dsterf), only k eigenvectors (bisection + inverse iteration) transformed back: about a third of
    a full eigh's cost, which scikit-learn pays. CUDA: torch.linalg.eigh in float64.
    """
    dev = resolve_device(device)
    n = B.shape[0]
    k = min(k, n)
    if dev.type != "cpu":
        vals, V = torch.linalg.eigh(torch.from_numpy(B).to(dev))
        vals = vals.flip(0).cpu().numpy()
        V = V.flip(1)[:, :k].cpu().numpy()
    else:
        vals, V = _tridiagonal_topk(B, k)
    captured, negative = mass_shares(vals, k)
    return vals, fix_signs(V), (captured, negative, True)


def one_blas_thread():
    """Context with BLAS limited to one thread: OpenBLAS's threaded dsytrd (level-2 steps with a sync
    per column) ran 100x slower than one thread on a busy 2-core machine (13 s vs 0.13 s, N=800)."""
    if threadpool_limits is None:
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def _tridiagonal_topk(B: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    n = B.shape[0]
    if n >= 3:
        with one_blas_thread():
            out = lapack.tridiagonal_topk(B, k)
        if out is not None:
            return out
    w, V = np.linalg.eigh(B)
    return w[::-1].copy(), np.ascontiguousarray(V[:, ::-1][:, :k])


def iterative_topk(D2: np.ndarray, k: int, seed: int, psd: bool = False) -> tuple[np.ndarray, np.ndarray, tuple]:
    """Top-k of B = -1/2 J Δ² J by Lanczos (ARPACK) with J applied matrix-free (B is never formed).

    The mass uses trace(B) = sum(Δ²) / 2N and the most negative eigenvalues, also found by Lanczos.
    """
    try:
        from scipy.sparse.linalg import (  # start-up time: see the note at the top
            ArpackNoConvergence,
            LinearOperator,
            eigsh,
        )
    except ImportError:  # pragma: no cover - depends on the environment
        warnings.warn("scipy is not installed: using the dense eigensolver", stacklevel=3)
        return dense_topk(double_center(D2), k, "cpu")
    n = D2.shape[0]

    def matvec(v):
        v = np.asarray(v, dtype=np.float64)
        v = v - v.mean(axis=0, keepdims=True)
        w = D2 @ v
        return -0.5 * (w - w.mean(axis=0, keepdims=True))

    op = LinearOperator((n, n), matvec=matvec, matmat=matvec, dtype=np.float64)
    rng = np.random.default_rng(seed)
    try:
        vals, V = eigsh(op, k=k, which="LA", v0=rng.standard_normal(n), tol=1e-12)
    except ArpackNoConvergence:
        raise ValueError(f"the iterative eigensolver did not converge for N={n} (top {k} eigenvalues "
                         f"too close together); use solver='dense'") from None
    order = np.argsort(vals)[::-1]
    vals, V = vals[order], V[:, order]
    trace = float(D2.sum()) / (2.0 * n)
    if psd:
        return vals, fix_signs(V), (min(float(vals[vals > 0].sum()) / trace, 1.0) if trace > 0 else 0.0,
                                     0.0, True)
    m = min(n - 2, max(2 * k, 10))
    try:
        neg = eigsh(op, k=m, which="SA", v0=rng.standard_normal(n), tol=1e-6, maxiter=50 * n,
                    return_eigenvectors=False)
    except ArpackNoConvergence as e:  # clustered eigenvalues near 0: keep those that converged
        neg = np.asarray(e.eigenvalues)
    neg_mass = float(-neg[neg < 0].sum())
    pos_mass = trace + neg_mass  # exact when every negative eigenvalue was among those found
    captured = float(vals[vals > 0].sum() / pos_mass) if pos_mass > 0 else 0.0
    negative = neg_mass / (pos_mass + neg_mass) if pos_mass + neg_mass > 0 else 0.0
    return vals, fix_signs(V), (min(captured, 1.0), negative, False)

