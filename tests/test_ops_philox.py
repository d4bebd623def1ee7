"""The noise stream: Philox known answers, kernel == reference bit for bit, normal accuracy and
distribution."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import needs_ext
from pylandscape import _reference as ref
from pylandscape import ops

# Random123's kat_vectors for philox4x32_10: (counter, key) -> output.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("ctr,key,want", KAT)
def test_reference_philox_known_answers(ctr, key, want):
    got = ref.philox4x32_10(*[torch.tensor([c]) for c in ctr], *key)
    assert [int(g) for g in got] == list(want)


@needs_ext
@pytest.mark.parametrize("seed,offset,n", [(0, 0, 1), (1234, 7, 1000003), (-1, 2**40 + 3, 4099),
                                           (2**63 - 1, -5, 64), (987654321, 0, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_noise_equals_reference_bitwise(seed, offset, n, dtype):
    got = torch.ops.pylandscape.philox_normal(n, seed, offset, dtype)
    want = ref.philox_normal(n, seed, offset, dtype)
    assert got.dtype == dtype and got.shape == (n,)
    assert torch.equal(got, want), f"{int((got != want).sum())} of {n} normals differ"


def test_stream_is_position_based():
    # element e of the stream does not depend on where a range starts (the kernels split work freely)
    full = ref.philox_normal_range(0, 300, 42, 3)
    for start in (0, 1, 2, 3, 5, 63, 64, 129):
        part = ref.philox_normal_range(start, 300 - start, 42, 3)
        assert torch.equal(part, full[start:])


def test_streams_differ_by_seed_and_offset():
    a = ref.philox_normal(1000, 1, 0)
    assert not torch.equal(a, ref.philox_normal(1000, 2, 0))
    assert not torch.equal(a, ref.philox_normal(1000, 1, 1))
    assert torch.equal(a, ref.philox_normal(1000, 1, 0))


def _ulps(got: torch.Tensor, exact: np.ndarray) -> float:
    g = got.numpy().astype(np.float64)
    spacing = np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)
    return float(np.max(np.abs(g - exact) / spacing))


def test_log_accuracy_against_libm():
    # every 17th of the 2^24 possible arguments plus both ends: ln(u) within 2 ulp of double libm
    n = torch.cat([torch.arange(1, 2**24 + 1, 17), torch.tensor([1, 2, 3, 2**23, 2**24 - 1, 2**24])])
    x = (n - 1) << 8  # radius() reads u = ((x >> 8) + 1) 2^-24
    r = ref._radius(x)
    exact = np.sqrt(-2.0 * np.log(n.numpy().astype(np.float64) * 2.0**-24))
    nz = exact > 0
    assert _ulps(r[torch.from_numpy(nz)], exact[nz]) <= 2.0
    assert float(r.max()) <= 5.77 and float(r[-1]) == 0.0


def test_sincos_accuracy_against_libm():
    k = torch.arange(0, 2**24, 13)
    x = k << 8
    s, c = ref._sincos(x)
    ang = 2.0 * math.pi * k.numpy().astype(np.float64) * 2.0**-24
    assert float(np.max(np.abs(s.numpy() - np.sin(ang)))) < 1.2e-7
    assert float(np.max(np.abs(c.numpy() - np.cos(ang)))) < 1.2e-7
    assert torch.all(s * s + c * c - 1 < 5e-7)


def test_normal_distribution_moments_and_ks():
    n = 1_000_000
    z = ops.philox_normal(n, 20240601, 0, torch.float64).numpy()
    se = 1 / math.sqrt(n)
    assert abs(z.mean()) < 5 * se
    assert abs(z.var() - 1) < 5 * math.sqrt(2) * se
    kurt = float(np.mean(z**4) / z.var() ** 2 - 3)
    assert abs(kurt) < 5 * math.sqrt(24) * se
    # Kolmogorov-Smirnov: sup |F_n - Phi| below the 1e-4 critical value 1.95 / sqrt(n)
    zs = np.sort(z)
    phi = 0.5 * (1 + np.vectorize(math.erf)(zs[::50] / math.sqrt(2)))
    emp = (np.arange(0, n, 50) + 1) / n
    assert float(np.max(np.abs(emp - phi))) < 1.95 / math.sqrt(n)
    # lanes (cos and sin halves) are uncorrelated
    assert abs(float(np.corrcoef(z[0::2], z[1::2])[0, 1])) < 5 * math.sqrt(2) * se
    assert np.abs(z).max() <= 5.77
