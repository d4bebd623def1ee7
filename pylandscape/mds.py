"""Classical (Torgerson) MDS of weight snapshots: where training went, as a 2-D map.

What is computed, exactly
-------------------------
From the per-tensor Gram matrices G_l[i, j] = <w_i, w_j> restricted to the selected tensors
(G = sum of the selected G_l), with c_ij = G_ij / sqrt(G_ii G_jj):

* ``metric="cosine"`` (default, the paper's): Δ_ij = 1 - c_ij, squared dissimilarities Δ²_ij = (1 - c_ij)².
* ``metric="chordal"``: Δ_ij = sqrt(2 (1 - c_ij)) = ||w_i/|w_i| - w_j/|w_j| ||, so Δ² = 2 (1 - c_ij)
  and the map is exactly PCA of the normalised weights.
* ``metric="euclidean"``: Δ² = G_ii + G_jj - 2 G_ij = ||w_i - w_j||² (PCA of the raw weights).

Then B = -1/2 J Δ² J with J = I - 11ᵀ/N, its top-k eigenpairs (λ_m, v_m) give coordinates
x_m = sqrt(λ_m) v_m. 1 - cos is not a Euclidean distance, so B can have negative eigenvalues: we report
``captured_`` = sum of the k selected positive eigenvalues / sum of all positive eigenvalues and
``negative_mass_`` = sum |negative eigenvalues| / sum |all eigenvalues|. A selected eigenvalue <= 0 gives
a warning and a zero coordinate (never the square root of a negative number).

Solvers: ``dense`` (float64 LAPACK: one tridiagonalisation, all eigenvalues, top-k eigenvectors;
torch.linalg.eigh on CUDA) for N <= 3000; ``iterative`` (Lanczos
via ARPACK with the centering J applied matrix-free, top-k only) above. For the iterative solver the
positive/negative mass comes from the trace and the most negative eigenvalues it also computes
(``mass_exact_`` is False then).

Gram cache
----------
The expensive part is one pass over the snapshots computing the Gram of every tensor ([L, N, N] float64).
It is saved as ``<snapshots>/.pylandscape-cache/gram-<key>.safetensors`` (or under ``--cache-dir`` when
the folder is read-only), where ``key`` hashes the parameter spec and, for every snapshot, its
(relative path, size, mtime_ns). A cache file whose rows cover the requested snapshots is reused, so a
second run for another layer, metric or subset skips reading the weights entirely.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .devices import resolve_device
from .flat import ParamSpec
from .ops import segment_gram

DENSE_MAX_N = 3000
METRICS = ("cosine", "chordal", "euclidean")
SOLVERS = ("auto", "dense", "iterative")


# ======================================================================================
# Classical MDS estimator
# ======================================================================================

def squared_dissimilarity(G: torch.Tensor | np.ndarray, metric: str = "cosine") -> np.ndarray:
    """Δ² [N, N] float64 from a Gram [N, N] (see the module docstring for each metric)."""
    G = np.asarray(G.detach().cpu().numpy() if isinstance(G, torch.Tensor) else G, dtype=np.float64)
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    d = np.diag(G).copy()
    if metric == "euclidean":
        D2 = d[:, None] + d[None, :] - 2.0 * G
        np.fill_diagonal(D2, 0.0)
        return np.maximum(D2, 0.0)
    if np.any(_zero_norm(d)):
        bad = np.flatnonzero(_zero_norm(d))
        raise ValueError(f"snapshot(s) {bad[:10].tolist()} have zero norm in the selected tensors: "
                         f"cosine is undefined for them")
    # sqrt(G_ii G_jj) in one go: duplicates get 1 - cos = 0 exactly. In place on one N x N buffer (fresh
    # N x N temporaries cost more in page faults than in arithmetic).
    omc = np.multiply.outer(d, d)
    np.sqrt(omc, out=omc)
    np.divide(G, omc, out=omc)
    np.clip(omc, -1.0, 1.0, out=omc)
    np.subtract(1.0, omc, out=omc)
    np.fill_diagonal(omc, 0.0)
    out = _symmetrize(omc)  # symmetric even if G is not exactly
    if metric == "cosine":
        return np.square(out, out=out)
    out *= 2.0
    return out


def _symmetrize(A: np.ndarray, tile: int = 256) -> np.ndarray:
    """A := (A + A^T) / 2 in place, tile by tile (a plain A + A.T walks A.T across the cache: ~20x slower)."""
    n = A.shape[0]
    for i in range(0, n, tile):
        a = A[i:i + tile, i:i + tile]
        a += a.T.copy()
        a *= 0.5
        for j in range(i + tile, n, tile):
            u, l = A[i:i + tile, j:j + tile], A[j:j + tile, i:i + tile]
            u += l.T
            u *= 0.5
            l[...] = u.T
    return A


def _zero_norm(sq_norms: np.ndarray) -> np.ndarray:
    """Rows whose squared norm is 0 up to the Gram's round-off (a shifted Gram leaves ~1e-16 |w|^2)."""
    return sq_norms <= 1e-13 * max(float(np.max(sq_norms)), 0.0)


