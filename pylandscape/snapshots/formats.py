"""Checkpoint file formats: what one file holds, read without running any code from it.

`.pt`/`.pth`/`.ckpt`/`.bin`/`.pth.tar` (PyTorch zip or legacy format: a state_dict, or a dict holding one
under "state_dict", "model", "module", ...; common wrapper prefixes such as Lightning's "model." are
stripped) are read with ``torch.load(weights_only=True)`` and the short allow-list SAFE_GLOBALS:
a pickle that holds anything else is refused before any of its code runs. `.npz` with
``allow_pickle=False``. `.safetensors` by parsing the header ourselves and copying tensor ranges straight
out of an mmap.

Files that hold no weights (optimizer, scheduler, RNG and AMP-scaler states, training arguments) are
recognised by name where the training libraries' names are unambiguous, else by content, and raise
NotWeights (the caller counts and skips them); only broken weight files are errors.
"""
from __future__ import annotations

import argparse
import json
import math
import mmap
import os
import pathlib
import re
import struct
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pth.tar")
SUFFIXES = TORCH_SUFFIXES + (".safetensors", ".npz")
# Keys under which training scripts nest the model's state_dict (DeepSpeed: "module").
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network")
# Prefixes wrappers add to every parameter name (Lightning attribute, DataParallel, torch.compile).
WRAPPER_PREFIXES = ("model.", "module.", "_orig_mod.", "net.")
# Where a checkpoint records its own position: key -> metadata column.
TIME_KEYS = {"epoch": "epoch", "global_step": "step", "step": "step", "iteration": "step",
             "global_steps": "step"}

# The allow-list: plain-data types that real checkpoints carry next to the weights, each rebuilt without
# running any code of the file's choosing. argparse.Namespace: the training arguments torchvision's
# references, timm and Megatron save ("args"); pathlib paths inside such arguments; numpy arrays,
# scalars and dtypes: RNG states (np.random.get_state(), saved by HF Trainer's rng_state.pth and
# Megatron) and metrics saved as numpy floats. An object-dtype array's elements go through the same
# restricted unpickler, so they are held to this list too.
_NUMPY_CORE = "numpy._core" if hasattr(np, "_core") else "numpy.core"
SAFE_GLOBALS: list = [
    argparse.Namespace, pathlib.PosixPath, pathlib.PurePosixPath, pathlib.WindowsPath,
    pathlib.PureWindowsPath, np.ndarray, np.dtype,
    (np.dtype(np.float64).__reduce__()[0], "numpy.dtype"),
    (np.float64(0).__reduce__()[0], f"{_NUMPY_CORE}.multiarray.scalar"),
    (np.float64(0).__reduce__()[0], "numpy.core.multiarray.scalar"),  # pickled by numpy 1.x
    (np.ndarray(0).__reduce__()[0], f"{_NUMPY_CORE}.multiarray._reconstruct"),
    (np.ndarray(0).__reduce__()[0], "numpy.core.multiarray._reconstruct"),
] + sorted({type(np.dtype(t)) for t in "?bhilqBHILQefdgFDGSUV"} | {type(np.dtype("O"))},
           key=lambda c: c.__name__)

# Files the training libraries name unambiguously and that hold no weights (HF Trainer, accelerate,
# DeepSpeed): skipped without being read.
NON_WEIGHT_NAMES = (
    (re.compile(r"(optimizer|optim)(_\d+)?\.(pt|bin|pth)$|.*optim_states\.pt$"), "optimizer states"),
    (re.compile(r"(scheduler|lr_scheduler)(_\d+)?\.(pt|bin|pth)$"), "scheduler states"),
    (re.compile(r"(rng_state|random_states)(_\d+)?\.(pth|pt|pkl)$"), "RNG states"),
    (re.compile(r"(scaler)(_\d+)?\.(pt|bin|pth)$"), "AMP scaler states"),
    (re.compile(r"training_args\.bin$"), "training arguments"),
)

ST_DTYPES = {"F32": np.float32, "F64": np.float64, "F16": np.float16, "BF16": "bf16",
             "I8": None, "U8": None, "I16": None, "I32": None, "I64": None, "BOOL": None}
ST_ITEMSIZE = {"F32": 4, "F64": 8, "F16": 2, "BF16": 2}


