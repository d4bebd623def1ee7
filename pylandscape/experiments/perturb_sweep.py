"""How often does a random layerwise perturbation lower the training loss? (Liao & Poggio Sec. 4, the
hyper-basin: "almost never", at a zero-error minimum.)"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .. import figures
from ..landscape import PerturbedPoints, evaluate_points
from ..store import SnapshotStore
from . import outdir, training, weights
from .config import Protocol

NAME = "perturb-sweep"
FIGURE = "Liao & Poggio Sec. 4 (hyper-basin): P(loss goes down) under random perturbations vs sigma"
DESCRIPTION = """
The paper's claim (Sec. 4, hyper-basin): at a zero-error minimum found by SGD/GD, almost every random
perturbation of the weights increases the training loss ("almost never down"), while early in
training many directions still lead down. Measured here: a model is trained with plain SGD then plain
full-batch GD to zero training error (verified and reported; GD continues up to gd_max_epochs until
it is). At that minimum and at the SGD model of epoch early_epoch, n_directions random layerwise
perturbations (noise N(0, (sigma x S_l)^2) per tensor, S_l its weight std) are drawn for each sigma
of a log range, the same noise directions for every sigma. Per point and sigma: the fraction of
directions whose training loss is below the unperturbed one, the mean and 5/25/50/75/95 % quantiles
of the loss increase, and the mean training error. Copies are formed K = batch_directions at a time
by the perturbation kernel (ops.perturb_batched via landscape.PerturbedPoints) and evaluated K at a
time by landscape.evaluate_points (BatchNorm statistics re-estimated on the training set per copy).
"""


@dataclass
class Config:
    dataset: str = "cifar10"
    data_root: str | None = None
    train_size: int | None = None
    width: float = 1.0
    widths: tuple[int, ...] | None = None
    lr: float = 0.01
    batch_size: int = 100
    sgd_epochs: int = 60
    gd_lr: float = 0.1
    gd_epochs: int = 400
    gd_max_epochs: int = 1000
    check_every: int = 10
    chunk_size: int | None = None
    early_epoch: int = 5
    sigmas: tuple[float, ...] = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
    n_directions: int = 256
    batch_directions: int = 64
    perturb_mode: str = "std"
    pre_bn_biases: bool = False
    route: str = "auto"
    seed: int = 0
    device: str = "auto"
    threads: int = 0


PRESETS = {
    "paper": Config(),
    "quick": Config(dataset="digits", device="cpu", train_size=500, width=0.25, lr=0.1, sgd_epochs=8,
                    gd_lr=0.3, gd_epochs=30, gd_max_epochs=200, check_every=5, early_epoch=1,
                    n_directions=128, batch_directions=64, threads=1),
}
_CHOICES = (
    "the minimum: 60 SGD epochs (lr 0.01, batch 100) then 400 GD epochs (lr 0.1), as the perturb-retrain "
    "preset's zero-error model (issue 12); the paper does not say which minimum Sec. 4 probes.",
    "early point: the SGD model after early_epoch=5 epochs (perturb-retrain's early source model).",
    "sigmas 1e-3..1 x S_l on a log grid; the same n_directions noise draws (seeds) at every sigma, so "
    "each row of the table scales the same directions.",
    "loss: mean cross-entropy on the whole training set, BatchNorm statistics re-estimated per copy; "
    "'down' means strictly below the unperturbed model's loss evaluated the same way.",
    "pre_bn_biases=false: the biases BatchNorm cancels are not perturbed (they cannot change the loss).",
    "momentum 0 everywhere (plain SGD and GD).",
)
PROTOCOLS = {
    "paper": Protocol("(issue 12) at a zero-error minimum and at an early-training point, many random "
                      "layerwise perturbations for sigma over a log range; per sigma the fraction of "
                      "directions where the training loss goes down (the paper: almost never).", _CHOICES),
    "quick": Protocol("as paper, scaled down: digits, 500 images, width 0.25, 8 SGD epochs (lr 0.1) then GD "
                      "(lr 0.3) to zero training error, early point = SGD epoch 1, 128 directions.",
                      ("lr=0.1, gd_lr=0.3: same methods as the paper (plain SGD, plain GD), larger steps "
                       "for the small run (perturb-retrain's quick preset measured them).",) + _CHOICES[2:]),
}
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def _check(config: Config) -> None:
    if not 0 <= config.early_epoch <= config.sgd_epochs:
        raise ValueError(f"early_epoch={config.early_epoch} must lie in [0, sgd_epochs={config.sgd_epochs}]")
    if config.gd_max_epochs < config.gd_epochs:
        raise ValueError(f"gd_max_epochs={config.gd_max_epochs} must be >= gd_epochs={config.gd_epochs}")
    if config.n_directions < 1 or config.batch_directions < 1:
        raise ValueError("n_directions and batch_directions must be >= 1")
    if not config.sigmas or any(s <= 0 for s in config.sigmas):
        raise ValueError(f"sigmas must be positive numbers, got {config.sigmas}")


def direction_seeds(config: Config, point: int) -> torch.Tensor:
    """[n_directions] noise seeds of one point, shared by every sigma (fixed: a resumed run agrees)."""
    return torch.arange(config.n_directions, dtype=torch.int64) + (config.seed * 16 + point + 1) * 2**20


def train_to_zero(config, out: Path, make, data, start: torch.Tensor, store_name: str) -> tuple[list[dict], int | None]:
    """Plain full-batch GD from `start` for at least gd_epochs, then on until zero training error or
    gd_max_epochs (training.run_train_to_zero, as perturb-retrain does). (history, first zero epoch)."""
    every = max(1, config.check_every)
    snaps = sorted(set(range(0, config.gd_max_epochs + 1, every)) | {config.gd_epochs})
    tconfig = training.train_config(config, optimizer="gd", lr=config.gd_lr, momentum=0.0, epochs=config.gd_epochs,
                                    snapshot_epochs=snaps, eval_every=every)
    return training.run_train_to_zero(make, start, data, tconfig, outdir.store_dir(out, store_name),
                                      meta={"run": store_name}, max_epochs=config.gd_max_epochs, name=store_name,
                                      warn_if_longer=False)


def sweep_point(make, base: torch.Tensor, spec, frozen, data, config: Config, point: int) -> list[dict]:
    """One row per sigma: fraction of directions with lower training loss, loss-increase statistics."""
    model = make()
    sets = {"train": (data.x_train, data.y_train)}
    ref = evaluate_points(model, base.reshape(1, -1), sets, bn="reestimate", bn_x=data.x_train, route=config.route)
    loss0, err0 = float(ref.losses["train"][0]), float(ref.errors["train"][0])
    seeds = direction_seeds(config, point)
    rows = []
    for sigma in config.sigmas:
        scales = weights.tensor_scales(spec, sigma, frozen).expand(config.n_directions, -1)
        pts = PerturbedPoints(base, spec.offsets, scales, seeds, mode=config.perturb_mode)
        res = evaluate_points(model, pts, sets, bn="reestimate", bn_x=data.x_train, route=config.route,
                              chunk=config.batch_directions)
        rows.append(sweep_row(loss0, err0, res.losses["train"], res.errors["train"], sigma))
        rows[-1]["seconds"] = res.seconds
    return rows


def sweep_row(loss0: float, err0: float, losses: torch.Tensor, errors: torch.Tensor, sigma: float) -> dict:
    """Statistics of one sigma's perturbed copies (losses, errors [K]) against the base (loss0, err0)."""
    d = losses.to(torch.float64) - loss0
    q = torch.quantile(d, torch.tensor(QUANTILES, dtype=torch.float64))
    row = {"sigma": sigma, "n": int(d.numel()), "base_train_loss": loss0, "base_train_error": err0,
           "frac_down": float((d < 0).double().mean()), "frac_unchanged": float((d == 0).double().mean()),
           "mean_increase": float(d.mean()), "min_increase": float(d.min()), "max_increase": float(d.max())}
    row.update({f"q{int(round(p * 100)):02d}_increase": float(v) for p, v in zip(QUANTILES, q)})
    row["mean_train_error"] = float(errors.double().mean())
    row["frac_train_error_zero"] = float((errors == 0).double().mean())
    return row


