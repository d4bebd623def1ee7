"""What `python -m pylandscape.hessian` writes: hessian.json (everything, with how it was estimated),
eigenvalues.csv, layers.csv, density.csv + density.png, and for a trajectory trajectory.csv (one row
per snapshot, per-layer columns) + trajectory.png. Writes are atomic."""
from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from ..store import atomic_write_bytes, atomic_write_json
from .hessian import CurvatureReport, SpectralDensity


def _csv(path: Path, header: Sequence[str], rows: Sequence[Sequence]) -> Path:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    for r in rows:
        w.writerow(["" if v is None else (repr(float(v)) if isinstance(v, (float, np.floating)) else v) for v in r])
    atomic_write_bytes(path, buf.getvalue().encode())
    return path


def report_dict(rep: CurvatureReport) -> dict:
    d = {"loss": rep.loss, "num_params": rep.num_params, "info": rep.info, "layers": rep.layers}
    if rep.top is not None:
        d["top_eigenvalues"] = rep.top.values.tolist()
        d["top_residuals"] = rep.top.residuals.tolist()
        d["lanczos_steps"] = rep.top.steps
    if rep.trace is not None:
        d["trace"] = {"value": rep.trace.value, "stderr": rep.trace.stderr, "probes": rep.trace.probes,
                      "method": "Hutchinson, Rademacher probes"}
    if rep.density is not None:
        d["density"] = {"runs": int(rep.density.nodes.shape[0]), "steps": int(rep.density.nodes.shape[1]),
                        "sigma": rep.density.sigma, "nodes": rep.density.nodes.tolist(),
                        "weights": rep.density.weights.tolist(), "method": "stochastic Lanczos quadrature"}
    return d


def density_figure(dens: SpectralDensity, path: Path) -> Path:
    """Smoothed eigenvalue density on a log scale, as PyHessian draws it."""
    lo, hi = float(dens.nodes.min()), float(dens.nodes.max())
    pad = 0.05 * (hi - lo) + 3 * dens.sigma
    grid = np.linspace(lo - pad, hi + pad, 2000)
    y = dens.density(grid)
    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    ax.semilogy(grid, np.maximum(y, 1e-12))
    ax.set_ylim(max(1e-12, y.max() * 1e-8), y.max() * 2)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (smoothed)")
    ax.set_title(f"Hessian spectral density: SLQ, {dens.nodes.shape[0]} runs x {dens.nodes.shape[1]} steps, "
                 f"sigma = {dens.sigma:.2g}", fontsize=9)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    tmp.replace(path)
    return path


def write_report(rep: CurvatureReport, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    atomic_write_json(out / "hessian.json", report_dict(rep))
    paths.append(out / "hessian.json")
    if rep.top is not None:
        paths.append(_csv(out / "eigenvalues.csv", ["k", "eigenvalue", "residual"],
                          [(i + 1, v, r) for i, (v, r) in enumerate(zip(rep.top.values, rep.top.residuals))]))
    if rep.layers:
        cols = list(dict.fromkeys(k for r in rep.layers for k in r))
        paths.append(_csv(out / "layers.csv", cols, [[r.get(c) for c in cols] for r in rep.layers]))
    if rep.density is not None:
        dens = rep.density
        lo, hi = float(dens.nodes.min()), float(dens.nodes.max())
        grid = np.linspace(lo - 3 * dens.sigma, hi + 3 * dens.sigma, 1000)
        paths.append(_csv(out / "density.csv", ["eigenvalue", "density"], list(zip(grid, dens.density(grid)))))
        paths.append(density_figure(rep.density, out / "density.png"))
    return paths


def trajectory_rows(reports: Sequence[CurvatureReport], metas: Sequence[dict]) -> tuple[list[str], list[list]]:
    """One row per snapshot: its metadata, loss, and per layer lambda_1.. and trace."""
    meta_cols = [c for c in ("path", "trajectory", "epoch", "step") if any(c in m for m in metas)]
    layer_cols: list[str] = []
    for rep in reports:
        for r in rep.layers:
            for k in r:
                if k not in ("layer", "size"):
                    col = f"{r['layer']}: {k}"
                    if col not in layer_cols:
                        layer_cols.append(col)
    header = meta_cols + ["loss", "lambda_max", "trace"] + layer_cols
    rows = []
    for rep, m in zip(reports, metas):
        vals = {f"{r['layer']}: {k}": v for r in rep.layers for k, v in r.items() if k not in ("layer", "size")}
        rows.append([m.get(c) for c in meta_cols] + [rep.loss, None if rep.top is None else float(rep.top.values[0]),
                                                    None if rep.trace is None else rep.trace.value] +
                    [vals.get(c) for c in layer_cols])
    return header, rows


def trajectory_figure(header: list[str], rows: list[list], path: Path) -> Path:
    """Top eigenvalue of each layer block (log scale) against the snapshot's epoch (or its index)."""
    xcol = "epoch" if "epoch" in header else ("step" if "step" in header else None)
    xs = [r[header.index(xcol)] if xcol else i for i, r in enumerate(rows)]
    xs = [i if x is None else x for i, x in enumerate(xs)]
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    for c in header:
        if c.endswith(": lambda_1"):
            ys = [r[header.index(c)] for r in rows]
            ax.plot(xs, ys, "o-", ms=3, label=c.replace(": lambda_1", ""))
    if "lambda_max" in header and any(r[header.index("lambda_max")] is not None for r in rows):
        ax.plot(xs, [r[header.index("lambda_max")] for r in rows], "k--", label="whole model")
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_xlabel(xcol or "snapshot")
    ax.set_ylabel("top Hessian eigenvalue")
    ax.legend(fontsize=7)
    ax.set_title("curvature along the trajectory, per layer block", fontsize=9)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    tmp.replace(path)
    return path


def write_trajectory(reports: Sequence[CurvatureReport], metas: Sequence[dict], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    header, rows = trajectory_rows(reports, metas)
    paths = [_csv(out / "trajectory.csv", header, rows)]
    atomic_write_json(out / "trajectory.json", {"snapshots": [dict(m) for m in metas],
                                                "reports": [report_dict(r) for r in reports]})
    paths.append(out / "trajectory.json")
    paths.append(trajectory_figure(header, rows, out / "trajectory.png"))
    return paths


def redraw(out: Path) -> list[Path]:
    """density.png and trajectory.png again from hessian.json / trajectory.csv."""
    out = Path(out)
    paths = []
    d = json.loads((out / "hessian.json").read_text()).get("density")
    if d:
        dens = SpectralDensity(np.array(d["nodes"]), np.array(d["weights"]), float(d["sigma"]))
        paths.append(density_figure(dens, out / "density.png"))
    if (out / "trajectory.csv").exists():
        with open(out / "trajectory.csv", newline="") as f:
            rows = list(csv.reader(f))
        header = rows[0]

        def num(v):
            try:
                return float(v)
            except ValueError:
                return v if v != "" else None
        paths.append(trajectory_figure(header, [[num(v) for v in r] for r in rows[1:]], out / "trajectory.png"))
    return paths
