"""The oneDNN inference plan of the CPU loop route: the same logits as the eager model (float64 reference),
the same losses through evaluate_points, and a plain error for models it cannot run."""
import pytest
import torch
from torch import nn

from pylandscape.landscape import evaluate_points, onednn
from pylandscape.models import dcnn, fc2

pytestmark = pytest.mark.skipif(not onednn.available(), reason="this torch build has no oneDNN (mkldnn)")


def _with_stats(m: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm running statistics (and affine parameters where present)."""
    g = torch.Generator().manual_seed(seed)
    for b in m.modules():
        if isinstance(b, nn.BatchNorm2d):
            b.running_mean.copy_(torch.randn(b.num_features, generator=g) * 0.3)
            b.running_var.copy_(torch.rand(b.num_features, generator=g) * 2 + 0.1)
            if b.affine:
                b.weight.data.copy_(torch.randn(b.num_features, generator=g))
                b.bias.data.copy_(torch.randn(b.num_features, generator=g))
    return m.eval()


def _affine_net() -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.BatchNorm2d(8, eps=1e-3), nn.ReLU(),
                         nn.Conv2d(8, 6, 3, 2, 1, bias=False), nn.BatchNorm2d(6), nn.ReLU(inplace=True),
                         nn.Conv2d(6, 4, 3, 2, 2, dilation=2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5))


def _grouped_net() -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(3, 6, 3, 1, 1, groups=3), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 4, (3, 5), (2, 1), (0, 2)), nn.ReLU(), nn.Flatten())


@pytest.mark.parametrize("make", [lambda: dcnn(0.25), _affine_net, _grouped_net],
                         ids=["dcnn", "affine-bn+linear", "groups+asymmetric"])
def test_plan_matches_float64_eager(make):
    m = _with_stats(make())
    x = torch.randn(37, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = make_double(m)(x.double())
    got = onednn.OneDNNPlan(m).load()(x)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def make_double(m: nn.Module) -> nn.Module:
    import copy
    return copy.deepcopy(m).double().eval()


def test_plan_follows_new_weights_after_load():
    m = _with_stats(dcnn(0.25))
    x = torch.randn(8, 3, 32, 32)
    plan = onednn.OneDNNPlan(m).load()
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(-1.5)
        m.bn2.running_var.mul_(3)
        stale = plan(x)
        plan.load()
        assert torch.allclose(plan(x), m(x), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(stale, m(x), rtol=1e-4, atol=1e-5)


def test_evaluate_points_same_losses_as_eager():
    torch.manual_seed(0)
    m = _with_stats(dcnn(0.25))
    P = sum(p.numel() for p in m.parameters())
    rows = torch.nn.utils.parameters_to_vector(m.parameters()).detach() + 0.05 * torch.randn(5, P)
    x, y = torch.randn(70, 3, 32, 32), torch.randint(0, 10, (70,))
    sets = {"train": (x, y), "test": (x[:20], y[:20])}
    for bn in ("keep", "reestimate"):
        eager = evaluate_points(m, rows, sets, bn=bn, forward="eager", batch_size=32)
        fast = evaluate_points(m, rows, sets, bn=bn, forward="onednn", batch_size=32)
        assert "oneDNN" in fast.info["forward"] and eager.info["forward"] == "eager"
        for n in sets:
            assert torch.allclose(fast.losses[n], eager.losses[n], rtol=1e-5)
            assert torch.equal(fast.errors[n], eager.errors[n])
    auto = evaluate_points(m, rows, sets, bn="keep", batch_size=32)
    assert auto.info["forward"].startswith("oneDNN") and "oneDNN" in auto.describe()


def test_unsupported_models_run_eagerly_or_say_why():
    assert onednn.supported(dcnn(0.25))
    assert not onednn.supported(dcnn(0.25, activation="poly"))  # polynomial activation: eager
    assert not onednn.supported(fc2(12, 4))  # no convolution: nothing to gain
    bn_after_relu = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.Flatten())
    assert not onednn.supported(bn_after_relu)  # BN not directly after a conv cannot be folded
    m = dcnn(0.25, activation="poly")
    rows = torch.nn.utils.parameters_to_vector(m.parameters()).detach().unsqueeze(0)
    data = (torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    assert evaluate_points(m, rows, data, bn="keep").info["forward"] == "eager"
    with pytest.raises(ValueError, match="forward 'onednn' needs .*DCNN"):
        evaluate_points(m, rows, data, bn="keep", forward="onednn")
    with pytest.raises(ValueError, match="forward must be one of"):
        evaluate_points(m, rows, data, forward="fast")
