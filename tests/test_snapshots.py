"""Readers, security, metadata, --layer and --select: small files written by the tests themselves."""
from __future__ import annotations

import os
import pickle
import zipfile

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pylandscape.flat import ParamSpec
from pylandscape.snapshots import (SnapshotError, discover, open_source, paper_layers, parse_select,
                                   select_tensors)
from pylandscape.store import SnapshotStore


def _sd(seed: int, bn: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {"conv1.weight": torch.randn(4, 1, 3, 3, generator=g), "conv1.bias": torch.randn(4, generator=g)}
    if bn:
        sd.update({"bn1.weight": torch.rand(4, generator=g), "bn1.bias": torch.randn(4, generator=g),
                   "bn1.running_mean": torch.randn(4, generator=g), "bn1.running_var": torch.rand(4, generator=g),
                   "bn1.num_batches_tracked": torch.tensor(7)})
    sd.update({"fc.weight": torch.randn(3, 8, generator=g), "fc.bias": torch.randn(3, generator=g)})
    return sd


def _flat(sd, names):
    return torch.cat([sd[n].reshape(-1).float() for n in names])


WEIGHTS = ["conv1.weight", "conv1.bias", "bn1.weight", "bn1.bias", "fc.weight", "fc.bias"]


def _read_all(sset):
    return sset.read_block(range(len(sset)), sset.plan_pieces(0, sset.spec.numel), progress=False)


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "lightning"])
def test_torch_readers(tmp_path, wrap):
    sds = [_sd(i) for i in range(3)]
    for i, sd in enumerate(sds):
        if wrap == "plain":
            obj = sd
        elif wrap == "state_dict":
            obj = {"state_dict": sd, "optimizer": {"lr": 0.1}}
        elif wrap == "model":
            obj = {"model": sd, "epoch": i}
        else:
            obj = {"state_dict": {f"model.{k}": v for k, v in sd.items()}, "epoch": i, "global_step": 10 * i}
        torch.save(obj, tmp_path / f"ckpt_{i}.pt")
    sset = discover(tmp_path)
    assert list(sset.spec.names) == WEIGHTS  # state_dict order kept, BN statistics skipped
    X = _read_all(sset)
    for i in range(3):
        np.testing.assert_array_equal(X[i], _flat(sds[i], WEIGHTS).numpy())
    assert [m["step"] for m in sset.meta] == ([0, 10, 20] if wrap == "lightning" else [0, 1, 2])
    full = open_source(tmp_path)
    assert any("running_mean" in s and "num_batches_tracked" in s for s in full.skipped)


def test_safetensors_npz_dtypes_and_metadata(tmp_path):
    sds = [_sd(i, bn=False) for i in range(4)]
    names = list(sds[0])
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for i, sd in enumerate(sds[:2]):
        # fp16/bf16 tensors are widened; the spec follows the file's data order
        save_file({k: (v.half() if k == "fc.bias" else v) for k, v in sd.items()}, tmp_path / f"a/it{i * 5}.safetensors")
    for i, sd in enumerate(sds[2:]):
        np.savez(tmp_path / f"b/snap-{i}.npz", **{k: v.numpy() for k, v in sd.items()})
    sset = discover(tmp_path)
    assert sorted(sset.spec.names) == sorted(names)
    X = _read_all(sset)
    assert [m["trajectory"] for m in sset.meta] == ["a", "a", "b", "b"]
    assert [m["step"] for m in sset.meta] == [0, 5, 0, 1]
    for r, sd in enumerate(sds):
        ref = torch.cat([sd[n].reshape(-1).half().float() if (n == "fc.bias" and r < 2) else sd[n].reshape(-1)
                         for n in sset.spec.names])
        np.testing.assert_array_equal(X[r], ref.numpy())


def test_bf16_safetensors(tmp_path):
    t = torch.randn(5, 7).bfloat16()
    for i in range(3):
        save_file({"w": t * (i + 1)}, tmp_path / f"s{i}.safetensors")
    X = _read_all(discover(tmp_path))
    np.testing.assert_array_equal(X[2], (t * 3).float().reshape(-1).numpy())


