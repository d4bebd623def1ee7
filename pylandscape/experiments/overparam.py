"""Test error vs training-set size for networks of several widths (Fig. 40)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .. import figures
from ..models import count_parameters
from . import outdir, training

NAME = "overparam"
FIGURE = "Liao & Poggio Fig. 40 (validation error vs training-set size and width)"
DESCRIPTION = """
Trains networks of several widths (so several parameter counts) on training sets of several sizes and
reports the final training and test (validation) error of each. The paper's observation: once the
network has more parameters than training examples it fits the training set exactly, and the test
error keeps improving as the network grows; overparametrisation does not cause overfitting in the
classical sense.
"""


@dataclass
class Config:
    dataset: str = "cifar10"
    data_root: str | None = None
    widths: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)
    train_sizes: tuple[int, ...] = (500, 2000, 10000, 50000)
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
    "quick": Config(dataset="digits", device="cpu", widths=(0.0625, 0.125, 0.25), train_sizes=(100, 300, 1000),
                    lr=0.05, momentum=0.9, batch_size=50, epochs=10, threads=1),
}


def run(config: Config, out_dir: Path) -> dict:
    training.set_threads(config.threads)
    out = Path(out_dir)
    prog = outdir.Progress(out)
    rows = []
    for n in config.train_sizes:
        data = training.load_data(config, train_size=n)
        for w in config.widths:
            unit = f"w{w:g}_n{n}"
            make = training.model_fn(config, data, width=w)
            if unit not in prog:
                outdir.log(f"width {w:g}, {n} training examples: {config.epochs} epochs")
                model, flat0, _ = training.init_flat(make, config.seed)
                hist = training.run_train(make, flat0, data, training.train_config(config, snapshot_epochs=[config.epochs], eval_every=config.epochs),
                                   outdir.store_dir(out, unit), meta={"run": unit, "width": w, "train_size": n},
                                   resume=True)
                outdir.write_table(out / "metrics" / unit, hist)
                last = hist[-1]
                prog.mark(unit, {"width": w, "train_size": n, "parameters": count_parameters(model),
                                 "train_error": last["train_error"], "test_error": last["test_error"],
                                 "train_loss": last["train_loss"], "test_loss": last["test_loss"]})
            rows.append(prog.get(unit))
    outdir.write_table(out / "metrics" / "final", rows)
    results = {f"w{r['width']:g}_n{r['train_size']}_test_error": r["test_error"] for r in rows}
    outdir.write_results(out, results)
    plot(out)
    return results


def plot(out_dir: Path) -> list[Path]:
    out = Path(out_dir)
    rows = outdir.read_table(out / "metrics" / "final")
    paths = []
    for m, lab in (("test_error", "test (validation) error"), ("train_error", "training error")):
        series = {}
        for w in sorted({r["width"] for r in rows}):
            rr = sorted([r for r in rows if r["width"] == w], key=lambda r: r["train_size"])
            series[f"width {w:g} ({rr[0]['parameters']:,} weights)"] = ([r["train_size"] for r in rr],
                                                                       [r[m] for r in rr])
        paths.append(figures.xy_lines(out / "figures" / f"{m}_vs_train_size.png", series, logx=True,
                                title=f"Final {lab} vs training-set size, one line per network width",
                                xlabel="training examples", ylabel=lab))
    return paths
