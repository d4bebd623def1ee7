"""embed(): snapshots -> per-tensor Grams (cached) -> ClassicalMDS -> MDSResult (-> files).

compute_grams makes one pass over the snapshot files: column ranges of all rows go into a float32
buffer of at most ``max_memory`` bytes, so N x P larger than RAM works (each file is read once in
total); only the [L, N, N] float64 Gram must fit. Safetensors rows that fit in one range are mapped
instead of copied (snapshots/mapped.py). Rows are checked for NaN / Inf by the op itself; only when it
finds one are they scanned here, to name the file and tensor.
"""
from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .. import embedding_plot
from ..devices import resolve_device
from ..flat import ParamSpec
from ..ops import segment_gram
from ..snapshots import SnapshotError, open_source, select_tensors
from ..snapshots.mapped import map_rows
from . import duplicates, gram_cache
from .dissimilarity import layer_gram, squared_dissimilarity, zero_norm
from .estimator import ClassicalMDS
from .outputs import write_json, write_outputs


@dataclass
class MDSResult:
    """Everything an MDS run produced; figures are drawn from this alone (embedding_plot)."""

    coords: np.ndarray                      # [N, k] float64
    meta: list[dict]                        # one dict per snapshot (path, trajectory, epoch, ...)
    eigenvalues: np.ndarray                 # all (dense) or top k (iterative), descending
    captured: float                         # share of positive eigenvalue mass in the k dims
    negative_mass: float                    # sum |λ<0| / sum |λ|
    metric: str = "cosine"
    layer: str | None = None                # what the user asked for ("2", "conv1.*", None = all)
    selected: list[str] = field(default_factory=list)   # tensor names used
    n_params: int = 0                       # P of the selected tensors
    solver: str = "dense"
    mass_exact: bool = True
    device: str = "cpu"
    timings: dict = field(default_factory=dict)          # seconds per phase
    skipped: list[str] = field(default_factory=list)     # tensors / files left out, with why
    files: dict = field(default_factory=dict)            # kind -> written path
    title: str | None = None
    notes: list[str] = field(default_factory=list)       # e.g. copies drawn once

    @property
    def n(self) -> int:
        return int(self.coords.shape[0])

    def describe(self) -> str:
        """One line for titles: what is shown."""
        what = "all parameters" if not self.layer else f"layer {self.layer}"
        k = self.coords.shape[1]
        return (f"classical MDS of {what} ({self.metric}{' = 1 - cos' if self.metric == 'cosine' else ''}), "
                f"N={self.n}, {100 * self.captured:.1f}% of positive eigenvalue mass in {k} dims")

    def to_json(self) -> dict:
        return {
            "metric": self.metric, "layer": self.layer, "selected_tensors": self.selected,
            "n_snapshots": self.n, "n_params": self.n_params, "dims": int(self.coords.shape[1]),
            "eigenvalues": [float(v) for v in self.eigenvalues], "captured": self.captured,
            "negative_mass": self.negative_mass, "mass_exact": self.mass_exact, "solver": self.solver,
            "device": self.device, "timings": self.timings, "skipped": self.skipped, "notes": self.notes,
            "files": self.files,
        }


