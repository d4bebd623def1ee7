"""`python -m pylandscape.surface` / `.hessian` end to end on tiny checkpoints, checked against
independent paths (evaluate(), an exact Hessian), plus inputs (npz, image folders) and bad input."""
import csv
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pylandscape import plot
from pylandscape.data import load_dataset
from pylandscape.evaluate import evaluate, reestimate_bn_
from pylandscape.flat import flatten_module
from pylandscape.landscape import hessian_cli, surface_cli
from pylandscape.landscape.inputs import InputError, load_data, parse_grid, parse_range
from pylandscape.landscape.runs import surface_around_store
from pylandscape.models import dcnn
from pylandscape.store import SnapshotStore

pytestmark = pytest.mark.usefixtures("one_thread")
WIDTHS = (4, 6, 5, 3)


def _checkpoint(path, seed=0, scale=1.0, widths=WIDTHS):
    torch.manual_seed(seed)
    m = dcnn(widths=widths)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(scale)
        m.train()
        m(torch.randn(64, 3, 32, 32))  # BatchNorm statistics of its own, for --bn keep
    m.eval()
    torch.save({"state_dict": m.state_dict(), "epoch": 3}, path)
    return m


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_surface_around_a_checkpoint(tmp_path):
    m = _checkpoint(tmp_path / "ck.pt")
    out = tmp_path / "o"
    rc = surface_cli.main(["--checkpoint", str(tmp_path / "ck.pt"), "--train-size", "60", "--grid", "5",
                           "--range", "-1:1", "--sets", "train,test", "--out", str(out), "--quiet"])
    assert rc == 0
    for f in ("surface.npz", "surface.csv", "surface.json", "curves.png", "contour.png", "surface3d.png",
              "surface.html"):
        assert (out / f).stat().st_size > 200, f
    rows = _rows(out / "surface.csv")
    assert len(rows) == 25 and set(rows[0]) == {"x", "y", "train_loss", "train_error", "test_loss", "test_error"}
    centre = next(r for r in rows if float(r["x"]) == 0 and float(r["y"]) == 0)
    d = load_dataset("digits", train_size=60)
    e, loss = evaluate(m, d.x_train, d.y_train, bn="reestimate")
    assert float(centre["train_loss"]) == pytest.approx(loss, rel=1e-5)
    assert float(centre["train_error"]) == e
    _, loss_t = evaluate(m, d.x_test, d.y_test, bn="reestimate", bn_x=d.x_train)
    assert float(centre["test_loss"]) == pytest.approx(loss_t, rel=1e-5)
    info = json.loads((out / "surface.json").read_text())["info"]
    assert info["bn"] == "reestimate" and "re-estimated" in info["bn_description"]
    assert info["set_sizes"] == {"train": 60, "test": 297}
    html = (out / "surface.html").read_text()
    assert "<script src" not in html and "http" not in html.split("<script")[1]  # self-contained
    (out / "contour.png").unlink()
    assert plot.main([str(out)]) == 0 and (out / "contour.png").exists()  # `pylandscape plot` redraws


def test_surface_through_two_checkpoints_hits_them_exactly(tmp_path):
    a = _checkpoint(tmp_path / "a.pt", seed=1)
    b = _checkpoint(tmp_path / "b.pt", seed=2)
    out = tmp_path / "line"
    assert surface_cli.main(["--through", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--grid", "5",
                             "--range", "-0.5:1.5", "--train-size", "40", "--bn", "keep", "--out", str(out),
                             "--quiet"]) == 0
    rows = _rows(out / "surface.csv")
    assert [float(r["x"]) for r in rows] == [-0.5, 0.0, 0.5, 1.0, 1.5]
    d = load_dataset("digits", train_size=40)
    # bn keep: the first checkpoint's statistics, for every point
    bm = dcnn(widths=WIDTHS)
    bm.load_state_dict(a.state_dict())
    for x, model in ((0.0, a), (1.0, b)):
        flat, _ = flatten_module(model)
        _, want = evaluate(bm, d.x_train, d.y_train, flat=flat, bn="keep")
        got = float(next(r for r in rows if float(r["x"]) == x)["train_loss"])
        assert got == pytest.approx(want, rel=1e-6)
    assert (out / "curves.png").exists() and not (out / "contour.png").exists()


def test_surface_of_a_store_with_the_trajectory_on_it(tmp_path):
    torch.manual_seed(0)
    m = dcnn(widths=WIDTHS)
    d = load_dataset("digits", train_size=50)
    opt = torch.optim.SGD(m.parameters(), lr=0.2)
    store = SnapshotStore(tmp_path / "run", flatten_module(m)[1])
    for ep in range(6):
        m.train()
        opt.zero_grad()
        F.cross_entropy(m(d.x_train), d.y_train).backward()
        opt.step()
        store.append(flatten_module(m)[0], epoch=ep + 1, trajectory="main")
    s = surface_around_store(tmp_path / "run", dcnn(widths=WIDTHS), {"train": (d.x_train, d.y_train)},
                             tmp_path / "surf", grid=5)
    assert s.trajectory.shape == (6, 2)
    np.testing.assert_allclose(s.trajectory[-1], [0.0, 0.0], atol=1e-6)  # the origin is the last snapshot
    assert s.xs[0] <= s.trajectory[:, 0].min() and s.xs[-1] >= s.trajectory[:, 0].max()
    assert sum(s.info["pca_explained"]) <= 1.0 + 1e-9
    assert (tmp_path / "surf" / "contour.png").exists()


