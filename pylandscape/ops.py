"""Public wrappers of the kernels: validate arguments, then call torch.ops.pylandscape.* or, where no
compiled kernel exists for the data's device, the pure-torch twin in `pylandscape._reference` (same results).

Words: a model's parameters are one flat buffer [P] plus `offsets` (int64 [L+1]); segment l is
flat[offsets[l]:offsets[l+1]], usually one parameter tensor (a weight or a bias). The paper's "layer" (a
module's weight + bias) is a group of segments. The ops are not differentiable: outputs never require grad.
"""
from __future__ import annotations

import torch

from . import _ext
from . import _reference as ref
from .gram import panel_rows, streamed_gram



#: dtypes every kernel supports (the references accept more).
FLOAT_DTYPES = (torch.float32, torch.float64)

_MODES = {"std": 0, "magnitude": 1}


def _compiling() -> bool:
    # Under torch.compile, value-dependent checks (reading offsets) would break the graph; the C++
    # kernels repeat every check (TORCH_CHECK), so they are skipped while tracing.
    try:
        return bool(torch.compiler.is_compiling())
    except AttributeError:  # pragma: no cover (old torch)
        return False


def check_float_tensor(t, name: str, *, dims: int | None = None) -> torch.Tensor:
    """A float32/float64 tensor (of `dims` dimensions when given), or ValueError naming `name`."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32 or float64, got {t.dtype}")
    if dims is not None and t.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimension(s), got shape {tuple(t.shape)}")
    return t


def check_same_device(*named: tuple[str, torch.Tensor]) -> None:
    """ValueError naming the arguments when tensors live on different devices."""
    devs = {str(t.device) for _, t in named}
    if len(devs) > 1:
        desc = ", ".join(f"{n} on {t.device}" for n, t in named)
        raise ValueError(f"tensors must be on one device: {desc}")


def check_offsets(offsets, numel: int, name: str = "offsets") -> torch.Tensor:
    """offsets as a contiguous int64 CPU tensor [L+1]: offsets[0] = 0, non-decreasing, offsets[-1] = numel.

    The one offsets rule of every op (the C++ kernels check the same, csrc/host/checks.cpp). Accepts any
    integer tensor (on any device) or a sequence of ints; L = 0 (no segments) is allowed, and so are equal
    neighbours (empty segments). The kernels read offsets on the host, for CUDA data too.
    """
    if not isinstance(offsets, torch.Tensor):
        try:
            offsets = torch.as_tensor(list(offsets), dtype=torch.int64)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"{name} must be an int64 tensor or a sequence of ints") from None
    if offsets.dtype.is_floating_point or offsets.dtype.is_complex or offsets.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor (int64), got {offsets.dtype}")
    if offsets.dim() != 1 or offsets.numel() < 1:
        raise ValueError(f"{name} must be 1-D with L+1 >= 1 entries, got shape {tuple(offsets.shape)}")
    offsets = offsets.to("cpu", torch.int64).contiguous()
    if _compiling():
        return offsets
    if int(offsets[0]) != 0:
        raise ValueError(f"{name}[0] must be 0, got {int(offsets[0])}")
    if offsets.numel() > 1 and bool((offsets[1:] < offsets[:-1]).any()):
        i = int(torch.nonzero(offsets[1:] < offsets[:-1])[0, 0])
        raise ValueError(f"{name} must be non-decreasing, but {name}[{i + 1}] = {int(offsets[i + 1])} "
                         f"< {name}[{i}] = {int(offsets[i])}")
    if int(offsets[-1]) != numel:
        raise ValueError(f"{name}[-1] must equal the number of parameters {numel}, got {int(offsets[-1])}")
    return offsets


def _num_segments(offsets: torch.Tensor) -> int:
    return offsets.numel() - 1


def _check_mode(mode) -> int:
    if mode not in _MODES:
        raise ValueError(f"mode must be 'std' or 'magnitude', got {mode!r}")
    return _MODES[mode]


def _check_scales(scales, K: int | None, L: int, name: str) -> torch.Tensor:
    """Non-negative finite float64 CPU scales; a float broadcasts."""
    t = torch.as_tensor(scales, dtype=torch.float64).detach().to("cpu")
    if not _compiling():
        if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
            raise ValueError(f"{name} must be finite and >= 0")
    if K is None:  # one model: [L]
        if t.dim() == 0:
            return t.expand(L).contiguous()
        if t.shape != (L,):
            raise ValueError(f"{name} must be a float or a tensor of shape [L] = [{L}], got {tuple(t.shape)}")
        return t.contiguous()
    if t.dim() == 1 and t.shape[0] == K:
        return t.unsqueeze(1).expand(K, L).contiguous()
    if t.shape != (K, L):
        raise ValueError(f"{name} must have shape [K] or [K, L] = [{K}, {L}], got {tuple(t.shape)}")
    return t.contiguous()


def _draw_seeds(n: int, generator: torch.Generator | None) -> torch.Tensor:
    """n 63-bit seeds from the user's generator (torch's default generator when None)."""
    dev = generator.device if generator is not None else torch.device("cpu")
    return torch.randint(0, 2**63 - 1, (n,), generator=generator, dtype=torch.int64, device=dev).cpu()


def _as_alphas(alphas) -> torch.Tensor:
    t = torch.as_tensor(alphas, dtype=torch.float64).detach().to("cpu")
    if t.dim() == 0:
        t = t.reshape(1)
    if t.dim() != 1:
        raise ValueError(f"alphas must be a float or a 1-D tensor [K], got shape {tuple(t.shape)}")
    return t.contiguous()




def layer_stats(flat: torch.Tensor, offsets) -> torch.Tensor:
    """[L, 3] float64 per-segment (mean, population std, mean |w|) of flat [P], on flat's device.

    Accumulated in float64. An empty segment (offsets[l] == offsets[l+1]) gets NaN in all columns.
    """
    check_float_tensor(flat, "flat", dims=1)
    offsets = check_offsets(offsets, flat.numel())
    flat = flat.contiguous()
    if _ext.use_kernel("layer_stats", flat.device):
        return torch.ops.pylandscape.layer_stats(flat, offsets)
    with torch.no_grad():
        return ref.layer_stats(flat, offsets)


def philox_normal(n: int, seed: int, offset: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The first n standard normals (CPU) of the noise stream (seed, offset) that perturbations use.

    Element e of a perturbation of copy k is sigma_l * philox_normal(P, seeds[k], offset)[e].
    """
    if int(n) < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    if _ext.use_kernel("philox_normal", "cpu"):
        return torch.ops.pylandscape.philox_normal(int(n), int(seed), int(offset), dtype)
    return ref.philox_normal(int(n), int(seed), int(offset), dtype)


