"""Per-layer Gram matrices of many snapshots, streamed block pair by block pair (the Gram -> 1 - cos
step is pylandscape.mds.dissimilarity).

Why a Gram and not distances directly: one pass of BLAS-speed products gives every layer's Gram, and any
group of layers (the whole model included) is then a sum of those. The op behind it
(`torch.ops.pylandscape.segment_gram`) keeps the products accurate for nearly parallel rows, so
1 - cos computed here in fp64 stays accurate down to 1 - cos ~ 1e-10.

Memory: the driver keeps at most two panels of rows resident (each about memory_budget / 4 bytes of
input), plus the op's own workspace (~5% of the panels: columns go in groups of ~P / 20; on the CPU a
symmetric panel's fused pass needs only min(8 MiB, its bytes / 32)) and the output
[L, N, M] float64 (8 L N M bytes, which is the floor: N = 10,000, L = 12 is 9.6 GB).
"""
from __future__ import annotations

from typing import Callable, Iterator

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
    re-iterable (e.g. an object whose __iter__ reads the snapshots from disk) to really stream. Tensors and
    lists know their row count and skip rows for free; a re-iterable is traversed from its start, and the
    blocks before a panel are dropped as they arrive (never joined or moved).
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
        #: total rows, when known without reading (tensors and in-memory blocks)
        self.rows = None if self.blocks is None else sum(b.shape[0] for b in self.blocks)

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self.blocks is not None:
            yield from self.blocks
        else:
            for b in self.iterable:
                yield _as_2d(b, self.name)

    def first(self) -> torch.Tensor | None:
        return next(iter(self), None)

    def panels(self, rows: int, start: int = 0) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, [<= rows, P]) panels from row `start` on (a multiple of rows); blocks are split or
        joined to fill them."""
        pos, pending, have = 0, [], 0
        for b in self:
            n = b.shape[0]
            if pos + n <= start:  # wholly before the first wanted panel: skipped, never touched
                pos += n
                continue
            if pos < start:
                b = b[start - pos:]
                pos = start
            while b.shape[0] > 0:
                take = min(rows - have, b.shape[0])
                pending.append(b[:take])
                have += take
                b = b[take:]
                if have == rows:
                    yield pos, pending[0] if len(pending) == 1 else torch.cat(pending)
                    pos, pending, have = pos + rows, [], 0
        if have:
            yield pos, pending[0] if len(pending) == 1 else torch.cat(pending)


def _check_blocks(P: int, dtype, panel: torch.Tensor, name: str) -> None:
    if panel.shape[1] != P:
        raise ValueError(f"{name}: row blocks disagree on P: {panel.shape[1]} vs {P}")
    if panel.dtype != dtype:
        raise ValueError(f"{name}: row blocks disagree on dtype: {panel.dtype} vs {dtype}")


def panel_rows(P: int, element_size: int, memory_budget: int) -> int:
    """Rows per panel: two panels resident plus the op's workspace (about two more) fit memory_budget."""
    return max(1, int(memory_budget // (4 * element_size * max(P, 1))))


def streamed_gram(pair_fn: PairFn, X, offsets: torch.Tensor, *, Y=None, device=None,
                  progress: bool = False, memory_budget: int = 1 << 30,
                  rows: int | None = None) -> torch.Tensor:
    """[L, N, M] float64 from row panels of X (and Y): pair_fn(A, offsets, B_or_None) per panel pair.

    Only panel pairs (I, J >= I) are computed when Y is None; the lower triangle is mirrored.
    rows: rows per panel (default: panel_rows(P, ..., memory_budget)). The panels, hence the blocks and
    the bits of the result, depend on X, Y, rows and memory_budget only: `progress` just draws a bar.
    """
    sx = _Source(X, "X")
    sy = None if Y is None else _Source(Y, "Y")
    L = offsets.numel() - 1
    first = sx.first()
    if first is None:
        raise ValueError("X: no row blocks given")
    P, dtype = first.shape[1], first.dtype
    dev = torch.device(device) if device is not None else first.device
    if rows is None:
        rows = panel_rows(P, first.element_size(), memory_budget)
    del first
    bar = None
    if progress:
        from tqdm.auto import tqdm  # only to draw the bar (tqdm's import costs start-up time otherwise)
        bar = tqdm(desc="segment_gram", unit="panel pair")

    sym = sy is None
    N = sx.rows
    M = N if sym else sy.rows
    if N is not None and M is not None and 0 < N <= rows and 0 < M <= rows:
        # one panel (pair): the op's output is the result; a second [L, N, M] buffer and the copy into it
        # cost 8 L N M bytes (80 MB, 11% of X, for 1,000 snapshots of the paper's net) and their page faults
        _, A = next(sx.panels(rows))
        _check_blocks(P, dtype, A, "X")
        B = None
        if not sym:
            _, B = next(sy.panels(rows))
            _check_blocks(P, dtype, B, "Y")
            B = B.to(dev, non_blocking=True)
        g = pair_fn(A.to(dev, non_blocking=True), offsets, B)
        if bar is not None:
            bar.update(1)
            bar.close()
        return g
    out = None if N is None or M is None else torch.empty(L, N, M, dtype=torch.float64, device=dev)
    # sizes not known without reading (re-iterables): results are kept until they are
    done: list[tuple[int, int, torch.Tensor]] = []

    def emit(a: int, c: int, g: torch.Tensor) -> None:
        if out is not None:
            _place(out, a, c, g, sym)
        else:
            done.append((a, c, g))
        if bar is not None:
            bar.update(1)

    if sym:
        # one traversal per row panel A: the panels before it are skipped (not joined or moved), A is
        # paired with itself and with every later panel as they arrive; nothing is computed twice
        a = 0
        while N is None or a < N:
            it = sx.panels(rows, start=a)
            head = next(it, None)
            if head is None:
                break
            _check_blocks(P, dtype, head[1], "X")
            A = head[1].to(dev, non_blocking=True)
            emit(a, a, pair_fn(A, offsets, None))
            for c, B in it:
                _check_blocks(P, dtype, B, "X")
                emit(a, c, pair_fn(A, offsets, B.to(dev, non_blocking=True)))
            if out is None:  # the first traversal saw every row
                N = M = max(c + g.shape[2] for _, c, g in done)
                out = torch.empty(L, N, M, dtype=torch.float64, device=dev)
                for pa, pc, g in done:
                    _place(out, pa, pc, g, sym)
                done.clear()
            a += rows
    else:
        for a, A in sx.panels(rows):
            _check_blocks(P, dtype, A, "X")
            A = A.to(dev, non_blocking=True)
            for c, B in sy.panels(rows):
                _check_blocks(P, dtype, B, "Y")
                emit(a, c, pair_fn(A, offsets, B.to(dev, non_blocking=True)))
        if out is None:  # X's rows were counted as its panels went by, Y's in the first sweep
            N = max(a + g.shape[1] for a, _, g in done)
            M = max(c + g.shape[2] for _, c, g in done)
            out = torch.empty(L, N, M, dtype=torch.float64, device=dev)
            for pa, pc, g in done:
                _place(out, pa, pc, g, sym)
    if bar is not None:
        bar.close()
    return out


def _place(out: torch.Tensor, a: int, c: int, g: torch.Tensor, sym: bool) -> None:
    out[:, a:a + g.shape[1], c:c + g.shape[2]] = g
    if sym and c != a:
        out[:, c:c + g.shape[2], a:a + g.shape[1]] = g.transpose(1, 2)
