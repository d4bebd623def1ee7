import copy

import pytest
import torch
from torch import nn
from torch.nn.functional import conv2d, cross_entropy

from pylandscape.evaluate import evaluate, evaluate_many, predictions, reestimate_bn_
from pylandscape.flat import flatten_module
from pylandscape.models import dcnn

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def setup():
    torch.manual_seed(0)
    m = dcnn(0.125).double()
    x = torch.randn(120, 3, 32, 32, dtype=torch.float64)
    y = torch.randint(0, 10, (120,))
    # stale statistics, as after perturbation
    for b in m.modules():
        if isinstance(b, nn.BatchNorm2d):
            b.running_mean.fill_(0.3)
            b.running_var.fill_(2.0)
    return m, x, y


@pytest.mark.parametrize("batch_size", [1000, 37])
def test_reestimated_stats_are_exact_population_moments(setup, batch_size):
    m, x, y = setup
    r = reestimate_bn_(copy.deepcopy(m), x, batch_size)
    # independent: conv1's output over all of x, by hand
    h = conv2d(x, m.conv1.weight, m.conv1.bias, stride=2, padding=1)
    torch.testing.assert_close(r.bn1.running_mean, h.mean((0, 2, 3)), atol=1e-12, rtol=0)
    torch.testing.assert_close(r.bn1.running_var, h.var((0, 2, 3), unbiased=False), atol=1e-12, rtol=1e-12)
    # deeper layer: its input computed with the layers below re-estimated, by hand
    mu, var = h.mean((0, 2, 3), keepdim=True), h.var((0, 2, 3), unbiased=False, keepdim=True)
    h = torch.relu((h - mu) / torch.sqrt(var + 1e-5))
    h2 = conv2d(h, m.conv2.weight, m.conv2.bias, stride=2, padding=1)
    torch.testing.assert_close(r.bn2.running_var, h2.var((0, 2, 3), unbiased=False), atol=1e-10, rtol=1e-10)
    # so the eval-mode net equals the train-mode net on x as one batch
    ref = copy.deepcopy(m).train()(x)
    torch.testing.assert_close(r.eval()(x), ref, atol=1e-10, rtol=1e-10)
    assert copy.deepcopy(m).train().training and reestimate_bn_(copy.deepcopy(m).train(), x).training  # mode kept
    assert m.bn1.running_mean[0].item() == 0.3  # original untouched


def test_evaluate_modes_and_flat(setup):
    m, x, y = setup
    flat = flatten_module(m)[0]
    other = flatten_module(dcnn(0.125).double())[0]
    before = copy.deepcopy(m.state_dict())
    e, l = evaluate(m, x, y)
    ref = copy.deepcopy(m).train()(x)
    assert l == pytest.approx(cross_entropy(ref, y).item(), rel=1e-12)
    assert e == pytest.approx((ref.argmax(1) != y).double().mean().item())
    ek, lk = evaluate(m, x, y, bn="keep", batch_size=50)
    out = copy.deepcopy(m).eval()(x)
    assert lk == pytest.approx(cross_entropy(out, y).item(), rel=1e-12)
    assert lk != pytest.approx(l)
    e2, l2 = evaluate(dcnn(0.125).double(), x, y, flat=flat)
    assert (e2, l2) == pytest.approx((e, l), rel=1e-12)
    assert evaluate(m, x, y, flat=other)[1] != pytest.approx(l)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
    # re-estimation on other data (the training set) than the evaluated set
    xt = torch.randn(40, 3, 32, 32, dtype=torch.float64)
    r = reestimate_bn_(copy.deepcopy(m), x).eval()
    assert evaluate(m, xt, y[:40], bn_x=x)[1] == pytest.approx(cross_entropy(r(xt), y[:40]).item(), rel=1e-12)
    with pytest.raises(ValueError, match="bn must be"):
        evaluate(m, x, y, bn="fresh")
    with pytest.raises(ValueError, match="labels"):
        evaluate(m, x, y[:5])


@pytest.mark.parametrize("route", ["grouped", "loop"])
@pytest.mark.parametrize("bn", ["reestimate", "keep"])
def test_evaluate_many_equals_loop(setup, bn, route):
    m, x, y = setup
    flats = torch.stack([flatten_module(dcnn(0.125).double())[0] for _ in range(3)])
    errs, losses = evaluate_many(m, flats, x, y, bn=bn, batch_size=50, route=route)
    assert errs.dtype == losses.dtype == torch.float64 and errs.shape == (3,)
    for k in range(3):
        e, l = evaluate(m, x, y, flat=flats[k], bn=bn, batch_size=50)
        assert errs[k].item() == pytest.approx(e)
        assert losses[k].item() == pytest.approx(l, rel=1e-10)


def test_predictions(setup):
    m, x, y = setup
    p = predictions(m, None, x)
    assert p.shape == (120,) and p.dtype == torch.int64
    assert (p != y).double().mean().item() == pytest.approx(evaluate(m, x, y)[0])
