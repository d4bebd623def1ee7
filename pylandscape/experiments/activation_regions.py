"""Fraction of activation regions of a two-layer ReLU net whose Jacobian has full rank (Karhadkar et al.)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import torch

from .. import figures, theory
from . import outdir, training

NAME = "activation-regions"
FIGURE = "Karhadkar et al. 2023 (phase transition of full-rank Jacobians over activation regions)"
DESCRIPTION = """
For f(x) = sum_j v_j relu(w_j . x + b_j) on n generic inputs (Gaussian in R^d0, or 1-D), draws many
random parameters (each lands in an activation region with probability = the region's Gaussian
volume; for 1-D data also uniformly over regions, ":count") and computes, in closed form and batched,
the rank of the Jacobian of theta -> (f(x_1), ..., f(x_n)) with respect to the first-layer weights w
(the paper's choice: the rank in w alone already decides that every differentiable critical point
of the region with v_j != 0 is a global minimum; "wb" adds the biases, "wbv" all parameters).
Plots the fraction of regions with full rank n against (Jacobian columns)/n = width*d0/n for wrt=w.
Theory (Karhadkar et al.): columns >= n is necessary, and with a width that also grows like
log(n/eps) (so that no data point is switched off in every unit: the zero_row_fraction column) all
but a fraction eps of the regions have full rank.
"""


@dataclass
class Config:
    n: int = 60
    # one series per entry "d0:wrt[:count]": input dimension (1 = 1-D inputs), the Jacobian's
    # variables, and ":count" to draw regions uniformly (1-D only) instead of by Gaussian volume
    series: tuple[str, ...] = ("2:w", "5:w", "10:w", "1:wb", "1:wb:count")
    # widths are chosen so that (Jacobian columns)/n runs over these ratios
    ratios: tuple[float, ...] = (0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 4.0)
    num_regions: int = 1000
    bias: bool = True
    rtol: float | None = None
    seed: int = 0
    device: str = "cpu"
    threads: int = 0


PRESETS = {
    "paper": Config(),
    "quick": Config(n=30, num_regions=200, threads=1),
}


def _parse(entry: str) -> tuple[int, str, str]:
    parts = entry.split(":")
    try:
        d0, wrt = int(parts[0]), parts[1]
        sampling = {None: "volume", "volume": "volume", "count": "count"}[parts[2] if len(parts) > 2 else None]
        if len(parts) > 3:
            raise ValueError
    except (ValueError, IndexError, KeyError):
        raise ValueError(f"series entry {entry!r}: expected 'd0:wrt[:count]', e.g. '5:w' or '1:wb:count'") from None
    if d0 < 1 or wrt not in ("w", "wb", "wbv"):
        raise ValueError(f"series entry {entry!r}: d0 must be >= 1 and wrt one of w, wb, wbv")
    if sampling == "count" and d0 != 1:
        raise ValueError(f"series entry {entry!r}: ':count' (uniform over regions) needs d0 = 1")
    return d0, wrt, sampling


def _cols_per_unit(d0: int, wrt: str) -> int:
    return d0 + ("b" in wrt) + ("v" in wrt)


def _widths(config: Config, d0: int, wrt: str) -> list[int]:
    c = _cols_per_unit(d0, wrt)
    return sorted({max(1, math.ceil(r * config.n / c)) for r in config.ratios})


def _inputs(config: Config, d0: int) -> torch.Tensor:
    g = training.generator(config.seed + 1000 * d0)
    if d0 == 1:
        # 1-D: distinct, sorted points; generic (no two equal) is all the theory needs
        return torch.sort(torch.randn(config.n, 1, generator=g, dtype=torch.float64), dim=0).values
    return torch.randn(config.n, d0, generator=g, dtype=torch.float64)


def run(config: Config, out_dir: Path) -> dict:
    training.set_threads(config.threads)
    out = Path(out_dir)
    if not (out / outdir.CONFIG).exists():
        outdir.prepare_out(out, NAME, config, resume=True)
    prog = outdir.Progress(out)
    rows = []
    for entry in config.series:
        d0, wrt, sampling = _parse(entry)
        x = _inputs(config, d0)
        for width in _widths(config, d0, wrt):
            unit = f"{entry}-{width}"
            if unit not in prog:
                g = training.generator(config.seed * 7919 + width * 31 + d0)
                r = theory.activation_region_ranks(x, width, config.num_regions, wrt=wrt, bias=config.bias,
                                              sampling=sampling, generator=g, device=config.device, rtol=config.rtol)
                ranks = r["ranks"]
                prog.mark(unit, {
                    "series": entry, "d0": d0, "wrt": wrt, "sampling": sampling, "width": width, "n": config.n,
                    "columns": r["columns"], "ratio": r["columns"] / config.n,
                    "full_rank_fraction": r["full_rank_fraction"],
                    "mean_rank_deficit": float((config.n - ranks).double().mean()),
                    "min_rank": int(ranks.min()), "regions": int(ranks.numel()),
                    "distinct_patterns": r["num_distinct_patterns"],
                    "zero_row_fraction": r["zero_row_fraction"],
                })
            rows.append(prog.get(unit))
    outdir.write_table(out / "metrics" / "activation_regions", rows)
    res = {"n": config.n, "num_regions": config.num_regions}
    for entry in config.series:
        ser = [r for r in rows if r["series"] == entry]
        for level in (0.5, 0.9):
            hit = [r["ratio"] for r in ser if r["full_rank_fraction"] >= level]
            res[f"{entry}: smallest columns/n with full-rank fraction >= {level}"] = min(hit) if hit else None
        at1 = [r for r in ser if r["ratio"] >= 1.0]
        res[f"{entry}: full-rank fraction at the smallest columns/n >= 1"] = \
            at1[0]["full_rank_fraction"] if at1 else None
    outdir.write_results(out, res)
    plot(out)
    return res


def plot(out_dir: Path) -> list[Path]:
    out = Path(out_dir)
    rows = outdir.read_table(out / "metrics" / "activation_regions")
    series = list(dict.fromkeys(r["series"] for r in rows))
    fig, axes = figures.new_figure(1, 2, figsize=(11, 4.2))
    axes = axes[0]
    cmap = matplotlib.colormaps["tab10"]
    for i, s in enumerate(series):
        ser = sorted((r for r in rows if r["series"] == s), key=lambda r: r["ratio"])
        d0, wrt, sampling = _parse(s)
        label = f"d0={d0}, wrt {wrt}, by {sampling}"
        axes[0].plot([r["ratio"] for r in ser], [r["full_rank_fraction"] for r in ser], "o-", ms=3,
                     color=cmap(i % 10), label=label)
        axes[1].plot([r["ratio"] for r in ser], [r["mean_rank_deficit"] for r in ser], "o-", ms=3,
                     color=cmap(i % 10), label=label)
    n = rows[0]["n"] if rows else 0
    ticks = sorted({round(r["ratio"], 2) for r in rows} & {0.25, 0.5, 1.0, 2.0, 3.0, 4.0}) or [1.0]
    for ax in axes:
        ax.axvline(1.0, color="k", lw=0.7, ls="--", label="columns = n (necessary)")
        ax.set_xscale("log")
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("Jacobian columns / n  (= width·d0/n for wrt w)")
    axes[0].set_ylabel("fraction of regions with rank J = n")
    axes[0].set_title(f"full-rank activation regions, n = {n} points", fontsize=9)
    axes[0].legend(fontsize=7)
    axes[1].set_ylabel("mean rank deficit n − rank J")
    axes[1].set_yscale("symlog", linthresh=1)
    axes[1].set_ylim(bottom=0)
    axes[1].set_title("how far from full rank, on average", fontsize=9)
    fig.tight_layout()
    return [figures.save_figure(fig, out / "figures" / "activation_regions.png")]
