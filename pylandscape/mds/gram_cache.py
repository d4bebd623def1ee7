"""The Gram cache: per-tensor Grams [L, N, N] float64 of a snapshot set, saved so that a second run
(another --layer, --metric, --select or --trajectory) reads no weights at all.

A file ``gram-<key>.safetensors`` holds the Grams and, in its metadata, the parameter spec's hash and
one identity (relative path, size, mtime_ns) per row. Any file whose rows cover the requested snapshots
is reused (rows picked and reordered).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

from ..flat import ParamSpec
from ..store import atomic_save_safetensors


def cache_dir_for(sset, cache_dir) -> Path | None:
    """The cache folder (created), or None when it cannot be written."""
    if cache_dir is not None:
        d = Path(cache_dir)
    else:
        d = sset.root / ".pylandscape-cache"
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = d / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        return d
    except OSError:
        return None


def spec_hash(spec: ParamSpec) -> str:
    """Names and shapes of the tensors, hashed: a Gram is only reused for the same spec."""
    return hashlib.sha256(json.dumps(spec.to_json(), sort_keys=True).encode()).hexdigest()[:16]


def lookup(d: Path, spec_key: str, keys: list) -> tuple[torch.Tensor, list[int]] | None:
    """A cached [L, M, M] Gram whose rows include every key: (that Gram, row index of each key)."""
    want = {json.dumps(k): i for i, k in enumerate(keys)}
    exact = d / f"gram-{rows_hash(spec_key, keys)}.safetensors"
    candidates = [exact] if exact.exists() else []
    candidates += sorted((p for p in d.glob("gram-*.safetensors") if p != exact),
                         key=lambda p: p.stat().st_mtime, reverse=True)
    for p in candidates:
        try:
            with safe_open(str(p), framework="pt") as f:
                md = f.metadata() or {}
                if md.get("spec") != spec_key:
                    continue
                rows = json.loads(md["rows"])
                pos = {json.dumps(k): i for i, k in enumerate(rows)}
                if not all(k in pos for k in want):
                    continue
                G = f.get_tensor("gram")
            return G, [pos[k] for k in want]
        except Exception:  # noqa: BLE001 - a broken cache file is ignored, never fatal
            continue
    return None


def rows_hash(spec_key: str, keys: list) -> str:
    return hashlib.sha256((spec_key + json.dumps(keys)).encode()).hexdigest()[:20]


def save(d: Path, spec_key: str, keys: list, grams: torch.Tensor) -> Path:
    """Write the Grams of the rows `keys` atomically; returns the file."""
    path = d / f"gram-{rows_hash(spec_key, keys)}.safetensors"
    atomic_save_safetensors(path, {"gram": grams}, metadata={"spec": spec_key, "rows": json.dumps(keys)})
    return path
