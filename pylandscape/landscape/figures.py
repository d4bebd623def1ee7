"""Figures of a saved Surface (they draw, never recompute): 1-D curves, 2-D contours with the projected
trajectory, a 3-D surface image. matplotlib Figure objects only (no pyplot state, no backend switch)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colors as mcolors
from matplotlib.figure import Figure

from .surface import Surface, axis_names, primary_quantity


def _label(q: str) -> str:
    split, _, kind = q.rpartition("_")
    return f"{split} {kind}" if split else q


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    tmp.replace(path)
    return path


def _title(s: Surface) -> str:
    bn = s.info.get("bn", "")
    sizes = s.info.get("set_sizes", {})
    data = ", ".join(f"{k} {v}" for k, v in sizes.items())
    return f"{'through models' if s.kind == 'through' else 'around the model'}; BN: {bn}; images: {data}"


def curves(s: Surface, path: str | Path) -> Path:
    """Loss (solid, left axis) and error (dashed, right axis) per data set; a 2-D surface gives its two
    slices through the origin (the grid line nearest to 0)."""
    path = Path(path)
    loss_q = [q for q in s.values if q.endswith("_loss")]
    err_q = [q for q in s.values if q.endswith("_error")]
    if s.ys is None:
        panels = [(s.xs, {q: s.values[q] for q in s.values}, axis_names(s)[0])]
    else:
        iy, ix = int(np.abs(s.ys).argmin()), int(np.abs(s.xs).argmin())
        names = axis_names(s)
        panels = [(s.xs, {q: v[iy, :] for q, v in s.values.items()}, f"{names[0]} (at y = {s.ys[iy]:.3g})"),
                  (s.ys, {q: v[:, ix] for q, v in s.values.items()}, f"{names[1]} (at x = {s.xs[ix]:.3g})")]
    fig = Figure(figsize=(6.2 * len(panels), 4.4), layout="constrained")
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
    for p, (t, vals, xlabel) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), p + 1)
        ax2 = ax.twinx()
        for i, q in enumerate(loss_q):
            ax.plot(t, vals[q], color=colors[i % 4], label=_label(q))
        for i, q in enumerate(err_q):
            ax2.plot(t, 100 * vals[q], color=colors[i % 4], ls="--", label=_label(q))
        ax.set_xlabel(xlabel)
        ax.set_ylabel("cross-entropy loss (solid)")
        ax2.set_ylabel("error % (dashed)")
        for pt in s.anchors.values():
            ax.axvline(pt[p] if len(pt) > p else pt[0], color="0.6", lw=0.8, ls=":")
        if p == 0:
            h1, l1 = ax.get_legend_handles_labels()
            h2, l2 = ax2.get_legend_handles_labels()
            ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper center")
    fig.suptitle(_title(s), fontsize=9)
    return _save(fig, path)


def _levels(z: np.ndarray, n: int = 25) -> np.ndarray:
    lo, hi = float(np.nanmin(z)), float(np.nanmax(z))
    if lo > 0 and hi / lo > 20:
        return np.geomspace(lo, hi, n)
    return np.linspace(lo, hi, n) if hi > lo else np.array([lo, lo + 1e-12])


def _overlay(ax, s: Surface) -> None:
    # stars first, the trajectory on top: its end is usually the origin star, and a hollow ring around
    # the star shows both
    for name, pt in s.anchors.items():
        ax.plot(pt[0], pt[1], "*", color="red", ms=11, mec="k", zorder=3)
        ax.annotate(name, (pt[0], pt[1]), textcoords="offset points", xytext=(6, 6), fontsize=9)
    if s.trajectory is not None and s.trajectory.shape[1] >= 2:
        t = s.trajectory
        ax.plot(t[:, 0], t[:, 1], "-", color="k", lw=1.2, alpha=0.8, zorder=4)
        ax.plot(t[:, 0], t[:, 1], "o", color="white", mec="k", ms=3.5, zorder=4)
        ax.plot(t[0, 0], t[0, 1], "s", color="k", ms=6, label="trajectory start", zorder=5)
        ax.plot(t[-1, 0], t[-1, 1], "o", mfc="none", mec="orange", mew=2, ms=14, label="trajectory end", zorder=5)
        extent = float(np.abs(t).max())
        span = float(max(np.ptp(s.xs), np.ptp(s.ys)))
        if span > 0 and extent < 0.03 * span:
            ax.text(0.02, 0.98, f"trajectory within {extent:.2g} of the origin:\nrandom directions are nearly "
                    "orthogonal to it\n(use --directions pca)", transform=ax.transAxes, va="top", fontsize=7,
                    color="white")


def lift(s: Surface, z: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Bilinear interpolation of the grid values z [ny, nx] at points [n, 2] (NaN outside the grid)."""
    xs, ys = np.asarray(s.xs, float), np.asarray(s.ys, float)
    px, py = points[:, 0], points[:, 1]
    inside = (px >= xs[0]) & (px <= xs[-1]) & (py >= ys[0]) & (py <= ys[-1])
    i = np.clip(np.searchsorted(xs, px) - 1, 0, len(xs) - 2)
    j = np.clip(np.searchsorted(ys, py) - 1, 0, len(ys) - 2)
    fx = np.clip((px - xs[i]) / (xs[i + 1] - xs[i]), 0, 1)
    fy = np.clip((py - ys[j]) / (ys[j + 1] - ys[j]), 0, 1)
    v = ((1 - fx) * (1 - fy) * z[j, i] + fx * (1 - fy) * z[j, i + 1]
         + (1 - fx) * fy * z[j + 1, i] + fx * fy * z[j + 1, i + 1])
    return np.where(inside, v, np.nan)


