"""`python -m pylandscape.mds --distributed` under torchrun: every rank computes its share of the Gram
(pylandscape/distributed/gram.py), rank 0 does the MDS and writes the outputs; the other ranks exit once their
blocks are sent. The Gram cache is bypassed (each rank would otherwise need the whole Gram to write it).
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from ..devices import resolve_device
from ..distributed.gram import DEFAULT_PANEL_ROWS, distributed_gram
from ..snapshots import SnapshotError
from .pipeline import _copy_groups, parse_memory

#: seconds a rank waits in a collective before giving up (a rank that died without a word)
DEFAULT_TIMEOUT_S = 1800


class DistributedMDS:
    """The process group of one torchrun launch and the Gram hook `embed(gram_fn=...)` calls."""

    def __init__(self, device: str = "auto", timeout_s: float | None = None,
                 panel_rows: int = DEFAULT_PANEL_ROWS):
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise ValueError("--distributed needs the environment torchrun sets (RANK, WORLD_SIZE, MASTER_ADDR): "
                             "launch with `torchrun --nproc-per-node K -m pylandscape.mds ... --distributed`")
        dev = resolve_device(device)
        if dev.type == "cuda":
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(dev)
        self.device = dev
        self.panel_rows = panel_rows
        timeout = timeout_s if timeout_s is not None else float(os.environ.get("PYLANDSCAPE_DIST_TIMEOUT",
                                                                                DEFAULT_TIMEOUT_S))
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout))
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def gram(self, sset, rows, max_memory=None, progress=None):
        return distributed_gram(sset, rows, device=self.device if self.device.type == "cuda" else None,
                                max_memory=parse_memory(max_memory), panel_rows=self.panel_rows,
                                progress=bool(progress) and self.is_main)

    def compute_grams(self, sset, rows, *, device="auto", cache=True, cache_dir=None, max_memory=None,
                      progress=None, skip_bad=False, on_warning=None, cache_max=None, copies="auto", tensors=None,
                      background_save=False):
        """Rank 0's replacement for pipeline.compute_grams (same signature and return value). Every tensor's
        Gram is computed (`tensors` is only a hint there) and nothing is cached, so there is nothing to save."""
        if skip_bad:
            raise ValueError("--skip-bad is not supported with --distributed (every rank must keep the same rows)")
        grams, info = self.gram(sset, rows, max_memory, progress)
        info["cache"] = "off (distributed)"
        info["chunks"] = -(-sset.spec.numel // info["cols"])
        info["read_GBps"] = info["read_bytes"] / max(info["timings"]["read"], 1e-9) / 1e9
        info["skipped"] = []
        if copies == "merge" or (copies == "auto" and sset.cacheable):
            info["copies"] = _copy_groups(sset, rows, grams, None, {})
        return grams, rows, info

    def serve(self, sset, select=None, trajectory=None, max_memory=None, skip_bad=False) -> int:
        """A rank other than 0: compute and send its share of the Gram of the rows rank 0 selects too."""
        if skip_bad:
            raise ValueError("--skip-bad is not supported with --distributed (every rank must keep the same rows)")
        rows = sset.filter_rows(select=select, trajectory=trajectory)
        if len(rows) < 3:
            raise SnapshotError(f"{sset.describe()}: {len(rows)} snapshot(s) selected, MDS needs at least 3")
        self.gram(sset, rows, max_memory, False)
        return 0

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
