"""segment_gram vs plain fp32 X @ X.T vs the fp64 reference vs naive normalise-then-dot.

Data: one random-walk trajectory of N fp32 snapshots of P = 188,810 parameters in 12 tensors, steps
shrinking geometrically from 1e-2 to 1e-6 of the weight norm (late pairs have 1 - cos ~ 1e-12).
Accuracy: worst relative error of 1 - cos (whole model, pairs with 1 - cos >= 1e-10) on sampled pairs
(all consecutive pairs + random ones) against an fp64 oracle that needs no Gram:
1 - cos = (d^2 - (n_i - n_j)^2) / (2 n_i n_j), exact fp64 differences.

    python bench/bench_gram.py --n 500 2000        # one timed run each, prints a table
    pytest bench/bench_gram.py --benchmark-only    # pytest-benchmark (N = 500 by default)

These runs take tens of seconds on 2 cores; run them once, on a quiet machine.
"""
from __future__ import annotations

import argparse
import time

import torch

from pylandscape import ops
from pylandscape import _reference as ref

SIZES = [1728, 64, 36864, 64, 73728, 128, 65536, 128, 8192, 64, 2304, 10]  # 188,810 parameters
assert sum(SIZES) == 188_810


def offsets():
    return torch.cumsum(torch.tensor([0] + SIZES, dtype=torch.int64), 0)


def trajectory(N: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    P = sum(SIZES)
    x = torch.randn(P, generator=g, dtype=torch.float64)
    norm = float(x.norm())
    X = torch.empty(N, P)
    for k in range(N):
        X[k] = x.float()
        s = 1e-2 * (1e-4) ** (k / max(N - 1, 1))
        u = torch.randn(P, generator=g, dtype=torch.float64)
        x = X[k].double() + (s * norm / float(u.norm())) * u
    return X


def sample_pairs(N: int, n_random: int = 400, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    i = torch.cat([torch.arange(N - 1), torch.randint(0, N, (n_random,), generator=g)])
    j = torch.cat([torch.arange(1, N), torch.randint(0, N, (n_random,), generator=g)])
    keep = i != j
    return i[keep], j[keep]


def oracle(X, i, j):
    a, b = X[i].double(), X[j].double()
    d = a - b
    d2 = (d * d).sum(1)
    na, nb = (a * a).sum(1).sqrt(), (b * b).sum(1).sqrt()
    dn = (d * (a + b)).sum(1) / (na + nb)
    return (d2 - dn * dn) / (2 * na * nb)


def worst_rel(G, i, j, truth):
    """G: whole-model [N, N] Gram (or None with D given)."""
    d = torch.diagonal(G)
    omc = 1 - G[i, j] / torch.sqrt(d[i] * d[j])
    m = truth >= 1e-10
    return ((omc - truth).abs() / truth)[m].max().item(), int((omc < 0).sum())


def naive(X):
    Xn = X / X.norm(dim=1, keepdim=True)
    return (Xn @ Xn.T).double()  # cosines; G with unit diagonal


def run_table(Ns, with_ref_up_to=500, repeats=1):
    off = offsets()
    rows = []
    for N in Ns:
        X = trajectory(N)
        i, j = sample_pairs(N)
        truth = oracle(X, i, j)
        P = X.shape[1]
        useful = N * (N + 1) / 2 * P * 2
        cases = [("X @ X.T fp32", lambda: (X @ X.T).double()),
                 ("naive normalise+dot fp32", lambda: naive(X)),
                 ("segment_gram", lambda: ops.segment_gram(X, off).sum(0))]
        if N <= with_ref_up_to:
            cases.append(("fp64 reference", lambda: ref.segment_gram(X, off).sum(0)))
        # round-robin over the cases, best of `repeats` each (the first call also pays page faults): on a
        # shared machine, slow spells then hit every case alike
        best, last = {}, {}
        for _ in range(repeats):
            for name, fn in cases:
                t0 = time.perf_counter()
                last[name] = fn()
                best[name] = min(best.get(name, float("inf")), time.perf_counter() - t0)
        t_mm = best[cases[0][0]]
        for name, _ in cases:
            dt = best[name]
            err, neg = worst_rel(last[name], i, j, truth)
            rows.append((N, name, dt, useful / dt / 1e9, dt / t_mm, err, neg))
            print(f"N={N:5d} {name:26s} {dt:8.2f} s {useful / dt / 1e9:7.1f} GFLOP/s  x{dt / t_mm:5.2f} of X@X.T  "
                  f"worst rel err {err:.2e}  negatives {neg}", flush=True)
        last.clear()
    return rows


# ---------------------------------------------------------------------------------------------------
# pytest-benchmark
# ---------------------------------------------------------------------------------------------------
try:
    import pytest

    @pytest.fixture(scope="module")
    def data():
        N = 500
        X = trajectory(N)
        i, j = sample_pairs(N)
        return X, offsets(), i, j, oracle(X, i, j)

    def _info(benchmark, X, G, i, j, truth):
        N, P = X.shape
        err, neg = worst_rel(G, i, j, truth)
        benchmark.extra_info.update({"op": f"gram N={N}", "device": "cpu", "N": N, "P": P, "worst_rel_err_1mcos": err, "negatives": neg,
                                     "GFLOP/s": N * (N + 1) / 2 * P * 2 / benchmark.stats["mean"] / 1e9})

    def test_bench_xxt(benchmark, data):
        X, off, i, j, truth = data
        G = benchmark.pedantic(lambda: (X @ X.T).double(), rounds=1, iterations=1)
        _info(benchmark, X, G, i, j, truth)
        benchmark.extra_info["impl"] = "X @ X.T fp32"

    def test_bench_segment_gram(benchmark, data):
        X, off, i, j, truth = data
        G = benchmark.pedantic(lambda: ops.segment_gram(X, off).sum(0), rounds=1, iterations=1)
        _info(benchmark, X, G, i, j, truth)
        benchmark.extra_info["impl"] = "segment_gram"

    def test_bench_fp64_reference(benchmark, data):
        X, off, i, j, truth = data
        G = benchmark.pedantic(lambda: ref.segment_gram(X, off).sum(0), rounds=1, iterations=1)
        _info(benchmark, X, G, i, j, truth)
        benchmark.extra_info["impl"] = "fp64 reference"

    def test_bench_naive(benchmark, data):
        X, off, i, j, truth = data
        G = benchmark.pedantic(lambda: naive(X), rounds=1, iterations=1)
        _info(benchmark, X, G, i, j, truth)
        benchmark.extra_info["impl"] = "naive fp32"
except ImportError:  # pragma: no cover
    pass


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Time segment_gram against X @ X.T, the fp64 reference and the "
                                             "naive fp32 route on a random-walk trajectory (P = 188,810).")
    ap.add_argument("--n", type=int, nargs="+", default=[500, 2000], help="numbers of snapshots")
    ap.add_argument("--ref-up-to", type=int, default=500, help="time the fp64 reference only up to this N")
    ap.add_argument("--repeats", type=int, default=1, help="time each case this many times, keep the best")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    run_table(a.n, a.ref_up_to, a.repeats)
