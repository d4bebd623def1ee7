"""A loss surface of the paper's network on digits: our batched evaluator vs what the existing tools do.

    pytest bench/bench_landscape.py --benchmark-only          # pytest-benchmark, a few grid points each
    python bench/bench_landscape.py [--points 49] [--repeats 3] [--train-size 1500] [--full]

Competitors, all on the same model (dcnn, width 1, 188,810 parameters), the same filter-normalised
directions and the same grid points, loss and error on the digits training set (1,500 images unless
--train-size), BatchNorm statistics kept (eval mode) unless the row says otherwise:
- "loss-landscapes": the `loss-landscapes` package's `random_plane` (copies a step of the direction
  into the model's parameters in place, one forward of the whole data set per grid point); skipped
  when the package is not installed. Its grid is steps x steps with steps = sqrt(--points).
- "copy+forward": the same recipe written here (load the point into the model, one forward of all
  images), so the row exists without the package.
- "copy+forward, batches of B": the same loop with the data in batches of B (what a DataLoader loop
  such as tomgoldstein/loss-landscape does, at our batch size).
- "ours keep" / "ours reestimate": `landscape.evaluate_points` on `CombinationPoints` (grid points
  formed by the combine kernel), route auto (one model per core on CPU, forwards in oneDNN's layout
  with BatchNorm folded: landscape/onednn.py), bn keep / reestimate (statistics recomputed exactly for
  every point; for nn.Sequential in the same single pass). "ours keep, eager forwards": the same
  with forward="eager" (plain PyTorch modules), to show what the oneDNN plan adds.
- "ours grouped" / "ours vmap": K models per pass, the other routes (slower for convolutions on CPU).
Times per grid point are the best of --repeats rounds, the competitors alternating round-robin so a
slow spell of the shared machine hits them alike; "51x51 s" extrapolates the per-point time to 2,601
points (per-point cost does not depend on the grid size); --full also times ours on the whole grid.
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pylandscape.data import load_dataset
from pylandscape.flat import flatten_module, load_flat_
from pylandscape.landscape import CombinationPoints, evaluate_points, random_directions
from pylandscape.models import dcnn

try:  # the reference package is optional
    import loss_landscapes
    import loss_landscapes.metrics
except ImportError:  # pragma: no cover - depends on the environment
    loss_landscapes = None


def setup(train_size: int = 1500, points: int = 49, width: float = 1.0, device: str = "cpu"):
    """(model with BN statistics, x, y, theta, directions [2, P], coeffs [points, 3]) on a steps x steps grid."""
    torch.manual_seed(0)
    d = load_dataset("digits", train_size=train_size if train_size < 1500 else None)
    m = dcnn(width)
    with torch.no_grad():  # realistic BatchNorm statistics for "keep"
        m.train()
        m(d.x_train[:500])
    m.eval()
    theta, spec = flatten_module(m)
    D = random_directions(theta, spec, 2, seed=0)
    steps = round(math.sqrt(points))
    a = np.linspace(-1, 1, steps)
    coeffs = torch.tensor([[1.0, u, v] for v in a for u in a], dtype=torch.float64)
    return m.to(device), d.x_train.to(device), d.y_train.to(device), theta.to(device), D.to(device), coeffs


def copy_forward(m, x, y, theta, D, coeffs, batch: int | None = None):
    """The existing tools' recipe: weights into the model, one forward (or a loop of batches) per point."""
    out = []
    with torch.no_grad():
        for c in coeffs.tolist():
            load_flat_(m, theta + c[1] * D[0] + c[2] * D[1])
            if batch is None:
                logits = m(x)
            else:
                logits = torch.cat([m(x[s:s + batch]) for s in range(0, x.shape[0], batch)])
            out.append(float(F.cross_entropy(logits, y)))
    return out


def loss_landscapes_plane(m, x, y, steps: int):
    """The package's own random_plane (its own random filter-normalised directions)."""
    metric = loss_landscapes.metrics.Loss(torch.nn.CrossEntropyLoss(), x, y)
    with torch.no_grad():
        return loss_landscapes.random_plane(m, metric, distance=1, steps=steps, normalization="filter",
                                            deepcopy_model=True)


def ours(m, x, y, theta, D, coeffs, bn="keep", route="auto", batch=256, forward="auto"):
    pts = CombinationPoints(torch.stack([theta, D[0], D[1]]), coeffs)
    return evaluate_points(m, pts, (x, y), bn=bn, route=route, batch_size=batch, forward=forward)


