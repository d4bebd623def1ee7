"""The MDS figure (PNG/SVG/PDF) and a self-contained interactive HTML map, drawn from an MDSResult.

Used by `python -m pylandscape.mds` and by the experiments; these functions only draw, they never
recompute an embedding.
"""
from __future__ import annotations

import html
import importlib
import json
import math
import os
import sys
import threading
from pathlib import Path
from typing import Sequence

import numpy as np

# matplotlib is imported inside the drawing functions: it adds ~0.4 s to start-up (python -X importtime,
# matplotlib + matplotlib.figure), which `python -m pylandscape.mds --help`, the CSV/JSON/HTML outputs
# and every import of the package would otherwise pay.

#: what drawing and saving a figure imports (savefig takes the Agg canvas for png)
DRAWING_MODULES = ("matplotlib", "matplotlib.figure", "matplotlib.patheffects", "matplotlib.lines",
                   "matplotlib.backends.backend_agg")
SWITCH_INTERVAL = 1e-4  # seconds, while they load in the background (import_in_background)


def import_in_background() -> threading.Thread:
    """Import matplotlib's drawing modules in a daemon thread, and return the thread.

    For a command that will draw at its end: started before a phase that leaves a core idle and the GIL
    free (the eigensolver: one thread, LAPACK through ctypes), the figure no longer waits for matplotlib
    (~0.4-1 s on a 2-core VM). Not before a phase of many system calls or short numpy steps (the thread
    holds the GIL for each switch interval the main thread gives up) or of all cores busy.
    While it runs, the interpreter's switch interval is 0.1 ms instead of 5 ms: each short numpy step of
    the main thread (the estimator's checks and double centring) then waits that long at most to get
    the GIL back (N = 2,000: 0.2-0.35 s lost to the wait -> 0.1-0.2 s).
    These imports change no other global state (no pyplot, no backend switch); an import error is left
    for the drawing code to raise.
    """
    before = sys.getswitchinterval()
    sys.setswitchinterval(min(before, SWITCH_INTERVAL))
    ours = sys.getswitchinterval()  # as the interpreter rounded it

    def work():
        try:
            for name in DRAWING_MODULES:
                importlib.import_module(name)
        except Exception:  # noqa: BLE001 - plot_embedding imports again and reports the error
            pass
        finally:
            if sys.getswitchinterval() == ours:  # unless someone else changed it meanwhile
                sys.setswitchinterval(before)
    th = threading.Thread(target=work, name="pylandscape-import-matplotlib", daemon=True)
    th.start()
    return th


def _groups(meta: Sequence[dict], group: str, order: str | None) -> list[tuple[str, list[int]]]:
    """[(name, point indices in time order)] in order of first appearance."""
    names: dict[str, list[int]] = {}
    for i, m in enumerate(meta):
        names.setdefault(str(m.get(group, "")), []).append(i)

    def t(i):
        m = meta[i]
        keys = [order] if order else ["step"]  # else the given order (embed() sorts by time already)
        for k in keys:
            v = m.get(k)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                return (0, float(v), i)
        return (1, 0.0, i)
    return [(n, sorted(ix, key=t)) for n, ix in names.items()]


def emptiest_corner(ax, x: np.ndarray, y: np.ndarray, labels: Sequence[str], title: str | None,
                    ncol: int = 1, fontsize: float = 8) -> str:
    """The legend's corner: the one whose legend-sized box (in the axes' final limits) holds the fewest
    points; ties: upper right, upper left, lower left, lower right. matplotlib's loc="best" measures every
    label's box at each draw: 0.24 of a 0.64 s figure with 2,000 points and 64 labels."""
    ax.apply_aspect()  # the limits set_aspect("equal", "datalim") gives at draw time
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    fx = (x - x0) / ((x1 - x0) or 1.0)
    fy = (y - y0) / ((y1 - y0) or 1.0)
    pos = ax.get_position()
    fw, fh = ax.figure.get_size_inches()
    em = fontsize / 72  # inches
    rows = -(-len(labels) // ncol) + (1 if title else 0)
    chars = max([len(str(t)) for t in labels] + [len(title or "")])
    w = ncol * (0.6 * chars + 4) * em / max(pos.width * fw, 1e-9)
    h = (1.5 * rows + 1) * em / max(pos.height * fh, 1e-9)
    right, left, top, bottom = fx >= 1 - w, fx <= w, fy >= 1 - h, fy <= h
    boxes = {"upper right": right & top, "upper left": left & top, "lower left": left & bottom,
             "lower right": right & bottom}
    return min(boxes, key=lambda k: int(np.count_nonzero(boxes[k])))


def palette(k: int) -> list:
    """k distinguishable colours (tab10, tab20, then turbo)."""
    import matplotlib  # start-up time: see the note at the top
    if k <= 10:
        cmap = matplotlib.colormaps["tab10"]
        return [cmap(i) for i in range(k)]
    if k <= 20:
        cmap = matplotlib.colormaps["tab20"]
        return [cmap(i) for i in range(k)]
    cmap = matplotlib.colormaps["turbo"]
    return [cmap(i / max(1, k - 1)) for i in range(k)]


def _label(m: dict, column: str):
    """m[column]; for "label" (epoch, else step, else file name) also on metadata that has no such column."""
    if column != "label" or m.get("label") is not None:
        return m.get(column)
    for key, prefix in (("epoch", "ep "), ("step", "step ")):
        if isinstance(m.get(key), (int, float)) and not isinstance(m.get(key), bool):
            return f"{prefix}{m[key]:g}"
    return Path(str(m["path"])).name if m.get("path") else None


def _fmt(v) -> str:
    if isinstance(v, float):
        if v != v:
            return "nan"
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.2e}"
    return str(v)