def double_center(D2: np.ndarray) -> np.ndarray:
    """B = -1/2 J Δ² J without forming J (O(N²)), symmetrised."""
    S = _symmetrize(np.array(D2, dtype=np.float64, order="C"))
    r = S.mean(axis=1)
    S -= r[:, None]
    S -= r[None, :]
    S += r.mean()
    S *= -0.5
    return S


def _fix_signs(V: np.ndarray) -> np.ndarray:
    """Deterministic orientation: the largest-|.| entry of each eigenvector is positive."""
    idx = np.argmax(np.abs(V), axis=0)
    s = np.sign(V[idx, np.arange(V.shape[1])])
    s[s == 0] = 1
    return V * s


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
        """G: Gram [N, N] of the vectors (dot products), e.g. a sum of `segment_gram` layers."""
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
            vals, V, mass = _dense_topk(double_center(D2), k, self.device)
        else:
            # Euclidean and chordal Δ² give a positive semidefinite B: no negative spectrum to look for.
            with _one_blas_thread():  # matrix-vector products: threads only add sync overhead
                vals, V, mass = _iterative_topk(D2, k, self.random_state,
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


def _mass(vals_all: np.ndarray, k: int) -> tuple[float, float]:
    pos = vals_all[vals_all > 0].sum()
    neg = -vals_all[vals_all < 0].sum()
    top = vals_all[:k]
    captured = float(top[top > 0].sum() / pos) if pos > 0 else 0.0
    negative = float(neg / (pos + neg)) if pos + neg > 0 else 0.0
    return captured, negative


def _dense_topk(B: np.ndarray, k: int, device) -> tuple[np.ndarray, np.ndarray, tuple]:
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
    captured, negative = _mass(vals, k)
    return vals, _fix_signs(V), (captured, negative, True)


def _one_blas_thread():
    """Context with BLAS limited to one thread: OpenBLAS's threaded dsytrd (level-2 steps with a sync
    per column) ran 100x slower than one thread on a busy 2-core machine (13 s vs 0.13 s, N=800)."""
    try:
        from threadpoolctl import threadpool_limits
        return threadpool_limits(1, user_api="blas")
    except ImportError:
        import contextlib
        return contextlib.nullcontext()


def _tridiagonal_topk(B: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        from scipy.linalg import eigh_tridiagonal, lapack
    except ImportError:  # scipy is optional: a full eigh gives the same numbers, ~3x slower
        w, V = np.linalg.eigh(B)
        return w[::-1].copy(), np.ascontiguousarray(V[:, ::-1][:, :k])
    with _one_blas_thread():
        return _tridiagonal_topk_scipy(B, k, eigh_tridiagonal, lapack)


def _tridiagonal_topk_scipy(B, k, eigh_tridiagonal, lapack) -> tuple[np.ndarray, np.ndarray]:
    n = B.shape[0]
    if n < 3:
        w, V = np.linalg.eigh(B)
        return w[::-1].copy(), np.ascontiguousarray(V[:, ::-1][:, :k])
    lwork, _ = lapack.dsytrd_lwork(n, lower=1)
    c, d, e, tau, info = lapack.dsytrd(B, lower=1, lwork=int(lwork))
    if info != 0:
        raise np.linalg.LinAlgError(f"dsytrd failed (info={info})")
    vals, info = lapack.dsterf(d, e)
    if info != 0:
        raise np.linalg.LinAlgError(f"dsterf failed (info={info})")
    w, z = eigh_tridiagonal(d, e, select="i", select_range=(n - k, n - 1))
    z = np.asfortranarray(z[:, ::-1])
    # Back to B's basis: Q = H_0 ... H_{n-2}, H_i = I - tau_i v v^T with v = (1, c[i+2:, i]) from row i+1,
    # which is what dormtr("L") does by calling dormqr on rows 1.. (scipy exposes dormqr, not dormtr).
    if n > 1:
        a = np.asfortranarray(c[1:, :n - 1])
        zq, _, info = lapack.dormqr("L", "N", a, tau[:n - 1], z[1:], lwork=max(1, 64 * k))
        if info != 0:
            raise np.linalg.LinAlgError(f"dormqr failed (info={info})")
        z[1:] = zq
    return vals[::-1].copy(), np.ascontiguousarray(z)


def _iterative_topk(D2: np.ndarray, k: int, seed: int, psd: bool = False) -> tuple[np.ndarray, np.ndarray, tuple]:
    """Top-k of B = -1/2 J Δ² J by Lanczos (ARPACK) with J applied matrix-free (B is never formed).

    The mass uses trace(B) = sum(Δ²) / 2N and the most negative eigenvalues, also found by Lanczos.
    """
    try:
        from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh
    except ImportError:
        warnings.warn("scipy is not installed: using the dense eigensolver", stacklevel=3)
        return _dense_topk(double_center(D2), k, "cpu")
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
    except ArpackNoConvergence as e:
        raise ValueError(f"the iterative eigensolver did not converge for N={n} (top {k} eigenvalues "
                         f"too close together); use solver='dense'") from None
    order = np.argsort(vals)[::-1]
    vals, V = vals[order], V[:, order]
    trace = float(D2.sum()) / (2.0 * n)
    if psd:
        return vals, _fix_signs(V), (min(float(vals[vals > 0].sum()) / trace, 1.0) if trace > 0 else 0.0,
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
    return vals, _fix_signs(V), (min(captured, 1.0), negative, False)


# ======================================================================================
# embed(): the function the experiments call
# ======================================================================================

@dataclass
class MDSResult:
    """Everything an MDS run produced; figures are drawn from this alone (embedding_plot)."""

    coords: np.ndarray                      # [N, k] float64
    meta: list[dict]                        # one dict per snapshot (path, trajectory, epoch, ...)
    eigenvalues: np.ndarray                 # all (dense) or top k (iterative), descending
    captured: float                         # share of positive eigenvalue mass in the k dims
    negative_mass: float                    # sum |λ<0| / sum |λ|
    metric: str = "cosine"
    layer: str | None = None                # what the user asked for ("2", "conv1.*", None = all)
    selected: list[str] = field(default_factory=list)   # tensor names used
    n_params: int = 0                       # P of the selected tensors
    solver: str = "dense"
    mass_exact: bool = True
    device: str = "cpu"
    timings: dict = field(default_factory=dict)          # seconds per phase
    skipped: list[str] = field(default_factory=list)     # tensors / files left out, with why
    files: dict = field(default_factory=dict)            # kind -> written path
    title: str | None = None

    @property
    def n(self) -> int:
        return int(self.coords.shape[0])

    def describe(self) -> str:
        """One line for titles: what is shown."""
        what = "all parameters" if not self.layer else f"layer {self.layer}"
        k = self.coords.shape[1]
        return (f"classical MDS of {what} ({self.metric}{' = 1 - cos' if self.metric == 'cosine' else ''}), "
                f"N={self.n}, {100 * self.captured:.1f}% of positive eigenvalue mass in {k} dims")

    def to_json(self) -> dict:
        return {
            "metric": self.metric, "layer": self.layer, "selected_tensors": self.selected,
            "n_snapshots": self.n, "n_params": self.n_params, "dims": int(self.coords.shape[1]),
            "eigenvalues": [float(v) for v in self.eigenvalues], "captured": self.captured,
            "negative_mass": self.negative_mass, "mass_exact": self.mass_exact, "solver": self.solver,
            "device": self.device, "timings": self.timings, "skipped": self.skipped, "files": self.files,
        }


def embed(source, *, layer: str | None = None, metric: str = "cosine", dims: int = 2,
          select: str | None = None, out_dir: str | os.PathLike | None = None, annotate: str = "epoch",
          title: str | None = None, device: str = "auto", spec: ParamSpec | None = None,
          trajectory: Sequence[str] | str | None = None, solver: str = "auto",
          cache: bool = True, cache_dir: str | os.PathLike | None = None,
          max_memory: str | int | None = None, progress: bool | None = None,
          formats: Sequence[str] = ("png",), skip_bad: bool = False,
          group_by: str | None = None) -> MDSResult:
    """Classical MDS of snapshots; writes mds.csv/json/png/html into `out_dir` when given.

    source: a folder of checkpoints (any mix of .pt/.pth/.ckpt/.safetensors/.npz, or our store), a
    SnapshotStore, a list of (meta dict, flat tensor [P]) pairs, or an [N, P] tensor; pass `spec`
    (ParamSpec) with in-memory sources to select layers by name or number.
    layer: None (all parameters), a name glob ('conv1.*'; comma-separated for several), or the paper's
    numbering ("2" or "layer2" = the first weight-bearing module's weight and bias).
    select: a filter over metadata such as "stage >= 5 and trajectory in (a, b)".
    """
    from . import snapshots as snap

    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    sset = snap.open_source(source, spec=spec, group_by=group_by, skip_bad=skip_bad)
    timings["discover"] = time.perf_counter() - t0
    rows = sset.filter_rows(select=select, trajectory=trajectory)
    if len(rows) < 3:
        raise ValueError(f"{sset.describe()}: {len(rows)} snapshot(s) selected, MDS needs at least 3")
    tensor_idx = snap.select_tensors(sset.spec, layer)
    t1 = time.perf_counter()
    grams, rows, gram_info = compute_grams(sset, rows, device=device, cache=cache, cache_dir=cache_dir,
                                           max_memory=max_memory, progress=progress, skip_bad=skip_bad)
    timings["gram"] = time.perf_counter() - t1
    timings.update({f"gram_{k}": v for k, v in gram_info.get("timings", {}).items()})
    G = grams[tensor_idx].sum(0)
    _check_norms(G, [sset.meta[r] for r in rows], [sset.spec.names[i] for i in tensor_idx], metric)
    t2 = time.perf_counter()
    est = ClassicalMDS(dims, metric=metric, solver=solver, device=device)
    est.fit_from_gram(G)
    timings["mds"] = time.perf_counter() - t2
    sizes = sset.spec.sizes
    result = MDSResult(
        coords=est.embedding_, meta=[dict(sset.meta[r]) for r in rows], eigenvalues=est.eigenvalues_,
        captured=float(est.captured_), negative_mass=float(est.negative_mass_), metric=metric,
        layer=layer, selected=[sset.spec.names[i] for i in tensor_idx],
        n_params=int(sum(sizes[i] for i in tensor_idx)), solver=est.solver_, mass_exact=est.mass_exact_,
        device=str(resolve_device(device)), timings=timings,
        skipped=list(sset.skipped) + list(gram_info.get("skipped", [])), title=title)
    result.timings["cache"] = gram_info.get("cache", "off")
    if "chunks" in gram_info:  # a pass over the files happened
        result.timings["read_chunks"] = gram_info["chunks"]
        result.timings["read_GBps"] = round(gram_info["read_GBps"], 3)
    if out_dir is not None:
        t3 = time.perf_counter()
        write_outputs(result, out_dir, annotate=annotate, formats=formats)
        result.timings["outputs"] = time.perf_counter() - t3
    result.timings["total"] = time.perf_counter() - t0
    if out_dir is not None:  # rewrite the JSON with the final timings
        _write_json(result, Path(out_dir) / "mds.json")
    return result


# ======================================================================================
# One pass over the snapshots: per-tensor Grams, cached
# ======================================================================================

def parse_memory(s: str | int | None) -> int:
    """Bytes from '4G', '512M', '1.5GB', 1000000; None/'auto': half the available memory."""
    if s is None or (isinstance(s, str) and s.strip().lower() in ("", "auto")):
        avail = None
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        avail = int(line.split()[1]) * 1024
        except OSError:
            pass
        return max(256 << 20, (avail or (8 << 30)) // 2)
    if isinstance(s, (int, float)):
        return int(s)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", s, re.I)
    if not m:
        raise ValueError(f"--max-memory {s!r}: use a size like 512M, 4G or 1.5GB")
    mult = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)


def _cache_dir_for(sset, cache_dir) -> Path | None:
    if cache_dir is not None:
        d = Path(cache_dir)
    else:
        d = sset.root / ".pylandscape-cache"
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = d / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        return d
    except OSError:
        return None


def _spec_hash(spec: ParamSpec) -> str:
    return hashlib.sha256(json.dumps(spec.to_json(), sort_keys=True).encode()).hexdigest()[:16]


def _cache_lookup(d: Path, spec_hash: str, keys: list) -> tuple[torch.Tensor, list[int]] | None:
    """A cached [L, M, M] Gram whose rows include every key: (that Gram, row index of each key)."""
    from safetensors import safe_open
    want = {json.dumps(k): i for i, k in enumerate(keys)}
    exact = d / f"gram-{_rows_hash(spec_hash, keys)}.safetensors"
    candidates = [exact] if exact.exists() else []
    candidates += sorted((p for p in d.glob("gram-*.safetensors") if p != exact),
                         key=lambda p: p.stat().st_mtime, reverse=True)
    for p in candidates:
        try:
            with safe_open(str(p), framework="pt") as f:
                md = f.metadata() or {}
                if md.get("spec") != spec_hash:
                    continue
                rows = json.loads(md["rows"])
                pos = {json.dumps(k): i for i, k in enumerate(rows)}
                if not all(k in pos for k in want):
                    continue
                G = f.get_tensor("gram")
            return G, [pos[k] for k in want]
        except Exception:  # noqa: BLE001 - a broken cache file is ignored, never fatal
            continue
    return None


def _rows_hash(spec_hash: str, keys: list) -> str:
    return hashlib.sha256((spec_hash + json.dumps(keys)).encode()).hexdigest()[:20]


def compute_grams(sset, rows: list[int], *, device="auto", cache: bool = True, cache_dir=None,
                  max_memory=None, progress: bool | None = None, skip_bad: bool = False,
                  on_warning=None) -> tuple[torch.Tensor, list[int], dict]:
    """Per-tensor Grams [L, n, n] float64 of the given rows, from the cache or one pass over the files.

    Reads column ranges of all rows into a float32 buffer of at most `max_memory` bytes, so N x P
    larger than RAM works (each file is read once in total). Returns (grams, rows kept, info).
    """
    from .snapshots import SnapshotError
    from .store import atomic_save_safetensors
    warn = on_warning or (lambda m: warnings.warn(m, stacklevel=3))
    info: dict[str, Any] = {"timings": {}, "skipped": []}
    spec = sset.spec
    dev = resolve_device(device)
    d = None
    keys = None
    if cache and sset.cacheable:
        keys = [sset.file_key(r) for r in rows]
        d = _cache_dir_for(sset, cache_dir)
        if d is None:
            warn(f"{sset.root} is read-only: Gram not cached (pass --cache-dir to cache it elsewhere)")
            info["cache"] = "unwritable"
        else:
            t = time.perf_counter()
            hit = _cache_lookup(d, _spec_hash(spec), keys)
            if hit is not None:
                G, idx = hit
                info["timings"]["cache_read"] = time.perf_counter() - t
                info["cache"] = "hit"
                if idx != list(range(G.shape[1])):  # a subset or another order of the cached rows
                    ix = torch.as_tensor(idx)
                    G = G[:, ix][:, :, ix].contiguous()
                return G, rows, info
            info["cache"] = "miss"
    n = len(rows)
    L = len(spec)
    show = sys.stderr.isatty() if progress is None else bool(progress)
    budget = parse_memory(max_memory)
    # a third of the budget for the float32 rows, the rest for the Gram kernel's float64 copies
    cols = max(1, budget // max(1, 3 * 4 * n))
    P = spec.numel
    grams = torch.zeros(L, n, n, dtype=torch.float64)
    bad: dict[int, str] = {}
    t_read = t_gram = 0.0
    read_bytes = 0
    chunks = list(range(0, P, cols))
    for ci, c0 in enumerate(chunks):
        c1 = min(P, c0 + cols)
        pieces = sset.plan_pieces(c0, c1)
        t = time.perf_counter()
        desc = "reading snapshots" + (f" ({ci + 1}/{len(chunks)})" if len(chunks) > 1 else "")
        buf = sset.read_block(rows, pieces, progress=progress, desc=desc)
        t_read += time.perf_counter() - t
        read_bytes += buf.nbytes
        for r in range(n):
            if r in bad:
                continue
            if not np.isfinite(buf[r]).all():
                c = 0
                for ti, a, b in pieces:
                    if not np.isfinite(buf[r, c:c + b - a]).all():
                        bad[r] = f"{sset.meta[rows[r]]['path']}: tensor {spec.names[ti]!r} has NaN or Inf weights"
                        break
                    c += b - a
        if bad and not skip_bad:
            raise SnapshotError(next(iter(bad.values())))
        for r in bad:
            buf[r] = 0.0  # dropped below; zeros keep the Gram finite meanwhile
        t = time.perf_counter()
        lens = [b - a for _, a, b in pieces]
        offs = torch.tensor([0] + list(np.cumsum(lens)), dtype=torch.int64)
        # the buffer already respects --max-memory: let the op take it in one call
        g = segment_gram(torch.from_numpy(buf), offs, device=dev, progress=show,
                         memory_budget=max(buf.nbytes, 1 << 20))
        for j, (ti, _, _) in enumerate(pieces):
            grams[ti] += g[j].to("cpu", torch.float64)
        t_gram += time.perf_counter() - t
        del buf
    info["timings"].update({"read": t_read, "segment_gram": t_gram})
    info["read_GBps"] = read_bytes / max(t_read, 1e-9) / 1e9
    info["chunks"] = len(chunks)
    if bad:
        for msg in bad.values():
            warn(f"skipped: {msg}")
        info["skipped"] = list(bad.values())
        keep = [r for r in range(n) if r not in bad]
        ix = torch.as_tensor(keep)
        grams = grams[:, ix][:, :, ix].contiguous()
        rows = [rows[r] for r in keep]
        keys = [keys[r] for r in keep] if keys is not None else None
    if d is not None and keys is not None:
        sh = _spec_hash(spec)
        try:
            atomic_save_safetensors(d / f"gram-{_rows_hash(sh, keys)}.safetensors", {"gram": grams},
                                    metadata={"spec": sh, "rows": json.dumps(keys)})
            info["cache"] = "written"
        except OSError as e:
            warn(f"could not write the Gram cache in {d}: {e}")
    return grams, rows, info


def _check_norms(G: torch.Tensor, metas: list[dict], names: list[str], metric: str) -> None:
    if metric == "euclidean":
        return
    zero = np.flatnonzero(_zero_norm(torch.diagonal(G).cpu().numpy())).tolist()
    if zero:
        from .snapshots import SnapshotError
        raise SnapshotError(f"{metas[zero[0]]['path']}: the selected tensors ({', '.join(names[:6])}"
                            f"{', ...' if len(names) > 6 else ''}) are all zero: cosine is undefined "
                            f"({len(zero)} snapshot(s) like this; try --metric euclidean or another --layer)")


# ======================================================================================
# Outputs: mds.csv, mds.json, mds.png (svg/pdf), mds.html
# ======================================================================================

def coord_names(k: int) -> list[str]:
    """x, y (k=2); x, y, z (k=3); x1..xk otherwise."""
    if k == 1:
        return ["x"]
    if k <= 3:
        return ["x", "y", "z"][:k]
    return [f"x{i + 1}" for i in range(k)]


def _meta_columns(meta: list[dict]) -> list[str]:
    from .store import META_FIELDS
    seen: dict[str, None] = {}
    for m in meta:
        for k in m:
            if k != "path":
                seen.setdefault(k, None)
    first = [c for c in META_FIELDS if c in seen]
    return first + sorted(c for c in seen if c not in first)


def write_csv(result: MDSResult, path: Path) -> Path:
    import csv
    cn = coord_names(result.coords.shape[1])
    mc = _meta_columns(result.meta)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path"] + cn + mc)
        for xy, m in zip(result.coords, result.meta):
            w.writerow([m.get("path", "")] + [repr(float(v)) for v in xy]
                       + ["" if m.get(c) is None else m.get(c) for c in mc])
    return path


def _write_json(result: MDSResult, path: Path) -> Path:
    path.write_text(json.dumps(result.to_json(), indent=2, default=str) + "\n")
    return path


def write_outputs(result: MDSResult, out_dir, *, annotate: str = "epoch",
                  formats: Sequence[str] = ("png",), html: bool = True) -> dict:
    """Write mds.csv, mds.json, the figure in each format and mds.html into out_dir."""
    from . import embedding_plot as ep
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result.files["csv"] = str(write_csv(result, out / "mds.csv"))
    for fmt in formats:
        p = out / f"mds.{fmt}"
        ep.plot_result(result, p, annotate=annotate)
        result.files[fmt] = str(p)
    if html:
        result.files["html"] = str(ep.write_html(result.coords, result.meta, out / "mds.html",
                                                 title=result.title or ep.title_for(result)))
    result.files["json"] = str(out / "mds.json")
    _write_json(result, out / "mds.json")
    return result.files


# ======================================================================================
# Command line
# ======================================================================================

EPILOG = """\
examples:
  python -m pylandscape.mds --snapshots ckpts/
      all parameters, 1 - cos (the paper's metric), 2-D map in ./mds_out/
  python -m pylandscape.mds --snapshots ckpts/ --layer 2 --annotate train_error
      only the paper's layer 2 (the first conv/linear module: its weight and bias)
  python -m pylandscape.mds --snapshots runs/sgd --layer 'features.0.*' --select 'stage >= 5'
  python -m pylandscape.mds --snapshots ckpts/ --group-by '(?P<traj>seed\\d+)/.*?(?P<step>\\d+)\\.pt$'

input: every .pt/.pth/.ckpt/.safetensors/.npz file below --snapshots (state_dicts, also nested under
"state_dict" or "model" as Lightning saves them) and pylandscape stores. Files are never unpickled
beyond tensors. Folder = trajectory, last number in the file name = step (override with --group-by).
BatchNorm running statistics are not weights and are skipped.

outputs in --out: mds.csv (path, x, y[, z | x1..xk], metadata), mds.png (or --format), mds.json
(eigenvalues, captured share, timings) and mds.html (hover a point to see its file and errors).
The per-tensor Gram is cached in <snapshots>/.pylandscape-cache/, so re-running with another --layer,
--metric, --select or --trajectory takes well under a second.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pylandscape.mds",
        description="Classical MDS of a folder of checkpoints: a 2-D map of where training went in "
                    "weight space (Liao & Poggio's Figs. 3, 8-13).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--snapshots", required=True, metavar="DIR",
                   help="folder (searched recursively) or single store of checkpoints")
    p.add_argument("--layer", default=None,
                   help="which weights: a name glob ('conv1.*', 'features.0.weight', comma-separated for "
                        "several) or the paper's layer number ('2' or 'layer2' = first conv/linear module; "
                        "layer 1 is the input). Default: all parameters")
    p.add_argument("--metric", choices=METRICS, default="cosine",
                   help="cosine: 1 - cos (the paper's, default); chordal: sqrt(2(1 - cos)) = PCA of "
                        "normalised weights; euclidean: ||w_i - w_j|| = PCA of the weights")
    p.add_argument("--dims", type=int, default=2, help="number of MDS dimensions (default 2)")
    p.add_argument("--select", default=None,
                   help="filter on metadata, e.g. 'stage >= 5', 'epoch < 100 and trajectory in (a, b)'")
    p.add_argument("--trajectory", action="append", default=None, metavar="NAME",
                   help="only this trajectory (repeat for several)")
    p.add_argument("--group-by", default=None, metavar="REGEX",
                   help="regex on the relative path with named groups 'traj' (and 'step') "
                        "that defines trajectories and time order")
    p.add_argument("--out", default="mds_out", metavar="DIR", help="output folder (default ./mds_out)")
    p.add_argument("--format", default="png", choices=("png", "svg", "pdf"),
                   help="also write the figure as mds.svg or mds.pdf (mds.png is always written)")
    p.add_argument("--annotate", default="epoch",
                   help="label points with this metadata column: epoch (default), train_error, step, none")
    p.add_argument("--title", default=None, help="figure title (default: what is shown)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="where the Gram and eigensolver run (auto: CUDA when available)")
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="bound on the weights held in memory at once, e.g. 4G (default: half the free RAM)")
    p.add_argument("--solver", default="auto", choices=SOLVERS,
                   help=f"eigensolver: dense for N <= {DENSE_MAX_N}, iterative (Lanczos) above (auto)")
    p.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="where to cache the Gram (default <snapshots>/.pylandscape-cache)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the Gram cache")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip unreadable, mismatched or non-finite checkpoints with a warning")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def say(msg: str) -> None:
        print(msg, file=sys.stderr)

    try:
        if args.dims < 1:
            raise ValueError(f"--dims must be >= 1, got {args.dims}")
        from . import snapshots as snap
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = lambda m, *a, **k: say(f"warning: {m}")
            sset = snap.open_source(args.snapshots, group_by=args.group_by, skip_bad=args.skip_bad)
            idx = snap.select_tensors(sset.spec, args.layer)
            sizes = sset.spec.sizes
            names = [sset.spec.names[i] for i in idx]
            shown = ", ".join(f"{sset.spec.names[i]} {list(sset.spec.shapes[i])}" for i in idx[:12])
            say(f"{len(sset)} snapshots in {len({str(m.get('trajectory')) for m in sset.meta})} "
                f"trajectories; tensors used ({len(names)}, {sum(sizes[i] for i in idx):,} params): "
                f"{shown}{' ...' if len(idx) > 12 else ''}")
            for s in sset.skipped:
                say(f"note: {s}")
            cols = {k for m in sset.meta for k in m}
            if args.annotate not in ("none", "") and args.annotate not in cols:
                say(f"warning: --annotate {args.annotate}: no such metadata column (have "
                    f"{', '.join(sorted(cols))}); points are not labelled")
                args.annotate = "none"
            res = embed(sset, layer=args.layer, metric=args.metric, dims=args.dims, select=args.select,
                        trajectory=args.trajectory, out_dir=args.out, annotate=args.annotate,
                        title=args.title, device=args.device, solver=args.solver,
                        cache=not args.no_cache, cache_dir=args.cache_dir, max_memory=args.max_memory,
                        progress=False if args.no_progress else None,
                        formats=tuple(dict.fromkeys(("png", args.format))),
                        skip_bad=args.skip_bad)
    except (ValueError, FileNotFoundError, OSError, KeyError) as e:
        if args.debug:
            raise
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if isinstance(e, KeyError):
            msg = str(e.args[0]) if e.args else msg
        say(f"error: {msg}")
        return 2
    ev = ", ".join(f"{v:.4g}" for v in res.eigenvalues[:args.dims])
    say(f"MDS ({res.metric}, {res.solver} solver) of {res.n} snapshots x {res.n_params:,} params: "
        f"eigenvalues {ev}; {100 * res.captured:.1f}% of positive mass captured, "
        f"negative mass {100 * res.negative_mass:.1f}%")
    t = res.timings
    say(f"time: gram {t.get('gram', 0):.2f}s (cache {t.get('cache')}), mds {t.get('mds', 0):.3f}s, "
        f"outputs {t.get('outputs', 0):.2f}s, total {t.get('total', 0):.2f}s")
    say(f"wrote {', '.join(sorted(res.files.values()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