def contour(s: Surface, path: str | Path, quantities: list[str] | None = None) -> Path:
    """Filled contours (log-spaced levels when the loss spans > 20x) of the loss and error of the first
    data set, the trajectory projected onto the plane, the origin / given models as red stars."""
    if s.ys is None:
        raise ValueError("a contour needs a 2-D surface")
    path = Path(path)
    prim = primary_quantity(s)
    qs = quantities or [prim] + [q for q in (prim.replace("_loss", "_error"),) if q in s.values]
    fig = Figure(figsize=(6.4 * len(qs), 5.2), layout="constrained")
    X, Y = np.meshgrid(s.xs, s.ys)
    names = axis_names(s)
    for i, q in enumerate(qs):
        ax = fig.add_subplot(1, len(qs), i + 1)
        z = s.values[q] * (100 if q.endswith("_error") else 1)
        lv = _levels(z)
        norm = mcolors.LogNorm(lv[0], lv[-1]) if lv[0] > 0 and lv[-1] / lv[0] > 20 else None
        cs = ax.contourf(X, Y, z, levels=lv, cmap="viridis", norm=norm)
        ax.contour(X, Y, z, levels=lv[::3], colors="white", linewidths=0.5, alpha=0.6, norm=norm)
        fig.colorbar(cs, ax=ax, label=_label(q) + (" %" if q.endswith("_error") else ""), format="%.3g")
        _overlay(ax, s)
        ax.set_xlim(s.xs[0], s.xs[-1])
        ax.set_ylim(s.ys[0], s.ys[-1])
        ax.set_xlabel(names[0])
        ax.set_ylabel(names[1])
        ax.set_title(_label(q))
        if i == 0 and s.trajectory is not None:
            ax.legend(fontsize=8, loc="lower left")
    fig.suptitle(_title(s), fontsize=9)
    return _save(fig, path)


def surface3d(s: Surface, path: str | Path, quantity: str | None = None) -> Path:
    """3-D surface of one quantity (default the training loss), with the projected trajectory on it when
    there is one; values above the 98th percentile are clipped so one blown-up corner does not flatten
    the rest (said in the title)."""
    if s.ys is None:
        raise ValueError("a 3-D surface needs a 2-D surface")
    path = Path(path)
    q = quantity or primary_quantity(s)
    z = np.array(s.values[q], dtype=float)
    cap = float(np.percentile(z, 98))
    clipped = bool((z > cap).any())
    z = np.minimum(z, cap)
    X, Y = np.meshgrid(s.xs, s.ys)
    fig = Figure(figsize=(7.5, 6))
    ax = fig.add_subplot(1, 1, 1, projection="3d")
    ax.plot_surface(X, Y, z, cmap="viridis", linewidth=0, antialiased=True, rcount=100, ccount=100, alpha=0.85)
    if s.trajectory is not None and s.trajectory.shape[1] >= 2:
        # the projected trajectory drawn on the surface (heights interpolated from the grid, not evaluated
        # at the snapshots themselves: the plane passes near them, not through them)
        t = s.trajectory
        h = lift(s, z, t[:, :2])
        ok = ~np.isnan(h)
        if ok.any():
            ax.plot(t[ok, 0], t[ok, 1], h[ok], "-o", color="k", lw=1.5, ms=2.5, zorder=10,
                    label="trajectory (projected; height from the grid)")
            ax.plot([t[ok, 0][-1]], [t[ok, 1][-1]], [h[ok][-1]], "o", mfc="none", mec="orange", mew=2, ms=10,
                    zorder=11, label="trajectory end")
            ax.legend(fontsize=7, loc="upper left")
    names = axis_names(s)
    ax.set_xlabel(names[0], fontsize=8)
    ax.set_ylabel(names[1], fontsize=8)
    ax.set_zlabel(_label(q))
    ax.view_init(elev=35, azim=-60)
    ax.set_title(_label(q) + (f" (clipped at {cap:.3g})" if clipped else ""), fontsize=10)
    return _save(fig, path)


def draw_all(s: Surface, out_dir: str | Path) -> list[Path]:
    """curves.png always; contour.png and surface3d.png for 2-D surfaces."""
    out = Path(out_dir)
    paths = [curves(s, out / "curves.png")]
    if s.ys is not None:
        paths += [contour(s, out / "contour.png"), surface3d(s, out / "surface3d.png")]
    return paths
