"""How far apart do GD branches end, as a function of when they left the main trajectory? (Liao &
Poggio Fig. 4, 14-17 as numbers: "the earlier the perturbation, the more different the final model".)"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import figures
from ..models import biases_before_batchnorm, dcnn
from ..store import SnapshotStore
from . import bgd_branches, outdir, weights
from .config import Protocol, config_from_dict

NAME = "branch-divergence"
FIGURE = "Liao & Poggio Fig. 4, 14-17 as numbers: branch-end distance and average error vs branch epoch"
DESCRIPTION = """
The paper's claim (Fig. 4, 14-17): with plain full-batch GD, branches perturbed early end in different
minima (their average with the main trajectory has a higher error: a barrier), branches perturbed
late end in the same basin ("the earlier the perturbation, the more different the final model").
Measured here, for branches made at epochs e (perturbation sigma = branch_scale x the layer's weight
std, all layers): between each branch's end and the main trajectory's end, 1 - cos and the relative
L2 distance ||w_b - w_m|| / ||w_m|| of all weights (the frozen pre-BatchNorm biases left out) and
1 - cos of layer `layer`; the training/test error and loss of their average (0.5 main + 0.5 branch);
and, for scale, the same distances right after the perturbation. The runs are bgd-branches' own
(its module trains, perturbs and averages): either an existing bgd-branches output folder
(`--set source=DIR`), or a bgd-branches run made here in OUT/bgd-branches with this config's
settings and only the snapshots the measurement needs.
"""


@dataclass
class Config:
    source: str | None = None        # an existing bgd-branches output folder to measure instead of training
    dataset: str = "cifar10"
    data_root: str | None = None
    train_size: int | None = None
    width: float = 1.0
    widths: tuple[int, ...] | None = None
    lr: float = 0.1
    epochs: int = 300
    chunk_size: int | None = None
    branch_epochs: tuple[int, ...] = (0, 10, 50, 100, 150, 200, 250)
    branch_scale: float = 0.25
    perturb_mode: str = "std"
    pre_bn_biases: bool = False
    layer: str = "2"
    seed: int = 0
    device: str = "auto"
    threads: int = 0


PRESETS = {
    "paper": Config(),
    "quick": Config(dataset="digits", device="cpu", train_size=600, width=0.25, lr=0.3, epochs=60,
                    branch_epochs=(0, 5, 10, 20, 30, 40, 50), threads=1),
}
_CHOICES = (
    "branch epochs 0, 10, 50, 100, 150, 200, 250 of 300: the paper's 0, 10, 50, 200 plus more points for a "
    "curve; sigma = 0.25 S on all layers, plain GD at lr 0.1 (bgd-branches' paper preset and its choices).",
    "distance on all weights without the biases BatchNorm cancels (they never move, so they would only "
    "add a common part to both models); layer 2 (conv1 weight) separately, the paper's MDS layer.",
    "average: 0.5 main + 0.5 branch at the last epoch, BatchNorm re-estimated on the training set "
    "(bgd-branches' averages).",
)
PROTOCOLS = {
    "paper": Protocol("(issue 12) for branches made at epochs e, the final 1 - cos and relative L2 distance "
                      "between branch end and main end, and the error of their average, as functions of e.",
                      _CHOICES),
    "quick": Protocol("as paper, scaled down like bgd-branches' quick preset: digits, 600 images, width 0.25, "
                      "60 GD epochs at lr 0.3, branches at 0, 5, 10, 20, 30, 40, 50.",
                      ("lr=0.3: plain GD as the paper, a larger step so 60 epochs reach zero training error "
                       "(bgd-branches' quick preset measured it).",) + _CHOICES[1:]),
}
BGD_DIR = "bgd-branches"


def bgd_config(config: Config) -> bgd_branches.Config:
    """bgd-branches' Config with this config's settings; snapshots only at 0, the branch epochs and the end."""
    shared = ("dataset", "data_root", "train_size", "width", "widths", "lr", "epochs", "chunk_size", "branch_epochs",
              "perturb_mode", "pre_bn_biases", "seed", "device", "threads")
    fields = {f.name for f in dataclasses.fields(bgd_branches.Config)}
    missing = [f for f in shared + ("optimizer", "momentum", "branch_scale", "snapshot_every", "mds_layer")
               if f not in fields]
    if missing:
        raise ValueError(f"bgd_branches.Config has no field(s) {', '.join(missing)}: update "
                         f"branch_divergence.bgd_config to its new fields")
    return dataclasses.replace(bgd_branches.Config(), **{f: getattr(config, f) for f in shared},
                               optimizer="gd", momentum=0.0, branch_scale=(config.branch_scale,),
                               snapshot_every=max(1, config.epochs), mds_layer=config.layer)


def _bgd_run(config: Config, out: Path) -> tuple[Path, bgd_branches.Config]:
    if config.source:
        src = Path(config.source)
        name, cfg = outdir.read_config(src)
        if name != bgd_branches.NAME:
            raise ValueError(f"source={src}: holds a {name!r} run, not {bgd_branches.NAME!r}")
        return src, config_from_dict(bgd_branches.Config, cfg)
    sub, cfg = out / BGD_DIR, bgd_config(config)
    outdir.prepare_out(sub, bgd_branches.NAME, cfg, resume=True)
    bgd_branches.run(cfg, sub)
    return sub, cfg


def distances(a: torch.Tensor, b: torch.Tensor) -> dict:
    """1 - cos(a, b) and ||a - b|| / ||b|| in float64 (a, b [P])."""
    a, b = a.to(torch.float64), b.to(torch.float64)
    cos = torch.dot(a, b) / (torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b))
    return {"one_minus_cos": float(1 - cos), "rel_l2": float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))}


def _mask(spec, names) -> torch.Tensor:
    keep = torch.zeros(spec.numel, dtype=torch.bool)
    o = spec.offsets.tolist()
    for n in names:
        i = spec.names.index(n)
        keep[o[i]:o[i + 1]] = True
    return keep


def measure(src: Path, cfg: bgd_branches.Config, layer: str) -> list[dict]:
    """One row per branch: distances at the end and right after the perturbation, average's numbers."""
    main = SnapshotStore(outdir.store_dir(src, "main"))
    spec = main.spec
    frozen = [] if cfg.pre_bn_biases else biases_before_batchnorm(dcnn(width=cfg.width, widths=cfg.widths))
    frozen = [n for n in frozen if n in spec.names]
    all_w = _mask(spec, [n for n in spec.names if n not in frozen])
    layer_w = _mask(spec, weights.paper_layer(spec, layer, frozen).split(","))
    at = {int(e["epoch"]): i for i, e in enumerate(main.entries)}
    end_main = main.load_flat(at[cfg.epochs], torch.float64)
    avg = outdir.read_table(src / "metrics" / "averages")
    rows = []
    for b, e in enumerate(cfg.branch_epochs):
        br = SnapshotStore(outdir.store_dir(src, f"branch{b}"))
        bat = {int(m["epoch"]): i for i, m in enumerate(br.entries)}
        end_b = br.load_flat(bat[cfg.epochs - e], torch.float64)
        start_b, start_m = br.load_flat(bat[0], torch.float64), main.load_flat(at[e], torch.float64)
        row = {"branch": b, "branch_epoch": e}
        for tag, (x, y) in (("end", (end_b, end_main)), ("start", (start_b, start_m))):
            d = distances(x[all_w], y[all_w])
            row[f"{tag}_one_minus_cos"], row[f"{tag}_rel_l2"] = d["one_minus_cos"], d["rel_l2"]
            row[f"{tag}_layer{layer}_one_minus_cos"] = distances(x[layer_w], y[layer_w])["one_minus_cos"]
        last = [r for r in avg if r["branch"] == b and r["epoch"] == cfg.epochs]
        if not last:
            raise ValueError(f"{src}/metrics/averages: no average of branch {b} at epoch {cfg.epochs}")
        r = last[-1]
        for m in ("train_error", "test_error", "train_loss", "test_loss"):
            row[f"average_{m}"] = r[m]
            row[f"main_{m}"], row[f"branch_{m}"] = r[f"main_{m}"], r[f"branch_{m}"]
        row["average_minus_endpoints_test_error"] = r["test_error"] - 0.5 * (r["main_test_error"] + r["branch_test_error"])
        rows.append(row)
    return rows


