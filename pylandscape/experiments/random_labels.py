"""The SGD-stages picture when the labels (and the inputs) are random (the paper's Discussion)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from . import outdir, sgd_stages

NAME = "random-labels"
FIGURE = "Liao & Poggio, Discussion (SGD stages with random labels / random inputs)"
DESCRIPTION = """
Repeats the sgd-stages experiment twice: with the training labels replaced by random ones, and with
both the inputs (Gaussian noise) and the labels random. The network still fits the training set (it
is overparametrised) while the test error stays at chance; the MDS of the stages shows whether the
landscape around those memorising minima looks like the one for real labels. Each variant is a full
sgd-stages run in OUT/<variant> (its own config.json, metrics and figures).
"""

VARIANTS = {"random-labels": ("random", "real"), "random-inputs": ("random", "random")}


@dataclass
class Config(sgd_stages.Config):
    variants: tuple[str, ...] = ("random-labels", "random-inputs")


PRESETS = {
    "paper": Config(**dataclasses.asdict(sgd_stages.PRESETS["paper"])),
    "quick": Config(**{**dataclasses.asdict(sgd_stages.PRESETS["quick"]), "train_size": 200, "stages": 4,
                       "epochs_per_stage": 4, "late_from_stage": 3}),
}


def _sub(config: Config, variant: str) -> sgd_stages.Config:
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    labels, inputs = VARIANTS[variant]
    d = {f.name: getattr(config, f.name) for f in dataclasses.fields(sgd_stages.Config)}
    return sgd_stages.Config(**{**d, "labels": labels, "inputs": inputs})


def run(config: Config, out_dir: Path) -> dict:
    out = Path(out_dir)
    outdir.Progress(out)
    results = {}
    for v in config.variants:
        sub_cfg = _sub(config, v)
        outdir.log(f"variant {v}: labels={sub_cfg.labels}, inputs={sub_cfg.inputs}")
        sub = out / v
        outdir.prepare_out(sub, sgd_stages.NAME, sub_cfg, preset=f"from {NAME}", resume=True)
        r = sgd_stages.run(sub_cfg, sub)
        results.update({f"{v}/{k}": val for k, val in r.items()})
    outdir.write_results(out, results)
    return results


def plot(out_dir: Path) -> list[Path]:
    out = Path(out_dir)
    config = outdir.load_config(out, Config)
    paths = []
    for v in config.variants:
        if (out / v / "config.json").exists():
            paths += sgd_stages.plot(out / v)
    return paths
