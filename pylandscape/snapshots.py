"""Read any folder of checkpoints safely and fast: the input side of `python -m pylandscape.mds`.

Formats, found recursively: `.pt`/`.pth`/`.ckpt` (a state_dict, or a dict holding one under
"state_dict", "model_state_dict" or "model"; common wrapper prefixes such as Lightning's "model." are
stripped), `.safetensors`, `.npz`, and our own store (spec.json + manifest.jsonl + snapshots/).

Checkpoints are untrusted: torch files are read with ``torch.load(weights_only=True)`` (a pickle that
holds anything but tensors and plain containers is refused before any of its code runs), `.npz` with
``allow_pickle=False``, safetensors by parsing the header ourselves.

Only weights are used: BatchNorm running statistics/counters (`flat.is_non_parameter`) and integer
tensors are skipped and reported. Reading goes straight from the file into one preallocated float32
[rows, columns] buffer (safetensors: mmap + one copy per tensor, no intermediate buffers), column range by
column range, so the snapshots never need to fit in memory all at once.

Metadata: from our store's manifest; for other files from the path: the parent folder (relative to
the root) is the trajectory and the last number in the file name is the step (also the epoch unless the
name says step/iter/batch; Lightning's "epoch=3-step=400" is parsed as such). ``group_by`` (a regex with
named groups ``traj`` and optionally ``step``, searched in the relative path) overrides this.
"""
from __future__ import annotations

import fnmatch
import json
import math
import mmap
import os
import re
import struct
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from .flat import ParamSpec, is_non_parameter
from .store import SnapshotStore

TORCH_SUFFIXES = (".pt", ".pth", ".ckpt")
SUFFIXES = TORCH_SUFFIXES + (".safetensors", ".npz")
CACHE_DIRNAME = ".pylandscape-cache"
# Keys under which training scripts nest the model's state_dict.
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net", "network")
# Prefixes wrappers add to every parameter name (Lightning attribute, DataParallel, torch.compile).
WRAPPER_PREFIXES = ("model.", "module.", "_orig_mod.", "net.")

_ST_DTYPES = {"F32": np.float32, "F64": np.float64, "F16": np.float16, "BF16": "bf16",
              "I8": None, "U8": None, "I16": None, "I32": None, "I64": None, "BOOL": None}
_ST_ITEMSIZE = {"F32": 4, "F64": 8, "F16": 2, "BF16": 2}


class SnapshotError(ValueError):
    """A bad checkpoint or argument; the message names the file or tensor and fits on one line."""


# ======================================================================================
# One snapshot on disk (or in memory)
# ======================================================================================

@dataclass
class _Item:
    kind: str                        # "safetensors", "torch", "npz", "memory"
    path: Path | None
    tensors: dict[str, tuple]        # name -> (shape, dtype tag); safetensors: + (start, end) in file
    data_start: int = 0              # safetensors: offset of the data section
    row: int = -1                    # memory: row in the in-memory matrix

    def label(self) -> str:
        return str(self.path) if self.path is not None else f"row {self.row}"


