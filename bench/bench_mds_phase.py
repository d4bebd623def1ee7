"""The command's MDS phase in a fresh process: Δ² from the Gram, the dense eigensolver, matplotlib's
import beside it (as `python -m pylandscape.mds` runs them), for each way into LAPACK.

    python bench/bench_mds_phase.py                 # N = 2,000, 5 rounds
    python bench/bench_mds_phase.py --n 500 --rounds 3

Contestants, one fresh process each, alternating round by round (imports are paid once per process,
as the command pays them):
- ``lapacke``: numpy's OpenBLAS through ctypes (the GIL is free during the solve; the default);
- ``scipy f2py``: scipy's f2py LAPACK module loaded alone (PYLANDSCAPE_LAPACK=scipy; f2py holds the GIL);
- ``import scipy.linalg``: the same solve after ``import scipy.linalg``, as stop 23's code did;
- ``serial``: the default solve, then the import (no overlap), for reference.
Each prints its best time, its median, and the worst / best spread.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np, torch
mode, path = sys.argv[1], sys.argv[2]
from pylandscape import embedding_plot
from pylandscape.mds import ClassicalMDS, squared_dissimilarity
G = torch.from_numpy(np.load(path))
t = time.perf_counter()
if mode == "import scipy.linalg":
    import scipy.linalg  # noqa: F401
est = ClassicalMDS(2, metric="cosine", solver="dense", device="cpu")
D2 = squared_dissimilarity(G, "cosine")
if mode == "serial":
    est.fit_from_squared(D2)
    th = embedding_plot.import_in_background()
else:
    th = embedding_plot.import_in_background()
    est.fit_from_squared(D2)
th.join()
from pylandscape.mds import lapack
print(json.dumps({"phase": time.perf_counter() - t, "lapack": lapack.backend_name(),
                  "top": float(est.eigenvalues_[0])}))
"""

MODES = ("lapacke", "scipy f2py", "import scipy.linalg", "serial")


def make_gram(n: int, path: str) -> None:
    """A cosine-normalised Gram of n random-walk snapshots (8 trajectories), float64."""
    import numpy as np
    rng = np.random.default_rng(0)
    steps = rng.standard_normal((n, 2000)) * 0.05
    X = np.concatenate([np.cumsum(s, axis=0) + rng.standard_normal(2000) for s in np.array_split(steps, 8)])
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    np.save(path, X @ X.T)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="snapshots (default 2000)")
    ap.add_argument("--rounds", type=int, default=5, help="fresh processes per contestant (default 5)")
    args = ap.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    times: dict[str, list[float]] = {m: [] for m in MODES}
    tops = set()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "G.npy")
        make_gram(args.n, path)
        for r in range(args.rounds):
            for mode in MODES:
                env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
                if mode != "lapacke" and mode != "serial":
                    env["PYLANDSCAPE_LAPACK"] = "scipy"
                out = subprocess.run([sys.executable, "-c", CHILD, "serial" if mode == "serial" else mode, path],
                                     env=env, capture_output=True, text=True, check=True).stdout
                res = json.loads(out.strip().splitlines()[-1])
                times[mode].append(res["phase"])
                tops.add(round(res["top"], 9))
                print(f"round {r + 1}: {mode:20s} {res['phase']:.3f} s  (LAPACK: {res['lapack']})", flush=True)
    print(f"\nN = {args.n}: Δ², eigensolver and matplotlib's import, one fresh process each ({args.rounds} rounds)")
    print(f"{'contestant':22s} {'best s':>8s} {'median s':>9s} {'spread':>7s}")
    for mode in MODES:
        t = times[mode]
        print(f"{mode:22s} {min(t):8.3f} {statistics.median(t):9.3f} {max(t) / min(t):6.2f}x")
    print(f"top eigenvalue identical to 9 digits across contestants: {len(tops) == 1}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
