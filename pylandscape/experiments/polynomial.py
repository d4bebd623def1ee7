"""ReLU network vs the same network with polynomial activations (Fig. 2)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .. import figures
from . import outdir, training

NAME = "polynomial"
FIGURE = "Liao & Poggio Fig. 2 (ReLU vs polynomial activations)"
DESCRIPTION = """
Trains the same network with the ReLU activation and with polynomial activations (least-squares fits
of the ReLU of a few degrees, e.g. poly2, poly3), same data, initialisation and SGD settings, and
compares training and test error and loss curves. The paper's point: a polynomial net behaves
essentially like the ReLU net, so the theory developed for polynomial networks (Bezout-style counting
of degenerate global minima) is relevant to ReLU networks.
"""


@dataclass
class Config:
    dataset: str = "cifar10"
    data_root: str | None = None
    train_size: int | None = None
    width: float = 1.0
    activations: tuple[str, ...] = ("relu", "poly2", "poly3", "poly4")
    optimizer: str = "sgd"
    lr: float = 0.01
    batch_size: int = 100
    momentum: float = 0.0
    epochs: int = 60
    seed: int = 0
    device: str = "auto"
    threads: int = 0


PRESETS = {
    "paper": Config(),
    "quick": Config(dataset="digits", device="cpu", train_size=500, width=0.25, activations=("relu", "poly2", "poly3"),
                    lr=0.05, momentum=0.9, batch_size=50, epochs=10, threads=1),
}


def parse_activation(a: str) -> tuple[str, int]:
    """"relu" -> ("relu", 2); "poly3" -> ("poly", 3)."""
    if a == "relu":
        return "relu", 2
    m = re.fullmatch(r"poly(\d+)", a)
    if not m or int(m.group(1)) < 1:
        raise ValueError(f"activation {a!r}: use relu or polyN (N >= 1, e.g. poly2)")
    return "poly", int(m.group(1))


def run(config: Config, out_dir: Path) -> dict:
    for a in config.activations:
        parse_activation(a)
    training.set_threads(config.threads)
    out = Path(out_dir)
    prog = outdir.Progress(out)
    data = training.load_data(config)
    results = {}
    for a in config.activations:
        act, deg = parse_activation(a)
        make = training.model_fn(config, data, activation=act, poly_degree=deg)
        if a not in prog:
            outdir.log(f"{a}: {config.epochs} epochs of {config.optimizer.upper()}")
            _, flat0, _ = training.init_flat(make, config.seed)  # same initial weights for every activation
            hist = training.run_train(make, flat0, data, training.train_config(config, snapshot_epochs=[0, config.epochs]),
                               outdir.store_dir(out, a), meta={"run": a, "trajectory": a, "activation": a}, resume=True)
            outdir.write_table(out / "metrics" / a, hist)
            prog.mark(a)
        last = outdir.read_table(out / "metrics" / a)[-1]
        results[f"{a}_final_train_error"] = last["train_error"]
        results[f"{a}_final_test_error"] = last["test_error"]
    outdir.write_results(out, results)
    plot(out)
    return results


def plot(out_dir: Path) -> list[Path]:
    out = Path(out_dir)
    config = outdir.load_config(out, Config)
    runs = {a: outdir.read_table(out / "metrics" / a) for a in config.activations
            if (out / "metrics" / f"{a}.json").exists()}
    return [figures.metric_curves(out / "figures" / "curves.png", runs,
                            title="Same network, ReLU vs polynomial activations (polyN: degree-N fit of ReLU)")]
