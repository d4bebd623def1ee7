"""An experiment's output folder: config.json, progress.json (resumability), tables, results, stores.

Layout of an experiment's output folder (`--out`)::

    config.json        {"experiment": NAME, "preset": ..., "config": {...}, "choices": {...}}: what
                       `plot` and `--resume` read
    progress.json      units of work already finished (a resumed run skips them) with their small results
    metrics/*.csv|json per-epoch / per-model numbers, one table per file (CSV for spreadsheets, JSON for code)
    stores/<name>/     SnapshotStore folders (safetensors + manifest.jsonl)
    figures/*.png      what `python -m pylandscape plot OUT` redraws from the files above
    results.json       the headline numbers of the run

Every write is atomic (write to a temporary file, then rename).
"""
from __future__ import annotations

import csv
import io
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import torch

from ..store import SnapshotStore, atomic_write_bytes, atomic_write_json
from .config import Protocol, config_from_dict, config_to_dict

CONFIG = "config.json"
PROGRESS = "progress.json"
RESULTS = "results.json"


def prepare_out(out_dir: str | Path, name: str, config: Any, *, preset: str | None = None,
                resume: bool = False, protocol: Protocol | None = None, overrides: list[str] | None = None) -> Path:
    """Create the folder and write config.json; refuse to mix two different configs in one folder.

    config.json also records the preset's Protocol (the paper's words it follows and the choices made
    where the paper is silent) and the --set overrides, so a run says what it did and why."""
    out = Path(out_dir)
    path = out / CONFIG
    new = {"experiment": name, "preset": preset, "config": config_to_dict(config)}
    if protocol is not None:
        new["protocol"] = protocol.to_json()
    if overrides:
        new["overrides"] = list(overrides)
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


def read_run_info(out_dir: str | Path) -> dict:
    """The whole config.json of an output folder: experiment, preset, config (and choices, if any)."""
    path = Path(out_dir) / CONFIG
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: {out_dir} is not an experiment output folder")
    return json.loads(path.read_text())


def read_config(out_dir: str | Path) -> tuple[str, dict]:
    """(experiment name, config dict) of an output folder."""
    d = read_run_info(out_dir)
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


def store_dir(out_dir: str | Path, name: str) -> Path:
    return Path(out_dir) / "stores" / name


def fresh_store(path: str | Path, spec, info: Mapping[str, Any] | None = None) -> SnapshotStore:
    """An empty store at `path`: leftovers of an interrupted unit are removed so the unit is redone whole."""
    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    return SnapshotStore(path, spec, info=info)


def last_index(store: SnapshotStore, **where: Any) -> int:
    idx = store.select(**where)
    if not idx:
        raise ValueError(f"{store.root}: no snapshot with {where}")
    return max(idx, key=lambda i: (store.entries[i].get("epoch", 0) or 0, i))
