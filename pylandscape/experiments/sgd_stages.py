"""Stages of parallel SGD trajectories, each stage restarted from the previous one (Fig. 3, 8-13)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import figures
from ..store import SnapshotStore
from . import outdir, training, weights

NAME = "sgd-stages"
FIGURE = "Liao & Poggio Fig. 3, 8-13 (SGD stages, MDS of layers 2 and 5)"
DESCRIPTION = """
Runs `stages` stages of `trajectories` parallel SGD trajectories (batch 100, lr 0.01, epochs_per_stage
epochs each). Trajectories 1-4 of a stage start from the final model of trajectory 1 of the previous
stage (they differ only in the SGD mini-batch order); the others start from copies of it perturbed by
Gaussian noise of sigma = perturb_scale x each layer's weight std. Stage 1 starts from the random
initialisation. All snapshots of layer 2 (the first conv layer) and layer 5 are embedded together with
classical MDS (1 - cosine distance); a second embedding covers the late stages only. The paper's
picture: early stages travel far, later ones stay in a small region where the trajectories of a stage
spread out without raising the error: a large, flat, connected set of minima.
"""


@dataclass
class Config:
    dataset: str = "cifar10"
    data_root: str | None = None
    train_size: int | None = None
    labels: str = "true"
    inputs: str = "real"
    width: float = 1.0
    optimizer: str = "sgd"
    lr: float = 0.01
    batch_size: int = 100
    momentum: float = 0.0
    stages: int = 12
    trajectories: int = 8
    unperturbed: int = 4
    epochs_per_stage: int = 10
    perturb_scale: float = 0.01
    perturb_mode: str = "std"
    snapshot_every: int = 1
    mds_layers: tuple[str, ...] = ("2", "5")
    late_from_stage: int = 5
    seed: int = 0
    device: str = "auto"
    threads: int = 0


PRESETS = {
    "paper": Config(),
    "quick": Config(dataset="digits", device="cpu", train_size=400, width=0.25, lr=0.05, momentum=0.9, batch_size=50,
                    stages=5, trajectories=8, epochs_per_stage=3, late_from_stage=3, threads=1),
}


def _check(config: Config) -> None:
    if config.stages < 1 or config.trajectories < 1:
        raise ValueError(f"stages and trajectories must be >= 1, got {config.stages}, {config.trajectories}")
    if not 0 <= config.unperturbed <= config.trajectories:
        raise ValueError(f"unperturbed must be in 0..trajectories, got {config.unperturbed}")


def stage_store(out: Path, s: int) -> Path:
    return outdir.store_dir(out, f"stage_{s:02d}")


def stage_end(out: Path, s: int) -> torch.Tensor:
    """Final weights of trajectory 1 of stage s: the next stage's starting point."""
    st = SnapshotStore(stage_store(out, s))
    return st.load_flat(outdir.last_index(st, trajectory=1))


def run(config: Config, out_dir: Path) -> dict:
    _check(config)
    training.set_threads(config.threads)
    out = Path(out_dir)
    prog = outdir.Progress(out)
    data = training.load_data(config, labels=config.labels, inputs=config.inputs)
    make = training.model_fn(config, data)
    _, flat0, spec = training.init_flat(make, config.seed)
    E = config.epochs_per_stage
    snaps = sorted(set(range(0, E + 1, max(1, config.snapshot_every))) | {E})
    for s in range(1, config.stages + 1):
        unit = f"stage{s}"
        if unit in prog:
            continue
        start = flat0 if s == 1 else stage_end(out, s - 1)
        starts = torch.stack([start.clone() if k < config.unperturbed else
                              weights.perturb(start, spec.offsets, config.perturb_scale, mode=config.perturb_mode,
                                        seed=config.seed * 100003 + 1000 * s + k)
                              for k in range(config.trajectories)])
        outdir.log(f"stage {s}/{config.stages}: {config.trajectories} SGD trajectories x {E} epochs")
        metas = [{"run": f"stage{s}/t{k + 1}", "stage": s, "trajectory": k + 1, "perturbed": k >= config.unperturbed,
                  "epoch_offset": (s - 1) * E} for k in range(config.trajectories)]
        hists = training.run_train_many(
            make, starts, data, training.train_config(config, epochs=E, snapshot_epochs=snaps), stage_store(out, s),
            seeds=[config.seed + 7919 * s + k for k in range(config.trajectories)], metas=metas, resume=True,
            spec=spec)
        rows = [{"stage": s, "trajectory": k + 1, "global_epoch": (s - 1) * E + r["epoch"], **r}
                for k, h in enumerate(hists) for r in h]
        outdir.write_table(out / "metrics" / f"stage_{s:02d}", rows)
        prog.mark(unit, {"final_train_error_traj1": hists[0][-1]["train_error"]})

    for tag, first in (("all", 1), ("late", config.late_from_stage)):
        if first > config.stages or (tag == "late" and first <= 1):
            continue
        for layer in config.mds_layers:
            unit = f"mds_{tag}_layer{layer}"
            if unit in prog:
                continue
            outdir.log(f"MDS of layer {layer}, stages {first}-{config.stages}")
            items = []
            for s in range(first, config.stages + 1):
                st = SnapshotStore(stage_store(out, s))
                for m, f in st:
                    items.append(({**m, "global_epoch": int(m["epoch"]) + int(m.get("epoch_offset", 0))}, f))
            weights.embed_and_save(items, out / "metrics" / f"{unit}.json", spec=spec, layer=layer,
                                   device=config.device,
                                   title=f"MDS of layer {layer}, SGD stages {first}-{config.stages}")
            prog.mark(unit)

    results = summarize(out, config)
    outdir.write_results(out, results)
    plot(out)
    return results


def summarize(out: Path, config: Config) -> dict:
    res = {}
    for s in range(1, config.stages + 1):
        rows = outdir.read_table(out / "metrics" / f"stage_{s:02d}")
        last = {}
        for r in rows:
            last[r["trajectory"]] = r
        res[f"stage{s}_final_train_error_mean"] = sum(r["train_error"] for r in last.values()) / len(last)
        res[f"stage{s}_final_test_error_mean"] = sum(r["test_error"] for r in last.values()) / len(last)
    for q in sorted((out / "metrics").glob("mds_*.json")):
        res[f"{q.stem}_captured"] = json.loads(q.read_text()).get("captured")
    return res


def plot(out_dir: Path) -> list[Path]:
    out = Path(out_dir)
    config = outdir.load_config(out, Config)
    figs = out / "figures"
    paths = []
    runs = {}
    for s in range(1, config.stages + 1):
        p = out / "metrics" / f"stage_{s:02d}.json"
        if not p.exists():
            continue
        for r in outdir.read_table(p.with_suffix("")):
            runs.setdefault(f"trajectory {r['trajectory']}", []).append(r)
    what = "" if config.labels == "true" and config.inputs == "real" else \
        f" ({'random inputs, ' if config.inputs == 'random' else ''}random labels)"
    if runs:
        paths.append(figures.metric_curves(figs / "curves.png", runs, x="global_epoch", xlabel="epoch (all stages)",
                                     title=f"SGD stages{what}: error and loss of the parallel trajectories"))
    for q in sorted((out / "metrics").glob("mds_*_layer*.json")):
        emb = json.loads(q.read_text())
        paths.append(figures.stages_figure(figs / f"{q.stem}.png", emb, title=emb.get("title", "") + what))
        if q.stem.startswith("mds_all"):
            paths.append(figures.stage_panels(figs / f"{q.stem}_per_stage.png", emb,
                                        title=emb.get("title", "") + what + ": one panel per stage"))
    return paths
