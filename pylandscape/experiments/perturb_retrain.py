"""Perturb a model layer by layer and retrain it with full-batch GD, 4 times (Fig. 5, 18-35, 41-45)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import figures
from ..store import SnapshotStore
from . import outdir, training, weights

NAME = "perturb-retrain"
FIGURE = "Liao & Poggio Fig. 5, 18-35, 41-45 (perturb and retrain)"
DESCRIPTION = """
Trains the network with SGD, then with full-batch gradient descent (GD) to zero training error, and
takes three models from that run: after SGD epoch 5, after SGD epoch 30 and the final zero-error model.
Each is perturbed layer by layer 4 times (Gaussian noise of sigma = perturb_scale x the layer's weight
std, or x its mean |w| with perturb_mode=magnitude) and each perturbed copy is retrained with GD.
The paper's claim: the retrained models all reach (near) zero training error with similar test error,
but at different weights: the global minima are degenerate. Shows error/loss curves of the 4 retrained
runs and MDS (1 - cosine) of layers 2, 4 and 6 for the 4 runs together and for run 1 alone. A reference
model trained the same way from another initialisation is kept for the `agreement` experiment.
"""


@dataclass
class Config:
    dataset: str = "cifar10"
    data_root: str | None = None
    train_size: int | None = None
    width: float = 1.0
    lr: float = 0.01
    batch_size: int = 100
    momentum: float = 0.0
    sgd_epochs: int = 30
    gd_lr: float = 0.01
    gd_momentum: float = 0.9
    gd_epochs: int = 200
    chunk_size: int | None = None
    source_epochs: tuple[int, ...] = (5, 30)
    perturb_mode: str = "std"
    perturb_scale: float = 0.1
    n_perturb: int = 4
    retrain_epochs: int = 100
    snapshot_every: int = 5
    mds_layers: tuple[str, ...] = ("2", "4", "6")
    reference: bool = True
    seed: int = 0
    device: str = "auto"
    threads: int = 0


PRESETS = {
    "paper": Config(),
    "quick": Config(dataset="digits", device="cpu", train_size=500, width=0.25, lr=0.05, momentum=0.9, batch_size=50,
                    sgd_epochs=8, gd_lr=0.05, gd_epochs=20, source_epochs=(2, 8), retrain_epochs=24,
                    snapshot_every=2, threads=1),
}


def sources(config: Config) -> list[str]:
    return [f"sgd{e}" for e in config.source_epochs] + ["final"]


def perturbation_seed(config: Config, source_index: int, k: int) -> int:
    """Seed of perturbation k of source `source_index` (fixed, so a resumed run perturbs identically)."""
    return config.seed * 1000 + 100 * source_index + k


def _every(n: int, k: int) -> list[int]:
    return sorted(set(range(0, n + 1, max(1, k))) | {n})


def _check(config: Config) -> None:
    bad = [e for e in config.source_epochs if not 0 <= e <= config.sgd_epochs]
    if bad:
        raise ValueError(f"source_epochs {bad} must lie in [0, sgd_epochs={config.sgd_epochs}]")
    if config.n_perturb < 2:
        raise ValueError(f"n_perturb must be >= 2, got {config.n_perturb}")


def train_base(config: Config, out: Path, prog: outdir.Progress, make, data, flat0, tag: str, seed: int) -> None:
    """SGD for sgd_epochs, then GD for gd_epochs from the SGD result (stores <tag>_sgd, <tag>_gd)."""
    if f"{tag}_sgd" not in prog:
        outdir.log(f"{tag}: {config.sgd_epochs} SGD epochs")
        snaps = sorted(set(config.source_epochs) | {0, config.sgd_epochs})
        hist = training.run_train(make, flat0, data, training.train_config(
            config, optimizer="sgd", epochs=config.sgd_epochs, snapshot_epochs=snaps, seed=seed,
            eval_every=config.snapshot_every),
            outdir.store_dir(out, f"{tag}_sgd"), meta={"run": f"{tag}_sgd", "trajectory": f"{tag} SGD"}, resume=True)
        outdir.write_table(out / "metrics" / f"{tag}_sgd", hist)
        prog.mark(f"{tag}_sgd")
    if f"{tag}_gd" not in prog:
        outdir.log(f"{tag}: {config.gd_epochs} full-batch GD epochs")
        sgd = SnapshotStore(outdir.store_dir(out, f"{tag}_sgd"))
        start = sgd.load_flat(outdir.last_index(sgd))
        hist = training.run_train(make, start, data, training.train_config(
            config, optimizer="gd", lr=config.gd_lr, momentum=config.gd_momentum, epochs=config.gd_epochs,
            snapshot_epochs=_every(config.gd_epochs, config.snapshot_every), seed=seed,
            eval_every=config.snapshot_every),
            outdir.store_dir(out, f"{tag}_gd"), meta={"run": f"{tag}_gd", "trajectory": f"{tag} GD"}, resume=True)
        for r in hist:
            r["epoch"] += config.sgd_epochs
        outdir.write_table(out / "metrics" / f"{tag}_gd", hist)
        prog.mark(f"{tag}_gd")


def source_model(out: Path, config: Config, src: str, tag: str = "base") -> torch.Tensor:
    if src == "final":
        st = SnapshotStore(outdir.store_dir(out, f"{tag}_gd"))
        return st.load_flat(outdir.last_index(st))
    st = SnapshotStore(outdir.store_dir(out, f"{tag}_sgd"))
    e = int(src[3:])
    idx = [i for i, m in enumerate(st.entries) if int(m["epoch"]) == e]
    if not idx:
        raise ValueError(f"{st.root}: no snapshot at SGD epoch {e}")
    return st.load_flat(idx[-1])


def run(config: Config, out_dir: Path) -> dict:
    _check(config)
    training.set_threads(config.threads)
    out = Path(out_dir)
    prog = outdir.Progress(out)
    data = training.load_data(config)
    make = training.model_fn(config, data)
    _, flat0, spec = training.init_flat(make, config.seed)
    train_base(config, out, prog, make, data, flat0, "base", config.seed)
    if config.reference:
        _, ref0, _ = training.init_flat(make, config.seed + 100)
        train_base(config, out, prog, make, data, ref0, "reference", config.seed + 100)

    for si, src in enumerate(sources(config)):
        unit = f"retrain_{src}"
        if unit in prog:
            continue
        outdir.log(f"{src}: {config.n_perturb} perturbations (sigma = {config.perturb_scale} x layer "
              f"{config.perturb_mode}) retrained with {config.retrain_epochs} GD epochs")
        base = source_model(out, config, src)
        starts = torch.stack([weights.perturb(base, spec.offsets, config.perturb_scale, mode=config.perturb_mode,
                                        seed=perturbation_seed(config, si, k)) for k in range(config.n_perturb)])
        metas = [{"run": f"{src}/p{k + 1}", "trajectory": f"perturbation {k + 1}", "source": src,
                  "perturbation": k + 1} for k in range(config.n_perturb)]
        hists = training.run_train_many(make, starts, data, training.train_config(
            config, optimizer="gd", lr=config.gd_lr, momentum=config.gd_momentum, epochs=config.retrain_epochs,
            snapshot_epochs=_every(config.retrain_epochs, config.snapshot_every),
            eval_every=config.snapshot_every), outdir.store_dir(out, unit),
            seeds=[config.seed + 1 + k for k in range(config.n_perturb)], metas=metas, resume=True, spec=spec)
        rows = [{"source": src, "perturbation": k + 1, **r} for k, h in enumerate(hists) for r in h]
        outdir.write_table(out / "metrics" / unit, rows)
        prog.mark(unit)

    for src in sources(config):
        unit = f"mds_{src}"
        if unit in prog:
            continue
        outdir.log(f"{src}: MDS of layers {', '.join(config.mds_layers)}")
        st = SnapshotStore(outdir.store_dir(out, f"retrain_{src}"))
        items = [(dict(m), f) for m, f in st]
        for layer in config.mds_layers:
            weights.embed_and_save(items, out / "metrics" / f"mds_{src}_layer{layer}.json", spec=spec, layer=layer,
                             device=config.device, title=f"MDS of layer {layer}: 4 retrained perturbations of the {src} model")
            one = [(m, f) for m, f in items if m.get("perturbation") == 1]
            if len(one) >= 3:
                weights.embed_and_save(one, out / "metrics" / f"mds_{src}_layer{layer}_run1.json", spec=spec,
                                 layer=layer, device=config.device,
                                 title=f"MDS of layer {layer}: perturbation 1 of the {src} model alone")
        prog.mark(unit)

    results = summarize(out, config)
    outdir.write_results(out, results)
    plot(out)
    return results


def summarize(out: Path, config: Config) -> dict:
    res = {}
    gd = outdir.read_table(out / "metrics" / "base_gd")
    res["base_final_train_error"] = gd[-1]["train_error"]
    res["base_final_test_error"] = gd[-1]["test_error"]
    res["base_zero_train_error_epoch"] = next((r["epoch"] for r in gd if r["train_error"] == 0), None)
    for src in sources(config):
        rows = outdir.read_table(out / "metrics" / f"retrain_{src}")
        last = {}
        for r in rows:
            last[r["perturbation"]] = r
        tr = [r["train_error"] for r in last.values()]
        te = [r["test_error"] for r in last.values()]
        res[f"{src}_retrained_train_error"] = tr
        res[f"{src}_retrained_test_error"] = te
        res[f"{src}_retrained_test_error_spread"] = max(te) - min(te)
    return res


def plot(out_dir: Path) -> list[Path]:
    out = Path(out_dir)
    config = outdir.load_config(out, Config)
    figs = out / "figures"
    paths = []
    base = {"SGD": outdir.read_table(out / "metrics" / "base_sgd")}
    if (out / "metrics" / "base_gd.json").exists():
        base["then full-batch GD"] = outdir.read_table(out / "metrics" / "base_gd")
    paths.append(figures.metric_curves(figs / "base_training.png", base,
                                 title="Training the model that is perturbed (SGD, then full-batch GD)"))
    for src in sources(config):
        p = out / "metrics" / f"retrain_{src}.json"
        if not p.exists():
            continue
        rows = outdir.read_table(p.with_suffix(""))
        runs = {}
        for r in rows:
            runs.setdefault(f"perturbation {r['perturbation']}", []).append(r)
        paths.append(figures.metric_curves(
            figs / f"retrain_{src}.png", runs,
            title=f"GD retraining of {config.n_perturb} perturbed copies (sigma = {config.perturb_scale} x layer "
                  f"{config.perturb_mode}) of the {src} model", xlabel="GD epoch after perturbation"))
        for layer in config.mds_layers:
            for suffix, what in (("", "all runs"), ("_run1", "run 1")):
                q = out / "metrics" / f"mds_{src}_layer{layer}{suffix}.json"
                if q.exists():
                    emb = json.loads(q.read_text())
                    paths.append(figures.embedding_figure(figs / f"mds_{src}_layer{layer}{suffix}.png", emb,
                                                    group="trajectory", annotate="train_error"))
    return paths
