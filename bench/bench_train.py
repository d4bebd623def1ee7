"""K trajectories at once (grouped convolutions) vs one trajectory: wall time of one SGD epoch on CPU.

    pytest bench/bench_train.py --benchmark-only        # pytest-benchmark
    python bench/bench_train.py [--width 1] [--k 8] [--train-size 1500] [--threads 0]   # prints a table

One epoch = the paper's SGD (batch 100, lr 0.01) over the digits training set, forward + backward +
step, no evaluation. Routes: "single" (one dcnn); "grouped-split" / "grouped-conv" (K models as one
GroupedNet, each with its own minibatch, convolutions per model on channel slices / as one grouped
convolution; train_many's default is grouped-conv); "loop" (K separate models stepped in lockstep,
train_many(route="loop")).
--device cuda runs it on a GPU.
"""
from __future__ import annotations

import argparse
import math
import time

import pytest
import torch

from pylandscape.data import load_dataset
from pylandscape.flat import load_flat_
from pylandscape.models import GroupedNet, dcnn
from pylandscape.train import init_flats_for
from pylandscape.train.runners import GroupedRunner, LoopRunner, SingleRunner


def make_epoch(route: str, K: int, width: float, data, batch_size: int = 100, lr: float = 0.01):
    """A function running one SGD epoch of the given route (state persists between calls)."""
    x, y = data.x_train, data.y_train
    N = len(y)
    fn = lambda: dcnn(width)  # noqa: E731
    inits = init_flats_for(fn, range(K))
    gens = [torch.Generator().manual_seed(k) for k in range(K)]
    if route.startswith("grouped"):
        impl = {"grouped": "auto", "grouped-conv": "grouped", "grouped-split": "split"}[route]
        runner = GroupedRunner(GroupedNet(fn(), K, conv_impl=impl).load_flats_(inits).to(x.device))
    else:
        models = []
        for k in range(K):
            m = fn()
            load_flat_(m, inits[k])
            models.append(m.to(x.device))
        runner = SingleRunner(models[0]) if route == "single" else LoopRunner(models)
    opt = torch.optim.SGD(runner.parameters(), lr=lr)
    steps = math.ceil(N / batch_size)

    def epoch():
        perms = torch.stack([torch.randperm(N, generator=g) for g in gens]).to(x.device)
        for s in range(steps):
            opt.zero_grad(set_to_none=True)
            runner.minibatch_loss(x, y, perms[:, s * batch_size:(s + 1) * batch_size]).backward()
            opt.step()
    return epoch


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", train_size=500)


@pytest.mark.parametrize("route,K", [("single", 1), ("grouped-split", 8), ("grouped-conv", 8), ("loop", 8)])
def test_bench_sgd_epoch(benchmark, digits, route, K):
    epoch = make_epoch(route, K, 0.5, digits)
    epoch()  # warm-up
    benchmark.extra_info.update(op="SGD epoch (500 digits)", device="cpu", impl=route, route=route, K=K, width=0.5,
                                train_size=500)
    benchmark.pedantic(epoch, rounds=3, iterations=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--train-size", type=int, default=1500)
    p.add_argument("--repeats", type=int, default=3, help="timed epochs per route (the minimum is shown)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    data = load_dataset("digits", train_size=a.train_size, device=a.device)
    sync = torch.cuda.synchronize if a.device.startswith("cuda") else (lambda: None)
    routes = (("single", 1), ("grouped-split", a.k), ("grouped-conv", a.k), ("loop", a.k))
    epochs = [make_epoch(route, K, a.width, data) for route, K in routes]
    for epoch in epochs:
        epoch()  # warm-up
    best = [math.inf] * len(routes)
    for _ in range(a.repeats):  # interleaved, so that a change of machine load hits every route
        for i, epoch in enumerate(epochs):
            sync()
            t = time.perf_counter()
            epoch()
            sync()
            best[i] = min(best[i], time.perf_counter() - t)
    rows = [(route, K, t) for (route, K), t in zip(routes, best)]
    base = rows[0][2]
    print(f"SGD epoch, digits N={a.train_size}, width {a.width}, batch 100, device {a.device}, "
          f"threads {torch.get_num_threads()}")
    print(f"{'route':<14} {'K':>3} {'s/epoch':>9} {'s/traj-epoch':>13} {'vs one traj':>12}")
    for route, K, t in rows:
        print(f"{route:<14} {K:>3} {t:>9.3f} {t / K:>13.3f} {t / base:>11.2f}x")


if __name__ == "__main__":
    main()