def perturb_layerwise(flat: torch.Tensor, offsets, scale, *, mode: str = "std",
                      generator: torch.Generator | None = None, seed: int | None = None,
                      inplace: bool = False) -> torch.Tensor:
    """flat [P] plus N(0, (scale_l * s_l)^2) noise in each segment l; s_l = its std ("std") or mean |w|.

    scale: float or [L] tensor, >= 0 (0 leaves a segment bit-for-bit unchanged). The noise is fixed by
    `seed` (drawn from `generator` when None), identical on CPU and CUDA. Raises ValueError for a segment
    with NaN/Inf, or with zero std and a nonzero scale in "std" mode. Returns flat itself when inplace.
    """
    check_float_tensor(flat, "flat", dims=1)
    offsets = check_offsets(offsets, flat.numel())
    m = _check_mode(mode)
    scales = _check_scales(scale, None, _num_segments(offsets), "scale")
    if seed is None:
        seed = int(_draw_seeds(1, generator)[0])
    seed = int(seed)
    if not inplace:
        seeds = torch.tensor([seed], dtype=torch.int64)
        src = flat.contiguous()
        if _ext.use_kernel("perturb", src.device):
            out = torch.ops.pylandscape.perturb(src, offsets, scales.unsqueeze(0), seeds, 0, m)
        else:
            with torch.no_grad():
                out = ref.perturb(src, offsets, scales.unsqueeze(0), seeds, 0, m)
        return out.reshape(-1)
    if not flat.is_contiguous():
        raise ValueError("flat must be contiguous for inplace=True")
    with torch.no_grad():
        if _ext.use_kernel("perturb_", flat.device):
            torch.ops.pylandscape.perturb_(flat, offsets, scales, seed, 0, m)
        else:
            ref.perturb_(flat, offsets, scales, seed, 0, m)
    return flat


