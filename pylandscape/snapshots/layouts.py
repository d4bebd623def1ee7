"""Run layouts: find the snapshots below a folder and give each its run, step and epoch.

Metadata: from our store's manifest; for other files from the path: the parent folder (relative to
the root) is the trajectory and the last number in the file name is the step (also the epoch unless the
name says step/iter/batch; Lightning's "epoch=3-step=400" is parsed as such). ``group_by`` (a regex with
named groups ``traj`` and optionally ``step``, searched in the relative path) overrides this.
All snapshots must share one set of weight tensors (BatchNorm statistics and integer tensors are not
weights); the common spec is the most frequent one.
"""
from __future__ import annotations

import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..flat import ParamSpec, is_non_parameter
from ..store import SnapshotStore
from .formats import SUFFIXES, Snapshot, SnapshotError, is_float, kind_of, read_header
from .selection import parse_number

_NUM = re.compile(r"\d+")


def _natural_key(s: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _path_meta(rel: str, root_name: str, group_by: re.Pattern | None) -> dict:
    p = Path(rel)
    meta: dict[str, Any] = {"path": rel}
    if group_by is not None:
        m = group_by.search(rel)
        if m is None:
            raise SnapshotError(f"{rel}: --group-by {group_by.pattern!r} does not match this path")
        for k, v in m.groupdict().items():
            if v is None:
                continue
            if k == "traj":
                meta["trajectory"] = v
            else:
                meta[k] = parse_number(v)
        meta.setdefault("trajectory", str(p.parent) if str(p.parent) != "." else root_name)
        if "step" not in meta:
            nums = _NUM.findall(p.stem)
            if nums:
                meta["step"] = int(nums[-1])
        return meta
    meta["trajectory"] = p.parent.as_posix() if str(p.parent) != "." else root_name
    stem = p.stem
    ep = re.search(r"epoch[=_-]?(\d+)", stem, re.I)
    st = re.search(r"(?:step|iter|it|batch)[=_-]?(\d+)", stem, re.I)
    nums = _NUM.findall(stem)
    if ep:
        meta["epoch"] = int(ep.group(1))
    if st:
        meta["step"] = int(st.group(1))
    elif nums:
        meta["step"] = int(nums[-1])
        if not ep:
            meta["epoch"] = int(nums[-1])
    return meta



@dataclass
class Found:
    """What discovery found below a root: snapshots sharing one spec, sorted, with their metadata."""

    spec: ParamSpec
    items: list[Snapshot]
    meta: list[dict]
    root: Path
    skipped: list[str] = field(default_factory=list)


def find_snapshots(root: str | os.PathLike, *, group_by: str | None = None, skip_bad: bool = False,
                   on_warning: Callable[[str], None] | None = None) -> Found:
    """Find every snapshot below `root`, read headers, check they share one spec, sort by run/step."""
    root = Path(root)
    warn = on_warning or (lambda m: warnings.warn(m, stacklevel=3))
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such folder")
    pattern = None
    if group_by:
        try:
            pattern = re.compile(group_by)
        except re.error as e:
            raise SnapshotError(f"--group-by {group_by!r} is not a valid regular expression ({e})") from None
    items: list[Snapshot] = []
    metas: list[dict] = []
    store_specs: list[tuple[Path, ParamSpec]] = []
    if root.is_file():
        files, stores = [root], []
        root_dir = root.parent
    else:
        root_dir = root
        files, stores = [], []
        for dirpath, dirnames, filenames in os.walk(root):
            d = Path(dirpath)
            if SnapshotStore.is_store(d):
                stores.append(d)
                dirnames[:] = []
                continue
            dirnames[:] = sorted(x for x in dirnames if not x.startswith("."))
            files += [d / f for f in filenames if f.endswith(SUFFIXES) and not f.startswith(".")]
    root_name = root_dir.resolve().name or "snapshots"
    for sroot in sorted(stores, key=lambda p: _natural_key(str(p))):
        st = SnapshotStore(sroot)
        rel_store = sroot.relative_to(root_dir).as_posix()
        for e in st.entries:
            path = sroot / e["file"]
            rel = path.relative_to(root_dir).as_posix()
            m = {"path": rel, **{k: v for k, v in e.items() if k != "file"}}
            traj = e.get("trajectory", e.get("run"))
            traj = str(traj) if traj is not None else (rel_store if rel_store != "." else root_name)
            if len(stores) > 1 and (e.get("trajectory") is not None or e.get("run") is not None):
                traj = f"{rel_store}/{traj}"
            m["trajectory"] = traj
            items.append(Snapshot("safetensors", path, {}))
            metas.append(m)
        store_specs.append((sroot, st.spec))
    files.sort(key=lambda p: _natural_key(p.relative_to(root_dir).as_posix()))
    for f in files:
        rel = f.relative_to(root_dir).as_posix()
        try:
            m = _path_meta(rel, root_name, pattern)
        except SnapshotError as e:
            if not skip_bad:
                raise
            warn(f"skipped: {e}")
            continue
        items.append(Snapshot(kind_of(f), f, {}))
        metas.append(m)
    if not items:
        raise SnapshotError(f"{root}: no checkpoints found (looked recursively for "
                            f"{', '.join(SUFFIXES)} files and pylandscape stores)")
    # Read every header; a torch file's Lightning epoch/global_step join its metadata.
    good_items, good_meta, skipped = [], [], []
    for item, m in zip(items, metas):
        try:
            m.update(read_header(item))
        except SnapshotError as e:
            if not skip_bad:
                raise
            warn(f"skipped: {e}")
            skipped.append(str(e))
            continue
        good_items.append(item)
        good_meta.append(m)
    items, metas = good_items, good_meta
    if not items:
        raise SnapshotError(f"{root}: no readable checkpoints")
    spec, dropped = _common_spec(items, store_specs, skip_bad, warn, skipped)
    keep = [i for i in range(len(items)) if i not in dropped]
    items = [items[i] for i in keep]
    metas = [metas[i] for i in keep]
    order = sort_order(metas)
    return Found(spec=spec, items=[items[i] for i in order], meta=[metas[i] for i in order],
                 root=root_dir, skipped=skipped)


def _common_spec(items: list[Snapshot], store_specs, skip_bad: bool, warn,
                 skipped: list[str]) -> tuple[ParamSpec, set]:
    """The weights every snapshot shares; a snapshot with other tensor names/shapes is an error."""
    def weights(item):
        return tuple((n, tuple(v[0])) for n, v in item.tensors.items()
                     if not is_non_parameter(n) and is_float(v[1]))
    sigs = [frozenset(weights(it)) for it in items]
    common_sig, _ = Counter(sigs).most_common(1)[0]
    dropped = set()
    for i, s in enumerate(sigs):
        if s == common_sig:
            continue
        mine, ref = dict(s), dict(common_sig)
        missing = sorted(set(ref) - set(mine))
        extra = sorted(set(mine) - set(ref))
        shapes = [f"{n} {list(mine[n])} vs {list(ref[n])}" for n in sorted(set(mine) & set(ref)) if mine[n] != ref[n]]
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:5])}")
        if extra:
            parts.append(f"extra {', '.join(extra[:5])}")
        if shapes:
            parts.append(f"shape {'; '.join(shapes[:3])}")
        msg = (f"{items[i].path}: has other tensors than the other snapshots "
               f"({'; '.join(parts)}); point --snapshots at one model's checkpoints")
        if not skip_bad:
            raise SnapshotError(msg)
        warn(f"skipped: {msg}")
        skipped.append(msg)
        dropped.add(i)
    ref_item = next(it for it, s in zip(items, sigs) if s == common_sig)
    # Order: a store's spec order (the module's order), else the file's own order (state_dict order;
    # for safetensors the order of the data in the file).
    names_in_sig = {n for n, _ in common_sig}
    order = None
    for sroot, sspec in store_specs:
        if set(sspec.names) == names_in_sig:
            order = list(sspec.names)
            break
    if order is None:
        names = list(ref_item.tensors)
        if ref_item.kind == "safetensors":
            names.sort(key=lambda n: ref_item.tensors[n][2])
        order = [n for n in names if n in names_in_sig]
    ref = dict(common_sig)
    spec = ParamSpec(tuple(order), tuple(tuple(ref[n]) for n in order))
    return spec, dropped


def sort_order(metas: list[dict]) -> list[int]:
    """Trajectories in order of first appearance; within one, by step, else by write order (a store's
    manifest, a list's order: epochs may restart in each stage), else by epoch (foreign files)."""
    first: dict[str, int] = {}
    for i, m in enumerate(metas):
        first.setdefault(str(m.get("trajectory")), i)

    def num(v):
        return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    def key(i):
        m = metas[i]
        t = num(m.get("step"))
        if t is None:
            t = num(m.get("index")) if "index" in m else num(m.get("epoch"))
        return (first[str(m.get("trajectory"))], float("inf") if t is None else t, i)
    return sorted(range(len(metas)), key=key)

