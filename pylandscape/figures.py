"""Figures of the experiments, drawn from saved results only (`python -m pylandscape plot RUN_DIR`
calls the experiment's own `plot`, which calls these).

Every function here takes numbers already on disk (metrics tables, saved MDS coordinates) and writes a
PNG; nothing is recomputed, so a finished run's figures can be restyled and redrawn in seconds.
Figures are `matplotlib.figure.Figure` objects saved with the Agg canvas: no pyplot, so importing or
using this module never touches matplotlib's global backend (a notebook keeps its own).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from .embedding_plot import palette, plot_embedding
from .store import atomic_write_json

METRIC_LABELS = {
    "train_error": "training error", "test_error": "test error",
    "train_loss": "training loss", "test_loss": "test loss",
}


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write `fig` as a PNG (folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def new_figure(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float], **kw) -> tuple[Figure, np.ndarray]:
    """(figure, axes [nrows, ncols]) without pyplot (kw as Figure.subplots: sharex, sharey, ...)."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, squeeze=False, **kw)


def metric_curves(path: str | Path, runs: Mapping[str, Sequence[Mapping[str, Any]]], *, title: str,
                  x: str = "epoch", xlabel: str = "epoch",
                  metrics: Sequence[str] = ("train_error", "test_error", "train_loss", "test_loss"),
                  logy_loss: bool = True) -> Path:
    """One panel per metric, one line per run. runs: label -> rows (dicts with `x` and the metrics)."""
    metrics = [m for m in metrics if any(m in r for rows in runs.values() for r in rows)]
    n = max(1, len(metrics))
    nr, nc = (2, 2) if n == 4 else (1, n)
    fig, axes = new_figure(nr, nc, figsize=(4.2 * nc, 3.2 * nr + 0.4))
    axes = axes.reshape(1, -1)
    cols = palette(len(runs))
    for ax, m in zip(axes[0], metrics):
        for c, (label, rows) in zip(cols, runs.items()):
            pts = [(r[x], r[m]) for r in rows if r.get(m) is not None and r.get(x) is not None]
            if not pts:
                continue
            xs, ys = zip(*pts)
            ax.plot(xs, ys, color=c, label=label, lw=1.4, marker="o" if len(xs) < 15 else None, ms=3)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(METRIC_LABELS.get(m, m))
        if "loss" in m and logy_loss:
            ax.set_yscale("log")
        ax.set_title(METRIC_LABELS.get(m, m))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def xy_lines(path: str | Path, series: Mapping[str, tuple[Sequence[float], Sequence[float]]], *, title: str,
             xlabel: str, ylabel: str, logx: bool = False, logy: bool = False,
             vlines: Sequence[float] = ()) -> Path:
    fig, axes = new_figure(figsize=(5.5, 3.8))
    ax = axes[0, 0]
    for c, (label, (xs, ys)) in zip(palette(len(series)), series.items()):
        ax.plot(xs, ys, color=c, label=label, marker="o", ms=3, lw=1.4)
    for v in vlines:
        ax.axvline(v, color="gray", ls=":", lw=1)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def heatmaps(path: str | Path, matrices: Mapping[str, Sequence[Sequence[float]]], labels: Sequence[str], *,
             title: str, vmin: float = 0.0, vmax: float = 1.0) -> Path:
    """Side-by-side annotated heat maps sharing row/column labels (e.g. agreement matrices)."""
    n = len(matrices)
    fig, axes = new_figure(1, n, figsize=(4.3 * n, 4.0))
    for ax, (name, m) in zip(axes[0], matrices.items()):
        a = np.asarray(m, dtype=float)
        im = ax.imshow(a, vmin=vmin, vmax=vmax, cmap="viridis")
        for i in range(a.shape[0]):
            for j in range(a.shape[1]):
                ax.text(j, i, f"{a[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if a[i, j] < (vmin + vmax) / 2 else "black")
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.set_xlabel("column model")
        ax.set_ylabel("row model")
        ax.set_title(name, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def save_embedding(path: str | Path, result: Any, *, title: str) -> dict:
    """Keep what an MDS figure needs (coords, per-point metadata, eigenvalues) as JSON."""
    coords = np.asarray(result.coords, dtype=float)
    d = {
        "title": title,
        "coords": coords.tolist(),
        "meta": [{k: v for k, v in m.items() if k != "file"} for m in result.meta],
        "eigenvalues": np.asarray(getattr(result, "eigenvalues", []), dtype=float).tolist(),
        "captured": _to_float(getattr(result, "captured", None)),
        "negative_mass": _to_float(getattr(result, "negative_mass", None)),
    }
    atomic_write_json(path, d)
    return d


def _to_float(v):
    if v is None:
        return None
    a = np.asarray(v, dtype=float)
    return a.tolist() if a.ndim else float(a)


def _captured_text(captured) -> str:
    if captured is None:
        return ""
    if isinstance(captured, list):
        return "variance captured by the 2 axes: " + ", ".join(f"{100 * c:.0f}%" for c in captured[:2])
    return f"variance captured: {100 * captured:.1f}%"


def embedding_figure(path: str | Path, emb: Mapping[str, Any], *, group: str = "trajectory",
                     annotate: str | None = "train_error", subset: Iterable[int] | None = None,
                     title: str | None = None, order: str = "epoch", max_labels: int = 12,
                     note: str | None = None) -> Path:
    """Trajectories in the 2-D MDS plane: one colour per `group` value, points joined in `order`,
    start marked with a circle and end with a square, `annotate` values written next to points;
    `note` says what the numbers are (default: the metric's name when annotate is an error)."""
    coords = np.asarray(emb["coords"], dtype=float)
    meta = emb["meta"]
    idx = list(range(len(meta))) if subset is None else list(subset)
    head = title or emb.get("title", "MDS")
    what = note or (f"numbers: {METRIC_LABELS.get(annotate, annotate)} (fraction)"
                    if annotate and "error" in annotate else "")
    text = "; ".join(t for t in (_captured_text(emb.get("captured")), what) if t)
    full_title = head + ("\n" + text if text else "")
    fig = plot_embedding(coords[idx], [meta[i] for i in idx], annotate=annotate or "none",
                         title=full_title, group=group, order=order, max_labels=max_labels)
    fig.axes[0].title.set_fontsize(9)
    return save_figure(fig, path)


def _stage_paths(emb: Mapping[str, Any]):
    """(stage, trajectory) -> indices in time order, for the SGD-stages embeddings."""
    meta = emb["meta"]
    paths: dict[tuple, list[int]] = {}
    for i, m in enumerate(meta):
        paths.setdefault((m.get("stage"), m.get("trajectory")), []).append(i)
    for k in paths:
        paths[k].sort(key=lambda i: (meta[i].get("epoch") or 0, i))
    return paths


def stages_figure(path: str | Path, emb: Mapping[str, Any], *, title: str) -> Path:
    """All stages in one MDS plane: one colour per stage, a line per trajectory, the stage's starting
    model circled, the final training error (%) of each stage's trajectory 1 written at its end."""
    coords = np.asarray(emb["coords"], dtype=float)
    meta = emb["meta"]
    paths = _stage_paths(emb)
    stages = sorted({k[0] for k in paths}, key=lambda v: (v is None, v))
    cmap = matplotlib.colormaps["viridis"]
    fig, axes = new_figure(figsize=(7, 5.6))
    ax = axes[0, 0]
    for si, st in enumerate(stages):
        c = cmap(si / max(1, len(stages) - 1))
        for (s, t), ii in paths.items():
            if s != st:
                continue
            perturbed = bool(meta[ii[0]].get("perturbed"))
            ax.plot(coords[ii, 0], coords[ii, 1], "--" if perturbed else "-", color=c, lw=0.8, alpha=0.8)
            ax.scatter(coords[ii, 0], coords[ii, 1], s=6, color=c)
            if t == 1:
                ax.scatter(coords[ii[0], 0], coords[ii[0], 1], s=40, facecolors="none", edgecolors=c)
                err = meta[ii[-1]].get("train_error")
                if err is not None:
                    ax.annotate(f"{100 * err:.0f}", coords[ii[-1], :2], fontsize=7, color=c,
                                xytext=(3, 3), textcoords="offset points")
        ax.plot([], [], color=c, label=f"stage {st}")
    ax.plot([], [], "k--", lw=0.8, label="perturbed start")
    ax.set_xlabel("MDS axis 1")
    ax.set_ylabel("MDS axis 2")
    note = _captured_text(emb.get("captured"))
    ax.set_title(f"{title}\n{note}; numbers: training error (%) at the end of trajectory 1", fontsize=9)
    ax.legend(fontsize=7, ncol=2 if len(stages) > 6 else 1)
    ax.grid(alpha=0.2)
    fig.tight_layout()
    return save_figure(fig, path)


def stage_panels(path: str | Path, emb: Mapping[str, Any], *, title: str) -> Path:
    """One small panel per stage (same MDS coordinates, shared axes): the stage's trajectories."""
    coords = np.asarray(emb["coords"], dtype=float)
    meta = emb["meta"]
    paths = _stage_paths(emb)
    stages = sorted({k[0] for k in paths}, key=lambda v: (v is None, v))
    n = len(stages)
    nc = min(4, n)
    nr = int(np.ceil(n / nc))
    fig, axes = new_figure(nr, nc, figsize=(3.2 * nc, 2.9 * nr), sharex=True, sharey=True)
    trajs = sorted({k[1] for k in paths}, key=lambda v: (v is None, v))
    cols = dict(zip(trajs, palette(len(trajs))))
    for ax, st in zip(axes.flat, stages):
        ax.scatter(coords[:, 0], coords[:, 1], s=2, color="0.85")
        for (s, t), ii in paths.items():
            if s != st:
                continue
            ax.plot(coords[ii, 0], coords[ii, 1], "-", color=cols[t], lw=0.9, marker=".", ms=3,
                    label=f"trajectory {t}")
            err = meta[ii[-1]].get("train_error")
            if err is not None and t in (trajs[0], trajs[-1]):
                ax.annotate(f"{100 * err:.0f}", coords[ii[-1], :2], fontsize=6, color=cols[t])
        ax.set_title(f"stage {st}", fontsize=9)
        ax.grid(alpha=0.2)
    for ax in axes.flat[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=5, loc="best")
    fig.supxlabel("MDS axis 1")
    fig.supylabel("MDS axis 2")
    fig.suptitle(title + "\n(numbers: final training error in %; grey: all stages)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)
