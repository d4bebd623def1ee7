"""SnapshotSet: snapshots sharing one ParamSpec, each with metadata, read column range by column range.

Reading goes straight from the file into one preallocated float32 [rows, columns] buffer (safetensors:
mmap + one copy per tensor, no intermediate buffers), so the snapshots never need to fit in memory all
at once. Only weights are used: BatchNorm running statistics/counters (`flat.is_non_parameter`) and
integer tensors are skipped and reported.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..flat import ParamSpec
from ..store import SnapshotStore
from .formats import Snapshot, SnapshotError, load_tensors, read_npz_pieces, read_safetensors_pieces
from .layouts import find_snapshots, label_of, sort_order
from .selection import columns, parse_select


@dataclass
class SnapshotSet:
    """Snapshots sharing one ParamSpec (weights only), each with a metadata dict."""

    spec: ParamSpec
    items: list[Snapshot]
    meta: list[dict]
    root: Path | None = None
    skipped: list[str] = field(default_factory=list)
    matrix: torch.Tensor | None = None          # in-memory sources: [N, P]
    _real_dirs: dict = field(default_factory=dict, repr=False)   # folder -> its resolved path

    def __len__(self) -> int:
        return len(self.items)

    @property
    def cacheable(self) -> bool:
        return self.matrix is None and self.root is not None

    def describe(self) -> str:
        return str(self.root) if self.root is not None else "in-memory snapshots"

    def file_key(self, i: int) -> list:
        """(absolute path, size, mtime_ns): the snapshot's identity in the (shared) Gram cache; it
        changes whenever the file is rewritten. Size and mtime are those seen when the header was read."""
        item = self.items[i]
        p = item.path
        if item.stat is None:
            st = p.stat()
            item.stat = (st.st_size, st.st_mtime_ns)
        return [str(self._resolve(p)), *item.stat]

    def _resolve(self, p: Path) -> Path:
        """p.resolve(), with each folder resolved once: a realpath per file (an lstat per path component)
        took 0.35 s for 2,000 files on a busy 2-core VM."""
        if p.is_symlink():
            return p.resolve()
        d = self._real_dirs.get(p.parent)
        if d is None:
            d = self._real_dirs[p.parent] = p.parent.resolve()
        return d / p.name

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
            pred = parse_select(select, columns=columns(self.meta))
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

    def plan_chunks(self, width: int, tensors: Sequence[int] | None = None) -> list[list[tuple[int, int, int]]]:
        """The selected tensors (default: all) cut into pieces lists of at most `width` columns each."""
        sizes = self.spec.sizes
        chunks: list[list[tuple[int, int, int]]] = [[]]
        room = width
        for t in (range(len(self.spec)) if tensors is None else sorted(tensors)):
            a = 0
            while a < sizes[t]:
                if room == 0:
                    chunks.append([])
                    room = width
                b = min(sizes[t], a + room)
                chunks[-1].append((t, a, b))
                room -= b - a
                a = b
        return [c for c in chunks if c]

    def read_block(self, rows: Sequence[int], pieces: Sequence[tuple[int, int, int]],
                   out: np.ndarray | None = None, progress: bool | None = None,
                   desc: str = "reading") -> np.ndarray:
        """float32 [len(rows), sum of piece lengths]: the pieces of each row, side by side."""
        width = sum(b - a for _, a, b in pieces)
        if out is None:
            # torch.empty, not np.empty: numpy asks for transparent huge pages for large arrays (madvise),
            # and under the kernel's usual THP defrag=madvise their first touch stalls in compaction:
            # reading 2,000 x 188,810 float32 from the page cache into a fresh numpy buffer took 7.7-11.9 s
            # on this 2-core VM, into a torch one 2.0-3.4 s (measured side by side, same process)
            out = torch.empty(len(rows), width, dtype=torch.float32).numpy()
        bar = tqdm(total=len(rows), desc=desc, unit="snap",
                   disable=(not progress) if progress is not None else None, leave=False)
        workers = _read_workers(len(rows))
        with bar:
            if workers == 1:
                for r, i in enumerate(rows):
                    self._read_row(i, pieces, out[r])
                    bar.update(1)
            else:
                # rows into disjoint slices of out: the copies (numpy releases the GIL for them) and the page
                # faults of fresh memory run on several cores (one core read 1.5 GB in ~2 s on the AMD VM)
                pool = ThreadPoolExecutor(workers)
                try:
                    for _ in pool.map(lambda ri: self._read_row(ri[1], pieces, out[ri[0]]), enumerate(rows)):
                        bar.update(1)
                finally:  # a bad file: its error now, not after every other row was read
                    pool.shutdown(wait=True, cancel_futures=True)
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
            read_safetensors_pieces(item, names, pieces, dst)
            return
        if item.kind == "npz":
            read_npz_pieces(item, names, pieces, dst)
            return
        sd, _ = load_tensors(item)
        c = 0
        for t, a, b in pieces:
            v = sd[names[t]]
            v = v.detach().reshape(-1)[a:b].float().numpy() if isinstance(v, torch.Tensor) \
                else np.asarray(v).reshape(-1)[a:b]
            dst[c:c + b - a] = v
            c += b - a


def _read_workers(n_rows: int) -> int:
    """Threads for reading rows: up to 4 of the cores this process may use (PYLANDSCAPE_READ_THREADS
    overrides it; 1 reads in the calling thread)."""
    env = os.environ.get("PYLANDSCAPE_READ_THREADS")
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise ValueError(f"PYLANDSCAPE_READ_THREADS={env!r}: expected a whole number of threads") from None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cores, n_rows // 8))


def discover(root: str | os.PathLike, *, group_by: str | None = None, skip_bad: bool = False,
             on_warning: Callable[[str], None] | None = None) -> SnapshotSet:
    """Every snapshot below `root` (headers read, one shared spec checked), sorted by run and step."""
    found = find_snapshots(root, group_by=group_by, skip_bad=skip_bad, on_warning=on_warning)
    return SnapshotSet(spec=found.spec, items=found.items, meta=found.meta, root=found.root,
                       skipped=found.skipped)


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
    for m in metas:
        m.setdefault("label", label_of(m))
    items = [Snapshot("memory", None, {}, row=i) for i in range(X.shape[0])]
    order = sort_order(metas)
    return SnapshotSet(spec=spec, items=[items[i] for i in order], meta=[metas[i] for i in order],
                       matrix=X)

