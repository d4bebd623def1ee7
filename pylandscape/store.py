"""The snapshot store our trainers write and the MDS reads.

Layout of a store folder::

    spec.json                      parameter names and shapes (+ free-form "info")
    manifest.jsonl                 one JSON object per snapshot, appended after its file is complete
    snapshots/0000000.safetensors  the snapshot's parameters by name (readable by any safetensors tool)

Safe and crash-proof: files are written to a temporary name, fsync'ed and renamed; a snapshot counts
only once its manifest line (newline-terminated) is on disk, so a run killed at any moment loses
nothing that was reported saved, and a resumed run overwrites half-written leftovers.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from safetensors.torch import load_file, save_file

from .flat import ParamSpec, flatten_tensors, unflatten

MANIFEST = "manifest.jsonl"
SPEC = "spec.json"
SNAPDIR = "snapshots"
# Metadata columns every snapshot may carry (others are kept too).
META_FIELDS = ("run", "trajectory", "stage", "epoch", "step", "train_error", "train_loss",
               "test_error", "test_loss", "seed")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_save_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                            metadata: Mapping[str, str] | None = None) -> None:
    """safetensors.save_file, but atomic (temp file + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp,
                  metadata=dict(metadata) if metadata else None)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def _read_manifest(path: Path) -> list[dict]:
    if not path.exists():
        return []
    raw = path.read_bytes()
    entries = []
    for i, line in enumerate(raw.split(b"\n")[:-1]):  # a last piece without "\n" is an unfinished write
        if not line.strip():
            continue
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {i + 1} is not valid JSON ({e})") from None
    return entries


def _ends_with_newline(path: Path) -> bool:
    """True for an empty file or one whose last byte is a newline."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return True
        f.seek(size - 1)
        return f.read(1) == b"\n"


class SnapshotStore:
    """Append-only folder of weight snapshots with per-snapshot metadata."""

    def __init__(self, root: str | os.PathLike, spec: ParamSpec | None = None,
                 info: Mapping[str, Any] | None = None):
        self.root = Path(root)
        spec_path = self.root / SPEC
        if spec_path.exists():
            on_disk = json.loads(spec_path.read_text())
            self.spec = ParamSpec.from_json(on_disk)
            self.info = on_disk.get("info", {})
            if spec is not None and spec != self.spec:
                raise ValueError(f"{spec_path}: store holds tensors {self.spec.names} with other shapes "
                                 f"than the model being saved; use another folder")
        elif spec is not None:
            self.spec = spec
            self.info = dict(info or {})
            self.root.mkdir(parents=True, exist_ok=True)
            atomic_write_json(spec_path, {**spec.to_json(), "info": self.info})
        else:
            raise FileNotFoundError(f"{self.root} is not a pylandscape store (no {SPEC})")
        self._entries = _read_manifest(self.root / MANIFEST)

    @staticmethod
    def is_store(path: str | os.PathLike) -> bool:
        return (Path(path) / SPEC).exists() and (Path(path) / MANIFEST).exists()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def entries(self) -> list[dict]:
        """Metadata of every complete snapshot, in write order (each has 'file' and 'index')."""
        return list(self._entries)

    def path(self, i: int) -> Path:
        return self.root / self._entries[i]["file"]

    def append(self, params: torch.Tensor | Mapping[str, torch.Tensor], **meta: Any) -> int:
        """Save one snapshot (a flat [P] buffer or a name->tensor mapping) and return its index."""
        if isinstance(params, torch.Tensor):
            tensors = unflatten(params.detach().cpu(), self.spec)
        else:
            missing = [n for n in self.spec.names if n not in params]
            if missing:
                raise ValueError(f"snapshot lacks tensors {missing} of the store's spec")
            tensors = {n: params[n] for n in self.spec.names}
        index = len(self._entries)
        rel = f"{SNAPDIR}/{index:07d}.safetensors"
        atomic_save_safetensors(self.root / rel, tensors)
        entry = {"index": index, "file": rel, **{k: _jsonable(v) for k, v in meta.items()}}
        line = (json.dumps(entry, sort_keys=True) + "\n").encode()
        mpath = self.root / MANIFEST
        # A killed earlier run may have left an unterminated line: cut it before appending. Only the
        # last byte is read to check (reading the whole manifest made N appends read O(N^2) bytes)
        if mpath.exists() and not _ends_with_newline(mpath):
            raw = mpath.read_bytes()
            atomic_write_bytes(mpath, raw[: raw.rfind(b"\n") + 1])
        with open(mpath, "ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self._entries.append(entry)
        return index

    def load(self, i: int) -> dict[str, torch.Tensor]:
        return load_file(str(self.path(i)))

    def load_flat(self, i: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        sd = self.load(i)
        return flatten_tensors((sd[n] for n in self.spec.names), dtype)

    def __iter__(self) -> Iterator[tuple[dict, torch.Tensor]]:
        for i, e in enumerate(self._entries):
            yield e, self.load_flat(i)

    def select(self, **where: Any) -> list[int]:
        """Indices whose metadata equals every given value."""
        return [i for i, e in enumerate(self._entries) if all(e.get(k) == v for k, v in where.items())]


def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if hasattr(v, "item") and callable(v.item):  # numpy scalars
        try:
            return v.item()
        except Exception:
            return v
    return v
