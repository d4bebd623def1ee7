"""The GPU figures of issue 13 in one run (called by bench/gpu.sh; needs a CUDA GPU and the CUDA kernels).

  - segment_gram vs cuBLAS fp32 X @ X.T (TF32 off) at the paper's P = 188,810, with the accuracy of both;
  - 10,000 snapshots end to end: Gram, whole-model 1 - cos, classical MDS (double centring + eigh);
  - perturbation: one model vs the pure-torch code a user would write, and batched bandwidth against a
    device-to-device copy of the same bytes (the practical HBM ceiling);
  - 8 trajectories trained at once vs one (train_many's runners, one SGD epoch): target <= 2x.

Every time is the best of --repeats with torch.cuda.synchronize() around it. Writes a markdown section.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import PAPER_SIZES  # noqa: E402
from pylandscape import ops  # noqa: E402
from pylandscape.mds import cosine_distance_from_gram  # noqa: E402


def best(fn, repeats):
    out, t = None, float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        t = min(t, time.perf_counter() - t0)
    return t, out


def walk(N, P, seed=0):
    """[N, P] fp32 random walk on the GPU, steps shrinking from 1e-2 to 1e-6 of the norm (as bench_gram)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    x0 = torch.randn(P, generator=g, device="cuda", dtype=torch.float64)
    s = 1e-2 * (1e-4) ** (torch.arange(N, device="cuda", dtype=torch.float64) / max(N - 1, 1))
    X = torch.empty(N, P, device="cuda")
    x = x0.clone()
    norm = float(x0.norm())
    for k0 in range(0, N, 256):  # in slabs: [256, P] fp64 steps at a time
        k1 = min(N, k0 + 256)
        u = torch.randn(k1 - k0, P, generator=g, device="cuda", dtype=torch.float64)
        u *= (s[k0:k1] * norm / u.norm(dim=1))[:, None]
        steps = torch.cumsum(u, 0)
        X[k0:k1] = (x + steps - u).float()
        x = x + steps[-1]
    return X


def worst_rel(G, X, n_pairs=2000, seed=1):
    """Worst relative error of whole-model 1 - cos (pairs with 1 - cos >= 1e-10) vs an fp64 oracle."""
    N = X.shape[0]
    g = torch.Generator(device="cuda").manual_seed(seed)
    i = torch.cat([torch.arange(N - 1, device="cuda"), torch.randint(0, N, (n_pairs,), generator=g, device="cuda")])
    j = torch.cat([torch.arange(1, N, device="cuda"), torch.randint(0, N, (n_pairs,), generator=g, device="cuda")])
    keep = i != j
    i, j = i[keep], j[keep]
    errs = []
    for a0 in range(0, i.numel(), 512):
        a, b = X[i[a0:a0 + 512]].double(), X[j[a0:a0 + 512]].double()
        d = a - b
        na, nb = a.norm(dim=1), b.norm(dim=1)
        dn = (d * (a + b)).sum(1) / (na + nb)
        truth = ((d * d).sum(1) - dn * dn) / (2 * na * nb)
        dg = torch.diagonal(G)
        got = 1 - G[i[a0:a0 + 512], j[a0:a0 + 512]] / torch.sqrt(dg[i[a0:a0 + 512]] * dg[j[a0:a0 + 512]])
        m = truth >= 1e-10
        if m.any():
            errs.append(((got - truth).abs() / truth)[m].max())
    return float(torch.stack(errs).max()) if errs else float("nan")


def gram_section(Ns, repeats, lines):
    torch.backends.cuda.matmul.allow_tf32 = False
    off = torch.cumsum(torch.tensor([0] + PAPER_SIZES), 0)
    P = int(off[-1])
    lines += ["## segment_gram vs cuBLAS fp32 GEMM (TF32 off)", "",
              "| N | segment_gram s | X @ X.T s | throughput vs cuBLAS (target >= 0.75) | worst rel err 1 - cos "
              "(ours / fp32 GEMM) | extra GPU memory, % of X |", "|---|---|---|---|---|---|"]
    for N in Ns:
        X = walk(N, P)
        ops.segment_gram(X[:64], off)  # warm-up
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        tg, G = best(lambda: ops.segment_gram(X, off), repeats)
        extra = torch.cuda.max_memory_allocated() - base - G.numel() * 8
        tm, M = best(lambda: X @ X.T, repeats)
        e1 = worst_rel(G.sum(0), X)
        e2 = worst_rel(M.double(), X)
        lines.append(f"| {N} | {tg:.3f} | {tm:.3f} | {tm / tg:.2f} | {e1:.1e} / {e2:.1e} | "
                     f"{100 * extra / X.nbytes:.1f} |")
        print(lines[-1], flush=True)
        del X, G, M
        torch.cuda.empty_cache()
    lines.append("")


