"""Hessian trace and spectral density of the paper's network on digits: ours vs PyHessian, and our
products one at a time vs several per data pass (HessianOperator.matmat).

    pytest bench/bench_hessian.py --benchmark-only
    python bench/bench_hessian.py [--images 500] [--probes 16] [--runs 4] [--steps 15] [--repeats 2]

All rows: dcnn width 1 (188,810 parameters), eval mode with the model's BatchNorm statistics, mean
cross-entropy over the same images in one batch, float32, Rademacher probes. PyHessian (`data=(x, y)`)
builds the gradient's graph once in its constructor and reuses it for every product (its full-batch
mode); its constructor is timed with it. PyHessian's density() no longer runs (torch.eig was removed
from torch), so the SLQ rows are compared with its time per product. "one at a time": each product rebuilds the forward pass and
the gradient graph (our operator before matmat); "k per pass": matmat (SLQ runs in lockstep). Rows
alternate round-robin, best of --repeats; the time per product is the headline.
"""
from __future__ import annotations

import argparse
import time

import pytest
import torch

from pylandscape.data import load_dataset
from pylandscape.landscape.hessian import (
    HessianOperator,
    hutchinson_trace,
    spectral_density,
)
from pylandscape.models import dcnn

try:  # the reference package is optional
    import pyhessian
except ImportError:  # pragma: no cover - depends on the environment
    pyhessian = None


class OneAtATime:
    """The operator without matmat: every product pays its own forward pass and gradient graph."""

    def __init__(self, op):
        self.op, self.dim, self.theta = op, op.dim, op.theta

    def __call__(self, v):
        return self.op(v)


def setup(images: int = 500):
    torch.manual_seed(0)
    d = load_dataset("digits")
    m = dcnn(1.0)
    with torch.no_grad():
        m.train()
        m(d.x_train[:500])
    m.eval()
    x, y = d.x_train[:images], d.y_train[:images]
    op = HessianOperator(m, x, y, bn="keep", batch_size=images)
    return m, x, y, op


def competitors(m, x, y, op, probes: int, runs: int, steps: int):
    c = {}
    if pyhessian is not None:
        def ph_trace():
            # PyHessian's own graph and product (its trace() loop without its stopping test, which divides
            # by the running mean without abs(): a negative estimate stops it after 2 probes at tol=0)
            from pyhessian.utils import group_product, hessian_vector_product
            torch.manual_seed(1)
            for p in m.parameters():
                p.grad = None
            h = pyhessian.hessian(m, torch.nn.CrossEntropyLoss(), data=(x, y), cuda=False)
            for _ in range(probes):
                v = [torch.randint_like(p, high=2) * 2 - 1 for p in h.params]
                group_product(hessian_vector_product(h.gradsH, h.params, v), v)
            for p in m.parameters():
                p.grad = None  # break the graph's reference cycle
            return probes

        # PyHessian 0.1's density() calls torch.eig, removed from torch since 1.9 (RuntimeError): no row
        c["PyHessian trace"] = (ph_trace, probes)

    def products(f):  # -> number of Hessian-vector products the call made
        def run():
            before = op.num_products
            f()
            return op.num_products - before
        return run
    c["ours trace, one product per pass"] = (products(lambda: hutchinson_trace(OneAtATime(op), probes, seed=1)), probes)
    c["ours trace, 8 probes per pass"] = (products(lambda: hutchinson_trace(op, probes, seed=1, probes_per_pass=8)),
                                          probes)
    c["ours SLQ, runs one after another"] = (products(lambda: spectral_density(OneAtATime(op), runs=runs, steps=steps)),
                                             runs * steps)
    c[f"ours SLQ, {runs} runs in lockstep"] = (products(lambda: spectral_density(op, runs=runs, steps=steps)),
                                               runs * steps)
    return c


@pytest.fixture(scope="module")
def small():
    return setup(images=200)


@pytest.mark.parametrize("name", ["ours trace, one product per pass", "ours trace, 8 probes per pass",
                                  "PyHessian trace"])
def test_hessian_trace(benchmark, small, name):
    c = competitors(*small, probes=8, runs=2, steps=4)
    if name not in c:
        pytest.skip("PyHessian is not installed (pip install pyhessian==0.1)")
    benchmark.extra_info.update(op="Hutchinson trace, dcnn on 200 digits", device="cpu", impl=name)
    benchmark.pedantic(c[name][0], rounds=2, iterations=1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--probes", type=int, default=16)
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    m, x, y, op = setup(args.images)
    c = competitors(m, x, y, op, args.probes, args.runs, args.steps)
    best = {k: float("inf") for k in c}
    worst = {k: 0.0 for k in c}
    done = {}
    for _ in range(args.repeats):
        for k, (f, _) in c.items():
            t0 = time.perf_counter()
            n = done[k] = f()
            dt = (time.perf_counter() - t0) / n
            best[k], worst[k] = min(best[k], dt), max(worst[k], dt)
    print(f"\nHessian-vector products of dcnn (188,810 parameters) on {args.images} digits images, "
          f"{torch.get_num_threads()} threads, best of {args.repeats}\n")
    print("(PyHessian 0.1's density() calls torch.eig, removed from torch: it cannot run, so SLQ rows are\n"
          " compared with PyHessian's time per product in its trace)\n")
    print("| method | products | ms / product | x vs PyHessian | spread |")
    print("|---|---|---|---|---|")
    for k in c:
        n = done[k]
        ref = best.get("PyHessian trace")
        vs = f"{ref / best[k]:.2f}" if ref else "n/a"
        print(f"| {k} | {n} | {1e3 * best[k]:.1f} | {vs} | {worst[k] / best[k]:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
