"""Public wrappers of the kernels: validate arguments, then call torch.ops.pylandscape.* or, when the
extension is unavailable, the pure-torch twin in `pylandscape._reference` (same results).
"""
from __future__ import annotations

import torch

from . import _ext
from . import _reference as ref


# ======================================================================================
# Section: argument checks shared by every op
# (owned by the kernels work; the Gram section below may use these helpers)
# ======================================================================================

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

    Accepts any integer tensor (on any device) or a sequence of ints. Equal neighbours are allowed
    (empty layers). The kernels read offsets on the host, for CUDA data too.
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


def _num_layers(offsets: torch.Tensor) -> int:
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


# ======================================================================================
# Section: layer statistics and layerwise perturbation
# ======================================================================================


def layer_stats(flat: torch.Tensor, offsets) -> torch.Tensor:
    """[L, 3] float64 per-layer (mean, population std, mean |w|) of flat [P], on flat's device.

    Accumulated in float64. An empty layer (offsets[l] == offsets[l+1]) gets NaN in all columns.
    """
    check_float_tensor(flat, "flat", dims=1)
    offsets = check_offsets(offsets, flat.numel())
    flat = flat.detach().contiguous()
    if _ext.use_extension():
        return torch.ops.pylandscape.layer_stats(flat, offsets)
    return ref.layer_stats(flat, offsets)


