"""Run every bench/bench_*.py in one process and print one table (ms, GB/s, speed-up vs pure torch).

Usage: python bench/run_table.py [-k EXPR] [--json out.json]. The numbers depend on the machine and
on what else runs on it; say which machine and how busy it was when you quote them.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile

import pytest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-k", default=None, help="pytest -k expression to select benchmarks")
    ap.add_argument("--json", default=None, help="also keep pytest-benchmark's JSON here")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads(N) first (1 gives steadier numbers on a busy shared machine)")
    args = ap.parse_args(argv)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    here = os.path.dirname(os.path.abspath(__file__))
    files = sorted(glob.glob(os.path.join(here, "bench_*.py")))
    out = args.json or os.path.join(tempfile.mkdtemp(), "bench.json")
    pargs = ["-q", "-p", "no:cacheprovider", f"--benchmark-json={out}", "--benchmark-columns=median",
             "--benchmark-disable-gc", "--rootdir", here, *files]
    if args.k:
        pargs += ["-k", args.k]
    rc = pytest.main(pargs)
    if not os.path.exists(out):
        print("no benchmark results", file=sys.stderr)
        return int(rc) or 1
    with open(out) as f:
        data = json.load(f)
    rows = []
    for b in data["benchmarks"]:
        ei = b.get("extra_info", {})
        rows.append((ei.get("op", b["name"]), ei.get("device", "?"), ei.get("K", ""), ei.get("impl", ""),
                     b["stats"]["median"] * 1e3, ei.get("gbps", ""), ei.get("speedup_vs_pure", "")))
    rows.sort(key=lambda r: (r[0], r[1], int(r[2]) if str(r[2]).isdigit() else 0, r[3] != "pure"))
    hdr = ("op", "device", "K", "impl", "median ms", "GB/s", "x pure")
    print()
    print("| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]:.3f} | {r[5]} | {r[6]} |")
    return int(rc)


if __name__ == "__main__":
    sys.exit(main())
