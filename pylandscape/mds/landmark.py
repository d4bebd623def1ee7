"""Landmark MDS (de Silva & Tenenbaum 2004) for more snapshots than an N x N Gram allows.

1. Landmarks: m snapshots drawn uniformly at random (seeded; the default), or by max-min distance
   (de Silva & Tenenbaum's choice) in a sketch: each snapshot's selected weights projected on
   `sketch_dims` Gaussian directions (scaled by 1/|w| for cosine and chordal), first landmark the
   snapshot farthest from the centroid. The sketch only picks landmarks: no distance of the map comes
   from it. Random is the default because it was 3-30x more accurate on SGD trajectories (Procrustes
   residual against the full classical MDS, table in docs/scaling.md): max-min picks the rim of the
   cloud, whose centre and principal axes differ from the whole set's.
2. G [N, m] = <w_i, w_landmark> with the accurate `segment_gram` kernel in its X/Y form (one more pass
   over the files, column chunk by column chunk), and the squared norms |w_i|^2 (float64 sums of the
   float32 weights' exact squares).
3. Classical MDS of the m x m landmark dissimilarities (ClassicalMDS), then every snapshot is placed by
   the triangulation x_a = -1/2 L# (δ_a - δ_mean), L# = rows v_k / sqrt(λ_k): for a landmark this gives
   its classical-MDS coordinates exactly, and with m = N the whole map is classical MDS.

Memory O(N m) (G, Δ²) + the read buffer (--max-memory); work O(N m P) in the kernel.
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from ..devices import resolve_device
from ..ops import segment_gram
from ..snapshots import open_source, select_tensors
from .dissimilarity import METRICS, cosine_distance_from_gram, symmetrize
from .estimator import ClassicalMDS
from .outputs import write_json, write_outputs
from .pipeline import MDSResult, parse_memory

#: landmarks used by `--landmarks auto` (chosen from the accuracy table in docs/scaling.md)
DEFAULT_LANDMARKS = 1000
#: `--landmarks auto` switches to landmark MDS above this many snapshots (the summed fp64 Gram alone is
#: then over 3.2 GB, and the per-tensor Grams L times that)
AUTO_LANDMARKS_N = 20_000
#: Gaussian directions of the sketch that picks the landmarks
SKETCH_DIMS = 128
SELECTIONS = ("maxmin", "random")
#: rows per float64 block when summing the squared norms (and the sketch)
NORM_ROWS = 2048
#: memory of the process besides the arrays (Python, torch, the reader), measured: ~0.48 GiB
RESIDENT_BYTES = 512 << 20

ChunkReader = Callable[[], Iterator[torch.Tensor]]   # yields float32 [N, c] column chunks, restartable


def maxmin_landmarks(F: np.ndarray, m: int) -> np.ndarray:
    """m row indices of F [N, k] by max-min Euclidean distance (greedy farthest-point), O(N m k)."""
    n = F.shape[0]
    if not 1 <= m <= n:
        raise ValueError(f"number of landmarks must be in [1, {n}], got {m}")
    F = np.asarray(F, dtype=np.float64)
    sq = np.einsum("ij,ij->i", F, F)
    mu = F.mean(axis=0)
    first = int(np.argmax(np.einsum("ij,ij->i", F - mu, F - mu)))
    chosen = np.empty(m, dtype=np.int64)
    chosen[0] = first
    dmin = sq + sq[first] - 2.0 * (F @ F[first])
    dmin[first] = -np.inf
    for t in range(1, m):
        nxt = int(np.argmax(dmin))
        chosen[t] = nxt
        d = sq + sq[nxt] - 2.0 * (F @ F[nxt])
        np.minimum(dmin, d, out=dmin)
        dmin[chosen[:t + 1]] = -np.inf
    return chosen


def squared_from_cross_gram(G: torch.Tensor, nx: torch.Tensor, ny: torch.Tensor, metric: str) -> np.ndarray:
    """Δ² [N, m] float64 from a cross Gram G [N, m] and the squared norms of both sides."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if metric == "euclidean":
        D2 = nx.unsqueeze(1) + ny.unsqueeze(0) - 2.0 * G
        return D2.clamp_(min=0.0).numpy()
    C = cosine_distance_from_gram(G, nx, ny)
    return (C.square_() if metric == "cosine" else C.mul_(2.0)).numpy()


