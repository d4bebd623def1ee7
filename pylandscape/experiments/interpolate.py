"""Error along the straight line between two perturbed models, before and after retraining (Fig. 30, 37)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from .. import figures
from ..store import SnapshotStore
from . import outdir, perturb_retrain, training, weights

NAME = "interpolate"
FIGURE = "Liao & Poggio Fig. 30, 37 (interpolation between retrained models)"
DESCRIPTION = """
Takes perturbations 1 and 2 of each starting point of `perturb-retrain`, before retraining (the
perturbed copies) and after retraining, and evaluates the models (1 - alpha) w1 + alpha w2 for alpha
on a grid from alpha_min to alpha_max (beyond [0, 1] too) on the whole training and test sets, all
alphas as one batch of models. alpha = 0 and 1 are the two endpoints. The paper's observation: after
retraining, the straight line between two minima found from the same model stays at low error (they
share a flat, connected basin), while going beyond the endpoints raises it. Reads the output folder of
a finished perturb-retrain run (--set source_dir=...), or runs one itself into OUT/perturb-retrain.
"""


@dataclass
class Config(perturb_retrain.Config):
    source_dir: str | None = None
    alpha_min: float = -0.2
    alpha_max: float = 1.2
    alpha_step: float = 0.1


PRESETS = {
    "paper": Config(**dataclasses.asdict(perturb_retrain.PRESETS["paper"])),
    "quick": Config(**{**dataclasses.asdict(perturb_retrain.PRESETS["quick"]), "reference": False}),
}


def alphas(config: Config) -> list[float]:
    """The grid, built from integer steps so that 0 and 1 are exact when they are on it."""
    if not config.alpha_step > 0 or config.alpha_max < config.alpha_min:
        raise ValueError(f"need alpha_step > 0 and alpha_max >= alpha_min, got {config.alpha_min}, "
                         f"{config.alpha_max}, {config.alpha_step}")
    n = int(round((config.alpha_max - config.alpha_min) / config.alpha_step))
    return [round(config.alpha_min + i * config.alpha_step, 10) for i in range(n + 1)]


def _source(config: Config, out: Path) -> tuple[Path, perturb_retrain.Config]:
    if config.source_dir:
        src = Path(config.source_dir)
        return src, outdir.load_config(src, perturb_retrain.Config)
    pr_cfg = perturb_retrain.Config(**{f.name: getattr(config, f.name)
                                       for f in dataclasses.fields(perturb_retrain.Config)})
    sub = out / "perturb-retrain"
    outdir.prepare_out(sub, perturb_retrain.NAME, pr_cfg, preset="from interpolate", resume=True)
    perturb_retrain.run(pr_cfg, sub)
    return sub, pr_cfg


def run(config: Config, out_dir: Path) -> dict:
    training.set_threads(config.threads)
    out = Path(out_dir)
    prog = outdir.Progress(out)
    al = alphas(config)
    src_dir, pr_cfg = _source(config, out)
    data = training.load_data(pr_cfg)
    make = training.model_fn(pr_cfg, data)
    results = {}
    for src in perturb_retrain.sources(pr_cfg):
        unit = f"interpolate_{src}"
        if unit not in prog:
            outdir.log(f"{src}: {len(al)} models between perturbations 1 and 2, before and after retraining")
            st = SnapshotStore(outdir.store_dir(src_dir, f"retrain_{src}"))
            rows = []
            for when in ("before", "after"):
                ends = []
                for k in (1, 2):
                    idx = st.select(perturbation=k)
                    if not idx:
                        raise ValueError(f"{st.root}: no snapshots of perturbation {k}")
                    pick = (min if when == "before" else max)(idx, key=lambda i: (int(st.entries[i]["epoch"]), i))
                    ends.append(st.load_flat(pick))
                W = weights.interpolate(ends[0], ends[1], al)
                ev = training.evaluate_flats(make, W, data)
                for i, a in enumerate(al):
                    rows.append({"source": src, "when": when, "alpha": a,
                                 **{m: ev[m][i] for m in ("train_error", "train_loss", "test_error", "test_loss")}})
            outdir.write_table(out / "metrics" / unit, rows)
            prog.mark(unit)
        rows = outdir.read_table(out / "metrics" / unit)
        for when in ("before", "after"):
            inner = [r for r in rows if r["when"] == when and 0 < r["alpha"] < 1]
            ends = [r for r in rows if r["when"] == when and r["alpha"] in (0.0, 1.0)]
            if inner and ends:
                results[f"{src}_{when}_max_train_error_between"] = max(r["train_error"] for r in inner)
                results[f"{src}_{when}_endpoint_train_errors"] = [r["train_error"] for r in ends]
    outdir.write_results(out, results)
    plot(out)
    return results


def plot(out_dir: Path) -> list[Path]:
    out = Path(out_dir)
    sub = out / "perturb-retrain"  # the run this experiment made itself, if any
    paths = perturb_retrain.plot(sub) if (sub / "config.json").exists() else []
    for q in sorted((out / "metrics").glob("interpolate_*.json")):
        src = q.stem[len("interpolate_"):]
        rows = outdir.read_table(q.with_suffix(""))
        runs = {f"{w} retraining": [r for r in rows if r["when"] == w] for w in ("before", "after")}
        paths.append(figures.metric_curves(
            out / "figures" / f"interpolate_{src}.png", runs, x="alpha",
            xlabel="alpha  (0 = perturbation 1, 1 = perturbation 2)",
            title=f"Models (1 - alpha) w1 + alpha w2 between two perturbations of the {src} model"))
    return paths
