"""How often retrained models agree on which test images they get right or wrong (Fig. 23, 29, 36)."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import figures
from ..evaluate import predictions
from ..store import SnapshotStore, atomic_write_json
from . import outdir, perturb_retrain, training

NAME = "agreement"
FIGURE = "Liao & Poggio Fig. 23, 29, 36 (agreement of retrained models)"
DESCRIPTION = """
For the 4 perturbed-and-retrained models of each starting point of `perturb-retrain`, plus a reference
model trained the same way from another random initialisation, computes on the test set the matrices
P(column model correct | row model correct) and P(column model wrong | row model wrong), drawn as heat
maps. The paper's observation: models retrained from perturbations of one model agree on their
mistakes far more than independently trained models do. Reads the output folder of a finished
perturb-retrain run given as source_dir (--set source_dir=runs/perturb-retrain); without it, runs
perturb-retrain itself (with the perturb-retrain fields of this config) into OUT/perturb-retrain.
"""


@dataclass
class Config(perturb_retrain.Config):
    source_dir: str | None = None


PRESETS = {
    "paper": Config(**dataclasses.asdict(perturb_retrain.PRESETS["paper"])),
    "quick": Config(**dataclasses.asdict(perturb_retrain.PRESETS["quick"])),
}


def _source(config: Config, out: Path) -> tuple[Path, perturb_retrain.Config]:
    if config.source_dir:
        src = Path(config.source_dir)
        return src, outdir.load_config(src, perturb_retrain.Config)
    pr_cfg = perturb_retrain.Config(**{f.name: getattr(config, f.name)
                                       for f in dataclasses.fields(perturb_retrain.Config)})
    if not pr_cfg.reference:
        raise ValueError("agreement needs perturb-retrain's reference model: set reference=true")
    sub = out / "perturb-retrain"
    outdir.prepare_out(sub, perturb_retrain.NAME, pr_cfg, preset="from agreement", resume=True)
    perturb_retrain.run(pr_cfg, sub)
    return sub, pr_cfg


def agreement_matrices(correct: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """correct: bool [M, N] (model m right on example n) -> (P(col right | row right), P(col wrong | row wrong))."""
    c = correct.double()
    w = 1.0 - c
    both_right = c @ c.T
    both_wrong = w @ w.T
    right = c.sum(1, keepdim=True)
    wrong = w.sum(1, keepdim=True)
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    pr = torch.where(right > 0, both_right / right.clamp(min=1), nan)
    pw = torch.where(wrong > 0, both_wrong / wrong.clamp(min=1), nan)
    return pr, pw


def run(config: Config, out_dir: Path) -> dict:
    training.set_threads(config.threads)
    out = Path(out_dir)
    prog = outdir.Progress(out)
    src_dir, pr_cfg = _source(config, out)
    if not SnapshotStore.is_store(outdir.store_dir(src_dir, "reference_gd")):
        raise FileNotFoundError(f"{outdir.store_dir(src_dir, 'reference_gd')} not found: the perturb-retrain run in "
                                f"{src_dir} has no reference model (run it with reference=true)")
    data = training.load_data(pr_cfg)
    make = training.model_fn(pr_cfg, data)
    model = make()
    ref = SnapshotStore(outdir.store_dir(src_dir, "reference_gd"))
    ref_flat = ref.load_flat(outdir.last_index(ref))
    results = {}
    for src in perturb_retrain.sources(pr_cfg):
        unit = f"agreement_{src}"
        if unit not in prog:
            st = SnapshotStore(outdir.store_dir(src_dir, f"retrain_{src}"))
            flats = [st.load_flat(outdir.last_index(st, perturbation=k + 1)) for k in range(pr_cfg.n_perturb)]
            flats.append(ref_flat)
            labels = [f"perturbation {k + 1}" for k in range(pr_cfg.n_perturb)] + ["reference (other init)"]
            dev = next(model.parameters()).device
            correct = torch.stack([predictions(model, f.to(dev), data.x_test, bn="reestimate", bn_x=data.x_train).cpu()
                                   == data.y_test.cpu() for f in flats])
            pr, pw = agreement_matrices(correct)
            rec = {"labels": labels, "p_right_given_right": pr.tolist(), "p_wrong_given_wrong": pw.tolist(),
                   "test_error": (1 - correct.double().mean(1)).tolist(), "n_test": int(correct.shape[1])}
            outdir.write_table(out / "metrics" / unit, [
                {"row": labels[i], "column": labels[j], "p_right_given_right": pr[i, j].item(),
                 "p_wrong_given_wrong": pw[i, j].item()} for i in range(len(labels)) for j in range(len(labels))])
            atomic_write_json(out / "metrics" / f"{unit}_matrices.json", rec)
            prog.mark(unit)
        rec = json.loads((out / "metrics" / f"{unit}_matrices.json").read_text())
        n = pr_cfg.n_perturb
        pw = torch.tensor(rec["p_wrong_given_wrong"])
        off = ~torch.eye(n, dtype=torch.bool)
        results[f"{src}_wrong_agreement_among_retrained"] = float(pw[:n, :n][off].nanmean())
        results[f"{src}_wrong_agreement_with_reference"] = float(pw[:n, n].nanmean())
    outdir.write_results(out, results)
    plot(out)
    return results


def plot(out_dir: Path) -> list[Path]:
    out = Path(out_dir)
    sub = out / "perturb-retrain"  # the run this experiment made itself, if any
    paths = perturb_retrain.plot(sub) if (sub / "config.json").exists() else []
    for q in sorted((out / "metrics").glob("agreement_*_matrices.json")):
        src = q.name[len("agreement_"):-len("_matrices.json")]
        rec = json.loads(q.read_text())
        labels = [f"{lab}\n(err {100 * e:.1f}%)" for lab, e in zip(rec["labels"], rec["test_error"])]
        paths.append(figures.heatmaps(out / "figures" / f"agreement_{src}.png",
                                {"P(column right | row right)": rec["p_right_given_right"],
                                 "P(column wrong | row wrong)": rec["p_wrong_given_wrong"]}, labels,
                                title=f"Test-set agreement of models retrained from perturbations of the {src} model"))
    return paths
