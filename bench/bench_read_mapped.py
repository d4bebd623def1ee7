"""Safetensors rows mapped (snapshots/mapped.py) vs copied (SnapshotSet.read_block), and the Gram on each.

    python bench/bench_read_mapped.py                 # N = 2,000 x 188,810 float32 (1.5 GB), best of 3
    python bench/bench_read_mapped.py --n 500
    pytest bench/bench_read_mapped.py --benchmark-only

One process, the files in the page cache (read once first), the two ways alternating in each round. Each
round gets fresh buffers: a copy pays the page faults of fresh memory, as every command does. The Gram
columns check that the kernel reads the mapped pages as fast as a copy, and the checksums that it
computes the same bits.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_mds_e2e import make_folder, warm_page_cache

from pylandscape.ops import segment_gram
from pylandscape.snapshots import open_source
from pylandscape.snapshots.mapped import map_rows


def read(sset, how: str) -> tuple[torch.Tensor, torch.Tensor]:
    """X [N, P] float32 and the offsets of its tensors (file order = spec order for safetensors)."""
    L = len(sset.spec)
    offs = torch.tensor([0] + list(np.cumsum(sset.spec.sizes)), dtype=torch.int64)
    if how == "mapped":
        m = map_rows(sset.items, sset.spec.names, list(range(L)))
        if m is None or len(m.runs()) != 1:
            raise SystemExit("these files cannot be mapped as one run")
        return m.X, offs
    buf = sset.read_block(list(range(len(sset))), [(t, 0, s) for t, s in enumerate(sset.spec.sizes)])
    return torch.from_numpy(buf), offs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write the snapshots (default: a temporary folder, removed)")
    ap.add_argument("--no-gram", action="store_true", help="time the reading only")
    args = ap.parse_args(argv)
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="pylandscape-mapped-"))
    root = base / f"snapshots-{args.n}"
    try:
        make_folder(root, args.n)
        gb = warm_page_cache(root)
        sset = open_source(root)
        print(f"# {len(sset)} x {sset.spec.numel:,} float32 safetensors ({gb:.2f} GB, page cache); "
              f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")
        t_read: dict[str, list[float]] = {"mapped": [], "copied": []}
        t_gram: dict[str, list[float]] = {"mapped": [], "copied": []}
        sums: dict[str, float] = {}
        for _ in range(max(1, args.repeats)):
            for how in ("mapped", "copied"):
                t = time.perf_counter()
                X, offs = read(sset, how)
                t_read[how].append(time.perf_counter() - t)
                if not args.no_gram:
                    t = time.perf_counter()
                    G = segment_gram(X, offs)
                    t_gram[how].append(time.perf_counter() - t)
                    sums[how] = float(G.sum())
                del X
        print(f"\n{'rows':<8} {'read best s':>11} {'spread':>7} {'Gram best s':>11} {'spread':>7}  checksum of G")
        for how in ("mapped", "copied"):
            r = t_read[how]
            g = t_gram[how] or [float("nan")]
            print(f"{how:<8} {min(r):11.3f} {max(r) / min(r):6.2f}x {min(g):11.2f} {max(g) / min(g):6.2f}x  "
                  f"{sums.get(how, float('nan')):.17g}")
        print(f"\nmapped / copied: read {min(t_read['mapped']) / min(t_read['copied']):.3f}x"
              + ("" if args.no_gram else f", Gram {min(t_gram['mapped']) / min(t_gram['copied']):.3f}x, "
                 f"read + Gram {(min(t_read['mapped']) + min(t_gram['mapped'])) / (min(t_read['copied']) + min(t_gram['copied'])):.3f}x; "
                 f"same bits: {sums.get('mapped') == sums.get('copied')}"))
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)
    return 0


# ---- pytest-benchmark (small N, so the suite stays quick) ----
def _folder(tmp_path_factory, n=64):
    root = tmp_path_factory.mktemp("mapped") / f"snapshots-{n}"
    make_folder(root, n)
    warm_page_cache(root)
    return open_source(root)


def test_read_mapped(benchmark, tmp_path_factory):
    sset = _folder(tmp_path_factory)
    benchmark(lambda: read(sset, "mapped"))


def test_read_copied(benchmark, tmp_path_factory):
    sset = _folder(tmp_path_factory)
    benchmark(lambda: read(sset, "copied"))


if __name__ == "__main__":
    sys.exit(main())
