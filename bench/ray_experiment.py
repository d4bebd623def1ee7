"""An experiment in process vs on a local Ray with 1 and 2 workers, and where the time goes (issue 15).

    flock /tmp/bench.lock env PYTHONPATH=$PWD python bench/ray_experiment.py [--repeat 2] [--set stages=2 ...]
        [--unit-size N] [--threads-row] [--cluster]

Runs `python -m pylandscape run sgd-stages --preset quick` (plus the --set overrides) in process, on Ray
with 1 worker and with 2 workers, each in its own process and fresh output folder, `--repeat` rounds
alternating the three (best and worst per row). Each child times its phases (hooks around the library's
functions, no change to them): the training stages (`run_train_many`, which Ray runs as tasks), Ray's
start and shutdown, and the rest (imports, data, MDS, figures: the driver's serial share). Prints
markdown (a table and notes), the 2-vs-1 speed-up of the whole run and of the training phase, the overhead per unit,
and the Amdahl bound: wall(2 workers) >= serial + Ray start + training(in process) / 2. --cluster: the
Ray rows connect (`--address auto`) to a Ray started beforehand with `ray start --head --num-cpus W`
(not timed; stopped after the row), as with a cluster that is already running.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time

PHASES = ("train", "ray_init", "ray_shutdown")


def child(argv: list[str]) -> None:
    """Run the CLI with timers around its phases; print one JSON line of seconds per phase."""
    t00 = time.perf_counter()
    from pylandscape.distributed import executor as ex
    from pylandscape.experiments import cli, training
    spent: dict = dict.fromkeys(PHASES, 0.0)
    spent["stages"] = []

    def wrap(obj, name, key):
        f = getattr(obj, name)

        @functools.wraps(f)
        def g(*a, **k):
            t = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                spent[key] += time.perf_counter() - t
                if key == "train":
                    spent["stages"].append(time.perf_counter() - t)
        setattr(obj, name, g)
    wrap(training, "run_train_many", "train")
    wrap(ex.RayExecutor, "__init__", "ray_init")
    wrap(ex.RayExecutor, "close", "ray_shutdown")
    if cli.main(argv):
        raise SystemExit(1)
    spent["wall"] = time.perf_counter() - t00
    print("PHASES " + json.dumps(spent), flush=True)


def timed(cmd: list[str], cluster_cpus: int | None = None) -> dict:
    if cluster_cpus:
        subprocess.run(["ray", "start", "--head", "--num-cpus", str(cluster_cpus), "--include-dashboard=false",
                        "--disable-usage-stats"], check=True, capture_output=True)
    try:
        return _timed(cmd)
    finally:
        if cluster_cpus:
            subprocess.run(["ray", "stop"], check=False, capture_output=True)


def _timed(cmd: list[str]) -> dict:
    t = time.perf_counter()
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall = time.perf_counter() - t
    if r.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{r.stderr[-2000:]}")
    phases = json.loads(next(ln for ln in r.stdout.splitlines() if ln.startswith("PHASES "))[7:])
    return {**phases, "process": wall}


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        return child(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--repeat", type=int, default=2, help="rounds of the three runs, alternating [2]")
    ap.add_argument("--unit-size", type=int, default=None, help="ray: trajectories per task [spread evenly]")
    ap.add_argument("--cluster", action="store_true",
                    help="ray rows: connect to a Ray started beforehand (ray start --head), its start not timed")
    ap.add_argument("--threads-row", action="store_true",
                    help="also run in process with 2 torch threads (--set threads=2): both cores without Ray")
    args = ap.parse_args()
    sets = [x for s in args.sets for x in ("--set", s)]
    base = [sys.executable, __file__, "--child", "sgd-stages", "--preset", "quick", *sets]
    ray_kw = ["--executor", "ray"] + (["--unit-size", str(args.unit_size)] if args.unit_size else [])
    cpus = {"ray, 1 worker": 1, "ray, 2 workers": 2}
    if args.cluster:
        configs = {"in process": [], **{k: [*ray_kw, "--address", "auto"] for k in cpus}}
    else:
        configs = {"in process": [], **{k: [*ray_kw, "--workers", str(n)] for k, n in cpus.items()}}
    if args.threads_row:
        configs["in process, 2 threads"] = ["--set", "threads=2"]
    runs: dict[str, list[dict]] = {k: [] for k in configs}
    load0 = loadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeat):
            for c, (name, extra) in enumerate(configs.items()):
                runs[name].append(timed(base + ["--out", f"{tmp}/{r}-{c}", *extra],
                                        cpus.get(name) if args.cluster else None))
        out = f"{tmp}/0-1"
        stores = os.listdir(f"{out}/stores")
        units = sum(len(os.listdir(f"{out}/stores/{d}/units")) for d in stores)
    load1 = loadavg()
    best = {k: min(v, key=lambda x: x["process"]) for k, v in runs.items()}
    print(f"- sgd-stages --preset quick {' '.join(sets)}; unit size {args.unit_size or 'spread evenly'}; "
          f"{'Ray already running (ray start, not timed)' if args.cluster else 'a local Ray started by the run'}; "
          f"best of {args.repeat} alternating rounds; load average before {load0}, after {load1}")
    print(f"- units (trajectories) per run: {units} in {len(stores)} stages (one batch of tasks per stage)")
    print()
    print("| executor | wall s (best) | worst | training s | Ray start s | Ray shutdown s | rest s | vs in process |")
    print("|---|---|---|---|---|---|---|---|")
    for name, b in best.items():
        rest = b["process"] - b["train"] - b["ray_init"] - b["ray_shutdown"]
        print(f"| {name} | {b['process']:.1f} | {max(x['process'] for x in runs[name]):.1f} | {b['train']:.1f} | "
              f"{b['ray_init']:.1f} | {b['ray_shutdown']:.1f} | {rest:.1f} | "
              f"{best['in process']['process'] / b['process']:.2f}x |")
    a, r1, r2 = best["in process"], best["ray, 1 worker"], best["ray, 2 workers"]
    serial = a["process"] - a["train"]
    start = (r2["ray_init"] + r2["ray_shutdown"] + r1["ray_init"] + r1["ray_shutdown"]) / 2
    print()
    for name, b in best.items():
        print(f"- {name}: training s per stage {' '.join(f'{x:.2f}' for x in b['stages'])}")
    if len(r1["stages"]) > 1:
        rest1, rest2, resta = (sum(x["stages"][1:]) for x in (r1, r2, a))
        print(f"- stages 2 on (workers warm): 2 vs 1 worker {rest1 / rest2:.2f}x, 2 workers vs in process "
              f"{resta / rest2:.2f}x; stage 1 (workers' imports): in process {a['stages'][0]:.2f} s, "
              f"1 worker {r1['stages'][0]:.2f} s, 2 workers {r2['stages'][0]:.2f} s")
    print(f"- 2 vs 1 worker: whole run {r1['process'] / r2['process']:.2f}x, training phase "
          f"{r1['train'] / r2['train']:.2f}x")
    print(f"- overhead per unit (ray 1 worker - in process, training phase) / units: "
          f"{(r1['train'] - a['train']) / units * 1000:.0f} ms")
    bound = serial + start + a["train"] / 2
    print(f"- Amdahl: serial (in process, outside training) {serial:.1f} s + Ray start/stop {start:.1f} s + "
          f"training {a['train']:.1f} s / 2 = {bound:.1f} s at best with 2 workers: "
          f"<= {r1['process'] / bound:.2f}x of 1 worker, {a['process'] / bound:.2f}x of in process")


if __name__ == "__main__":
    main()
