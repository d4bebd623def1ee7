"""Rows of same-layout safetensors files as one strided float32 matrix, mapped from the page cache.

Copying 2,000 x 188,810 float32 snapshots into fresh memory took 1.0-2.2 s on a 2-core VM (the page
faults of fresh pages, then the copy). Here every file is mapped at a fixed stride inside one reserved
address range (MAP_FIXED), so row r of the matrix is file r's float32 data where the page cache already
holds it: ~0.03 s for those 2,000 files, and the Gram kernel reads the pages directly.

Used when every file has the same header layout for the wanted tensors, those are float32 and 4-byte
aligned, and the host is Linux on x86-64 or arm64; `map_rows` returns None otherwise (the caller copies).
A file truncated while mapped raises SIGBUS in whoever reads it, as with any mmap (safetensors' own
safe_open too); PYLANDSCAPE_MAP_FILES=0 turns mapping off.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import platform
import sys
import weakref
from dataclasses import dataclass
from typing import Sequence

import torch

from .formats import Snapshot

# Python's mmap module has no MAP_FIXED / MAP_NORESERVE: their Linux values on x86-64 and arm64 (enabled())
_MAP_FIXED, _MAP_NORESERVE = 0x10, 0x4000
_MAP_FAILED = ctypes.c_void_p(-1).value


@dataclass
class MappedRows:
    """X [n, width] float32, row r = file r's bytes; columns[t] = (first, end) column of tensor t in X."""

    X: torch.Tensor
    columns: dict[int, tuple[int, int]]

    def runs(self) -> list[list[int]]:
        """The tensors in column order, cut where a column range is not wanted (one op call per run)."""
        order = sorted(self.columns, key=lambda t: self.columns[t][0])
        out: list[list[int]] = []
        for t in order:
            if out and self.columns[out[-1][-1]][1] == self.columns[t][0]:
                out[-1].append(t)
            else:
                out.append([t])
        return out


def enabled() -> bool:
    return (os.environ.get("PYLANDSCAPE_MAP_FILES", "1") != "0" and sys.platform.startswith("linux")
            and platform.machine() in ("x86_64", "aarch64") and sys.byteorder == "little"
            and ctypes.sizeof(ctypes.c_void_p) == 8)


def _libc():
    # PyDLL: the GIL stays held. Released per call (CDLL, os.open), 2,000 files took 0.7 s instead of 0.06 s
    # while another thread imported matplotlib: each release handed it the GIL for a switch interval
    libc = ctypes.PyDLL(None, use_errno=True)
    libc.open.restype = ctypes.c_int
    libc.open.argtypes = [ctypes.c_char_p, ctypes.c_int]
    libc.close.restype = ctypes.c_int
    libc.close.argtypes = [ctypes.c_int]
    libc.lseek.restype = ctypes.c_long
    libc.lseek.argtypes = [ctypes.c_int, ctypes.c_long, ctypes.c_int]
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                          ctypes.c_long]
    libc.munmap.restype = ctypes.c_int
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.madvise.restype = ctypes.c_int
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def _max_map_count() -> int:
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 65530  # the kernel's default


def layout(items: Sequence[Snapshot], names: Sequence[str], tensors: Sequence[int]
           ) -> tuple[int, int, dict[int, tuple[int, int]]] | None:
    """(first byte, end byte) of the wanted tensors in every file, and their columns; None when the files
    differ in layout or a wanted tensor is not 4-byte aligned float32."""
    if not items or not tensors or any(it.kind != "safetensors" for it in items):
        return None
    first = items[0]
    want = [names[t] for t in tensors]
    ref = [first.tensors.get(n) for n in want]
    if any(v is None or v[1] != "F32" for v in ref):
        return None
    for it in items[1:]:  # the same header: tuples compare in one pass, no per-file parsing
        if it.data_start != first.data_start or any(it.tensors.get(n) != v for n, v in zip(want, ref)):
            return None
    lo = min(v[2] for v in ref)
    hi = max(v[3] for v in ref)
    if (first.data_start + lo) % 4 or any((v[2] - lo) % 4 for v in ref):
        return None
    cols = {t: ((v[2] - lo) // 4, (v[3] - lo) // 4) for t, v in zip(tensors, ref)}
    return first.data_start + lo, first.data_start + hi, cols


def map_rows(items: Sequence[Snapshot], names: Sequence[str], tensors: Sequence[int]) -> MappedRows | None:
    """The wanted tensors of every file as rows of one strided float32 matrix (no copy), or None when
    mapping does not apply (see the module note) or fails (a file gone or shorter now, too many mappings
    for vm.max_map_count): the caller's copy then reads the files and names any bad one."""
    if not enabled():
        return None
    lay = layout(items, names, tensors)
    if lay is None:
        return None
    lo, hi, cols = lay
    n = len(items)
    if 2 * n + 4096 > _max_map_count():  # a file's mapping and the gap after it: two areas each
        return None
    libc = _libc()
    page = mmap.PAGESIZE
    stride = -(-hi // page) * page  # each file from offset 0, so the page offsets match
    total = n * stride
    base = libc.mmap(None, total, 0, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE, -1, 0)
    if base in (None, _MAP_FAILED):
        return None
    region = (ctypes.c_char * total).from_address(base)
    weakref.finalize(region, libc.munmap, base, total)  # when the last view of X is gone (or on failure)
    for r, it in enumerate(items):
        fd = libc.open(os.fsencode(it.path), os.O_RDONLY | os.O_CLOEXEC)
        if fd < 0:
            return None
        try:
            if libc.lseek(fd, 0, os.SEEK_END) < hi:  # shorter than its header said: not mapped (SIGBUS)
                return None
            # private and writable: a stray write copies the page instead of faulting; NORESERVE: no commit charge
            a = libc.mmap(base + r * stride, hi, mmap.PROT_READ | mmap.PROT_WRITE,
                          mmap.MAP_PRIVATE | _MAP_FIXED | _MAP_NORESERVE, fd, 0)
        finally:
            libc.close(fd)
        if a != base + r * stride:
            return None
        libc.madvise(base + r * stride, hi, mmap.MADV_WILLNEED)  # files not in the page cache: read ahead now
    width = (hi - lo) // 4
    flat = torch.frombuffer(region, dtype=torch.float32, count=((n - 1) * stride) // 4 + width, offset=lo)
    X = flat.as_strided((n, width), (stride // 4, 1))
    return MappedRows(X, cols)