def philox_normal(n: int, seed: int, offset: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The first n standard normals (CPU) of the noise stream (seed, offset) that perturbations use.

    Element e of a perturbation of copy k is sigma_l * philox_normal(P, seeds[k], offset)[e].
    """
    if int(n) < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    if _ext.use_extension():
        return torch.ops.pylandscape.philox_normal(int(n), int(seed), int(offset), dtype)
    return ref.philox_normal(int(n), int(seed), int(offset), dtype)


def perturb_layerwise(flat: torch.Tensor, offsets, scale, *, mode: str = "std",
                      generator: torch.Generator | None = None, seed: int | None = None,
                      inplace: bool = False) -> torch.Tensor:
    """flat [P] plus N(0, (scale_l * s_l)^2) noise in each layer l; s_l = layer std ("std") or mean |w|.

    scale: float or [L] tensor, >= 0 (0 leaves a layer bit-for-bit unchanged). The noise is fixed by
    `seed` (drawn from `generator` when None), identical on CPU and CUDA. Raises ValueError for a layer
    with NaN/Inf, or with zero std and a nonzero scale in "std" mode. Returns flat itself when inplace.
    """
    check_float_tensor(flat, "flat", dims=1)
    offsets = check_offsets(offsets, flat.numel())
    m = _check_mode(mode)
    scales = _check_scales(scale, None, _num_layers(offsets), "scale")
    if seed is None:
        seed = int(_draw_seeds(1, generator)[0])
    seed = int(seed)
    if not inplace:
        seeds = torch.tensor([seed], dtype=torch.int64)
        src = flat.detach().contiguous()
        if _ext.use_extension():
            out = torch.ops.pylandscape.perturb(src, offsets, scales.unsqueeze(0), seeds, 0, m)
        else:
            out = ref.perturb(src, offsets, scales.unsqueeze(0), seeds, 0, m)
        return out.reshape(-1)
    if not flat.is_contiguous():
        raise ValueError("flat must be contiguous for inplace=True")
    with torch.no_grad():
        if _ext.use_extension():
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
    sc = _check_scales(sc, K, _num_layers(offsets), "scales")
    if seeds is None:
        seeds_t = _draw_seeds(K, generator)
    else:
        seeds_t = torch.as_tensor(seeds).detach().to("cpu")
        if seeds_t.dtype.is_floating_point or seeds_t.dim() != 1 or seeds_t.shape[0] != K:
            raise ValueError(f"seeds must be K = {K} integers, got {seeds_t.dtype} of shape {tuple(seeds_t.shape)}")
        seeds_t = seeds_t.to(torch.int64).contiguous()
    src = flat.detach().contiguous()
    if out is not None:
        _check_out(out, flat, K)
        if _ext.use_extension():
            torch.ops.pylandscape.perturb_out(src, offsets, sc, seeds_t, 0, m, out)
        else:
            ref.perturb_out(src, offsets, sc, seeds_t, 0, m, out)
        return out
    if _ext.use_extension():
        return torch.ops.pylandscape.perturb(src, offsets, sc, seeds_t, 0, m)
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


# ======================================================================================
# Section: interpolation and weighted combinations of models
# ======================================================================================


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
    a, b = a.detach().contiguous(), b.detach().contiguous()
    if _ext.use_extension():
        return torch.ops.pylandscape.interpolate(a, b, al)
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
    Wc = W.detach().contiguous()
    if _ext.use_extension():
        out = torch.ops.pylandscape.combine(Wc, c)
    else:
        out = ref.combine(Wc, c)
    return out[0] if single else out


# ======================================================================================
# Section: per-layer Gram matrices of snapshots (segment_gram)
# ======================================================================================

from . import gram as _gram  # noqa: E402  (the streaming driver)


def _gram_check_offsets(offsets, P: int) -> torch.Tensor:
    if not isinstance(offsets, torch.Tensor):
        offsets = torch.as_tensor(offsets, dtype=torch.int64)
    if offsets.dtype != torch.int64 or offsets.dim() != 1 or offsets.numel() < 2:
        raise ValueError(f"offsets must be a 1-D int64 tensor [L+1] with L >= 1, got dtype {offsets.dtype}, "
                         f"shape {tuple(offsets.shape)}")
    o = offsets.cpu()
    if int(o[0]) != 0 or int(o[-1]) != P or bool((o[1:] < o[:-1]).any()):
        raise ValueError(f"offsets must increase from 0 to P = {P} (the rows' length); got "
                         f"{o.tolist() if o.numel() <= 20 else [int(o[0]), '...', int(o[-1])]}")
    return offsets


def _gram_check_rows(T: torch.Tensor, name: str) -> torch.Tensor:
    if T.dim() != 2:
        raise ValueError(f"{name} must be [N, P], got shape {tuple(T.shape)}")
    if T.dtype in (torch.float16, torch.bfloat16):
        T = T.float()  # exact; the kernels take fp32 or fp64
    if T.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{name} must be float32 or float64, got {T.dtype}")
    return T


def _gram_pair(A: torch.Tensor, offsets: torch.Tensor, B: torch.Tensor | None) -> torch.Tensor:
    A = _gram_check_rows(A, "X")
    if B is not None:
        B = _gram_check_rows(B, "Y")
        if B.dtype != A.dtype:
            raise ValueError(f"X and Y must have the same dtype, got {A.dtype} and {B.dtype}")
        if B.shape[1] != A.shape[1]:
            raise ValueError(f"X and Y must have the same row length P, got {A.shape[1]} and {B.shape[1]}")
        if B.device != A.device:
            raise ValueError(f"X and Y must be on the same device, got {A.device} and {B.device}")
    offsets = _gram_check_offsets(offsets, A.shape[1]).to(A.device)
    if _ext.use_extension():
        return torch.ops.pylandscape.segment_gram(A, offsets, B)
    _gram_check_finite(A, offsets, "X")
    if B is not None:
        _gram_check_finite(B, offsets, "Y")
    return ref.segment_gram(A, offsets, B)


def _gram_check_finite(T: torch.Tensor, offsets: torch.Tensor, name: str) -> None:
    if T.numel() and not bool(torch.isfinite(T).all()):
        bad = (~torch.isfinite(T)).any(0).nonzero()[0, 0].item()
        layer = int(torch.searchsorted(offsets.cpu(), torch.tensor([bad]), right=True)[0]) - 1
        raise ValueError(f"{name} holds NaN or inf in layer {layer} (column {bad})")


def segment_gram(X, offsets, *, Y=None, device=None, progress: bool = False,
                 memory_budget: int | None = None) -> torch.Tensor:
    """[L, N, M] float64: per-layer dot products G[l, i, j] = x_i[layer l] . y_j[layer l].

    X (and Y): a [N, P] tensor, or row blocks (a list, or any re-iterable of [rows, P] tensors, e.g.
    snapshots read from disk; a one-shot iterator is buffered in memory). Y=None means Y = X (symmetric;
    only one triangle of block pairs is computed). The products stay accurate for nearly parallel rows
    (1 - cos from them is good to ~1e-3 relative down to 1 - cos = 1e-10), unlike a plain fp32 X @ X.T.
    device: where to compute (blocks are moved there); the result lives there too.
    memory_budget: bytes of input rows to hold at once for row blocks or for tensors moved to `device`
    (default 1 GiB). A tensor already on the compute device is processed in one call unless a budget is
    given; the op then needs about one more copy of the largest layer's columns as workspace. Use pylandscape.mds.cosine_distance_from_gram(layer_gram(G, layers)) for 1 - cos.
    """
    budget = (1 << 30) if memory_budget is None else int(memory_budget)
    if budget <= 0:
        raise ValueError(f"memory_budget must be positive, got {memory_budget}")
    if isinstance(X, torch.Tensor) and (Y is None or isinstance(Y, torch.Tensor)) and not progress:
        X = _gram_check_rows(X, "X")
        dev = X.device if device is None else torch.device(device)
        tot = X.numel() * X.element_size() + (0 if Y is None else Y.numel() * Y.element_size())
        # resident on the compute device already: one call (the op's workspace is about one copy of the
        # largest layer's columns); otherwise only what fits the budget is moved at a time
        if (dev == X.device and (Y is None or Y.device == dev) and memory_budget is None) or tot <= budget:
            return _gram_pair(X.to(dev), offsets, None if Y is None else Y.to(dev))
    if isinstance(X, torch.Tensor):
        X = _gram_check_rows(X, "X")
        _gram_check_offsets(offsets, X.shape[1])
    if not isinstance(offsets, torch.Tensor):
        offsets = torch.as_tensor(offsets, dtype=torch.int64)
    return _gram.streamed_gram(_gram_pair, X, offsets, Y=Y, device=device, progress=progress,
                               memory_budget=budget)


if _ext.loaded() and hasattr(torch.ops.pylandscape, "segment_gram"):
    @torch.library.register_fake("pylandscape::segment_gram")
    def _segment_gram_fake(X, offsets, Y=None):
        M = X.shape[0] if Y is None else Y.shape[0]
        return X.new_empty((offsets.shape[0] - 1, X.shape[0], M), dtype=torch.float64)



# ======================================================================================
# Section: torch.compile support (register_fake), guarded on the extension being loaded
# ======================================================================================


def _register_fakes() -> None:
    lib = "pylandscape::"

    @torch.library.register_fake(lib + "layer_stats")
    def _(flat, offsets):
        return flat.new_empty((offsets.shape[0] - 1, 3), dtype=torch.float64)

    @torch.library.register_fake(lib + "perturb")
    def _(flat, offsets, scales, seeds, offset, mode):
        return flat.new_empty((seeds.shape[0], flat.shape[0]))

    @torch.library.register_fake(lib + "perturb_")
    def _(flat, offsets, scales, seed, offset, mode):
        return None

    @torch.library.register_fake(lib + "perturb_out")
    def _(flat, offsets, scales, seeds, offset, mode, out):
        return None

    @torch.library.register_fake(lib + "philox_normal")
    def _(n, seed, offset, dtype):
        return torch.empty((n,), dtype=dtype, device="cpu")

    @torch.library.register_fake(lib + "interpolate")
    def _(a, b, alphas):
        return a.new_empty((alphas.shape[0], a.shape[0]))

    @torch.library.register_fake(lib + "combine")
    def _(W, coeffs):
        return W.new_empty((coeffs.shape[0], W.shape[1]))


if _ext.loaded():
    _register_fakes()