def _spearman(x: list[float], y: list[float]) -> float | None:
    if len(x) < 3:
        return None
    rx = torch.tensor(x, dtype=torch.float64).argsort().argsort().double()
    ry = torch.tensor(y, dtype=torch.float64).argsort().argsort().double()
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = float(torch.linalg.vector_norm(rx) * torch.linalg.vector_norm(ry))
    return float(torch.dot(rx, ry)) / den if den > 0 else None


def run(config: Config, out_dir: Path) -> dict:
    out = Path(out_dir)
    src, cfg = _bgd_run(config, out)
    rows = measure(src, cfg, config.layer)
    outdir.write_table(out / "metrics" / "branch_divergence", rows)
    e = [r["branch_epoch"] for r in rows]
    res = {
        "bgd_branches_folder": str(src),
        "branch_epochs": e,
        "end_one_minus_cos": [r["end_one_minus_cos"] for r in rows],
        "end_rel_l2": [r["end_rel_l2"] for r in rows],
        "average_train_error": [r["average_train_error"] for r in rows],
        "average_test_error": [r["average_test_error"] for r in rows],
        "average_train_loss": [r["average_train_loss"] for r in rows],
        "end_over_start_one_minus_cos": [r["end_one_minus_cos"] / r["start_one_minus_cos"] for r in rows],
        "main_final_train_error": rows[0]["main_train_error"] if rows else None,
        "main_final_test_error": rows[0]["main_test_error"] if rows else None,
        # -1: the later the branch, the closer its end to the main end (the paper's claim)
        "spearman_epoch_vs_end_one_minus_cos": _spearman(e, [r["end_one_minus_cos"] for r in rows]),
        "spearman_epoch_vs_end_rel_l2": _spearman(e, [r["end_rel_l2"] for r in rows]),
        "spearman_epoch_vs_average_test_error": _spearman(e, [r["average_test_error"] for r in rows]),
        "spearman_epoch_vs_average_train_loss": _spearman(e, [r["average_train_loss"] for r in rows]),
    }
    outdir.write_results(out, res)
    plot(out)
    return res


