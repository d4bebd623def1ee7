"""Experiments on Ray (pylandscape.distributed.executor) with a local Ray of 2 CPUs: a run is
bit-identical to the in-process one, --resume skips finished units, and a worker killed mid-unit is
retried with nothing lost or duplicated. Skipped without the [ray] extra."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import pylandscape

ray = pytest.importorskip("ray", reason="the Ray tests need the [ray] extra (pip install .[ray])")

from pylandscape.distributed.executor import RayExecutor, UNITS_DIR  # noqa: E402
from pylandscape.experiments import cli as run_cli  # noqa: E402
from pylandscape.store import SnapshotStore  # noqa: E402

SETS = ["--set", "stages=2", "--set", "trajectories=3", "--set", "unperturbed=1", "--set", "epochs_per_stage=1",
        "--set", "train_size=100", "--set", "late_from_stage=2", "--set", "mds_layers=2", "--set", "threads=1"]


@pytest.fixture(scope="module")
def local_ray():
    # workers import pylandscape (installed, or this checkout under PYTHONPATH) and this test module
    paths = [str(Path(pylandscape.__file__).resolve().parents[1]), str(Path(__file__).resolve().parent),
             os.environ.get("PYTHONPATH")]
    ray.init(num_cpus=2, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, paths)),
                                       "OMP_NUM_THREADS": "1"}})
    yield
    ray.shutdown()


def _snapshots(out: Path) -> dict:
    got = {}
    for s in (1, 2):
        st = SnapshotStore(out / "stores" / f"stage_{s:02d}")
        for i, e in enumerate(st.entries):
            key = (s, e["trajectory"], e["epoch"], e["step"])
            assert key not in got, f"duplicated snapshot {key}"
            got[key] = ({k: v for k, v in e.items() if k not in ("index", "file")}, st.load_flat(i))
    return got


def _die_once(marker: str, i: int) -> int:
    if i == 1 and not os.path.exists(marker):
        Path(marker).write_text("killed")
        os._exit(1)  # the worker process dies mid-unit
    return i * i


def test_killed_worker_is_retried(local_ray, tmp_path):
    ex = RayExecutor()
    got = dict(ex.imap(_die_once, [(str(tmp_path / "m"), i) for i in range(3)]))
    assert got == {0: 0, 1: 1, 2: 4}
    assert (tmp_path / "m").exists()  # the first attempt of unit 1 really died


class Counted:
    """Counts its deserialisations in the process that loads it."""
    loads = 0

    def __init__(self, payload):
        self.payload = payload

    def __setstate__(self, state):
        type(self).loads += 1
        self.__dict__.update(state)


def _probe(shared: Counted, i: int) -> tuple[int, int, int]:
    return os.getpid(), Counted.loads, torch.get_num_threads()


def test_shared_argument_loaded_once_per_worker_and_threads_follow_cpus(local_ray):
    ex = RayExecutor(cpus_per_task=2)  # one slot of 2 CPUs: every task on one worker, in turn
    assert ex.slots() == 1
    shared = Counted(list(range(1000)))
    for _ in range(2):  # a second call with the same object: still one load (put once per run)
        got = dict(ex.imap(_probe, [(shared, i) for i in range(4)]))
        assert {t for _, _, t in got.values()} == {2}  # torch threads = the task's CPUs
        for pid in {p for p, _, _ in got.values()}:
            assert max(n for p, n, _ in got.values() if p == pid) == 1, got


def test_ray_run_is_bit_identical_and_resumes(local_ray, tmp_path):
    assert run_cli.main(["sgd-stages", *SETS, "--out", str(tmp_path / "local")]) == 0
    assert run_cli.main(["sgd-stages", *SETS, "--out", str(tmp_path / "ray"), "--executor", "ray"]) == 0
    a, b = _snapshots(tmp_path / "local"), _snapshots(tmp_path / "ray")
    assert a.keys() == b.keys() and len(a) == 12
    for k in a:
        assert a[k][0] == b[k][0], k                 # metadata (errors, losses) identical
        assert torch.equal(a[k][1], b[k][1]), k      # weights bit for bit
    for f in ("stage_01.csv", "stage_02.csv"):
        assert (tmp_path / "local" / "metrics" / f).read_text() == (tmp_path / "ray" / "metrics" / f).read_text()
    # --resume after a unit lost: only that unit is retrained, nothing duplicated
    units = sorted((tmp_path / "ray" / "stores" / "stage_02" / UNITS_DIR).glob("*.json"))
    assert len(units) == 3
    units[1].unlink()
    (tmp_path / "ray" / "progress.json").write_text('{"stage1": true}\n')
    assert run_cli.main(["sgd-stages", *SETS, "--out", str(tmp_path / "ray"), "--executor", "ray", "--resume"]) == 0
    c = _snapshots(tmp_path / "ray")
    assert c.keys() == a.keys() and all(torch.equal(a[k][1], c[k][1]) for k in a)