def perturb_batched(flat: torch.Tensor, offsets, scales, *, seeds=None, mode: str = "std",
                    generator: torch.Generator | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """[K, P]: K perturbed copies of flat [P]; copy k uses scales[k] ([K] or [K, L]) and seeds[k].

    Row k equals perturb_layerwise(flat, offsets, scales[k], seed=seeds[k], mode=mode).
    Seeds are drawn from `generator` (torch's default when None) unless given.
    out: a [K, P] buffer to write into (and return), e.g. reused across the batches of a flatness probe:
    a fresh [K, P] tensor's first-touch page faults cost about as much as the noise itself on a CPU.
    """
    check_float_tensor(flat, "flat", dims=1)
    offsets = check_offsets(offsets, flat.numel())
    m = _check_mode(mode)
    sc = torch.as_tensor(scales, dtype=torch.float64)
    if sc.dim() not in (1, 2):
        raise ValueError(f"scales must have shape [K] or [K, L], got {tuple(sc.shape)}")
    K = sc.shape[0]
    sc = _check_scales(sc, K, _num_segments(offsets), "scales")
    if seeds is None:
        seeds_t = _draw_seeds(K, generator)
    else:
        seeds_t = torch.as_tensor(seeds).detach().to("cpu")
        if seeds_t.dtype.is_floating_point or seeds_t.dim() != 1 or seeds_t.shape[0] != K:
            raise ValueError(f"seeds must be K = {K} integers, got {seeds_t.dtype} of shape {tuple(seeds_t.shape)}")
        seeds_t = seeds_t.to(torch.int64).contiguous()
    src = flat.contiguous()
    if out is not None:
        _check_out(out, flat, K)
        if _ext.use_kernel("perturb_out", src.device):
            torch.ops.pylandscape.perturb_out(src, offsets, sc, seeds_t, 0, m, out)
        else:
            with torch.no_grad():
                ref.perturb_out(src, offsets, sc, seeds_t, 0, m, out)
        return out
    if _ext.use_kernel("perturb", src.device):
        return torch.ops.pylandscape.perturb(src, offsets, sc, seeds_t, 0, m)
    with torch.no_grad():
        return ref.perturb(src, offsets, sc, seeds_t, 0, m)


def _check_out(out, flat: torch.Tensor, K: int) -> None:
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"out must be a tensor, got {type(out).__name__}")
    if out.dtype != flat.dtype or out.device != flat.device:
        raise ValueError(f"out must have flat's dtype and device ({flat.dtype}, {flat.device}), "
                         f"got {out.dtype} on {out.device}")
    if tuple(out.shape) != (K, flat.numel()) or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous [K, P] = [{K}, {flat.numel()}] tensor, got shape "
                         f"{tuple(out.shape)}{'' if out.is_contiguous() else ' (not contiguous)'}")
    if out.requires_grad:
        raise ValueError("out must not require grad")
    if out.numel() and torch._C._overlaps(out, flat):
        raise ValueError("out must not share memory with flat")