@pytest.mark.slow
def test_hessian_cli_top_eigenvalue_is_the_exact_one(tmp_path):
    _checkpoint(tmp_path / "ck.pt", scale=0.5, widths=(2, 3, 2, 2))
    out = tmp_path / "h"
    assert hessian_cli.main(["--checkpoint", str(tmp_path / "ck.pt"), "--train-size", "12", "--dtype", "float64",
                             "--top-k", "2", "--lanczos-steps", "40", "--probes", "4", "--density-runs", "1",
                             "--density-steps", "8", "--per-layer", "--layer-probes", "3", "--out", str(out)]) == 0
    rep = json.loads((out / "hessian.json").read_text())
    for f in ("eigenvalues.csv", "layers.csv", "density.csv", "density.png"):
        assert (out / f).exists(), f
    assert [r["layer"] for r in rep["layers"]][:2] == ["layer 2 (conv1)", "layer 3 (conv2)"]
    # independent: torch.func.hessian of the same loss (BN statistics re-estimated on the 12 images)
    m = dcnn(widths=(2, 3, 2, 2)).double()
    sd = torch.load(tmp_path / "ck.pt", weights_only=True)["state_dict"]
    m.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in sd.items()})
    d = load_dataset("digits", train_size=12)
    x = d.x_train.double()
    reestimate_bn_(m, x)
    m.eval()
    names = [n for n, _ in m.named_parameters()]
    shapes = [p.shape for _, p in m.named_parameters()]
    sizes = [p.numel() for _, p in m.named_parameters()]
    bufs = dict(m.named_buffers())
    theta = torch.cat([p.detach().reshape(-1) for p in m.parameters()])

    def loss(t):
        ps = dict(zip(names, [u.view(s) for u, s in zip(torch.split(t, sizes), shapes)]))
        return F.cross_entropy(torch.func.functional_call(m, (ps, bufs), (x,)), d.y_train)
    H = torch.func.hessian(loss)(theta).numpy()
    ev = np.linalg.eigvalsh((H + H.T) / 2)[::-1]
    np.testing.assert_allclose(rep["top_eigenvalues"], ev[:2], rtol=1e-6)
    assert rep["trace"]["probes"] == 4 and rep["trace"]["stderr"] > 0
    assert plot.main([str(out)]) == 0


def test_inputs_npz_and_image_folder(tmp_path):
    from PIL import Image  # pillow comes with matplotlib; only this test writes images
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.integers(0, 255, (12, 8, 8, 3), dtype=np.uint8), y=np.arange(12) % 3)
    data = load_data(str(tmp_path / "d.npz"))
    x, _ = data.sets["train"]
    assert x.shape == (12, 3, 8, 8) and x.max() <= 1.0 and data.num_classes == 3
    for split in ("train", "test"):
        for c in ("cat", "dog"):
            (tmp_path / "imgs" / split / c).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)).save(tmp_path / "imgs" / split / c / f"{i}.png")
    data = load_data(str(tmp_path / "imgs"))
    assert data.sets["train"][0].shape == (4, 3, 6, 6) and data.sets["train"][1].tolist() == [0, 0, 1, 1]
    assert "test" in data.sets and data.num_classes == 2


def test_bad_input_gives_one_line_errors(tmp_path, capsys):
    assert surface_cli.main(["--out", str(tmp_path / "o")]) == 2
    assert "give --checkpoint" in capsys.readouterr().err
    assert surface_cli.main(["--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt" in capsys.readouterr().err
    _checkpoint(tmp_path / "ck.pt")
    assert surface_cli.main(["--checkpoint", str(tmp_path / "ck.pt"), "--data", str(tmp_path / "nope.npz")]) == 2
    assert "nope.npz" in capsys.readouterr().err
    assert surface_cli.main(["--checkpoint", str(tmp_path / "ck.pt"), "--model", "fc2"]) == 2
    assert "fc1.weight" in capsys.readouterr().err
    with pytest.raises(InputError, match="--grid"):
        parse_grid("5x5x5")
    with pytest.raises(InputError, match="LOW must be below HIGH"):
        parse_range("1:-1")
    assert parse_grid("51") == (51,) and parse_grid("51x31") == (51, 31)


def test_trajectory_heights_on_the_3d_surface_interpolate_the_grid():
    from types import SimpleNamespace

    from pylandscape.landscape.figures import lift
    xs, ys = np.linspace(-1, 1, 7), np.linspace(-2, 2, 5)
    X, Y = np.meshgrid(xs, ys)
    z = 2 * X + 3 * Y + X * Y + 1  # bilinear: reproduced exactly between grid nodes
    pts = np.array([[0.13, -1.7], [-1.0, 2.0], [0.99, 0.01], [1.5, 0.0], [0.0, -2.5]])
    got = lift(SimpleNamespace(xs=xs, ys=ys), z, pts)
    want = 2 * pts[:, 0] + 3 * pts[:, 1] + pts[:, 0] * pts[:, 1] + 1
    np.testing.assert_allclose(got[:3], want[:3], rtol=1e-12)
    assert np.isnan(got[3:]).all()  # outside the grid: not drawn
