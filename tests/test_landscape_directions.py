"""Directions: filter normalisation (Li et al. 2018), layer normalisation, PCA of a trajectory, projection."""
import numpy as np
import pytest
import torch

from pylandscape import ops
from pylandscape.flat import ParamSpec, flatten_module, unflatten
from pylandscape.landscape import normalize_filters, pca_directions, project, random_direction
from pylandscape.models import dcnn

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def model():
    torch.manual_seed(0)
    return dcnn(0.25)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_filter_has_the_norm_of_the_models_filter(model, dtype):
    th, spec = flatten_module(model.to(dtype))
    d = random_direction(th, spec, seed=3)
    dd, tt = unflatten(d, spec), unflatten(th, spec)
    for name, shape in zip(spec.names, spec.shapes):
        if len(shape) <= 1:
            assert (dd[name] == 0).all(), name  # biases and BatchNorm: zero unless asked
            continue
        for i in range(shape[0]):
            got = np.linalg.norm(dd[name][i].double().numpy())
            want = np.linalg.norm(tt[name][i].double().numpy())
            assert got == pytest.approx(want, rel=1e-6 if dtype == torch.float32 else 1e-13), (name, i)
    # direction of each filter is the raw noise's (a positive multiple)
    z = ops.philox_normal(spec.numel, 3, 0, dtype)
    w = spec.index("conv2.weight")
    a, b = spec.offsets[w].item(), spec.offsets[w + 1].item()
    zf, df = z[a:b].reshape(spec.shapes[w][0], -1)[0].double(), d[a:b].reshape(spec.shapes[w][0], -1)[0].double()
    cos = float(zf @ df / zf.norm() / df.norm())
    assert cos == pytest.approx(1.0, abs=1e-6)


def test_bias_modes(model):
    th, spec = flatten_module(model)
    d = random_direction(th, spec, seed=1, bias="copy")
    b = spec.index("conv1.bias")
    a, e = spec.offsets[b].item(), spec.offsets[b + 1].item()
    assert torch.equal(d[a:e], th[a:e])
    d = random_direction(th, spec, seed=1, bias="filter")
    assert float(d[a:e].norm()) == pytest.approx(float(th[a:e].norm()), rel=1e-6)
    with pytest.raises(ValueError, match="bias must be"):
        normalize_filters(th, th, spec, bias="all")


def test_layer_direction_is_the_layerwise_perturbation(model):
    th, spec = flatten_module(model)
    d = random_direction(th, spec, seed=11, norm="layer")
    off = spec.offsets
    for k in (0.1, 0.5):
        want = ops.perturb_layerwise(th, off, k, seed=11)
        got = th.double() + k * d.double()
        assert torch.allclose(got, want.double(), rtol=0, atol=1e-6 * float(th.abs().max()))


def test_pca_directions_match_numpy_svd():
    torch.manual_seed(2)
    P = 400
    origin = torch.randn(P, dtype=torch.float64)
    # a trajectory converging to the origin along two dominant axes plus noise
    t = torch.linspace(1, 0.05, 9, dtype=torch.float64)[:, None]
    u, v = torch.randn(P, dtype=torch.float64), torch.randn(P, dtype=torch.float64)
    traj = origin + t * u + (t ** 2) * 0.5 * v + 0.01 * torch.randn(9, P, dtype=torch.float64)
    res = pca_directions(traj, origin, k=2)
    M = (traj - origin).numpy()
    Mc = M - M.mean(0)
    _, s, Vt = np.linalg.svd(Mc, full_matrices=False)
    for j in range(2):
        got = res.directions[j].numpy()
        assert abs(abs(got @ Vt[j]) - 1.0) < 1e-10
        assert np.linalg.norm(got) == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(res.explained, s[:2] ** 2 / (s ** 2).sum(), rtol=1e-10)


def test_project_is_exact_in_the_plane():
    torch.manual_seed(3)
    o, d1, d2 = torch.randn(3, 300, dtype=torch.float64)
    coords = torch.tensor([[0.5, -1.0], [2.0, 0.25], [0.0, 0.0]], dtype=torch.float64)
    pts = o + coords[:, :1] * d1 + coords[:, 1:] * d2
    got = project(pts, o, torch.stack([d1, d2]))
    np.testing.assert_allclose(got, coords.numpy(), atol=1e-12)


def test_bad_theta_names_it():
    spec = ParamSpec(("w",), ((3, 2),))
    with pytest.raises(ValueError, match="theta must be"):
        random_direction(torch.zeros(5), spec, seed=0)
