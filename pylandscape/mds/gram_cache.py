"""The Gram cache: per-tensor Grams [L, N, N] float64 of a snapshot set, saved so that a second run
(another --layer, --metric, --select or --trajectory) reads no weights at all.

Where: the user's cache folder, never the snapshot folder: ``$PYLANDSCAPE_CACHE_DIR``, else
``$XDG_CACHE_HOME/pylandscape``, else ``~/.cache/pylandscape`` (or ``--cache-dir``).
What: ``gram-v<ALGORITHM_VERSION>-<spec hash>-<rows hash>.safetensors`` holds the Grams and, in its
metadata, one identity per row (absolute path, size, mtime_ns) and the content hashes of rows that
have an identical-weight copy. A file whose rows cover the requested snapshots is reused (rows picked
and reordered); a file written by another ALGORITHM_VERSION is never read. Size: at most ``max_bytes``
in all; the least recently used files go first (a hit refreshes a file's mtime).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch
from safetensors import safe_open

from ..flat import ParamSpec
from ..store import atomic_save_safetensors

#: Bump whenever what the Gram pass computes changes (kernel, reading, dtype handling): files written
#: under another version are never reused.
ALGORITHM_VERSION = 2
DEFAULT_MAX_BYTES = 4 << 30
ENV_DIR = "PYLANDSCAPE_CACHE_DIR"


def default_dir() -> Path:
    """$PYLANDSCAPE_CACHE_DIR, else $XDG_CACHE_HOME/pylandscape, else ~/.cache/pylandscape."""
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pylandscape"


def writable_dir(cache_dir=None) -> Path | None:
    """The cache folder (created), or None when it cannot be written."""
    d = Path(cache_dir) if cache_dir is not None else default_dir()
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = d / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        return d
    except OSError:
        return None


def spec_hash(spec: ParamSpec) -> str:
    """Names and shapes of the tensors and the algorithm version, hashed: a Gram is only reused for both."""
    text = json.dumps({"version": ALGORITHM_VERSION, "spec": spec.to_json()}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def rows_hash(spec_key: str, keys: list) -> str:
    return hashlib.sha256((spec_key + json.dumps(keys)).encode()).hexdigest()[:20]


def _name(spec_key: str, keys: list) -> str:
    return f"gram-v{ALGORITHM_VERSION}-{spec_key}-{rows_hash(spec_key, keys)}.safetensors"


def lookup(d: Path, spec_key: str, keys: list) -> tuple[torch.Tensor, list[int], dict] | None:
    """A cached [L, M, M] Gram whose rows include every key: (that Gram, row index of each key,
    {row key json: content hash} of the rows known to have copies)."""
    want = [json.dumps(k) for k in keys]
    exact = d / _name(spec_key, keys)
    candidates = [exact] if exact.exists() else []
    candidates += sorted((p for p in d.glob(f"gram-v{ALGORITHM_VERSION}-{spec_key}-*.safetensors")
                          if p != exact), key=lambda p: p.stat().st_mtime, reverse=True)
    for p in candidates:
        try:
            with safe_open(str(p), framework="pt") as f:
                md = f.metadata() or {}
                if md.get("spec") != spec_key or md.get("version") != str(ALGORITHM_VERSION):
                    continue
                pos = {json.dumps(k): i for i, k in enumerate(json.loads(md["rows"]))}
                if not all(k in pos for k in want):
                    continue
                G = f.get_tensor("gram")
            os.utime(p)  # recently used: evicted last
            return G, [pos[k] for k in want], json.loads(md.get("hashes", "{}"))
        except Exception:  # noqa: BLE001 - a broken cache file is ignored, never fatal
            continue
    return None


def save(d: Path, spec_key: str, keys: list, grams: torch.Tensor, hashes: dict | None = None,
         max_bytes: int = DEFAULT_MAX_BYTES) -> Path | None:
    """Write the Grams of the rows `keys` atomically, then evict the oldest files above max_bytes.
    Returns the file, or None when this Gram alone is larger than max_bytes (not written)."""
    if grams.numel() * grams.element_size() > max_bytes:
        return None
    path = d / _name(spec_key, keys)
    atomic_save_safetensors(path, {"gram": grams},
                            metadata={"version": str(ALGORITHM_VERSION), "spec": spec_key,
                                      "rows": json.dumps(keys), "hashes": json.dumps(hashes or {})})
    evict(d, max_bytes, keep=path)
    return path


def entries(d: Path) -> list[dict]:
    """Every cache file, oldest first: path, bytes, mtime, rows, version."""
    out = []
    for p in d.glob("gram-*.safetensors"):
        try:
            st = p.stat()
            with safe_open(str(p), framework="pt") as f:
                md = f.metadata() or {}
            rows = len(json.loads(md.get("rows", "[]")))
            version = md.get("version", "1")
        except Exception:  # noqa: BLE001 - unreadable files are listed (and evicted) too
            rows, version = None, "?"
            st = p.stat()
        out.append({"path": p, "bytes": st.st_size, "mtime": st.st_mtime, "rows": rows, "version": version})
    return sorted(out, key=lambda e: e["mtime"])


def evict(d: Path, max_bytes: int, keep: Path | None = None) -> list[Path]:
    """Remove the least recently used files until the folder holds at most max_bytes."""
    files = entries(d)
    total = sum(e["bytes"] for e in files)
    removed = []
    for e in files:
        if total <= max_bytes:
            break
        if keep is not None and e["path"] == keep:
            continue
        try:
            e["path"].unlink()
        except OSError:
            continue
        total -= e["bytes"]
        removed.append(e["path"])
    return removed


def clear(d: Path) -> tuple[int, int]:
    """Remove every cache file: (files, bytes) removed."""
    n = size = 0
    for e in entries(d):
        try:
            e["path"].unlink()
        except OSError:
            continue
        n += 1
        size += e["bytes"]
    return n, size


def describe(d: Path) -> str:
    """Human-readable listing for `python -m pylandscape.mds cache --list`."""
    files = entries(d)
    lines = [f"Gram cache {d}: {len(files)} file(s), {sum(e['bytes'] for e in files) / 2**20:.1f} MiB "
             f"(algorithm version {ALGORITHM_VERSION})"]
    for e in files:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(e["mtime"]))
        stale = "" if e["version"] == str(ALGORITHM_VERSION) else f"  (version {e['version']}: never reused)"
        lines.append(f"  {e['path'].name}  {e['bytes'] / 2**20:8.1f} MiB  {e['rows']} snapshots  "
                     f"last used {when}{stale}")
    return "\n".join(lines)
