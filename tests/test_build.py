"""The build: extension presence, torch-version guard, and setup.py / CMakeLists.txt agreement."""
from __future__ import annotations

import pathlib
import re
import sys
import types

import pytest
import torch

import pylandscape
from conftest import SOURCE_TREE
from pylandscape import _ext


def test_has_extension_and_cuda_flags_are_consistent():
    assert isinstance(pylandscape.has_extension(), bool)
    assert isinstance(pylandscape.has_cuda_kernels(), bool)
    if pylandscape.has_cuda_kernels():
        assert pylandscape.has_extension()
    if pylandscape.has_extension():
        from pylandscape import _build_info
        assert _build_info.TORCH_VERSION == torch.__version__
        assert pylandscape.has_cuda_kernels() == bool(_build_info.WITH_CUDA)
        assert hasattr(torch.ops.pylandscape, "perturb")
    else:
        assert _ext.reason()


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
    assert s == {("csrc", "cpp"), ("csrc/cpu", "cpp"), ("csrc/cuda", "cu")}
    assert s == c, f"setup.py compiles {sorted(s)} but CMakeLists.txt compiles {sorted(c)}"


@pytest.mark.skipif(not _ext.loaded() or not sys.platform.startswith("linux"), reason="needs the built extension")
def test_noise_helpers_are_inlined_into_the_simd_clones():
    """The per-element math (normal.h, philox.h, exact.h) must be inlined into the multiversioned loops: an
    out-of-line copy is compiled for baseline SSE2 and called per element (the noise pass then ran 2-3x
    slower). A function symbol of those helpers in the binary means GCC stopped inlining one."""
    import shutil
    import subprocess

    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("binutils nm not found")
    from pylandscape import _C

    syms = subprocess.run([nm, "-C", _C.__file__], capture_output=True, text=True, check=True).stdout
    helpers = ("sincos_turn24", "log_u24", "normal_radius", "philox_normal4", "philox4x32_10", "philox_round",
               "pylandscape::fp::")
    # function symbols: local/global text (t/T) or weak (W: an inline function emitted out of line)
    out_of_line = [ln for ln in syms.splitlines()
                   if any(h in ln for h in helpers) and len(ln.split()) >= 3 and ln.split()[1] in "tTwW"]
    assert not out_of_line, "helpers compiled out of line:\n" + "\n".join(out_of_line[:10])
