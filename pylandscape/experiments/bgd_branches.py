"""Full-batch GD with perturbed branches and their averages with the main trajectory (Fig. 4, 14-17)."""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .. import figures
from ..store import SnapshotStore
from . import outdir, training, weights
from .config import Protocol

NAME = "bgd-branches"
FIGURE = "Liao & Poggio Fig. 4, 14-17 (GD branches, averaging, MDS)"
DESCRIPTION = """
Trains one full-batch gradient-descent (GD, no momentum) trajectory, then branches off it at a few
epochs by perturbing every layer with Gaussian noise (sigma = branch_scale x that layer's weight std)
and trains each branch with GD to the end. Each branch is averaged with the main trajectory epoch by
epoch (alpha = 0.5) and the averages are evaluated on the whole training and test sets. The paper's
claim: GD does not get stuck; branches that leave early end in different minima, and their average
with the main trajectory has a higher error (a barrier between them); late branches stay in the same
basin and averaging costs nothing. An MDS embedding (1 - cosine distance of the weights of
`mds_layer`) shows all trajectories with their training errors as point labels ("NaN" at the random
initialisation, as in the paper).

The biases of conv1..conv4 feed a BatchNorm that cancels them (no gradient, they never change): by
default they are neither perturbed nor part of "layer k" in the MDS; pre_bn_biases=true keeps them in.
"""


@dataclass
class Config:
    dataset: str = "cifar10"
    data_root: str | None = None
    train_size: int | None = None
    width: float = 1.0
    widths: tuple[int, ...] | None = None
    optimizer: str = "gd"
    lr: float = 0.1
    momentum: float = 0.0
    epochs: int = 300
    chunk_size: int | None = None
    branch_epochs: tuple[int, ...] = (0, 10, 50, 200)
    branch_scale: tuple[float, ...] = (0.25,)
    perturb_mode: str = "std"
    pre_bn_biases: bool = False
    snapshot_every: int = 1
    mds_layer: str | None = "2"
    seed: int = 0
    device: str = "auto"
    threads: int = 0


PAPER = Config()
PRESETS = {
    "paper": PAPER,
    "paper-sigma0.5": replace(PAPER, branch_scale=(0.5,)),
    "paper-sigma1": replace(PAPER, branch_scale=(1.0,)),
    "paper-fig16": replace(PAPER, branch_scale=(1.0,), mds_layer="3"),
    "quick": Config(dataset="digits", device="cpu", train_size=600, width=0.25, lr=0.3, epochs=60,
                    branch_epochs=(0, 10, 40), threads=1),
}

_FOLLOWS = ("(issue 12) plain full-batch gradient descent (BGD); branches at epochs 0, 10, 50, 200 with "
            "sigma = {sigma} S on all layers (S: the layer's weight std); each branch averaged with the "
            "main trajectory epoch by epoch; MDS of layer {layer}; points labelled by training error, "
            "random-initialisation points 'NaN'.")
_CHOICES = (
    "lr=0.1: the paper gives SGD's learning rate (0.01), not GD's. GD takes one step per epoch (500 times "
    "fewer than SGD with batch 100 on CIFAR-10), so 0.01 would barely move in 300 epochs; 0.1 is stable "
    "(on the digits stand-in GD diverges only at lr 1.0 at width 1) and reaches zero training error.",
    "epochs=300: the paper's text (as issue 12 reads it) fixes the branch epochs (up to 200), not the "
    "length; 300 gives the last branch 100 epochs.",
    "momentum=0: the claim is about plain BGD; no momentum anywhere unless --set asks for it.",
    "initialisation: PyTorch's default for Conv2d (Kaiming-uniform, a = sqrt(5)); the paper does not "
    "say which it used.",
    "normalisation: BatchNorm without affine parameters after conv1..conv4; the paper's net has "
    "BatchNorm but the text does not say whether it is affine.",
    "pre_bn_biases=false: the biases of conv1..conv4 get no gradient (BatchNorm cancels them), so they "
    "are not perturbed and not part of 'layer k' in the MDS; true keeps them in.",
    "widths=(32, 64, 152, 56): the paper gives 188,810 parameters, not the widths; this is one of many "
    "tuples with that count (--set widths=a,b,c,d for another).",
    "data: CIFAR-10, per-channel mean/std normalisation, no augmentation (the paper does not mention any).",
)
PROTOCOLS = {
    "paper": Protocol(_FOLLOWS.format(sigma="0.25", layer="2"), _CHOICES),
    "paper-sigma0.5": Protocol(_FOLLOWS.format(sigma="0.5", layer="2") + " (issue 12: the other sigma the "
                               "paper tried)", _CHOICES),
    "paper-sigma1": Protocol(_FOLLOWS.format(sigma="1", layer="2") + " (issue 12: the other sigma the "
                             "paper tried)", _CHOICES),
    "paper-fig16": Protocol("(issue 12) Fig. 16/17: sigma = 1 S, MDS of layer 3; otherwise as Fig. 4.",
                            _CHOICES),
    "quick": Protocol(
        _FOLLOWS.format(sigma="0.25", layer="2") + " Scaled down: digits, 600 training images, width 0.25, "
        "60 epochs, branches at 0, 10, 40.",
        ("lr=0.3 (not 0.1): same method (plain full-batch GD, no momentum), a larger step so that 60 epochs "
         "reach zero training error: measured on this preset's data and width, GD reaches zero training "
         "error at epoch 73 with lr 0.1, 34 with 0.3, 22 with 1.0.",) + _CHOICES[2:]),
}


