"""Landmark MDS of N = 50,000 real SGD snapshots through the command line: wall time and peak memory (issue 15).

    # the snapshot set (once; keep it out of the checkout): k SGD trajectories of the paper's network at
    # width 0.25 (P = 12,974), the weights after every step, one store per trajectory (N x 52 KB)
    flock -s /tmp/bench.lock python bench/landmark_scale.py make --out /work/data-h15/snaps --n 50000
    # time `python -m pylandscape.mds --snapshots DIR` (landmark MDS: auto above 20,000 snapshots) under
    # /usr/bin/time -v (peak RSS); --cold evicts the files from the page cache first (posix_fadvise)
    flock /tmp/bench.lock python bench/landmark_scale.py run --snapshots /work/data-h15/snaps --cold -- --max-memory 4G

The trajectories are those of bench/landmark_accuracy.py (one initialisation, k data orders, minibatch
SGD lr 0.05, batch 64, the embedded digits), written with SnapshotStore.append; the trainer itself would
also evaluate the model at every snapshot (most of its time at one snapshot per step), which a map of
the weights does not need.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path


def make_trajectory(out: str, k: int, steps: int, width: float, lr: float, batch: int) -> float:
    """Trajectory k (1-based): `steps` SGD steps from the shared init, the weights after each into out/traj_k."""
    import torch

    from pylandscape.data import load_dataset
    from pylandscape.flat import flatten_module
    from pylandscape.models import dcnn
    from pylandscape.store import SnapshotStore

    torch.set_num_threads(1)
    t = time.perf_counter()
    data = load_dataset("digits")
    torch.manual_seed(0)
    model = dcnn(width=width)  # the same init for every k (seed 0), as in landmark_accuracy.py
    _, spec = flatten_module(model)
    st = SnapshotStore(Path(out) / f"traj_{k}", spec, info={"made_by": "bench/landmark_scale.py"})
    if len(st):
        raise SystemExit(f"{st.root} already holds snapshots: use a fresh --out")
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(1000 + k - 1)
    per_epoch = -(-data.x_train.shape[0] // batch)
    for s in range(1, steps + 1):
        idx = torch.randint(0, data.x_train.shape[0], (batch,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx]).backward()
        opt.step()
        st.append(flatten_module(model)[0], trajectory=k, step=s, epoch=round(s / per_epoch, 4))
    return time.perf_counter() - t


def make(args) -> None:
    steps = -(-args.n // args.trajectories)
    t = time.perf_counter()
    with ProcessPoolExecutor(args.jobs) as pool:
        futs = [pool.submit(make_trajectory, args.out, k, steps, args.width, args.lr, args.batch)
                for k in range(1, args.trajectories + 1)]
        each = [f.result() for f in futs]
    size = sum(f.stat().st_size for f in Path(args.out).rglob("*") if f.is_file())
    print(f"{args.trajectories} trajectories x {steps} steps = {args.trajectories * steps} snapshots in "
          f"{time.perf_counter() - t:.0f} s ({args.jobs} processes; per trajectory {min(each):.0f}-{max(each):.0f} s); "
          f"{size / 1e9:.2f} GB in {args.out}")


def evict(root: str) -> int:
    """Drop the files under root from the page cache (a cold read), without touching other files."""
    n = 0
    for dirpath, _, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
            n += 1
    return n


def run(args, extra: list[str]) -> None:
    if args.cold:
        evict(args.snapshots)
    with tempfile.TemporaryDirectory() as out:
        cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "pylandscape.mds", "--snapshots", args.snapshots,
               "--out", out, "--no-progress", *extra]
        load0 = " ".join(f"{x:.2f}" for x in os.getloadavg())
        t = time.perf_counter()
        r = subprocess.run(cmd, check=False, capture_output=True, text=True)
        wall = time.perf_counter() - t
        load1 = " ".join(f"{x:.2f}" for x in os.getloadavg())
        if r.returncode:
            raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
        rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1))
        res = json.loads((Path(out) / "mds.json").read_text())
    tim = res.get("timings", {})
    fmt = ", ".join(f"{k} {v:.1f}" if isinstance(v, (int, float)) else f"{k} {v}" for k, v in tim.items())
    print(f"- `python -m pylandscape.mds --snapshots DIR {' '.join(extra)}` ({'cold' if args.cold else 'warm'} "
          f"page cache); load average before {load0}, after {load1}")
    print(f"- {res.get('n_snapshots')} snapshots, P = {res.get('n_params')}; "
          f"solver: {res.get('solver')}")
    print(f"- wall {wall:.1f} s, peak RSS {rss_kb / 1024**2:.2f} GiB; timings (s): {fmt}")
    print(f"- /usr/bin/time: {' '.join(ln.strip() for ln in r.stderr.splitlines() if 'Elapsed' in ln or 'User time' in ln or 'System time' in ln or 'Major' in ln)}")


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make", help="write the snapshot set")
    m.add_argument("--out", required=True)
    m.add_argument("--n", type=int, default=50_000)
    m.add_argument("--trajectories", type=int, default=8)
    m.add_argument("--width", type=float, default=0.25)
    m.add_argument("--lr", type=float, default=0.05)
    m.add_argument("--batch", type=int, default=64)
    m.add_argument("--jobs", type=int, default=2, help="processes [2]")
    r = sub.add_parser("run", help="time the mds command on the set (arguments after -- go to it)")
    r.add_argument("--snapshots", required=True)
    r.add_argument("--cold", action="store_true", help="evict the files from the page cache first")
    args = ap.parse_args(argv)
    make(args) if args.cmd == "make" else run(args, extra)


if __name__ == "__main__":
    main()
