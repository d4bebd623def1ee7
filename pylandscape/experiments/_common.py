"""Shared plumbing of the experiment modules: output folder layout, config files, metrics, resumability.

Layout of an experiment's output folder (`--out`)::

    config.json        {"experiment": NAME, "preset": ..., "config": {...}}: what `plot` and `--resume` read
    progress.json      units of work already finished (a resumed run skips them) with their small results
    metrics/*.csv|json per-epoch / per-model numbers, one table per file (CSV for spreadsheets, JSON for code)
    stores/<name>/     SnapshotStore folders (safetensors + manifest.jsonl)
    figures/*.png      what `python -m pylandscape plot OUT` redraws from the files above
    results.json       the headline numbers of the run
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import sys
import time
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from ..devices import resolve_device
from ..store import SnapshotStore, atomic_write_bytes, atomic_write_json

CONFIG = "config.json"
PROGRESS = "progress.json"
RESULTS = "results.json"


# ---------------------------------------------------------------------------------------------
# config (de)serialisation and --set overrides
# ---------------------------------------------------------------------------------------------

def config_to_dict(config: Any) -> dict:
    d = dataclasses.asdict(config)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Turn a JSON value or a command-line string into the field's declared type."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or origin is types.UnionType:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        last = None
        for a in inner:
            try:
                return _coerce(value, a, name)
            except ValueError as e:
                last = e
        raise last or ValueError(f"{name}: cannot read {value!r}")
    if origin in (tuple, list):
        if isinstance(value, str):
            s = value.strip().strip("()[]")
            items = [x.strip() for x in s.split(",") if x.strip()] if s else []
        else:
            items = list(value)
        elem = args[0] if args else Any
        return tuple(_coerce(x, elem, name) for x in items) if origin is tuple else [
            _coerce(x, elem, name) for x in items]
    if tp is bool:
        if isinstance(value, bool):
            return value
        s = str(value).strip().lower()
        if s in ("1", "true", "yes", "on"):
            return True
        if s in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{name}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ValueError(f"{name}: expected an integer, got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name}: expected an integer, got {value!r}") from None
        if f != int(f):
            raise ValueError(f"{name}: expected an integer, got {value!r}")
        return int(f)
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name}: expected a number, got {value!r}") from None
    if tp is str:
        return str(value)
    return value


def config_from_dict(cls: type, d: Mapping[str, Any]) -> Any:
    """Rebuild a Config dataclass from its JSON form; unknown keys are an error that names them."""
    types = _field_types(cls)
    unknown = sorted(set(d) - set(types))
    if unknown:
        raise ValueError(f"unknown config field(s) {', '.join(unknown)} for {cls.__module__}.{cls.__name__}")
    return cls(**{k: _coerce(v, types[k], k) for k, v in d.items()})


def apply_overrides(config: Any, sets: Iterable[str]) -> Any:
    """`field=value` strings (from --set) applied to a copy of the config, with type checking."""
    types = _field_types(type(config))
    changes = {}
    for item in sets:
        if "=" not in item:
            raise ValueError(f"--set expects field=value, got {item!r}")
        key, value = item.split("=", 1)
        key = key.strip().replace("-", "_")
        if key not in types:
            raise ValueError(f"unknown field {key!r}; fields are: {', '.join(types)}")
        changes[key] = _coerce(value, types[key], key)
    return dataclasses.replace(config, **changes)


def describe_fields(config: Any) -> list[tuple[str, str]]:
    return [(f.name, json.dumps(v) if not isinstance(v, str) else v)
            for f, v in ((f, getattr(config, f.name)) for f in dataclasses.fields(config))]


# ---------------------------------------------------------------------------------------------
# output folder: config, progress (resumability), metrics, results
# ---------------------------------------------------------------------------------------------

def prepare_out(out_dir: str | Path, name: str, config: Any, *, preset: str | None = None,
                resume: bool = False) -> Path:
    """Create the folder and write config.json; refuse to mix two different configs in one folder."""
    out = Path(out_dir)
    path = out / CONFIG
    new = {"experiment": name, "preset": preset, "config": config_to_dict(config)}
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("experiment") != name:
            raise ValueError(f"{path}: folder holds a {old.get('experiment')!r} run, not {name!r}; "
                             f"use another --out")
        if old.get("config") != new["config"]:
            diff = sorted(k for k in set(old.get("config", {})) | set(new["config"])
                          if old.get("config", {}).get(k) != new["config"].get(k))
            raise ValueError(f"{path}: folder was run with other settings ({', '.join(diff)}); "
                             f"use another --out, or the same settings with --resume")
        if not resume and (out / PROGRESS).exists() and json.loads((out / PROGRESS).read_text()):
            raise ValueError(f"{out} already holds a run; add --resume to continue it or use another --out")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, new)
    return out


def read_config(out_dir: str | Path) -> tuple[str, dict]:
    path = Path(out_dir) / CONFIG
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: {out_dir} is not an experiment output folder")
    d = json.loads(path.read_text())
    return d["experiment"], d["config"]


def load_config(out_dir: str | Path, cls: type) -> Any:
    return config_from_dict(cls, read_config(out_dir)[1])


class Progress:
    """progress.json: which units of work are finished, with the small results each produced.

    A unit is marked done only after everything it writes is on disk, so a killed run redoes at most
    the unit it was in (stores and metrics of that unit are rewritten, not appended twice)."""

    def __init__(self, out_dir: str | Path):
        self.path = Path(out_dir) / PROGRESS
        self.done: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {}
        if not self.path.exists():
            atomic_write_json(self.path, self.done)

    def __contains__(self, unit: str) -> bool:
        return unit in self.done

    def get(self, unit: str, default: Any = None) -> Any:
        return self.done.get(unit, default)

    def mark(self, unit: str, result: Any = True) -> None:
        self.done[unit] = result
        atomic_write_json(self.path, self.done)


def write_table(path_stem: str | Path, rows: list[Mapping[str, Any]]) -> None:
    """Write rows as `<stem>.csv` and `<stem>.json` (atomically); columns are the union of keys."""
    stem = Path(path_stem)
    rows = [dict(r) for r in rows]
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _plain(v) for k, v in r.items()})
    atomic_write_bytes(stem.with_suffix(".csv"), buf.getvalue().encode())
    atomic_write_json(stem.with_suffix(".json"), [{k: _plain(v) for k, v in r.items()} for r in rows])


def read_table(path_stem: str | Path) -> list[dict]:
    p = Path(path_stem).with_suffix(".json")
    if not p.exists():
        raise FileNotFoundError(f"{p} not found (was the run finished?)")
    return json.loads(p.read_text())


def write_results(out_dir: str | Path, results: Mapping[str, Any]) -> None:
    atomic_write_json(Path(out_dir) / RESULTS, {k: _plain(v) for k, v in results.items()})


def read_results(out_dir: str | Path) -> dict:
    p = Path(out_dir) / RESULTS
    if not p.exists():
        raise FileNotFoundError(f"{p} not found (was the run finished?)")
    return json.loads(p.read_text())


def _plain(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if hasattr(v, "tolist"):
        return v.tolist()
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    if isinstance(v, list):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# stores
# ---------------------------------------------------------------------------------------------

def store_dir(out_dir: str | Path, name: str) -> Path:
    return Path(out_dir) / "stores" / name


def fresh_store(path: str | Path, spec, info: Mapping[str, Any] | None = None) -> SnapshotStore:
    """An empty store at `path`: leftovers of an interrupted unit are removed so the unit is redone whole."""
    import shutil
    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    return SnapshotStore(path, spec, info=info)


def last_index(store: SnapshotStore, **where: Any) -> int:
    idx = store.select(**where)
    if not idx:
        raise ValueError(f"{store.root}: no snapshot with {where}")
    return max(idx, key=lambda i: (store.entries[i].get("epoch", 0) or 0, i))


# ---------------------------------------------------------------------------------------------
# small numeric helpers (pure torch; the heavy lifting is in pylandscape.ops)
# ---------------------------------------------------------------------------------------------

def set_threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(int(n))


def generator(seed: int) -> torch.Generator:
    """A CPU torch.Generator seeded with `seed`."""
    g = torch.Generator()
    g.manual_seed(int(seed))
    return g


# ---------------------------------------------------------------------------------------------
# data, model, training and evaluation shared by the experiments
# ---------------------------------------------------------------------------------------------

_UNSET = object()


def load_data(config: Any, *, labels: str = "true", inputs: str = "real", seed: int | None = None,
              train_size: Any = _UNSET):
    """The config's data set (fields dataset, data_root, train_size, seed, device)."""
    from ..data import load_dataset
    n = getattr(config, "train_size", None) if train_size is _UNSET else train_size
    return load_dataset(config.dataset, getattr(config, "data_root", None), train_size=n, labels=labels, inputs=inputs,
                        seed=config.seed if seed is None else seed,
                        device=str(resolve_device(getattr(config, "device", "cpu"))))


