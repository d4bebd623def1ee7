"""Every op beside 0, 1 and 2 busy processes (a training job next to the analysis): extension vs the code a
user would write otherwise, the two alternating, --repeats calls each per sweep, over --rounds sweeps of the
busy levels; each cell shows the best time of all (reproducible: one slow spell of a shared machine does not
decide it) and the median ratio (what a call usually costs: waits on a descheduled thread show there).

    python bench/bench_load.py                         # prints the table (about 2 minutes on 2 cores)
    python bench/bench_load.py --busy-kind matmul      # the competitors run numpy matmul loops instead
    python bench/bench_load.py --out bench/results_load.md --label "after"   # also append the table there

Competitors: `spin` = `python -c 'while True: pass'` (one core each, no memory traffic); `matmul` = a numpy
512 x 512 fp32 matmul loop on one BLAS thread (a compute-bound training step, some cache traffic). They are
started and stopped by this script. Ops, at the paper's size (P = 188,810 in 10 tensors):
  layer_stats, perturb (K = 1, 64), interpolate, combine: extension vs pure torch (bench/README.md);
  segment_gram N = 64, 100, 256 (a random-walk trajectory) vs torch X @ X.T (fp32, not accurate: the speed
  reference);
  MDS N = 256: pylandscape.mds.ClassicalMDS(metric="cosine").fit vs scikit-learn's on the same matrix.
Say what else ran on the machine (uptime, printed) when you quote the numbers: "0 busy" is not a quiet
machine on a shared VM.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import PAPER_SIZES

from pylandscape import ops

OFF = torch.cumsum(torch.tensor([0] + PAPER_SIZES), 0)
P = int(OFF[-1])
BUSY = {
    "spin": "while True: pass",
    "matmul": ("import os; os.environ['OPENBLAS_NUM_THREADS'] = '1'; import numpy as np; "
               "a = np.random.rand(512, 512).astype(np.float32)\nwhile True: a @ a"),
}


def _pure_stats(flat):
    return torch.stack([torch.stack([s.mean(), s.std(unbiased=False), s.abs().mean()])
                        for s in (flat[a:b].double() for a, b in zip(OFF[:-1].tolist(), OFF[1:].tolist()))])


def _pure_perturb(flat, K):
    out = flat.expand(K, P).clone()
    for a, b in zip(OFF[:-1].tolist(), OFF[1:].tolist()):
        seg = out[:, a:b]
        seg += 0.1 * flat[a:b].std() * torch.randn_like(seg)
    return out


def _walk(N, g):
    """N snapshots of a random walk whose steps shrink from 1e-2 to 1e-6 of the weight norm."""
    x = torch.randn(P, generator=g, dtype=torch.float64)
    steps = 1e-2 * 1e-4 ** (torch.arange(N, dtype=torch.float64) / max(N - 1, 1))
    u = torch.randn(N, P, generator=g, dtype=torch.float64)
    u *= (steps * x.norm() / u.norm(dim=1))[:, None]
    return (x + u.cumsum(0)).float()


def cases():
    from sklearn.manifold import ClassicalMDS as SkMDS

    from pylandscape.mds import ClassicalMDS

    g = torch.Generator().manual_seed(0)
    flat = torch.randn(P, generator=g) * 0.05
    W = torch.randn(8, P, generator=g)
    coeffs = torch.rand(4, 8, dtype=torch.float64, generator=g)
    al = torch.linspace(0, 1, 64, dtype=torch.float64)
    sc = torch.full((64,), 0.1, dtype=torch.float64)
    walks = {N: _walk(N, g) for N in (64, 100, 256)}
    Xm = walks[256].numpy()
    out = [
        ("layer_stats", lambda: ops.layer_stats(flat, OFF), lambda: _pure_stats(flat)),
        ("perturb K=1", lambda: ops.perturb_layerwise(flat, OFF, 0.1, seed=1), lambda: _pure_perturb(flat, 1)),
        ("perturb K=64", lambda: ops.perturb_batched(flat, OFF, sc, seeds=list(range(64))),
         lambda: _pure_perturb(flat, 64)),
        ("interpolate K=64", lambda: ops.interpolate(flat, W[0], al),
         lambda: (1 - al.float())[:, None] * flat + al.float()[:, None] * W[0]),
        ("combine 8->4", lambda: ops.combine(W, coeffs), lambda: coeffs.float() @ W),
    ]
    for N, X in walks.items():
        out.append((f"segment_gram N={N} (vs X @ X.T)", lambda X=X: ops.segment_gram(X, OFF), lambda X=X: X @ X.T))
    out.append(("MDS N=256 (vs sklearn ClassicalMDS)", lambda: ClassicalMDS(2, metric="cosine").fit(walks[256]),
                lambda: SkMDS(n_components=2, metric="cosine").fit(Xm)))
    return out


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(cs, nb, kind, repeats, res):
    """One sweep at nb busy processes: every case, extension and baseline alternating; all times kept in res."""
    procs = [subprocess.Popen([sys.executable, "-c", BUSY[kind]]) for _ in range(nb)]
    try:
        time.sleep(0.5 if kind == "spin" else 1.5)  # numpy's import takes a while
        for name, e, p in cs:
            te, tp = res.setdefault((name, nb), ([], []))
            for _ in range(repeats):  # alternate, so that a slow spell hits both
                te.append(timed(e))
                tp.append(timed(p))
    finally:
        for pr in procs:
            pr.kill()
            pr.wait()


def table(cs, res, busy) -> str:
    """Best times (what the op can do) and, in brackets, medians (what a call usually costs: a call that
    waited on a descheduled thread shows there, not in the best)."""
    lines = ["| op | " + " | ".join(f"{nb} busy: ext / base ms = ratio (median ratio)" for nb in busy)
             + " | ext slowdown at " + ", ".join(str(nb) for nb in busy[1:]) + " busy, best (median) |",
             "|---|" + "---|" * (len(busy) + 1)]
    best = {k: (min(te), min(tp)) for k, (te, tp) in res.items()}
    med = {k: (statistics.median(te), statistics.median(tp)) for k, (te, tp) in res.items()}
    for name, _, _ in cs:
        cells = []
        for nb in busy:
            te, tp = best[(name, nb)]
            me, mp = med[(name, nb)]
            cells.append(f"{1e3 * te:.2f} / {1e3 * tp:.2f} = {te / tp:.2f} ({me / mp:.2f})")
        slow = ", ".join(f"{best[(name, nb)][0] / best[(name, busy[0])][0]:.1f}x "
                         f"({med[(name, nb)][0] / med[(name, busy[0])][0]:.1f}x)" for nb in busy[1:])
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {slow} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--busy", type=int, nargs="+", default=[0, 1, 2], help="numbers of busy processes")
    ap.add_argument("--busy-kind", choices=sorted(BUSY), default="spin")
    ap.add_argument("--repeats", type=int, default=5, help="alternating calls per case and sweep")
    ap.add_argument("--rounds", type=int, default=2, help="sweeps over the busy levels (best of all)")
    ap.add_argument("--out", default=None, help="append the table (markdown) to this file")
    ap.add_argument("--label", default="", help="a heading for --out")
    a = ap.parse_args()
    cs = cases()
    for _, e, p in cs:  # warm-up (first calls: thread pools, page faults, code pages)
        e(), p()
    before = os.getloadavg()
    t0 = time.time()
    res = {}
    for _ in range(a.rounds):
        for nb in a.busy:
            measure(cs, nb, a.busy_kind, a.repeats, res)
    head = (f"torch {torch.__version__}, threads {torch.get_num_threads()}, busy kind {a.busy_kind}, "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}, repeats {a.repeats} x rounds "
            f"{a.rounds}, {time.time() - t0:.0f} s, load average before {before[0]:.2f}, after "
            f"{os.getloadavg()[0]:.2f}")
    tab = table(cs, res, a.busy)
    print(head)
    print(tab)
    if a.out:
        with open(a.out, "a") as f:
            f.write(f"\n### {a.label or time.strftime('%Y-%m-%d %H:%M')}\n\n{head}\n\n{tab}\n")


if __name__ == "__main__":
    main()
