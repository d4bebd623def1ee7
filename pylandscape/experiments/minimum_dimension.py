"""Dimension of the set of global minima at a zero-loss point: n − rank J vs n − d (Cooper)."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import torch

from .. import data, figures, linalg, models, theory
from . import outdir, training

NAME = "minimum-dimension"
FIGURE = "Cooper 2018 (global minima form an (n - d)-dim manifold); Liao & Poggio: degenerate minima"
DESCRIPTION = """
Trains small networks with squared loss to numerically zero loss (float64 L-BFGS, then Gauss-Newton
steps onto the solution manifold) and measures, at the zero-loss point, the rank r of the Jacobian of
theta -> (f(x_1), ..., f(x_d)). n - r estimates the dimension of the set of global minima; Cooper's
theorem predicts n - d (d equations, times the number of outputs) for n > d. The Hessian spectrum
(exact for the two-layer nets, Lanczos with full reorthogonalisation for the convolutional net) shows
the same thing: r non-zero eigenvalues and n - r zeros, the highly degenerate minima of Liao & Poggio.
Under-parametrised nets (n < d) and nets stuck with dead ReLU units show where the count fails.
"""


@dataclass
class Config:
    # two-layer nets (models.fc2) on d Gaussian points in R^in_dim with Gaussian scalar targets
    in_dim: int = 8
    num_points: int = 40
    widths: tuple[int, ...] = (2, 4, 16, 64)
    activations: tuple[str, ...] = ("relu", "poly")
    lbfgs_steps: int = 500
    newton_steps: int = 30
    # the convolutional net (models.dcnn) on a few images with one-hot targets (10 outputs each)
    cnn_dataset: str = "cifar10"
    cnn_points: int = 50
    cnn_widths: tuple[float, ...] = (1.0,)
    cnn_lbfgs_steps: int = 1000
    lanczos_steps: int = 600
    exact_max_params: int = 3000
    jacobian_chunk: int | None = 100   # Jacobian rows back-propagated at once (bounds memory)
    rtol: float | None = None
    data_root: str | None = None
    seed: int = 0
    device: str = "cpu"
    threads: int = 0


PRESETS = {
    "paper": Config(),
    "quick": Config(num_points=30, widths=(2, 4, 16, 64), cnn_dataset="digits", cnn_points=20,
                    cnn_widths=(0.125, 0.25), cnn_lbfgs_steps=300, lanczos_steps=260, threads=1),
}


def _fc2(config: Config, width: int, activation: str):
    return models.fc2(config.in_dim, width, 1, activation=activation)


def _case_fc2(config: Config, width: int, activation: str, device) -> dict:
    g = training.generator(config.seed)
    x = torch.randn(config.num_points, config.in_dim, generator=g, dtype=torch.float64).to(device)
    y = torch.randn(config.num_points, generator=g, dtype=torch.float64).to(device)
    torch.manual_seed(config.seed + width)
    model = _fc2(config, width, activation).double().to(device)
    fit = theory.fit_to_zero_loss(model, x, y, lbfgs_steps=config.lbfgs_steps, newton_steps=config.newton_steps)
    md = theory.minimum_dimension(model, x, rtol=config.rtol)
    spec = linalg.hessian_spectrum(model, x, y, method="auto", exact_max_params=config.exact_max_params,
                              num_steps=config.lanczos_steps, generator=training.generator(config.seed))
    row = _row(f"fc2 {activation} w{width}", "fc2", activation, fit, md, spec, config)
    # ReLU is positively homogeneous: (w_j, b_j, v_j) -> (c w_j, c b_j, v_j / c) leaves f unchanged,
    # one null direction of J per hidden unit, so rank J <= n - width everywhere (Cooper's n - d needs
    # n - width >= d); the polynomial activation has no such symmetry.
    row["rank_bound_from_symmetry"] = md["num_params"] - (width if activation == "relu" else 0)
    return row


def _case_cnn(config: Config, width: float, device) -> dict:
    ds = data.load_dataset(config.cnn_dataset, config.data_root, train_size=config.cnn_points,
                        seed=config.seed, dtype=torch.float64)
    x = ds.x_train.to(device)
    y = torch.nn.functional.one_hot(ds.y_train, ds.num_classes).to(device=device, dtype=torch.float64)
    torch.manual_seed(config.seed)
    model = models.dcnn(width, in_channels=ds.in_channels, num_classes=ds.num_classes,
                        image_size=ds.image_size).double().to(device)
    _freeze_batchnorm(model, x)
    fit = theory.fit_to_zero_loss(model, x, y, lbfgs_steps=config.cnn_lbfgs_steps, newton_steps=config.newton_steps,
                             chunk_size=config.jacobian_chunk)
    md = theory.minimum_dimension(model, x, rtol=config.rtol, chunk_size=config.jacobian_chunk)
    spec = linalg.hessian_spectrum(model, x, y, method="lanczos", num_steps=config.lanczos_steps,
                              generator=training.generator(config.seed))
    row = _row(f"dcnn x{width}", "dcnn", "relu", fit, md, spec, config)
    # a dead unit in the last hidden layer caps rank J (see feature-rank): record that layer's rank
    feats = [r for r in theory.feature_ranks(model, x) if r["kind"] == "post"]
    row["last_hidden_units"], row["last_hidden_feature_rank"] = feats[-1]["units"], feats[-1]["rank"]
    # independent check of Lanczos: at zero loss H = (2/N) JᵀJ, whose non-zero eigenvalues are those
    # of the small matrix (2/N) J Jᵀ; compare the top Ritz values with them.
    j = linalg.output_jacobian(model, x, chunk_size=config.jacobian_chunk).to(torch.float64)
    gn = torch.linalg.eigvalsh(j @ j.T).flip(0) * 2 / x.shape[0]
    ritz = spec.eigenvalues.flip(0)
    k = min(10, ritz.numel(), gn.numel())
    row["lanczos_top10_max_rel_err_vs_JJt"] = float(((ritz[:k] - gn[:k]).abs() / gn[:k].abs()).max())
    row["gauss_newton_eigenvalues"] = gn.tolist()
    return row


@torch.no_grad()
def _freeze_batchnorm(model, x) -> None:
    """Set BatchNorm statistics to those of x at init, then eval mode: a fixed smooth map of θ.

    (Train-mode BatchNorm couples samples through batch statistics and mutates buffers, which
    torch.func transforms refuse; frozen statistics keep each output a function of θ and its own x.)"""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: one batch gives exactly its statistics
    model.train()
    model(x)
    model.eval()


def _row(case, model, activation, fit, md, spec, config) -> dict:
    ev = spec.eigenvalues
    absev = ev.abs()
    rtol = spec.num_params * torch.finfo(torch.float64).eps if config.rtol is None else config.rtol
    thr = float(rtol * absev.max()) if ev.numel() else 0.0
    n_nonzero = int((absev > thr).sum())
    return {
        "case": case, "model": model, "activation": activation,
        "num_params": md["num_params"], "num_equations": md["num_equations"],
        "final_loss": fit["loss"], "lbfgs_steps": fit["lbfgs_steps"], "newton_steps": fit["newton_steps"],
        "jacobian_rank": md["jacobian_rank"], "dim_estimate": md["dim_estimate"],
        "dim_predicted": max(md["dim_predicted"], 0), "jacobian_rank_tol": md["rank_tol"],
        "sigma_min_J": float(md["singular_values"][min(md["num_equations"], md["num_params"]) - 1]),
        "hessian_method": spec.method, "hessian_eigs_computed": int(ev.numel()),
        "hessian_nonzero": n_nonzero,
        "hessian_zero": (spec.num_params - n_nonzero) if spec.method == "exact" else None,
        "lanczos_breakdown": spec.breakdown, "eig_threshold": thr,
        "eigenvalues": ev.tolist(),
    }


def run(config: Config, out_dir: Path) -> dict:
    training.set_threads(config.threads)
    out = Path(out_dir)
    if not (out / outdir.CONFIG).exists():
        outdir.prepare_out(out, NAME, config, resume=True)
    prog = outdir.Progress(out)
    device = torch.device(config.device)
    for act, width in itertools.product(config.activations, config.widths):
        unit = f"fc2-{act}-{width}"
        if unit not in prog:
            outdir.log(f"{NAME}: fc2 width {width} ({act}) on {config.num_points} points")
            prog.mark(unit, _case_fc2(config, width, act, device))
    for width in (config.cnn_widths if config.cnn_points > 0 else ()):
        unit = f"dcnn-{width}"
        if unit not in prog:
            outdir.log(f"{NAME}: dcnn x{width} on {config.cnn_points} {config.cnn_dataset} images")
            prog.mark(unit, _case_cnn(config, width, device))
    units = [f"fc2-{a}-{w}" for a, w in itertools.product(config.activations, config.widths)]
    units += [f"dcnn-{w}" for w in config.cnn_widths] if config.cnn_points > 0 else []
    rows = [prog.get(u) for u in units]
    table = [{k: v for k, v in r.items() if k not in ("eigenvalues", "gauss_newton_eigenvalues")} for r in rows]
    outdir.write_table(out / "metrics" / "minimum_dimension", table)
    outdir.write_table(out / "metrics" / "spectra", [{"case": r["case"], "eigenvalues": r["eigenvalues"],
                                                  "eig_threshold": r["eig_threshold"],
                                                  "method": r["hessian_method"]} for r in rows])
    zero = [r for r in table if r["final_loss"] < 1e-20 and r["num_params"] > r["num_equations"]]
    res = {
        "cases": len(table),
        "zero_loss_cases": len(zero),
        "zero_loss_cases_with_dim_equal_n_minus_d": sum(r["dim_estimate"] == r["dim_predicted"] for r in zero),
        "zero_loss_cases_with_hessian_rank_equal_jacobian_rank":
            sum(r["hessian_nonzero"] == r["jacobian_rank"] for r in zero),
        "summary": "; ".join(f"{r['case']}: n={r['num_params']}, d={r['num_equations']}, loss={r['final_loss']:.1e}, "
                             f"rank J={r['jacobian_rank']}, n-r={r['dim_estimate']}, n-d={r['dim_predicted']}, "
                             f"H nonzero={r['hessian_nonzero']}" for r in table),
    }
    cnn = [r for r in table if r["model"] == "dcnn"]
    for r in cnn:
        res[f"{r['case']}: lanczos_top10_max_rel_err_vs_JJt"] = r["lanczos_top10_max_rel_err_vs_JJt"]
        res[f"{r['case']}: last_hidden_feature_rank/units"] = \
            f"{r['last_hidden_feature_rank']}/{r['last_hidden_units']}"
    outdir.write_results(out, res)
    plot(out)
    return res


def plot(out_dir: Path) -> list[Path]:
    out = Path(out_dir)
    table = outdir.read_table(out / "metrics" / "minimum_dimension")
    spectra = {s["case"]: s for s in outdir.read_table(out / "metrics" / "spectra")}
    fcs = [r for r in table if r["model"] == "fc2"]
    cnn = [r for r in table if r["model"] != "fc2"]
    ncol = 3 if cnn else 2
    fig, axes = figures.new_figure(1, ncol, figsize=(5.2 * ncol, 4.2))
    axes = axes[0]
    cmap = matplotlib.colormaps["tab10"]
    ax = axes[0]
    for i, r in enumerate(fcs):
        s = spectra[r["case"]]
        ev = sorted((abs(v) for v in s["eigenvalues"]), reverse=True)
        ev = [max(v, 1e-300) for v in ev]
        ax.semilogy(range(1, len(ev) + 1), ev, ".", ms=3, color=cmap(i % 10),
                    label=f"{r['case']}: d={r['num_equations']}, n={r['num_params']}")
        ax.axhline(max(s["eig_threshold"], 1e-300), color=cmap(i % 10), lw=0.6, ls=":")
        ax.axvline(r["num_equations"], color=cmap(i % 10), lw=0.6, ls="--")
    ax.set_xscale("log")
    ax.set_ylim(bottom=1e-20)
    ax.set_xlabel("eigenvalue index (sorted by |λ|)")
    ax.set_ylabel("|λ| of the loss Hessian (exact)")
    ax.set_title("fc2 at zero loss: Hessian spectrum\n(dotted: rank threshold, dashed: index d)", fontsize=9)
    ax.legend(fontsize=6)
    ax = axes[1]
    xs = list(range(len(table)))
    ax.bar([x - 0.2 for x in xs], [r["dim_estimate"] for r in table], 0.4, label="n − rank J (measured)")
    ax.bar([x + 0.2 for x in xs], [r["dim_predicted"] for r in table], 0.4, label="n − d (Cooper)")
    for x, r in zip(xs, table):
        if r["final_loss"] > 1e-20:
            ax.annotate(f"loss {r['final_loss']:.0e}", (x, 1), rotation=90, fontsize=6, ha="center", va="bottom")
    ax.set_xticks(xs, [r["case"] for r in table], rotation=60, ha="right", fontsize=7)
    ax.set_yscale("symlog", linthresh=10)
    ax.set_ylabel("dimension of the set of global minima")
    ax.set_title("dimension of the minimum set at the point found", fontsize=9)
    ax.legend(fontsize=7)
    if cnn:
        ax = axes[2]
        for i, r in enumerate(cnn):
            s = spectra[r["case"]]
            ev = sorted((abs(v) for v in s["eigenvalues"]), reverse=True)
            ev = [max(v, 1e-300) for v in ev]
            done = " (Krylov space exhausted)" if r["lanczos_breakdown"] else ""
            ax.semilogy(range(1, len(ev) + 1), ev, ".", ms=3, color=cmap(i % 10),
                        label=f"{r['case']} (n={r['num_params']}): rank J={r['jacobian_rank']}, "
                              f"{r['hessian_eigs_computed']} Ritz values{done}")
            ax.axhline(max(s["eig_threshold"], 1e-300), color=cmap(i % 10), lw=0.6, ls=":")
        ax.axvline(cnn[0]["num_equations"], color="k", lw=0.6, ls="--",
                   label=f"d·outputs = {cnn[0]['num_equations']}")
        ax.set_ylim(bottom=1e-20)
        ax.set_xlabel("Ritz value index (sorted by |λ|)")
        ax.set_ylabel("|λ| of the loss Hessian (Lanczos)")
        ax.set_title("dcnn at zero loss: Lanczos with full reorthogonalisation", fontsize=9)
        ax.legend(fontsize=6)
    fig.tight_layout()
    return [figures.save_figure(fig, out / "figures" / "minimum_dimension.png")]

