"""Argument errors, opcheck, torch.compile, the pure-torch fallback, and CPU == CUDA (when present)."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from conftest import PAPER_SIZES, needs_cuda, needs_ext, offsets_of
from pylandscape import _ext
from pylandscape import _reference as ref
from pylandscape import ops

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


# ---- bad input: ValueError naming the argument ------------------------------------------------------

@pytest.mark.parametrize("call,match", [
    (lambda: ops.layer_stats(torch.randn(10).int(), [0, 10]), "flat must be float32 or float64"),
    (lambda: ops.layer_stats(torch.randn(2, 5), [0, 10]), "flat must have 1 dimension"),
    (lambda: ops.layer_stats(torch.randn(10), [1, 10]), r"offsets\[0\] must be 0"),
    (lambda: ops.layer_stats(torch.randn(10), [0, 6, 4, 10]), "offsets must be non-decreasing"),
    (lambda: ops.layer_stats(torch.randn(10), [0, 9]), r"offsets\[-1\] must equal the number of parameters 10"),
    (lambda: ops.layer_stats(torch.randn(10), torch.tensor([0.0, 10.0])), "offsets must be an integer tensor"),
    (lambda: ops.layer_stats(torch.randn(10), torch.tensor([[0, 10]])), "offsets must be 1-D"),
    (lambda: ops.perturb_layerwise(torch.randn(10), [0, 10], -0.1, seed=1), "scale must be finite and >= 0"),
    (lambda: ops.perturb_layerwise(torch.randn(10), [0, 5, 10], [0.1], seed=1), r"scale must be a float or a tensor of shape \[L\]"),
    (lambda: ops.perturb_layerwise(torch.randn(10), [0, 10], 0.1, mode="abs", seed=1), "mode must be 'std' or 'magnitude'"),
    (lambda: ops.perturb_batched(torch.randn(10), [0, 10], [[0.1, 0.2]]), r"scales must have shape \[K\] or \[K, L\]"),
    (lambda: ops.perturb_batched(torch.randn(10), [0, 10], [0.1, 0.2], seeds=[1]), "seeds must be K = 2 integers"),
    (lambda: ops.perturb_layerwise(torch.randn(20)[::2], [0, 10], 0.1, seed=1, inplace=True), "flat must be contiguous"),
    (lambda: ops.interpolate(torch.randn(10), torch.randn(11), [0.5]), "a and b must have one shape"),
    (lambda: ops.interpolate(torch.randn(10), torch.randn(10).double(), [0.5]), "a and b must have one dtype"),
    (lambda: ops.interpolate(torch.randn(10), torch.randn(10), [[0.5]]), "alphas must be a float or a 1-D tensor"),
    (lambda: ops.combine(torch.randn(3, 10), [0.5, 0.5]), r"coeffs must have shape \[K, M\] or \[M\] with M = 3"),
    (lambda: ops.combine(torch.randn(10), [0.5]), "W must have 2 dimension"),
    (lambda: ops.philox_normal(-1, 0), "n must be >= 0"),
])
def test_bad_input_names_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---- opcheck and torch.compile -------------------------------------------------------------------

DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]


def _samples(device, grad):
    """(op, args) for every tensor op; float inputs require grad when `grad` (the ops are declared
    non-differentiable, so opcheck's autograd-registration test must pass with them)."""
    def f(*shape, dtype=torch.float32):
        return torch.randn(*shape, dtype=dtype, device=device).requires_grad_(grad)

    flat = f(100)
    offs = torch.tensor([0, 30, 30, 100])
    sc = torch.full((2, 3), 0.1, dtype=torch.float64)
    return [
        # no empty segment here: its NaN statistics would not compare equal in opcheck's eager-vs-traced test
        (torch.ops.pylandscape.layer_stats.default, (flat, torch.tensor([0, 30, 100]))),
        (torch.ops.pylandscape.perturb.default, (flat, offs, sc, torch.tensor([1, 2]), 0, 0)),
        (torch.ops.pylandscape.perturb_.default, (f(100).detach(), offs, sc[0].clone(), 3, 0, 1)),
        (torch.ops.pylandscape.perturb_out.default, (flat, offs, sc, torch.tensor([1, 2]), 0, 0,
                                                     torch.empty(2, 100, device=device))),
        (torch.ops.pylandscape.interpolate.default, (flat, f(100), torch.tensor([0.0, 0.5], dtype=torch.float64))),
        (torch.ops.pylandscape.combine.default, (f(3, 100), torch.randn(2, 3, dtype=torch.float64))),
        (torch.ops.pylandscape.segment_gram.default, (f(9, 100), offs, None)),
        (torch.ops.pylandscape.segment_gram.default, (f(9, 100), offs, f(4, 100))),
    ]


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grad", [False, True])
def test_opcheck_every_op(device, grad):
    for op, args in _samples(device, grad):
        torch.library.opcheck(op, args)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_ops_are_declared_non_differentiable(device):
    """Inputs that require grad give outputs that do not (the Autograd registration in csrc/pylandscape.cpp),
    through the raw ops and the wrappers alike; a written tensor's version counter moves."""
    for op, args in _samples(device, True):
        if op is torch.ops.pylandscape.perturb_.default:
            continue
        out = op(*args)
        if out is not None:
            assert not out.requires_grad and out.grad_fn is None, op
    flat = torch.randn(100, device=device, requires_grad=True)
    offs = [0, 40, 100]
    for out in (ops.layer_stats(flat, offs), ops.perturb_layerwise(flat, offs, 0.1, seed=1),
                ops.perturb_batched(flat, offs, [0.1, 0.2], seeds=[1, 2]), ops.interpolate(flat, flat, [0.5]),
                ops.combine(torch.stack([flat, flat]), [0.5, 0.5]), ops.segment_gram(flat.view(4, 25), [0, 25])):
        assert not out.requires_grad
        with pytest.raises(RuntimeError, match="does not require grad"):
            torch.autograd.grad(out.sum(), flat)
    buf = torch.randn(100, device=device)
    v0 = buf._version
    torch.ops.pylandscape.perturb_(buf, torch.tensor(offs), torch.full((2,), 0.1, dtype=torch.float64), 1, 0, 0)
    assert buf._version > v0
    into = torch.empty(1, 100, device=device)
    v0 = into._version
    ops.perturb_batched(buf, offs, [0.1], seeds=[1], out=into)
    assert into._version > v0


@needs_ext
def test_fake_kernels_check_their_arguments():
    """Under torch.compile the fake kernels are the only checks before the graph runs: bad shapes fail there."""
    bad = [
        (torch.ops.pylandscape.layer_stats.default, lambda: (torch.empty(3, 4), torch.tensor([0, 12]))),
        (torch.ops.pylandscape.perturb.default,
         lambda: (torch.empty(10), torch.tensor([0, 10]), torch.empty(2, 3, dtype=torch.float64),
                  torch.tensor([1, 2]), 0, 0)),
        (torch.ops.pylandscape.perturb.default,
         lambda: (torch.empty(10), torch.tensor([0, 10]), torch.empty(2, 1, dtype=torch.float64),
                  torch.tensor([1, 2, 3]), 0, 0)),
        (torch.ops.pylandscape.interpolate.default,
         lambda: (torch.empty(10), torch.empty(11), torch.empty(2, dtype=torch.float64))),
        (torch.ops.pylandscape.combine.default, lambda: (torch.empty(3, 10), torch.empty(2, 4, dtype=torch.float64))),
        (torch.ops.pylandscape.segment_gram.default, lambda: (torch.empty(3, 4, 5), torch.tensor([0, 5]), None)),
        (torch.ops.pylandscape.segment_gram.default,
         lambda: (torch.empty(3, 5), torch.tensor([0, 5]), torch.empty(2, 6))),
        (torch.ops.pylandscape.segment_gram.default,
         lambda: (torch.empty(3, 5, dtype=torch.int32), torch.tensor([0, 5]), None)),
    ]
    for op, make in bad:
        with FakeTensorMode():
            args = make()
            with pytest.raises(RuntimeError):
                op(*args)
    with FakeTensorMode():  # good arguments pass
        out = torch.ops.pylandscape.segment_gram(torch.empty(3, 5), torch.tensor([0, 2, 5]), torch.empty(4, 5))
        assert out.shape == (2, 3, 4) and out.dtype == torch.float64


@needs_ext
def test_torch_compile_fullgraph():
    if not hasattr(torch, "compile"):
        pytest.skip("torch.compile unavailable in this torch")
    offs = offsets_of([40, 60])
    alphas = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    coeffs = torch.tensor([[0.5, 0.5]], dtype=torch.float64)

    def f(flat):
        st = ops.layer_stats(flat, offs)
        p = ops.perturb_layerwise(flat, offs, 0.1, seed=7)
        pb = ops.perturb_batched(flat, offs, torch.tensor([0.1, 0.2], dtype=torch.float64), seeds=[1, 2])
        line = ops.interpolate(flat, p, alphas)
        avg = ops.combine(torch.stack([flat, p]), coeffs)
        return st, p, pb, line, avg

    flat = torch.randn(100)
    eager = f(flat)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(flat)
    for e, c in zip(eager, compiled):
        assert torch.equal(e, c)


# ---- fallback: the references give the same results -------------------------------------------------

@needs_ext
def test_fallback_gives_same_results(monkeypatch):
    flat = torch.randn(sum(PAPER_SIZES))
    offs = offsets_of(PAPER_SIZES)

    def run():
        return (ops.layer_stats(flat, offs), ops.perturb_layerwise(flat, offs, 0.1, seed=3),
                ops.interpolate(flat, flat * 2, [0.0, 0.3]), ops.combine(torch.stack([flat, -flat]), [0.2, 0.7]),
                ops.philox_normal(1000, 5))

    with_ext = run()
    monkeypatch.setitem(_ext._state, "loaded", False)
    monkeypatch.setitem(_ext._state, "why", "test")
    monkeypatch.setitem(_ext._state, "warned", False)
    monkeypatch.delenv("PYLANDSCAPE_REQUIRE_EXT", raising=False)
    with pytest.warns(RuntimeWarning, match="pure-PyTorch references"):
        fallback = run()
    torch.testing.assert_close(fallback[0], with_ext[0], rtol=1e-12, atol=1e-15, equal_nan=True)
    torch.testing.assert_close(fallback[1], with_ext[1], rtol=1e-6, atol=1e-7)
    for a, b in zip(fallback[2:], with_ext[2:]):
        assert torch.equal(a, b)


@needs_ext
def test_device_without_compiled_kernels_runs_the_references(monkeypatch):
    """A CPU-only build on a CUDA torch has no CUDA kernels: such a device runs the references, with ONE
    warning that says how to build the kernels. Simulated on the CPU by making the lookup say "no kernel"."""
    flat = torch.randn(sum(PAPER_SIZES), generator=torch.Generator().manual_seed(0))
    offs = offsets_of(PAPER_SIZES)
    X = flat[:3000].view(3, 1000)

    def run():
        return (ops.layer_stats(flat, offs), ops.perturb_layerwise(flat, offs, 0.1, seed=3),
                ops.perturb_batched(flat, offs, [0.1, 0.2], seeds=[1, 2]),
                ops.interpolate(flat, flat * 2, [0.0, 0.3]), ops.combine(torch.stack([flat, -flat]), [0.2, 0.7]),
                ops.segment_gram(X, [0, 400, 1000]))

    kernels = run()
    monkeypatch.delenv("PYLANDSCAPE_REQUIRE_EXT", raising=False)
    monkeypatch.setitem(_ext._state, "warned_devices", set())
    asked = []
    monkeypatch.setattr(_ext, "has_kernel", lambda op, key: asked.append((op, key)) and False)
    with pytest.warns(RuntimeWarning) as rec:
        refs = run()
        run()
    msgs = [str(w.message) for w in rec if "no CPU kernels" in str(w.message)]
    assert len(msgs) == 1 and "pure-PyTorch references on cpu" in msgs[0]
    assert {op for op, _ in asked} >= {"layer_stats", "perturb", "interpolate", "combine", "segment_gram"}
    torch.testing.assert_close(refs[0], kernels[0], rtol=1e-12, atol=1e-15, equal_nan=True)
    for a, b in zip(refs[1:3], kernels[1:3]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for a, b in zip(refs[3:5], kernels[3:5]):
        assert torch.equal(a, b)
    # generic rows: both are within ~1e-6 n_i n_j of the exact products (the op's certificate)
    d = torch.diagonal(refs[5], dim1=1, dim2=2)
    assert ((refs[5] - kernels[5]).abs() <= 2e-6 * torch.sqrt(d[:, :, None] * d[:, None, :])).all()
    # the CUDA wording tells how to build the CUDA kernels (no GPU needed to decide)
    with pytest.warns(RuntimeWarning, match=r"no CUDA kernels.*PYLANDSCAPE_CUDA=1"):
        assert _ext.use_kernel("perturb", "cuda") is False
    monkeypatch.setenv("PYLANDSCAPE_REQUIRE_EXT", "1")
    with pytest.raises(RuntimeError, match="no CUDA kernels"):
        _ext.use_kernel("perturb", "cuda:0")


def test_disable_ext_in_subprocess():
    code = textwrap.dedent("""
        import warnings, torch
        warnings.simplefilter("ignore")
        import pylandscape
        from pylandscape import ops
        assert not pylandscape.has_extension()
        print(float(ops.philox_normal(3, 1)[2]), float(ops.interpolate(torch.ones(2), torch.zeros(2), 0.25)[0, 0]))
    """)
    env = dict(__import__("os").environ, PYLANDSCAPE_DISABLE_EXT="1", PYLANDSCAPE_REQUIRE_EXT="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    z2, mid = map(float, out.stdout.split())
    assert z2 == float(ref.philox_normal(3, 1)[2]) and mid == 0.75


def test_require_ext_turns_fallback_into_error(monkeypatch):
    monkeypatch.setitem(_ext._state, "loaded", False)
    monkeypatch.setitem(_ext._state, "why", "test reason")
    monkeypatch.setenv("PYLANDSCAPE_REQUIRE_EXT", "1")
    with pytest.raises(RuntimeError, match="test reason.*Rebuild with"):
        ops.layer_stats(torch.randn(3), [0, 3])


# ---- CPU == CUDA ----------------------------------------------------------------------------------

@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_equals_cpu(dtype):
    sizes = PAPER_SIZES + [0, 1, 5]
    g = torch.Generator().manual_seed(0)
    flat = (torch.randn(sum(sizes), generator=g, dtype=torch.float64) * 0.1 + 0.05).to(dtype)
    flat[-6:] = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], dtype=dtype)
    offs = offsets_of(sizes)
    fc = flat.cuda()
    st_cpu, st_gpu = ops.layer_stats(flat, offs), ops.layer_stats(fc, offs)
    assert st_gpu.is_cuda
    # the same chunks, lanes and merge order (stats.h): the same bits, NaN of the empty segment included
    assert torch.equal(st_gpu.cpu().nan_to_num(7.0), st_cpu.nan_to_num(7.0))
    scales = torch.rand(5, len(sizes), dtype=torch.float64, generator=g)
    scales[:, -2] = 0.0  # the one-element layer has std 0
    seeds = [0, 1, -7, 2**62, 12345]
    cpu = ops.perturb_batched(flat, offs, scales, seeds=seeds)
    gpu = ops.perturb_batched(fc, offs, scales, seeds=seeds)
    # identical statistics, hence sigmas, and identical noise: bit for bit
    assert torch.equal(gpu.cpu(), cpu)
    sig = ref.layer_sigmas(st_gpu.cpu(), offs, scales, 0)
    for k, s in enumerate(seeds):
        assert torch.equal(gpu[k].cpu(), ref.apply_noise(flat, offs, sig[k], s, 0))
    buf = fc.clone()
    ops.perturb_layerwise(buf, offs, scales[1], seed=seeds[1], inplace=True)
    assert torch.equal(buf, gpu[1])
    into = torch.full_like(gpu, float("nan"))
    assert ops.perturb_batched(fc, offs, scales, seeds=seeds, out=into) is into and torch.equal(into, gpu)
    al = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    assert torch.equal(ops.interpolate(fc, fc * 2, al).cpu(), ops.interpolate(flat, flat * 2, al))
    W = torch.stack([flat, flat * 3, -flat])
    c = torch.randn(4, 3, dtype=torch.float64, generator=g)
    assert torch.equal(ops.combine(W.cuda(), c).cpu(), ops.combine(W, c))