def interpolate(a: torch.Tensor, b: torch.Tensor, alphas) -> torch.Tensor:
    """[K, P]: row k = (1 - alphas[k]) a + alphas[k] b, computed in float64, rounded once.

    alpha 0 and 1 reproduce a and b exactly; alphas outside [0, 1] extrapolate.
    """
    check_float_tensor(a, "a", dims=1)
    check_float_tensor(b, "b", dims=1)
    check_same_device(("a", a), ("b", b))
    if a.dtype != b.dtype:
        raise ValueError(f"a and b must have one dtype, got a {a.dtype} and b {b.dtype}")
    if a.shape != b.shape:
        raise ValueError(f"a and b must have one shape, got a {tuple(a.shape)} and b {tuple(b.shape)}")
    al = _as_alphas(alphas)
    a, b = a.contiguous(), b.contiguous()
    if _ext.use_kernel("interpolate", a.device):
        return torch.ops.pylandscape.interpolate(a, b, al)
    with torch.no_grad():
        return ref.interpolate(a, b, al)


def combine(W: torch.Tensor, coeffs) -> torch.Tensor:
    """Weighted sums of models: coeffs [K, M] @ W [M, P] -> [K, P] (coeffs [M] -> [P]).

    Float64 accumulation in a fixed order, rounded once: deterministic and identical on CPU and CUDA
    (at::mm would be faster for large M*K but reorders sums differently per device and backend).
    """
    check_float_tensor(W, "W", dims=2)
    c = torch.as_tensor(coeffs, dtype=torch.float64).detach().to("cpu")
    single = c.dim() == 1
    if single:
        c = c.unsqueeze(0)
    if c.dim() != 2 or c.shape[1] != W.shape[0]:
        raise ValueError(f"coeffs must have shape [K, M] or [M] with M = {W.shape[0]} (rows of W), "
                         f"got {tuple(torch.as_tensor(coeffs).shape)}")
    c = c.contiguous()
    Wc = W.contiguous()
    if _ext.use_kernel("combine", Wc.device):
        out = torch.ops.pylandscape.combine(Wc, c)
    else:
        with torch.no_grad():
            out = ref.combine(Wc, c)
    return out[0] if single else out


def _gram_rows(T, name: str) -> torch.Tensor:
    if not isinstance(T, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(T).__name__}")
    if T.dim() != 2:
        raise ValueError(f"{name} must be [N, P], got shape {tuple(T.shape)}")
    if T.dtype in (torch.float16, torch.bfloat16):
        T = T.float()  # exact; the kernels take fp32 or fp64
    return check_float_tensor(T, name)


def _gram_pair(A: torch.Tensor, offsets, B: torch.Tensor | None) -> torch.Tensor:
    """One op call on resident rows A [N, P] (and B [M, P]): checks, then the kernel or the reference."""
    A = _gram_rows(A, "X")
    if B is not None:
        B = _gram_rows(B, "Y")
        if B.dtype != A.dtype:
            raise ValueError(f"X and Y must have the same dtype, got {A.dtype} and {B.dtype}")
        if B.shape[1] != A.shape[1]:
            raise ValueError(f"X and Y must have the same row length P, got {A.shape[1]} and {B.shape[1]}")
        check_same_device(("X", A), ("Y", B))
    offsets = check_offsets(offsets, A.shape[1])
    if _ext.use_kernel("segment_gram", A.device):
        return torch.ops.pylandscape.segment_gram(A, offsets, B)
    _gram_check_finite(A, offsets, "X")
    if B is not None:
        _gram_check_finite(B, offsets, "Y")
    with torch.no_grad():
        return ref.segment_gram(A, offsets, B)


def _gram_check_finite(T: torch.Tensor, offsets: torch.Tensor, name: str) -> None:
    if T.numel() and not bool(torch.isfinite(T).all()):
        bad = (~torch.isfinite(T)).any(0).nonzero()[0, 0].item()
        seg = int(torch.searchsorted(offsets.cpu(), torch.tensor([bad]), right=True)[0]) - 1
        raise ValueError(f"{name} holds NaN or inf in segment {seg} (column {bad})")


