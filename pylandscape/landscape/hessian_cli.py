"""`python -m pylandscape.hessian`: curvature of the training loss at a model or along a training run."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from ..devices import caller_threads, resolve_device
from . import hessian, hessian_outputs
from .inputs import (
    InputError,
    build_model,
    load_buffers_,
    load_data,
    open_weights,
    read_weights,
    single_row,
)

EXAMPLES = """examples:
  # top-5 eigenvalues, trace and spectral density at a trained model, on 500 training images
  python -m pylandscape.hessian --checkpoint runs/gd/final.pt --train-size 500

  # the same per layer block (the paper's layers 2..6: each conv with its bias), in float64
  python -m pylandscape.hessian --checkpoint final.pt --per-layer --dtype float64

  # per-layer top eigenvalue and trace at every snapshot of a run: one row per snapshot
  python -m pylandscape.hessian --trajectory runs/gd --per-layer --train-size 300

outputs (in --out): hessian.json, eigenvalues.csv (with residuals ||Hv - lambda v||), layers.csv,
density.csv + density.png; with --trajectory: trajectory.csv (one row per snapshot), trajectory.png.
"""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m pylandscape.hessian", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Hessian of the mean cross-entropy on the training images, without forming it: top "
                    "eigenvalues (Lanczos), trace (Hutchinson, with its standard error), eigenvalue density "
                    "(stochastic Lanczos quadrature), for the whole model and per layer.",
        epilog=EXAMPLES)
    src = ap.add_argument_group("which models")
    src.add_argument("--checkpoint", metavar="FILE", help="one model: any file `python -m pylandscape.mds` reads")
    src.add_argument("--trajectory", metavar="SOURCE", help="a folder of snapshots: every snapshot, one row each")
    src.add_argument("--select", metavar="EXPR", help="filter the snapshots, e.g. 'epoch >= 10'")
    src.add_argument("--model", default="dcnn", help="dcnn (default; widths from the checkpoint), fc2, or "
                                                     "module:factory returning your nn.Module")
    dat = ap.add_argument_group("data")
    dat.add_argument("--data", default="digits", help="digits (default), cifar10, an .npz with x, y, or an image folder")
    dat.add_argument("--root", help="CIFAR-10 folder")
    dat.add_argument("--train-size", type=int, default=500,
                     help="training images the loss is averaged over (a fixed random subset; default 500)")
    est = ap.add_argument_group("estimates (0 turns one off)")
    est.add_argument("--top-k", type=int, default=5, help="largest eigenvalues of the whole Hessian (default 5)")
    est.add_argument("--lanczos-steps", type=int, default=None, help="Lanczos steps (default max(2k + 20, 30))")
    est.add_argument("--probes", type=int, default=100, help="Hutchinson probes for the trace (default 100)")
    est.add_argument("--density-runs", type=int, default=None,
                     help="SLQ runs for the spectral density (default 4; 0 with --trajectory)")
    est.add_argument("--density-steps", type=int, default=80, help="Lanczos steps per SLQ run (default 80)")
    est.add_argument("--per-layer", action="store_true", help="also each layer block's top eigenvalue and trace")
    est.add_argument("--layer-top-k", type=int, default=1, help="eigenvalues per layer block (default 1)")
    est.add_argument("--layer-probes", type=int, default=30, help="Hutchinson probes per layer block (default 30)")
    est.add_argument("--seed", type=int, default=0)
    ev = ap.add_argument_group("evaluation")
    ev.add_argument("--bn", default="reestimate", choices=hessian.HESSIAN_BN,
                    help="BatchNorm statistics: reestimate (exactly on the images used; default) or keep the "
                         "checkpoint's; the network is then in eval mode")
    ev.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    ev.add_argument("--batch-size", type=int, default=500, help="images per forward/backward (default 500)")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--threads", type=int)
    ap.add_argument("--out", default="hessian_out", help="output folder (default ./hessian_out)")
    return ap


def run(args) -> tuple[list, list[dict]]:
    if args.threads:
        torch.set_num_threads(args.threads)
    if bool(args.checkpoint) == bool(args.trajectory):
        raise InputError("give exactly one of --checkpoint FILE or --trajectory SOURCE (see --help)")
    device = resolve_device(args.device)
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    data = load_data(args.data, train_size=args.train_size, root=args.root)
    x, y = data.sets["train"]
    src = args.checkpoint or args.trajectory
    sset = open_weights(src, args.select)
    model = build_model(args.model, sset.spec, int(x.shape[-1]) if x.dim() == 4 else 32)
    if args.bn == "keep":
        row_for_bn = single_row(sset, src, args.select) if args.checkpoint else len(sset) - 1
        load_buffers_(model, sset.items[row_for_bn].path)
    if args.checkpoint:
        rows = [single_row(sset, src, args.select)]
    else:
        rows = sset.filter_rows(select=args.select) if args.select else list(range(len(sset)))
    w = read_weights(model, sset, rows, src)
    model = model.to(device=device, dtype=dtype)
    x, y = x.to(device=device, dtype=dtype), y.to(device)
    runs = args.density_runs if args.density_runs is not None else (0 if args.trajectory else 4)
    reports = []
    for i, theta in enumerate(w.flats):
        t0 = time.perf_counter()
        rep = hessian.curvature(model, x, y, theta=theta.to(device=device, dtype=dtype), top_k=args.top_k,
                                lanczos_steps=args.lanczos_steps, trace_probes=args.probes, density_runs=runs,
                                density_steps=args.density_steps, per_layer=args.per_layer,
                                layer_top_k=args.layer_top_k, layer_probes=args.layer_probes, bn=args.bn,
                                batch_size=args.batch_size, dtype=dtype, seed=args.seed)
        rep.info.update(seconds=time.perf_counter() - t0, snapshot=w.meta[i].get("path"), model=args.model,
                        data=data.description, device=str(device))
        reports.append(rep)
        top = "" if rep.top is None else f", top eigenvalue {rep.top.values[0]:.4g}"
        tr = "" if rep.trace is None else f", trace {rep.trace.value:.4g} +- {rep.trace.stderr:.2g}"
        print(f"[{i + 1}/{len(rows)}] {w.meta[i].get('path')}: loss {rep.loss:.4g}{top}{tr} "
              f"({rep.info['seconds']:.1f} s)", file=sys.stderr)
    return reports, w.meta


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with caller_threads():
            reports, metas = run(args)
    except (InputError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    paths = hessian_outputs.write_report(reports[-1], out)
    if args.trajectory:
        paths += hessian_outputs.write_trajectory(reports, metas, out)
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
