"""Proposition 1's two halves side by side: under-parametrised nets (n < d) have non-degenerate
non-zero-loss minima (Hessian rank n, smallest eigenvalue > 0); over-parametrised ones (n > d) have
zero-loss minima with n - d flat directions."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import torch

from .. import figures, linalg, models, theory
from ..flat import flatten_module, load_flat_
from . import outdir, training
from .config import Protocol

NAME = "nondegenerate-minima"
FIGURE = "Liao & Poggio Prop. 1: n < d gives non-degenerate minima, n > d an (n - d)-dim zero-loss set"
DESCRIPTION = """
The paper's claim (Proposition 1, with Cooper's theorem): for n parameters and d equations
f(x_i; theta) = y_i, an under-parametrised net (n < d) cannot fit the data; its minima have non-zero
loss and are generically non-degenerate: the loss Hessian has full rank n and a positive smallest
eigenvalue. An over-parametrised net (n > d) reaches zero loss on a set of global minima of dimension
n - d: the Hessian there has rank d and n - d zero eigenvalues. Measured here on two-layer nets
(models.fc2, squared loss, float64) fitted to d Gaussian points with Gaussian targets: under-
parametrised widths are minimised by L-BFGS then regularised Newton steps until the gradient norm is
below grad_tol (each of `restarts` initialisations gives one minimum); over-parametrised widths are
fitted to zero loss (theory.fit_to_zero_loss). At every point found: loss, gradient norm, the exact
Hessian's eigenvalues, its numerical rank (|lambda| > n eps max|lambda|), the smallest eigenvalue, and
the rank of the output Jacobian. Continuous symmetries make every point degenerate, minimum or not:
ReLU nets have one exact flat direction per hidden unit, (w_j, b_j, v_j) -> (c w_j, c b_j, v_j / c),
and so does a degree-2 polynomial activation with an output bias (the ReLU fit of models.fc2 has no
cubic term, so poly_degree=3 acts as 2): their Hessian rank is at most n - width (column
rank_bound_from_symmetry), and "non-degenerate" can only mean rank = that bound. tanh (no continuous
symmetry) is the clean case of the proposition. A point counts as the proposition's generic case
("clean") when it is critical (||g|| <= 1e-8) and the output Jacobian has rank n - symmetry (no dead,
saturated or step-like unit). The paper's network is not probed: an exact Hessian per Newton step is
out of reach at its size (a 1,000-parameter dcnn on 200 images ran > 9 minutes without finishing on
2 cores); minimum-dimension covers the dcnn at zero loss with Lanczos.
"""


@dataclass
class Config:
    in_dim: int = 8
    num_points: int = 40
    under_widths: tuple[int, ...] = (1, 2, 3)
    over_widths: tuple[int, ...] = (8, 16)
    activations: tuple[str, ...] = ("tanh", "poly", "relu")
    over_activations: tuple[str, ...] = ("tanh", "relu")
    poly_degree: int = 3
    restarts: int = 3
    lbfgs_steps: int = 2000
    newton_steps: int = 100
    grad_tol: float = 1e-10
    seed: int = 0
    device: str = "cpu"
    threads: int = 0


PRESETS = {
    "paper": Config(),
    "quick": Config(in_dim=6, num_points=30, under_widths=(1, 2, 3), over_widths=(8,), restarts=2,
                    lbfgs_steps=1000, threads=1),
}
_NOTE = ("the paper states Proposition 1 without an experiment; these are small nets where every "
         "eigenvalue of the Hessian is computed exactly (n <= a few hundred).")
PROTOCOLS = {
    "paper": Protocol(
        "(issue 12) Proposition 1's other half: in an under-parametrised case (n < d) the non-zero-loss minima "
        "found are non-degenerate (Hessian rank = n, minimum eigenvalue > 0), next to the over-parametrised "
        "(n - d)-dimensional case.",
        (_NOTE, "no CIFAR-10 here: Proposition 1 is about the parameter count, not the data; the paper preset "
         "is the larger fc2 setting (8-dim inputs, 40 points, widths 1-3 and 8, 16, 3 restarts).",
         "poly_degree=3: with a degree-2 activation f is a quadratic polynomial in x, a function space of "
         "dimension 1 + in_dim + in_dim(in_dim+1)/2 that would cap the Jacobian rank of wider nets.")),
    "quick": Protocol("as paper, smaller: 6-dim inputs, 30 points, widths 1-3 (n = 9, 17, 25 < 30) and 8 "
                      "(n = 65 > 30), two restarts.", (_NOTE,)),
}


def _theta(model) -> torch.Tensor:
    return flatten_module(model, trainable_only=True)[0]


def _loss_of(model, x, y):
    """theta [P] -> squared loss (1/N) sum ||f(x_i) - y_i||^2 (linalg.squared_loss)."""
    f = linalg.output_fn(model, x)
    n = x.shape[0]
    target = y.reshape(-1)
    return lambda theta: ((f(theta) - target) ** 2).sum() / n


def _grad_hess(model, x, y, theta):
    loss = _loss_of(model, x, y)
    g = torch.func.grad(loss)(theta).detach()
    h = linalg.loss_hessian(model, x, y, theta=theta).to(torch.float64)
    return float(loss(theta)), g, (h + h.T) / 2


def newton_to_critical(model, x, y, *, steps: int, grad_tol: float) -> dict:
    """Saddle-free Newton steps delta = V (|Lambda| + mu)^-1 V^T g (Dauphin et al. 2014) with a loss that
    must not rise (mu grows until it does not), and a step along the most negative curvature direction
    when the gradient is already tiny at a saddle; stops when ||g|| < grad_tol and no eigenvalue is
    clearly negative. Loads the result into the model; returns loss, gradient norm, steps."""
    theta = _theta(model).detach().clone()
    loss, g, h = _grad_hess(model, x, y, theta)
    mu, done = 1e-8, 0
    for _ in range(steps):
        ev, vec = torch.linalg.eigh(h)
        scale = float(ev.abs().max()) or 1.0
        tol = theta.numel() * torch.finfo(torch.float64).eps * scale
        gnorm = float(g.norm())
        if gnorm < grad_tol and float(ev.min()) >= -1e3 * tol:
            break
        cands = []
        if float(ev.min()) < -1e3 * tol and gnorm < 1e-6:  # at a saddle: leave along negative curvature
            cands = [theta + sgn * a * vec[:, 0] for a in (1.0, 0.3, 0.1, 0.03, 0.01) for sgn in (1, -1)]
        accepted = False
        for cand in cands:
            c = _grad_hess(model, x, y, cand)
            if c[0] < loss:
                (loss, g, h), theta, accepted = c, cand, True
                break
        for _try in range(0 if accepted else 25):
            cand = theta - vec @ ((vec.T @ g) / (ev.abs() + mu * scale))
            c = _grad_hess(model, x, y, cand)
            if c[0] < loss or (c[0] <= loss * (1 + 1e-14) and float(c[1].norm()) < gnorm):
                (loss, g, h), theta, accepted = c, cand, True
                mu = max(mu / 10, 1e-16)
                break
            mu *= 10
        done += 1
        if not accepted:
            break
    load_flat_(model, theta, trainable_only=True)
    return {"loss": loss, "grad_norm": float(g.norm()), "newton_steps": done}


def effective_degree(act: torch.nn.Module) -> int | None:
    """Highest power with a non-negligible coefficient of a PolyActivation (None for other activations).

    The ReLU fit on a symmetric interval has no odd terms above z / 2, so degree 3 may act as degree 2."""
    c = getattr(act, "coeffs", None)
    if c is None:
        return None
    c = c.double().abs()
    return int(max(i for i in range(c.numel()) if c[i] > 1e-9 * float(c.max())))


def make_fc2(config: Config, width: int, act: str) -> torch.nn.Module:
    """models.fc2 in float64; "tanh" replaces the activation module (a smooth activation with no
    continuous symmetry: the control case)."""
    model = models.fc2(config.in_dim, width, 1, activation="relu" if act == "tanh" else act,
                       poly_degree=config.poly_degree)
    if act == "tanh":
        model.act = torch.nn.Tanh()
    return model.double()


def symmetry_dim(model: torch.nn.Module, act: str, width: int) -> int:
    """Dimension of the continuous symmetry of fc2 through every point: one rescaling per hidden unit for
    ReLU ((w, b, v) -> (c w, c b, v / c)) and for a degree-2 polynomial with an output bias (shift u to
    the vertex, then (w, b', v) -> (c w, c b', v / c^2), the constant absorbed by the output bias); 0
    else (tanh, a genuine cubic)."""
    if act == "relu":
        return width
    if act == "poly" and effective_degree(model.act) == 2 and model.fc2.bias is not None:
        return width
    return 0


def classify(ev: torch.Tensor, num_params: int, *, grad_norm: float = 0.0, symmetry: int = 0,
             critical_tol: float = 1e-8) -> dict:
    """Numerical rank (|lambda| > n eps max|lambda|), smallest eigenvalues and the verdict at one point.

    kind: "not a critical point" (||g|| > critical_tol), "saddle" (an eigenvalue < -tol), "non-degenerate
    minimum" (rank n), "non-degenerate modulo symmetry" (rank n - symmetry, symmetry > 0: the only flat
    directions are the network's continuous symmetries), else "degenerate minimum"."""
    ev = ev.to(torch.float64)
    tol = num_params * torch.finfo(torch.float64).eps * float(ev.abs().max())
    rank = int((ev.abs() > tol).sum())
    lmin = float(ev.min())
    if grad_norm > critical_tol:
        kind = "not a critical point"
    elif lmin < -tol:
        kind = "saddle"
    elif rank == num_params:
        kind = "non-degenerate minimum"
    elif symmetry and rank == num_params - symmetry:
        kind = "non-degenerate modulo symmetry"
    else:
        kind = "degenerate minimum"
    srt = ev.sort().values
    return {"hessian_rank": rank, "hessian_zero": num_params - rank, "hessian_negative": int((ev < -tol).sum()),
            "lambda_min": lmin, "lambda_min_beyond_symmetry": float(srt[min(symmetry, srt.numel() - 1)]),
            "lambda_max": float(ev.max()), "eig_tol": tol, "kind": kind,
            "smallest_abs_eigs": sorted(float(v) for v in ev.abs())[:6]}


