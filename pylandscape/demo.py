"""`python -m pylandscape demo`: the paper's central picture on the embedded digits data, in minutes on a CPU.

Trains one full-batch gradient-descent trajectory to zero training error, branches off it twice by
perturbing every layer (once at initialisation, once later in training), trains the branches, averages
each branch with the main trajectory epoch by epoch, embeds everything with classical MDS and writes
an HTML report with the figures and the headline numbers. It is the `bgd-branches` experiment with
small settings, so `python -m pylandscape plot OUT` redraws its figures.
"""
from __future__ import annotations

import argparse
import dataclasses
import html
import json
import sys
import time
from pathlib import Path

from .devices import caller_threads
from .experiments import bgd_branches, outdir, training
from .experiments.config import config_to_dict
from .landscape.runs import surface_around_store
from .store import atomic_write_bytes

# Plain full-batch GD (no momentum, as the paper's BGD), at a learning rate at which it reaches zero
# training error well before the end (bgd-branches quick: epoch 34 at lr 0.3 on 600 images); the early
# branch (sigma = 1 x layer std at the initialisation) lands in another minimum, the late one stays in
# the main trajectory's basin. The MDS is of layer 2 (conv1's weights), as the paper's Fig. 4.
DEMO = dataclasses.replace(
    bgd_branches.PRESETS["quick"], dataset="digits", train_size=500, width=0.25, lr=0.3, momentum=0.0, epochs=60,
    branch_epochs=(0, 30), branch_scale=(1.0, 0.25), snapshot_every=3, threads=0)
QUICK = dataclasses.replace(DEMO, train_size=200, width=0.125, epochs=12, branch_epochs=(0, 6))


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def headline(out: Path, config: bgd_branches.Config) -> list[tuple[str, str]]:
    """(label, value) pairs for the report and the console."""
    r = outdir.read_results(out)
    main = outdir.read_table(out / "metrics" / "main")
    avg = outdir.read_table(out / "metrics" / "averages")
    zero = r.get("main_zero_train_error_epoch")
    rows = [("full-batch GD reaches zero training error at epoch",
             str(zero) if zero is not None else f"not reached in {config.epochs} epochs "
             f"(final training error {_pct(main[-1]['train_error'])})"),
            ("main trajectory, final training / test error",
             f"{_pct(main[-1]['train_error'])} / {_pct(main[-1]['test_error'])}")]
    for b, (e, s) in enumerate(zip(config.branch_epochs, bgd_branches._scales(config))):
        last = [a for a in avg if a["branch"] == b][-1]
        rows.append((f"branch {b + 1} (perturbed at epoch {e}, sigma = {s} x layer std): final training / test error",
                     f"{_pct(last['branch_train_error'])} / {_pct(last['branch_test_error'])}"))
        rows.append((f"average of main and branch {b + 1} at epoch {last['epoch']}: training / test error",
                     f"{_pct(last['train_error'])} / {_pct(last['test_error'])} "
                     f"(endpoints: {_pct(last['main_train_error'])} and {_pct(last['branch_train_error'])} training)"))
    cap = r.get("mds_captured")
    if cap is not None:
        rows.append((f"variance captured by the 2-D MDS (1 - cosine of layer {config.mds_layer}'s weights)", _pct(cap)))
    return rows


def _verdict(out: Path, config: bgd_branches.Config) -> str:
    """One sentence comparing each final average with the worse of its two endpoints."""
    avg = outdir.read_table(out / "metrics" / "averages")
    bits = []
    for b, e in enumerate(config.branch_epochs):
        rows = [a for a in avg if a["branch"] == b]
        if not rows:
            continue
        last = rows[-1]
        worst = max(last["main_train_error"], last["branch_train_error"])
        raised = last["train_error"] > worst + 0.005
        bits.append(f"averaging with the branch from epoch {e} {'raises' if raised else 'does not raise'} the "
                    f"training error ({_pct(last['train_error'])} vs {_pct(worst)} for the worse endpoint)"
                    + (": the two models sit in different minima with a barrier between them" if raised else
                       ": the two models share a basin"))
    if not bits:
        return ""
    text = "; ".join(bits)
    return text[0].upper() + text[1:] + "."


def is_demo_run(info: dict) -> bool:
    """True for the config.json of a folder this demo wrote (`plot` then rewrites the report too)."""
    return info.get("experiment") == bgd_branches.NAME and str(info.get("preset") or "").startswith("demo")