def run(config: Config, out_dir: Path) -> dict:
    _check(config)
    out, prog, data, make, flat0, spec, frozen = training.start(config, out_dir)

    if "sgd" not in prog:
        outdir.log(f"{config.sgd_epochs} SGD epochs (snapshot at epoch {config.early_epoch})")
        hist = training.run_train(make, flat0, data, training.train_config(
            config, optimizer="sgd", momentum=0.0, epochs=config.sgd_epochs,
            snapshot_epochs=sorted({0, config.early_epoch, config.sgd_epochs}), eval_every=1),
            outdir.store_dir(out, "sgd"), meta={"run": "sgd"}, resume=True)
        outdir.write_table(out / "metrics" / "sgd", hist)
        prog.mark("sgd")
    sgd = SnapshotStore(outdir.store_dir(out, "sgd"))
    if "gd" not in prog:
        outdir.log(f"full-batch GD to zero training error (at least {config.gd_epochs} epochs)")
        hist, zero = train_to_zero(config, out, make, data, sgd.load_flat(outdir.last_index(sgd)), "gd")
        for r in hist:
            r["epoch"] += config.sgd_epochs
        outdir.write_table(out / "metrics" / "gd", hist)
        prog.mark("gd", {"zero_train_error_gd_epoch": None if zero is None else zero,
                         "final_train_error": hist[-1]["train_error"]})
    gd = SnapshotStore(outdir.store_dir(out, "gd"))
    points = {"minimum": gd.load_flat(outdir.last_index(gd)),
              "early": sgd.load_flat(sgd.select(epoch=config.early_epoch)[-1])}
    for p, (name, base) in enumerate(points.items()):
        unit = f"sweep_{name}"
        if unit not in prog:
            outdir.log(f"{name}: {config.n_directions} directions x {len(config.sigmas)} sigmas")
            rows = [{"point": name, **r} for r in sweep_point(make, base, spec, frozen, data, config, p)]
            outdir.write_table(out / "metrics" / unit, rows)
            prog.mark(unit)
    rows = outdir.read_table(out / "metrics" / "sweep_minimum") + outdir.read_table(out / "metrics" / "sweep_early")
    outdir.write_table(out / "metrics" / "perturb_sweep", rows)
    results = summarize(out, config, prog)
    outdir.write_results(out, results)
    plot(out)
    return results