@torch.no_grad()
def inactive_units(model: torch.nn.Module, x: torch.Tensor, act: str) -> int:
    """Hidden units of fc2 that do nothing locally: ReLU units dead on every point, tanh units saturated
    (|pre-activation| > 9, tanh' < 1e-7) on every point. Each adds in_dim + 1 or more flat directions:
    such a point is a minimum "at infinity" or on a plateau, not the generic case of the proposition."""
    if not hasattr(model, "fc1"):
        return 0
    z = model.fc1(x)
    if act == "relu":
        return int((z <= 0).all(0).sum())
    if act == "tanh":
        return int((z.abs() > 9).all(0).sum())
    return 0


def _case(config: Config, regime: str, act: str, width: int, restart: int, x, y) -> dict:
    torch.manual_seed(config.seed * 100_003 + 1009 * width + 17 * restart + (0 if act == "relu" else 7))
    model = make_fc2(config, width, act)
    return _fit_and_measure(config, regime, f"fc2 {act} w{width}", act, symmetry_dim(model, act, width), model,
                            x, y, restart, width=width)


def _fit_and_measure(config, regime, case, act, sym, model, x, y, restart, *, width=0, chunk=None) -> dict:
    if regime == "under":
        theory.fit_to_zero_loss(model, x, y, lbfgs_steps=config.lbfgs_steps, newton_steps=0)
        fit = newton_to_critical(model, x, y, steps=config.newton_steps, grad_tol=config.grad_tol)
    else:
        fit = theory.fit_to_zero_loss(model, x, y, lbfgs_steps=config.lbfgs_steps, newton_steps=config.newton_steps,
                                      chunk_size=chunk)
        fit["grad_norm"] = float(torch.func.grad(_loss_of(model, x, y))(_theta(model)).norm())
    spec = linalg.hessian_spectrum(model, x, y, method="exact", exact_max_params=10**9)
    md = theory.minimum_dimension(model, x, chunk_size=chunk)
    n, d = md["num_params"], md["num_equations"]
    row = {"regime": regime, "case": case, "activation": act, "width": width, "restart": restart,
           "num_params": n, "num_equations": d, "final_loss": fit["loss"], "grad_norm": fit["grad_norm"],
           "jacobian_rank": md["jacobian_rank"], "inactive_units": inactive_units(model, x, act),
           **classify(spec.eigenvalues, n, grad_norm=fit["grad_norm"], symmetry=sym),
           "predicted_hessian_rank": min(n, d), "predicted_zero_dim": max(n - d, 0),
           "symmetry_dim": sym, "rank_bound_from_symmetry": n - sym}
    row["eigenvalues"] = spec.eigenvalues.tolist()
    return row