def write_report(out: Path, seconds: float | None) -> Path:
    """report.html in `out` from the saved results (seconds: wall time to mention, or None)."""
    config = outdir.load_config(out, bgd_branches.Config)
    rows = headline(out, config)
    figs = [(f"MDS of layer {config.mds_layer}'s weights: main trajectory, both branches and the averaged models "
             "(numbers: training error as a fraction, NaN at the random initialisation)", "figures/mds_all.png")]
    for b, e in enumerate(config.branch_epochs):
        figs.append((f"MDS of the branch from epoch {e}, the main trajectory and their average",
                     f"figures/mds_branch{b}.png"))
    figs.append(("Training/test error and loss of the main trajectory and the branches", "figures/curves.png"))
    figs.append((("Training loss and error around the final model, in the plane of the main trajectory's top-2 "
                  "PCA directions, with the trajectory projected onto it (landscape/surface.html: interactive)"),
                 "landscape/contour.png"))
    for b, e in enumerate(config.branch_epochs):
        figs.append((f"Averaging main and the branch from epoch {e}: the average vs its two endpoints",
                     f"figures/average_branch{b}.png"))
    e = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>pylandscape demo</title>",
        "<style>body{font-family:sans-serif;max-width:980px;margin:2em auto;line-height:1.4}"
        "td,th{border-bottom:1px solid #ddd;padding:4px 8px;text-align:left}img{max-width:100%}</style>",
        "</head><body><h1>pylandscape demo: the landscape of the empirical risk on digits</h1>",
        "<p>A small convolutional network (the paper's 5-layer DCNN at reduced width) is trained with "
        "full-batch gradient descent on the embedded scikit-learn digits. Two branches leave the main "
        "trajectory: one from a perturbed copy of the initial weights, one from a perturbed copy of a later "
        "model. Each branch is averaged with the main trajectory at every recorded epoch (weights "
        "0.5/0.5). Liao &amp; Poggio predict: both reach zero training error at different weights; "
        "averaging models from the same basin keeps the error low, averaging models from different minima "
        "raises it.</p>",
        "<h2>Headline numbers</h2><table>",
        *[f"<tr><td>{e(k)}</td><td><b>{e(v)}</b></td></tr>" for k, v in rows],
        "</table>",
    ]
    verdict = _verdict(out, config)
    if verdict:
        parts.append(f"<p><b>Reading:</b> {e(verdict)}</p>")
    if seconds is not None:
        parts.append(f"<p>Wall time: {seconds:.0f} s. Settings: <code>{e(json.dumps(config_to_dict(config)))}"
                     f"</code></p>")
    for cap, src in figs:
        if (out / src).exists():
            parts.append(f"<h3>{e(cap)}</h3><img src='{e(src)}' alt='{e(cap)}'>")
    parts.append("<p>Numbers: <code>metrics/*.csv</code>; weights: <code>stores/</code>; redraw the figures "
                 f"with <code>python -m pylandscape plot {e(str(out))}</code>.</p></body></html>")
    path = out / "report.html"
    atomic_write_bytes(path, "\n".join(parts).encode())
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m pylandscape demo",
        description="Train a small net on the embedded digits with plain full-batch gradient descent, branch "
                    "off two perturbed copies, average them with the main trajectory, embed the first layer's "
                    "weights with classical MDS, and write an HTML report (about 3 minutes on a 2-core CPU). A re-run "
                    "with the same --out continues where it stopped.")
    ap.add_argument("--out", default="demo_out", help="output folder [demo_out]")
    ap.add_argument("--quick", action="store_true", help="tiny version (~30 s) for smoke tests")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args(argv)
    config = dataclasses.replace(QUICK if args.quick else DEMO, threads=args.threads)
    out = Path(args.out)
    t0 = time.perf_counter()
    try:
        outdir.prepare_out(out, bgd_branches.NAME, config, preset="demo-quick" if args.quick else "demo", resume=True)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with caller_threads():
        bgd_branches.run(config, out)
        data = training.load_data(config)  # the loss surface around the final model, main trajectory on it
        surface_around_store(outdir.store_dir(out, "main"), training.model_fn(config, data)(),
                             {"train": (data.x_train, data.y_train)}, out / "landscape", grid=9 if args.quick else 25)
    seconds = time.perf_counter() - t0
    path = write_report(out, seconds)
    for k, v in headline(out, config):
        print(f"  {k}: {v}")
    print(f"report: {path.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