def segment_gram(X, offsets, *, Y=None, device=None, progress: bool = False,
                 memory_budget: int | None = None) -> torch.Tensor:
    """[L, N, M] float64: per-segment dot products G[l, i, j] = x_i[segment l] . y_j[segment l].

    X (and Y): a [N, P] tensor, or row blocks (a list, or any re-iterable of [rows, P] tensors, e.g.
    snapshots read from disk; a one-shot iterator is buffered in memory). Y=None means Y = X (symmetric;
    only one triangle of block pairs is computed). The products stay accurate for nearly parallel rows
    (1 - cos from them is good to ~1e-3 relative down to 1 - cos = 1e-10), unlike a plain fp32 X @ X.T.
    device: where to compute (blocks are moved there); the result lives there too.
    memory_budget: bytes of input rows to hold at once for row blocks or for tensors moved to `device`
    (default 1 GiB). A tensor already on the compute device is processed in one call unless a budget is
    given; the op's workspace is then about 5% of X (columns are processed in groups of ~P / 20; on the CPU,
    for Y=None, at most min(8 MiB, X's bytes / 32)).
    progress: draw a progress bar; what is computed (and every bit of it) does not depend on it.
    Sum segments into the paper's layers (weight + bias) before taking 1 - cos
    (pylandscape.mds.cosine_distance_from_gram(layer_gram(G, layers))).
    """
    budget = (1 << 30) if memory_budget is None else int(memory_budget)
    if budget <= 0:
        raise ValueError(f"memory_budget must be positive, got {memory_budget}")
    rows = None
    if isinstance(X, torch.Tensor) and (Y is None or isinstance(Y, torch.Tensor)):
        X = _gram_rows(X, "X")
        Y = None if Y is None else _gram_rows(Y, "Y")
        offsets = check_offsets(offsets, X.shape[1])
        dev = X.device if device is None else torch.device(device)
        tot = X.numel() * X.element_size() + (0 if Y is None else Y.numel() * Y.element_size())
        # resident on the compute device already: one call (the op's workspace is ~5% of X); otherwise
        # only what fits the budget is moved at a time
        resident = X.device == dev and (Y is None or Y.device == dev) and memory_budget is None
        if resident or tot <= budget:
            rows = max(1, X.shape[0])
        else:
            rows = panel_rows(X.shape[1], X.element_size(), budget)
    elif not isinstance(offsets, torch.Tensor):
        offsets = torch.as_tensor(list(offsets), dtype=torch.int64)
    return streamed_gram(_gram_pair, X, offsets, Y=Y, device=device, progress=progress,
                         memory_budget=budget, rows=rows)


# ======================================================================================
# torch.compile support: fake kernels (shapes, dtypes and the checks that need no data), guarded on the
# extension being loaded. Value checks (offsets' contents) need data and stay in the kernels.
# ======================================================================================


def _fake_check_flat(flat, offsets, name: str = "flat") -> None:
    torch._check(flat.dim() == 1, lambda: f"{name} must be 1-D [P], got {flat.dim()} dims")
    torch._check(flat.dtype in FLOAT_DTYPES, lambda: f"{name} must be float32 or float64, got {flat.dtype}")
    torch._check(offsets.dim() == 1 and offsets.dtype == torch.int64,
                 lambda: f"offsets must be a 1-D int64 tensor, got {offsets.dtype} {tuple(offsets.shape)}")


def _fake_check_batch(flat, offsets, scales, seeds) -> None:
    _fake_check_flat(flat, offsets)
    torch._check(scales.dim() == 2 and scales.shape[1] == offsets.shape[0] - 1,
                 lambda: f"scales must be [K, L], got {tuple(scales.shape)}")
    torch._check(seeds.dim() == 1 and seeds.shape[0] == scales.shape[0],
                 lambda: f"seeds must be [K] with K = scales.shape[0], got {tuple(seeds.shape)}")


