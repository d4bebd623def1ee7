"""Where the independent units of an experiment run: in this process (default) or as Ray tasks.

An executor maps a function over argument tuples and yields the results as they finish. With Ray, each
call is a task (`num_gpus=gpus_per_task`, fractional allowed); a task whose worker or node dies is
retried by Ray (`max_retries`), and arguments and results travel through Ray's object store, so the
workers need no shared file system: `train_units` trains each trajectory in a worker-local temporary
store and sends its snapshots back; only the driver writes the run folder, with the same atomic store.

Ray is an optional extra (`pip install .[ray]`); nothing here imports it until a RayExecutor is made.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from ..store import SnapshotStore, atomic_write_json
from ..train import train_many
from ..train.resume import IDENTITY_FIELDS

EXECUTORS = ("inprocess", "ray")
#: the executor `train_units` uses unless given one (set for the duration of a run by use_executor)
_CURRENT: contextvars.ContextVar["Executor | None"] = contextvars.ContextVar("pylandscape_executor", default=None)
#: sidecar folder in a store: the history of each finished unit (what --resume reads back)
UNITS_DIR = "units"


class Executor:
    """In-process: fn(*args) for each args tuple, in order."""

    name = "inprocess"

    def imap(self, fn: Callable, arg_list: Sequence[tuple]) -> Iterator[tuple[int, Any]]:
        """(index, fn(*args)) as each call finishes (in-process: in order)."""
        for i, args in enumerate(arg_list):
            yield i, fn(*args)

    def close(self) -> None:
        pass


class RayExecutor(Executor):
    """Ray tasks: one per args tuple. address: None (a local Ray of num_cpus CPUs), "auto" (the running
    cluster) or "ray://host:port" (Ray Client)."""

    name = "ray"

    def __init__(self, address: str | None = None, gpus_per_task: float = 0.0, num_cpus: int | None = None,
                 cpus_per_task: float = 1.0, max_retries: int = 3):
        try:
            import ray  # optional dependency: the [ray] extra
        except ImportError as e:
            raise ValueError("--executor ray needs Ray: pip install 'pylandscape[ray]' (or pip install ray)") from e
        self.ray = ray
        if gpus_per_task < 0:
            raise ValueError(f"--gpus-per-task must be >= 0, got {gpus_per_task}")
        self.options = {"num_gpus": float(gpus_per_task), "num_cpus": float(cpus_per_task),
                        "max_retries": int(max_retries)}
        self.started = False
        if not ray.is_initialized():
            kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
            if address:
                kw["address"] = address
            elif num_cpus is not None:
                kw["num_cpus"] = int(num_cpus)
            ray.init(**kw)
            self.started = True

    def imap(self, fn: Callable, arg_list: Sequence[tuple]) -> Iterator[tuple[int, Any]]:
        remote = self.ray.remote(fn).options(**self.options)
        # an argument shared by several tasks (the data set, the model factory) goes into the object
        # store once, not once per task
        count: dict[int, int] = {}
        for args in arg_list:
            for a in args:
                if not isinstance(a, (int, float, str, bool, type(None))):
                    count[id(a)] = count.get(id(a), 0) + 1
        put = {}
        for args in arg_list:
            for a in args:
                if count.get(id(a), 0) > 1 and id(a) not in put:
                    put[id(a)] = self.ray.put(a)
        refs = [remote.remote(*[put.get(id(a), a) for a in args]) for args in arg_list]
        index = {ref: i for i, ref in enumerate(refs)}
        pending = list(refs)
        while pending:
            done, pending = self.ray.wait(pending, num_returns=1)
            yield index[done[0]], self.ray.get(done[0])

    def close(self) -> None:
        if self.started and self.ray.is_initialized():
            self.ray.shutdown()
            self.started = False


def make_executor(name: str = "inprocess", *, address: str | None = None, gpus_per_task: float = 0.0,
                  num_cpus: int | None = None) -> Executor:
    if name == "inprocess":
        return Executor()
    if name == "ray":
        return RayExecutor(address=address, gpus_per_task=gpus_per_task, num_cpus=num_cpus)
    raise ValueError(f"--executor must be one of {EXECUTORS}, got {name!r}")


@contextlib.contextmanager
def use_executor(executor: Executor):
    """Make `executor` the one train_units uses inside the with-block (no global state left behind)."""
    token = _CURRENT.set(executor)
    try:
        yield executor
    finally:
        _CURRENT.reset(token)


def current_executor() -> Executor | None:
    return _CURRENT.get()


def _train_unit(make, start: torch.Tensor, data, tconfig, seed: int, meta: dict) -> tuple[list[dict], list[tuple[dict, torch.Tensor]]]:
    """One trajectory in a worker-local temporary store; returns (history, [(metadata, flat weights)])."""
    with tempfile.TemporaryDirectory(prefix="pylandscape-unit-") as tmp:
        hist = train_many(make, start.unsqueeze(0), data, tconfig, seeds=[seed], store=Path(tmp) / "store",
                          metas=[meta], resume=False, progress=False, route="loop")[0]
        st = SnapshotStore(Path(tmp) / "store")
        snaps = [({k: v for k, v in e.items() if k not in ("index", "file")}, st.load_flat(i).clone())
                 for i, e in enumerate(st.entries)]
    return hist, snaps


def _unit_name(meta: dict) -> str:
    key = "-".join(f"{k}={meta[k]}" for k in IDENTITY_FIELDS if k in meta)
    return key.replace("/", "_") or "unit"


def train_units(executor: Executor, make, starts: torch.Tensor, data, tconfig, store: SnapshotStore, *,
                seeds: Sequence[int], metas: Sequence[dict]) -> list[list[dict]]:
    """K trajectories as K units (bit-identical on CPU to train_many's lockstep loop: same seeds per
    trajectory). Finished units (their history in <store>/units/) are skipped; a unit's snapshots are
    appended by the driver only when the unit has returned, skipping any already in the store (a driver
    killed while appending), so nothing is lost or duplicated. Returns the K histories."""
    units_dir = store.root / UNITS_DIR
    hists: list[list[dict] | None] = [None] * len(metas)
    todo = []
    for k, meta in enumerate(metas):
        f = units_dir / f"{_unit_name(meta)}.json"
        if f.exists():
            hists[k] = json.loads(f.read_text())
        else:
            todo.append(k)
    units_dir.mkdir(parents=True, exist_ok=True)
    args = [(make, starts[k].detach().cpu(), data, tconfig, int(seeds[k]), dict(metas[k])) for k in todo]
    waiting: dict[int, tuple] = {}
    nxt = 0
    for i, res in executor.imap(_train_unit, args):
        waiting[i] = res
        while nxt in waiting:  # written in unit order whatever order they finish in: a stable store
            k, (hist, snaps) = todo[nxt], waiting.pop(nxt)
            for meta, flat in snaps:
                key = {f: meta[f] for f in (*IDENTITY_FIELDS, "epoch", "step") if f in meta}
                if not store.select(**key):
                    store.append(flat, **meta)
            atomic_write_json(units_dir / f"{_unit_name(metas[k])}.json", hist)
            hists[k] = hist
            nxt += 1
    return hists  # type: ignore[return-value]
