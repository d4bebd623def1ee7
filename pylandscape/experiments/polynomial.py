"""ReLU network vs the same network with polynomial activations, with and without BatchNorm (Fig. 2)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import figures
from ..models import PolyActivation, activation_inputs, fit_relu_polynomial
from . import outdir, training
from .config import Protocol

NAME = "polynomial"
FIGURE = "Liao & Poggio Fig. 2 (ReLU vs polynomial activations)"
DESCRIPTION = """
Trains the same network with the ReLU activation and with polynomial activations (least-squares fits
of the ReLU, e.g. poly2, poly3), same data, initialisation and SGD settings, and compares training and
test error and loss curves; once with BatchNorm (the paper's network) and once without it, where the
polynomial net is a polynomial in its weights (the premise of the paper's theory). The paper's point:
a polynomial net behaves essentially like the ReLU net, so the theory developed for polynomial networks
(Bezout-style counting of degenerate global minima) is relevant to ReLU networks.

How the polynomials are fitted (poly_fit=empirical): for each hidden layer, least squares of ReLU over
the values that layer's activation receives in the ReLU network at initialisation on fit_points
training images (with BatchNorm: the BatchNorm outputs, about N(0, 1)). The fit is therefore accurate
where the values are, near 0, instead of being worst at 0 as a fit on a uniform interval is. Odd
degrees matter only because those values are skewed: for any symmetric range the odd part of a
least-squares fit of ReLU is exactly x/2, so degree 3 would equal degree 2. metrics/fits.csv lists the
coefficients and the fit errors (RMS over the values, at 0, worst within the central 98%).
poly_fit=interval fits on poly_interval at Chebyshev nodes instead (the older behaviour).
"""


@dataclass
class Config:
    dataset: str = "cifar10"
    data_root: str | None = None
    train_size: int | None = None
    width: float = 1.0
    widths: tuple[int, ...] | None = None
    activations: tuple[str, ...] = ("relu", "poly2", "poly3", "poly4")
    batchnorm: tuple[bool, ...] = (True, False)
    nobn_init: str = "kaiming"
    nobn_lr: float | None = None
    poly_fit: str = "empirical"
    poly_interval: tuple[float, float] = (-3.0, 3.0)
    fit_points: int = 1000
    optimizer: str = "sgd"
    lr: float = 0.01
    batch_size: int = 100
    momentum: float = 0.0
    epochs: int = 60
    seed: int = 0
    device: str = "auto"
    threads: int = 0


PRESETS = {
    "paper": Config(),
    "quick": Config(dataset="digits", device="cpu", train_size=500, width=0.25, activations=("relu", "poly2", "poly3"),
                    lr=0.1, nobn_lr=0.03, epochs=10, threads=1),
}
_CHOICES = (
    "poly_fit=empirical: the paper does not say how its polynomials were fitted; we fit each layer's "
    "activation to the values it receives at initialisation (accurate near 0, where BatchNorm puts them).",
    "batchnorm=(true, false): the paper's net has BatchNorm; the BatchNorm-free variant is added because "
    "only without BatchNorm is the network a polynomial in its weights.",
    "momentum=0: the paper says SGD; no momentum unless --set asks for it.",
    "initialisation: PyTorch's default for Conv2d with BatchNorm; nobn_init=kaiming (Kaiming-normal, zero "
    "biases) without it, because the default init shrinks the signal ~2.5x per layer when nothing "
    "renormalises it (activation-input std 0.40, 0.16, 0.07, 0.04; the BatchNorm-free ReLU net then "
    "barely trains: 83% training error after 10 quick epochs, 16% with Kaiming). The same initial weights "
    "for every activation within a variant.",
)
PROTOCOLS = {
    "paper": Protocol("(issue 12) Fig. 2: the network with ReLU and with polynomial approximations of ReLU "
                      "(degrees 2, 3, 4 here), trained the same way; the fit good near 0 over the range "
                      "BatchNorm produces, degree 3 different from degree 2, and a BatchNorm-free variant.",
                      _CHOICES),
    "quick": Protocol("as the paper preset, scaled down: digits, 500 training images, width 0.25, relu/poly2/"
                      "poly3, 10 epochs.",
                      ("lr=0.1 (not 0.01): same method (plain SGD, batch 100), a larger step for 10 epochs: on "
                       "digits at width 0.25 SGD at lr 0.1 reaches zero training error at epoch 14 (ReLU, "
                       "with BatchNorm).",
                       "nobn_lr=0.03: without BatchNorm the polynomial nets diverge at lr 0.1 (loss NaN within "
                       "10 epochs, measured) and train at 0.03; same method, smaller step.") + _CHOICES),
}


def parse_activation(a: str) -> tuple[str, int]:
    """"relu" -> ("relu", 2); "poly3" -> ("poly", 3)."""
    if a == "relu":
        return "relu", 2
    m = re.fullmatch(r"poly(\d+)", a)
    if not m or int(m.group(1)) < 1:
        raise ValueError(f"activation {a!r}: use relu or polyN (N >= 1, e.g. poly2)")
    return "poly", int(m.group(1))


def run_name(activation: str, batchnorm: bool) -> str:
    return activation if batchnorm else f"{activation}-nobn"


def _init(config: Config, batchnorm: bool) -> str:
    return "default" if batchnorm else config.nobn_init


def _check(config: Config) -> None:
    for a in config.activations:
        parse_activation(a)
    if config.poly_fit not in ("empirical", "interval"):
        raise ValueError(f"poly_fit must be 'empirical' or 'interval', got {config.poly_fit!r}")
    if not config.batchnorm:
        raise ValueError("batchnorm lists the variants to run: true, false or true,false")


def fit_rows(config: Config, data, batchnorm: bool) -> list[dict]:
    """One row per (degree, hidden layer): the fitted coefficients and the fit's errors over the values
    that layer's ReLU receives at initialisation (the first fit_points training images, train mode)."""
    make = training.model_fn(config, data, activation="relu", batchnorm=batchnorm, init=_init(config, batchnorm))
    model, _, _ = training.init_flat(make, config.seed)
    model.train()
    inputs = activation_inputs(model, data.x_train[: config.fit_points])
    rows = []
    for a in config.activations:
        act, deg = parse_activation(a)
        if act != "poly":
            continue
        for layer, v in enumerate(inputs, start=1):
            v = v.reshape(-1).double().cpu()
            if config.poly_fit == "empirical":
                c = fit_relu_polynomial(v, deg)
            else:
                c = PolyActivation(deg, config.poly_interval).coeffs.double().numpy()
            x = v.numpy()
            err = np.polynomial.polynomial.polyval(x, c) - np.maximum(x, 0)
            lo, hi = np.quantile(x, [0.01, 0.99])
            grid = np.linspace(lo, hi, 401)
            rows.append({"batchnorm": batchnorm, "activation": a, "layer": layer, "coeffs": [float(t) for t in c],
                         "input_mean": float(x.mean()), "input_std": float(x.std()),
                         "input_skew": float(((x - x.mean()) ** 3).mean() / max(x.std(), 1e-300) ** 3),
                         "rms_error": float(np.sqrt(np.mean(err ** 2))), "error_at_0": float(c[0]),
                         "max_error_central_98": float(np.abs(np.polynomial.polynomial.polyval(grid, c)
                                                              - np.maximum(grid, 0)).max()),
                         "q01": float(lo), "q99": float(hi)})
    return rows


def run(config: Config, out_dir: Path) -> dict:
    _check(config)
    training.set_threads(config.threads)
    out = Path(out_dir)
    prog = outdir.Progress(out)
    data = training.load_data(config)
    results = {}
    if "fits" not in prog:
        rows = [r for bn in config.batchnorm for r in fit_rows(config, data, bn)]
        outdir.write_table(out / "metrics" / "fits", rows)
        prog.mark("fits")
    fits = outdir.read_table(out / "metrics" / "fits")
    for bn in config.batchnorm:
        for a in config.activations:
            act, deg = parse_activation(a)
            name = run_name(a, bn)
            coeffs = None
            if act == "poly":
                mine = [r for r in fits if r["batchnorm"] == bn and r["activation"] == a]
                coeffs = [r["coeffs"] for r in sorted(mine, key=lambda r: r["layer"])]
            make = training.model_fn(config, data, activation=act, poly_degree=deg, batchnorm=bn,
                                     poly_coeffs=coeffs, init=_init(config, bn))
            if name not in prog:
                outdir.log(f"{name}: {config.epochs} epochs of {config.optimizer.upper()}")
                # the same initial weights for every activation of a variant
                _, flat0, _ = training.init_flat(make, config.seed)
                lr = config.lr if bn or config.nobn_lr is None else config.nobn_lr
                tconfig = training.train_config(config, snapshot_epochs=[0, config.epochs], lr=lr)
                hist = training.run_train(make, flat0, data, tconfig, outdir.store_dir(out, name), resume=True,
                                          meta={"run": name, "trajectory": name, "activation": a, "batchnorm": bn})
                outdir.write_table(out / "metrics" / name, hist)
                prog.mark(name)
            last = outdir.read_table(out / "metrics" / name)[-1]
            results[f"{name}_final_train_error"] = last["train_error"]
            results[f"{name}_final_test_error"] = last["test_error"]
    for r in fits:
        if r["layer"] == 1:
            results[f"{run_name(r['activation'], r['batchnorm'])}_layer1_fit_coeffs"] = r["coeffs"]
            results[f"{run_name(r['activation'], r['batchnorm'])}_layer1_fit_rms_error"] = r["rms_error"]
    outdir.write_results(out, results)
    plot(out)
    return results


def plot(out_dir: Path) -> list[Path]:
    out = Path(out_dir)
    config = outdir.load_config(out, Config)
    paths = []
    for bn in config.batchnorm:
        runs = {run_name(a, bn): outdir.read_table(out / "metrics" / run_name(a, bn)) for a in config.activations
                if (out / "metrics" / f"{run_name(a, bn)}.json").exists()}
        what = "with BatchNorm" if bn else "without BatchNorm (a polynomial in the weights)"
        paths.append(figures.metric_curves(out / "figures" / f"curves{'' if bn else '_nobn'}.png", runs,
                                           title=f"Same network {what}, ReLU vs polynomial activations"))
    fits = outdir.read_table(out / "metrics" / "fits")
    if fits:
        paths.append(_fits_figure(out / "figures" / "fits.png", fits))
    return paths


def _fits_figure(path: Path, fits: list[dict]) -> Path:
    """ReLU and each fitted polynomial over the central 98% of the values each layer receives."""
    variants = sorted({(r["batchnorm"], r["layer"]) for r in fits}, key=lambda t: (not t[0], t[1]))
    n = len(variants)
    nc = min(4, n)
    fig, axes = figures.new_figure((n + nc - 1) // nc, nc, figsize=(3.3 * nc, 2.9 * ((n + nc - 1) // nc)))
    for ax, (bn, layer) in zip(axes.flat, variants):
        rows = [r for r in fits if r["batchnorm"] == bn and r["layer"] == layer]
        lo, hi = rows[0]["q01"], rows[0]["q99"]
        x = np.linspace(lo, hi, 301)
        ax.plot(x, np.maximum(x, 0), "k-", lw=1.5, label="ReLU")
        for r in rows:
            ax.plot(x, np.polynomial.polynomial.polyval(x, r["coeffs"]), lw=1.1,
                    label=f"{r['activation']} (rms {r['rms_error']:.3f})")
        ax.set_title(f"{'BN' if bn else 'no BN'}, layer {layer}: skew {rows[0]['input_skew']:.2f}", fontsize=8)
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
    for ax in axes.flat[n:]:
        ax.axis("off")
    fig.suptitle("Least-squares fits of ReLU over the values each activation receives (central 98%)", fontsize=9)
    fig.tight_layout()
    return figures.save_figure(fig, path)
