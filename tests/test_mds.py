"""Classical MDS numerics against independent float64 references (numpy, scikit-learn)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pylandscape.mds import (NEGATIVE_TOL, ClassicalMDS, cosine_distance, cosine_distance_from_gram, double_center,
                             embed, layer_gram, squared_dissimilarity)
from pylandscape.mds import duplicates
from pylandscape.ops import segment_gram


def _procrustes_residual(A: np.ndarray, B: np.ndarray) -> float:
    """min over orthogonal R of ||A - B R|| / ||A|| (both centred configurations)."""
    A = A - A.mean(0)
    B = B - B.mean(0)
    U, _, Vt = np.linalg.svd(B.T @ A)
    return float(np.linalg.norm(A - B @ (U @ Vt)) / np.linalg.norm(A))


def _reference_cmds(X: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Textbook classical MDS in float64 with an explicit J (independent of the package)."""
    X = X.astype(np.float64)
    if metric == "euclidean":
        D2 = ((X[:, None, :] - X[None, :, :]) ** 2).sum(-1)
    else:
        U = X / np.linalg.norm(X, axis=1, keepdims=True)
        # 1 - cos from the chord, accurate for nearly parallel rows
        one_minus_cos = 0.5 * ((U[:, None, :] - U[None, :, :]) ** 2).sum(-1)
        D2 = one_minus_cos ** 2 if metric == "cosine" else 2 * one_minus_cos
    n = len(X)
    J = np.eye(n) - np.ones((n, n)) / n
    B = -0.5 * J @ D2 @ J
    w, V = np.linalg.eigh(B)
    w, V = w[::-1], V[:, ::-1]
    return V[:, :k] * np.sqrt(np.maximum(w[:k], 0)), w