class SnapshotError(ValueError):
    """A bad checkpoint or argument; the message names the file or tensor and fits on one line."""


class NotWeights(Exception):
    """A file that holds no weights (an optimizer state, ...): skipped, counted by kind."""

    def __init__(self, kind: str):
        super().__init__(kind)
        self.kind = kind


def non_weight_kind_by_name(name: str) -> str | None:
    """The kind of a non-weight file known by its name alone, else None."""
    for pattern, kind in NON_WEIGHT_NAMES:
        if pattern.fullmatch(name):
            return kind
    return None


_RNG_KEYS = {"python", "numpy", "cpu", "cuda", "mps", "xla", "npu", "hpu", "xpu", "mlu", "random_state",
             "torch", "step"}


def non_weight_kind(obj: Any) -> str | None:
    """The kind of a loaded object that holds no weights (recognised by its keys), else None."""
    if not isinstance(obj, Mapping):
        return None
    keys = set(obj)
    if {"state", "param_groups"} <= keys:
        return "optimizer states"
    if "last_epoch" in keys and keys & {"base_lrs", "_step_count"}:
        return "scheduler states"
    if {"scale", "growth_factor"} <= keys:
        return "AMP scaler states"
    if keys and keys <= _RNG_KEYS and keys & {"python", "numpy", "cpu", "torch"}:
        return "RNG states"
    return None


@dataclass
class Snapshot:
    """One snapshot: a file (or a row of an in-memory matrix) and the tensors it holds."""

    kind: str                        # "safetensors", "torch", "npz", "memory"
    path: Path | None
    tensors: dict[str, tuple]        # name -> (shape, dtype tag); safetensors: + (start, end) in file
    data_start: int = 0              # safetensors: offset of the data section
    stat: tuple[int, int] | None = None  # (size, mtime_ns) when the header was read: the Gram cache's key
    row: int = -1                    # memory: row in the in-memory matrix
    # torch zip files: the tensors, memory-mapped (file pages, no copy in RAM), kept so that reading
    # column chunks neither loads the file again per chunk nor reads any byte twice
    mapped: dict | None = field(default=None, repr=False)


def kind_of(path: Path) -> str:
    return "safetensors" if path.name.endswith(".safetensors") else ("npz" if path.name.endswith(".npz")
                                                                      else "torch")