def test_our_store_and_column_chunks(tmp_path):
    spec = ParamSpec(("z.weight", "a.bias"), ((3, 4), (5,)))  # module order differs from name order
    st = SnapshotStore(tmp_path / "run", spec)
    flats = [torch.randn(spec.numel) for _ in range(5)]
    for i, f in enumerate(flats):
        st.append(f, trajectory="t0" if i < 3 else "t1", step=10 - i, epoch=i % 2, train_error=0.1 * i)
    sset = discover(tmp_path)
    assert sset.spec == spec
    # sorted by step within each trajectory
    assert [m["step"] for m in sset.meta] == [8, 9, 10, 6, 7]
    X = _read_all(sset)
    order = [2, 1, 0, 4, 3]
    np.testing.assert_array_equal(X, torch.stack([flats[i] for i in order]).numpy())
    # without steps a store keeps its write order (epochs restart in each stage of a run)
    st2 = SnapshotStore(tmp_path / "staged", spec)
    for stage in range(2):
        for epoch in range(3):
            st2.append(flats[0], stage=stage, epoch=epoch)
    assert [(m["stage"], m["epoch"]) for m in discover(tmp_path / "staged").meta] == [
        (0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    # a column range that cuts through a tensor
    piece = sset.read_block([0], sset.plan_pieces(10, 15), progress=False)
    np.testing.assert_array_equal(piece[0], flats[2][10:15].numpy())


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_malicious_pickle_is_refused_without_running(tmp_path, fmt):
    marker = tmp_path / "PWNED"
    bad = tmp_path / "ckpts" / "evil.pt"
    bad.parent.mkdir()
    payload = {"state_dict": {"w": torch.ones(3)}, "x": _Evil(marker)}
    if fmt == "zip":
        torch.save(payload, bad)
    else:
        with open(bad, "wb") as f:
            pickle.dump(payload, f)
    assert not marker.exists()
    with pytest.raises(SnapshotError, match=r"evil\.pt: refused to load"):
        discover(bad.parent)
    assert not marker.exists()


def test_npz_with_objects_refused(tmp_path):
    np.savez(tmp_path / "o.npz", w=np.array([{"a": 1}], dtype=object))
    with pytest.raises(SnapshotError, match=r"o\.npz: refused"):
        discover(tmp_path)


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError):
        discover(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SnapshotError, match="no checkpoints found"):
        discover(tmp_path / "empty")
    d = tmp_path / "trunc"
    d.mkdir()
    for i in range(3):
        save_file({"w": torch.randn(100)}, d / f"s{i}.safetensors")
    raw = (d / "s1.safetensors").read_bytes()
    (d / "s1.safetensors").write_bytes(raw[:-40])
    with pytest.raises(SnapshotError, match=r"s1\.safetensors: truncated"):
        discover(d)
    with pytest.warns(UserWarning, match="s1.safetensors"):
        assert len(discover(d, skip_bad=True)) == 2
    d2 = tmp_path / "mismatch"
    d2.mkdir()
    for i in range(3):
        torch.save({"w": torch.randn(10 if i != 2 else 11)}, d2 / f"m{i}.pt")
    with pytest.raises(SnapshotError, match=r"m2\.pt: has other tensors.*shape w \[11\] vs \[10\]"):
        discover(d2)
    d3 = tmp_path / "corrupt"
    d3.mkdir()
    torch.save({"w": torch.randn(10)}, d3 / "c.pt")
    raw = (d3 / "c.pt").read_bytes()
    (d3 / "c.pt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(SnapshotError, match=r"c\.pt: cannot read"):
        discover(d3)


def test_group_by(tmp_path):
    for s in (1, 2):
        for e in (3, 20, 100):
            (tmp_path / "runs").mkdir(exist_ok=True)
            save_file({"w": torch.randn(4)}, tmp_path / f"runs/seed{s}_ep{e}_v2.safetensors")
    sset = discover(tmp_path, group_by=r"seed(?P<traj>\d+)_ep(?P<step>\d+)")
    assert [(m["trajectory"], m["step"]) for m in sset.meta] == [
        ("1", 3), ("1", 20), ("1", 100), ("2", 3), ("2", 20), ("2", 100)]
    # default rule: last number in the file name (the "2" of v2) -- here every file ties
    assert {m["step"] for m in discover(tmp_path).meta} == {2}


def test_layer_selection():
    spec = ParamSpec(("features.0.weight", "features.0.bias", "bn.weight", "bn.bias", "fc.weight", "fc.bias"),
                     ((4, 1, 3, 3), (4,), (4,), (4,), (3, 8), (3,)))
    assert [m for m, _ in paper_layers(spec)] == ["features.0", "fc"]
    assert select_tensors(spec, "2") == [0, 1]
    assert select_tensors(spec, "layer3") == [4, 5]
    assert select_tensors(spec, "features.0.*") == [0, 1]
    assert select_tensors(spec, "features.0.weight") == [0]
    assert select_tensors(spec, "bn") == [2, 3]
    assert select_tensors(spec, "fc.bias,2") == [0, 1, 5]
    assert select_tensors(spec, None) == list(range(6))
    with pytest.raises(SnapshotError, match="matches no tensor.*features.0.weight"):
        select_tensors(spec, "conv9.*")
    with pytest.raises(SnapshotError, match="layer 1 is the input"):
        select_tensors(spec, "1")
    with pytest.raises(SnapshotError, match="no layer 4.*2=features.0; 3=fc"):
        select_tensors(spec, "4")


def test_select_parsing():
    rows = [{"stage": s, "trajectory": t, "train_error": e}
            for s, t, e in [(1, "a", 0.5), (5, "b", 0.1), (7, "a", 0.0), (9, "c", None)]]

    def sel(expr):
        p = parse_select(expr, columns=["stage", "trajectory", "train_error"])
        return [i for i, r in enumerate(rows) if p(r)]
    assert sel("stage>=5") == [1, 2, 3]
    assert sel("stage >= 5 and trajectory == a") == [2]
    assert sel("trajectory in (a, 'c')") == [0, 2, 3]
    assert sel("stage < 5 or train_error <= 0.1") == [0, 1, 2]
    assert sel("not (stage == 5) and stage != 9") == [0, 2]
    assert sel("train_error > 0.05") == [0, 1]  # a missing value compares false
    for bad, msg in [("stage >", "expected a value"), ("__import__('os') == 1", "cannot parse|expected|no metadata column"),
                     ("stage >= 5 junk", "unexpected"), ("epoch > 1", "no metadata column 'epoch'"),
                     ("stage in 5", "needs a list")]:
        with pytest.raises(SnapshotError, match=msg):
            parse_select(bad, columns=["stage", "trajectory", "train_error"])
