"""Where the independent units of an experiment run: in this process (default) or as Ray tasks.

An executor maps a function over argument tuples and yields the results as they finish. With Ray, each
call is a task (`num_gpus=gpus_per_task`, fractional allowed; torch threads = its CPUs); a task whose
worker or node dies is retried by Ray (`max_retries`), and arguments and results travel through Ray's
object store, so the workers need no shared file system. `train_units` sends each task a contiguous
slice of trajectories (by default the trajectories spread evenly over the cluster's task slots: a
task's start, its arguments and a worker's imports are paid once per slice, not once per trajectory,
measured in bench/results_ray_experiment.md), trains it in lockstep in a worker-local temporary store
and sends the snapshots back; only the driver writes the run folder, with the same atomic store.
Arguments shared by tasks (the data set, the model factory) go into the object store once per run and
are deserialised once per worker (cached there), not once per task.

Ray is an optional extra (`pip install .[ray]`); nothing here imports it until a RayExecutor is made.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import math
import tempfile
from collections import OrderedDict
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
    #: trajectories per task in train_units (None: spread evenly over slots())
    unit_size: int | None = None

    def slots(self) -> int:
        """How many calls run at once."""
        return 1

    def imap(self, fn: Callable, arg_list: Sequence[tuple]) -> Iterator[tuple[int, Any]]:
        """(index, fn(*args)) as each call finishes (in-process: in order)."""
        for i, args in enumerate(arg_list):
            yield i, fn(*args)

    def close(self) -> None:
        pass


class _Shared:
    """An argument shared by several tasks: its object-store ref, nested so that Ray passes the ref and
    the worker resolves it through its cache (_WORKER_CACHE) instead of deserialising it per task."""

    def __init__(self, ref):
        self.ref = ref


#: in a Ray worker: the shared arguments it has deserialised, by object id (the few most recent)
_WORKER_CACHE: OrderedDict[str, Any] = OrderedDict()
_WORKER_CACHE_SIZE = 8


def _resolve(a):
    if not isinstance(a, _Shared):
        return a
    key = a.ref.hex()
    if key in _WORKER_CACHE:
        _WORKER_CACHE.move_to_end(key)
        return _WORKER_CACHE[key]
    import ray
    obj = _WORKER_CACHE[key] = ray.get(a.ref)
    while len(_WORKER_CACHE) > _WORKER_CACHE_SIZE:
        _WORKER_CACHE.popitem(last=False)
    return obj


def _call(threads: int, fn: Callable, *args):
    """The Ray task: torch threads = the task's CPUs (a reused worker may have run a task of another
    size), shared arguments from the worker's cache, then fn(*args)."""
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return fn(*[_resolve(a) for a in args])


def _warm() -> int:
    """Import what a unit needs before the first unit arrives: pylandscape's trainer, and torch._dynamo,
    which torch's first optimizer imports lazily (about 1.2 s on this 2-core VM, measured with cProfile:
    most of a fresh worker's first unit)."""
    import os

    import torch._dynamo  # noqa: F401

    from .. import train  # noqa: F401
    return os.getpid()


class RayExecutor(Executor):
    """Ray tasks: one per args tuple. address: None (a local Ray of num_cpus CPUs), "auto" (the running
    cluster) or "ray://host:port" (Ray Client). cpus_per_task: CPUs per task, also its torch threads.
    unit_size: trajectories per task in train_units (None: spread evenly over the task slots)."""

    name = "ray"

    def __init__(self, address: str | None = None, gpus_per_task: float = 0.0, num_cpus: int | None = None,
                 cpus_per_task: float = 1.0, max_retries: int = 3, unit_size: int | None = None):
        try:
            import ray  # optional dependency: the [ray] extra
        except ImportError as e:
            raise ValueError("--executor ray needs Ray: pip install 'pylandscape[ray]' (or pip install ray)") from e
        self.ray = ray
        if gpus_per_task < 0:
            raise ValueError(f"--gpus-per-task must be >= 0, got {gpus_per_task}")
        if cpus_per_task <= 0:
            raise ValueError(f"--cpus-per-task must be > 0, got {cpus_per_task}")
        if unit_size is not None and unit_size < 1:
            raise ValueError(f"--unit-size must be >= 1, got {unit_size}")
        self.unit_size = unit_size
        self.options = {"num_gpus": float(gpus_per_task), "num_cpus": float(cpus_per_task),
                        "max_retries": int(max_retries)}
        self.threads = max(1, int(cpus_per_task))
        self.started = False
        self._shared: dict[int, tuple[Any, Any]] = {}  # id(obj) -> (obj, ref): put once per run
        if not ray.is_initialized():
            kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
            if address:
                kw["address"] = address
            elif num_cpus is not None:
                kw["num_cpus"] = int(num_cpus)
            ray.init(**kw)
            self.started = True
        # start every worker's imports now, while the driver loads data and builds the first unit
        warm = ray.remote(_warm).options(num_cpus=self.options["num_cpus"], num_gpus=self.options["num_gpus"])
        self._warm = [warm.remote() for _ in range(min(self.slots(), 64))]

    def slots(self) -> int:
        res = self.ray.cluster_resources()
        n = res.get("CPU", 1.0) / self.options["num_cpus"]
        if self.options["num_gpus"] > 0:
            n = min(n, res.get("GPU", 0.0) / self.options["num_gpus"])
        return max(1, int(n + 1e-9))

    def imap(self, fn: Callable, arg_list: Sequence[tuple]) -> Iterator[tuple[int, Any]]:
        remote = self.ray.remote(_call).options(**self.options)
        # an argument shared by several tasks (the data set, the model factory) goes into the object
        # store once per run (kept while later calls still pass it), not once per task or per call
        count: dict[int, int] = {}
        for args in arg_list:
            for a in args:
                if not isinstance(a, (int, float, str, bool, type(None))):
                    count[id(a)] = count.get(id(a), 0) + 1
        shared: dict[int, tuple[Any, Any]] = {}
        for args in arg_list:
            for a in args:
                if count.get(id(a), 0) > 1 and id(a) not in shared:
                    old = self._shared.get(id(a))
                    shared[id(a)] = old if old is not None and old[0] is a else (a, self.ray.put(a))
        self._shared = shared  # holds the objects, so their ids are not reused while cached
        refs = [remote.remote(self.threads, fn, *[_Shared(shared[id(a)][1]) if id(a) in shared else a
                                                   for a in args]) for args in arg_list]
        index = {ref: i for i, ref in enumerate(refs)}
        pending = list(refs)
        while pending:
            done, pending = self.ray.wait(pending, num_returns=1)
            yield index[done[0]], self.ray.get(done[0])

    def close(self) -> None:
        self._shared = {}
        if self.started and self.ray.is_initialized():
            self.ray.shutdown()
            self.started = False


