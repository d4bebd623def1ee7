import numpy as np
import pytest
import torch
from torch import nn

from pylandscape.flat import flatten_module
from pylandscape.models import (PAPER_NUM_PARAMETERS, GroupedNet, PolyActivation, biases_before_batchnorm,
                                count_parameters, dcnn, fc2)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_paper_parameter_count_and_names():
    m = dcnn()
    assert count_parameters(m) == PAPER_NUM_PARAMETERS == 188_810
    # per layer, written out by hand (3x3 kernels, in x out channels, plus one bias per output channel)
    expected = {
        "conv1.weight": 3 * 3 * 3 * 32, "conv1.bias": 32,
        "conv2.weight": 3 * 3 * 32 * 64, "conv2.bias": 64,
        "conv3.weight": 3 * 3 * 64 * 152, "conv3.bias": 152,
        "conv4.weight": 3 * 3 * 152 * 56, "conv4.bias": 56,
        "conv5.weight": 3 * 3 * 56 * 10, "conv5.bias": 10,
    }
    assert {n: p.numel() for n, p in m.named_parameters()} == expected
    assert list(dict(m.named_parameters())) == list(expected)  # the order every flat buffer uses
    assert [896, 18_496, 87_704, 76_664, 5_050] == [expected[f"conv{i}.weight"] + expected[f"conv{i}.bias"]
                                                    for i in range(1, 6)]
    bns = [mod for mod in m.modules() if isinstance(mod, nn.BatchNorm2d)]
    assert len(bns) == 4 and all(not b.affine for b in bns)


def test_spatial_path_and_logits():
    m = dcnn(0.25)
    sizes = []
    for mod in m:
        if isinstance(mod, nn.Conv2d):
            mod.register_forward_hook(lambda _m, _i, out: sizes.append(tuple(out.shape[-2:])))
    out = m(torch.randn(4, 3, 32, 32))
    assert out.shape == (4, 10)
    assert sizes == [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]


def test_width_multiplier_and_options():
    assert count_parameters(dcnn(2.0)) > 3 * PAPER_NUM_PARAMETERS
    m = dcnn(0.5, in_channels=1, num_classes=4, image_size=8)
    assert m(torch.randn(2, 1, 8, 8)).shape == (2, 4)
    with pytest.raises(ValueError, match="activation"):
        dcnn(activation="swish")
    with pytest.raises(ValueError, match="image_size"):
        dcnn(image_size=64)
    with pytest.raises(ValueError, match="width"):
        dcnn(width=0)


def test_poly_activation_is_least_squares_fit_of_relu():
    act = PolyActivation(3, (-2.0, 2.0))
    # independent least squares in the monomial basis on the same Chebyshev-Gauss nodes
    n = 512
    x = 2.0 * np.cos(np.pi * (np.arange(n) + 0.5) / n)
    V = np.vander(x, 4, increasing=True)
    c, *_ = np.linalg.lstsq(V, np.maximum(x, 0), rcond=None)
    np.testing.assert_allclose(act.coeffs.double().numpy(), c, atol=1e-6)
    t = torch.linspace(-2, 2, 41, dtype=torch.float64)
    np.testing.assert_allclose(act.double()(t).numpy(), np.polyval(c[::-1], t.numpy()), atol=1e-6)
    # a fit, not a copy: close to ReLU but not equal
    err = (act.double()(t) - torch.relu(t)).abs().max()
    assert 0.01 < err < 0.3
    m = dcnn(0.25, activation="poly", poly_degree=2)
    assert "act1.coeffs" not in m.state_dict()  # not a weight
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_fc2():
    m = fc2(12, 7, 3)
    assert count_parameters(m) == 12 * 7 + 7 + 7 * 3 + 3
    assert m(torch.randn(5, 12)).shape == (5, 3)
    assert count_parameters(fc2(4, 5, bias=False)) == 25


@pytest.mark.parametrize("impl", ["split", "grouped"])
@pytest.mark.parametrize("make", [lambda: dcnn(0.125).double(), lambda: fc2(48, 6, 3, activation="poly").double()])
def test_grouped_net_equals_loop(make, impl):
    torch.manual_seed(0)
    ms = [make() for _ in range(3)]
    flats = torch.stack([flatten_module(m)[0] for m in ms])
    g = GroupedNet(ms[0], 3, conv_impl=impl).load_flats_(flats)
    assert torch.equal(g.flats(), flats)
    xs = torch.randn(3, 6, 3, 4, 4, dtype=torch.float64) if isinstance(ms[0][0], nn.Flatten) else \
        torch.randn(3, 6, 3, 32, 32, dtype=torch.float64)
    out = g(xs)
    ref = torch.stack([m(xs[k]) for k, m in enumerate(ms)])
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    with pytest.raises(NotImplementedError):
        GroupedNet(nn.Sequential(nn.Conv2d(3, 3, 3), nn.MaxPool2d(2)), 2)


def test_biases_before_batchnorm_get_no_gradient():
    m = dcnn(0.25).double()
    frozen = biases_before_batchnorm(m)
    assert frozen == ["conv1.bias", "conv2.bias", "conv3.bias", "conv4.bias"]
    x = torch.randn(8, 3, 32, 32, dtype=torch.float64)
    y = torch.randint(0, 10, (8,))
    torch.nn.functional.cross_entropy(m(x), y).backward()
    for n, p in m.named_parameters():
        g = p.grad.abs().max().item()
        if n in frozen:
            assert g < 1e-14, n  # BatchNorm subtracts the batch mean, bias included: exactly no gradient
        else:
            assert g > 1e-6, n
    assert biases_before_batchnorm(fc2(4, 3)) == []


def test_other_width_tuples_with_the_paper_count():
    for widths in ((32, 64, 110, 98), (32, 128, 88, 56), (16, 32, 34, 438)):
        assert count_parameters(dcnn(widths=widths)) == 188_810
    assert count_parameters(dcnn(widths=(32, 64, 110, 98), width=0.5)) != count_parameters(dcnn(width=0.5))
