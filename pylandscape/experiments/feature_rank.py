"""Rank of every layer's feature matrix vs its width and the number of samples N (Nguyen & Hein)."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import torch

from .. import data, figures, linalg, models, theory
from . import outdir, training

NAME = "feature-rank"
FIGURE = "Nguyen & Hein 2018 (a layer with >= N units has linearly independent features)"
DESCRIPTION = """
Feeds N training images through the paper's CNN (dcnn) at several width multipliers, at
initialisation and after a short full-batch training run, and measures the numerical rank of each
layer's feature matrix [N x units] (pre-activations of every conv layer and post-activations of every
ReLU). Nguyen & Hein: for almost all weights, a layer with at least N units has rank N (linearly
independent features), which makes the layers above it able to fit any labels. Plotted: rank/N
against units/N with the bound min(1, units/N); the input itself has rank <= its true dimension
(64 for the 8x8 digits), so full rank is created by the nonlinearity, not inherited.
"""


@dataclass
class Config:
    dataset: str = "cifar10"
    data_root: str | None = None
    num_points: int = 1000
    widths: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)
    activations: tuple[str, ...] = ("relu",)
    train_steps: int = 300
    lr: float = 1e-3
    rtol: float | None = None
    seed: int = 0
    device: str = "cpu"
    threads: int = 0


PRESETS = {
    "paper": Config(),
    "quick": Config(dataset="digits", num_points=100, widths=(0.0625, 0.125, 0.25, 0.5),
                    activations=("relu", "poly"), train_steps=40, lr=3e-3, threads=1),
}


@torch.no_grad()
def _bn_stats_of(model, x) -> None:
    """BatchNorm statistics of exactly x, then eval mode: features equal full-batch train-mode BN."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    model(x)
    model.eval()


def _train(model, x, y, steps: int, lr: float) -> float:
    """Full-batch Adam on cross-entropy (the dcnn outputs logits); returns the final training error."""
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    _bn_stats_of(model, x)
    with torch.no_grad():
        return float((model(x).argmax(1) != y).double().mean())


def _unit(act, width):
    return f"{act}-{width}"


def run(config: Config, out_dir: Path) -> dict:
    training.set_threads(config.threads)
    out = Path(out_dir)
    if not (out / outdir.CONFIG).exists():
        outdir.prepare_out(out, NAME, config, resume=True)
    prog = outdir.Progress(out)
    device = torch.device(config.device)
    ds = data.load_dataset(config.dataset, config.data_root, train_size=config.num_points, seed=config.seed,
                        dtype=torch.float64)
    x, y = ds.x_train.to(device), ds.y_train.to(device)
    n = x.shape[0]
    # The images are made in float32 (data.load_dataset), so their rounding (~1e-8 relative) is noise,
    # not rank: every tolerance here uses float32's eps even though the model runs in float64.
    eps_dtype = torch.float32
    input_rank = linalg.numerical_rank(x.flatten(1).double(), rtol=config.rtol, dtype=eps_dtype)
    for act, width in itertools.product(config.activations, config.widths):
        unit = _unit(act, width)
        if unit in prog:
            continue
        outdir.log(f"{NAME}: dcnn x{width} ({act}) on {n} {config.dataset} images")
        torch.manual_seed(config.seed)
        model = models.dcnn(width, in_channels=ds.in_channels, num_classes=ds.num_classes,
                            image_size=ds.image_size, activation=act).double().to(device)
        rows = []
        _bn_stats_of(model, x)
        for stage in ("init", "trained"):
            if stage == "trained":
                err = _train(model, x, y, config.train_steps, config.lr)
            else:
                with torch.no_grad():
                    err = float((model(x).argmax(1) != y).double().mean())
            for i, r in enumerate(theory.feature_ranks(model, x, rtol=config.rtol, dtype=eps_dtype)):
                rows.append({"activation": act, "width": width, "stage": stage, "train_error": err,
                             "depth": i, **r})
        prog.mark(unit, rows)
    rows = [r for a, w in itertools.product(config.activations, config.widths) for r in prog.get(_unit(a, w))]
    outdir.write_table(out / "metrics" / "feature_rank", rows)
    post = [r for r in rows if r["kind"] == "post"]
    wide = [r for r in post if r["units"] >= n]
    narrow = [r for r in post if r["units"] < n]
    res = {
        "N": n, "input_rank": input_rank,
        "post-activation layers with units >= N": len(wide),
        "... of which rank == N": sum(r["rank"] == n for r in wide),
        "post-activation layers with units < N": len(narrow),
        "... of which rank == units": sum(r["rank"] == r["units"] for r in narrow),
        "pre-activation (conv) layers with rank == min(N, units)":
            f"{sum(r['full'] for r in rows if r['kind'] == 'pre')}/{sum(r['kind'] == 'pre' for r in rows)}",
        "conv1 (linear in the input) ranks": sorted({r["rank"] for r in rows if r["depth"] == 0}),
    }
    short = [f"{r['activation']} x{r['width']} {r['stage']} {r['layer']}: {r['rank']}/{min(n, r['units'])}"
             for r in post if not r["full"]]
    res["post-activation layers below min(N, units)"] = "; ".join(short) if short else "none"
    outdir.write_results(out, res)
    plot(out)
    return res


