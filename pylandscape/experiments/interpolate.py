"""Error along the straight line between two perturbed models, before and after retraining (Fig. 30, 37)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path


from . import _common as C
from . import perturb_retrain as PR

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
class Config(PR.Config):
    source_dir: str | None = None
    alpha_min: float = -0.2
    alpha_max: float = 1.2
    alpha_step: float = 0.1


PRESETS = {
    "paper": Config(**dataclasses.asdict(PR.PRESETS["paper"])),
    "quick": Config(**{**dataclasses.asdict(PR.PRESETS["quick"]), "reference": False}),
}


def alphas(config: Config) -> list[float]:
    """The grid, built from integer steps so that 0 and 1 are exact when they are on it."""
    if not config.alpha_step > 0 or config.alpha_max < config.alpha_min:
        raise ValueError(f"need alpha_step > 0 and alpha_max >= alpha_min, got {config.alpha_min}, "
                         f"{config.alpha_max}, {config.alpha_step}")
    n = int(round((config.alpha_max - config.alpha_min) / config.alpha_step))
    return [round(config.alpha_min + i * config.alpha_step, 10) for i in range(n + 1)]


def _source(config: Config, out: Path) -> tuple[Path, PR.Config]:
    if config.source_dir:
        src = Path(config.source_dir)
        return src, C.load_config(src, PR.Config)
    pr_cfg = PR.Config(**{f.name: getattr(config, f.name) for f in dataclasses.fields(PR.Config)})
    sub = out / "perturb-retrain"
    C.prepare_out(sub, PR.NAME, pr_cfg, preset="from interpolate", resume=True)
    PR.run(pr_cfg, sub)
    return sub, pr_cfg


def run(config: Config, out_dir: Path) -> dict:
    C.set_threads(config.threads)
    out = Path(out_dir)
    prog = C.Progress(out)
    al = alphas(config)
    src_dir, pr_cfg = _source(config, out)
    data = C.load_data(pr_cfg)
    make = C.model_fn(pr_cfg, data)
    results = {}
    for src in PR.sources(pr_cfg):
        unit = f"interpolate_{src}"
        if unit not in prog:
            C.log(f"{src}: {len(al)} models between perturbations 1 and 2, before and after retraining")
            st = C.SnapshotStore(C.store_dir(src_dir, f"retrain_{src}"))
            rows = []
            for when in ("before", "after"):
                ends = []
                for k in (1, 2):
                    idx = st.select(perturbation=k)
                    if not idx:
                        raise ValueError(f"{st.root}: no snapshots of perturbation {k}")
                    pick = (min if when == "before" else max)(idx, key=lambda i: (int(st.entries[i]["epoch"]), i))
                    ends.append(st.load_flat(pick))
                W = C.interpolate(ends[0], ends[1], al)
                ev = C.evaluate_flats(make, W, data)
                for i, a in enumerate(al):
                    rows.append({"source": src, "when": when, "alpha": a,
                                 **{m: ev[m][i] for m in ("train_error", "train_loss", "test_error", "test_loss")}})
            C.write_table(out / "metrics" / unit, rows)
            prog.mark(unit)
        rows = C.read_table(out / "metrics" / unit)
        for when in ("before", "after"):
            inner = [r for r in rows if r["when"] == when and 0 < r["alpha"] < 1]
            ends = [r for r in rows if r["when"] == when and r["alpha"] in (0.0, 1.0)]
            if inner and ends:
                results[f"{src}_{when}_max_train_error_between"] = max(r["train_error"] for r in inner)
                results[f"{src}_{when}_endpoint_train_errors"] = [r["train_error"] for r in ends]
    C.write_results(out, results)
    plot(out)
    return results


def plot(out_dir: Path) -> list[Path]:
    from .. import plot as P
    out = Path(out_dir)
    sub = out / "perturb-retrain"  # the run this experiment made itself, if any
    paths = PR.plot(sub) if (sub / "config.json").exists() else []
    for q in sorted((out / "metrics").glob("interpolate_*.json")):
        src = q.stem[len("interpolate_"):]
        rows = C.read_table(q.with_suffix(""))
        runs = {f"{w} retraining": [r for r in rows if r["when"] == w] for w in ("before", "after")}
        paths.append(P.metric_curves(out / "figures" / f"interpolate_{src}.png", runs, x="alpha",
                                     xlabel="alpha  (0 = perturbation 1, 1 = perturbation 2)",
                                     title=f"Models (1 - alpha) w1 + alpha w2 between two perturbations of the {src} model"))
    return paths
