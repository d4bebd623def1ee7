"""Readers, security, metadata, --layer and --select: small files written by the tests themselves."""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pylandscape.flat import ParamSpec
from pylandscape.snapshots import (
    SnapshotError,
    discover,
    open_source,
    paper_layers,
    parse_select,
    select_tensors,
)
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
    if wrap == "model":  # the epoch the file records replaces the number in its name
        assert [(m.get("step"), m["epoch"], m["time_source"]) for m in sset.meta] == \
            [(None, i, "checkpoint file (epoch)") for i in range(3)]
    else:
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


def test_store_append_cuts_an_unfinished_manifest_line(tmp_path):
    """A run killed mid-append leaves a manifest line without its newline: the next append drops it."""
    spec = ParamSpec(("w",), ((3,),))
    st = SnapshotStore(tmp_path / "s", spec)
    st.append(torch.zeros(3), step=0)
    with open(tmp_path / "s" / "manifest.jsonl", "ab") as f:
        f.write(b'{"index": 1, "file": "snap')  # the killed write
    st = SnapshotStore(tmp_path / "s")
    assert len(st) == 1
    st.append(torch.ones(3), step=1)
    lines = (tmp_path / "s" / "manifest.jsonl").read_bytes().split(b"\n")
    assert lines[-1] == b"" and [json.loads(x)["step"] for x in lines[:-1]] == [0, 1]
    assert len(SnapshotStore(tmp_path / "s")) == 2


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


@pytest.mark.parametrize("where", ["inside_namespace", "pth_tar", "bin_legacy"])
def test_allow_list_runs_no_code(tmp_path, where):
    """The allow-list (argparse.Namespace, numpy data, paths) rebuilds plain data only: a pickle that
    smuggles a call through an allowed type, a .pth.tar or a legacy .bin is still refused unrun."""
    marker = tmp_path / "PWNED"
    d = tmp_path / "ckpts"
    d.mkdir()
    args = argparse.Namespace(lr=0.1, out=pathlib.PurePosixPath("/x"))
    if where == "inside_namespace":
        args.hook = _Evil(marker)
        bad = d / "model_0.pth"
    else:
        bad = d / ("checkpoint-0.pth.tar" if where == "pth_tar" else "pytorch_model.bin")
    payload = {"model": {"w": torch.ones(3)}, "epoch": 0, "args": args,
               "x": _Evil(marker) if where != "inside_namespace" else 1}
    if where == "bin_legacy":
        torch.save(payload, bad, _use_new_zipfile_serialization=False)
    else:
        torch.save(payload, bad)
    with pytest.raises(SnapshotError, match=rf"{bad.name}: refused to load.*posix\.system|system"):
        discover(d)
    assert not marker.exists()


def test_allow_list_loads_real_training_extras(tmp_path):
    """torchvision/timm/Megatron save argparse.Namespace args, numpy RNG states and numpy scalars next
    to the weights: loaded (weights_only=True + the allow-list), and their epoch/iteration used."""
    rng = np.random.RandomState(0).get_state()
    for i in range(3):
        payload = {"model": {"w": torch.randn(4), "b": torch.randn(2)}, "epoch": np.int64(i),
                   "args": argparse.Namespace(lr=0.1, data=pathlib.PosixPath("/data"), tags=["a"]),
                   "rng": {"numpy": rng, "best": np.float64(0.5)}}
        torch.save(payload, tmp_path / f"model_{i}.pth")
        torch.save(payload, tmp_path / f"legacy_{i}.bin", _use_new_zipfile_serialization=False)
    sset = discover(tmp_path)
    assert len(sset) == 6 and list(sset.spec.names) == ["w", "b"]
    assert sorted((m["epoch"], m["time_source"]) for m in sset.meta)[:2] == [(0, "checkpoint file (epoch)")] * 2


