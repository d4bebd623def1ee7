"""The per-tensor Gram [L, N, N] of many snapshots, computed by the ranks of a torch.distributed group.

Plan (a pure function of N, K, the panel rows R and the column chunk C, so every rank derives it alone):
the N snapshots are cut into panels of R rows; rank r owns a contiguous group of panels and is the only
one to read those snapshots (every file read once overall, column chunk by column chunk). Per column
chunk, the groups travel round a ring: at step t = 1 .. K // 2 rank r holds the group of rank r + t and
computes the panel pairs between its own group and that one (for even K the last step's pairs are
split by parity between the two ranks that hold each other's group), so the upper triangle of panel pairs is covered exactly once, spread evenly. Rank 0
then receives every rank's blocks (sizes known from the plan: no headers) and assembles the Gram.

Bits: a panel pair (I <= J) is always `segment_gram(X_I, Y=X_J)` with the lower panel first (I == J: the
symmetric form), column chunks summed in order. So the result does not depend on K: it is bit-identical
to `local_gram` (one process, same R and C). Against one `pylandscape.ops.segment_gram(X)` call it agrees
to float64 rounding only: the kernel picks its reference rows (the middle row of each 256-row block)
from the rows of the call, and a panel is a different call from the whole matrix.

Errors: a rank that cannot read its snapshots (or finds NaN/Inf) reports it in a collective that every
rank joins after each read, so all ranks raise the same SnapshotError naming the file; none waits forever.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from ..ops import segment_gram
from ..snapshots import SnapshotError

#: rows per panel by default: two of the kernel's 256-row blocks (big enough for BLAS-speed GEMMs)
DEFAULT_PANEL_ROWS = 512
#: bytes of an error message exchanged between ranks
_MSG_BYTES = 1024


@dataclass(frozen=True)
class Plan:
    """Who reads what and who computes which panel pair."""

    n: int
    world: int
    panels: tuple[tuple[int, int], ...]        # (start, end) rows of each panel
    groups: tuple[tuple[int, int], ...]        # per rank: (first panel, end panel)

    def rows_of(self, rank: int) -> tuple[int, int]:
        g0, g1 = self.groups[rank]
        if g0 == g1:
            return 0, 0
        return self.panels[g0][0], self.panels[g1 - 1][1]

    def cross(self, rank: int, t: int) -> list[tuple[int, int]]:
        """Panel pairs (lo, hi) that `rank` computes at ring step t (holding rank + t's group). For even
        K, at t = K/2 ranks r and r + K/2 hold each other's group: each takes the pairs of one parity of
        i + j, so the work stays even."""
        k = self.world
        g0, g1 = self.groups[rank]
        h0, h1 = self.groups[(rank + t) % k]
        half = 2 * t == k
        out = []
        for i in range(g0, g1):
            for j in range(h0, h1):
                if half and (i + j) % 2 != (0 if rank < k // 2 else 1):
                    continue
                out.append((min(i, j), max(i, j)))
        return out

    def pairs(self, rank: int) -> list[tuple[int, int]]:
        """Panel pairs (I <= J) computed by `rank`, in the order they are computed and sent."""
        g0, g1 = self.groups[rank]
        out = [(i, j) for i in range(g0, g1) for j in range(i, g1)]
        for t in range(1, self.world // 2 + 1):
            out += self.cross(rank, t)
        return out


def make_plan(n: int, world: int, panel_rows: int = DEFAULT_PANEL_ROWS) -> Plan:
    if n < 1 or world < 1 or panel_rows < 1:
        raise ValueError(f"plan needs n, world, panel_rows >= 1, got {n}, {world}, {panel_rows}")
    q = -(-n // panel_rows)
    panels = tuple((p * panel_rows, min(n, (p + 1) * panel_rows)) for p in range(q))
    groups = tuple((q * r // world, q * (r + 1) // world) for r in range(world))
    return Plan(n, world, panels, groups)


def column_chunk(n_rows_held: int, budget: int) -> int:
    """Columns per chunk so that this rank's own rows, one visiting group and the kernel's workspace
    (about one more fp32 copy of both) fit `budget` bytes."""
    return max(1, int(budget // max(1, 4 * 4 * n_rows_held)))


def _pieces_offsets(pieces) -> torch.Tensor:
    lens = [b - a for _, a, b in pieces]
    return torch.tensor([0] + list(np.cumsum(lens)), dtype=torch.int64)


class _Comm:
    """The process group's few operations (or none at all in one process)."""

    def __init__(self, group=None, device: torch.device | None = None):
        self.on = dist.is_available() and dist.is_initialized()
        self.group = group
        self.rank = dist.get_rank(group) if self.on else 0
        self.world = dist.get_world_size(group) if self.on else 1
        self.device = device if device is not None else torch.device("cpu")

    def agree(self, error: str | None) -> None:
        """Collective: raise the first rank's error on every rank (messages travel as bytes, not pickles)."""
        if not self.on:
            if error:
                raise SnapshotError(error)
            return
        raw = (error or "").encode()[:_MSG_BYTES]
        mine = torch.zeros(_MSG_BYTES + 1, dtype=torch.uint8)
        mine[0] = 1 if error else 0
        mine[1:1 + len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else mine[1:1]
        mine = mine.to(self.device)
        every = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(every, mine, group=self.group)
        for r, m in enumerate(every):
            m = m.cpu()
            if int(m[0]):
                text = bytes(m[1:].tolist()).rstrip(b"\0").decode(errors="replace")
                raise SnapshotError(f"rank {r}: {text}" if self.world > 1 else text)

    def shift(self, held: torch.Tensor, recv_shape: tuple[int, ...]) -> torch.Tensor:
        """Send `held` to rank - 1, receive from rank + 1 (empty tensors are not sent: both ends know)."""
        k = self.world
        out = torch.empty(recv_shape, dtype=held.dtype, device=self.device)
        ops = []
        if held.numel():
            ops.append(dist.P2POp(dist.isend, held.contiguous(), (self.rank - 1) % k, group=self.group))
        if out.numel():
            ops.append(dist.P2POp(dist.irecv, out, (self.rank + 1) % k, group=self.group))
        if ops:
            for req in dist.batch_isend_irecv(ops):
                req.wait()
        return out


def distributed_gram(sset, rows: list[int], *, group=None, device=None, max_memory: int = 1 << 30,
                     panel_rows: int = DEFAULT_PANEL_ROWS, cols: int | None = None,
                     progress: bool = False) -> tuple[torch.Tensor | None, dict]:
    """Per-tensor Grams [L, n, n] float64 of sset's `rows`, on rank 0 (None elsewhere), and an info dict.

    Every rank must call this with the same sset (same files), rows, panel_rows, cols and max_memory.
    max_memory: bytes of snapshot rows each rank holds at once (its own rows + one visiting group,
    plus the kernel's workspace); sets the column chunk unless `cols` is given. The Gram blocks this
    rank computed (about L n^2 / (2K) float64) and, on rank 0, the whole Gram come on top.
    Runs in one process too (no process group initialised): that is the single-process twin.
    """
    comm = _Comm(group, torch.device(device) if device is not None else None)
    spec = sset.spec
    n, L, P = len(rows), len(spec), spec.numel
    plan = make_plan(n, comm.world, panel_rows)
    me = comm.rank
    r0, r1 = plan.rows_of(me)
    held_max = max(b - a for a, b in (plan.rows_of(r) for r in range(comm.world)))
    if cols is None:
        cols = column_chunk(2 * held_max, max_memory)
    my_pairs = plan.pairs(me)
    blocks = {pq: torch.zeros(L, plan.panels[pq[0]][1] - plan.panels[pq[0]][0],
                              plan.panels[pq[1]][1] - plan.panels[pq[1]][0], dtype=torch.float64,
                              device=comm.device) for pq in my_pairs}
    t_read = t_gram = t_comm = 0.0
    read_bytes = sent_bytes = 0
    for c0 in range(0, P, cols):
        c1 = min(P, c0 + cols)
        pieces = sset.plan_pieces(c0, c1)
        offs = _pieces_offsets(pieces)
        width = c1 - c0
        t = time.perf_counter()
        err, buf = None, None
        try:
            buf = sset.read_block(rows[r0:r1], pieces, progress=progress, desc="reading snapshots")
            bad = np.nonzero(~np.isfinite(buf).all(axis=1))[0]
            if bad.size:
                err = f"{sset.meta[rows[r0 + int(bad[0])]].get('path')}: NaN or Inf weights in columns {c0}:{c1}"
        except (SnapshotError, OSError, ValueError, KeyError, RuntimeError) as e:
            err = str(e).splitlines()[0] if str(e) else type(e).__name__
        t_read += time.perf_counter() - t
        comm.agree(err)
        read_bytes += buf.nbytes
        own = torch.from_numpy(buf).to(comm.device)
        del buf

        def panel(group_rows: torch.Tensor, g_first_row: int, p: int) -> torch.Tensor:
            a, b = plan.panels[p]
            return group_rows[a - g_first_row:b - g_first_row]

        def add(pq: tuple[int, int], g: torch.Tensor) -> None:
            acc = blocks[pq]
            for j, (ti, _, _) in enumerate(pieces):
                acc[ti] += g[j]

        t = time.perf_counter()
        g0, g1 = plan.groups[me]
        for i in range(g0, g1):
            A = panel(own, r0, i)
            add((i, i), segment_gram(A, offs, memory_budget=max(1, A.numel() * 4)))
            for j in range(i + 1, g1):
                add((i, j), segment_gram(A, offs, Y=panel(own, r0, j),
                                         memory_budget=max(1, A.numel() * 8)))
        t_gram += time.perf_counter() - t
        held = own
        for t_step in range(1, comm.world // 2 + 1):
            nxt = (me + t_step) % comm.world
            a, b = plan.rows_of(nxt)
            t = time.perf_counter()
            sent_bytes += held.numel() * held.element_size()
            held = comm.shift(held, (b - a, width))
            t_comm += time.perf_counter() - t
            t = time.perf_counter()
            for lo, hi in plan.cross(me, t_step):
                # the lower panel first, whichever rank read it (the bits do not depend on K)
                X = panel(own, r0, lo) if plan.groups[me][0] <= lo < plan.groups[me][1] else panel(held, a, lo)
                Y = panel(own, r0, hi) if plan.groups[me][0] <= hi < plan.groups[me][1] else panel(held, a, hi)
                add((lo, hi), segment_gram(X, offs, Y=Y, memory_budget=max(1, (X.numel() + Y.numel()) * 4)))
            t_gram += time.perf_counter() - t
        del own, held
    info = {"world": comm.world, "panel_rows": panel_rows, "cols": cols, "pairs": len(my_pairs),
            "read_bytes": read_bytes, "sent_bytes": sent_bytes,
            "timings": {"read": t_read, "segment_gram": t_gram, "ring": t_comm}}
    t = time.perf_counter()
    out = _assemble(plan, blocks, comm, L)
    info["timings"]["gather"] = time.perf_counter() - t
    return out, info


def _assemble(plan: Plan, blocks: dict, comm: _Comm, L: int) -> torch.Tensor | None:
    """Rank 0 receives every rank's blocks (one flat tensor per rank) and writes both triangles."""
    mine = [blocks[pq] for pq in plan.pairs(comm.rank)]
    if comm.rank != 0:
        if mine:
            flat = torch.cat([b.reshape(-1) for b in mine])
            dist.send(flat, 0, group=comm.group)
        return None
    out = torch.empty(L, plan.n, plan.n, dtype=torch.float64)
    for r in range(comm.world):
        pairs = plan.pairs(r)
        if not pairs:
            continue
        if r == 0:
            got = [b.cpu() for b in mine]
        else:
            sizes = [(plan.panels[i][1] - plan.panels[i][0], plan.panels[j][1] - plan.panels[j][0])
                     for i, j in pairs]
            flat = torch.empty(sum(L * a * b for a, b in sizes), dtype=torch.float64, device=comm.device)
            dist.recv(flat, r, group=comm.group)
            flat = flat.cpu()
            got, pos = [], 0
            for a, b in sizes:
                got.append(flat[pos:pos + L * a * b].view(L, a, b))
                pos += L * a * b
        for (i, j), g in zip(pairs, got):
            a0, a1 = plan.panels[i]
            b0, b1 = plan.panels[j]
            out[:, a0:a1, b0:b1] = g
            if i != j:
                out[:, b0:b1, a0:a1] = g.transpose(1, 2)
    return out


def local_gram(sset, rows: list[int], *, panel_rows: int = DEFAULT_PANEL_ROWS, cols: int,
               device=None) -> torch.Tensor:
    """The single-process twin of distributed_gram (same panels and chunks, hence the same bits)."""
    if dist.is_available() and dist.is_initialized():
        raise RuntimeError("local_gram: a process group is initialised; call distributed_gram")
    out, _ = distributed_gram(sset, rows, panel_rows=panel_rows, cols=cols, device=device)
    return out