def model_fn(config: Any, data, *, width: float | None = None, activation: str | None = None,
             poly_degree: int | None = None):
    """A zero-argument constructor of the paper's network shaped for `data` (for train_many)."""
    from ..models import dcnn
    x = data.x_train
    w = config.width if width is None else width
    act = activation or getattr(config, "activation", "relu")
    deg = poly_degree or getattr(config, "poly_degree", 2)
    device = str(resolve_device(getattr(config, "device", "cpu")))

    def make():
        return dcnn(width=w, in_channels=int(x.shape[1]), num_classes=int(data.num_classes),
                    image_size=int(x.shape[-1]), activation=act, poly_degree=deg).to(device)
    return make


def init_flat(make, seed: int):
    """(model, flat [P], spec) of a freshly initialised network, reproducible from `seed`."""
    from ..flat import flatten_module
    torch.manual_seed(int(seed))
    model = make()
    flat, spec = flatten_module(model)
    return model, flat.clone(), spec


def train_config(config: Any, **kw: Any):
    """A TrainConfig from the experiment's config fields of the same name, updated with kw."""
    from ..train import TrainConfig
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    base = {n: getattr(config, n) for n in names if hasattr(config, n) and n not in kw}
    base.update(kw)
    base["device"] = str(resolve_device(base.get("device", "cpu")))
    if isinstance(base.get("snapshot_epochs"), tuple):
        base["snapshot_epochs"] = list(base["snapshot_epochs"])
    return TrainConfig(**base)