def parse_safetensors_header(path: Path, memo: dict | None = None) -> tuple[dict, int, dict, tuple[int, int]]:
    """(tensors, data_start, metadata, (size, mtime_ns)); checks the file is long enough for every tensor.
    memo: parsed headers by their bytes, shared over a folder's files (a run's checkpoints usually have
    byte-identical headers: one JSON parse and check instead of 2,000)."""
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        size = st.st_size
        head = f.read(8)
        if len(head) < 8:
            raise SnapshotError(f"{path}: truncated or not a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 << 20):
            raise SnapshotError(f"{path}: corrupt safetensors header (claims {n} header bytes, file has {size})")
        raw = f.read(n)
    stat = (st.st_size, st.st_mtime_ns)
    hit = memo.get(raw) if memo is not None else None
    if hit is None:
        hit = _parse_header_json(path, raw)
        if memo is not None:
            memo[raw] = hit
    tensors, meta, end_max = hit
    data_start = 8 + n
    if data_start + end_max > size:
        raise SnapshotError(f"{path}: truncated safetensors file ({size} bytes, header needs "
                            f"{data_start + end_max})")
    return tensors, data_start, dict(meta), stat


def _parse_header_json(path: Path, raw: bytes) -> tuple[dict, dict, int]:
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SnapshotError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise SnapshotError(f"{path}: corrupt safetensors header (not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    tensors, end_max = {}, 0
    for name, info in header.items():
        try:
            dt, shape, (a, b) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise SnapshotError(f"{path}: corrupt safetensors header entry for tensor {name!r}") from None
        numel = math.prod(shape)  # exact Python ints (np.prod: ~8 us a call, and int64 overflow)
        if dt in ST_ITEMSIZE and b - a != numel * ST_ITEMSIZE[dt]:
            raise SnapshotError(f"{path}: tensor {name!r} has {b - a} bytes for shape {list(shape)} {dt}")
        tensors[name] = (shape, dt, int(a), int(b))
        end_max = max(end_max, int(b))
    return tensors, meta, end_max


def torch_load(path: Path) -> tuple[Any, bool]:
    """torch.load that never runs code from the file (weights_only=True + the SAFE_GLOBALS allow-list);
    (object, whether its tensors are memory-mapped)."""
    kw = dict(weights_only=True, map_location="cpu")
    with warnings.catch_warnings(), torch.serialization.safe_globals(SAFE_GLOBALS):
        warnings.simplefilter("ignore")  # torch's notes on pickle protocols are noise here
        return _torch_load_checked(path, kw)


def _looks_like_torch(path: Path) -> bool:
    """A PyTorch file starts as a zip archive or as a pickle (legacy format)."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def _torch_load_checked(path: Path, kw: dict) -> tuple[Any, bool]:
    try:
        try:
            return torch.load(path, mmap=True, **kw), True
        except RuntimeError as e:
            if "mmap" not in str(e) and "zip" not in str(e).lower():
                raise
            return torch.load(path, **kw), False  # legacy (non-zip) format cannot be memory-mapped
    except Exception as e:  # noqa: BLE001 - any failure becomes one clear line naming the file
        msg = str(e)
        if path.name.endswith(".bin") and not _looks_like_torch(path):
            raise NotWeights("other .bin files (not PyTorch)") from None
        if "Weights only load failed" in msg or "Unsupported global" in msg or "UnpicklingError" in type(e).__name__:
            first = next((ln.strip() for ln in msg.splitlines() if "Unsupported" in ln or "GLOBAL" in ln), "")
            first = first.split(" was not an allowed global")[0]
            raise SnapshotError(f"{path}: refused to load: the checkpoint holds Python objects outside the "
                                f"allow-list (tensors, containers, argparse.Namespace, paths, numpy data), "
                                f"and unpickling them could run code; save model.state_dict() instead. "
                                f"{first}".strip()) from None
        raise SnapshotError(f"{path}: cannot read as a PyTorch checkpoint "
                            f"(truncated or corrupt?): {msg.splitlines()[0] if msg else type(e).__name__}") from None


def find_state_dict(obj: Any, path: Path) -> tuple[dict, dict]:
    """(name -> tensor, the position the file records: {"epoch": ..., "step": ...}).

    Raises NotWeights for an optimizer/scheduler/RNG/scaler state, SnapshotError when no weights are found.
    """
    extra = {}
    if isinstance(obj, torch.Tensor):
        return {"params": obj}, extra
    if not isinstance(obj, Mapping):
        raise SnapshotError(f"{path}: holds a {type(obj).__name__}, not a state_dict")
    kind = non_weight_kind(obj)
    if kind is not None:
        raise NotWeights(kind)
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if tensors and len(tensors) == len(obj):
        return tensors, {}
    found = []
    for key, col in TIME_KEYS.items():
        v = obj.get(key)
        if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and col not in extra:
            extra[col] = v.item() if isinstance(v, np.generic) else v
            found.append(key)
    if found:
        extra["time_source"] = f"checkpoint file ({', '.join(found)})"
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


def strip_wrapper_prefix(names: Sequence[str]) -> dict[str, str]:
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


def load_tensors(item: Snapshot) -> tuple[dict[str, Any], dict]:
    """(name -> tensor, metadata the file records) of a PyTorch file, wrapper prefixes stripped; a
    memory-mapped result is kept in item.mapped."""
    if item.mapped is not None:
        return item.mapped, {}
    obj, mapped = torch_load(item.path)
    sd, extra = find_state_dict(obj, item.path)
    ren = strip_wrapper_prefix(list(sd))
    sd = {ren[k]: v for k, v in sd.items()}
    if mapped:
        item.mapped = sd
    return sd, extra


def is_float(dtype_tag: str) -> bool:
    return dtype_tag in ("F32", "F64", "F16", "BF16") or dtype_tag.startswith("torch.float") \
        or dtype_tag.startswith("torch.bfloat") or dtype_tag.startswith("float") or dtype_tag == "torch.half"


def parse_npz_header(path: Path) -> dict[str, tuple]:
    """name -> (shape, dtype tag, member name) of every array in an .npz, from the .npy headers alone
    (no array is read; object arrays are refused as np.load(allow_pickle=False) would)."""
    out = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for member in zf.namelist():
                if not member.endswith(".npy"):
                    continue
                with zf.open(member) as f:
                    shape, fortran, dtype = _npy_header(f)
                if dtype.hasobject:
                    raise SnapshotError(f"{path}: refused to load: array {member[:-4]!r} holds Python objects "
                                        f"(allow_pickle=False)")
                out[member[:-4]] = (tuple(shape), str(dtype), member, fortran)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise SnapshotError(f"{path}: cannot read as .npz (truncated or corrupt?): {e}") from None
    return out


def _npy_header(f) -> tuple:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    return np.lib.format.read_array_header_2_0(f)


def read_npz_pieces(item: Snapshot, names: Sequence[str], pieces, dst: np.ndarray) -> None:
    """Copy element ranges of arrays in an .npz into dst (float32): only the bytes of each range are
    read from an uncompressed member (np.savez), so column chunks read every byte once in total."""
    try:
        with zipfile.ZipFile(item.path) as zf:
            c = 0
            for t, a, b in pieces:
                shape, _, member, fortran = item.tensors[names[t]]
                with zf.open(member) as f:
                    _, _, dtype = _npy_header(f)
                    if fortran:  # element order on disk is not the C order we read in: whole array
                        flat = np.lib.format.read_array(zf.open(member), allow_pickle=False).reshape(-1)
                        dst[c:c + b - a] = flat[a:b]
                    else:
                        f.seek(f.tell() + a * dtype.itemsize)
                        raw = f.read((b - a) * dtype.itemsize)
                        if len(raw) != (b - a) * dtype.itemsize:
                            raise SnapshotError(f"{item.path}: truncated while reading array {names[t]!r}")
                        dst[c:c + b - a] = np.frombuffer(raw, dtype=dtype)
                c += b - a
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise SnapshotError(f"{item.path}: cannot read as .npz (truncated or corrupt?): {e}") from None


def read_header(item: Snapshot, memo: dict | None = None) -> dict:
    """Fill item.tensors (name -> (shape, dtype tag[, start, end])) and item.stat from the file; returns
    the metadata the file records about itself (Lightning's epoch/global_step). memo: see
    parse_safetensors_header."""
    if item.kind == "safetensors":
        tensors, item.data_start, _, item.stat = parse_safetensors_header(item.path, memo)
        ren = strip_wrapper_prefix(list(tensors))
        item.tensors = {ren[k]: v for k, v in tensors.items()}
        return {}
    st = item.path.stat()
    item.stat = (st.st_size, st.st_mtime_ns)
    if item.kind == "npz":
        arrays = parse_npz_header(item.path)
        ren = strip_wrapper_prefix(list(arrays))
        item.tensors = {ren[k]: v for k, v in arrays.items()}
        return {}
    sd, extra = load_tensors(item)
    item.tensors = {k: (tuple(v.shape), str(v.dtype)) for k, v in sd.items()}
    return extra


def read_safetensors_pieces(item: Snapshot, names: Sequence[str], pieces, dst: np.ndarray) -> None:
    """Copy the element ranges `pieces` [(tensor index into names, start, end)] of a safetensors file
    into dst (float32), side by side."""
    # mmap + one userspace copy per tensor: as fast as read() into a warm buffer, and ~10x faster
    # than read() into freshly allocated pages (measured: the kernel's page faults inside read()
    # dominate on this kind of VM).
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
            size = ST_ITEMSIZE[dt]
            off = item.data_start + start + a * size
            if off + n * size > len(mm):
                raise SnapshotError(f"{item.path}: truncated while reading tensor {names[t]!r}")
            if dt == "BF16":
                u = np.frombuffer(mm, dtype=np.uint16, count=n, offset=off).astype(np.uint32) << 16
                dst[c:c + n] = u.view(np.float32)
            else:
                dst[c:c + n] = np.frombuffer(mm, dtype=ST_DTYPES[dt], count=n, offset=off)
            c += n
    finally:
        try:
            mm.close()
        except BufferError:  # a view is still alive somewhere; the mapping goes with it
            pass
