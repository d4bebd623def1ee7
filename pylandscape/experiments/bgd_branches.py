"""Full-batch GD with perturbed branches and their averages with the main trajectory (Fig. 4, 14-17)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import figures
from ..store import SnapshotStore
from . import outdir, training, weights

NAME = "bgd-branches"
FIGURE = "Liao & Poggio Fig. 4, 14-17 (GD branches, averaging, MDS)"
DESCRIPTION = """
Trains one full-batch gradient-descent (GD) trajectory, then branches off it at a few epochs by
perturbing every layer with Gaussian noise (sigma = branch_scale x that layer's weight std) and trains
each branch with GD to the end. Each branch is averaged with the main trajectory epoch by epoch
(alpha = 0.5) and the averages are evaluated on the whole training and test sets. The paper's claim:
branches that leave early end in different minima, and their average with the main trajectory has a
higher error (a barrier between them); late branches stay in the same basin and averaging costs nothing.
An MDS embedding (1 - cosine distance of the weights of `mds_layer`) shows all trajectories with their
training errors as point labels.
"""


@dataclass
class Config:
    dataset: str = "cifar10"
    data_root: str | None = None
    train_size: int | None = None
    width: float = 1.0
    optimizer: str = "gd"
    lr: float = 0.01
    momentum: float = 0.9
    epochs: int = 300
    chunk_size: int | None = None
    branch_epochs: tuple[int, ...] = (0, 10, 50, 200)
    branch_scale: tuple[float, ...] = (0.5,)
    perturb_mode: str = "std"
    snapshot_every: int = 5
    mds_layer: str | None = None
    seed: int = 0
    device: str = "auto"
    threads: int = 0


PRESETS = {
    "paper": Config(),
    "quick": Config(dataset="digits", device="cpu", train_size=600, width=0.25, lr=0.05, momentum=0.9, epochs=80,
                    chunk_size=None, branch_epochs=(0, 10, 40), branch_scale=(1.0,), snapshot_every=2,
                    threads=1),
}


def _scales(config: Config) -> list[float]:
    s = list(config.branch_scale)
    if len(s) == 1:
        s = s * len(config.branch_epochs)
    if len(s) != len(config.branch_epochs):
        raise ValueError(f"branch_scale has {len(s)} values for {len(config.branch_epochs)} branch_epochs "
                         f"(give one value or one per branch)")
    return s


def branch_seed(config: Config, b: int) -> int:
    """Seed of branch b's perturbation noise (fixed, so a resumed run perturbs identically)."""
    return config.seed * 1000 + 17 + b


def snapshot_epochs(config: Config) -> list[int]:
    ep = set(range(0, config.epochs + 1, max(1, config.snapshot_every)))
    ep |= {e for e in config.branch_epochs if e <= config.epochs} | {config.epochs}
    return sorted(ep)


def _check(config: Config) -> None:
    bad = [e for e in config.branch_epochs if not 0 <= e < config.epochs]
    if bad:
        raise ValueError(f"branch_epochs {bad} must lie in [0, epochs={config.epochs})")
    _scales(config)


def _by_epoch(store) -> dict[int, int]:
    return {int(e["epoch"]): i for i, e in enumerate(store.entries)}


def run(config: Config, out_dir: Path) -> dict:
    _check(config)
    training.set_threads(config.threads)
    out = Path(out_dir)
    prog = outdir.Progress(out)
    data = training.load_data(config)
    make = training.model_fn(config, data)
    _, flat0, spec = training.init_flat(make, config.seed)
    offsets = spec.offsets
    snaps = snapshot_epochs(config)

    # 1. the main GD trajectory
    main_dir = outdir.store_dir(out, "main")
    if "main" not in prog:
        outdir.log("training the main GD trajectory")
        hist = training.run_train(make, flat0, data, training.train_config(config, epochs=config.epochs,
                           snapshot_epochs=snaps, eval_every=config.snapshot_every), main_dir, meta={"run": "main", "trajectory": "main"},
                           resume=True)
        outdir.write_table(out / "metrics" / "main", hist)
        prog.mark("main")
    main = SnapshotStore(main_dir)
    main_at = _by_epoch(main)

    # 2. branches: perturb the main model at epoch e, train with GD for the remaining epochs
    for b, (e, scale) in enumerate(zip(config.branch_epochs, _scales(config))):
        unit = f"branch{b}"
        if unit in prog:
            continue
        outdir.log(f"branch {b}: perturbing the epoch-{e} model (sigma = {scale} x layer {config.perturb_mode}) "
              f"and training {config.epochs - e} GD epochs")
        start = weights.perturb(main.load_flat(main_at[e]), offsets, scale, mode=config.perturb_mode,
                          seed=branch_seed(config, b))
        rest = [s - e for s in snaps if s >= e]
        hist = training.run_train(make, start, data, training.train_config(config, epochs=config.epochs - e,
                           snapshot_epochs=rest, seed=config.seed + 1 + b,
                           eval_every=config.snapshot_every), outdir.store_dir(out, unit),
                           meta={"run": unit, "trajectory": unit, "branch": b, "start_epoch": e,
                                 "scale": scale}, resume=True)
        for r in hist:
            r["branch"], r["local_epoch"], r["epoch"] = b, r["epoch"], r["epoch"] + e
        outdir.write_table(out / "metrics" / unit, hist)
        prog.mark(unit)

    # 3. averages 0.5 main + 0.5 branch at every common snapshot epoch, all evaluated in one batch
    if "averages" not in prog:
        outdir.log("averaging each branch with the main trajectory and evaluating the averages")
        rows, avgs, ends = [], [], []
        for b, e in enumerate(config.branch_epochs):
            br = SnapshotStore(outdir.store_dir(out, f"branch{b}"))
            for i, ent in enumerate(br.entries):
                t = int(ent["epoch"]) + e
                if t not in main_at:
                    continue
                m, x = main.load_flat(main_at[t]), br.load_flat(i)
                avgs.append(weights.combine(torch.stack([m, x]), [0.5, 0.5]))
                # the endpoints' numbers were recorded by the trainer with the same protocol
                # (BatchNorm re-estimated on the training set), so they are not evaluated again
                ends.append((main.entries[main_at[t]], ent))
                rows.append({"branch": b, "start_epoch": e, "epoch": t})
        avg_store = outdir.fresh_store(outdir.store_dir(out, "averages"), spec, {"what": "0.5 main + 0.5 branch"})
        res = training.evaluate_flats(make, torch.stack(avgs), data)
        for k, (r, a) in enumerate(zip(rows, avgs)):
            for m in ("train_error", "train_loss", "test_error", "test_loss"):
                r[m] = res[m][k]
                r[f"main_{m}"] = ends[k][0].get(m)
                r[f"branch_{m}"] = ends[k][1].get(m)
            avg_store.append(a, run=f"average{r['branch']}", trajectory=f"average{r['branch']}",
                             branch=r["branch"], epoch=r["epoch"], train_error=r["train_error"],
                             test_error=r["test_error"])
        outdir.write_table(out / "metrics" / "averages", rows)
        prog.mark("averages")

    # 4. MDS of main + branches + averages
    if "mds" not in prog:
        outdir.log("MDS of the main trajectory, the branches and the averages")
        items = []
        for name in ["main"] + [f"branch{b}" for b in range(len(config.branch_epochs))] + ["averages"]:
            st = SnapshotStore(outdir.store_dir(out, name))
            for i, ent in enumerate(st.entries):
                m = dict(ent)
                if name.startswith("branch"):
                    m["epoch"] = int(ent["epoch"]) + int(ent["start_epoch"])
                    m["trajectory"] = f"branch from epoch {ent['start_epoch']}"
                elif name == "averages":
                    m["trajectory"] = f"average: main + branch from {config.branch_epochs[ent['branch']]}"
                items.append((m, st.load_flat(i)))
        weights.embed_and_save(items, out / "metrics" / "mds_all.json", spec=spec, layer=config.mds_layer,
                         device=config.device,
                         title="MDS of GD main trajectory, perturbed branches and their averages")
        prog.mark("mds")

    results = summarize(out, config)
    outdir.write_results(out, results)
    plot(out)
    return results


def summarize(out: Path, config: Config) -> dict:
    main = outdir.read_table(out / "metrics" / "main")
    avg = outdir.read_table(out / "metrics" / "averages")
    zero = next((r["epoch"] for r in main if r.get("train_error") is not None and r["train_error"] == 0), None)
    res = {"main_final_train_error": main[-1]["train_error"], "main_final_test_error": main[-1]["test_error"],
           "main_zero_train_error_epoch": zero}
    emb = (out / "metrics" / "mds_all.json")
    if emb.exists():
        res["mds_captured"] = json.loads(emb.read_text()).get("captured")
    for b, e in enumerate(config.branch_epochs):
        rows = [r for r in avg if r["branch"] == b]
        if not rows:
            continue
        last = rows[-1]
        res[f"branch{b}_start_epoch"] = e
        res[f"branch{b}_final_train_error"] = last["branch_train_error"]
        res[f"branch{b}_final_test_error"] = last["branch_test_error"]
        res[f"average{b}_final_train_error"] = last["train_error"]
        res[f"average{b}_final_test_error"] = last["test_error"]
        res[f"average{b}_final_train_loss"] = last["train_loss"]
        res[f"main_final_train_loss_vs_avg{b}"] = last["main_train_loss"]
    return res


def plot(out_dir: Path) -> list[Path]:
    out = Path(out_dir)
    config = outdir.load_config(out, Config)
    figs = out / "figures"
    paths = []
    runs = {"main (GD)": outdir.read_table(out / "metrics" / "main")}
    for b, e in enumerate(config.branch_epochs):
        p = out / "metrics" / f"branch{b}.json"
        if p.exists():
            runs[f"branch from epoch {e}"] = outdir.read_table(p.with_suffix(""))
    paths.append(figures.metric_curves(figs / "curves.png", runs,
                                 title="Full-batch GD: main trajectory and perturbed branches"))
    avg = outdir.read_table(out / "metrics" / "averages")
    for b, e in enumerate(config.branch_epochs):
        rows = [r for r in avg if r["branch"] == b]
        if not rows:
            continue
        series = {
            "average (0.5 main + 0.5 branch)": [{"epoch": r["epoch"], **{m: r[m] for m in r if m.endswith(("error", "loss")) and not m.startswith(("main_", "branch_"))}} for r in rows],
            "main": [{"epoch": r["epoch"], **{m[5:]: r[m] for m in r if m.startswith("main_")}} for r in rows],
            "branch": [{"epoch": r["epoch"], **{m[7:]: r[m] for m in r if m.startswith("branch_") and m != "branch"}} for r in rows],
        }
        paths.append(figures.metric_curves(figs / f"average_branch{b}.png", series,
                                     title=f"Averaging the main trajectory with the branch from epoch {e}"))
    emb_path = out / "metrics" / "mds_all.json"
    if emb_path.exists():
        emb = json.loads(emb_path.read_text())
        layer = config.mds_layer or "all layers"
        paths.append(figures.embedding_figure(figs / "mds_all.png", emb, group="trajectory",
                                        title=f"MDS ({layer}): GD main trajectory, branches, averages"))
        for b, e in enumerate(config.branch_epochs):
            sub = [i for i, m in enumerate(emb["meta"]) if m.get("run") in
                   ("main", f"branch{b}", f"average{b}") and (m.get("run") != "main" or
                                                              (m.get("epoch") or 0) >= e)]
            paths.append(figures.embedding_figure(figs / f"mds_branch{b}.png", emb, group="trajectory", subset=sub,
                                            title=f"MDS ({layer}): branch from epoch {e}, main, average"))
    return paths
