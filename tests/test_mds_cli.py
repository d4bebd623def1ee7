"""`python -m pylandscape.mds`: outputs, cache, and one clear line for each kind of bad input."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pylandscape import mds
from pylandscape.mds import gram_cache
from pylandscape.flat import ParamSpec
from pylandscape.store import SnapshotStore

ROOT = Path(__file__).resolve().parents[1]


def _write_run(folder: Path, n_traj=2, n=6, seed=0, fmt="pt", nan_at=None, zero_at=None):
    g = torch.Generator().manual_seed(seed)
    for t in range(n_traj):
        d = folder / f"run{t}"
        d.mkdir(parents=True, exist_ok=True)
        sd = {"conv.weight": torch.randn(4, 1, 3, 3, generator=g), "conv.bias": torch.randn(4, generator=g),
              "bn.weight": torch.ones(4), "bn.bias": torch.zeros(4), "bn.running_mean": torch.zeros(4),
              "bn.num_batches_tracked": torch.tensor(3), "fc.weight": torch.randn(2, 16, generator=g),
              "fc.bias": torch.randn(2, generator=g)}
        for e in range(n):
            for k, v in sd.items():
                if v.is_floating_point() and "running" not in k:
                    v.add_(0.1 * torch.randn(v.shape, generator=g))
            cur = {k: v.clone() for k, v in sd.items()}
            if nan_at == (t, e):
                cur["fc.weight"][0, 0] = float("nan")
            if zero_at == (t, e):
                cur["conv.weight"].zero_()
                cur["conv.bias"].zero_()
            if fmt == "pt":
                torch.save({"state_dict": cur, "epoch": e}, d / f"epoch_{e}.pt")
            else:
                save_file(cur, d / f"epoch_{e}.safetensors")


def _run(argv, capsys):
    rc = mds.main(argv + ["--no-progress"])
    cap = capsys.readouterr()
    return rc, cap.err


def test_outputs_and_cache(tmp_path, capsys):
    _write_run(tmp_path / "ck")
    out = tmp_path / "out"
    rc, err = _run(["--snapshots", str(tmp_path / "ck"), "--out", str(out)], capsys)
    assert rc == 0, err
    assert "12 snapshots in 2 trajectories" in err and "bn.running_mean" in err and "cache written" in err
    rows = list(csv.DictReader(open(out / "mds.csv")))
    assert len(rows) == 12 and list(rows[0])[:4] == ["path", "x", "y", "trajectory"]
    assert rows[0]["path"] == "run0/epoch_0.pt" and rows[5]["epoch"] == "5"
    js = json.loads((out / "mds.json").read_text())
    assert js["n_snapshots"] == 12 and js["metric"] == "cosine" and "bn.running_mean" not in js["selected_tensors"]
    assert (out / "mds.png").stat().st_size > 10_000
    html = (out / "mds.html").read_text()
    assert "<svg" in html and "run1/epoch_5.pt" in html and html.count("<circle") == 12
    # second run, other layer / metric / subset: served from the cache, same numbers as without it
    out2 = tmp_path / "out2"
    rc, err = _run(["--snapshots", str(tmp_path / "ck"), "--out", str(out2), "--layer", "2",
                    "--metric", "euclidean", "--trajectory", "run1", "--dims", "3"], capsys)
    assert rc == 0 and "cache hit" in err, err
    rc, err = _run(["--snapshots", str(tmp_path / "ck"), "--out", str(tmp_path / "out3"), "--layer", "2",
                    "--metric", "euclidean", "--trajectory", "run1", "--dims", "3", "--no-cache"], capsys)
    a = np.loadtxt(out2 / "mds.csv", delimiter=",", skiprows=1, usecols=(1, 2, 3))
    b = np.loadtxt(tmp_path / "out3" / "mds.csv", delimiter=",", skiprows=1, usecols=(1, 2, 3))
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
    assert open(out2 / "mds.csv").readline().startswith("path,x,y,z,")
    # touching a file invalidates the cache for it
    import os
    f = tmp_path / "ck/run0/epoch_0.pt"
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    rc, err = _run(["--snapshots", str(tmp_path / "ck"), "--out", str(out2)], capsys)
    assert rc == 0 and "cache written" in err


def test_streaming_matches_in_memory(tmp_path, capsys):
    _write_run(tmp_path / "ck", fmt="safetensors")
    res_a = mds.embed(tmp_path / "ck", cache=False, progress=False)
    res_b = mds.embed(tmp_path / "ck", cache=False, progress=False, max_memory=3 * 12 * 4 * 7)  # 7 columns at a time
    assert res_a.timings["read_chunks"] == 1 and res_b.timings["read_chunks"] > 5
    np.testing.assert_allclose(res_a.coords, res_b.coords, atol=1e-12)


def test_store_and_select(tmp_path, capsys):
    spec = ParamSpec(("l1.weight", "l1.bias"), ((5, 3), (5,)))
    st = SnapshotStore(tmp_path / "store", spec)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(spec.numel, generator=g)
    for stage in range(8):
        w = w + 0.1 * torch.randn(spec.numel, generator=g)
        st.append(w, run="r", trajectory="sgd", stage=stage, epoch=stage * 10, train_error=0.5 / (stage + 1))
    rc, err = _run(["--snapshots", str(tmp_path / "store"), "--out", str(tmp_path / "o"),
                    "--select", "stage>=5", "--annotate", "train_error"], capsys)
    assert rc == 0, err
    rows = list(csv.DictReader(open(tmp_path / "o" / "mds.csv")))
    assert [int(r["stage"]) for r in rows] == [5, 6, 7]


@pytest.mark.parametrize("case, pattern", [
    ("missing", r"error: .*nope: no such folder"),
    ("empty", r"error: .*empty: no checkpoints found"),
    ("few", r"error: .*1 snapshot\(s\) selected, MDS needs at least 3"),
    ("truncated", r"error: .*epoch_2\.safetensors: truncated"),
    ("mismatch", r"error: .*epoch_9\.pt: has other tensors .*extra extra\.weight"),
    ("nan", r"error: .*run1/epoch_3\.pt: tensor 'fc\.weight' has NaN or Inf"),
    ("zero", r"error: .*run0/epoch_1\.pt: the selected tensors \(conv\.weight, conv\.bias\) are all zero"),
    ("layer", r"error: --layer 'conv9' matches no tensor; tensors are: conv\.weight, conv\.bias"),
    ("select", r"error: --select: no metadata column 'stage'"),
])
def test_bad_input_one_line(tmp_path, capsys, case, pattern):
    ck = tmp_path / "ck"
    argv = ["--snapshots", str(ck), "--out", str(tmp_path / "out"), "--no-cache"]
    if case == "missing":
        argv[1] = str(tmp_path / "nope")
    elif case == "empty":
        ck = tmp_path / "empty"
        ck.mkdir()
        argv[1] = str(ck)
    elif case == "few":
        _write_run(ck, n_traj=1, n=1)
    elif case == "truncated":
        _write_run(ck, fmt="safetensors")
        p = ck / "run1/epoch_2.safetensors"
        p.write_bytes(p.read_bytes()[:-10])
    elif case == "mismatch":
        _write_run(ck)
        torch.save({"extra.weight": torch.ones(2, 2)} | torch.load(ck / "run0/epoch_0.pt")["state_dict"],
                   ck / "run0/epoch_9.pt")
    elif case == "nan":
        _write_run(ck, nan_at=(1, 3))
    elif case == "zero":
        _write_run(ck, zero_at=(0, 1))
        argv += ["--layer", "2"]
    elif case == "layer":
        _write_run(ck)
        argv += ["--layer", "conv9"]
    elif case == "select":
        _write_run(ck)
        argv += ["--select", "stage > 2"]
    rc, err = _run(argv, capsys)
    assert rc != 0
    lines = [ln for ln in err.splitlines() if ln.startswith("error")]
    assert len(lines) == 1 and "Traceback" not in err, err
    import re
    assert re.search(pattern, lines[0]), lines[0]


def test_skip_bad_and_duplicates(tmp_path, capsys):
    ck = tmp_path / "ck"
    _write_run(ck, nan_at=(1, 3))
    import shutil
    shutil.copy(ck / "run0/epoch_2.pt", ck / "run0/epoch_7.pt")  # a copy: drawn once, listed as alias
    rc, err = _run(["--snapshots", str(ck), "--out", str(tmp_path / "o"), "--skip-bad"], capsys)
    assert rc == 0, err
    assert "warning: skipped: run1/epoch_3.pt" in err
    assert "note: 1 snapshot(s) with weights identical to another drawn once" in err
    rows = list(csv.DictReader(open(tmp_path / "o" / "mds.csv")))
    assert len(rows) == 11
    assert {r["path"]: r["aliases"] for r in rows if r["aliases"]} == {"run0/epoch_2.pt": "run0/epoch_7.pt"}
    # --keep-copies draws both, at the same place (zero distance is fine)
    rc, err = _run(["--snapshots", str(ck), "--out", str(tmp_path / "k"), "--skip-bad", "--keep-copies"], capsys)
    rows = list(csv.DictReader(open(tmp_path / "k" / "mds.csv")))
    assert rc == 0 and len(rows) == 12 and "identical" not in err
    dup = {r["path"]: (float(r["x"]), float(r["y"])) for r in rows}
    np.testing.assert_allclose(dup["run0/epoch_2.pt"], dup["run0/epoch_7.pt"], atol=1e-12)


def test_help_and_module_entry_points(tmp_path):
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "PYLANDSCAPE_DISABLE_EXT": "1"}
    r = subprocess.run([sys.executable, "-m", "pylandscape", "mds", "--help"], capture_output=True, text=True,
                       env=env, cwd=tmp_path, timeout=120)
    assert r.returncode == 0 and "--snapshots" in r.stdout and "examples:" in r.stdout
    r = subprocess.run([sys.executable, "-m", "pylandscape.mds", "--snapshots", str(tmp_path / "x")],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr and "no such folder" in r.stderr


def _listing(folder: Path) -> set:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")}


def test_cache_lives_in_the_user_cache_folder(tmp_path, capsys, monkeypatch):
    """Nothing is written into --snapshots; the cache is $XDG_CACHE_HOME/pylandscape; a second run for
    another layer reads no weights, copies included; `cache --list/--clear` show and empty it."""
    monkeypatch.delenv("PYLANDSCAPE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    ck = tmp_path / "ck"
    _write_run(ck)
    import shutil
    shutil.copy(ck / "run1/epoch_5.pt", ck / "run1/last.pt")
    before = _listing(ck)
    rc, err = _run(["--snapshots", str(ck), "--out", str(tmp_path / "o1")], capsys)
    assert rc == 0 and "cache written" in err, err
    assert _listing(ck) == before  # the user's folder is untouched
    cached = list((tmp_path / "xdg" / "pylandscape").glob("gram-v*.safetensors"))
    assert len(cached) == 1
    # a second run for another layer reads no weights (copies come from the hashes in the cache)
    from pylandscape.snapshots import SnapshotSet

    def no_reading(*a, **k):
        raise AssertionError("weights were read on a cache hit")
    monkeypatch.setattr(SnapshotSet, "read_block", no_reading)
    rc, err = _run(["--snapshots", str(ck), "--out", str(tmp_path / "o2"), "--layer", "fc.weight"], capsys)
    assert rc == 0 and "cache hit" in err and "run1/epoch_5.pt = run1/last.pt" in err, err
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("PYLANDSCAPE_CACHE_DIR", raising=False)
    # show and clear
    assert mds.main(["cache", "--list"]) == 0
    out = capsys.readouterr().out
    assert "1 file(s)" in out and cached[0].name in out and "13 snapshots" in out
    assert mds.main(["cache", "--clear"]) == 0
    assert "removed 1 file(s)" in capsys.readouterr().out
    assert not list((tmp_path / "xdg" / "pylandscape").glob("gram-*"))
    # --no-cache writes nothing; --cache-dir chooses the folder
    rc, err = _run(["--snapshots", str(ck), "--out", str(tmp_path / "o3"), "--no-cache"], capsys)
    assert rc == 0 and not list((tmp_path / "xdg" / "pylandscape").glob("gram-*"))
    rc, err = _run(["--snapshots", str(ck), "--out", str(tmp_path / "o4"), "--cache-dir", str(tmp_path / "c")],
                   capsys)
    assert rc == 0 and len(list((tmp_path / "c").glob("gram-v*.safetensors"))) == 1


def test_cache_version_and_size_cap(tmp_path, capsys, monkeypatch):
    """A file written by another Gram algorithm version is never reused; above --cache-max the least
    recently used files go first."""
    from pylandscape.mds import gram_cache
    cache = tmp_path / "cache"
    monkeypatch.setenv("PYLANDSCAPE_CACHE_DIR", str(cache))
    for name, seed in (("a", 0), ("b", 1), ("c", 2)):
        _write_run(tmp_path / name, seed=seed)
    rc, err = _run(["--snapshots", str(tmp_path / "a"), "--out", str(tmp_path / "o")], capsys)
    assert "cache written" in err
    monkeypatch.setattr(gram_cache, "ALGORITHM_VERSION", gram_cache.ALGORITHM_VERSION + 1)
    rc, err = _run(["--snapshots", str(tmp_path / "a"), "--out", str(tmp_path / "o")], capsys)
    assert rc == 0 and "cache written" in err and "cache hit" not in err, err
    rc, err = _run(["--snapshots", str(tmp_path / "a"), "--out", str(tmp_path / "o")], capsys)
    assert "cache hit" in err
    one = max(p.stat().st_size for p in cache.glob("gram-*"))
    # cap at two files: writing b then c evicts the oldest (the old-version file, then a's)
    cap = str(2 * one + one // 2)
    for name in ("b", "c"):
        rc, err = _run(["--snapshots", str(tmp_path / name), "--out", str(tmp_path / "o"), "--cache-max", cap],
                       capsys)
        assert rc == 0 and "cache written" in err
    names = sorted(p.name.split("-")[1] for p in cache.glob("gram-*"))
    assert len(names) == 2 and names == [f"v{gram_cache.ALGORITHM_VERSION}"] * 2
    rc, err = _run(["--snapshots", str(tmp_path / "a"), "--out", str(tmp_path / "o")], capsys)
    assert "cache written" in err  # a's Gram was evicted
    rc, err = _run(["--snapshots", str(tmp_path / "a"), "--out", str(tmp_path / "o"), "--cache-max", "1k"],
                   capsys)
    assert rc == 0 and "cache hit" in err  # reading is not limited by the cap


def test_one_layer_without_cache_reads_only_that_layer(tmp_path, monkeypatch):
    """--layer with --no-cache reads and computes the selected tensors only; with the cache on, every
    tensor is read once so that later runs for other layers read nothing."""
    _write_run(tmp_path / "ck", fmt="safetensors")
    from pylandscape.snapshots import SnapshotSet, discover
    sset_names = discover(tmp_path / "ck").spec.names
    seen: set = set()
    real = SnapshotSet.read_block

    def spy(self, rows, pieces, *a, **k):
        seen.update(t for t, _, _ in pieces)
        return real(self, rows, pieces, *a, **k)
    monkeypatch.setattr(SnapshotSet, "read_block", spy)
    from pylandscape.mds import pipeline
    real_map = pipeline.map_rows

    def spy_map(items, names, tensors):  # one chunk of safetensors: mapped, not read
        m = real_map(items, names, tensors)
        if m is not None:
            seen.update(m.columns)
        return m
    monkeypatch.setattr(pipeline, "map_rows", spy_map)
    res = mds.embed(tmp_path / "ck", layer="fc.*", cache=False, progress=False, max_memory=12 * 4 * 3 * 10)
    names = set(res.selected)
    assert names == {"fc.weight", "fc.bias"} and res.timings["read_chunks"] > 1
    assert {sset_names[t] for t in seen} == names
    seen.clear()
    res2 = mds.embed(tmp_path / "ck", layer="fc.*", cache=False, progress=False, max_memory=12 * 4 * 3 * 10)
    ref = mds.embed(tmp_path / "ck", cache=False, progress=False, layer="fc.*", max_memory="1G")
    np.testing.assert_allclose(res2.coords, ref.coords, rtol=0, atol=1e-12)
    seen.clear()
    mds.embed(tmp_path / "ck", layer="fc.*", progress=False)
    assert {sset_names[t] for t in seen} == set(sset_names)


def test_cache_written_before_embed_returns(tmp_path, monkeypatch):
    """The cache file is written in a thread while the MDS and the outputs run (a slow disk simulated):
    embed() returns only once the file is there, and then says "written"."""
    real = gram_cache.save

    def slow_save(*a, **k):
        time.sleep(1.0)
        return real(*a, **k)
    monkeypatch.setattr(gram_cache, "save", slow_save)
    _write_run(tmp_path / "ck", fmt="safetensors")
    res = mds.embed(tmp_path / "ck", cache_dir=tmp_path / "c", progress=False)
    assert res.timings["cache"] == "written"
    assert len(list((tmp_path / "c").glob("gram-v*.safetensors"))) == 1
