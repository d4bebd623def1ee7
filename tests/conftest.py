"""Shared fixtures. Tests run against the INSTALLED package (tests/ has no __init__.py, so the source
tree is not on sys.path when pytest runs from the repository root)."""
from __future__ import annotations

import os
import pathlib

import pytest
import torch

import pylandscape
from pylandscape.flat import ParamSpec
from pylandscape.models import dcnn

SOURCE_TREE = pathlib.Path(__file__).resolve().parent.parent

# The paper's CIFAR-10 net (pylandscape.models.dcnn: 5 conv layers, weights and biases, P = 188,810):
# the segment sizes of its flat buffer, taken from the model itself.
PAPER_SIZES = ParamSpec.from_module(dcnn()).sizes
assert sum(PAPER_SIZES) == 188_810, PAPER_SIZES


if os.environ.get("PYLANDSCAPE_REQUIRE_EXT", "0") not in ("", "0"):
    # A source checkout works too once `_C` has been built beside it (setup.py copies it there).
    assert pylandscape.has_extension(), (
        f"PYLANDSCAPE_REQUIRE_EXT=1 but the compiled kernels did not load for pylandscape at "
        f"{pylandscape.__file__}: {pylandscape._ext.reason()}. Build them first "
        f"(MAX_JOBS=2 pip install --no-build-isolation .).")


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path_factory, monkeypatch):
    """The MDS Gram cache goes to the user's cache folder by default: tests never write there."""
    monkeypatch.setenv("PYLANDSCAPE_CACHE_DIR", str(tmp_path_factory.mktemp("gram-cache")))


def offsets_of(sizes) -> torch.Tensor:
    return torch.cumsum(torch.tensor([0] + list(sizes), dtype=torch.int64), 0)


@pytest.fixture
def paper_offsets() -> torch.Tensor:
    return offsets_of(PAPER_SIZES)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add overhead (and spin-wait on a busy 2-core runner)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


needs_ext = pytest.mark.skipif(not pylandscape.has_extension(),
                               reason="compiled extension not available (pure-torch fallback in use)")
needs_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and pylandscape.has_cuda_kernels()),
                                reason="needs a CUDA device and an extension built with CUDA kernels")