def run(config: Config, out_dir: Path) -> dict:
    training.set_threads(config.threads)
    out = Path(out_dir)
    prog = outdir.Progress(out)
    g = training.generator(config.seed)
    x = torch.randn(config.num_points, config.in_dim, generator=g, dtype=torch.float64)
    y = torch.randn(config.num_points, generator=g, dtype=torch.float64)
    units = []
    for regime, widths, acts in (("under", config.under_widths, config.activations),
                                 ("over", config.over_widths, config.over_activations)):
        for act, width, r in itertools.product(acts, widths, range(config.restarts)):
            unit = f"{regime}-{act}-{width}-{r}"
            units.append(unit)
            if unit not in prog:
                outdir.log(f"{NAME}: {regime}-parametrised fc2 {act} width {width}, restart {r}")
                prog.mark(unit, _case(config, regime, act, width, r, x, y))
    rows = [prog.get(u) for u in units]
    outdir.write_table(out / "metrics" / "nondegenerate_minima",
                       [{k: v for k, v in r.items() if k != "eigenvalues"} for r in rows])
    outdir.write_table(out / "metrics" / "spectra", [{"case": r["case"], "regime": r["regime"], "restart": r["restart"],
                                                     "eig_tol": r["eig_tol"], "eigenvalues": r["eigenvalues"]}
                                                    for r in rows])
    res = summarize(rows)
    outdir.write_results(out, res)
    plot(out)
    return res


