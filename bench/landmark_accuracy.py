"""Landmark MDS vs the full classical MDS on real SGD trajectories (issue 15): Procrustes residuals.

Trajectories: the paper's network (pylandscape.models.dcnn) at width 0.25 (P = 12,974) trained with
minibatch SGD (lr 0.05, batch 64) on the embedded digits from one init with 8 data orders, the flat weights taken after
every step (the trainer's store evaluates the model at each snapshot, which costs ~1.5 s per snapshot on
this machine; these snapshots are the same weights without the evaluation). Prints one table row per
(N, m): residual = min over rotations/reflections R of ||Y R - X||_F / ||X||_F (X the full classical
MDS, Y the landmark MDS, both centred), and scipy's Procrustes disparity (also fits a scale).

    PYTHONPATH=$PWD python bench/landmark_accuracy.py --n 2000 5000 --m 200 500 1000
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from scipy.linalg import orthogonal_procrustes
from scipy.spatial import procrustes

from pylandscape.data import load_dataset
from pylandscape.mds import ClassicalMDS
from pylandscape.mds.landmark import LandmarkMDS
from pylandscape.models import dcnn


def trajectories(n: int, k: int = 8, width: float = 0.25, lr: float = 0.05, batch: int = 64) -> torch.Tensor:
    """[n, P] float32 weights: k SGD trajectories of n // k steps each (after every step)."""
    data = load_dataset("digits")
    per = -(-n // k)
    rows = []
    torch.manual_seed(0)
    init = dcnn(width=width).state_dict()
    for seed in range(k):
        model = dcnn(width=width)
        model.load_state_dict(init)  # one init, k data orders: the paper's stage setting (Fig. 3)
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        g = torch.Generator().manual_seed(1000 + seed)
        for _ in range(per):
            idx = torch.randint(0, data.x_train.shape[0], (batch,), generator=g)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx]).backward()
            opt.step()
            rows.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone())
    return torch.stack(rows)[:n]


def residual(X: np.ndarray, Y: np.ndarray) -> float:
    X = X - X.mean(0)
    Y = Y - Y.mean(0)
    R, _ = orthogonal_procrustes(Y, X)
    return float(np.linalg.norm(Y @ R - X) / np.linalg.norm(X))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[2000])
    ap.add_argument("--m", type=int, nargs="+", default=[200, 500, 1000])
    ap.add_argument("--dims", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--selection", nargs="+", default=["maxmin", "random"])
    ap.add_argument("--cache", default=None, help="save/load the trajectories here (a .pt of one tensor)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t = time.perf_counter()
    if args.cache and Path(args.cache).exists():
        W = torch.load(args.cache, weights_only=True)["W"]
    else:
        W = trajectories(max(args.n))
        if args.cache:
            torch.save({"W": W}, args.cache)
    print(f"# {W.shape[0]} snapshots x {W.shape[1]} params from 8 SGD trajectories in "
          f"{time.perf_counter() - t:.0f} s")
    print("| N | m | landmarks | residual (rotation) | scipy disparity | landmark s | full s | full λ1..λ3 |")
    print("|---|---|---|---|---|---|---|---|")
    for n in args.n:
        # n // 8 steps of each trajectory (the first ones)
        per = W.shape[0] // 8
        X = torch.cat([W[i * per:i * per + n // 8] for i in range(8)])
        t = time.perf_counter()
        est = ClassicalMDS(args.dims).fit(X)
        full = est.embedding_
        lam = ", ".join(f"{v:.3g}" for v in est.eigenvalues_[:3])
        t_full = time.perf_counter() - t
        for m, sel in [(m, sel) for m in args.m for sel in args.selection]:
            if m > X.shape[0]:
                continue
            t = time.perf_counter()
            lm = LandmarkMDS(args.dims, n_landmarks=m, selection=sel).fit(X).embedding_
            t_lm = time.perf_counter() - t
            _, _, disp = procrustes(full, lm)
            print(f"| {X.shape[0]} | {m} | {sel} | {residual(full, lm):.2e} | {disp:.2e} | {t_lm:.1f} | {t_full:.1f} | {lam} |",
                  flush=True)


if __name__ == "__main__":
    main()
