"""Per-layer Gram matrices of many snapshots, streamed block pair by block pair (the Gram -> 1 - cos
step is pylandscape.mds.dissimilarity).

Why a Gram and not distances directly: one pass of BLAS-speed products gives every layer's Gram, and any
group of layers (the whole model included) is then a sum of those. The op behind it
(`torch.ops.pylandscape.segment_gram`) keeps the products accurate for nearly parallel rows, so
1 - cos computed here in fp64 stays accurate down to 1 - cos ~ 1e-10.

Memory: the driver keeps at most two panels of rows resident (each about memory_budget / 4 bytes of
input), plus the op's own workspace (about the size of the two panels again, fp32) and the output
[L, N, M] float64 (8 L N M bytes, which is the floor: N = 10,000, L = 12 is 9.6 GB).
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

import torch

PairFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def _as_2d(block, name: str) -> torch.Tensor:
    if not isinstance(block, torch.Tensor):
        raise ValueError(f"{name}: row blocks must be torch tensors, got {type(block).__name__}")
    if block.dim() == 1:
        block = block.unsqueeze(0)
    if block.dim() != 2:
        raise ValueError(f"{name}: row blocks must be [rows, P] (or one row [P]), got shape {tuple(block.shape)}")
    return block


class _Source:
    """Row blocks from a tensor, a list/tuple of blocks, or any re-iterable (iter() restarts it).

    A one-shot iterator (iter(x) is x) cannot be read twice, so its blocks are kept in memory: pass a
    re-iterable (e.g. an object whose __iter__ reads the snapshots from disk) to really stream.
    """

    def __init__(self, x, name: str):
        self.name = name
        if isinstance(x, torch.Tensor):
            self.blocks = [_as_2d(x, name)]
        elif isinstance(x, (list, tuple)):
            self.blocks = [_as_2d(b, name) for b in x]
        elif iter(x) is x:
            self.blocks = [_as_2d(b, name) for b in x]
        else:
            self.blocks = None
            self.iterable = x

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self.blocks is not None:
            yield from self.blocks
        else:
            for b in self.iterable:
                yield _as_2d(b, self.name)

    def panels(self, rows: int) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, [<= rows, P]) panels; blocks are split or joined to fill them."""
        start, pending, have = 0, [], 0
        for b in self:
            while b.shape[0] > 0:
                take = min(rows - have, b.shape[0])
                pending.append(b[:take])
                have += take
                b = b[take:]
                if have == rows:
                    yield start, pending[0] if len(pending) == 1 else torch.cat(pending)
                    start, pending, have = start + rows, [], 0
        if have:
            yield start, pending[0] if len(pending) == 1 else torch.cat(pending)


def _check_blocks(P: int, dtype, panel: torch.Tensor, name: str) -> None:
    if panel.shape[1] != P:
        raise ValueError(f"{name}: row blocks disagree on P: {panel.shape[1]} vs {P}")
    if panel.dtype != dtype:
        raise ValueError(f"{name}: row blocks disagree on dtype: {panel.dtype} vs {dtype}")


def streamed_gram(pair_fn: PairFn, X, offsets: torch.Tensor, *, Y=None, device=None,
                  progress: bool = False, memory_budget: int = 1 << 30) -> torch.Tensor:
    """[L, N, M] float64 from row panels of X (and Y): pair_fn(A, offsets, B_or_None) per panel pair.

    Only panel pairs (I, J >= I) are computed when Y is None; the lower triangle is mirrored.
    Panels hold about memory_budget / 4 bytes each (two resident + the op's workspace).
    """
    sx = _Source(X, "X")
    sy = None if Y is None else _Source(Y, "Y")
    L = offsets.numel() - 1
    first = next(iter(sx), None)
    if first is None:
        raise ValueError("X: no row blocks given")
    P, dtype = first.shape[1], first.dtype
    dev = torch.device(device) if device is not None else first.device
    elt = first.element_size()
    rows = max(1, int(memory_budget // (4 * elt * max(P, 1))))
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(desc="segment_gram", unit="block pair")

    # The output size is known after the first sweep of the inner loop; until then keep the blocks.
    out = None
    pieces: list[tuple[int, int, torch.Tensor]] = []
    N = M = None
    offsets_dev = offsets.to(dev)
    for a, A in sx.panels(rows):
        _check_blocks(P, dtype, A, "X")
        A = A.to(dev, non_blocking=True)
        inner = sx.panels(rows) if sy is None else sy.panels(rows)
        for c, B in inner:
            if sy is None and c < a:
                continue
            _check_blocks(P, dtype, B, "X" if sy is None else "Y")
            if sy is None and c == a:
                g = pair_fn(A, offsets_dev, None)
            else:
                g = pair_fn(A, offsets_dev, B.to(dev, non_blocking=True))
            if out is None:
                pieces.append((a, c, g))
            else:
                _place(out, a, c, g, sy is None)
            if bar is not None:
                bar.update(1)
        if out is None:
            # after the first outer panel every inner panel has been seen: sizes are known
            M = max(c + g.shape[2] for _, c, g in pieces)
            N = M if sy is None else None
            if N is None:
                N = sum(b.shape[0] for b in sx)
            out = torch.zeros(L, N, M, dtype=torch.float64, device=dev)
            for pa, pc, g in pieces:
                _place(out, pa, pc, g, sy is None)
            pieces.clear()
    if bar is not None:
        bar.close()
    return out


def _place(out: torch.Tensor, a: int, c: int, g: torch.Tensor, sym: bool) -> None:
    out[:, a:a + g.shape[1], c:c + g.shape[2]] = g
    if sym and c != a:
        out[:, c:c + g.shape[2], a:a + g.shape[1]] = g.transpose(1, 2)