def summarize(rows: list[dict]) -> dict:
    """Counts per regime and activation. "Clean" points are the proposition's generic case: critical
    (||g|| <= 1e-8) with an output Jacobian of maximal rank n - symmetry (no dead or saturated unit, no
    unit reduced to a step function on the data, which makes flat directions of J itself)."""
    res = {}
    for regime in ("under", "over"):
        sub = [r for r in rows if r["regime"] == regime]
        res[f"{regime}_points"] = len(sub)
        for act in sorted({r["activation"] for r in sub}):
            s = [r for r in sub if r["activation"] == act]
            kinds = [r["kind"] for r in s]
            if regime == "under":
                clean = [r for r in s if r["kind"] != "not a critical point"
                         and r["jacobian_rank"] == r["rank_bound_from_symmetry"]]
                res[f"under_{act}_points"] = len(s)
                res[f"under_{act}_kinds"] = {k: kinds.count(k) for k in sorted(set(kinds))}
                res[f"under_{act}_clean_points"] = len(clean)
                res[f"under_{act}_clean_nondegenerate"] = sum(
                    r["kind"] in ("non-degenerate minimum", "non-degenerate modulo symmetry") for r in clean)
                res[f"under_{act}_min_loss"] = min(r["final_loss"] for r in s)
            else:
                zero = [r for r in s if r["final_loss"] < 1e-20]
                res[f"over_{act}_points"] = len(s)
                res[f"over_{act}_zero_loss"] = len(zero)
                res[f"over_{act}_zero_dim_eq_n_minus_d"] = sum(r["hessian_zero"] == r["predicted_zero_dim"] for r in zero)
    res["summary"] = "; ".join(
        f"{r['regime']} {r['case']} #{r['restart']}: n={r['num_params']}, d={r['num_equations']}, "
        f"loss={r['final_loss']:.1e}, |g|={r['grad_norm']:.0e}, rank H={r['hessian_rank']} "
        f"(n - symmetry {r['rank_bound_from_symmetry']}), inactive units {r['inactive_units']}, "
        f"lambda_min={r['lambda_min']:.1e} ({r['kind']})" for r in rows)
    return res


def plot(out_dir: Path) -> list[Path]:
    out = Path(out_dir)
    table = outdir.read_table(out / "metrics" / "nondegenerate_minima")
    spectra = outdir.read_table(out / "metrics" / "spectra")
    fig, axes = figures.new_figure(1, 2, figsize=(12, 4.4))
    cmap = matplotlib.colormaps["tab10"]
    for ax, regime in zip(axes[0], ("under", "over")):
        colors: dict[str, tuple] = {}
        for r, s in ((r, s) for r, s in zip(table, spectra) if r["regime"] == regime):
            ev = sorted((max(abs(v), 1e-300) for v in s["eigenvalues"]), reverse=True)
            c = colors.setdefault(r["case"], cmap(len(colors) % 10))
            neg = r["hessian_negative"]
            ax.semilogy(range(1, len(ev) + 1), ev, ".-", ms=3, lw=0.6, color=c,
                        label=f"{r['case']} #{r['restart']}: n={r['num_params']}, rank {r['hessian_rank']}, "
                              f"λmin {r['lambda_min']:.0e}" + (f", {neg} neg" if neg else ""))
        ax.set_xlabel("eigenvalue index (sorted by |λ|)")
        ax.set_ylabel("|λ| of the loss Hessian (exact)")
        d = table[0]["num_equations"] if table else 0
        ax.set_title(("under-parametrised (n < d): non-zero-loss minima" if regime == "under" else
                      f"over-parametrised (n > d = {d}): zero-loss minima, n - d zero eigenvalues"), fontsize=9)
        ax.set_ylim(bottom=1e-20)
        ax.legend(fontsize=5)
    fig.tight_layout()
    return [figures.save_figure(fig, out / "figures" / "nondegenerate_minima.png")]