def end_to_end(N, lines):
    off = torch.cumsum(torch.tensor([0] + PAPER_SIZES), 0)
    X = walk(N, int(off[-1]))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    G = ops.segment_gram(X, off).sum(0)
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    D = cosine_distance_from_gram(G)
    Jd = D - D.mean(0, keepdim=True) - D.mean(1, keepdim=True) + D.mean()
    w, V = torch.linalg.eigh(-0.5 * Jd)
    coords = V[:, -2:] * w[-2:].clamp_min(0).sqrt()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    lines += [f"## {N:,} snapshots end to end (target <= 3 s)", "",
              f"Gram {t1 - t0:.2f} s + 1 - cos, centring and eigh {t2 - t1:.2f} s = **{t2 - t0:.2f} s** "
              f"(coords {tuple(coords.shape)}; snapshots already on the GPU, reading them is not included).", ""]
    print(lines[-2], flush=True)


def perturb_section(repeats, lines):
    off = torch.cumsum(torch.tensor([0] + PAPER_SIZES), 0)
    P = int(off[-1])
    flat = torch.randn(P, device="cuda") * 0.05

    def pure():
        out = flat.clone()
        for a, b in zip(off[:-1].tolist(), off[1:].tolist()):
            seg = out[a:b]
            seg += 0.1 * seg.std() * torch.randn_like(seg)
        return out

    t_pure, _ = best(pure, repeats)
    t_ext, _ = best(lambda: ops.perturb_layerwise(flat, off, 0.1, seed=1), repeats)
    K = 1024
    sc = torch.full((K,), 0.1, dtype=torch.float64)
    buf = torch.empty(K, P, device="cuda")
    t_b, _ = best(lambda: ops.perturb_batched(flat, off, sc, seeds=list(range(K)), out=buf), repeats)
    src = torch.empty_like(buf)
    t_copy, _ = best(lambda: buf.copy_(src), repeats)
    bytes_b = K * P * 4
    lines += ["## Perturbation", "",
              f"- one model: ext {1e3 * t_ext:.3f} ms vs pure torch {1e3 * t_pure:.3f} ms = **{t_pure / t_ext:.1f}x** "
              f"(target >= 20x)",
              f"- batched K = {K}: {1e3 * t_b:.2f} ms, {bytes_b / t_b / 1e9:.0f} GB/s written = **{t_copy / t_b:.2f}** "
              f"of a device copy of the same bytes ({2 * bytes_b / t_copy / 1e9:.0f} GB/s read + write; target >= 0.70 "
              f"of HBM bandwidth)",
              ""]
    print("\n".join(lines[-4:]), flush=True)


def train_section(repeats, lines, device="cuda", K=8, train_size=1500):
    """8 trajectories at once vs one: one SGD epoch of the paper's net (batch 100) with the runners that
    train_many uses (route "auto" is grouped convolutions on CUDA; "loop" = K models in lockstep), digits
    on the device. Target: K = 8 in <= 2x the time of one."""
    from bench_train import make_epoch

    from pylandscape.data import load_dataset

    data = load_dataset("digits", train_size=train_size, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    routes = [("single", 1), ("grouped-conv", K), ("loop", K)]
    epochs = [make_epoch(r, k, 1.0, data) for r, k in routes]
    for ep in epochs:
        ep()  # warm-up (cuDNN autotuning, allocations)
    best_t = [float("inf")] * len(routes)
    for _ in range(repeats):  # interleaved
        for i, ep in enumerate(epochs):
            sync()
            t0 = time.perf_counter()
            ep()
            sync()
            best_t[i] = min(best_t[i], time.perf_counter() - t0)
    one = best_t[0]
    lines += [f"## {K} trajectories vs one (target <= 2x)", "",
              f"One SGD epoch over {train_size} digits (paper's net, batch 100), best of {repeats}: one "
              f"trajectory {one:.3f} s; " + "; ".join(
                  f"{K} with {r} {t:.3f} s = **{t / one:.2f}x**" for (r, _), t in zip(routes[1:], best_t[1:]))
              + " (train_many's route on CUDA: grouped-conv).", ""]
    print(lines[-2], flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[1000, 4000, 10000])
    ap.add_argument("--end-to-end", type=int, default=10000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="markdown file to write")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_bench.py needs a CUDA GPU")
    lines = [f"GPU: {torch.cuda.get_device_name()}", ""]
    for part in (lambda: perturb_section(a.repeats, lines), lambda: gram_section(a.n, a.repeats, lines),
                 lambda: end_to_end(a.end_to_end, lines), lambda: train_section(a.repeats, lines)):
        try:
            part()
        except Exception as e:  # keep the other sections' figures
            lines += [f"(section failed: {type(e).__name__}: {e})", ""]
            print(lines[-2], flush=True)
    text = "\n".join(lines) + "\n"
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    main()