def embed(source, *, layer: str | None = None, metric: str = "cosine", dims: int = 2,
          select: str | None = None, out_dir: str | os.PathLike | None = None, annotate: str = "label",
          title: str | None = None, device: str = "auto", spec: ParamSpec | None = None,
          trajectory: Sequence[str] | str | None = None, solver: str = "auto",
          cache: bool = True, cache_dir: str | os.PathLike | None = None,
          max_memory: str | int | None = None, progress: bool | None = None,
          formats: Sequence[str] = ("png",), skip_bad: bool = False,
          group_by: str | None = None, copies: str = "auto",
          cache_max: str | int | None = None, gram_fn=None) -> MDSResult:
    """Classical MDS of snapshots; writes mds.csv/json/png/html into `out_dir` when given.

    source: a folder of checkpoints (any mix of .pt/.pth/.ckpt/.safetensors/.npz, or our store), a
    SnapshotStore, a list of (meta dict, flat tensor [P]) pairs, or an [N, P] tensor; pass `spec`
    (ParamSpec) with in-memory sources to select tensors by name or layers by number.
    layer: None (all parameters), a name glob ('conv1.*'; comma-separated for several), or the paper's
    numbering ("2" or "layer2" = the first weight-bearing module's weight and bias).
    select: a filter over metadata such as "stage >= 5 and trajectory in (a, b)".
    copies: "merge" draws snapshots with identical weights once (the others listed in its "aliases"
    column), "keep" draws every row; "auto" merges for files and keeps in-memory rows.
    annotate: the metadata column printed next to points ("label" = epoch, else step, else file name).
    cache / cache_dir / cache_max: the Gram cache (gram_cache.py), in the user's cache folder by default.
    gram_fn: replaces compute_grams (same signature), e.g. pylandscape.distributed's torchrun Gram.
    """
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    sset = open_source(source, spec=spec, group_by=group_by, skip_bad=skip_bad)
    timings["discover"] = time.perf_counter() - t0
    rows = sset.filter_rows(select=select, trajectory=trajectory)
    if len(rows) < 3:
        raise ValueError(f"{sset.describe()}: {len(rows)} snapshot(s) selected, MDS needs at least 3")
    tensor_idx = select_tensors(sset.spec, layer)
    t1 = time.perf_counter()
    grams, rows, gram_info = (gram_fn or compute_grams)(sset, rows, device=device, cache=cache, cache_dir=cache_dir,
                                           max_memory=max_memory, progress=progress, skip_bad=skip_bad,
                                           cache_max=cache_max, copies=copies, tensors=tensor_idx,
                                           background_save=True)  # written while the MDS and outputs run
    timings["gram"] = time.perf_counter() - t1
    timings.update({f"gram_{k}": v for k, v in gram_info.get("timings", {}).items()})
    metas = [dict(sset.meta[r]) for r in rows]
    copy_notes: list[str] = []
    if gram_info.get("copies"):
        grams, metas, copy_notes = merge_copies(grams, metas, gram_info["copies"])
    G = layer_gram(grams, tensor_idx)
    check_norms(G, metas, [sset.spec.names[i] for i in tensor_idx], metric)
    t2 = time.perf_counter()
    est = ClassicalMDS(dims, metric=metric, solver=solver, device=device)
    D2 = squared_dissimilarity(G, metric)
    # matplotlib loads while the eigensolver runs on one thread, with the GIL released (mds/lapack.py).
    # Not before the Gram: there it took the GIL from the main thread's stat and open calls (2,000 file
    # keys: 0.04 -> 0.8 s) and a core from the op's threads (which then wait for each other): ~2 s more on
    # the 2-core VM. Not before Δ²: its numpy steps each wait for the GIL (0.11 -> 0.4-0.6 s at N = 2,000).
    drawing = embedding_plot.import_in_background() if out_dir is not None else None
    est.fit_from_squared(D2)
    timings["mds"] = time.perf_counter() - t2
    sizes = sset.spec.sizes
    result = MDSResult(
        coords=est.embedding_, meta=metas, eigenvalues=est.eigenvalues_,
        captured=float(est.captured_), negative_mass=float(est.negative_mass_), metric=metric,
        layer=layer, selected=[sset.spec.names[i] for i in tensor_idx],
        n_params=int(sum(sizes[i] for i in tensor_idx)), solver=est.solver_, mass_exact=est.mass_exact_,
        device=str(resolve_device(device)), timings=timings,
        skipped=list(sset.skipped) + list(gram_info.get("skipped", [])), title=title, notes=copy_notes)
    result.timings["cache"] = gram_info.get("cache", "off")
    if "chunks" in gram_info:  # a pass over the files happened
        result.timings["read_chunks"] = gram_info["chunks"]
        result.timings["read_mode"] = gram_info.get("read_mode", "copied")
        if "read_GBps" in gram_info:
            result.timings["read_GBps"] = round(gram_info["read_GBps"], 3)
    if out_dir is not None:
        t3 = time.perf_counter()
        drawing.join()
        write_outputs(result, out_dir, annotate=annotate, formats=formats)
        result.timings["outputs"] = time.perf_counter() - t3
    if "finish" in gram_info:  # the cache file, written meanwhile
        gram_info["finish"]()
        result.timings["cache"] = gram_info["cache"]
    result.timings["total"] = time.perf_counter() - t0
    if out_dir is not None:  # rewrite the JSON with the final timings
        write_json(result, Path(out_dir) / "mds.json")
    return result