def make_executor(name: str = "inprocess", *, address: str | None = None, gpus_per_task: float = 0.0,
                  num_cpus: int | None = None, cpus_per_task: float = 1.0,
                  unit_size: int | None = None) -> Executor:
    if name == "inprocess":
        return Executor()
    if name == "ray":
        return RayExecutor(address=address, gpus_per_task=gpus_per_task, num_cpus=num_cpus,
                           cpus_per_task=cpus_per_task, unit_size=unit_size)
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


def _train_slice(make, starts: torch.Tensor, data, tconfig, seeds: list[int], metas: list[dict]
                 ) -> list[tuple[list[dict], list[tuple[dict, torch.Tensor]]]]:
    """S trajectories in lockstep (train_many's loop route: bit-identical to S separate runs) in a
    worker-local temporary store; returns per trajectory (history, [(metadata, flat weights)])."""
    with tempfile.TemporaryDirectory(prefix="pylandscape-unit-") as tmp:
        hists = train_many(make, starts, data, tconfig, seeds=seeds, store=Path(tmp) / "store",
                           metas=metas, resume=False, progress=False, route="loop")
        st = SnapshotStore(Path(tmp) / "store")
        snaps: list[list[tuple[dict, torch.Tensor]]] = [[] for _ in metas]
        for i, e in enumerate(st.entries):
            meta = {k: v for k, v in e.items() if k not in ("index", "file")}
            k = next(j for j, m in enumerate(metas) if all(meta.get(f) == m[f] for f in IDENTITY_FIELDS if f in m))
            snaps[k].append((meta, st.load_flat(i).clone()))
    return list(zip(hists, snaps))


def _unit_name(meta: dict) -> str:
    key = "-".join(f"{k}={meta[k]}" for k in IDENTITY_FIELDS if k in meta)
    return key.replace("/", "_") or "unit"


def slices(n: int, unit_size: int | None, slots: int) -> list[range]:
    """Contiguous slices of range(n): unit_size each, or (None) n spread evenly over `slots`."""
    if n == 0:
        return []
    size = unit_size or math.ceil(n / max(1, slots))
    parts = math.ceil(n / size)
    bounds = [round(i * n / parts) for i in range(parts + 1)]  # equal sizes within one
    return [range(bounds[i], bounds[i + 1]) for i in range(parts)]


def train_units(executor: Executor, make, starts: torch.Tensor, data, tconfig, store: SnapshotStore, *,
                seeds: Sequence[int], metas: Sequence[dict]) -> list[list[dict]]:
    """K trajectories, each a unit, sent to the executor as contiguous slices of units (one task each;
    executor.unit_size units per task, default spread evenly over its slots). Bit-identical on CPU to
    train_many's lockstep loop with the same thread count: each trajectory keeps its seed. Finished units
    (their history in <store>/units/) are skipped; a slice's snapshots are appended by the driver only
    when the slice has returned, in unit order, skipping any already in the store (a driver killed while
    appending), so nothing is lost or duplicated. Returns the K histories."""
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
    parts = [[todo[i] for i in r] for r in slices(len(todo), executor.unit_size, executor.slots())]
    args = [(make, starts[ks].detach().cpu(), data, tconfig, [int(seeds[k]) for k in ks], [dict(metas[k]) for k in ks])
            for ks in parts]
    waiting: dict[int, list] = {}
    nxt = 0
    for i, res in executor.imap(_train_slice, args):
        waiting[i] = res
        while nxt in waiting:  # written in unit order whatever order they finish in: a stable store
            for k, (hist, snaps) in zip(parts[nxt], waiting.pop(nxt)):
                for meta, flat in snaps:
                    key = {f: meta[f] for f in (*IDENTITY_FIELDS, "epoch", "step") if f in meta}
                    if not store.select(**key):
                        store.append(flat, **meta)
                atomic_write_json(units_dir / f"{_unit_name(metas[k])}.json", hist)
                hists[k] = hist
            nxt += 1
    return hists  # type: ignore[return-value]
