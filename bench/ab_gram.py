"""Compare builds of segment_gram in alternating fresh processes (a noisy shared VM drifts by as much as the
change being measured, so one build after the other says little).

Each process imports pylandscape from one checkout (its folder on PYTHONPATH, with its own built
pylandscape/_C.abi3.so), makes bench_gram.py's random-walk trajectory, then alternates `calls` segment_gram
calls with as many torch `X @ X.T` calls. Per build it prints the median over processes of
(best segment_gram / best torch in that process), their range, the median of the per-process median ratios,
and the checksum of G (identical when the change keeps the bits).

    python bench/ab_gram.py --n 100 --procs 8 --calls 20 /path/to/checkout-a /path/to/checkout-b
    python bench/ab_gram.py --n 100 /path/to/checkout:PYLANDSCAPE_GRAM_PACKED_BYTES=3200000   # with env vars
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

CHILD = r"""
import statistics, sys, time
sys.path.insert(0, sys.argv[3])
import torch
from bench_gram import offsets, trajectory
from pylandscape import ops
N, calls = int(sys.argv[1]), int(sys.argv[2])
X, off = trajectory(N), offsets()
ops.segment_gram(X, off); X @ X.T
g, t = [], []
for _ in range(calls):
    a = time.perf_counter(); G = ops.segment_gram(X, off); b = time.perf_counter(); X @ X.T; c = time.perf_counter()
    g.append(b - a); t.append(c - b)
print(min(g), min(t), statistics.median(g), statistics.median(t), float(G.sum()))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("builds", nargs="+", help="checkout folders, each optionally followed by :VAR=value,...")
    ap.add_argument("--n", type=int, default=100, help="snapshots")
    ap.add_argument("--procs", type=int, default=6, help="processes per build")
    ap.add_argument("--calls", type=int, default=12, help="calls of each kind per process")
    a = ap.parse_args()
    res: dict[str, list[tuple[float, ...]]] = {b: [] for b in a.builds}
    for _ in range(a.procs):
        for b in a.builds:
            path, _, ev = b.partition(":")
            extra = dict(kv.split("=", 1) for kv in ev.split(",") if kv)
            env = dict(os.environ, PYTHONPATH=os.path.abspath(path), **extra)
            out = subprocess.run([sys.executable, "-c", CHILD, str(a.n), str(a.calls), HERE], env=env, check=False,
                                 capture_output=True, text=True, cwd="/")
            if out.returncode:
                sys.exit(f"{b}: the child failed:\n{out.stderr[-2000:]}")
            res[b].append(tuple(float(x) for x in out.stdout.split()))
    for b, v in res.items():
        rmin = sorted(x[0] / x[1] for x in v)
        rmed = statistics.median(x[2] / x[3] for x in v)
        best, best_t = min(x[0] for x in v) * 1e3, min(x[1] for x in v) * 1e3
        print(f"{b}: x torch {statistics.median(rmin):.3f} (range {rmin[0]:.3f}-{rmin[-1]:.3f}), median-call "
              f"ratio {rmed:.3f}; best {best:.1f} ms vs torch {best_t:.1f} ms; checksum {sorted({x[4] for x in v})}")


if __name__ == "__main__":
    main()
