"""The Gram across processes (pylandscape.distributed.gram): 1 process vs 2 gloo ranks on one machine.

    PYTHONPATH=$PWD python bench/distributed_gram.py --dir /tmp/snaps --n 2000      # writes the snapshots once
Prints one table row per configuration (best of --repeat): wall time of distributed_gram (read, kernel,
ring exchange, gather to rank 0), bytes read and sent per rank. Snapshots: 8 random-walk trajectories of
the paper's network (P = 188,810, steps of 1e-3 of the weights' scale: nearly parallel rows, the
kernel's hard case), safetensors files.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from pylandscape.distributed import distributed_gram
from pylandscape.models import dcnn
from pylandscape.snapshots import open_source


def write_snapshots(folder: Path, n: int, k: int = 8) -> None:
    if folder.exists() and len(list(folder.rglob("*.safetensors"))) >= n:
        return
    sd = {name: p.detach().clone() for name, p in dcnn().named_parameters()}
    g = torch.Generator().manual_seed(0)
    per = -(-n // k)
    for t in range(k):
        cur = {name: v.clone() for name, v in sd.items()}
        d = folder / f"traj{t}"
        d.mkdir(parents=True, exist_ok=True)
        for e in range(min(per, n - t * per)):
            for v in cur.values():
                v.add_(1e-3 * v.std() * torch.randn(v.shape, generator=g))
            save_file(cur, d / f"epoch_{e:05d}.safetensors")


def worker(folder: str, max_memory: int) -> None:
    """One rank (or the single process): time distributed_gram, rank 0 prints a JSON line."""
    import torch.distributed as dist
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    sset = open_source(folder)
    t = time.perf_counter()
    G, info = distributed_gram(sset, list(range(len(sset))), max_memory=max_memory)
    wall = time.perf_counter() - t
    infos = [info]
    if dist.is_initialized():
        infos = [None] * dist.get_world_size()
        dist.all_gather_object(infos, info)  # our own ranks' timing dicts (trusted, not user data)
        rank = dist.get_rank()
        dist.destroy_process_group()
    else:
        rank = 0
    if rank == 0:
        print("RESULT " + json.dumps({"wall": wall, "infos": infos, "n": len(sset), "P": sset.spec.numel}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp/pylandscape-bench-snaps")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--max-memory", type=int, default=3 << 30, help="bytes per rank")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.dir, args.max_memory)
        return
    t = time.perf_counter()
    write_snapshots(Path(args.dir), args.n)
    print(f"# snapshots in {args.dir} ({time.perf_counter() - t:.0f} s to prepare)")
    me = [sys.executable, __file__, "--worker", "--dir", args.dir, "--max-memory", str(args.max_memory)]
    configs = [("1 process, 1 thread", 1, me, 1), ("1 process, 2 threads", 2, me, 1),
               ("2 gloo ranks x 1 thread", 1,
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *me[1:]], 2)]
    print("| configuration | wall s (best) | read s | kernel s | ring s | gather s | GB read/rank | GB sent/rank |")
    print("|---|---|---|---|---|---|---|---|")
    for name, threads, cmd, _ in configs:
        best = None
        for _ in range(args.repeat):
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            r = subprocess.run(cmd, env=env, capture_output=True, text=True)
            line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
            if r.returncode or not line:
                print(f"| {name} | failed: {r.stderr[-300:]!r} |")
                break
            res = json.loads(line[0][7:])
            if best is None or res["wall"] < best["wall"]:
                best = res
        if best is None:
            continue
        i0 = best["infos"]
        tm = lambda key: max(i["timings"][key] for i in i0)
        print(f"| {name} | {best['wall']:.1f} | {tm('read'):.1f} | {tm('segment_gram'):.1f} | {tm('ring'):.1f} | "
              f"{tm('gather'):.1f} | {max(i['read_bytes'] for i in i0) / 1e9:.2f} | "
              f"{max(i['sent_bytes'] for i in i0) / 1e9:.2f} |", flush=True)


if __name__ == "__main__":
    main()