def triangulate(D2_landmarks: np.ndarray, D2_points: np.ndarray, n_components: int, solver: str = "auto",
                device="cpu") -> tuple[np.ndarray, ClassicalMDS]:
    """Coordinates [N, k] of points from their Δ² to the landmarks [N, m], and the landmarks' MDS."""
    est = ClassicalMDS(n_components, metric="precomputed", solver=solver, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an eigenvalue <= 0 is handled (and reported) below
        est.fit_from_squared(D2_landmarks)
    k = est.embedding_.shape[1]
    lam = np.asarray(est.eigenvalues_[:k], dtype=np.float64)
    good = lam > 0
    # L# = V^T / sqrt(λ) and V sqrt(λ) = the landmark coordinates, so L#^T = coords / λ
    pinv_t = np.zeros_like(est.embedding_)
    pinv_t[:, good] = est.embedding_[:, good] / lam[good]
    mean = D2_landmarks.mean(axis=0)
    return -0.5 * (D2_points - mean) @ pinv_t, est


def _check_norms(norms: torch.Tensor, metric: str, norm_error) -> None:
    if metric == "euclidean":
        return
    zero = torch.nonzero(norms <= 0).reshape(-1)
    if zero.numel():
        msg = norm_error(int(zero[0])) if norm_error else f"row {int(zero[0])} is all zero"
        raise ValueError(f"{msg}: cosine is undefined (try --metric euclidean or another --layer)")


def landmark_map(chunks: ChunkReader, n: int, m: int, *, metric: str = "cosine", n_components: int = 2,
                 sketch_dims: int = SKETCH_DIMS, seed: int = 0, device="cpu", solver: str = "auto",
                 norm_error: Callable[[int], str] | None = None, selection: str = "random") -> dict:
    """The three steps on column chunks of N rows (each chunk float32 [N, c]): coords, landmarks, ...

    selection: "random" (uniform, seeded) or "maxmin" (de Silva & Tenenbaum's max-min in the sketch).
    """
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    dev = resolve_device(device)
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(int(seed))
    norms = torch.zeros(n, dtype=torch.float64)
    G = torch.zeros(n, m, dtype=torch.float64)

    def gram_pass(buf: torch.Tensor, lm: torch.Tensor) -> None:
        offs = torch.tensor([0, buf.shape[1]], dtype=torch.int64)
        G.add_(segment_gram(buf, offs, Y=buf.index_select(0, lm), device=dev)[0].to("cpu", torch.float64))

    def norms_pass(buf: torch.Tensor, proj: torch.Tensor | None = None) -> None:
        # float64 in row blocks: squares of fp32 values are exact in fp64; a whole-chunk fp64 copy and
        # its square were 4x the chunk's memory (peak RSS 6.3 GiB under --max-memory 4G at N = 50,000,
        # P = 12,974) and took longer than the kernel (page faults)
        for a in range(0, buf.shape[0], NORM_ROWS):
            blk = buf[a:a + NORM_ROWS].to(torch.float64, copy=True)  # a copy also of fp64 input
            if proj is not None:
                F[a:a + NORM_ROWS] += blk @ proj
            norms[a:a + NORM_ROWS] += blk.square_().sum(1)

    if selection == "random":
        # landmarks known before reading: one pass gives the norms and G
        idx = np.sort(np.random.default_rng(seed).choice(n, size=m, replace=False))
        lm = torch.as_tensor(idx)
        t1 = t2 = time.perf_counter()
        for buf in chunks():
            norms_pass(buf)
            gram_pass(buf, lm)
            del buf  # before the next chunk is read: one chunk in memory at a time
        _check_norms(norms, metric, norm_error)
    else:
        F = torch.zeros(n, sketch_dims, dtype=torch.float64)
        for buf in chunks():
            norms_pass(buf, torch.randn(buf.shape[1], sketch_dims, generator=gen, dtype=torch.float64))
            del buf
        t1 = time.perf_counter()
        _check_norms(norms, metric, norm_error)
        if metric != "euclidean":
            F /= norms.sqrt().unsqueeze(1)
        idx = maxmin_landmarks(F.numpy(), m)
        lm = torch.as_tensor(idx)
        t2 = time.perf_counter()
        for buf in chunks():
            gram_pass(buf, lm)
            del buf
    t3 = time.perf_counter()
    D2 = squared_from_cross_gram(G, norms, norms[lm], metric)
    del G
    D2_L = symmetrize(np.ascontiguousarray(D2[idx]))
    np.fill_diagonal(D2_L, 0.0)
    coords, est = triangulate(D2_L, D2, n_components, solver=solver, device=dev)
    t4 = time.perf_counter()
    return {"coords": coords, "landmarks": idx, "mds": est,
            "timings": {"sketch": t1 - t0, "maxmin": t2 - t1, "landmark_gram": t3 - t2, "mds": t4 - t3,
                        "read_passes": 1 if selection == "random" else 2}}


class LandmarkMDS:
    """Landmark MDS of the rows of X [N, P] (scikit-learn-like; ClassicalMDS for the full version).

    selection: "random" (default) or "maxmin" (see the module docstring for why).
    Attributes after fit: embedding_ [N, k], landmarks_ (row indices), eigenvalues_ (of the landmarks'
    B), captured_ / negative_mass_ (of the landmarks' spectrum).
    """

    def __init__(self, n_components: int = 2, n_landmarks: int = DEFAULT_LANDMARKS, metric: str = "cosine",
                 sketch_dims: int = SKETCH_DIMS, random_state: int = 0, device="cpu",
                 selection: str = "random"):
        self.n_components = n_components
        self.selection = selection
        self.n_landmarks = n_landmarks
        self.metric = metric
        self.sketch_dims = sketch_dims
        self.random_state = random_state
        self.device = device

    def fit(self, X, y=None) -> "LandmarkMDS":
        Xt = torch.as_tensor(X.detach() if isinstance(X, torch.Tensor) else np.asarray(X))
        if Xt.ndim != 2:
            raise ValueError(f"X must be [N, P], got shape {tuple(Xt.shape)}")
        if not torch.isfinite(Xt).all():
            raise ValueError("X contains NaN or Inf")
        Xt = Xt.cpu() if Xt.is_floating_point() else Xt.cpu().to(torch.float64)
        m = min(int(self.n_landmarks), Xt.shape[0])
        res = landmark_map(lambda: iter([Xt]), Xt.shape[0], m, metric=self.metric,
                           n_components=self.n_components, sketch_dims=self.sketch_dims,
                           seed=self.random_state, device=self.device, selection=self.selection)
        self._set(res)
        return self

    def fit_transform(self, X, y=None) -> np.ndarray:
        return self.fit(X).embedding_

    def _set(self, res: dict) -> None:
        est = res["mds"]
        self.embedding_ = res["coords"]
        self.landmarks_ = res["landmarks"]
        self.eigenvalues_ = est.eigenvalues_
        self.captured_, self.negative_mass_ = est.captured_, est.negative_mass_
        self.timings_ = res["timings"]


def chunk_columns(budget: int, n: int, m: int, what=None) -> int:
    """Columns per chunk so that the peak memory stays within `budget` bytes.

    Measured at N = 50,000 (bench/landmark_scale.py, docs/scaling.md section 2): peak RSS = about
    0.48 GiB (Python, torch) + 4 N c (the float32 chunk of c columns) + 25.5 N m (G, the kernel's
    [N, m] result for a chunk and about one more [N, m] float64 temporary), within 0.03 GiB over five
    runs. The chunk gets half of what the fixed part leaves (the margin)."""
    fixed = RESIDENT_BYTES + 26 * n * m
    if budget <= fixed:
        raise ValueError(f"--max-memory {what or budget}: too small for landmark MDS of {n} snapshots with {m} "
                         f"landmarks, which holds {fixed / 2**30:.1f} GiB besides the weights (26 N m bytes "
                         f"+ {RESIDENT_BYTES >> 20} MiB); give more memory or fewer --landmarks")
    return max(1, (budget - fixed) // (2 * 4 * n))


def _file_chunks(sset, rows: list[int], tensor_idx: list[int], cols: int) -> ChunkReader:
    """Column chunks (float32 [n, <= cols]) of the selected tensors of the snapshots `rows`."""
    spec = sset.spec
    sizes = spec.sizes
    plan, cur, width = [], [], 0
    for t in tensor_idx:
        a = 0
        while a < sizes[t]:
            b = min(sizes[t], a + cols - width)
            cur.append((t, a, b))
            width += b - a
            a = b
            if width == cols:
                plan.append(cur)
                cur, width = [], 0
    if cur:
        plan.append(cur)

    def read() -> Iterator[torch.Tensor]:
        for pieces in plan:
            buf = sset.read_block(rows, pieces)
            if not np.isfinite(buf).all():
                r = int(np.nonzero(~np.isfinite(buf).all(axis=1))[0][0])
                raise ValueError(f"{sset.meta[rows[r]].get('path')}: NaN or Inf weights")
            yield torch.from_numpy(buf)
            del buf  # not held while the next chunk is read
    return read


def embed_landmarks(source, *, landmarks: int = DEFAULT_LANDMARKS, layer: str | None = None,
                    metric: str = "cosine", dims: int = 2, select: str | None = None, out_dir=None,
                    annotate: str = "label", title: str | None = None, device: str = "auto",
                    trajectory=None, solver: str = "auto", max_memory=None, formats=("png",),
                    group_by: str | None = None, skip_bad: bool = False, seed: int = 0,
                    selection: str = "random", **ignored) -> MDSResult:
    """embed() with landmark MDS: same inputs and outputs (mds.csv/json/png/html), no N x N Gram.

    Not used here (accepted so the command line can pass them): the Gram cache and copy merging.
    """
    t0 = time.perf_counter()
    sset = open_source(source, group_by=group_by, skip_bad=skip_bad)
    rows = sset.filter_rows(select=select, trajectory=trajectory)
    if len(rows) < 3:
        raise ValueError(f"{sset.describe()}: {len(rows)} snapshot(s) selected, MDS needs at least 3")
    m = min(int(landmarks), len(rows))
    if m < dims + 1:
        raise ValueError(f"--landmarks {landmarks}: need at least dims + 1 = {dims + 1} landmarks")
    tensor_idx = select_tensors(sset.spec, layer)
    budget = parse_memory(max_memory)
    cols = chunk_columns(budget, len(rows), m, max_memory)
    reader = _file_chunks(sset, rows, tensor_idx, cols)
    res = landmark_map(reader, len(rows), m, metric=metric, n_components=dims, seed=seed, device=device,
                       solver=solver, selection=selection, norm_error=lambda r: f"{sset.meta[rows[r]].get('path')}: the selected "
                                                           f"tensors are all zero")
    est = res["mds"]
    metas = [dict(sset.meta[r]) for r in rows]
    for i in res["landmarks"]:
        metas[int(i)]["landmark"] = 1
    sizes = sset.spec.sizes
    result = MDSResult(
        coords=res["coords"], meta=metas, eigenvalues=est.eigenvalues_, captured=float(est.captured_),
        negative_mass=float(est.negative_mass_), metric=metric, layer=layer,
        selected=[sset.spec.names[i] for i in tensor_idx], n_params=int(sum(sizes[i] for i in tensor_idx)),
        solver=f"landmark ({m} landmarks, {est.solver_})", mass_exact=False,
        device=str(resolve_device(device)), timings=dict(res["timings"]), skipped=list(sset.skipped),
        title=title,
        notes=[f"landmark MDS: {m} of {len(rows)} snapshots are landmarks (csv column 'landmark'); "
               f"eigenvalues and captured mass are those of the landmarks"])
    result.timings["cache"] = "off (landmarks)"
    if out_dir is not None:
        t = time.perf_counter()
        write_outputs(result, out_dir, annotate=annotate, formats=formats)
        result.timings["outputs"] = time.perf_counter() - t
    result.timings["total"] = time.perf_counter() - t0
    if out_dir is not None:
        write_json(result, Path(out_dir) / "mds.json")
    return result


__all__ = ["AUTO_LANDMARKS_N", "DEFAULT_LANDMARKS", "LandmarkMDS", "chunk_columns", "embed_landmarks", "landmark_map",
           "maxmin_landmarks", "triangulate"]
