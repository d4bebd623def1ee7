"""`python -m pylandscape.mds` on checkpoint folders written by the training libraries' own saving code.

The libraries are the optional extra `layouts` (not in `test`: heavy); each test skips with the reason
when its library is missing. Checked per layout: points (copies drawn once, with aliases), one run,
time order and its source, the one-line summary of skipped non-weight files, and the coordinates
against an independent float64 classical MDS (numpy eigh of the double-centred (1 - cos)²) of the
weights loaded with the libraries' own loaders.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import _layouts as build  # tests/ is on sys.path (it has no __init__.py)
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pylandscape import mds
from pylandscape.snapshots import mapped


def _weights(path: Path) -> dict:
    """name -> float tensor, loaded independently of pylandscape (our own test files: trusted)."""
    if path.name.endswith(".safetensors"):
        sd = load_file(path)
    else:
        sd = torch.load(path, weights_only=False, map_location="cpu")
        for key in ("state_dict", "model"):
            if isinstance(sd, dict) and isinstance(sd.get(key), dict):
                sd = sd[key]
                break
    return {k: v for k, v in sd.items() if v.is_floating_point() and "running_" not in k}


def _reference_mds(paths: list[Path], k: int = 2) -> np.ndarray:
    """Textbook classical MDS in float64: explicit J, numpy eigh, (1 - cos)² from the chord."""
    X = []
    for p in paths:
        sd = _weights(p)
        X.append(torch.cat([sd[n].reshape(-1).double() for n in sorted(sd)]).numpy())
    X = np.array(X)
    U = X / np.linalg.norm(X, axis=1, keepdims=True)
    one_minus_cos = 0.5 * ((U[:, None, :] - U[None, :, :]) ** 2).sum(-1)
    n = len(X)
    J = np.eye(n) - np.ones((n, n)) / n
    w, V = np.linalg.eigh(-0.5 * J @ one_minus_cos ** 2 @ J)
    w, V = w[::-1], V[:, ::-1]
    return V[:, :k] * np.sqrt(np.maximum(w[:k], 0))


def _procrustes_residual(A: np.ndarray, B: np.ndarray) -> float:
    A, B = A - A.mean(0), B - B.mean(0)
    U, _, Vt = np.linalg.svd(B.T @ A)
    return float(np.linalg.norm(A - B @ (U @ Vt)) / np.linalg.norm(A))


def _run(folder: Path, tmp_path: Path, capsys, *extra) -> tuple[list[dict], str]:
    out = tmp_path / "mds_out"
    rc = mds.main(["--snapshots", str(folder), "--out", str(out), "--no-progress", "--device", "cpu", *extra])
    err = capsys.readouterr().err
    assert rc == 0, err
    return list(csv.DictReader(open(out / "mds.csv"))), err


def _read_mode(tmp_path: Path, safetensors: bool) -> None:
    """Safetensors files written by the library share one layout: mapped, not copied (snapshots/mapped.py)."""
    timings = json.loads((tmp_path / "mds_out" / "mds.json").read_text())["timings"]
    assert timings["read_mode"] == ("mapped" if safetensors and mapped.enabled() else "copied")


def _check(folder, tmp_path, capsys, *, points, aliases, time_col, times, time_source, skipped):
    rows, err = _run(folder, tmp_path, capsys)
    _read_mode(tmp_path, all(p.endswith(".safetensors") for p in points))
    assert [r["path"] for r in rows] == points, err
    assert {r["path"]: r["aliases"] for r in rows if r.get("aliases")} == aliases
    assert {r["trajectory"] for r in rows} == {folder.name}  # one run
    assert [float(r[time_col]) for r in rows] == times
    assert {r["time_source"] for r in rows} == {time_source}
    notes = [ln for ln in err.splitlines() if ln.startswith("note: skipped")]
    assert notes == ([f"note: {skipped}"] if skipped else []), err
    assert sum(ln.startswith("note:") and "drawn once" in ln for ln in err.splitlines()) == (1 if aliases else 0)
    ours = np.array([[float(r["x"]), float(r["y"])] for r in rows])
    ref = _reference_mds([folder / p for p in points])
    assert _procrustes_residual(ref, ours) <= 1e-6
    return rows, err


def test_torchvision_reference_dicts(tmp_path, capsys):
    """references/classification/train.py: model_<epoch>.pth + checkpoint.pth with argparse.Namespace args."""
    run = build.build_torchvision(tmp_path)
    _check(run, tmp_path, capsys, points=[f"model_{e}.pth" for e in range(4)],
           aliases={"model_3.pth": "checkpoint.pth"}, time_col="epoch", times=[0, 1, 2, 3],
           time_source="checkpoint file (epoch)", skipped=None)


def test_timm_layout_by_hand(tmp_path, capsys):
    """What timm's CheckpointSaver writes, built by hand (runs without timm): .pth.tar, hard links."""
    run = build.build_timm_by_hand(tmp_path)
    _check(run, tmp_path, capsys, points=[f"checkpoint-{e}.pth.tar" for e in range(4)],
           aliases={"checkpoint-3.pth.tar": "last.pth.tar; model_best.pth.tar"}, time_col="epoch",
           times=[0, 1, 2, 3], time_source="checkpoint file (epoch)", skipped=None)