def plot(out_dir: Path) -> list[Path]:
    out = Path(out_dir)
    rows = outdir.read_table(out / "metrics" / "branch_divergence")
    layer = outdir.load_config(out, Config).layer
    e = [r["branch_epoch"] for r in rows]
    fig, axes = figures.new_figure(1, 3, figsize=(14, 3.8))
    ax = axes[0, 0]
    ax.plot(e, [r["end_one_minus_cos"] for r in rows], "o-", label="end: all weights")
    ax.plot(e, [r[f"end_layer{layer}_one_minus_cos"] for r in rows], "s-", label=f"end: layer {layer}")
    ax.plot(e, [r["start_one_minus_cos"] for r in rows], "x:", color="gray", label="right after the perturbation")
    ax.set_yscale("log")
    ax.set_ylabel("1 - cos(branch, main)")
    ax = axes[0, 1]
    ax.plot(e, [r["end_rel_l2"] for r in rows], "o-", label="end")
    ax.plot(e, [r["start_rel_l2"] for r in rows], "x:", color="gray", label="right after the perturbation")
    ax.set_ylabel("||branch - main|| / ||main||")
    ax = axes[0, 2]
    for m, st in (("test_error", "-"), ("train_error", "--")):
        ax.plot(e, [r[f"average_{m}"] for r in rows], "o" + st, color="tab:red", label=f"average: {m}")
        ax.plot(e, [r[f"branch_{m}"] for r in rows], "x" + st, color="tab:blue", label=f"branch end: {m}")
        ax.axhline(rows[0][f"main_{m}"], color="k", ls=st, lw=0.8, label=f"main end: {m}")
    ax.set_ylabel("error")
    for a in axes[0]:
        a.set_xlabel("epoch the branch left the main GD trajectory")
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.suptitle("GD branches: distance between ends and error of the 0.5/0.5 average vs branch epoch")
    fig.tight_layout()
    return [figures.save_figure(fig, out / "figures" / "branch_divergence.png")]
