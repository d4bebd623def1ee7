"""Run layouts: find the snapshots below a folder and give each its run, step and epoch.

Metadata: from our store's manifest; for other files from the layout: a numbered checkpoint folder
(checkpoint-500, checkpoint_3, global_step1200, iter_0000100, epoch=3-step=400) is one point of the run
in the folder above it, at that step; otherwise the file's folder is the run and the last number in the
file name the step (also the epoch unless the name says step/iter/batch; "epoch=3-step=400" is parsed as
such). Where a file records its own position (Lightning's epoch/global_step, torchvision's and timm's
epoch, Megatron's iteration) or an HF trainer_state.json sits beside it, that wins; the column
``time_source`` says which. ``group_by`` (a regex with named groups ``traj`` and optionally ``step``,
searched in the path relative to the root) overrides the path rules; paths it does not match are left
out with a note. Files that hold no weights are counted by kind in one summary line.
All snapshots must share one set of weight tensors (BatchNorm statistics and integer tensors are not
weights); the common spec is the most frequent one.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..flat import ParamSpec, is_non_parameter
from ..store import SnapshotStore
from .formats import (
    SUFFIXES,
    NotWeights,
    Snapshot,
    SnapshotError,
    is_float,
    kind_of,
    non_weight_kind_by_name,
    read_header,
)
from .selection import parse_number

_NUM = re.compile(r"\d+")
# A folder that is one checkpoint of the run in the folder above it: HF Trainer checkpoint-500,
# accelerate checkpoint_3, DeepSpeed global_step1200, Megatron iter_0000100, epoch=3-step=400, ...
CHECKPOINT_DIRS = (
    re.compile(r"(?:checkpoint[-_]|global_step|iter_|step[-_=]?)(?P<step>\d+)", re.I),
    re.compile(r"epoch[-_=]?(?P<epoch>\d+)[-_]step[-_=]?(?P<step>\d+)", re.I),
    re.compile(r"epoch[-_=]?(?P<epoch>\d+)", re.I),
)
# Folder names that hold a run's checkpoints without naming the run (Lightning's dirpath, accelerate).
HOLDER_DIRS = ("checkpoints", "checkpoint", "ckpts", "ckpt")
# File names that stand for "the latest/best one", not a point in time: drawn after the named ones.
GENERIC_STEMS = ("last", "latest", "best", "model_best", "final", "checkpoint", "model", "pytorch_model")
# The HF Trainer writes the checkpoint's position here, beside the weights.
TRAINER_STATE = "trainer_state.json"


def _natural_key(s: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _stem(name: str) -> str:
    for suffix in sorted(SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def _run_name(dirs: Sequence[str], root_name: str) -> str:
    dirs = list(dirs)
    while dirs and dirs[-1].lower() in HOLDER_DIRS:
        dirs.pop()
    return "/".join(dirs) if dirs else root_name


def _checkpoint_dir(name: str) -> dict | None:
    for pattern in CHECKPOINT_DIRS:
        m = pattern.fullmatch(name)
        if m:
            return {k: int(v) for k, v in m.groupdict().items() if v is not None}
    return None


def path_meta(rel: str, root_name: str, group_by: re.Pattern | None) -> dict | None:
    """Run, step, epoch from a path relative to the root (None: --group-by does not match it).

    In a numbered checkpoint folder the run is the folder above it and the step its number; else the
    run is the file's folder and the time the numbers in the file name.
    """
    p = Path(rel)
    meta: dict[str, Any] = {"path": rel}
    dirs = p.parts[:-1]
    if group_by is not None:
        m = group_by.search(rel)
        if m is None:
            return None
        for k, v in m.groupdict().items():
            if v is None:
                continue
            if k == "traj":
                meta["trajectory"] = v
            else:
                meta[k] = parse_number(v)
        meta.setdefault("trajectory", _run_name(dirs, root_name))
        if "step" in meta or "epoch" in meta:
            meta["time_source"] = "--group-by"
        else:
            nums = _NUM.findall(_stem(p.name))
            if nums:
                meta["step"] = int(nums[-1])
                meta["time_source"] = "file name"
        return meta
    for j in range(len(dirs) - 1, -1, -1):
        numbered = _checkpoint_dir(dirs[j])
        if numbered is not None:
            meta["trajectory"] = _run_name(dirs[:j], root_name)
            meta.update(numbered)
            meta["time_source"] = f"folder name ({dirs[j]})"
            return meta
    meta["trajectory"] = _run_name(dirs, root_name)
    stem = _stem(p.name)
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
    if ep or nums:
        meta["time_source"] = "file name"
    return meta


def _trainer_state(folder: Path, cache: dict) -> dict:
    """{"step", "epoch"} from an HF trainer_state.json beside the weights ({} if none or unreadable)."""
    if folder not in cache:
        out: dict = {}
        try:
            state = json.loads((folder / TRAINER_STATE).read_text())
            if isinstance(state.get("global_step"), int):
                out["step"] = state["global_step"]
            if isinstance(state.get("epoch"), (int, float)):
                out["epoch"] = state["epoch"]
            if out:
                out["time_source"] = f"{TRAINER_STATE} ({', '.join('global_step' if k == 'step' else k for k in out)})"
        except (OSError, ValueError, AttributeError):
            pass
        cache[folder] = out
    return cache[folder]


def apply_recorded_time(meta: dict, recorded: dict) -> None:
    """The position a file (or trainer_state.json) records replaces the one guessed from the path;
    `recorded` holds epoch and/or step and the time_source that says where they come from."""
    if not recorded or meta.get("time_source") == "--group-by":
        return
    meta.pop("epoch", None)
    meta.pop("step", None)
    meta.update(recorded)


def label_of(meta: dict) -> str:
    """What a point is called in figures: its epoch, else its step, else its file name."""
    epoch, step = meta.get("epoch"), meta.get("step")
    if isinstance(epoch, (int, float)) and not isinstance(epoch, bool):
        return f"ep {epoch:g}"
    if isinstance(step, (int, float)) and not isinstance(step, bool):
        return f"step {step:g}"
    return Path(str(meta.get("path", ""))).name


def _non_checkpoint_kind(name: str) -> str:
    if name.endswith(".json"):
        return "JSON metadata files"
    return non_weight_kind_by_name(name) or "other files"


def summarize_skipped(kinds: Counter) -> str | None:
    """One line: "skipped 24 non-weight files: 8 optimizer states, 8 scheduler states, ..."."""
    total = sum(kinds.values())
    if not total:
        return None
    parts = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0])))
    return f"skipped {total} non-weight file{'s' if total > 1 else ''}: {parts}"


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
    kinds: Counter = Counter()   # non-weight files by kind
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
            for f in filenames:
                if f.startswith("."):
                    continue
                if not f.endswith(SUFFIXES):
                    kinds[_non_checkpoint_kind(f)] += 1
                elif non_weight_kind_by_name(f):
                    kinds[non_weight_kind_by_name(f)] += 1
                else:
                    files.append(d / f)
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
            if "epoch" in m or "step" in m:
                m["time_source"] = "manifest"
            items.append(Snapshot("safetensors", path, {}))
            metas.append(m)
        store_specs.append((sroot, st.spec))
    files.sort(key=lambda p: _natural_key(p.relative_to(root_dir).as_posix()))
    unmatched: list[str] = []
    for f in files:
        rel = f.relative_to(root_dir).as_posix()
        m = path_meta(rel, root_name, pattern)
        if m is None:
            unmatched.append(rel)
            continue
        items.append(Snapshot(kind_of(f), f, {}))
        metas.append(m)
    skipped: list[str] = []
    if unmatched:
        if not items:
            raise SnapshotError(f"--group-by {group_by!r} matches none of the {len(unmatched)} checkpoint "
                                f"paths below {root} (it is searched in the path relative to --snapshots, "
                                f"e.g. {unmatched[0]!r})")
        note = (f"--group-by {group_by!r} does not match {len(unmatched)} checkpoint path(s), left out: "
                f"{', '.join(unmatched[:3])}{', ...' if len(unmatched) > 3 else ''}")
        skipped.append(note)
    if not items:
        raise SnapshotError(f"{root}: no checkpoints found (looked recursively for "
                            f"{', '.join(SUFFIXES)} files and pylandscape stores)")
    # Read every header; the position a file records (Lightning's epoch/global_step, torchvision's and
    # timm's epoch) or an HF trainer_state.json beside it replaces the one guessed from the path.
    good_items, good_meta = [], []
    states: dict = {}
    memo: dict = {}
    for item, m in zip(items, metas):
        try:
            recorded = read_header(item, memo)
        except NotWeights as e:
            kinds[e.kind] += 1
            continue
        except SnapshotError as e:
            if not skip_bad:
                raise
            warn(f"skipped: {e}")
            skipped.append(str(e))
            continue
        if recorded:
            apply_recorded_time(m, recorded)
        elif "index" not in m:  # not a store entry
            apply_recorded_time(m, _trainer_state(item.path.parent, states))
        m["label"] = label_of(m)
        good_items.append(item)
        good_meta.append(m)
    items, metas = good_items, good_meta
    summary = summarize_skipped(kinds)
    if summary:
        skipped.insert(0, summary)
    if not items:
        raise SnapshotError(f"{root}: no readable checkpoints" + (f" ({summary})" if summary else ""))
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
    manifest, a list's order: epochs may restart in each stage), else by epoch (foreign files); points
    with no time last; at equal time, "last"/"best"-like names after the others."""
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
        generic = _stem(Path(str(m.get("path", ""))).name).lower() in GENERIC_STEMS
        return (first[str(m.get("trajectory"))], float("inf") if t is None else t, generic, i)
    return sorted(range(len(metas)), key=key)

