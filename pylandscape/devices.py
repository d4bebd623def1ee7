"""Where work runs: one meaning of ``device="auto"`` for every command and experiment, and the CPU threads."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``None``/"auto" means the GPU when torch sees one, else the CPU."""
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@contextlib.contextmanager
def caller_threads() -> Iterator[None]:
    """Give torch's CPU thread count back when the block ends: commands set it from --threads or a config, and
    a command's main() called in-process (tests, notebooks) must not leave the caller on that count."""
    before = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
