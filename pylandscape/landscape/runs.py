"""Surfaces of recorded training runs: the plane of a trajectory's top-2 PCA directions around its last
snapshot (Li et al. 2018, Sec. 7), with the trajectory drawn on it. Used by the demo report."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..store import SnapshotStore
from . import figures, hessian_outputs, html_view, outputs
from .surface import Surface, around


def surface_around_store(store_dir: str | Path, model: nn.Module, sets, out_dir: str | Path, *,
                         grid: int = 25, bn: str = "reestimate", batch_size: int | None = None) -> Surface:
    """Loss surface around the last snapshot of a pylandscape store, in the plane of the top-2 PCA
    directions of all its snapshots (the grid fitted to the projected trajectory), written to out_dir
    (surface.npz/.csv/.json, curves/contour/surface3d PNGs, surface.html). Resumable: an out_dir that
    already holds a surface is read back, not recomputed."""
    out = Path(out_dir)
    if outputs.is_surface_dir(out):
        return outputs.read_surface(out)
    store = SnapshotStore(store_dir)
    if len(store) < 3:
        raise ValueError(f"{store_dir}: a PCA plane needs at least 3 snapshots, the store has {len(store)}")
    dtype = next(model.parameters()).dtype
    traj = torch.stack([store.load_flat(i) for i in range(len(store))]).to(dtype)
    metas = [{k: v for k, v in e.items() if isinstance(v, (int, float, str))} for e in store.entries]
    s = around(model, sets, theta=traj[-1], directions="pca", grid=(grid, grid), ranges=None,
               trajectory=traj, trajectory_meta=metas, bn=bn, batch_size=batch_size)
    s.info["checkpoint"] = f"{store_dir} (last snapshot)"
    outputs.write_data(s, out)
    draw(s, out)
    return s


def draw(s: Surface, out_dir: str | Path) -> list[Path]:
    """Every figure of a surface folder (what `python -m pylandscape plot` redraws)."""
    out = Path(out_dir)
    return figures.draw_all(s, out) + [html_view.write_html(s, out / "surface.html")]


def is_landscape_dir(path: str | Path) -> bool:
    """A folder written by `python -m pylandscape.surface` or `python -m pylandscape.hessian`."""
    p = Path(path)
    return outputs.is_surface_dir(p) or (p / "hessian.json").exists()


def redraw(path: str | Path) -> list[Path]:
    """Redraw the figures of a surface or hessian output folder from its saved numbers."""
    p = Path(path)
    paths: list[Path] = []
    if outputs.is_surface_dir(p):
        paths += draw(outputs.read_surface(p), p)
    if (p / "hessian.json").exists():
        paths += hessian_outputs.redraw(p)
    return paths
