"""segment_gram vs torch's X @ X.T (MKL GEMM) and numpy's X @ X.T (OpenBLAS syrk: the CPU floor), time and memory.

Data: one random-walk trajectory of N fp32 snapshots of the paper's net (pylandscape.models.dcnn,
P = 188,810 in 10 tensors), steps shrinking geometrically from 1e-2 to 1e-6 of the weight norm (late pairs
have 1 - cos ~ 1e-12). Accuracy: worst relative error of 1 - cos (whole model, pairs with 1 - cos >= 1e-10)
on sampled pairs against an fp64 oracle that needs no Gram: 1 - cos = (d^2 - (n_i - n_j)^2) / (2 n_i n_j).

Two timings per N, each the best of --repeats:
  first call  every call in a fresh process (what a CLI run pays: thread pools, page faults, code pages),
              the competitors alternating;
  steady      in one process, after one warm-up call each, round-robin, 0.3 s apart (so that no
              competitor's spinning BLAS threads are still on the cores).
Memory: peak RSS during the call minus RSS before it, minus the output's bytes, minus the file-backed pages
that appeared meanwhile (RssFile: shared libraries' code, loaded on a first call and droppable at any time),
as a share of X's bytes: the call's own workspace (Linux: /proc/self/clear_refs resets the peak, VmHWM reads
it). The code pages are printed apart ("code" MB). On CUDA: torch.cuda.max_memory_allocated.
numpy runs with OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE removed (see /work/.library/env/README.md: they slow
a current OpenBLAS down); the kernel it then uses is printed (threadpoolctl).

    python bench/bench_gram.py --n 100 256 500 1000 2000 --repeats 3     # prints the table
    python bench/bench_gram.py --device cuda --n 1000 10000                # on a GPU: vs cuBLAS
    pytest bench/bench_gram.py --benchmark-only                            # pytest-benchmark (N = 500)

These runs take minutes on 2 cores; say how busy the machine was (uptime) when you quote them.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

NUMPY_ENV_DROP = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
if __name__ == "__main__" and any(k in os.environ for k in NUMPY_ENV_DROP):
    # OpenBLAS reads these when numpy loads: run this script (only) without them
    os.execve(sys.executable, [sys.executable, *sys.argv],
              {k: v for k, v in os.environ.items() if k not in NUMPY_ENV_DROP})

import numpy as np  # noqa: E402
import torch  # noqa: E402

from conftest import PAPER_SIZES  # noqa: E402
from pylandscape import ops  # noqa: E402
from pylandscape import _reference as ref  # noqa: E402

SIZES = PAPER_SIZES
CACHE = os.path.join(tempfile.gettempdir(), "pylandscape-bench")


def offsets():
    return torch.cumsum(torch.tensor([0] + SIZES, dtype=torch.int64), 0)


def trajectory(N: int, seed: int = 0) -> torch.Tensor:
    """[N, P] fp32, cached as .npy under the temp folder (the walk itself takes seconds at N = 2,000)."""
    path = os.path.join(CACHE, f"walk_{N}_{seed}_{sum(SIZES)}.npy")
    if os.path.exists(path):
        return torch.from_numpy(np.load(path))
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
    os.makedirs(CACHE, exist_ok=True)
    tmp = path + f".{os.getpid()}.tmp.npy"
    np.save(tmp, X.numpy())
    os.replace(tmp, path)
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


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return 0


def call(what: str, X: torch.Tensor, off: torch.Tensor, device: str):
    """One timed call; returns (seconds, workspace bytes beyond X and the output, code bytes first loaded,
    whole-model Gram or None)."""
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        base = _rss("VmRSS")
    file0 = 0 if cuda else _rss("RssFile")
    t0 = time.perf_counter()
    if what == "segment_gram":
        out = ops.segment_gram(X, off)
    elif what == "torch":
        out = X @ X.T
    elif what == "numpy":
        Xn = X.numpy()
        out = torch.from_numpy(Xn @ Xn.T)
    else:
        raise ValueError(what)
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if cuda else _rss("VmHWM")
    code = 0 if cuda else max(0, _rss("RssFile") - file0)
    extra = peak - base - out.numel() * out.element_size() - code
    G = out.sum(0) if what == "segment_gram" else out.double()
    return dt, extra, code, G


def child(N: int, what: str, device: str) -> None:
    """A fresh process for one first call: prints JSON."""
    X = trajectory(N)
    if device == "cuda":
        X = X.cuda()
    dt, extra, code, _ = call(what, X, offsets(), device)
    print(json.dumps({"t": dt, "extra": extra, "code": code, "xbytes": X.numel() * X.element_size()}))


def first_call(N: int, what: str, device: str) -> dict:
    env = dict(os.environ)
    if what == "numpy":
        for k in NUMPY_ENV_DROP:
            env.pop(k, None)
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", str(N), what, device],
                         capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_table(Ns, repeats=3, device="cpu", first=True):
    off = offsets()
    whats = ["segment_gram", "torch"] + (["numpy"] if device == "cpu" else [])
    rows = []
    for N in Ns:
        X = trajectory(N)
        i, j = sample_pairs(N)
        truth = oracle(X, i, j)
        Xd = X.cuda() if device == "cuda" else X
        xbytes = X.numel() * X.element_size()
        fc = {}
        if first:
            for _ in range(repeats):
                for w in whats:
                    r = first_call(N, w, device)
                    if w not in fc or r["t"] < fc[w]["t"]:
                        fc[w] = r
        best, mem, last = {}, {}, {}
        for w in whats:  # warm-up call each
            call(w, Xd, off, device)
        for _ in range(repeats):
            for w in whats:
                # a pause first: OpenBLAS's threads (numpy) spin ~0.1 s after a call, on the cores the next
                # competitor wants (measured: segment_gram at N = 100 took 0.11 s right after numpy, 0.03 s
                # after a pause); a real run does not call one right after the other
                time.sleep(0.3)
                dt, extra, _, G = call(w, Xd, off, device)
                if dt < best.get(w, float("inf")):
                    best[w], mem[w] = dt, extra
                last[w] = G.cpu()
        err, neg = worst_rel(last["segment_gram"], i, j, truth)
        errt, negt = worst_rel(last["torch"], i, j, truth)
        row = {"N": N, "err": err, "neg": neg, "err_torch": errt, "neg_torch": negt}
        for w in whats:
            row[f"steady_{w}"] = best[w]
            row[f"mem_{w}"] = mem[w] / xbytes
            if first:
                row[f"first_{w}"] = fc[w]["t"]
                row[f"fmem_{w}"] = fc[w]["extra"] / fc[w]["xbytes"]
                row[f"fcode_{w}"] = fc[w].get("code", 0)
        rows.append(row)
        print(fmt_row(row, whats, first), flush=True)
        last.clear()
    return rows


def fmt_row(r, whats, first):
    s = f"N={r['N']:5d}"
    if first:
        s += (f" | first call: gram {r['first_segment_gram']:.2f} s = {r['first_segment_gram'] / r['first_torch']:.2f}x"
              f" torch ({r['first_torch']:.2f} s)")
        if "numpy" in whats:
            s += f", {r['first_segment_gram'] / r['first_numpy']:.2f}x numpy ({r['first_numpy']:.2f} s)"
        s += (f", extra mem {100 * r['fmem_segment_gram']:.1f}% of X (+ code {r['fcode_segment_gram'] / 2**20:.1f} MB;"
              f" torch's: {100 * r['fmem_torch']:.1f}% + {r['fcode_torch'] / 2**20:.1f} MB)")
    s += (f" | steady: gram {r['steady_segment_gram']:.2f} s = "
          f"{r['steady_segment_gram'] / r['steady_torch']:.2f}x torch ({r['steady_torch']:.2f} s)")
    if "numpy" in whats:
        s += f", {r['steady_segment_gram'] / r['steady_numpy']:.2f}x numpy ({r['steady_numpy']:.2f} s)"
    s += (f", extra mem {100 * r['mem_segment_gram']:.1f}% of X | 1 - cos worst rel err {r['err']:.1e} "
          f"(torch fp32: {r['err_torch']:.1e}, {r['neg_torch']} negatives)")
    return s


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
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(int(sys.argv[2]), sys.argv[3], sys.argv[4])
        sys.exit(0)
    ap = argparse.ArgumentParser(description="Time segment_gram against X @ X.T (torch and numpy) on a random-walk "
                                             "trajectory of the paper's net (P = 188,810), first call and steady.")
    ap.add_argument("--n", type=int, nargs="+", default=[100, 256, 500, 1000, 2000], help="numbers of snapshots")
    ap.add_argument("--repeats", type=int, default=3, help="time each case this many times, keep the best")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--no-first", action="store_true", help="skip the fresh-process (first call) timings")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--json", default=None, help="write the rows here")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        from threadpoolctl import threadpool_info
        print("BLAS:", [(d.get("internal_api"), d.get("architecture"), d.get("num_threads"))
                        for d in threadpool_info()], flush=True)
    except ImportError:
        pass
    print(f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()}", flush=True)
    rows = run_table(a.n, a.repeats, a.device, not a.no_first)
    print(f"load average after: {os.getloadavg()}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