def _parse_safetensors_header(path: Path) -> tuple[dict, int, dict]:
    """(tensors, data_start, metadata); checks the file is long enough for every tensor."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SnapshotError(f"{path}: truncated or not a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 << 20):
            raise SnapshotError(f"{path}: corrupt safetensors header (claims {n} header bytes, file has {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SnapshotError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise SnapshotError(f"{path}: corrupt safetensors header (not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    tensors, end_max = {}, 0
    for name, info in header.items():
        try:
            dt, shape, (a, b) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise SnapshotError(f"{path}: corrupt safetensors header entry for tensor {name!r}") from None
        numel = math.prod(shape)  # exact Python ints (np.prod: ~8 us a call, and int64 overflow)
        if dt in _ST_ITEMSIZE and b - a != numel * _ST_ITEMSIZE[dt]:
            raise SnapshotError(f"{path}: tensor {name!r} has {b - a} bytes for shape {list(shape)} {dt}")
        tensors[name] = (shape, dt, int(a), int(b))
        end_max = max(end_max, int(b))
    if data_start + end_max > size:
        raise SnapshotError(f"{path}: truncated safetensors file ({size} bytes, header needs "
                            f"{data_start + end_max})")
    return tensors, data_start, meta


def _torch_load(path: Path) -> Any:
    """torch.load that never runs code from the file."""
    kw = dict(weights_only=True, map_location="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's notes on pickle protocols are noise here
        return _torch_load_checked(path, kw)


def _torch_load_checked(path: Path, kw: dict) -> Any:
    try:
        try:
            return torch.load(path, mmap=True, **kw)
        except RuntimeError as e:
            if "mmap" not in str(e) and "zip" not in str(e).lower():
                raise
            return torch.load(path, **kw)  # legacy (non-zip) format cannot be memory-mapped
    except Exception as e:  # noqa: BLE001 - any failure becomes one clear line naming the file
        msg = str(e)
        if "Weights only load failed" in msg or "Unsupported global" in msg or "UnpicklingError" in type(e).__name__:
            first = next((ln.strip() for ln in msg.splitlines() if "Unsupported" in ln or "GLOBAL" in ln), "")
            raise SnapshotError(f"{path}: refused to load: the checkpoint holds Python objects other than "
                                f"tensors, and unpickling them could run code (weights_only=True); save model.state_dict() instead. "
                                f"{first}".strip()) from None
        raise SnapshotError(f"{path}: cannot read as a PyTorch checkpoint "
                            f"(truncated or corrupt?): {msg.splitlines()[0] if msg else type(e).__name__}") from None


def _find_state_dict(obj: Any, path: Path) -> tuple[dict, dict]:
    """(name -> tensor, extra metadata such as Lightning's epoch/global_step)."""
    extra = {}
    if isinstance(obj, torch.Tensor):
        return {"params": obj}, extra
    if not isinstance(obj, Mapping):
        raise SnapshotError(f"{path}: holds a {type(obj).__name__}, not a state_dict")
    for k in ("epoch", "global_step", "step"):
        v = obj.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            extra["step" if k == "global_step" else k] = v
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if tensors and len(tensors) == len(obj):
        return tensors, {}
    for key in STATE_DICT_KEYS:
        v = obj.get(key)
        if isinstance(v, Mapping):
            inner = {k: t for k, t in v.items() if isinstance(t, torch.Tensor)}
            if inner:
                return inner, extra
    if tensors:
        return tensors, extra
    keys = ", ".join(map(str, list(obj)[:12]))
    raise SnapshotError(f"{path}: no state_dict found (looked for a dict of tensors, or one under "
                        f"{', '.join(STATE_DICT_KEYS)}; top-level keys: {keys})")


def _strip_wrapper_prefix(names: Sequence[str]) -> dict[str, str]:
    """old -> new names with a prefix shared by every name (Lightning 'model.', 'module.') removed."""
    mapping = {n: n for n in names}
    changed = True
    while changed and mapping:
        changed = False
        cur = list(mapping.values())
        for p in WRAPPER_PREFIXES:
            if all(c.startswith(p) and len(c) > len(p) for c in cur):
                mapping = {k: v[len(p):] for k, v in mapping.items()}
                changed = True
                break
    return mapping


def _load_dict(item: _Item) -> dict[str, Any]:
    """name -> tensor/array for torch and npz files, with wrapper prefixes stripped."""
    path = item.path
    if item.kind == "torch":
        sd, _ = _find_state_dict(_torch_load(path), path)
    else:
        try:
            with np.load(path, allow_pickle=False) as z:
                sd = {k: z[k] for k in z.files}
        except ValueError as e:
            raise SnapshotError(f"{path}: refused to load: {e}") from None
        except Exception as e:  # noqa: BLE001
            raise SnapshotError(f"{path}: cannot read as .npz (truncated or corrupt?): {e}") from None
    ren = _strip_wrapper_prefix(list(sd))
    return {ren[k]: v for k, v in sd.items()}


def _is_float(dtype_tag: str) -> bool:
    return dtype_tag in ("F32", "F64", "F16", "BF16") or dtype_tag.startswith("torch.float") \
        or dtype_tag.startswith("torch.bfloat") or dtype_tag.startswith("float") or dtype_tag == "torch.half"


def _describe_item(item: _Item) -> None:
    """Fill item.tensors (name -> (shape, dtype tag[, start, end])) from the file."""
    if item.kind == "safetensors":
        tensors, data_start, _ = _parse_safetensors_header(item.path)
        item.tensors, item.data_start = tensors, data_start
        ren = _strip_wrapper_prefix(list(tensors))
        item.tensors = {ren[k]: v for k, v in tensors.items()}
        return
    sd = _load_dict(item)
    item.tensors = {k: (tuple(v.shape), str(v.dtype)) for k, v in sd.items()}


# ======================================================================================
# A set of snapshots with one parameter spec
# ======================================================================================

@dataclass
class SnapshotSet:
    """Snapshots sharing one ParamSpec (weights only), each with a metadata dict."""

    spec: ParamSpec
    items: list[_Item]
    meta: list[dict]
    root: Path | None = None
    skipped: list[str] = field(default_factory=list)
    matrix: torch.Tensor | None = None          # in-memory sources: [N, P]

    def __len__(self) -> int:
        return len(self.items)

    @property
    def cacheable(self) -> bool:
        return self.matrix is None and self.root is not None

    def describe(self) -> str:
        return str(self.root) if self.root is not None else "in-memory snapshots"

    def file_key(self, i: int) -> list:
        """(relative path, size, mtime_ns): changes whenever the file is rewritten."""
        p = self.items[i].path
        st = p.stat()
        return [self.meta[i]["path"], st.st_size, st.st_mtime_ns]

    def filter_rows(self, select: str | None = None,
                    trajectory: Sequence[str] | str | None = None) -> list[int]:
        rows = list(range(len(self.items)))
        if trajectory:
            wanted = [trajectory] if isinstance(trajectory, str) else list(trajectory)
            have = sorted({str(m.get("trajectory")) for m in self.meta})
            missing = [t for t in wanted if t not in have]
            if missing:
                raise SnapshotError(f"--trajectory {', '.join(missing)} matches nothing; trajectories: "
                                    f"{', '.join(have[:30])}")
            rows = [i for i in rows if str(self.meta[i].get("trajectory")) in wanted]
        if select:
            pred = parse_select(select, columns=_columns(self.meta))
            rows = [i for i in rows if pred(self.meta[i])]
        return rows

    # --- reading ---
    def plan_pieces(self, col_start: int, col_end: int) -> list[tuple[int, int, int]]:
        """(tensor index, start, end) element ranges covering flat columns [col_start, col_end)."""
        out = []
        offs = self.spec.offsets.tolist()
        for t in range(len(self.spec)):
            a, b = max(offs[t], col_start), min(offs[t + 1], col_end)
            if a < b:
                out.append((t, a - offs[t], b - offs[t]))
        return out

    def read_block(self, rows: Sequence[int], pieces: Sequence[tuple[int, int, int]],
                   out: np.ndarray | None = None, progress: bool | None = None,
                   desc: str = "reading") -> np.ndarray:
        """float32 [len(rows), sum of piece lengths]: the pieces of each row, side by side."""
        width = sum(b - a for _, a, b in pieces)
        if out is None:
            out = np.empty((len(rows), width), dtype=np.float32)
        from tqdm.auto import tqdm
        it = tqdm(rows, desc=desc, unit="snap", disable=(not progress) if progress is not None else None,
                  leave=False)
        for r, i in enumerate(it):
            self._read_row(i, pieces, out[r])
        return out

    def _read_row(self, i: int, pieces, dst: np.ndarray) -> None:
        item = self.items[i]
        names = self.spec.names
        if item.kind == "memory":
            x = self.matrix[item.row]
            offs = self.spec.offsets.tolist()
            c = 0
            for t, a, b in pieces:
                dst[c:c + b - a] = x[offs[t] + a:offs[t] + b].numpy()
                c += b - a
            return
        if item.kind == "safetensors":
            self._read_safetensors_row(item, pieces, dst)
            return
        sd = _load_dict(item)
        c = 0
        for t, a, b in pieces:
            v = sd[names[t]]
            v = v.detach().reshape(-1)[a:b].float().numpy() if isinstance(v, torch.Tensor) \
                else np.asarray(v).reshape(-1)[a:b]
            dst[c:c + b - a] = v
            c += b - a

    def _read_safetensors_row(self, item: _Item, pieces, dst: np.ndarray) -> None:
        # mmap + one userspace copy per tensor: as fast as read() into a warm buffer, and ~10x faster
        # than read() into freshly allocated pages (measured: the kernel's page faults inside read()
        # dominate on this kind of VM).
        names = self.spec.names
        try:
            with open(item.path, "rb") as f:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:
            raise SnapshotError(f"{item.path}: cannot open ({e})") from None
        try:
            c = 0
            for t, a, b in pieces:
                shape, dt, start, _ = item.tensors[names[t]]
                n = b - a
                size = _ST_ITEMSIZE[dt]
                off = item.data_start + start + a * size
                if off + n * size > len(mm):
                    raise SnapshotError(f"{item.path}: truncated while reading tensor {names[t]!r}")
                if dt == "BF16":
                    u = np.frombuffer(mm, dtype=np.uint16, count=n, offset=off).astype(np.uint32) << 16
                    dst[c:c + n] = u.view(np.float32)
                else:
                    dst[c:c + n] = np.frombuffer(mm, dtype=_ST_DTYPES[dt], count=n, offset=off)
                c += n
        finally:
            try:
                mm.close()
            except BufferError:  # a view is still alive somewhere; the mapping goes with it
                pass


def _columns(meta: Sequence[dict]) -> list[str]:
    cols: dict[str, None] = {}
    for m in meta:
        for k in m:
            cols.setdefault(k, None)
    return list(cols)


# ======================================================================================
# Discovery
# ======================================================================================

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
                meta[k] = _number(v)
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


def _number(v: str):
    try:
        return int(v)
    except ValueError:
        try:
            return float(v)
        except ValueError:
            return v


def discover(root: str | os.PathLike, *, group_by: str | None = None, skip_bad: bool = False,
             on_warning: Callable[[str], None] | None = None) -> SnapshotSet:
    """Find every snapshot below `root`, read headers, check they share one spec, sort by trajectory/step."""
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
    items: list[_Item] = []
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
            items.append(_Item("safetensors", path, {}))
            metas.append(m)
        store_specs.append((sroot, st.spec))
    files.sort(key=lambda p: _natural_key(p.relative_to(root_dir).as_posix()))
    for f in files:
        kind = "safetensors" if f.suffix == ".safetensors" else ("npz" if f.suffix == ".npz" else "torch")
        rel = f.relative_to(root_dir).as_posix()
        try:
            m = _path_meta(rel, root_name, pattern)
        except SnapshotError as e:
            if not skip_bad:
                raise
            warn(f"skipped: {e}")
            continue
        items.append(_Item(kind, f, {}))
        metas.append(m)
    if not items:
        raise SnapshotError(f"{root}: no checkpoints found (looked recursively for "
                            f"{', '.join(SUFFIXES)} files and pylandscape stores)")
    # Read every header; a torch file's Lightning epoch/global_step join its metadata.
    good_items, good_meta, skipped = [], [], []
    for item, m in zip(items, metas):
        try:
            if item.kind == "torch":
                obj = _torch_load(item.path)
                sd, extra = _find_state_dict(obj, item.path)
                ren = _strip_wrapper_prefix(list(sd))
                item.tensors = {ren[k]: (tuple(v.shape), str(v.dtype)) for k, v in sd.items()}
                for k, v in extra.items():
                    m[k] = v
            else:
                _describe_item(item)
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
    spec, dropped = _common_spec(items, root_dir, store_specs, skip_bad, warn, skipped)
    keep = [i for i in range(len(items)) if i not in dropped]
    items = [items[i] for i in keep]
    metas = [metas[i] for i in keep]
    order = _sort_order(metas)
    sset = SnapshotSet(spec=spec, items=[items[i] for i in order], meta=[metas[i] for i in order],
                       root=root_dir, skipped=skipped)
    return sset


def _signature(item: _Item, names: Sequence[str]) -> dict:
    return {n: item.tensors[n][0] for n in names}


def _common_spec(items: list[_Item], root: Path, store_specs, skip_bad: bool, warn,
                 skipped: list[str]) -> tuple[ParamSpec, set]:
    """The weights every snapshot shares; a snapshot with other tensor names/shapes is an error."""
    def weights(item):
        return tuple((n, tuple(v[0])) for n, v in item.tensors.items()
                     if not is_non_parameter(n) and _is_float(v[1]))
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


def _sort_order(metas: list[dict]) -> list[int]:
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


def skipped_buffers(sset: SnapshotSet) -> list[str]:
    """Names of tensors present in the files but not used (BatchNorm statistics, integer tensors)."""
    if not sset.items:
        return []
    used = set(sset.spec.names)
    return [n for n in sset.items[0].tensors if n not in used]


def open_source(source, *, spec: ParamSpec | None = None, group_by: str | None = None,
                skip_bad: bool = False, on_warning=None) -> SnapshotSet:
    """A SnapshotSet from a folder, a file, a SnapshotStore, (meta, flat) pairs or an [N, P] tensor."""
    if isinstance(source, SnapshotSet):
        return source
    if isinstance(source, SnapshotStore):
        source = source.root
    if isinstance(source, (str, os.PathLike)):
        sset = discover(source, group_by=group_by, skip_bad=skip_bad, on_warning=on_warning)
        unused = skipped_buffers(sset)
        if unused:
            sset.skipped.insert(0, f"not weights, skipped: {', '.join(unused)}")
        return sset
    if isinstance(source, tuple) and len(source) == 2 and isinstance(source[1], ParamSpec):
        source, spec = source
    if isinstance(source, (torch.Tensor, np.ndarray)):
        X = torch.as_tensor(source)
        if X.ndim != 2:
            raise SnapshotError(f"snapshot matrix must be [N, P], got shape {tuple(X.shape)}")
        metas = [{"path": f"row{i}", "trajectory": "0", "step": i, "index": i} for i in range(X.shape[0])]
    else:
        pairs = list(source)
        if not pairs:
            raise SnapshotError("no snapshots given")
        metas, rows = [], []
        for i, pr in enumerate(pairs):
            if not (isinstance(pr, (tuple, list)) and len(pr) == 2):
                raise SnapshotError(f"snapshot {i}: expected a (meta dict, flat tensor) pair")
            m, flat = pr
            m = dict(m)
            m.setdefault("path", m.get("file", f"row{i}"))
            m.setdefault("trajectory", str(m.get("run", "0")))
            m.setdefault("index", i)
            metas.append(m)
            rows.append(torch.as_tensor(flat).detach().reshape(-1))
        sizes = {r.numel() for r in rows}
        if len(sizes) != 1:
            raise SnapshotError(f"snapshots have different sizes: {sorted(sizes)[:5]}")
        X = torch.stack(rows)
    X = X.detach().cpu().to(torch.float32)
    if spec is None:
        spec = ParamSpec(("params",), ((X.shape[1],),))
    if spec.numel != X.shape[1]:
        raise SnapshotError(f"spec has {spec.numel} parameters, snapshots have {X.shape[1]}")
    items = [_Item("memory", None, {}, row=i) for i in range(X.shape[0])]
    order = _sort_order(metas)
    return SnapshotSet(spec=spec, items=[items[i] for i in order], meta=[metas[i] for i in order],
                       matrix=X)


# ======================================================================================
# --layer: which tensors
# ======================================================================================

def paper_layers(spec: ParamSpec) -> list[tuple[str, list[int]]]:
    """The paper's numbering: layer 1 is the input; layer k >= 2 is the (k-1)-th module owning a
    weight tensor with >= 2 dims (conv/linear), together with its bias. [(module, tensor indices)]."""
    out = []
    for i, (n, s) in enumerate(zip(spec.names, spec.shapes)):
        if n.endswith("weight") and len(s) >= 2:
            mod = n[: -len("weight")].rstrip(".")
            idx = [i]
            bias = f"{mod}.bias" if mod else "bias"
            if bias in spec.names:
                idx.append(spec.names.index(bias))
            out.append((mod or n, idx))
    return out


def select_tensors(spec: ParamSpec, layer: str | None) -> list[int]:
    """Tensor indices for `--layer` (None/'all': everything)."""
    if layer is None or str(layer).strip().lower() in ("", "all"):
        return list(range(len(spec)))
    chosen: list[int] = []
    for part in str(layer).split(","):
        part = part.strip()
        m = re.fullmatch(r"(?:layer)?\s*(\d+)", part, re.I)
        if m:
            k = int(m.group(1))
            layers = paper_layers(spec)
            if k < 2 or k > len(layers) + 1:
                listing = "; ".join(f"{j + 2}={mod}" for j, (mod, _) in enumerate(layers))
                what = "layer 1 is the input and has no weights" if k == 1 else f"there is no layer {k}"
                raise SnapshotError(f"--layer {part}: {what}; layers with weights are {listing}")
            idx = layers[k - 2][1]
        else:
            idx = [i for i, n in enumerate(spec.names)
                   if fnmatch.fnmatchcase(n, part) or n.startswith(part + ".")]
            if not idx:
                raise SnapshotError(f"--layer {part!r} matches no tensor; tensors are: "
                                    f"{', '.join(spec.names)}")
        chosen += [i for i in idx if i not in chosen]
    return sorted(chosen)


# ======================================================================================
# --select: a tiny expression language over metadata (no eval)
# ======================================================================================

_TOKEN = re.compile(r"""\s*(?:(?P<num>-?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)(?![\w.])|(?P<str>'[^']*'|"[^"]*")|
                        (?P<op>==|!=|<=|>=|<|>|=|\(|\)|\[|\]|,)|(?P<word>[A-Za-z_][\w.\-/]*))""", re.X)


def _tokenize(expr: str) -> list[tuple[str, Any]]:
    out, pos = [], 0
    expr = expr.strip()
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if not m or m.end() == pos:
            raise SnapshotError(f"--select {expr!r}: cannot parse at {expr[pos:]!r}")
        pos = m.end()
        if m.group("num") is not None:
            out.append(("val", _number(m.group("num"))))
        elif m.group("str") is not None:
            out.append(("val", m.group("str")[1:-1]))
        elif m.group("op") is not None:
            out.append(("op", "==" if m.group("op") == "=" else m.group("op")))
        else:
            w = m.group("word")
            out.append(("kw", w.lower()) if w.lower() in ("and", "or", "not", "in") else ("word", w))
        while pos < len(expr) and expr[pos].isspace():
            pos += 1
    return out


def _compare(a, op: str, b) -> bool:
    if a is None:
        return op == "!="
    if isinstance(b, (int, float)) and not isinstance(a, (int, float)):
        try:
            a = float(a)
        except (TypeError, ValueError):
            return op == "!="
    if isinstance(a, (int, float)) and isinstance(b, str):
        try:
            b = float(b)
        except ValueError:
            a = str(a)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        pass
    else:
        a, b = str(a), str(b)
    return {"==": a == b, "!=": a != b, "<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b}[op]


def parse_select(expr: str, columns: Sequence[str] | None = None) -> Callable[[dict], bool]:
    """Predicate over a metadata dict: comparisons (==, !=, <, <=, >, >=), `col in (a, b)`,
    and/or/not, parentheses. Values are numbers, quoted strings or bare words. Nothing is eval'ed."""
    toks = _tokenize(expr)
    pos = 0

    def peek():
        return toks[pos] if pos < len(toks) else (None, None)

    def take(kind=None, val=None):
        nonlocal pos
        t = peek()
        if t[0] is None or (kind and t[0] != kind) or (val is not None and t[1] != val):
            want = val or kind
            raise SnapshotError(f"--select {expr!r}: expected {want} at token {pos + 1}"
                                f"{'' if t[0] is None else f' ({t[1]!r})'}")
        pos += 1
        return t

    def value():
        t = peek()
        if t[0] in ("val", "word"):
            take()
            return t[1]
        raise SnapshotError(f"--select {expr!r}: expected a value at token {pos + 1}")

    def comparison():
        if peek() == ("op", "("):
            take()
            f = disjunction()
            take("op", ")")
            return f
        if peek() == ("kw", "not"):
            take()
            g = comparison()
            return lambda m: not g(m)
        col = take("word")[1]
        if columns is not None and col not in columns:
            raise SnapshotError(f"--select: no metadata column {col!r}; columns are {', '.join(columns)}")
        t = peek()
        if t == ("kw", "in"):
            take()
            close = {"(": ")", "[": "]"}
            opener = peek()[1] if peek()[0] == "op" else None
            if opener in close:
                take()
            else:
                raise SnapshotError(f"--select {expr!r}: 'in' needs a list like (a, b)")
            vals = [value()]
            while peek() == ("op", ","):
                take()
                vals.append(value())
            take("op", close[opener])
            return lambda m, c=col, vs=tuple(vals): any(_compare(m.get(c), "==", v) for v in vs)
        op = take("op")[1]
        if op not in ("==", "!=", "<", "<=", ">", ">="):
            raise SnapshotError(f"--select {expr!r}: {op!r} is not a comparison")
        v = value()
        return lambda m, c=col, o=op, v=v: _compare(m.get(c), o, v)

    def conjunction():
        f = comparison()
        while peek() == ("kw", "and"):
            take()
            g = comparison()
            f = (lambda a, b: lambda m: a(m) and b(m))(f, g)
        return f

    def disjunction():
        f = conjunction()
        while peek() == ("kw", "or"):
            take()
            g = conjunction()
            f = (lambda a, b: lambda m: a(m) or b(m))(f, g)
        return f

    if not toks:
        raise SnapshotError("--select is empty")
    pred = disjunction()
    if pos != len(toks):
        raise SnapshotError(f"--select {expr!r}: unexpected {toks[pos][1]!r}")
    return pred
