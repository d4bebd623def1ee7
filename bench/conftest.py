"""Benchmark fixtures: the paper's segment layout, devices, and a record of pure-torch times so each
extension benchmark can store its speed-up in extra_info."""
from __future__ import annotations

import pytest
import torch

from pylandscape.flat import ParamSpec
from pylandscape.models import dcnn

# The paper's CIFAR-10 net (pylandscape.models.dcnn: 5 conv layers, weights and biases, P = 188,810):
# the segment sizes of its flat buffer, taken from the model itself.
PAPER_SIZES = ParamSpec.from_module(dcnn()).sizes
P = sum(PAPER_SIZES)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# (op, K, device, dtype) -> median seconds of the pure-torch benchmark, filled as benchmarks run.
PURE_TIMES: dict[tuple, float] = {}


def pytest_collection_modifyitems(items):
    # pure-torch baselines first, so the extension benchmarks can report ratios
    items.sort(key=lambda it: 0 if "pure" in it.name else 1)


@pytest.fixture
def paper():
    def make(device="cpu", dtype=torch.float32):
        g = torch.Generator().manual_seed(0)
        flat = torch.randn(P, generator=g).to(dtype) * 0.05
        offs = torch.cumsum(torch.tensor([0] + PAPER_SIZES), 0)
        return flat.to(device), offs
    return make


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()
