"""Read any folder of checkpoints safely and fast: the input side of `python -m pylandscape.mds`.

formats.py: what one file holds (safetensors, torch, npz), read without running code from it;
layouts.py: which files below a folder are snapshots, and their run/step/epoch;
source.py: SnapshotSet (one spec, metadata, column-range reads) and open_source for any input;
selection.py: `--layer` (which tensors) and `--select` (which snapshots).
"""
from .formats import (
           STATE_DICT_KEYS,
           SUFFIXES,
           WRAPPER_PREFIXES,
           Snapshot,
           SnapshotError,
)
from .layouts import find_snapshots
from .selection import paper_layers, parse_select, select_tensors
from .source import SnapshotSet, discover, open_source, skipped_buffers

__all__ = ["STATE_DICT_KEYS", "SUFFIXES", "Snapshot", "SnapshotError", "SnapshotSet", "WRAPPER_PREFIXES",
           "discover", "find_snapshots", "open_source", "paper_layers", "parse_select", "select_tensors",
           "skipped_buffers"]