def _trajectories(n_traj=3, n=15, p=400, step=0.05, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for t in range(n_traj):
        w = rng.standard_normal(p)
        for i in range(n):
            w = w + step * rng.standard_normal(p)
            out.append(w.copy())
    return np.array(out, dtype=np.float32)


@pytest.mark.parametrize("metric", ["cosine", "chordal", "euclidean"])
def test_matches_independent_reference(metric):
    X = _trajectories()
    ref, w = _reference_cmds(X, 3, metric)
    est = ClassicalMDS(3, metric=metric).fit(X)
    assert _procrustes_residual(ref, est.embedding_) <= 1e-4
    np.testing.assert_allclose(est.eigenvalues_, w, rtol=1e-6, atol=1e-9 * abs(w).max())


def test_matches_sklearn_classical_mds():
    sk = pytest.importorskip("sklearn.manifold")
    if not hasattr(sk, "ClassicalMDS"):
        pytest.skip("scikit-learn without ClassicalMDS")
    X = _trajectories(seed=1).astype(np.float64)
    theirs = sk.ClassicalMDS(n_components=2, metric="cosine").fit(X)
    ours = ClassicalMDS(2, metric="cosine").fit(X)
    assert _procrustes_residual(theirs.embedding_, ours.embedding_) <= 1e-4
    np.testing.assert_allclose(ours.eigenvalues_[:2], theirs.eigenvalues_, rtol=1e-6)


def test_nearly_parallel_snapshots():
    """Neighbouring snapshots with 1 - cos ~ 1e-8: still a faithful map (float32 weights)."""
    rng = np.random.default_rng(3)
    p = 5000
    base = rng.standard_normal(p)
    X = []
    for t in range(3):
        d = rng.standard_normal(p)
        d2 = rng.standard_normal(p)
        for i in range(12):
            # relative moves of ~1e-4 give 1 - cos ~ 1e-8 between neighbours
            X.append(base + 1e-4 * (i * d + 0.3 * i * i / 12 * d2) / np.sqrt(p) * np.linalg.norm(base))
    X = np.array(X, dtype=np.float32)
    Xd = X.astype(np.float64)
    U = Xd / np.linalg.norm(Xd, axis=1, keepdims=True)
    omc = 0.5 * ((U[1] - U[0]) ** 2).sum()
    assert 1e-9 < omc < 1e-7
    ref, _ = _reference_cmds(Xd, 2, "cosine")
    ours = ClassicalMDS(2, metric="cosine").fit(X).embedding_
    assert _procrustes_residual(ref, ours) <= 1e-4


def test_planar_configuration_recovered_exactly():
    rng = np.random.default_rng(5)
    P2 = rng.standard_normal((20, 2)) * [3.0, 1.0]
    # embed the planar points in 50-D with a random rotation and offset: distances are preserved
    Q, _ = np.linalg.qr(rng.standard_normal((50, 50)))
    X = np.hstack([P2, np.zeros((20, 48))]) @ Q + 7.0
    est = ClassicalMDS(2, metric="euclidean").fit(X)
    assert _procrustes_residual(P2, est.embedding_) <= 1e-10
    D_true = np.linalg.norm(P2[:, None] - P2[None], axis=-1)
    D_ours = np.linalg.norm(est.embedding_[:, None] - est.embedding_[None], axis=-1)
    np.testing.assert_allclose(D_ours, D_true, atol=1e-9)
    assert est.captured_ == pytest.approx(1.0, abs=1e-12)
    assert est.negative_mass_ == pytest.approx(0.0, abs=1e-12)


def test_eigenvalue_bookkeeping_non_euclidean():
    # 4 points: a square's sides 1, diagonals 3 violate the triangle inequality -> negative eigenvalue
    D = np.array([[0, 1, 3, 1], [1, 0, 1, 3], [3, 1, 0, 1], [1, 3, 1, 0]], float)
    B = -0.5 * (np.eye(4) - 0.25) @ (D ** 2) @ (np.eye(4) - 0.25)
    w = np.sort(np.linalg.eigvalsh(B))[::-1]
    assert w[-1] < -1e-9
    est = ClassicalMDS(2, metric="precomputed").fit(D)
    pos, neg = w[w > 1e-12].sum(), -w[w < -1e-12].sum()
    assert est.captured_ == pytest.approx(w[:2][w[:2] > 0].sum() / pos)
    assert est.negative_mass_ == pytest.approx(neg / (pos + neg))
    np.testing.assert_allclose(est.eigenvalues_, w, atol=1e-12)
    # asking for the negative dimension: warning and a zero coordinate, never sqrt of a negative
    with pytest.warns(UserWarning, match="eigenvalue <= 0"):
        e4 = ClassicalMDS(4, metric="precomputed").fit(D)
    assert np.all(e4.embedding_[:, 3] == 0) and np.isfinite(e4.embedding_).all()


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_dense_and_iterative_solvers_agree(metric):
    X = _trajectories(n_traj=4, n=40, p=300, seed=7)
    d = ClassicalMDS(3, metric=metric, solver="dense").fit(X)
    it = ClassicalMDS(3, metric=metric, solver="iterative").fit(X)
    assert it.solver_ == "iterative" and it.eigenvalues_.shape == (3,)
    np.testing.assert_allclose(it.eigenvalues_, d.eigenvalues_[:3], rtol=1e-8)
    assert _procrustes_residual(d.embedding_, it.embedding_) <= 1e-8
    if metric == "euclidean":  # no negative eigenvalues: the estimate is exact
        assert it.captured_ == pytest.approx(d.captured_, rel=1e-8)
    else:  # trace + found negatives: an upper bound on captured
        assert it.captured_ >= d.captured_ - 1e-12 and not it.mass_exact_


def test_double_center_and_gram_with_empty_segment():
    rng = np.random.default_rng(0)
    D2 = rng.random((7, 7))
    D2 = D2 + D2.T
    np.fill_diagonal(D2, 0)
    J = np.eye(7) - 1 / 7
    np.testing.assert_allclose(double_center(D2), -0.5 * J @ D2 @ J, atol=1e-14)
    X = torch.randn(6, 11)
    offs = torch.tensor([0, 4, 4, 11])  # includes an empty segment
    G = segment_gram(X, offs)
    Xd = X.double()
    torch.testing.assert_close(G[0], Xd[:, :4] @ Xd[:, :4].T)
    assert torch.all(G[1] == 0)
    torch.testing.assert_close(G[2], Xd[:, 4:] @ Xd[:, 4:].T)


def test_squared_dissimilarity_zero_norm():
    G = np.diag([1.0, 0.0, 2.0])
    with pytest.raises(ValueError, match="zero norm"):
        squared_dissimilarity(G, "cosine")


def test_embed_in_memory_with_spec():
    from pylandscape.flat import ParamSpec
    X = torch.from_numpy(_trajectories(n_traj=2, n=6, p=30))
    spec = ParamSpec(("a.weight", "a.bias", "b.weight"), ((2, 10), (5,), (5,)))
    res = embed((X, spec), layer="2", metric="euclidean")
    ref, _ = _reference_cmds(X[:, :25].numpy(), 2, "euclidean")
    assert res.selected == ["a.weight", "a.bias"] and res.n_params == 25
    assert _procrustes_residual(ref, res.coords) <= 1e-6
    pairs = [({"epoch": i, "trajectory": "t"}, X[i]) for i in range(X.shape[0])]
    res2 = embed(pairs, metric="cosine", select="epoch >= 3")
    assert res2.n == X.shape[0] - 3


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_dense_solver_matches_cpu():
    X = _trajectories(seed=11)
    cpu = ClassicalMDS(2, metric="cosine", device="cpu").fit(X)
    gpu = ClassicalMDS(2, metric="cosine", device="cuda").fit(X)
    np.testing.assert_allclose(gpu.eigenvalues_, cpu.eigenvalues_, rtol=1e-9, atol=1e-12)
    assert _procrustes_residual(cpu.embedding_, gpu.embedding_) <= 1e-9


def test_cosine_distance_from_gram():
    """One 1 - cos from a Gram: exact zeros for parallel rows, round-off clipped, inaccurate Grams refused."""
    G = torch.tensor([[4.0, 2.0, 4.0], [2.0, 1.0, 2.0], [4.0, 2.0, 4.0]], dtype=torch.float64)
    D = cosine_distance_from_gram(G)
    assert torch.equal(D, torch.zeros(3, 3, dtype=torch.float64))  # parallel rows, exactly 0
    G2 = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    assert torch.allclose(cosine_distance_from_gram(G2), torch.tensor([[0.0, 1.0], [1.0, 0.0]],
                                                                          dtype=torch.float64))
    tiny = torch.tensor([[1.0, 1.0 + 2e-16], [1.0 + 2e-16, 1.0]], dtype=torch.float64)
    assert (cosine_distance_from_gram(tiny) == 0).all()  # round-off below 0 is clipped
    with pytest.raises(ValueError, match="not an accurate Gram"):
        cosine_distance_from_gram(torch.tensor([[1.0, 1.1], [1.1, 1.0]], dtype=torch.float64))
    with pytest.raises(ValueError, match="zero norm"):
        cosine_distance_from_gram(torch.tensor([[0.0, 0.0], [0.0, 1.0]], dtype=torch.float64))
    Gl = torch.arange(24, dtype=torch.float64).view(3, 2, 4)
    assert torch.equal(layer_gram(Gl), Gl.sum(0))
    assert torch.equal(layer_gram(Gl, [0, 2]), Gl[0] + Gl[2])
    assert torch.equal(layer_gram(Gl, 1), Gl[1])
    assert torch.equal(layer_gram(Gl, [2, -3]), Gl[2] + Gl[0]) and torch.equal(layer_gram(Gl, [0, 1, 2]), Gl.sum(0))
    assert torch.equal(layer_gram(Gl, torch.tensor([True, False, True])), Gl[0] + Gl[2])
    one = layer_gram(Gl, [1])
    one += 1  # a new tensor, never a view of the per-tensor Grams
    assert torch.equal(Gl, torch.arange(24, dtype=torch.float64).view(3, 2, 4))
    with pytest.raises(IndexError):
        layer_gram(Gl, [3])
    with pytest.raises(ValueError, match="sq_norms"):
        cosine_distance_from_gram(Gl[0])
    assert NEGATIVE_TOL < 1e-12


def test_one_minus_cos_has_one_implementation():
    """squared_dissimilarity (the MDS input) is cosine_distance_from_gram squared / doubled, and negatives
    (an anti-parallel pair has c slightly below -1 by round-off) are handled the same way."""
    X = _trajectories(n_traj=2, n=5, p=50).astype(np.float64)
    X[3] = -X[2]  # anti-parallel: 1 - cos = 2
    G = torch.from_numpy(X @ X.T)
    D = cosine_distance_from_gram(G).numpy()
    np.testing.assert_array_equal(squared_dissimilarity(G, "cosine"), np.square((D + D.T) / 2))
    np.testing.assert_array_equal(squared_dissimilarity(G, "chordal"), (D + D.T))
    assert D[2, 3] <= 2.0 and abs(D[2, 3] - 2.0) < 1e-15
    beyond = torch.tensor([[1.0, -1.0 - 4e-16], [-1.0 - 4e-16, 1.0]], dtype=torch.float64)
    assert cosine_distance_from_gram(beyond)[0, 1] == 2.0  # round-off above 2 is clipped too
    with pytest.raises(ValueError, match="not an accurate Gram"):
        squared_dissimilarity(np.array([[1.0, 1.1], [1.1, 1.0]]), "cosine")
    off = torch.tensor([0, 20, 50])
    Xt = torch.from_numpy(X)
    torch.testing.assert_close(cosine_distance(Xt, off, [1]),
                               cosine_distance_from_gram(Xt[:, 20:] @ Xt[:, 20:].T), rtol=0, atol=1e-12)


def test_identical_copies_merged_and_near_copies_kept():
    """Copies are found by hash after a loose Gram pre-filter: an exact copy is drawn once (aliases), a
    copy with one weight changed by one float32 ulp is a distinct snapshot and stays."""
    X = torch.from_numpy(_trajectories(n_traj=1, n=6, p=40))
    near = X[2].clone()
    near[7] = torch.nextafter(near[7], torch.tensor(float("inf")))
    pairs = [({"path": f"s{i}", "step": i}, X[i]) for i in range(6)]
    pairs += [({"path": "copy_of_s4", "step": 9}, X[4].clone()), ({"path": "near_s2", "step": 10}, near)]
    res = embed(pairs, copies="merge")
    assert [m["path"] for m in res.meta] == ["s0", "s1", "s2", "s3", "s4", "s5", "near_s2"]
    assert res.meta[4]["aliases"] == "copy_of_s4" and "aliases" not in res.meta[2]
    assert res.notes and "s4 = copy_of_s4" in res.notes[0]
    assert embed(pairs).n == 8  # in-memory rows are kept by default ("auto")


def _candidates_dense(grams: torch.Tensor) -> list[int]:
    """The [n, n] form of duplicates.candidates() (the one it replaced), as an oracle."""
    n = grams.shape[1]
    if n < 2:
        return []
    G = grams.sum(0).to(torch.float64)
    d = torch.diagonal(G)
    scale = torch.maximum(d[:, None], d[None, :]).clamp_min(torch.finfo(torch.float64).tiny)
    close = ((d[:, None] - d[None, :]).abs() <= duplicates.CANDIDATE_RTOL * scale) & \
            ((G - d[:, None]).abs() <= duplicates.CANDIDATE_RTOL * scale)
    close.fill_diagonal_(False)
    per_tensor = torch.diagonal(grams, dim1=1, dim2=2).to(torch.float64)  # [L, n] squared norms
    rows = set()
    for i, j in torch.nonzero(torch.triu(close)).tolist():
        di, dj = per_tensor[:, i], per_tensor[:, j]
        if torch.all((di - dj).abs() <= duplicates.CANDIDATE_RTOL * torch.maximum(di, dj)):
            rows.update((i, j))
    return sorted(rows)


def test_duplicate_candidates_match_the_dense_form():
    """Copies (exact, within 1e-7, all-zero rows) are found; rows with equal total norm but other per-tensor
    norms, and near misses (1e-5), are not; the sorted-window search gives the [n, n] form's answer."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(60, 50, generator=g, dtype=torch.float64)
    X[7] = X[3]                                   # an exact copy
    X[20] = X[11] * (1 + 1e-8)                    # a copy within tolerance
    X[30] = X[12] * (1 + 1e-5)                    # a near miss
    X[40] = 0.0
    X[41] = 0.0                                   # two all-zero rows
    X[50, :25], X[50, 25:] = X[5, 25:], X[5, :25]  # same total norm, other per-tensor norms
    X[55, :25], X[55, 25:] = X[9, :25].flip(0), X[9, 25:]  # same per-tensor norms, another direction
    grams = torch.stack([X[:, :25] @ X[:, :25].T, X[:, 25:] @ X[:, 25:].T])
    want = _candidates_dense(grams)
    assert duplicates.candidates(grams) == want
    assert {3, 7, 11, 20, 40, 41} <= set(want) and not {9, 12, 30, 50, 55} & set(want)
    rand = torch.stack([X[:, :25] @ X[:, :25].T])[:, :40, :40]
    assert duplicates.candidates(rand) == _candidates_dense(rand) == [3, 7, 11, 20]


def _dense_vs_numpy(B: np.ndarray, k: int):
    from pylandscape.mds.solvers import dense_topk
    vals, V, _ = dense_topk(B, k, "cpu")
    w, U = np.linalg.eigh(B)
    np.testing.assert_allclose(vals, w[::-1], atol=1e-12 * max(1.0, abs(w).max()))
    for j in range(k):  # each eigenvector up to sign (the top k are simple here)
        u = U[:, -1 - j]
        assert min(np.abs(V[:, j] - u).max(), np.abs(V[:, j] + u).max()) <= 1e-9


@pytest.mark.parametrize("name", ["lapacke", "scipy", "public scipy", "numpy"])
def test_dense_solver_every_way_in(monkeypatch, name):
    """numpy's OpenBLAS through ctypes, scipy's f2py module loaded alone, the public scipy.linalg.lapack
    and numpy's full eigh all give the eigenpairs of numpy's eigh."""
    from pylandscape.mds import lapack
    if name == "lapacke":
        lib = lapack._lapacke()
        if lib is None:
            pytest.skip("this numpy bundles no ILP64 OpenBLAS with LAPACKE (not a numpy wheel for Linux)")
        monkeypatch.setattr(lapack, "_backend", ("lapacke", lib))
    elif name == "scipy":
        monkeypatch.setattr(lapack, "_backend", ("scipy", lapack._flapack()))
    elif name == "public scipy":
        from scipy.linalg import lapack as public
        monkeypatch.setattr(lapack, "_backend", ("scipy", public))
    else:
        monkeypatch.setattr(lapack, "_backend", ())
    rng = np.random.default_rng(3)
    X = rng.standard_normal((60, 20))
    _dense_vs_numpy(X @ X.T, 4)  # rank 20: 40 zero eigenvalues below the top 4
    # a tridiagonal that splits into 1 x 1 blocks: dstebz lists the top 3 in block order (5, 3, 4),
    # which must come back sorted
    _dense_vs_numpy(np.diag([5.0, 1.0, 3.0, 4.0, 0.5]), 3)
    Y = rng.standard_normal((7, 7))
    _dense_vs_numpy(Y + Y.T, 7)  # every eigenvector, negative eigenvalues


def test_dense_solver_does_not_import_scipy_linalg():
    """import scipy.linalg costs 0.25-0.6 s of the command's start-up; the solver needs only LAPACK."""
    import subprocess
    import sys
    code = ("import sys, numpy as np; from pylandscape.mds.solvers import dense_topk; "
            "X = np.random.default_rng(0).standard_normal((30, 5)); dense_topk(X @ X.T, 2, 'cpu'); "
            "import pylandscape.mds.lapack as L; print(L.backend_name()); "
            "print(sorted(m for m in sys.modules if m == 'scipy.linalg' or m == 'numpy.f2py'))")
    for env in ({}, {"PYLANDSCAPE_LAPACK": "scipy"}):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**__import__("os").environ, **env}).stdout.split("\n")
        assert out[1] == "[]", (env, out)
        if env:
            assert out[0] == "scipy"
