"""An independent classical MDS of 1 - cos in float64 NumPy (no pylandscape code), for checking the
embeddings the experiments save: B = -1/2 J Δ² J with Δ_ij = 1 - cos(w_i, w_j), coordinates
sqrt(λ_m) v_m of the top eigenpairs, captured = top-k positive eigenvalue mass / all positive mass."""
from __future__ import annotations

import numpy as np


def cosine_mds(x: np.ndarray, k: int = 2) -> tuple[np.ndarray, float]:
    """(coords [N, k], captured) of the rows of x [N, P]."""
    x = np.asarray(x, dtype=np.float64)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    cos = np.clip((x @ x.T) / np.outer(norms, norms), -1.0, 1.0)
    d2 = (1.0 - cos) ** 2
    np.fill_diagonal(d2, 0.0)
    n = x.shape[0]
    j = np.eye(n) - 1.0 / n
    b = -0.5 * j @ d2 @ j
    w, v = np.linalg.eigh((b + b.T) / 2)
    w, v = w[::-1], v[:, ::-1]
    captured = float(w[:k][w[:k] > 0].sum() / w[w > 0].sum())
    return v[:, :k] * np.sqrt(np.maximum(w[:k], 0.0)), captured


def assert_same_embedding(coords, ref: np.ndarray, *, atol: float) -> None:
    """Equal up to the sign of each axis (an eigenvector's sign is arbitrary)."""
    coords = np.asarray(coords, dtype=np.float64)
    assert coords.shape == ref.shape, (coords.shape, ref.shape)
    for m in range(ref.shape[1]):
        s = 1.0 if np.dot(coords[:, m], ref[:, m]) >= 0 else -1.0
        np.testing.assert_allclose(s * coords[:, m], ref[:, m], atol=atol, rtol=0)
