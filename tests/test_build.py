"""The build: extension presence, torch-version guard, and setup.py / CMakeLists.txt agreement."""
from __future__ import annotations

import importlib
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import types

import pytest
import torch

import pylandscape
from conftest import SOURCE_TREE
from pylandscape import _ext


def _built_library() -> pathlib.Path | None:
    pkg = pathlib.Path(pylandscape.__file__).parent
    libs = sorted(pkg.glob("_C*.so")) + sorted(pkg.glob("_C*.pyd"))
    return libs[0] if libs else None


def test_has_extension_and_cuda_flags_tell_the_truth():
    """has_extension() is True exactly when a library built for this torch sits in the package (and it is
    not disabled); has_cuda_kernels() exactly when the registry holds CUDA kernels of every tensor op."""
    try:
        info = importlib.import_module("pylandscape._build_info")
    except ImportError:
        info = None
    expect = (_built_library() is not None and info is not None and info.TORCH_VERSION == torch.__version__
              and not _ext._env_flag("PYLANDSCAPE_DISABLE_EXT"))
    assert pylandscape.has_extension() is expect, _ext.reason()
    if _ext._env_flag("PYLANDSCAPE_REQUIRE_EXT"):
        assert pylandscape.has_extension() is True
    if not expect:
        assert _ext.reason()
        assert pylandscape.has_cuda_kernels() is False
        return
    assert _ext.reason() is None
    registry = torch._C._dispatch_has_kernel_for_dispatch_key
    for op in ("layer_stats", "perturb", "perturb_", "perturb_out", "interpolate", "combine", "segment_gram"):
        assert registry(f"pylandscape::{op}", "CPU"), op
        assert registry(f"pylandscape::{op}", "CUDA") is bool(info.WITH_CUDA), op
        assert registry(f"pylandscape::{op}", "Autograd"), op  # declared non-differentiable
    assert pylandscape.has_cuda_kernels() is bool(info.WITH_CUDA)


def test_extension_built_for_another_torch_is_not_loaded(monkeypatch):
    fake = types.ModuleType("pylandscape._build_info")
    fake.TORCH_VERSION, fake.TORCH_CUDA, fake.WITH_CUDA = "1.0.0+fake", None, False
    monkeypatch.setitem(sys.modules, "pylandscape._build_info", fake)
    monkeypatch.setattr(pylandscape, "_build_info", fake, raising=False)
    monkeypatch.delenv("PYLANDSCAPE_DISABLE_EXT", raising=False)
    monkeypatch.delenv("PYLANDSCAPE_REQUIRE_EXT", raising=False)
    monkeypatch.setattr(_ext, "_state", {"loaded": None, "why": None, "warned": False})
    assert not _ext.loaded()
    assert "built against torch 1.0.0+fake" in _ext.reason() and torch.__version__ in _ext.reason()
    with pytest.warns(RuntimeWarning) as rec:
        assert _ext.use_extension() is False
    msg = str(rec[0].message)
    assert "Rebuild with: pip install --no-build-isolation" in msg
    assert not pylandscape.has_extension()


def _setup_source_dirs(text: str) -> set[tuple[str, str]]:
    # _sources("cpu", "cpp") -> csrc/cpu/*.cpp ; plus the explicit csrc/pylandscape.cpp
    dirs = {(f"csrc/{d}", ext) for d, ext in re.findall(r'_sources\("([\w/]+)",\s*"(\w+)"\)', text)}
    dirs |= {("csrc", "cpp")} if '"csrc/pylandscape.cpp"' in text else set()
    return dirs


def _cmake_source_dirs(text: str) -> set[tuple[str, str]]:
    out = set()
    for pat in re.findall(r"file\(GLOB\s+\w+\s+(?:CONFIGURE_DEPENDS\s+)?([^)]*)\)", text):
        for item in pat.split():
            m = re.fullmatch(r"\$\{PROJECT_SOURCE_DIR\}/(csrc(?:/[\w]+)?)/\*\.(\w+)", item)
            if m and m.group(1) != "csrc/tests":
                out.add((m.group(1), m.group(2)))
    if "${PROJECT_SOURCE_DIR}/csrc/pylandscape.cpp" in text:
        out.add(("csrc", "cpp"))
    return out


def test_setup_and_cmake_compile_the_same_sources():
    setup = SOURCE_TREE / "setup.py"
    cmake = SOURCE_TREE / "CMakeLists.txt"
    if not setup.exists() or not cmake.exists():
        pytest.skip("source tree not available next to the tests")
    s, c = _setup_source_dirs(setup.read_text()), _cmake_source_dirs(cmake.read_text())
    assert s == {("csrc", "cpp"), ("csrc/host", "cpp"), ("csrc/cpu", "cpp"), ("csrc/cuda", "cu")}
    assert s == c, f"setup.py compiles {sorted(s)} but CMakeLists.txt compiles {sorted(c)}"


@pytest.mark.skipif(not _ext.loaded() or not sys.platform.startswith("linux"), reason="needs the built extension")
def test_noise_helpers_are_inlined_into_the_simd_clones():
    """The per-element math (normal.h, philox.h, exact.h) must be inlined into the multiversioned loops: an
    out-of-line copy is compiled for baseline SSE2 and called per element (the noise pass then ran 2-3x
    slower). A function symbol of those helpers in the binary means GCC stopped inlining one."""
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("binutils nm not found")
    lib = _built_library()
    out_of_line = _out_of_line_helpers(nm, lib)
    assert not out_of_line, "helpers compiled out of line:\n" + "\n".join(out_of_line[:10])
    # the check can fail: a stripped copy has no symbol table to inspect, and says so
    strip = shutil.which("strip")
    if strip is not None:
        with tempfile.TemporaryDirectory() as tmp:
            stripped = pathlib.Path(tmp) / lib.name
            subprocess.run([strip, "-o", str(stripped), str(lib)], check=True)
            with pytest.raises(AssertionError, match="no symbol table"):
                _out_of_line_helpers(nm, stripped)


# Anchors: out-of-line functions every build has (they prove the symbol table is there to be searched).
_ANCHORS = ("pylandscape::check_offsets", "pylandscape::gram::segment_gram")
_HELPERS = ("sincos_turn24", "log_u24", "normal_radius", "philox_normal4", "philox4x32_10", "philox_round",
            "pylandscape::fp::")


def _out_of_line_helpers(nm: str, lib) -> list[str]:
    """Function symbols of the inlined-only helpers in lib's symbol table; AssertionError when the table is
    missing (a stripped library would otherwise pass for one with everything inlined)."""
    out = subprocess.run([nm, "-C", str(lib)], capture_output=True, text=True)
    syms = out.stdout
    assert all(a in syms for a in _ANCHORS), (
        f"{lib} has no symbol table with the anchors {_ANCHORS} (stripped?): nothing to check; nm said "
        f"{out.stderr.strip()!r}")
    # function symbols: local/global text (t/T) or weak (W: an inline function emitted out of line)
    return [ln for ln in syms.splitlines()
            if any(h in ln for h in _HELPERS) and len(ln.split()) >= 3 and ln.split()[1] in "tTwW"]
