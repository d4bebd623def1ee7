import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from pylandscape.data import load_dataset
from pylandscape.flat import flatten_module, load_flat_
from pylandscape.models import dcnn, fc2
from pylandscape.store import SnapshotStore
from pylandscape.train import TrainConfig, init_flats_for, train, train_many
from pylandscape.train import cli as train_cli
from pylandscape.train import loop as train_loop

pytestmark = pytest.mark.usefixtures("one_thread")


W = 0.125


@pytest.fixture(scope="module")
def data():
    # small and float32 (float64 convolutions are slow on CPU); a trimmed test set
    d = load_dataset("digits", train_size=120, seed=0)
    return replace(d, x_test=d.x_test[:40], y_test=d.y_test[:40])


def model_fn():
    return dcnn(W)


def fresh(seed=0):
    m = model_fn()
    load_flat_(m, init_flats_for(model_fn, [seed])[0])
    return m


def test_config_validation():
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=-0.1)
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="adam")
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="eval_bn"):
        TrainConfig(eval_bn="none")
    c = TrainConfig()
    c.lr = float("nan")
    with pytest.raises(ValueError, match="lr"):
        train(fresh(), None, c)


def test_full_batch_gd_lowers_loss(data):
    m = fresh()
    h = train(m, data, TrainConfig(optimizer="gd", lr=0.2, epochs=4), progress=False)
    assert [r["epoch"] for r in h] == [0, 1, 2, 3, 4] and [r["step"] for r in h] == [0, 1, 2, 3, 4]
    assert h[-1]["train_loss"] < h[0]["train_loss"] - 0.1
    # gd with chunks: the exact gradient of the mean loss (same as the one-chunk gradient when the
    # net has no BatchNorm coupling: check through a chunked step with eval-mode BN equal running stats)
    h2 = train(fresh(), data, TrainConfig(optimizer="gd", lr=0.2, epochs=1, chunk_size=50), progress=False)
    assert h2[-1]["train_loss"] < h2[0]["train_loss"]


def test_gd_chunks_accumulate_exact_gradient(data):
    # without BatchNorm (fc net) chunked and one-chunk GD must give the same step
    torch.manual_seed(0)
    a = fc2(3 * 32 * 32, 8, 10)
    b = fc2(3 * 32 * 32, 8, 10)
    b.load_state_dict(a.state_dict())
    train(a, data, TrainConfig(optimizer="gd", lr=0.1, epochs=2), progress=False)
    train(b, data, TrainConfig(optimizer="gd", lr=0.1, epochs=2, chunk_size=7), progress=False)
    torch.testing.assert_close(flatten_module(a)[0], flatten_module(b)[0], atol=1e-6, rtol=0)


def _snapshots(root):
    s = SnapshotStore(root)
    return s.entries, [load_file(str(s.path(i))) for i in range(len(s))]


def _same_store(a, b):
    ea, ta = _snapshots(a)
    eb, tb = _snapshots(b)
    assert ea == eb  # same metadata, same order, no duplicates
    assert len({(e["trajectory"], e["epoch"], e["step"]) for e in eb}) == len(eb)
    for x, y in zip(ta, tb):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


CFG = dict(optimizer="sgd", lr=0.05, batch_size=50, momentum=0.9, epochs=4, snapshot_steps=[4])


class Kill(Exception):
    pass


