"""The Gram across torch.distributed ranks (pylandscape.distributed.gram), gloo on this machine:
the plan covers every panel pair once, 2 ranks give the single-process Gram bit for bit, the
`--distributed` command line gives the single-process map, and a rank that cannot read a file stops
every rank with that file's name (no hang: bounded by a timeout)."""
from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import pylandscape
from pylandscape import mds
from pylandscape.distributed import local_gram, make_plan
from pylandscape.ops import segment_gram
from pylandscape.snapshots import open_source

HERE = Path(__file__).resolve().parent
TIMEOUT = 240


def _env() -> dict:
    env = dict(os.environ)
    pkg_parent = str(Path(pylandscape.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([pkg_parent, str(HERE)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["OMP_NUM_THREADS"] = "1"
    env["PYLANDSCAPE_DIST_TIMEOUT"] = "120"
    return env


def _torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)


def _write_run(folder: Path, n_traj=3, n=9, seed=0, nan_at=None) -> None:
    """Nearly parallel snapshots (small steps): where a plain fp32 Gram would lose 1 - cos."""
    g = torch.Generator().manual_seed(seed)
    for t in range(n_traj):
        d = folder / f"run{t}"
        d.mkdir(parents=True, exist_ok=True)
        sd = {"conv.weight": torch.randn(8, 3, 3, 3, generator=g), "conv.bias": torch.randn(8, generator=g),
              "fc.weight": torch.randn(10, 72, generator=g), "fc.bias": torch.randn(10, generator=g)}
        for e in range(n):
            for v in sd.values():
                v.add_(1e-3 * torch.randn(v.shape, generator=g))
            cur = {k: v.clone() for k, v in sd.items()}
            if nan_at == (t, e):
                cur["fc.weight"][0, 0] = float("nan")
            save_file(cur, d / f"epoch_{e}.safetensors")


@pytest.mark.parametrize("n,world,rows", [(1, 1, 4), (27, 2, 4), (27, 3, 5), (10, 4, 3), (30, 5, 2), (5, 4, 4)])
def test_plan_covers_each_pair_once(n, world, rows):
    plan = make_plan(n, world, rows)
    q = len(plan.panels)
    seen = [pq for r in range(world) for pq in plan.pairs(r)]
    assert sorted(seen) == [(i, j) for i in range(q) for j in range(i, q)]
    covered = np.zeros(n, dtype=int)
    for r in range(world):
        a, b = plan.rows_of(r)
        covered[a:b] += 1
    assert (covered == 1).all()  # every snapshot read by exactly one rank


def test_local_gram_matches_kernel_and_float64(tmp_path):
    _write_run(tmp_path / "ck")
    sset = open_source(tmp_path / "ck")
    rows = list(range(len(sset)))
    G = local_gram(sset, rows, panel_rows=4, cols=300)   # several panels and column chunks
    X = torch.from_numpy(sset.read_block(rows, sset.plan_pieces(0, sset.spec.numel)))
    offs = sset.spec.offsets
    ref = segment_gram(X, offs)
    X64 = X.double()
    exact = torch.stack([X64[:, a:b] @ X64[:, a:b].T for a, b in zip(offs[:-1].tolist(), offs[1:].tolist())])
    scale = torch.diagonal(exact, dim1=1, dim2=2)
    rel = ((G - exact).abs() / torch.sqrt(scale[:, :, None] * scale[:, None, :])).max()
    assert rel < 1e-14, rel
    # the one-call kernel has other 256-row blocks, hence other reference rows: both agree with float64
    # within the kernel's certificate, 2.5e-4 of sqrt(n_i n_j) - G_ij (plus rounding), not bit for bit
    gap = torch.sqrt(scale[:, :, None] * scale[:, None, :]) - exact
    for got in (G, ref):
        assert ((got - exact).abs() <= 2.5e-4 * gap + 1e-13 * scale.max()).all()
    assert torch.equal(G, G.transpose(1, 2))


def test_two_gloo_ranks_give_the_single_process_gram_bit_for_bit(tmp_path):
    _write_run(tmp_path / "ck")
    out = tmp_path / "G.pt"
    r = _torchrun([str(HERE / "_dist_worker.py"), str(tmp_path / "ck"), str(out), "4", "300"])
    assert r.returncode == 0, r.stderr[-3000:]
    G = torch.load(out, weights_only=True)["G"]
    sset = open_source(tmp_path / "ck")
    ref = local_gram(sset, list(range(len(sset))), panel_rows=4, cols=300)
    assert torch.equal(G, ref)  # same panels and chunks = same kernel calls = same bits


def test_distributed_cli_matches_single_process_map(tmp_path, capsys):
    _write_run(tmp_path / "ck")
    rc = mds.main(["--snapshots", str(tmp_path / "ck"), "--out", str(tmp_path / "one"), "--no-progress",
                   "--no-cache"])
    assert rc == 0, capsys.readouterr().err
    r = _torchrun(["-m", "pylandscape.mds", "--snapshots", str(tmp_path / "ck"), "--out", str(tmp_path / "two"),
                   "--no-progress", "--distributed", "--max-memory", "64K"])
    assert r.returncode == 0, r.stderr[-3000:]
    one = list(csv.DictReader(open(tmp_path / "one" / "mds.csv")))
    two = list(csv.DictReader(open(tmp_path / "two" / "mds.csv")))
    assert [row["path"] for row in one] == [row["path"] for row in two]
    for axis in ("x", "y"):
        a = np.array([float(row[axis]) for row in one])
        b = np.array([float(row[axis]) for row in two])
        b *= 1.0 if a @ b >= 0 else -1.0
        # other panels = other kernel reference rows: the Grams agree within the kernel's certificate
        # (2.5e-4 of 1 - cos), so the maps agree to ~1e-7, not bit for bit
        np.testing.assert_allclose(b, a, atol=1e-6 * np.abs(a).max())


def test_unreadable_file_on_one_rank_stops_every_rank(tmp_path):
    # the last trajectory's rows belong to rank 1; its NaN is found only when rank 1 reads
    _write_run(tmp_path / "ck", nan_at=(2, 5))
    r = _torchrun([str(HERE / "_dist_worker.py"), str(tmp_path / "ck"), str(tmp_path / "G.pt"), "4", "300"])
    assert r.returncode != 0
    # both ranks stopped with the message naming rank 1's file (the two ranks write to one stderr at once,
    # so their lines may interleave: match the messages, not lines)
    said = re.findall(r"rank (\d) error: rank 1: run2/epoch_5\.safetensors: NaN", r.stderr)
    assert sorted(said) == ["0", "1"], r.stderr[-3000:]
    assert not (tmp_path / "G.pt").exists()