def summarize(out: Path, config: Config, prog: outdir.Progress) -> dict:
    rows = outdir.read_table(out / "metrics" / "perturb_sweep")
    gd = prog.get("gd")
    res = {"minimum_train_error": gd["final_train_error"],
           "minimum_has_zero_train_error": gd["final_train_error"] == 0,
           "minimum_zero_error_reached_at_gd_epoch": gd["zero_train_error_gd_epoch"]}
    for name in ("minimum", "early"):
        sub = [r for r in rows if r["point"] == name]
        res[f"{name}_train_loss"] = sub[0]["base_train_loss"]
        res[f"{name}_frac_down_by_sigma"] = {str(r["sigma"]): r["frac_down"] for r in sub}
        res[f"{name}_max_frac_down"] = max(r["frac_down"] for r in sub)
        # above this sigma (on the grid) the loss almost never goes down: the curvature term beats the
        # gradient term; below it a non-zero gradient makes about half the directions descend
        res[f"{name}_smallest_sigma_with_frac_down_le_0.05"] = next(
            (r["sigma"] for r in sorted(sub, key=lambda r: r["sigma"])
             if all(q["frac_down"] <= 0.05 for q in sub if q["sigma"] >= r["sigma"])), None)
        res[f"{name}_median_increase_by_sigma"] = {str(r["sigma"]): r["q50_increase"] for r in sub}
    res["directions_per_sigma"] = config.n_directions
    return res


def plot(out_dir: Path) -> list[Path]:
    out = Path(out_dir)
    rows = outdir.read_table(out / "metrics" / "perturb_sweep")
    fig, axes = figures.new_figure(1, 2, figsize=(11, 4))
    cols = {"minimum": "tab:blue", "early": "tab:orange"}
    for name, c in cols.items():
        sub = [r for r in rows if r["point"] == name]
        s = [r["sigma"] for r in sub]
        axes[0, 0].plot(s, [r["frac_down"] for r in sub], "o-", color=c,
                        label=f"{name} (train loss {sub[0]['base_train_loss']:.2e}, "
                              f"error {sub[0]['base_train_error']:.3f})")
        ax = axes[0, 1]
        ax.plot(s, [max(r["q50_increase"], 1e-12) for r in sub], "o-", color=c, label=f"{name}: median")
        ax.fill_between(s, [max(r["q05_increase"], 1e-12) for r in sub], [max(r["q95_increase"], 1e-12) for r in sub],
                        color=c, alpha=0.2, label=f"{name}: 5-95 %")
    ax = axes[0, 0]
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.axhline(0.5, color="gray", ls=":", lw=1)
    ax.set_xlabel("sigma (x layer weight std)")
    ax.set_ylabel("fraction of directions with lower training loss")
    ax.set_title("random layerwise perturbations: how often the loss goes down", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[0, 1]
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("sigma (x layer weight std)")
    ax.set_ylabel("training-loss increase (clipped at 1e-12)")
    ax.set_title("loss increase: median and 5-95 % quantiles", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return [figures.save_figure(fig, out / "figures" / "perturb_sweep.png")]