def parse_memory(s: str | int | None) -> int:
    """Bytes from '4G', '512M', '1.5GB', 1000000; None/'auto': half the available memory."""
    if s is None or (isinstance(s, str) and s.strip().lower() in ("", "auto")):
        avail = None
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        avail = int(line.split()[1]) * 1024
        except OSError:
            pass
        return max(256 << 20, (avail or (8 << 30)) // 2)
    if isinstance(s, (int, float)):
        return int(s)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", s, re.I)
    if not m:
        raise ValueError(f"--max-memory {s!r}: use a size like 512M, 4G or 1.5GB")
    mult = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)




def compute_grams(sset, rows: list[int], *, device="auto", cache: bool = True, cache_dir=None,
                  max_memory=None, progress: bool | None = None, skip_bad: bool = False,
                  on_warning=None, cache_max=None, copies: str = "auto",
                  tensors: Sequence[int] | None = None,
                  background_save: bool = False) -> tuple[torch.Tensor, list[int], dict]:
    """Per-tensor Grams [L, n, n] float64 of the given rows, from the cache or one pass over the files.

    Reads column ranges of all rows into a float32 buffer of at most `max_memory` bytes, so N x P
    larger than RAM works (each file is read once in total). Returns (grams, rows kept, info);
    info["copies"] lists groups of positions (into the rows kept) with identical weights when `copies`
    is "merge" (or "auto" and the snapshots are files). `tensors`: the ones needed; without a cache
    only they are read and computed (the others stay 0), with one every tensor is (for later runs).
    background_save: write the cache file in a thread and return at once; info["finish"]() waits for it
    (info["cache"] is "written" after that).
    """
    if copies not in ("auto", "merge", "keep"):
        raise ValueError(f"copies must be 'auto', 'merge' or 'keep', got {copies!r}")
    find_copies = copies == "merge" or (copies == "auto" and sset.cacheable)
    warn = on_warning or (lambda m: warnings.warn(m, stacklevel=3))
    info: dict[str, Any] = {"timings": {}, "skipped": []}
    spec = sset.spec
    dev = resolve_device(device)
    d = None
    keys = None
    spec_key = gram_cache.spec_hash(spec)
    if cache and sset.cacheable:
        keys = [sset.file_key(r) for r in rows]
        d = gram_cache.writable_dir(cache_dir)
        if d is None:
            where = cache_dir if cache_dir is not None else gram_cache.default_dir()
            warn(f"cache folder {where} is not writable: Gram not cached (pass --cache-dir DIR or --no-cache)")
            info["cache"] = "unwritable"
        else:
            t = time.perf_counter()
            hit = gram_cache.lookup(d, spec_key, keys)
            if hit is not None:
                G, idx, known = hit
                info["timings"]["cache_read"] = time.perf_counter() - t
                info["cache"] = "hit"
                if idx != list(range(G.shape[1])):  # a subset or another order of the cached rows
                    ix = torch.as_tensor(idx)
                    G = G[:, ix][:, :, ix].contiguous()
                if find_copies:
                    info["copies"] = _copy_groups(sset, rows, G, keys, known)
                return G, rows, info
            info["cache"] = "miss"
    n = len(rows)
    L = len(spec)
    show = sys.stderr.isatty() if progress is None else bool(progress)
    budget = parse_memory(max_memory)
    # a third of the budget for the float32 rows, the rest for the Gram kernel's float64 copies
    cols = max(1, budget // max(1, 3 * 4 * n))
    caching = d is not None and keys is not None
    chunks = sset.plan_chunks(cols, None if caching else tensors)
    grams = None
    bad: dict[int, str] = {}
    t_read = t_gram = 0.0
    read_bytes = 0
    mapped = _mapped_grams(sset, rows, chunks, show) if dev.type == "cpu" else None
    info["read_mode"] = "copied" if mapped is None else "mapped"
    if mapped is not None:
        grams, t_read, t_gram = mapped
    for ci, pieces in enumerate(chunks if mapped is None else []):
        t = time.perf_counter()
        desc = "reading snapshots" + (f" ({ci + 1}/{len(chunks)})" if len(chunks) > 1 else "")
        buf = sset.read_block(rows, pieces, progress=progress, desc=desc)
        t_read += time.perf_counter() - t
        read_bytes += buf.nbytes
        for r in bad:
            buf[r] = 0.0  # dropped below; zeros keep the Gram finite meanwhile
        t = time.perf_counter()
        lens = [b - a for _, a, b in pieces]
        offs = torch.tensor([0] + list(np.cumsum(lens)), dtype=torch.int64)
        # the buffer already respects --max-memory: let the op take it in one call
        kw = {"device": dev, "progress": show, "memory_budget": max(buf.nbytes, 1 << 20)}
        try:
            g = segment_gram(torch.from_numpy(buf), offs, **kw)
        except ValueError as e:  # the op checks every row; only then are rows scanned, to name the file
            if not _nonfinite_error(e):
                raise
            new = _nonfinite_rows(sset, rows, pieces, buf, skip=bad)
            if not new:
                raise
            if not skip_bad:
                raise SnapshotError(next(iter(new.values()))) from None
            bad.update(new)
            for r in new:
                buf[r] = 0.0
            g = segment_gram(torch.from_numpy(buf), offs, **kw)
        whole = [(k, 0, spec.sizes[k]) for k in range(L)]
        if grams is None and list(pieces) == whole:  # one chunk, every tensor whole: the op's output is it
            grams = g.to("cpu", torch.float64)
        else:
            if grams is None:
                grams = torch.zeros(L, n, n, dtype=torch.float64)
            for j, (ti, _, _) in enumerate(pieces):
                grams[ti] += g[j].to("cpu", torch.float64)
        t_gram += time.perf_counter() - t
        del buf
    if grams is None:  # no chunk at all (nothing selected)
        grams = torch.zeros(L, n, n, dtype=torch.float64)
    info["timings"].update({"read": t_read, "segment_gram": t_gram})
    if mapped is None:
        info["read_GBps"] = read_bytes / max(t_read, 1e-9) / 1e9
    info["chunks"] = len(chunks)
    if bad:
        for msg in bad.values():
            warn(f"skipped: {msg}")
        info["skipped"] = list(bad.values())
        keep = [r for r in range(n) if r not in bad]
        ix = torch.as_tensor(keep)
        grams = grams[:, ix][:, :, ix].contiguous()
        rows = [rows[r] for r in keep]
        keys = [keys[r] for r in keep] if keys is not None else None
    hashes: dict = {}
    if find_copies:
        info["copies"] = _copy_groups(sset, rows, grams, keys, {}, hashes)
    if d is not None and keys is not None:
        limit = gram_cache.DEFAULT_MAX_BYTES if cache_max is None else parse_memory(cache_max)

        def save(note) -> None:
            try:
                if gram_cache.save(d, spec_key, keys, grams, hashes, max_bytes=limit) is None:
                    note(f"the Gram ({grams.numel() * 8 / 2**20:.0f} MiB) is larger than the cache limit "
                         f"({limit / 2**20:.0f} MiB, --cache-max): not cached")
                else:
                    info["cache"] = "written"
            except OSError as e:
                note(f"could not write the Gram cache in {d}: {e}")
        if background_save:
            info["finish"] = _start(save, warn)
        else:
            save(warn)
    return grams, rows, info


def _mapped_grams(sset, rows: list[int], chunks, show: bool) -> tuple[torch.Tensor, float, float] | None:
    """One chunk of whole tensors, straight from the files' pages (snapshots/mapped.py): (grams, seconds
    mapping, seconds in the op), or None when mapping does not apply or a row is not finite (the copy
    path then names the file)."""
    if len(chunks) != 1 or any(a != 0 or b != sset.spec.sizes[t] for t, a, b in chunks[0]):
        return None
    t = time.perf_counter()
    m = map_rows([sset.items[r] for r in rows], sset.spec.names, [ti for ti, _, _ in chunks[0]])
    if m is None:
        return None
    t_map = time.perf_counter() - t
    t = time.perf_counter()
    L, n = len(sset.spec), len(rows)
    grams = None
    try:
        for run in m.runs():  # tensors adjacent in the files: one op call each
            c0, c1 = m.columns[run[0]][0], m.columns[run[-1]][1]
            offs = torch.tensor([0] + [m.columns[ti][1] - c0 for ti in run], dtype=torch.int64)
            g = segment_gram(m.X[:, c0:c1], offs, progress=show)
            if run == list(range(L)):  # every tensor, in spec order (a safetensors spec is in file order)
                grams = g
                continue
            if grams is None:
                grams = torch.zeros(L, n, n, dtype=torch.float64)
            for j, ti in enumerate(run):
                grams[ti] = g[j]
    except ValueError as e:
        if _nonfinite_error(e):
            return None
        raise
    return grams, t_map, time.perf_counter() - t


def _nonfinite_error(e: ValueError) -> bool:
    """segment_gram's error for a row with NaN / Inf (the C++ driver's and the reference's messages)."""
    return "NaN or inf" in str(e)


def _nonfinite_rows(sset, rows: list[int], pieces, buf: np.ndarray, skip) -> dict[int, str]:
    """Rows of buf (not in skip) holding NaN or Inf, each with a message naming its file and tensor."""
    spec = sset.spec
    out: dict[int, str] = {}
    for r in range(len(rows)):
        if r in skip or np.isfinite(buf[r]).all():
            continue
        c = 0
        for ti, a, b in pieces:
            if not np.isfinite(buf[r, c:c + b - a]).all():
                out[r] = f"{sset.meta[rows[r]]['path']}: tensor {spec.names[ti]!r} has NaN or Inf weights"
                break
            c += b - a
    return out


def _start(save, warn):
    """Run save(note) in a thread; returns the function that waits for it and passes its notes to warn.
    Not a daemon: an interpreter that exits early still finishes the (atomic) write."""
    notes: list[str] = []
    th = threading.Thread(target=save, args=(notes.append,), name="pylandscape-gram-cache")
    th.start()

    def finish() -> None:
        th.join()
        for m in notes:
            warn(m)
    return finish


def _copy_groups(sset, rows: list[int], grams: torch.Tensor, keys: list | None, known: dict,
                 new_hashes: dict | None = None) -> list[list[int]]:
    """Groups of positions with identical weights. Hashes of candidate rows come from `known` (the
    cache: row key json -> hash) or are computed (and then added to new_hashes by key json)."""
    cand = duplicates.candidates(grams)
    if not cand:
        return []
    hashes: dict[int, str] = {}
    missing = []
    for w in cand:
        k = json.dumps(keys[w]) if keys is not None else None
        if k is not None and k in known:
            hashes[w] = known[k]
        else:
            missing.append(w)
    computed = duplicates.row_hashes(sset, rows, missing)
    hashes.update(computed)
    if new_hashes is not None and keys is not None:
        new_hashes.update({json.dumps(keys[w]): h for w, h in hashes.items()})
    return duplicates.groups(hashes)


def merge_copies(grams: torch.Tensor, metas: list[dict], groups: list[list[int]]
                 ) -> tuple[torch.Tensor, list[dict], list[str]]:
    """Keep the first of each group of identical snapshots; its "aliases" column lists the others."""
    drop = set()
    lines = []
    for g in groups:
        first, others = g[0], g[1:]
        metas[first]["aliases"] = "; ".join(str(metas[o].get("path")) for o in others)
        drop.update(others)
        lines.append(f"{metas[first].get('path')} = {metas[first]['aliases']}")
    keep = [i for i in range(len(metas)) if i not in drop]
    ix = torch.as_tensor(keep)
    note = (f"{len(drop)} snapshot(s) with weights identical to another drawn once (aliases column): "
            f"{' | '.join(lines[:4])}{' | ...' if len(lines) > 4 else ''}")
    return grams[:, ix][:, :, ix].contiguous(), [metas[i] for i in keep], [note]


def check_norms(G: torch.Tensor, metas: list[dict], names: list[str], metric: str) -> None:
    if metric == "euclidean":
        return
    zero = torch.nonzero(zero_norm(torch.diagonal(G).cpu())).reshape(-1).tolist()
    if zero:
        raise SnapshotError(f"{metas[zero[0]]['path']}: the selected tensors ({', '.join(names[:6])}"
                            f"{', ...' if len(names) > 6 else ''}) are all zero: cosine is undefined "
                            f"({len(zero)} snapshot(s) like this; try --metric euclidean or another --layer)")

