"""Reading under --max-memory, and computing only what is asked: `embed()` without the Gram cache on
N snapshots of a conv + 1000x1000 linear net (1.0M params), as .npz, zip .pt and legacy .pt files.

    python bench/bench_read_chunks.py               # N = 40, best of 3, one table
    pytest bench/bench_read_chunks.py --benchmark-only

Rows: all tensors in 1 column chunk vs 8 chunks (each file is read once in total either way: .npz
ranges come straight from the member, zip .pt tensors stay memory-mapped between chunks; legacy .pt
files cannot be mapped and are loaded once per chunk), and one small layer (conv1, 1.7k params) alone.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pylandscape import mds

KINDS = ("npz", "pt", "pt_legacy")


def make_folder(root: Path, kind: str, n: int) -> Path:
    folder = root / f"{kind}-{n}"
    if folder.exists():
        return folder
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    base = {"conv1.weight": torch.randn(64, 3, 3, 3, generator=g), "fc.weight": torch.randn(1000, 1000, generator=g),
            "fc.bias": torch.randn(1000, generator=g)}
    for i in range(n):
        sd = {k: v + 0.01 * i for k, v in base.items()}
        if kind == "npz":
            np.savez(folder / f"e_{i}.npz", **{k: v.numpy() for k, v in sd.items()})
        else:
            torch.save({"state_dict": sd, "epoch": i}, folder / f"e_{i}.pt",
                       _use_new_zipfile_serialization=(kind == "pt"))
    return folder


def cases(n: int) -> list[tuple[str, dict]]:
    eight = n * 4 * 3 * 126_000  # --max-memory giving 8 column chunks of the 1.0M params
    return [("all tensors, 1 chunk", dict(max_memory="4G")), ("all tensors, 8 chunks", dict(max_memory=eight)),
            ("layer conv1 only", dict(layer="conv1.*", max_memory=eight))]


def run(folder: Path, **kw):
    return mds.embed(folder, cache=False, progress=False, device="cpu", **kw)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "pylandscape-bench-chunks"))
    args = ap.parse_args(argv)
    print(f"{'files':<10} {'case':<24} {'total s':>8} {'read s':>8} {'chunks':>6}")
    for kind in KINDS:
        folder = make_folder(Path(args.dir), kind, args.n)
        for label, kw in cases(args.n):
            best = None
            for _ in range(args.repeats):
                t = time.perf_counter()
                r = run(folder, **kw)
                t = time.perf_counter() - t
                if best is None or t < best[0]:
                    best = (t, r.timings.get("gram_read", 0.0), r.timings.get("read_chunks"))
            print(f"{kind:<10} {label:<24} {best[0]:>8.3f} {best[1]:>8.3f} {best[2]:>6}", flush=True)
    return 0


def _bench(benchmark, kind: str, case: int):
    n = int(os.environ.get("BENCH_CHUNKS_N", "20"))
    folder = make_folder(Path(tempfile.gettempdir()) / "pylandscape-bench-chunks", kind, n)
    label, kw = cases(n)[case]
    benchmark.extra_info.update(op=f"embed {label}, N={n}", device="cpu", impl=kind)
    benchmark(run, folder, **kw)


def test_bench_npz_8_chunks(benchmark):
    _bench(benchmark, "npz", 1)


def test_bench_pt_8_chunks(benchmark):
    _bench(benchmark, "pt", 1)


def test_bench_one_layer_pt(benchmark):
    _bench(benchmark, "pt", 2)


if __name__ == "__main__":
    sys.exit(main())
