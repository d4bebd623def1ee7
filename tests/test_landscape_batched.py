"""The batched evaluator and the point sets: every route against independent float64 math."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pylandscape import ops
from pylandscape.evaluate import evaluate
from pylandscape.flat import flatten_module, load_flat_
from pylandscape.landscape import (CombinationPoints, InterpolationPoints, PerturbedPoints, StackedPoints,
                                   evaluate_points)
from pylandscape.models import dcnn, fc2

pytestmark = pytest.mark.usefixtures("one_thread")


def _numpy_mlp_metrics(W1, b1, W2, b2, x, y):
    """Error and mean cross-entropy of flatten -> Linear -> ReLU -> Linear in numpy float64."""
    h = np.maximum(x.reshape(len(x), -1) @ W1.T + b1, 0.0)
    z = h @ W2.T + b2
    z = z - z.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    return float((z.argmax(1) != y).mean()), float(-logp[np.arange(len(y)), y].mean())


@pytest.mark.parametrize("route", ["loop", "grouped", "vmap"])
def test_routes_match_numpy_on_an_mlp(route):
    torch.manual_seed(0)
    m = fc2(12, 7, out_dim=4).double()
    x = torch.randn(53, 3, 2, 2, dtype=torch.float64)
    y = torch.randint(0, 4, (53,))
    flats = torch.randn(5, sum(p.numel() for p in m.parameters()), dtype=torch.float64)
    r = evaluate_points(m, flats, {"train": (x, y), "test": (x[:20], y[:20])}, route=route, batch_size=16, chunk=2)
    assert r.bn == "none" and r.route == route
    for k in range(5):
        f = flats[k].numpy()
        W1, b1 = f[:84].reshape(7, 12), f[84:91]
        W2, b2 = f[91:119].reshape(4, 7), f[119:123]
        e, l = _numpy_mlp_metrics(W1, b1, W2, b2, x.numpy(), y.numpy())
        assert r.errors["train"][k].item() == pytest.approx(e, abs=1e-15)
        assert r.losses["train"][k].item() == pytest.approx(l, rel=1e-12)
        e, l = _numpy_mlp_metrics(W1, b1, W2, b2, x[:20].numpy(), y[:20].numpy())
        assert r.losses["test"][k].item() == pytest.approx(l, rel=1e-12)


@pytest.fixture()
def bn_setup():
    torch.manual_seed(0)
    m = dcnn(0.125).double()
    for b in m.modules():
        if isinstance(b, nn.BatchNorm2d):  # stale statistics, as after perturbation
            b.running_mean.fill_(0.3)
            b.running_var.fill_(2.0)
    x = torch.randn(70, 3, 32, 32, dtype=torch.float64)
    y = torch.randint(0, 10, (70,))
    th, _ = flatten_module(m)
    flats = th + 0.3 * torch.randn(3, th.numel(), dtype=torch.float64) * th.abs().mean()
    return m, x, y, flats


@pytest.mark.parametrize("route,max_memory", [("loop", None), ("loop", 1), ("grouped", None), ("vmap", None)])
@pytest.mark.parametrize("bn", ["keep", "reestimate"])
def test_routes_match_evaluate_with_batchnorm(bn_setup, route, max_memory, bn):
    """max_memory=1 makes the loop route use evaluate.reestimate_bn_ instead of the one-pass sweep."""
    m, x, y, flats = bn_setup
    xt, yt = x[:25] * 1.5, y[:25]
    r = evaluate_points(m, flats, {"train": (x, y), "test": (xt, yt)}, bn=bn, route=route, batch_size=32, chunk=2,
                        max_memory=max_memory)
    for k in range(3):
        e, l = evaluate(m, x, y, flat=flats[k], bn=bn, batch_size=32)
        assert r.errors["train"][k].item() == e
        assert r.losses["train"][k].item() == pytest.approx(l, rel=1e-10)
        e, l = evaluate(m, xt, yt, flat=flats[k], bn=bn, bn_x=x, batch_size=32)
        assert r.errors["test"][k].item() == e
        assert r.losses["test"][k].item() == pytest.approx(l, rel=1e-10)


@pytest.mark.parametrize("route", ["loop", "grouped", "vmap"])
def test_train_mode_batchnorm_uses_each_batch_statistics(bn_setup, route):
    m, x, y, flats = bn_setup
    r = evaluate_points(m, flats, (x, y), bn="train", route=route, batch_size=32, chunk=3)
    mm = dcnn(0.125).double()
    for k in range(3):
        load_flat_(mm, flats[k])
        mm.train()  # fresh copy: train mode = batch statistics, here in batches of 32 as the evaluator
        with torch.no_grad():
            out = torch.cat([mm(x[s:s + 32]) for s in range(0, 70, 32)])
        assert r.losses["train"][k].item() == pytest.approx(float(F.cross_entropy(out, y)), rel=1e-10)
    assert r.bn == "train"
    # the model's own buffers were not touched
    assert all((b.running_var == 2.0).all() for b in m.modules() if isinstance(b, nn.BatchNorm2d))


def test_point_sets_are_the_kernels():
    torch.manual_seed(1)
    W = torch.randn(3, 50)
    c = torch.tensor([[1.0, 0.5, -0.25], [1.0, 0.0, 0.0], [0.2, 0.3, 0.5]], dtype=torch.float64)
    pts = CombinationPoints(W, c)
    assert torch.equal(pts.rows(0, 3), ops.combine(W, c))
    assert torch.equal(pts.rows(1, 2)[0], W[0])
    a, b = W[0], W[1]
    ip = InterpolationPoints(a, b, [0.0, 0.5, 1.0])
    assert torch.equal(ip.rows(0, 3)[2], b) and torch.equal(ip.rows(0, 1)[0], a)
    off = torch.tensor([0, 20, 50])
    pp = PerturbedPoints(W[0], off, [[0.1, 0.2], [0.3, 0.4]], [7, 8])
    assert torch.equal(pp.rows(1, 2)[0], ops.perturb_layerwise(W[0], off, [0.3, 0.4], seed=8))
    assert len(StackedPoints(W)) == 3
    with pytest.raises(IndexError):
        pts.rows(2, 5)


def test_bad_inputs_name_the_argument():
    m = fc2(4, 3, out_dim=2)
    x, y = torch.randn(5, 4), torch.randint(0, 2, (5,))
    with pytest.raises(ValueError, match="parameters per vector"):
        evaluate_points(m, torch.zeros(2, 3), (x, y))
    with pytest.raises(ValueError, match="bn must be"):
        evaluate_points(m, torch.zeros(2, 23), (x, y), bn="fancy")
    with pytest.raises(ValueError, match="labels"):
        evaluate_points(m, torch.zeros(2, 23), (x, y[:3]))
    with pytest.raises(ValueError, match="route 'grouped'"):
        evaluate_points(nn.Sequential(nn.Flatten(), nn.Linear(4, 2), nn.Dropout()), torch.zeros(1, 10), (x, y),
                        route="grouped")