def evaluate_flats(make, flats: torch.Tensor, data, *, test: bool = True) -> dict[str, list[float]]:
    """Train (and test) error and loss of K weight vectors [K, P] in one batch, BatchNorm re-estimated
    on the training set for each vector."""
    from ..evaluate import evaluate_many
    model = make()
    flats = flats.to(next(model.parameters()).device)
    out = {}
    e, l = evaluate_many(model, flats, data.x_train, data.y_train, bn="reestimate", bn_x=data.x_train)
    out["train_error"], out["train_loss"] = e.tolist(), l.tolist()
    if test:
        e, l = evaluate_many(model, flats, data.x_test, data.y_test, bn="reestimate", bn_x=data.x_train)
        out["test_error"], out["test_loss"] = e.tolist(), l.tolist()
    return out


def run_train(make, start: torch.Tensor, data, tconfig, store_path: Path, *, meta: dict,
              resume: bool, info: Mapping[str, Any] | None = None) -> list[dict]:
    """Train one model from `start` into the store at store_path, continuing it when it exists."""
    from ..flat import ParamSpec, load_flat_
    from ..train import train
    model = make()
    load_flat_(model, start.to(next(model.parameters()).device))
    spec = ParamSpec.from_module(model)
    store_path = Path(store_path)
    if resume and SnapshotStore.is_store(store_path):
        store = SnapshotStore(store_path, spec)
    else:
        store = fresh_store(store_path, spec, info)
        resume = False
    return train(model, data, tconfig, store=store, meta=meta, resume=resume, progress=False)


def run_train_many(make, starts: torch.Tensor, data, tconfig, store_path: Path, *, seeds: list[int],
                   metas: list[dict], resume: bool, spec, info: Mapping[str, Any] | None = None):
    """K trajectories at once into one store (continued when it exists)."""
    from ..train import train_many
    store_path = Path(store_path)
    if resume and SnapshotStore.is_store(store_path):
        store = SnapshotStore(store_path, spec)
    else:
        store = fresh_store(store_path, spec, info)
        resume = False
    return train_many(make, starts, data, tconfig, seeds=seeds, store=store, metas=metas, resume=resume,
                      progress=False)


# ---------------------------------------------------------------------------------------------
# kernel ops (pylandscape.ops), in the forms the experiments use
# ---------------------------------------------------------------------------------------------

def perturb(flat: torch.Tensor, offsets: torch.Tensor, scale, *, mode: str = "std", seed: int) -> torch.Tensor:
    """flat + N(0, (scale * s_l)^2) per layer l (s_l = layer std, or mean |w| for mode="magnitude");
    the noise is fixed by `seed`, so a resumed run perturbs identically."""
    from ..ops import perturb_layerwise
    return perturb_layerwise(flat, offsets, scale, mode=mode, seed=int(seed))


def interpolate(a: torch.Tensor, b: torch.Tensor, alphas) -> torch.Tensor:
    """[K, P]: row k = (1 - alpha_k) a + alpha_k b (exact at alpha = 0 and 1)."""
    from ..ops import interpolate as op
    return op(a, b, torch.as_tensor(alphas, dtype=torch.float64))


def combine(W: torch.Tensor, coeffs) -> torch.Tensor:
    """sum_m coeffs[m] W[m] (coeffs [M]) or one such sum per row of coeffs [K, M]."""
    from ..ops import combine as op
    return op(W, torch.as_tensor(coeffs, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# MDS
# ---------------------------------------------------------------------------------------------

def embed_and_save(items: list[tuple[dict, torch.Tensor]], path: Path, *, spec, layer: str | None,
                   title: str, device: str = "auto") -> dict:
    """Classical MDS (1 - cosine) of the given snapshots; coordinates and metadata saved to `path`."""
    from ..mds import embed
    from ..plot import save_embedding
    res = embed(items, spec=spec, layer=layer, metric="cosine", dims=2, annotate="none", title=title,
                device=device, cache=False, progress=False)
    return save_embedding(path, res, title=title)
