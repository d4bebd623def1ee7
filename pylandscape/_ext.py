"""Loading the compiled kernels, and the fallback to the pure-torch references when they can't load."""
from __future__ import annotations

import os
import warnings

import torch

REBUILD = "pip install --no-build-isolation --force-reinstall --no-deps ."

_state = {"loaded": None, "why": None, "warned": False, "warned_devices": set()}

#: dispatch keys of the devices the extension can carry kernels for
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}

BUILD_CUDA = ("install a CUDA toolkit (nvcc) matching torch's CUDA, then run "
              "PYLANDSCAPE_CUDA=1 " + REBUILD + " (see README: Build options)")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() not in ("", "0", "false", "no")


def _try_load() -> tuple[bool, str | None]:
    if _env_flag("PYLANDSCAPE_DISABLE_EXT"):
        return False, "disabled by PYLANDSCAPE_DISABLE_EXT=1"
    try:
        from . import _build_info
    except ImportError:
        return False, "the extension was not built (no pylandscape/_build_info.py)"
    if _build_info.TORCH_VERSION != torch.__version__:
        return False, (f"it was built against torch {_build_info.TORCH_VERSION} "
                       f"but torch {torch.__version__} is running")
    try:
        from . import _C  # noqa: F401  (registers torch.ops.pylandscape.*)
    except (ImportError, OSError) as e:
        return False, f"importing pylandscape._C failed: {e}"
    return True, None


def loaded() -> bool:
    """True when torch.ops.pylandscape.* come from the compiled extension."""
    if _state["loaded"] is None:
        _state["loaded"], _state["why"] = _try_load()
    return _state["loaded"]


def reason() -> str | None:
    loaded()
    return _state["why"]


def use_extension() -> bool:
    """Whether ops should call the extension; warns once (or raises) when falling back."""
    if loaded():
        return True
    if _env_flag("PYLANDSCAPE_REQUIRE_EXT"):
        raise RuntimeError(f"pylandscape: compiled kernels required (PYLANDSCAPE_REQUIRE_EXT=1) but "
                           f"unavailable: {_state['why']}. Rebuild with: {REBUILD}")
    if not _state["warned"]:
        _state["warned"] = True
        warnings.warn(f"pylandscape: compiled kernels unavailable ({_state['why']}); using the pure-PyTorch "
                      f"references (same results, slower). Rebuild with: {REBUILD}", RuntimeWarning,
                      stacklevel=3)
    return False


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether the loaded extension registered a kernel of pylandscape::<op> for a dispatch key (or one for
    every key, as philox_normal, which takes no tensor to dispatch on, has)."""
    name = f"pylandscape::{op}"
    return bool(torch._C._dispatch_has_kernel_for_dispatch_key(name, dispatch_key)
                or torch._C._dispatch_has_kernel_for_dispatch_key(name, "CompositeExplicitAutograd"))


# A registry lookup, constant for the process: torch.compile may treat it as a constant (no graph break).
# This is what @torch.compiler.assume_constant_result does (torch 2.x: it sets this one attribute), minus
# its `import torch._dynamo`, which doubled the start-up of every `python -m pylandscape...` command
# (1.3-3.5 s on this 2-core VM, python -X importtime; import torch itself is 1.8 s quiet). Should a torch
# rename the attribute, tests/test_ops_api.py::test_torch_compile_fullgraph fails (a graph break).
has_kernel._dynamo_marked_constant = True  # type: ignore[attr-defined]


def use_kernel(op: str, device) -> bool:
    """Whether `op` on data on `device` should call the compiled kernel; False: the pure-torch reference.

    A CPU-only build (e.g. `pip install .` on a CUDA torch wheel, which ships no nvcc) has no CUDA
    kernels: CUDA data then runs the references on the GPU, with one warning per device type that says
    how to build them (an error under PYLANDSCAPE_REQUIRE_EXT=1).
    """
    if not use_extension():
        return False
    dev = torch.device(device)
    key = _DISPATCH_KEYS.get(dev.type)
    if key is not None and has_kernel(op, key):
        return True
    what = f"pylandscape: this build has no {key or dev.type} kernels (pylandscape::{op} on {dev})"
    if _env_flag("PYLANDSCAPE_REQUIRE_EXT"):
        raise RuntimeError(f"{what}, and PYLANDSCAPE_REQUIRE_EXT=1 forbids the fallback. To build them: "
                           f"{BUILD_CUDA if dev.type == 'cuda' else REBUILD}")
    if dev.type not in _state["warned_devices"]:
        _state["warned_devices"].add(dev.type)
        hint = f"To build the CUDA kernels: {BUILD_CUDA}" if dev.type == "cuda" else ""
        warnings.warn(f"{what}; running the pure-PyTorch references on {dev} instead (same results, "
                      f"slower). {hint}".rstrip(), RuntimeWarning, stacklevel=3)
    return False


def has_extension() -> bool:
    """True when the compiled kernels (CPU at least) are loaded."""
    return loaded()


def has_cuda_kernels() -> bool:
    """True when the extension carries CUDA kernels (whether or not a GPU is present)."""
    if not loaded():
        return False
    return has_kernel("perturb", "CUDA")
