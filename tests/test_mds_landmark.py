"""Landmark MDS (pylandscape.mds.landmark): m = N is classical MDS, the triangulation places points of
a flat configuration exactly, max-min picks farthest points, and `--landmarks` on the command line."""
from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pylandscape import mds
from pylandscape.mds.landmark import LandmarkMDS, chunk_columns, maxmin_landmarks
from reference_mds import assert_same_embedding, cosine_mds


def _walk(n=40, p=300, step=0.05, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(p, generator=g, dtype=torch.float64)
    rows = []
    for _ in range(n):
        x = x + step * torch.randn(p, generator=g, dtype=torch.float64)
        rows.append(x.clone())
    return torch.stack(rows)


def _procrustes_residual(X: np.ndarray, Y: np.ndarray) -> float:
    X, Y = X - X.mean(0), Y - Y.mean(0)
    u, _, vt = np.linalg.svd(Y.T @ X)
    return float(np.linalg.norm(Y @ (u @ vt) - X) / np.linalg.norm(X))


@pytest.mark.parametrize("selection", ["random", "maxmin"])
def test_all_points_as_landmarks_is_classical_mds_float64(selection):
    X = _walk()
    ref, _ = cosine_mds(X.numpy(), k=3)   # independent float64 NumPy classical MDS
    X0 = X.clone()
    got = LandmarkMDS(3, n_landmarks=X.shape[0], selection=selection).fit(X).embedding_
    assert_same_embedding(got, ref, atol=1e-9 * np.abs(ref).max())
    assert torch.equal(X, X0)  # the input is not changed (the norms are summed on a copy)


def test_flat_configuration_is_recovered_from_few_landmarks():
    # points on a 2-D plane in R^50: euclidean Δ² has rank-2 B, so 5 landmarks fix every point exactly
    g = torch.Generator().manual_seed(1)
    plane = torch.randn(2, 50, generator=g, dtype=torch.float64)
    coef = torch.randn(60, 2, generator=g, dtype=torch.float64)
    X = coef @ plane + torch.randn(50, generator=g, dtype=torch.float64)
    full = mds.ClassicalMDS(2, metric="euclidean").fit(X).embedding_
    got = LandmarkMDS(2, n_landmarks=5, metric="euclidean").fit(X).embedding_
    assert _procrustes_residual(full, got) < 1e-10


def test_landmarks_keep_their_classical_coordinates():
    X = _walk(n=50)
    est = LandmarkMDS(2, n_landmarks=12).fit(X)
    sub = X[torch.as_tensor(est.landmarks_)]
    ref = mds.ClassicalMDS(2).fit(sub).embedding_
    assert_same_embedding(est.embedding_[est.landmarks_], ref, atol=1e-6 * np.abs(ref).max())


def test_maxmin_is_farthest_point_sampling():
    rng = np.random.default_rng(0)
    F = rng.normal(size=(70, 4))
    got = maxmin_landmarks(F, 10)
    # independent brute force: start where maxmin_landmarks starts, then the farthest from the chosen set
    chosen = [int(got[0])]
    assert chosen[0] == int(np.argmax(((F - F.mean(0)) ** 2).sum(1)))
    for _ in range(9):
        d = np.min(((F[:, None, :] - F[None, chosen, :]) ** 2).sum(-1), axis=1)
        d[chosen] = -1
        chosen.append(int(np.argmax(d)))
    assert got.tolist() == chosen
    with pytest.raises(ValueError, match="landmarks"):
        maxmin_landmarks(F, 71)


def test_cli_landmarks(tmp_path, capsys):
    X = _walk(n=30, p=120).float()
    for i, row in enumerate(X):
        d = tmp_path / "ck" / f"run{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        save_file({"w": row[:100].reshape(10, 10).contiguous(), "b": row[100:].contiguous()},
                  d / f"epoch_{i}.safetensors")
    rc = mds.main(["--snapshots", str(tmp_path / "ck"), "--out", str(tmp_path / "full"), "--no-progress",
                   "--no-cache", "--landmarks", "0"])
    assert rc == 0
    rc = mds.main(["--snapshots", str(tmp_path / "ck"), "--out", str(tmp_path / "lm"), "--no-progress",
                   "--landmarks", "30"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "landmark" in err
    full = list(csv.DictReader(open(tmp_path / "full" / "mds.csv")))
    lm = list(csv.DictReader(open(tmp_path / "lm" / "mds.csv")))
    assert [r["path"] for r in full] == [r["path"] for r in lm]
    a = np.array([[float(r["x"]), float(r["y"])] for r in full])
    b = np.array([[float(r["x"]), float(r["y"])] for r in lm])
    assert_same_embedding(b, a, atol=1e-6 * np.abs(a).max())
    assert sum(r.get("landmark") == "1" for r in lm) == 30
    rc = mds.main(["--snapshots", str(tmp_path / "ck"), "--out", str(tmp_path / "x"), "--landmarks", "many"])
    assert rc == 2 and "--landmarks 'many'" in capsys.readouterr().err


def test_memory_budget_of_the_file_pass():
    """--max-memory: the float32 chunk gets half of what the [N, m] arrays leave; too little is a clear
    error (it was a silent 1-column chunk, i.e. one pass over every file per weight)."""
    n, m = 50_000, 1000
    c = chunk_columns(4 << 30, n, m)
    assert 4 * n * c + 26 * n * m + (512 << 20) <= 4 << 30 and c > 5000
    with pytest.raises(ValueError, match=r"--max-memory 1G: too small .* 50000 snapshots with 1000 landmarks"):
        chunk_columns(1 << 30, n, m, "1G")
