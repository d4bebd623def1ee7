"""Our surfaces and curvature against code nobody here wrote (test extra `landscape`):
loss-landscapes 3.0.6, PyHessian 0.1, hessian-eigenthings 1.0.0a5. Each test skips, with the reason,
when its package is missing. All three install with `pip install --no-deps` next to torch 2.13.0 and
import with it (their other requirements, numpy/scipy/matplotlib, are already ours)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pylandscape.flat import flatten_module, load_flat_
from pylandscape.landscape import (
    CombinationPoints,
    InterpolationPoints,
    evaluate_points,
    normalize_filters,
)
from pylandscape.landscape.hessian import HessianOperator, hutchinson_trace, top_eigen
from pylandscape.models import dcnn

pytestmark = pytest.mark.usefixtures("one_thread")
REASON = "reference package {} not installed: pip install --no-deps {} (test extra 'landscape')"


def _tiny(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    m = dcnn(widths=(4, 6, 5, 3), num_classes=4, image_size=8).to(dtype)
    x = torch.randn(48, 3, 8, 8, dtype=dtype)
    y = torch.randint(0, 4, (48,))
    with torch.no_grad():  # BatchNorm statistics to keep
        m.train()
        m(x)
    return m.eval(), x, y


def _shifted(m, scale, seed):
    th, _ = flatten_module(m)
    g = torch.Generator().manual_seed(seed)
    return th + scale * torch.randn(th.numel(), generator=g, dtype=th.dtype) * th.abs().mean()


def test_planar_interpolation_matches_loss_landscapes():
    ll = pytest.importorskip("loss_landscapes", reason=REASON.format("loss-landscapes", "loss-landscapes==3.0.6"))
    import loss_landscapes.metrics as llm
    m, x, y = _tiny()
    a, b, c = _shifted(m, 0.0, 0), _shifted(m, 3.0, 1), _shifted(m, 3.0, 2)
    models = []
    for w in (a, b, c):
        mm = dcnn(widths=(4, 6, 5, 3), num_classes=4, image_size=8)
        mm.load_state_dict(m.state_dict())
        load_flat_(mm, w)
        models.append(mm.eval())
    steps = 5
    theirs = np.asarray(ll.planar_interpolation(models[0], models[1], models[2],
                                                llm.Loss(F.cross_entropy, x, y), steps=steps, deepcopy_model=True))
    # their grid, read from their loop: column i holds start + i*d1 + j'*d2 with d = (end - start)/steps,
    # j' = j + 1 in even columns and j' = j in odd ones (their serpentine in-place walk is off by one step
    # on the way up); we evaluate exactly those points
    coeffs, where = [], []
    for i in range(steps):
        for j in range(steps):
            jj = j + 1 if i % 2 == 0 else j
            al, be = i / steps, jj / steps
            coeffs.append([1 - al - be, al, be])
            where.append((i, j))
    r = evaluate_points(m, CombinationPoints(torch.stack([a, b, c]), coeffs), (x, y), bn="keep")
    ours = np.empty((steps, steps))
    for (i, j), v in zip(where, r.losses["train"].numpy()):
        ours[i, j] = v
    np.testing.assert_allclose(ours, theirs, rtol=2e-5, atol=1e-6)
    assert np.ptp(theirs) > 0.01  # a grid where the loss actually changes


def test_linear_interpolation_matches_loss_landscapes():
    ll = pytest.importorskip("loss_landscapes", reason=REASON.format("loss-landscapes", "loss-landscapes==3.0.6"))
    import loss_landscapes.metrics as llm
    m, x, y = _tiny(seed=3)
    a, b = _shifted(m, 0.0, 0), _shifted(m, 1.0, 5)
    ma, mb = dcnn(widths=(4, 6, 5, 3), num_classes=4, image_size=8), dcnn(widths=(4, 6, 5, 3), num_classes=4, image_size=8)
    for mm, w in ((ma, a), (mb, b)):
        mm.load_state_dict(m.state_dict())
        load_flat_(mm, w)
        mm.eval()
    steps = 8
    theirs = np.asarray(ll.linear_interpolation(ma, mb, llm.Loss(F.cross_entropy, x, y), steps=steps,
                                                deepcopy_model=True))
    # their loop adds the step before evaluating: points 1/steps .. 1
    r = evaluate_points(m, InterpolationPoints(a, b, [(i + 1) / steps for i in range(steps)]), (x, y), bn="keep")
    np.testing.assert_allclose(r.losses["train"].numpy(), theirs, rtol=2e-5, atol=1e-6)


def test_filter_normalisation_matches_loss_landscapes():
    pytest.importorskip("loss_landscapes", reason=REASON.format("loss-landscapes", "loss-landscapes==3.0.6"))
    from loss_landscapes.model_interface.model_parameters import ModelParameters
    m, _, _ = _tiny(torch.float64)
    th, spec = flatten_module(m)
    z = torch.randn(th.numel(), dtype=torch.float64)
    ours = normalize_filters(z, th, spec, bias="zero")
    start = 0
    mine, ref = [], []
    for shape, n in zip(spec.shapes, spec.sizes):
        mine.append(z[start:start + n].view(shape).clone())
        ref.append(th[start:start + n].view(shape).clone())
        start += n
    theirs = ModelParameters(mine)
    theirs.filter_normalize_(ModelParameters(ref))
    start = 0
    for shape, n, t in zip(spec.shapes, spec.sizes, theirs.parameters):
        if len(shape) >= 2:  # filters: identical; 1-D tensors: they rescale each entry to |theta_i|, we zero them
            np.testing.assert_allclose(ours[start:start + n].numpy(), t.reshape(-1).numpy(), rtol=1e-12)
        start += n


def _exact_hessian(op):
    names = [n for n, _ in op.m.named_parameters()]
    shapes = [p.shape for _, p in op.m.named_parameters()]
    sizes = [p.numel() for _, p in op.m.named_parameters()]
    bufs = dict(op.m.named_buffers())

    def loss(theta):
        ps = dict(zip(names, [t.view(s) for t, s in zip(torch.split(theta, sizes), shapes)]))
        return F.cross_entropy(torch.func.functional_call(op.m, (ps, bufs), (op.x,)), op.y)
    H = torch.func.hessian(loss)(op.theta.detach()).numpy()
    return (H + H.T) / 2


@pytest.mark.slow
def test_top_eigenvalues_and_trace_match_pyhessian():
    pyhessian = pytest.importorskip("pyhessian", reason=REASON.format("PyHessian", "pyhessian==0.1"))
    m, x, y = _tiny(torch.float64, seed=1)
    op = HessianOperator(m, x, y, bn="keep")
    H = _exact_hessian(op)
    ev = np.linalg.eigvalsh(H)[::-1]
    ours = top_eigen(op, 3, steps=80)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # PyHessian draws its vectors with the default dtype
    try:
        torch.manual_seed(0)
        hc = pyhessian.hessian(m, torch.nn.CrossEntropyLoss(), data=(x, y), cuda=False)
        theirs, _ = hc.eigenvalues(maxIter=500, tol=1e-9, top_n=2)
        torch.manual_seed(1)
        samples = np.asarray(hc.trace(maxIter=150, tol=0.0))
    finally:
        torch.set_default_dtype(old)
    np.testing.assert_allclose(ours.values[:2], ev[:2], rtol=1e-8)
    # power iteration: converged to its tolerance; the second needs a clear gap to the third
    np.testing.assert_allclose(theirs[0], ev[0], rtol=1e-4)  # stops on a small change, not a small residual
    assert theirs[1] == pytest.approx(ev[1], rel=1e-3 if ev[1] - ev[2] > 0.05 * ev[1] else 5e-2)
    tr = hutchinson_trace(op, 150, seed=2)
    exact = np.trace(H)
    their_se = samples.std(ddof=1) / np.sqrt(len(samples))
    assert abs(tr.value - exact) < 4 * tr.stderr
    assert abs(samples.mean() - exact) < 4 * their_se
    assert abs(tr.value - samples.mean()) < 4 * np.hypot(tr.stderr, their_se)


@pytest.mark.slow
def test_top_eigenvalues_and_trace_match_hessian_eigenthings():
    he = pytest.importorskip("hessian_eigenthings",
                             reason=REASON.format("hessian-eigenthings", "hessian-eigenthings==1.0.0a5"))
    m, x, y = _tiny(torch.float64, seed=2)
    op = HessianOperator(m, x, y, bn="keep")
    H = _exact_hessian(op)
    ev = np.linalg.eigvalsh(H)[::-1]
    theirs_op = he.HessianOperator(m, [(x, y)], he.supervised_loss(F.cross_entropy))
    res = he.lanczos(theirs_op, k=3, max_iter=60, which="LA", seed=0, reorthogonalize=True)  # their default
    # turns reorthogonalisation off above 50 steps, and then returns ghost copies of the top eigenvalue
    theirs = np.sort(np.asarray(res.eigenvalues, dtype=float))[::-1]
    ours = top_eigen(op, 3, steps=60)
    np.testing.assert_allclose(theirs, ev[:3], rtol=1e-8)
    np.testing.assert_allclose(ours.values, theirs, rtol=1e-8)
    # the same probes through both operators give the same quadratic forms
    v = torch.randn(op.dim, dtype=torch.float64)
    np.testing.assert_allclose(op(v).numpy(), theirs_op.matvec(v).numpy(), rtol=1e-10, atol=1e-13)
    t = he.trace(theirs_op, num_matvecs=150, method="hutchinson", seed=0)
    tr = hutchinson_trace(op, 150, seed=1)
    assert abs(t.estimate - np.trace(H)) < 4 * t.stderr
    assert abs(tr.value - np.trace(H)) < 4 * tr.stderr


