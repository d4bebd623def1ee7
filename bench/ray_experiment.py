"""An experiment in process vs on a local Ray with 1 and 2 workers (issue 15).

    PYTHONPATH=$PWD python bench/ray_experiment.py [--set stages=2 ...]
Runs `python -m pylandscape run sgd-stages --preset quick` (plus the --set overrides) three times in
fresh output folders, each in its own process, and prints the wall times; the overhead per unit is
(Ray with 1 worker - in process) / units, which includes Ray's start (also printed on its own).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time


def timed(cmd: list[str]) -> float:
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if r.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{r.stderr[-2000:]}")
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", dest="sets", action="append", default=[])
    args = ap.parse_args()
    sets = [x for s in args.sets for x in ("--set", s)]
    base = [sys.executable, "-m", "pylandscape", "run", "sgd-stages", "--preset", "quick", *sets]
    init = timed([sys.executable, "-c", "import ray; ray.init(num_cpus=2, include_dashboard=False); ray.shutdown()"])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rows.append(("in process", timed(base + ["--out", f"{tmp}/a"])))
        rows.append(("ray, 1 worker", timed(base + ["--out", f"{tmp}/b", "--executor", "ray", "--workers", "1"])))
        rows.append(("ray, 2 workers", timed(base + ["--out", f"{tmp}/c", "--executor", "ray", "--workers", "2"])))
        units = sum(1 for _ in os.scandir(f"{tmp}/b/stores")) and sum(
            len(os.listdir(f"{tmp}/b/stores/{d}/units")) for d in os.listdir(f"{tmp}/b/stores"))
    print(f"# ray.init + shutdown alone: {init:.1f} s; units (trajectories) per run: {units}")
    print("| executor | wall s | vs in process |")
    print("|---|---|---|")
    for name, t in rows:
        print(f"| {name} | {t:.1f} | {rows[0][1] / t:.2f}x |")
    print(f"# overhead per unit (ray 1 worker - in process) / units: {(rows[1][1] - rows[0][1]) / units:.2f} s")


if __name__ == "__main__":
    main()
