"""Every op beside 0, 1 and 2 busy processes (a training job next to the analysis): extension vs the pure-torch
code a user would write, best of --repeats, the two alternating. Small work must not wait on a busy core.

    python bench/bench_load.py                  # prints one table
    OMP_WAIT_POLICY=PASSIVE python bench/bench_load.py   # libgomp threads sleep instead of spinning at barriers

The busy processes are `while True: pass` loops started and ended by this script. Say what else ran on the
machine (uptime) when you quote the numbers: on a shared machine "0 busy" is not a quiet machine.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import PAPER_SIZES  # noqa: E402
from pylandscape import ops  # noqa: E402

OFF = torch.cumsum(torch.tensor([0] + PAPER_SIZES), 0)
P = int(OFF[-1])


def _pure_stats(flat):
    return torch.stack([torch.stack([s.mean(), s.std(unbiased=False), s.abs().mean()])
                        for s in (flat[a:b].double() for a, b in zip(OFF[:-1].tolist(), OFF[1:].tolist()))])


def _pure_perturb(flat, K):
    out = flat.expand(K, P).clone()
    for a, b in zip(OFF[:-1].tolist(), OFF[1:].tolist()):
        seg = out[:, a:b]
        seg += 0.1 * flat[a:b].std() * torch.randn_like(seg)
    return out


def cases():
    g = torch.Generator().manual_seed(0)
    flat = torch.randn(P, generator=g) * 0.05
    W = torch.randn(8, P, generator=g)
    coeffs = torch.rand(4, 8, dtype=torch.float64, generator=g)
    al = torch.linspace(0, 1, 64, dtype=torch.float64)
    X = flat + 1e-3 * torch.randn(64, P, generator=g)
    sc = torch.full((64,), 0.1, dtype=torch.float64)
    return [
        ("layer_stats", lambda: ops.layer_stats(flat, OFF), lambda: _pure_stats(flat)),
        ("perturb K=1", lambda: ops.perturb_layerwise(flat, OFF, 0.1, seed=1), lambda: _pure_perturb(flat, 1)),
        ("perturb K=64", lambda: ops.perturb_batched(flat, OFF, sc, seeds=list(range(64))),
         lambda: _pure_perturb(flat, 64)),
        ("interpolate K=64", lambda: ops.interpolate(flat, W[0], al),
         lambda: (1 - al.float())[:, None] * flat + al.float()[:, None] * W[0]),
        ("combine 8->4", lambda: ops.combine(W, coeffs), lambda: coeffs.float() @ W),
        ("segment_gram N=64 (vs X @ X.T)", lambda: ops.segment_gram(X, OFF), lambda: X @ X.T),
    ]


def timed(fn, repeats):
    t = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        t = min(t, time.perf_counter() - t0)
    return t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--busy", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args()
    cs = cases()
    for _, e, p in cs:  # warm-up
        e(), p()
    res = {}
    for nb in a.busy:
        procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(nb)]
        try:
            time.sleep(0.5)
            for name, e, p in cs:
                te = tp = float("inf")
                for _ in range(a.repeats):  # alternate, so a slow spell hits both
                    te = min(te, timed(e, 1))
                    tp = min(tp, timed(p, 1))
                res[(name, nb)] = (te, tp)
        finally:
            for pr in procs:
                pr.kill()
                pr.wait()
    print(f"torch threads {torch.get_num_threads()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}, "
          f"load average {os.getloadavg()}")
    hdr = "| op | " + " | ".join(f"{nb} busy: ext ms / pure ms = ratio" for nb in a.busy) + " |"
    print(hdr)
    print("|---|" + "---|" * len(a.busy))
    for name, _, _ in cs:
        cells = []
        for nb in a.busy:
            te, tp = res[(name, nb)]
            cells.append(f"{1e3 * te:.2f} / {1e3 * tp:.2f} = {te / tp:.2f}")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