def test_non_weight_files_are_counted_not_errors(tmp_path):
    """Optimizer, scheduler, RNG, scaler states and training arguments: recognised by name or content,
    skipped with one summary line; a real bad weight file is still an error."""
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.StepLR(opt, 2)
    for i in range(2):
        ck = tmp_path / f"checkpoint-{i * 10}"
        ck.mkdir()
        save_file(model.state_dict(), ck / "model.safetensors")
        torch.save(opt.state_dict(), ck / "optimizer.pt")                 # by name
        torch.save(opt.state_dict(), ck / "opt_state_xyz.pt")             # by content
        torch.save(sched.state_dict(), ck / "lr_sched_whatever.pth")      # by content
        torch.save({"python": (3, (1, 2), None), "numpy": np.random.get_state(), "cpu": torch.get_rng_state()},
                   ck / "rng_state.pth")
        torch.save({"scale": torch.tensor(2.0**16), "growth_factor": 2.0, "backoff_factor": 0.5,
                    "growth_interval": 2000, "_growth_tracker": 0}, ck / "amp.pt")
        (ck / "training_args.bin").write_bytes(b"\x80\x04not a weights-only pickle")
        (ck / "trainer_state.json").write_text(json.dumps({"global_step": i * 10 + 1, "epoch": i + 0.5}))
        (ck / "random_states_0.pkl").write_bytes(b"x")
        (ck / "vocab.bin").write_bytes(b"not a checkpoint at all")
    sset = discover(tmp_path)
    assert sset.skipped[0] == ("skipped 18 non-weight files: 4 RNG states, 4 optimizer states, "
                               "2 AMP scaler states, 2 JSON metadata files, 2 other .bin files (not PyTorch), "
                               "2 scheduler states, 2 training arguments")
    assert [(m["step"], m["epoch"], m["label"]) for m in sset.meta] == [(1, 0.5, "ep 0.5"), (11, 1.5, "ep 1.5")]
    assert {m["time_source"] for m in sset.meta} == {"trainer_state.json (global_step, epoch)"}
    torch.save({"weights": [1, 2]}, tmp_path / "checkpoint-0" / "broken.pt")
    with pytest.raises(SnapshotError, match=r"broken\.pt: no state_dict found"):
        discover(tmp_path)


def test_run_layouts_from_folder_names(tmp_path):
    """A numbered checkpoint folder is one point of the run in the folder above it, at that step;
    a file's own epoch/step wins over names; labels: epoch, else step, else file name."""
    for run in ("a", "b"):
        for step in (1200, 300):
            f = tmp_path / run / f"global_step{step}" / "mp_rank_00_model_states.pt"
            f.parent.mkdir(parents=True)
            torch.save({"module": {"w": torch.randn(5)}, "ds_version": "0.1"}, f)
        f = tmp_path / run / "iter_0000050" / "mp_rank_00" / "model_optim_rng.pt"
        f.parent.mkdir(parents=True)
        torch.save({"model": {"w": torch.randn(5)}, "iteration": 50,
                    "args": argparse.Namespace(lr=1.0)}, f)
        save_file({"w": torch.randn(5)}, tmp_path / run / "final.safetensors")
    sset = discover(tmp_path)
    got = [(m["trajectory"], m.get("step"), m.get("time_source"), m["label"]) for m in sset.meta]
    assert got == [
        ("a", 50, "checkpoint file (iteration)", "step 50"),
        ("a", 300, "folder name (global_step300)", "step 300"),
        ("a", 1200, "folder name (global_step1200)", "step 1200"),
        ("a", None, None, "final.safetensors"),
        ("b", 50, "checkpoint file (iteration)", "step 50"),
        ("b", 300, "folder name (global_step300)", "step 300"),
        ("b", 1200, "folder name (global_step1200)", "step 1200"),
        ("b", None, None, "final.safetensors")]


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
    # paths the pattern does not match are left out with a note, not an error
    save_file({"w": torch.randn(4)}, tmp_path / "runs/other.safetensors")
    sset = discover(tmp_path, group_by=r"seed(?P<traj>\d+)_ep(?P<step>\d+)")
    assert len(sset) == 6 and "does not match 1 checkpoint path(s), left out: runs/other.safetensors" in \
        sset.skipped[0]
    with pytest.raises(SnapshotError, match=r"matches none of the 7 checkpoint paths.*relative to --snapshots"):
        discover(tmp_path, group_by=r"nothing(?P<step>\d+)")


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
    # names as the user sees them in the file: with or without the wrapper prefix
    assert select_tensors(spec, "model.features.0.*") == [0, 1]
    assert select_tensors(spec, "_orig_mod.module.fc.weight") == [4]
    hf = ParamSpec(("model.layers.0.weight", "model.layers.0.bias", "lm_head.weight"), ((2, 2), (2,), (3, 2)))
    assert select_tensors(hf, "layers.0.*") == [0, 1] and select_tensors(hf, "model.layers.0") == [0, 1]
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