def plot(out_dir: Path) -> list[Path]:
    out = Path(out_dir)
    rows = outdir.read_table(out / "metrics" / "feature_rank")
    if not rows:
        raise ValueError(f"{out}: feature_rank table is empty")
    n = rows[0]["N"]
    fig, axes = figures.new_figure(1, 2, figsize=(11, 4.3))
    axes = axes[0]
    ax = axes[0]
    marks = {("init", "pre"): ("o", "none"), ("trained", "pre"): ("s", "none"),
             ("init", "post"): ("o", None), ("trained", "post"): ("s", None)}
    acts = list(dict.fromkeys(r["activation"] for r in rows))
    cmap = matplotlib.colormaps["tab10"]
    for ai, act in enumerate(acts):
        for (stage, kind), (m, face) in marks.items():
            sel = [r for r in rows if r["activation"] == act and r["stage"] == stage and r["kind"] == kind]
            if not sel:
                continue
            kw = {"facecolors": "none", "edgecolors": cmap(ai)} if face == "none" else {"color": cmap(ai)}
            ax.scatter([r["units"] / n for r in sel], [r["rank"] / n for r in sel], marker=m, s=18, alpha=0.8,
                       label=f"{act}, {stage}, {'pre-activation' if kind == 'pre' else 'post-activation'}", **kw)
    xs = sorted({r["units"] / n for r in rows} | {1.0})
    ax.plot(xs, [min(1.0, v) for v in xs], "k--", lw=0.8, label="min(1, units/N)")
    try:
        ir = outdir.read_results(out)["input_rank"]
        ax.axhline(ir / n, color="gray", lw=0.8, ls=":", label=f"input rank / N ({ir}/{n})")
    except (FileNotFoundError, KeyError):
        pass
    ax.set_xscale("log")
    ax.set_xlabel("layer units / N")
    ax.set_ylabel("rank of feature matrix / N")
    ax.set_title(f"feature rank of every dcnn layer, N = {n}", fontsize=9)
    ax.legend(fontsize=6)
    ax = axes[1]
    act = acts[0]
    widths = sorted({r["width"] for r in rows if r["activation"] == act})
    wc = matplotlib.colormaps["viridis"]
    for wi, w in enumerate(widths):
        for stage, ls in (("init", "-"), ("trained", ":")):
            sel = [r for r in rows if r["activation"] == act and r["width"] == w and r["stage"] == stage
                   and r["kind"] == "post"]
            ax.plot(range(1, len(sel) + 1), [r["rank"] for r in sel], ls, marker="o", ms=3,
                    color=wc(wi / max(1, len(widths) - 1)), label=f"x{w} {stage}")
            if stage == "init":
                ax.plot(range(1, len(sel) + 1), [r["units"] for r in sel], color=wc(wi / max(1, len(widths) - 1)),
                        lw=0.5, alpha=0.5)
    ax.axhline(n, color="k", ls="--", lw=0.8, label="N")
    ax.set_yscale("log")
    ax.set_xlabel("hidden layer (post-activation)")
    ax.set_ylabel("rank (thin lines: units)")
    ax.set_title(f"{act}: rank per layer, init (solid) vs trained (dotted)", fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return [figures.save_figure(fig, out / "figures" / "feature_rank.png")]