def plot_embedding(coords: np.ndarray, meta: Sequence[dict], *, ax=None, annotate: str = "label",
                   title: str | None = None, path: str | os.PathLike | None = None,
                   group: str = "trajectory", order: str | None = None, max_labels: int = 8,
                   dims: tuple[int, int] = (0, 1), legend: bool = True, **savefig_kw):
    """Scatter of MDS coordinates [N, k], points joined along each `group` (trajectory) in time order.

    One colour per trajectory with a legend; the first point of each trajectory is a hollow circle,
    the last a filled square. `annotate`: a metadata column to print next to up to `max_labels`
    points per trajectory ("label" = epoch, else step, else file name; "epoch", "train_error", ... or
    "none"). Time order is meta[order]
    (default: "step" when present, else the order of `meta`). Returns the matplotlib Figure; saved to `path`
    when given (format from the suffix).
    """
    if ax is None:
        from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend needed
        fig = Figure(figsize=(8, 6.5), dpi=120)
        ax = fig.subplots()
    else:
        fig = ax.figure
    coords = np.asarray(coords, dtype=float)
    if coords.ndim != 2 or coords.shape[0] != len(meta):
        raise ValueError(f"coords has shape {coords.shape}, meta has {len(meta)} entries")
    dx, dy = dims
    x = coords[:, dx]
    y = coords[:, dy] if coords.shape[1] > dy else np.zeros_like(x)
    groups = _groups(meta, group, order)
    cols = palette(len(groups))
    many = len(groups) > 12
    n_per = max(len(ix) for _, ix in groups)
    ms = 3.5 if n_per > 60 else 5
    span = max(float(np.ptp(x)), float(np.ptp(y)), 1e-300)
    from matplotlib import patheffects  # start-up time: see the note at the top
    halo = [patheffects.withStroke(linewidth=2.5, foreground="white")]  # labels stay readable over lines
    for (name, ix), c in zip(groups, cols):
        ax.plot(x[ix], y[ix], "-", color=c, lw=1.0, alpha=0.65, zorder=1)
        ax.plot(x[ix], y[ix], "o", color=c, ms=ms, zorder=2, label=None if many else name)
        ax.plot(x[ix[0]], y[ix[0]], "o", ms=ms + 6, mfc="white", mec=c, mew=1.8, zorder=3)
        ax.plot(x[ix[-1]], y[ix[-1]], "s", ms=ms + 4, color=c, mec="black", mew=0.8, zorder=3)
        if annotate and annotate != "none":
            pick = ix if len(ix) <= max_labels else \
                [ix[int(round(j))] for j in np.linspace(0, len(ix) - 1, max_labels)]
            placed: list[int] = []
            for i in dict.fromkeys([ix[-1], ix[0]] + list(pick)):  # end and start first
                v = _label(meta[i], annotate)
                if v is None:
                    continue
                # a label on top of another of the same trajectory helps nobody
                if any(math.hypot(x[i] - x[j], y[i] - y[j]) < 0.03 * span for j in placed):
                    continue
                placed.append(i)
                ax.annotate(_fmt(v), (x[i], y[i]), xytext=(4, 4), textcoords="offset points",
                            fontsize=7, color=c, zorder=4, path_effects=halo)
    # Marker legend: what the hollow circle and the square mean.
    from matplotlib.lines import Line2D  # start-up time: see the note at the top
    handles, labels = ax.get_legend_handles_labels()
    handles += [Line2D([], [], marker="o", ls="", ms=9, mfc="white", mec="gray", mew=1.8),
                Line2D([], [], marker="s", ls="", ms=8, color="gray", mec="black", mew=0.8)]
    labels += ["start", "end"]
    ax.set_aspect("equal", adjustable="datalim")
    if legend:
        ncol = 1 if len(labels) <= 12 else 2
        title_ = None if many else group
        ax.legend(handles, labels, fontsize=8, ncol=ncol, framealpha=0.8, title=title_,
                  loc=emptiest_corner(ax, x, y, labels, title_, ncol))
    ax.set_xlabel(f"MDS {dx + 1}")
    ax.set_ylabel(f"MDS {dy + 1}")
    ax.grid(alpha=0.25)
    if title:
        ax.set_title(title, fontsize=10)
    if path is not None:
        had = fig.get_layout_engine()
        fig.tight_layout()
        if had is None:  # tight_layout leaves a placeholder engine, and savefig then lays out every text twice
            fig.set_layout_engine(None)  # (a dry draw first): 0.1-0.2 s of a figure with 64 labels
        fig.savefig(path, **savefig_kw)
    return fig