def test_resume_after_kill_is_bit_identical(data, tmp_path, monkeypatch):
    cfg = TrainConfig(**CFG)
    ref_model = fresh()
    ref = train(ref_model, data, cfg, store=tmp_path / "ref", progress=False)
    assert [r["epoch"] for r in ref] == [0, 1, 2, 3, 4]
    # steps: 3 per epoch (120 / 50, last batch 20); step 4 is inside epoch 2
    assert [e["step"] for e in SnapshotStore(tmp_path / "ref").entries] == [0, 3, 4, 6, 9, 12]

    # 1) killed from the callback during epoch 2's record (after its training, before its snapshot):
    #    the last resume state is the mid-epoch one of step 4
    def cb(row):
        if row["epoch"] == 2:
            raise Kill
    with pytest.raises(Kill):
        train(fresh(), data, cfg, store=tmp_path / "a", progress=False, callback=cb)
    m = fresh(seed=123)  # weights are taken from the resume state, not from this model
    h = train(m, data, cfg, store=tmp_path / "a", resume=True, progress=False)
    assert h == ref
    assert torch.equal(flatten_module(m)[0], flatten_module(ref_model)[0])
    _same_store(tmp_path / "ref", tmp_path / "a")

    # 2) killed between a snapshot's write and its resume state (the mid-epoch step-4 snapshot)
    real = train_loop.write_resume
    calls = {"n": 0}

    def flaky(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise Kill
        return real(*args, **kw)
    monkeypatch.setattr(train_loop, "write_resume", flaky)
    with pytest.raises(Kill):
        train(fresh(), data, cfg, store=tmp_path / "b", progress=False)
    monkeypatch.setattr(train_loop, "write_resume", real)
    assert len(SnapshotStore(tmp_path / "b")) == 3
    h = train(fresh(), data, cfg, store=tmp_path / "b", resume=True, progress=False)
    assert h == ref
    _same_store(tmp_path / "ref", tmp_path / "b")

    # resuming a finished run returns at once; more epochs continue it
    assert train(fresh(), data, cfg, store=tmp_path / "b", resume=True, progress=False) == ref
    # refusing to overwrite or to resume with another config
    with pytest.raises(ValueError, match="already holds snapshots"):
        train(fresh(), data, cfg, store=tmp_path / "b", progress=False)
    with pytest.raises(ValueError, match="lr"):
        train(fresh(), data, TrainConfig(**{**CFG, "lr": 0.1}), store=tmp_path / "b", resume=True, progress=False)


def test_resume_kill_before_first_resume_state(data, tmp_path, monkeypatch):
    cfg = TrainConfig(**{**CFG, "epochs": 2, "snapshot_steps": None})
    ref = train(fresh(), data, cfg, store=tmp_path / "ref", progress=False)
    monkeypatch.setattr(train_loop, "write_resume", lambda *a, **k: (_ for _ in ()).throw(Kill()))
    with pytest.raises(Kill):
        train(fresh(), data, cfg, store=tmp_path / "a", progress=False)
    monkeypatch.undo()
    assert len(SnapshotStore(tmp_path / "a")) == 1  # epoch 0 written, no resume state
    assert train(fresh(), data, cfg, store=tmp_path / "a", resume=True, progress=False) == ref
    _same_store(tmp_path / "ref", tmp_path / "a")


@pytest.mark.parametrize("opt", ["sgd", "gd"])
def test_train_many_loop_is_bit_identical_to_one_by_one(data, tmp_path, opt):
    seeds = [3, 4, 5]
    inits = init_flats_for(model_fn, seeds)
    cfg = TrainConfig(optimizer=opt, lr=0.1, batch_size=40, momentum=0.5, weight_decay=1e-3, epochs=2)
    many = train_many(model_fn, inits, data, cfg, seeds=seeds, store=tmp_path / "many", route="loop",
                      metas=[{"run": "r", "trajectory": k} for k in range(3)], progress=False)
    store = SnapshotStore(tmp_path / "many")
    assert len(store) == 3 * 3
    for k, s in enumerate(seeds):
        m = model_fn()
        load_flat_(m, inits[k])
        assert train(m, data, TrainConfig(**{**cfg.to_json(), "seed": s}), progress=False) == many[k]
        last = store.select(trajectory=k, epoch=2)
        assert len(last) == 1 and store.entries[last[0]]["seed"] == s and store.entries[last[0]]["run"] == "r"
        assert torch.equal(store.load_flat(last[0]), flatten_module(m)[0])
    # different seeds really give different trajectories
    assert not torch.allclose(store.load_flat(store.select(trajectory=0, epoch=2)[0]),
                              store.load_flat(store.select(trajectory=1, epoch=2)[0]))


@pytest.mark.parametrize("opt", ["sgd", "gd"])
def test_train_many_grouped_equals_one_by_one(data, tmp_path, opt):
    # float64: BatchNorm nets amplify rounding differences (grouped vs plain convolutions) quickly,
    # in float32 to ~1e-4 within a few steps; in float64 the two routes agree to ~1e-12.
    data = data.to(dtype=torch.float64)

    def fn():
        return dcnn(W).double()
    seeds = [3, 4, 5]
    inits = init_flats_for(fn, seeds)
    cfg = TrainConfig(optimizer=opt, lr=0.1, batch_size=40, momentum=0.5, weight_decay=1e-3, epochs=2)
    many = train_many(fn, inits, data, cfg, seeds=seeds, store=tmp_path / "many", route="grouped",
                      progress=False)
    store = SnapshotStore(tmp_path / "many")
    for k, s in enumerate(seeds):
        m = fn()
        load_flat_(m, inits[k])
        one = train(m, data, TrainConfig(**{**cfg.to_json(), "seed": s}), progress=False)
        for a, b in zip(many[k], one):
            assert a["epoch"] == b["epoch"] and a["train_error"] == pytest.approx(b["train_error"], abs=1e-9)
            assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-9)
            assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-9)
        last = store.select(trajectory=k, epoch=2)
        torch.testing.assert_close(store.load_flat(last[0]), flatten_module(m)[0], atol=1e-10, rtol=0)
    with pytest.raises(ValueError, match="route"):
        train_many(fn, inits, data, cfg, seeds=seeds, route="vmap", progress=False)