@pytest.mark.parametrize("save", ["savez", "savez_compressed"])
def test_npz_column_chunks(tmp_path, save):
    """.npz headers are parsed without reading arrays; column ranges are read straight from the member
    (also Fortran-ordered and compressed arrays) and agree with np.load."""
    rng = np.random.default_rng(0)
    arrays = []
    for i in range(3):
        a = {"w": rng.standard_normal((5, 7)).astype(np.float32), "b": rng.standard_normal(4),
             "f": np.asfortranarray(rng.standard_normal((3, 4)).astype(np.float16))}
        getattr(np, save)(tmp_path / f"s_{i}.npz", **a)
        arrays.append(a)
    sset = discover(tmp_path)
    assert [sset.items[0].tensors[n][:2] for n in ("w", "b", "f")] == [((5, 7), "float32"), ((4,), "float64"),
                                                                       ((3, 4), "float16")]
    for width in (sset.spec.numel, 6, 1):
        parts = [sset.read_block(range(3), c, progress=False) for c in sset.plan_chunks(width)]
        X = np.concatenate(parts, axis=1)
        for i, a in enumerate(arrays):
            ref = np.concatenate([a[n].reshape(-1).astype(np.float32) for n in sset.spec.names])
            np.testing.assert_array_equal(X[i], ref)


def test_rows_read_on_several_threads(tmp_path, monkeypatch):
    """Many rows are read by a few threads (copies and page faults on several cores): the same bytes as one
    thread, and a file that turns bad after discovery stops the read with its name."""
    for i in range(40):
        save_file({"a": torch.randn(300), "b": torch.randn(7, 11)}, tmp_path / f"s{i:02d}.safetensors")
    sset = discover(tmp_path)
    pieces = sset.plan_pieces(0, sset.spec.numel)
    monkeypatch.setenv("PYLANDSCAPE_READ_THREADS", "3")
    many = sset.read_block(range(40), pieces, progress=False)
    monkeypatch.setenv("PYLANDSCAPE_READ_THREADS", "1")
    one = sset.read_block(range(40), pieces, progress=False)
    assert np.array_equal(many, one) and many.shape == (40, 377)
    from safetensors.numpy import load_file
    first = load_file(str(tmp_path / "s00.safetensors"))
    assert np.array_equal(one[0], np.concatenate([first[n].ravel() for n in sset.spec.names]))
    raw = (tmp_path / "s23.safetensors").read_bytes()
    (tmp_path / "s23.safetensors").write_bytes(raw[:-200])
    monkeypatch.setenv("PYLANDSCAPE_READ_THREADS", "3")
    with pytest.raises(SnapshotError, match=r"s23\.safetensors: truncated"):
        sset.read_block(range(40), pieces, progress=False)
    monkeypatch.setenv("PYLANDSCAPE_READ_THREADS", "four")
    with pytest.raises(ValueError, match="PYLANDSCAPE_READ_THREADS='four'"):
        sset.read_block(range(40), pieces, progress=False)
