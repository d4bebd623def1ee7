"""Benchmark of `python -m pylandscape.mds`: file reading from the page cache and the MDS computation,
ours next to scikit-learn's ClassicalMDS(metric="cosine") on the same matrix.

    python bench/bench_mds.py                      # 2,000 snapshots x 188,810 params (the target size)
    python bench/bench_mds.py --n 300              # quicker
    pytest bench/bench_mds.py --benchmark-only     # pytest-benchmark, small size (BENCH_MDS_N, default 300)

The snapshot folder (N x P x 4 bytes, 1.5 GB at the target size) is written once to --dir and reused.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


import pylandscape  # noqa: E402
from pylandscape import mds, ops  # noqa: E402
from pylandscape.flat import ParamSpec  # noqa: E402
from pylandscape.snapshots import discover  # noqa: E402

# 188,810 parameters in 7 tensors (a small CIFAR-style conv net's layout).
SPEC = ParamSpec(("conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias", "conv3.weight", "conv3.bias",
                  "fc.weight"),
                 ((32, 3, 5, 5), (32,), (32, 32, 5, 5), (32,), (64, 32, 5, 5), (64,), (257, 426)))
assert SPEC.numel == 188_810


def make_store(root: Path, n: int, spec: ParamSpec = SPEC, n_traj: int = 8, seed: int = 0) -> Path:
    """A pylandscape store of `n` snapshots along `n_traj` random-walk trajectories (no fsync: fast)."""
    from safetensors.torch import save_file
    from pylandscape.flat import unflatten
    if (root / "manifest.jsonl").exists() and sum(1 for _ in open(root / "manifest.jsonl")) == n:
        return root
    shutil.rmtree(root, ignore_errors=True)
    (root / "snapshots").mkdir(parents=True)
    (root / "spec.json").write_text(json.dumps({**spec.to_json(), "info": {}}))
    g = torch.Generator().manual_seed(seed)
    per = -(-n // n_traj)
    lines = []
    w = None
    for i in range(n):
        t, e = divmod(i, per)
        if e == 0:
            w = torch.randn(spec.numel, generator=g)
        w = w + 0.02 * torch.randn(spec.numel, generator=g)
        rel = f"snapshots/{i:07d}.safetensors"
        save_file({k: v.contiguous() for k, v in unflatten(w, spec).items()}, str(root / rel))
        lines.append(json.dumps({"index": i, "file": rel, "trajectory": f"t{t}", "epoch": e,
                                 "train_error": 1.0 / (e + 1)}))
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _time(fn, repeat=1):
    best = float("inf")
    out = None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def _buffer(sset, out):
    return np.empty((len(sset), sset.spec.numel), np.float32) if out is None else out


def read_ours(sset, out=None):
    return sset.read_block(range(len(sset)), sset.plan_pieces(0, sset.spec.numel), out=out, progress=False)


def read_safe_open(sset, out=None):
    from safetensors import safe_open
    out = _buffer(sset, out)
    offs = sset.spec.offsets.tolist()
    for r, item in enumerate(sset.items):
        with safe_open(str(item.path), framework="np") as f:
            for t, name in enumerate(sset.spec.names):
                out[r, offs[t]:offs[t + 1]] = f.get_tensor(name).reshape(-1)
    return out


def read_load_file(sset, out=None):
    from safetensors.torch import load_file
    out = _buffer(sset, out)
    for r, item in enumerate(sset.items):
        sd = load_file(str(item.path))
        out[r] = torch.cat([sd[n].reshape(-1) for n in sset.spec.names]).numpy()
    return out


def ours_from_matrix(X: np.ndarray, offsets: torch.Tensor, device="cpu") -> dict:
    """Everything after loading: per-tensor Gram, 1 - cos, centering, eigensolver."""
    tm = {}
    t = time.perf_counter()
    # one call over the whole matrix, as `python -m pylandscape.mds` does once the rows are read
    G = ops.segment_gram(torch.from_numpy(X), offsets, device=device, memory_budget=X.nbytes).sum(0)
    tm["gram"] = time.perf_counter() - t
    t = time.perf_counter()
    est = mds.ClassicalMDS(2, metric="cosine", device=device).fit_from_gram(G)
    tm["mds (1-cos, centering, eigh)"] = time.perf_counter() - t
    tm["total"] = tm["gram"] + tm["mds (1-cos, centering, eigh)"]
    return {"t": tm, "coords": est.embedding_, "eig": est.eigenvalues_[:2]}


def sklearn_from_matrix(X: np.ndarray) -> dict:
    from sklearn.manifold import ClassicalMDS
    t = time.perf_counter()
    est = ClassicalMDS(n_components=2, metric="cosine").fit(X)
    return {"t": {"total": time.perf_counter() - t}, "coords": est.embedding_, "eig": est.eigenvalues_}


def procrustes(A, B):
    A = A - A.mean(0)
    B = B - B.mean(0)
    U, _, Vt = np.linalg.svd(B.T @ A)
    return float(np.linalg.norm(A - B @ (U @ Vt)) / np.linalg.norm(A))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "pylandscape-bench-mds"))
    ap.add_argument("--skip-sklearn", action="store_true")
    ap.add_argument("--only-read", action="store_true", help="file-reading throughput only")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=2,
                    help="ours and sklearn alternate this many times; the best of each is kept")
    args = ap.parse_args(argv)
    root = Path(args.dir) / f"store-{args.n}"
    t, _ = _time(lambda: make_store(root, args.n))
    print(f"# store: {root} ({args.n} x {SPEC.numel:,} float32 = {args.n * SPEC.numel * 4 / 1e9:.2f} GB; "
          f"prepared in {t:.1f}s); torch threads {torch.get_num_threads()}, segment_gram = "
          f"{'compiled pylandscape._C' if pylandscape.has_extension() else 'pure-torch reference'}", flush=True)
    t_disc, sset = _time(lambda: discover(root))
    gb = args.n * SPEC.numel * 4 / 1e9

    class Rows(list):  # print each result as soon as it is measured (runs take minutes)
        def append(self, r):
            super().append(r)
            print(f"{r[0]:<44}  {r[1]:>9.3f}  {r[2]}", flush=True)
    print(f"{'step':<44}  {'seconds':>9}  note", flush=True)
    rows = Rows()
    rows.append(("discover (headers + manifest)", t_disc, ""))
    # Fresh memory is slow to touch the first time on a VM (host page faults: 0.2-3 GB/s measured here),
    # which is not what reading costs: read into one buffer touched beforehand, from a warm page cache.
    buf = np.zeros((len(sset), sset.spec.numel), np.float32)
    t, _ = _time(lambda: read_ours(sset, buf))
    rows.append(("read: ours, cold buffer (first run)", t, f"{gb / t:.2f} GB/s"))
    for name, fn in [("read: ours (header + mmap copy)", read_ours), ("read: safetensors safe_open", read_safe_open),
                     ("read: safetensors load_file + cat", read_load_file)]:
        t, X = _time(lambda: fn(sset, buf), repeat=3)
        rows.append((name, t, f"{gb / t:.2f} GB/s"))
    if args.only_read:
        return 0
    X = read_ours(sset, buf)
    # alternate ours and sklearn, keep the best of each: slow spells of a shared machine hit both alike
    ours = sk = None
    for _ in range(max(args.repeats, 1)):
        o = ours_from_matrix(X, sset.spec.offsets, args.device)
        if ours is None or o["t"]["total"] < ours["t"]["total"]:
            ours = o
        if not args.skip_sklearn:
            k = sklearn_from_matrix(X)
            if sk is None or k["t"]["total"] < sk["t"]["total"]:
                sk = k
    for k, v in ours["t"].items():
        rows.append((f"ours: {k}", v, ""))
    if not args.skip_sklearn:
        rows.append(("sklearn ClassicalMDS(metric='cosine').fit", sk["t"]["total"],
                     f"ours {sk['t']['total'] / ours['t']['total']:.2f}x faster"))
        res = procrustes(sk["coords"], ours["coords"])
        rows.append(("agreement (Procrustes residual / scale)", res, f"{res:.1e}"))
    # the cache: a first CLI-like run writes it, a second one for another layer reads it
    shutil.rmtree(root / ".pylandscape-cache", ignore_errors=True)
    t1, _ = _time(lambda: mds.embed(root, progress=False, device=args.device))
    t2, r2 = _time(lambda: mds.embed(root, layer="2", metric="chordal", progress=False, device=args.device))
    rows.append(("embed(), cold cache (read + gram + mds)", t1, ""))
    rows.append(("embed(), cache hit, other layer/metric", t2, f"gram from cache {r2.timings['gram']:.3f}s"))
    return 0


# ---------------- pytest-benchmark (small size; not part of the default test run) ----------------

def _bench_store():
    n = int(os.environ.get("BENCH_MDS_N", "300"))
    return make_store(Path(tempfile.gettempdir()) / "pylandscape-bench-mds" / f"store-{n}", n)


def _bench_read(benchmark, reader, impl):
    sset = discover(_bench_store())
    benchmark.extra_info.update(op=f"read N={len(sset)}", device="cpu", impl=impl)
    X = benchmark(reader, sset, np.zeros((len(sset), sset.spec.numel), np.float32))
    if benchmark.stats:  # None under --benchmark-disable
        benchmark.extra_info["gbps"] = round(X.nbytes / benchmark.stats.stats.min / 1e9, 2)


def test_bench_read_ours(benchmark):
    _bench_read(benchmark, read_ours, "ours")


def test_bench_read_safe_open(benchmark):
    _bench_read(benchmark, read_safe_open, "safetensors safe_open")


def test_bench_mds_ours(benchmark):
    sset = discover(_bench_store())
    X = read_ours(sset)
    benchmark.extra_info.update(op=f"mds N={len(sset)}", device="cpu", impl="ours")
    benchmark(ours_from_matrix, X, sset.spec.offsets)


def test_bench_mds_sklearn(benchmark):
    sset = discover(_bench_store())
    X = read_ours(sset)
    benchmark.extra_info.update(op=f"mds N={len(sset)}", device="cpu", impl="sklearn ClassicalMDS")
    benchmark(sklearn_from_matrix, X)


if __name__ == "__main__":
    sys.exit(main())