def title_for(result) -> str:
    """What is shown: layer, metric, N, captured share of the positive eigenvalue mass."""
    what = "all parameters" if not result.layer else f"layer {result.layer}"
    metric = {"cosine": "1 - cos", "chordal": "chordal sqrt(2(1 - cos))", "euclidean": "Euclidean"}.get(
        result.metric, result.metric)
    k = result.coords.shape[1]
    return (f"Classical MDS of {what} ({metric}), {result.n} snapshots\n"
            f"{100 * result.captured:.1f}% of positive eigenvalue mass in {k} dims"
            + ("" if result.mass_exact else " (estimated)"))


def plot_result(result, path: str | os.PathLike | None = None, *, ax=None, annotate: str = "label",
                title: str | None = None, **kw):
    """plot_embedding for an MDSResult, with a title saying what is shown (metric, layer, captured %)."""
    return plot_embedding(result.coords, result.meta, ax=ax, annotate=annotate,
                          title=title or result.title or title_for(result), path=path, **kw)


_JS = """
const tip=document.getElementById('tip');
document.querySelectorAll('circle[data-i]').forEach(c=>{
 c.addEventListener('mousemove',e=>{const d=DATA[+c.dataset.i];
  tip.innerHTML=Object.entries(d).map(([k,v])=>'<b>'+k+'</b> '+v).join('<br>');
  tip.style.display='block';tip.style.left=(e.pageX+12)+'px';tip.style.top=(e.pageY+12)+'px';});
 c.addEventListener('mouseleave',()=>{tip.style.display='none';});});
"""


def write_html(coords: np.ndarray, meta: Sequence[dict], path: str | os.PathLike, *,
               title: str = "MDS map", group: str = "trajectory") -> Path:
    """Self-contained HTML (inline SVG + a few lines of JS): hover a point to see its path, epoch and errors."""
    coords = np.asarray(coords, dtype=float)
    x = coords[:, 0]
    y = coords[:, 1] if coords.shape[1] > 1 else np.zeros_like(x)
    W, H, pad = 900, 700, 40
    span = max(np.ptp(x), np.ptp(y), 1e-300)
    sx = (W - 2 * pad) / span
    sy = (H - 2 * pad) / span
    s = min(sx, sy)
    cx, cy = (x.max() + x.min()) / 2, (y.max() + y.min()) / 2
    px = W / 2 + (x - cx) * s
    py = H / 2 - (y - cy) * s
    groups = _groups(meta, group, None)
    cols = palette(len(groups))

    def hexc(c):
        return "#%02x%02x%02x" % tuple(int(255 * v) for v in c[:3])
    parts = []
    legend = []
    for gi, ((name, ix), c) in enumerate(zip(groups, cols)):
        col = hexc(c)
        pts = " ".join(f"{px[i]:.1f},{py[i]:.1f}" for i in ix)
        parts.append(f'<polyline points="{pts}" fill="none" stroke="{col}" stroke-width="1.2" opacity="0.6"/>')
        for j, i in enumerate(ix):
            r = 6 if j in (0, len(ix) - 1) else 3.5
            fill = "white" if j == 0 else col
            parts.append(f'<circle data-i="{i}" cx="{px[i]:.1f}" cy="{py[i]:.1f}" r="{r}" fill="{fill}" '
                         f'stroke="{col}" stroke-width="1.5"/>')
        if gi < 30:
            legend.append(f'<span style="color:{col}">&#9679; {html.escape(name)}</span>')
    data = []
    for i, m in enumerate(meta):
        d = {k: _fmt(v) for k, v in m.items() if v is not None}
        d = {"path": d.pop("path", ""), **d}
        d.update({f"x{j + 1}": f"{coords[i, j]:.4g}" for j in range(min(coords.shape[1], 3))})
        data.append({html.escape(str(k)): html.escape(str(v)) for k, v in d.items()})
    doc = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:16px}} #tip{{position:absolute;display:none;background:#fff;
border:1px solid #888;padding:6px;font-size:12px;pointer-events:none;box-shadow:2px 2px 6px #aaa}}
circle:hover{{stroke:black;stroke-width:2.5}} .lg span{{margin-right:14px;font-size:13px}}</style></head>
<body><h3>{html.escape(title).replace(chr(10), '<br>')}</h3>
<div class="lg">{''.join(legend)} <span>&#9675; start, large filled = end; hover a point for details</span></div>
<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" style="border:1px solid #ddd">
{chr(10).join(parts)}
</svg><div id="tip"></div>
<script>const DATA={json.dumps(data)};{_JS}</script></body></html>
"""
    path = Path(path)
    path.write_text(doc)
    return path