def competitors(m, x, y, theta, D, coeffs, batch: int):
    steps = round(math.sqrt(coeffs.shape[0]))
    c = {}
    if loss_landscapes is not None:
        c["loss-landscapes random_plane"] = lambda: loss_landscapes_plane(m, x, y, steps)
    c["copy+forward (all images per forward)"] = lambda: copy_forward(m, x, y, theta, D, coeffs)
    c[f"copy+forward, batches of {batch}"] = lambda: copy_forward(m, x, y, theta, D, coeffs, batch)
    c["ours keep"] = lambda: ours(m, x, y, theta, D, coeffs, "keep", batch=batch)
    c["ours keep, eager forwards"] = lambda: ours(m, x, y, theta, D, coeffs, "keep", batch=batch, forward="eager")
    c["ours reestimate"] = lambda: ours(m, x, y, theta, D, coeffs, "reestimate", batch=batch)
    c["ours grouped keep (K per pass)"] = lambda: ours(m, x, y, theta, D, coeffs[:8], "keep", "grouped", batch)
    c["ours vmap keep (K per pass)"] = lambda: ours(m, x, y, theta, D, coeffs[:8], "keep", "vmap", batch)
    npts = {k: (8 if "K per pass" in k else steps * steps if k.startswith("loss-landscapes") else coeffs.shape[0])
            for k in c}
    return c, npts


# ------------------------------------------------------------------------------- pytest-benchmark
@pytest.fixture(scope="module")
def small():
    return setup(train_size=1500, points=9)


@pytest.mark.parametrize("name", ["copy+forward (all images per forward)", "copy+forward, batches of 256",
                                  "ours keep", "ours reestimate", "loss-landscapes random_plane"])
def test_surface_points(benchmark, small, name):
    m, x, y, theta, D, coeffs = small
    c, npts = competitors(m, x, y, theta, D, coeffs, 256)
    if name not in c:
        pytest.skip("loss-landscapes is not installed (pip install loss-landscapes --no-deps)")
    benchmark.extra_info.update(op="surface 3x3 of dcnn, digits 1500", device="cpu", K=npts[name], impl=name)
    benchmark.pedantic(c[name], rounds=2, iterations=1)


# ------------------------------------------------------------------------------------------ script
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", type=int, default=49, help="grid points per measurement (a square number)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--train-size", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda: on CUDA route auto is 'grouped' "
                                                   "(K models per pass), the GPU factor of issue [landscape]")
    ap.add_argument("--full", action="store_true", help="also time ours keep on the whole 51 x 51 grid once")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    m, x, y, theta, D, coeffs = setup(args.train_size, args.points, device=args.device)
    c, npts = competitors(m, x, y, theta, D, coeffs, args.batch)
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    # same numbers first (the ones that share directions and grid)
    ref = copy_forward(m, x, y, theta, D, coeffs[:4], args.batch)
    got = ours(m, x, y, theta, D, coeffs[:4]).losses["train"].tolist()
    assert np.allclose(ref, got, rtol=1e-5), (ref, got)
    best = {k: float("inf") for k in c}
    times = {k: [] for k in c}
    for _ in range(args.repeats):
        for k, f in c.items():
            sync()
            t0 = time.perf_counter()
            f()
            sync()
            dt = (time.perf_counter() - t0) / npts[k]
            times[k].append(dt)
            best[k] = min(best[k], dt)
    base = best["copy+forward (all images per forward)"]
    where = torch.cuda.get_device_name() if x.is_cuda else f"{torch.get_num_threads()} threads"
    print(f"\n51 x 51 surface of dcnn (188,810 parameters) on digits, {x.shape[0]} training images, "
          f"{where}, best of {args.repeats} (spread = worst/best)\n")
    print("| method | ms / grid point | 51x51 s (extrapolated) | x vs copy+forward | x vs loss-landscapes | spread |")
    print("|---|---|---|---|---|---|")
    ll = best.get("loss-landscapes random_plane")
    for k in c:
        b = best[k]
        vs_ll = f"{ll / b:.2f}" if ll else "n/a"
        print(f"| {k} | {1e3 * b:.1f} | {2601 * b:.0f} | {base / b:.2f} | {vs_ll} | {max(times[k]) / b:.2f} |")
    if args.full:
        full = torch.tensor([[1.0, u, v] for v in np.linspace(-1, 1, 51) for u in np.linspace(-1, 1, 51)],
                            dtype=torch.float64)
        t0 = time.perf_counter()
        ours(m, x, y, theta, D, full, "keep", batch=args.batch)
        print(f"\nours keep, whole 51 x 51 grid once: {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