@pytest.mark.parametrize("route", ["loop", "grouped"])
def test_train_many_resume(data, tmp_path, route):
    seeds = [1, 2]
    inits = init_flats_for(model_fn, [0, 0])  # same start, different data order (the paper's stages)
    cfg = TrainConfig(**{**CFG, "epochs": 3, "snapshot_steps": None})
    ref = train_many(model_fn, inits, data, cfg, seeds=seeds, store=tmp_path / "ref", progress=False, route=route)

    def cb(k, row):
        if row["epoch"] == 2 and k == 1:
            raise Kill
    with pytest.raises(Kill):
        train_many(model_fn, inits, data, cfg, seeds=seeds, store=tmp_path / "a", progress=False, callback=cb,
                   route=route)
    h = train_many(model_fn, inits, data, cfg, seeds=seeds, store=tmp_path / "a", resume=True, progress=False,
                   route=route)
    assert h == ref
    _same_store(tmp_path / "ref", tmp_path / "a")


def test_cli(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train_cli.main(["--help"])
    assert e.value.code == 0 and "--trajectories" in capsys.readouterr().out
    assert train_cli.main(["--lr", "-1", "--no-progress"]) == 2
    assert "lr must be" in capsys.readouterr().err
    assert train_cli.main(["--activation", "swish", "--no-progress"]) == 2
    assert "activation" in capsys.readouterr().err
    assert train_cli.main(["--data", "cifar10", "--root", str(tmp_path), "--no-progress"]) == 2
    assert str(tmp_path) in capsys.readouterr().err
    out = tmp_path / "run"
    args = ["--width", "0.125", "--train-size", "60", "--epochs", "1", "-K", "2", "--out", str(out),
            "--no-progress", "--run", "cli"]
    assert train_cli.main(args) == 0
    s = SnapshotStore(out)
    assert len(s) == 4 and {e["run"] for e in s.entries} == {"cli"}
    assert json.loads((out / "train_history.json").read_text())["seeds"] == [0, 1]
    assert train_cli.main(args + ["--resume"]) == 0 and len(SnapshotStore(out)) == 4


@pytest.mark.slow  # end-to-end, > 5 s on 2 cores; CI runs it (pytest -m 'not slow' skips it)
def test_cli_killed_subprocess_resumes_bit_identically(tmp_path):
    """A real SIGKILL at an arbitrary moment (possibly mid-write), then --resume."""
    args = ["--width", "0.125", "--train-size", "60", "--epochs", "10", "--batch-size", "20",
            "--momentum", "0.9", "--no-progress"]
    assert train_cli.main(args + ["--out", str(tmp_path / "ref")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # same thread count as this process: identical float reductions
    # cwd away from the checkout: the child imports the same (installed) package as this process.
    proc = subprocess.Popen([sys.executable, "-m", "pylandscape", "train", *args, "--out", str(tmp_path / "a")],
                            env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = tmp_path / "a" / "manifest.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if manifest.exists() and manifest.read_bytes().count(b"\n") >= 3:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(SnapshotStore(tmp_path / "a")) < 11
    assert train_cli.main(args + ["--out", str(tmp_path / "a"), "--resume"]) == 0
    _same_store(tmp_path / "ref", tmp_path / "a")
    ha = json.loads((tmp_path / "a" / "train_history.json").read_text())["histories"]
    assert ha == json.loads((tmp_path / "ref" / "train_history.json").read_text())["histories"]
