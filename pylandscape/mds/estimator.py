"""ClassicalMDS: classical (Torgerson) MDS with a scikit-learn-like interface.

From a Gram (or vectors, or dissimilarities) to coordinates: Δ² (dissimilarity.py), B = -1/2 J Δ² J,
its top-k eigenpairs (λ_m, v_m) (solvers.py), coordinates x_m = sqrt(λ_m) v_m. 1 - cos is not a
Euclidean distance, so B can have negative eigenvalues: ``captured_`` = sum of the k selected positive
eigenvalues / sum of all positive ones, ``negative_mass_`` = sum |λ<0| / sum |λ|. A selected eigenvalue
<= 0 gives a warning and a zero coordinate (never the square root of a negative number).
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

from ..ops import segment_gram
from .dissimilarity import double_center, squared_dissimilarity
from .solvers import DENSE_MAX_N, dense_topk, iterative_topk, one_blas_thread

SOLVERS = ("auto", "dense", "iterative")


class ClassicalMDS:
    """Classical MDS with a scikit-learn-like interface.

    Parameters: ``n_components`` (dims), ``metric`` in {"cosine", "chordal", "euclidean", "precomputed"}
    ("precomputed": ``fit`` takes a dissimilarity matrix Δ [N, N], not squared), ``solver`` in
    {"auto", "dense", "iterative"}, ``device`` for the dense eigensolver ("auto": CUDA when available).

    Attributes after fitting: ``embedding_`` [N, k] float64, ``eigenvalues_`` (all, descending, for the
    dense solver; the top k for the iterative one), ``captured_``, ``negative_mass_``, ``mass_exact_``,
    ``solver_`` (the one used), ``dissimilarity_matrix_`` (Δ², squared).
    """

    def __init__(self, n_components: int = 2, metric: str = "cosine", solver: str = "auto",
                 device: str | torch.device | None = "cpu", random_state: int = 0):
        self.n_components = n_components
        self.metric = metric
        self.solver = solver
        self.device = device
        self.random_state = random_state

    # --- entry points ---
    def fit(self, X, y=None) -> "ClassicalMDS":
        """X: [N, P] vectors (numpy or torch), or Δ [N, N] when metric == "precomputed"."""
        if self.metric == "precomputed":
            D = np.asarray(X.detach().cpu().numpy() if isinstance(X, torch.Tensor) else X, np.float64)
            if D.ndim != 2 or D.shape[0] != D.shape[1]:
                raise ValueError(f"precomputed dissimilarities must be square, got shape {D.shape}")
            return self.fit_from_squared(D ** 2)
        Xt = torch.as_tensor(X.detach() if isinstance(X, torch.Tensor) else np.asarray(X))
        if Xt.ndim != 2:
            raise ValueError(f"X must be [N, P], got shape {tuple(Xt.shape)}")
        if not torch.isfinite(Xt).all():
            raise ValueError("X contains NaN or Inf")
        if not Xt.is_floating_point():
            Xt = Xt.to(torch.float64)
        offsets = torch.tensor([0, Xt.shape[1]], dtype=torch.int64)
        G = segment_gram(Xt, offsets)[0]
        return self.fit_from_gram(G)

    def fit_transform(self, X, y=None) -> np.ndarray:
        return self.fit(X).embedding_

    def fit_from_gram(self, G) -> "ClassicalMDS":
        """G: Gram [N, N] of the vectors (dot products), e.g. a sum of per-tensor `segment_gram` Grams."""
        metric = self.metric
        if metric == "precomputed":
            raise ValueError("fit_from_gram needs metric cosine, chordal or euclidean, not 'precomputed'")
        return self.fit_from_squared(squared_dissimilarity(G, metric))

    def fit_from_squared(self, D2) -> "ClassicalMDS":
        """D2: squared dissimilarities Δ² [N, N]."""
        D2 = np.asarray(D2, dtype=np.float64)
        n = D2.shape[0]
        k = int(self.n_components)
        if k < 1:
            raise ValueError(f"n_components must be >= 1, got {k}")
        if n < 2:
            raise ValueError(f"classical MDS needs at least 2 points, got {n}")
        if not np.isfinite(D2).all():
            raise ValueError("dissimilarities contain NaN or Inf")
        self.dissimilarity_matrix_ = D2
        solver = self.solver
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
        if solver == "auto":
            solver = "dense" if n <= DENSE_MAX_N else "iterative"
        if solver == "iterative" and k + 1 >= n:
            solver = "dense"  # ARPACK needs k < N - 1
        if solver == "dense":
            vals, V, mass = dense_topk(double_center(D2), k, self.device)
        else:
            # Euclidean and chordal Δ² give a positive semidefinite B: no negative spectrum to look for.
            with one_blas_thread():  # matrix-vector products: threads only add sync overhead
                vals, V, mass = iterative_topk(D2, k, self.random_state,
                                                psd=self.metric in ("euclidean", "chordal"))
        self.solver_ = solver
        top = vals[:k] if solver == "dense" else vals
        if top.shape[0] < k:  # more dims than points
            warnings.warn(f"asked for {k} dims but only {top.shape[0]} eigenpairs exist", stacklevel=2)
        coords = np.zeros((n, k))
        kk = min(k, V.shape[1])
        bad = [m for m in range(kk) if top[m] <= 0]
        if bad:
            warnings.warn(f"MDS dimension(s) {[m + 1 for m in bad]} have eigenvalue <= 0 "
                          f"({[float(top[m]) for m in bad]}): their coordinates are set to 0", stacklevel=2)
        scale = np.sqrt(np.maximum(top[:kk], 0.0))
        coords[:, :kk] = V[:, :kk] * scale
        self.embedding_ = coords
        self.eigenvalues_ = vals
        self.captured_, self.negative_mass_, self.mass_exact_ = mass
        self.n_samples_ = n
        return self