def _scales(config: Config) -> list[float]:
    s = list(config.branch_scale)
    if len(s) == 1:
        s = s * len(config.branch_epochs)
    if len(s) != len(config.branch_epochs):
        raise ValueError(f"branch_scale has {len(s)} values for {len(config.branch_epochs)} branch_epochs "
                         f"(give one value or one per branch)")
    return s


def mds_tensors(config: Config, spec, frozen) -> str | None:
    """`embed(layer=...)` for config.mds_layer: a paper layer number without the frozen biases, or a
    tensor-name glob as given, or None (all tensors)."""
    layer = config.mds_layer
    if layer is None or not str(layer).lower().removeprefix("layer").strip().isdigit():
        return layer
    return weights.paper_layer(spec, layer, frozen)


def point_label(meta: dict) -> str:
    """The paper's point label: the training error, "NaN" at the random initialisation (global epoch 0:
    the initial model, the perturbed copy a branch at epoch 0 starts from, and their average), which
    the paper labels so instead of evaluating it."""
    if int(meta.get("epoch") or 0) == 0:
        return "NaN"
    err = meta.get("train_error")
    return "" if err is None else f"{err:.2f}"


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
    out, prog, data, make, flat0, spec, frozen = training.start(config, out_dir)
    offsets = spec.offsets
    snaps = snapshot_epochs(config)

    # 1. the main GD trajectory
    main_dir = outdir.store_dir(out, "main")
    if "main" not in prog:
        outdir.log("training the main GD trajectory")
        tconfig = training.train_config(config, epochs=config.epochs, snapshot_epochs=snaps,
                                        eval_every=config.snapshot_every)
        hist = training.run_train(make, flat0, data, tconfig, main_dir, meta={"run": "main", "trajectory": "main"},
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
        start = weights.perturb(main.load_flat(main_at[e]), offsets, weights.tensor_scales(spec, scale, frozen),
                                mode=config.perturb_mode, seed=branch_seed(config, b))
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
        layer = mds_tensors(config, spec, frozen)
        weights.embed_and_save(items, out / "metrics" / "mds_all.json", spec=spec, layer=layer,
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
        metrics = ("train_error", "train_loss", "test_error", "test_loss")
        series = {
            "average (0.5 main + 0.5 branch)": [{"epoch": r["epoch"], **{m: r[m] for m in metrics}} for r in rows],
            "main": [{"epoch": r["epoch"], **{m: r[f"main_{m}"] for m in metrics}} for r in rows],
            "branch": [{"epoch": r["epoch"], **{m: r[f"branch_{m}"] for m in metrics}} for r in rows],
        }
        paths.append(figures.metric_curves(figs / f"average_branch{b}.png", series,
                                     title=f"Averaging the main trajectory with the branch from epoch {e}"))
    emb_path = out / "metrics" / "mds_all.json"
    if emb_path.exists():
        emb = json.loads(emb_path.read_text())
        for m in emb["meta"]:
            m["label"] = point_label(m)
        layer = f"layer {config.mds_layer}" if config.mds_layer is not None else "all layers"
        note = "numbers: training error (NaN: random initialisation)"
        paths.append(figures.embedding_figure(figs / "mds_all.png", emb, group="trajectory", annotate="label",
                                              note=note,
                                              title=f"MDS ({layer}): GD main trajectory, branches, averages"))
        for b, e in enumerate(config.branch_epochs):
            sub = [i for i, m in enumerate(emb["meta"]) if m.get("run") in
                   ("main", f"branch{b}", f"average{b}") and (m.get("run") != "main" or
                                                              (m.get("epoch") or 0) >= e)]
            paths.append(figures.embedding_figure(figs / f"mds_branch{b}.png", emb, group="trajectory", subset=sub,
                                                  annotate="label", note=note,
                                                  title=f"MDS ({layer}): branch from epoch {e}, main, average"))
    return paths
