"""Extension kernels vs the pure-torch code a user would write, at the paper's size (P = 188,810 in
12 tensors), CPU (and CUDA when present). Run: pytest bench/bench_ops.py, or python bench/run_table.py."""
from __future__ import annotations

import pytest
import torch

import pylandscape
from conftest import DEVICES, P, PURE_TIMES, sync
from pylandscape import ops

if not pylandscape.has_extension():
    pytest.skip("compiled extension not available", allow_module_level=True)

KS = [1, 64, 1024]
IMPLS = ["pure", "ext"]


def _run(benchmark, key, impl, fn, device, nbytes, heavy=False):
    def call():
        out = fn()
        sync(device)
        return out

    if heavy:
        benchmark.pedantic(call, rounds=3, iterations=1, warmup_rounds=1)
    else:
        benchmark(call)
    med = benchmark.stats.stats.median
    benchmark.extra_info.update(op=key[0], K=key[1], device=device, impl=impl,
                                gbps=round(nbytes / med / 1e9, 2))
    if impl == "pure":
        PURE_TIMES[key] = med
    elif key in PURE_TIMES:
        benchmark.extra_info["speedup_vs_pure"] = round(PURE_TIMES[key] / med, 2)


def _pure_stats(flat, offs):
    out = []
    for a, b in zip(offs[:-1].tolist(), offs[1:].tolist()):
        x = flat[a:b].double()
        out.append(torch.stack([x.mean(), x.std(unbiased=False), x.abs().mean()]))
    return torch.stack(out)


def _pure_perturb(flat, offs, scale, K):
    # per layer: torch.std + torch.randn + add, the straightforward way
    out = flat.unsqueeze(0).repeat(K, 1)
    for a, b in zip(offs[:-1].tolist(), offs[1:].tolist()):
        x = flat[a:b]
        sigma = scale * x.std(unbiased=False)
        out[:, a:b] += sigma * torch.randn(K, b - a, device=flat.device, dtype=flat.dtype)
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
def test_layer_stats(benchmark, paper, device, impl):
    flat, offs = paper(device)
    fn = (lambda: ops.layer_stats(flat, offs)) if impl == "ext" else (lambda: _pure_stats(flat, offs))
    _run(benchmark, ("layer_stats", 1, device), impl, fn, device, P * 4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("K", KS)
def test_perturb(benchmark, paper, device, impl, K):
    flat, offs = paper(device)
    if impl == "ext":
        if K == 1:
            fn = lambda: ops.perturb_layerwise(flat, offs, 0.1, seed=1)  # noqa: E731
        else:
            fn = lambda: ops.perturb_batched(flat, offs, torch.full((K,), 0.1, dtype=torch.float64),  # noqa: E731
                                             seeds=list(range(K)))
    else:
        fn = lambda: _pure_perturb(flat, offs, 0.1, K)  # noqa: E731
    _run(benchmark, ("perturb", K, device), impl, fn, device, (K + 1) * P * 4, heavy=K >= 64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("K", KS)
def test_interpolate(benchmark, paper, device, impl, K):
    a, _ = paper(device)
    b = a.flip(0).contiguous()
    alphas = torch.linspace(-0.5, 1.5, K, dtype=torch.float64)
    if impl == "ext":
        fn = lambda: ops.interpolate(a, b, alphas)  # noqa: E731
    else:
        al = alphas.to(device=device, dtype=torch.float32)[:, None]
        fn = lambda: (1 - al) * a + al * b  # noqa: E731
    _run(benchmark, ("interpolate", K, device), impl, fn, device, (K + 2) * P * 4, heavy=K >= 1024)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("K", KS)
def test_combine(benchmark, paper, device, impl, K):
    flat, _ = paper(device)
    M = 16
    W = torch.stack([flat * (1 + 0.01 * m) for m in range(M)])
    coeffs = torch.rand(K, M, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    if impl == "ext":
        fn = lambda: ops.combine(W, coeffs)  # noqa: E731
    else:
        c32 = coeffs.to(device=device, dtype=torch.float32)
        fn = lambda: c32 @ W  # noqa: E731  (float32 GEMM: what a user writes)
    _run(benchmark, ("combine", K, device), impl, fn, device, (K + M) * P * 4, heavy=K >= 1024)