def test_timm_checkpoint_saver(tmp_path, capsys):
    pytest.importorskip("torchvision", reason="timm needs torchvision; PyPI's torchvision does not import "
                                              "beside a torch 2.13.0+cpu wheel (install a matching pair)")
    pytest.importorskip("timm.utils", reason="timm is in the 'layouts' extra")
    run = build.build_timm(tmp_path)
    _check(run, tmp_path, capsys, points=[f"checkpoint-{e}.pth.tar" for e in range(4)],
           aliases={"checkpoint-3.pth.tar": "last.pth.tar; model_best.pth.tar"}, time_col="epoch",
           times=[0, 1, 2, 3], time_source="checkpoint file (epoch)", skipped=None)


def test_lightning_model_checkpoint(tmp_path, capsys):
    pytest.importorskip("lightning", reason="lightning is in the 'layouts' extra")
    run = build.build_lightning(tmp_path)
    rows, _ = _check(run, tmp_path, capsys,
                     points=[f"checkpoints/epoch={e}-step={6 * (e + 1)}.ckpt" for e in range(4)],
                     aliases={"checkpoints/epoch=3-step=24.ckpt": "checkpoints/last.ckpt"}, time_col="step",
                     times=[6, 12, 18, 24], time_source="checkpoint file (epoch, global_step)", skipped=None)
    assert [r["label"] for r in rows] == ["ep 0", "ep 1", "ep 2", "ep 3"]


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_accelerate_save_state(tmp_path, capsys, safe):
    pytest.importorskip("accelerate", reason="accelerate is in the 'layouts' extra")
    run = build.build_accelerate(tmp_path, safe=safe)
    weights = "model.safetensors" if safe else "pytorch_model.bin"
    rows, err = _run(run, tmp_path, capsys)
    _read_mode(tmp_path, safe)
    assert [r["path"] for r in rows] == [f"checkpoints/checkpoint_{i}/{weights}" for i in range(4)]
    assert [r["time_source"] for r in rows] == [f"folder name (checkpoint_{i})" for i in range(4)]
    assert [r["step"] for r in rows] == ["0", "1", "2", "3"] and {r["trajectory"] for r in rows} == {run.name}
    assert "note: skipped 12 non-weight files: 4 RNG states, 4 optimizer states, 4 scheduler states" in err
    ours = np.array([[float(r["x"]), float(r["y"])] for r in rows])
    assert _procrustes_residual(_reference_mds([run / r["path"] for r in rows]), ours) <= 1e-6


def test_hf_trainer_output_dir(tmp_path, capsys):
    pytest.importorskip("transformers", reason="transformers is in the 'layouts' extra")
    run = build.build_hf_trainer(tmp_path)
    rows, err = _check(run, tmp_path, capsys, points=[f"checkpoint-{s}/model.safetensors" for s in (2, 4, 6, 8)],
                       aliases={"checkpoint-8/model.safetensors": "model.safetensors"}, time_col="step",
                       times=[2, 4, 6, 8], time_source="trainer_state.json (global_step, epoch)",
                       skipped="skipped 26 non-weight files: 9 JSON metadata files, 5 training arguments, "
                               "4 RNG states, 4 optimizer states, 4 scheduler states")
    assert [r["label"] for r in rows] == ["ep 0.5", "ep 1", "ep 1.5", "ep 2"]
    # another --layer is served from the cache; a wrapper prefix on the name (DDP's module.) is ignored

    rows2, err2 = _run(run, tmp_path, capsys, "--layer", "module.bert.encoder.layer.0.attention.*")
    selected = json.loads((tmp_path / "mds_out" / "mds.json").read_text())["selected_tensors"]
    assert "cache hit" in err2 and len(rows2) == 4
    assert selected and all(n.startswith("bert.encoder.layer.0.attention.") for n in selected)