def _register_fakes() -> None:
    lib = "pylandscape::"

    @torch.library.register_fake(lib + "layer_stats")
    def _(flat, offsets):
        _fake_check_flat(flat, offsets)
        return flat.new_empty((offsets.shape[0] - 1, 3), dtype=torch.float64)

    @torch.library.register_fake(lib + "perturb")
    def _(flat, offsets, scales, seeds, offset, sigma_mode):
        _fake_check_batch(flat, offsets, scales, seeds)
        torch._check(sigma_mode in (0, 1), lambda: f"sigma_mode must be 0 (std) or 1 (magnitude), got {sigma_mode}")
        return flat.new_empty((seeds.shape[0], flat.shape[0]))

    @torch.library.register_fake(lib + "perturb_")
    def _(flat, offsets, scales, seed, offset, sigma_mode):
        _fake_check_flat(flat, offsets)
        torch._check(scales.dim() == 1 and scales.shape[0] == offsets.shape[0] - 1,
                     lambda: f"scales must be [L], got {tuple(scales.shape)}")
        torch._check(sigma_mode in (0, 1), lambda: f"sigma_mode must be 0 (std) or 1 (magnitude), got {sigma_mode}")
        return None

    @torch.library.register_fake(lib + "perturb_out")
    def _(flat, offsets, scales, seeds, offset, sigma_mode, out):
        _fake_check_batch(flat, offsets, scales, seeds)
        torch._check(out.dtype == flat.dtype and out.device == flat.device,
                     lambda: "out must have flat's dtype and device")
        torch._check(out.dim() == 2 and out.shape[0] == seeds.shape[0] and out.shape[1] == flat.shape[0],
                     lambda: f"out must be [K, P], got {tuple(out.shape)}")
        return None

    @torch.library.register_fake(lib + "philox_normal")
    def _(n, seed, offset, dtype):
        torch._check(n >= 0, lambda: f"n must be >= 0, got {n}")
        torch._check(dtype in FLOAT_DTYPES, lambda: f"dtype must be float32 or float64, got {dtype}")
        return torch.empty((n,), dtype=dtype, device="cpu")

    @torch.library.register_fake(lib + "interpolate")
    def _(a, b, alphas):
        torch._check(a.dim() == 1 and b.dim() == 1 and a.shape[0] == b.shape[0],
                     lambda: f"a and b must be [P] of one length, got {tuple(a.shape)} and {tuple(b.shape)}")
        torch._check(a.dtype == b.dtype and a.dtype in FLOAT_DTYPES,
                     lambda: f"a and b must share a float dtype, got {a.dtype} and {b.dtype}")
        torch._check(alphas.dim() == 1, lambda: f"alphas must be [K], got {tuple(alphas.shape)}")
        return a.new_empty((alphas.shape[0], a.shape[0]))

    @torch.library.register_fake(lib + "combine")
    def _(W, coeffs):
        torch._check(W.dim() == 2 and W.dtype in FLOAT_DTYPES, lambda: f"W must be a float [M, P], got {W.dtype}")
        torch._check(coeffs.dim() == 2 and coeffs.shape[1] == W.shape[0],
                     lambda: f"coeffs must be [K, M] with M = {W.shape[0]}, got {tuple(coeffs.shape)}")
        return W.new_empty((coeffs.shape[0], W.shape[1]))

    @torch.library.register_fake(lib + "segment_gram")
    def _(X, offsets, Y=None):
        torch._check(X.dim() == 2 and X.dtype in FLOAT_DTYPES,
                     lambda: f"X must be a float32/float64 [N, P], got {X.dtype} {tuple(X.shape)}")
        torch._check(offsets.dim() == 1 and offsets.dtype == torch.int64, lambda: "offsets must be 1-D int64")
        if Y is not None:
            torch._check(Y.dim() == 2 and Y.shape[1] == X.shape[1] and Y.dtype == X.dtype,
                         lambda: f"Y must be [M, P] with X's P and dtype, got {Y.dtype} {tuple(Y.shape)}")
        M = X.shape[0] if Y is None else Y.shape[0]
        return X.new_empty((offsets.shape[0] - 1, X.shape[0], M), dtype=torch.float64)


if _ext.loaded():
    _register_fakes()
