"""`python -m pylandscape.surface`: the loss surface around a model or through 2-3 models."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from ..devices import caller_threads, resolve_device
from ..mds import parse_memory
from . import outputs, runs
from . import surface as surf
from .batched import BN_CHOICES, FORWARDS, ROUTES
from .directions import BIAS_MODES
from .inputs import (
    InputError,
    build_model,
    load_buffers_,
    load_data,
    open_weights,
    parse_grid,
    parse_range,
    read_weights,
    single_row,
)

EXAMPLES = """examples:
  # 2-D surface (51 x 51) around a trained model, filter-normalised random directions (Li et al. 2018)
  python -m pylandscape.surface --checkpoint runs/gd/final.pt --grid 51 --range -1:1

  # the same plane with the training run drawn on it, and the test set too
  python -m pylandscape.surface --checkpoint final.pt --trajectory runs/gd --sets train,test

  # the plane of the top-2 PCA directions of a training run, around its last snapshot (Li et al. Sec. 7)
  python -m pylandscape.surface --trajectory runs/gd --directions pca --range -0.2:1.2

  # the line through two models (1-D) or the plane through three (2-D); A at 0, B at x = 1, C at y = 1
  python -m pylandscape.surface --through a.pt b.pt --grid 41 --range -0.5:1.5
  python -m pylandscape.surface --through a.pt b.pt c.pt --grid 31

  # your own network and data: a function returning an nn.Module, an .npz with x, y
  python -m pylandscape.surface --model mypkg.nets:make_net --checkpoint net.pt --data mydata.npz

outputs (in --out): surface.npz + surface.csv (coordinates, loss and error per grid point),
surface.json (directions, BatchNorm handling, timings), curves.png, contour.png and surface3d.png
(2-D), surface.html (interactive, self-contained). `python -m pylandscape plot OUT` redraws them.
"""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m pylandscape.surface", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Loss and error on a grid of weight vectors: around one model along random or PCA "
                    "directions, or on the line / plane through 2-3 models. Many grid points are evaluated "
                    "per pass (see pylandscape.landscape.batched).",
        epilog=EXAMPLES)
    src = ap.add_argument_group("which models")
    src.add_argument("--checkpoint", metavar="FILE",
                     help="the model at the centre: any file `python -m pylandscape.mds` reads (.pt/.pth/.ckpt "
                          "state_dict, .safetensors, .npz, a pylandscape store)")
    src.add_argument("--through", nargs="+", metavar="FILE",
                     help="2 models (a line) or 3 models (a plane) to span the grid with")
    src.add_argument("--trajectory", metavar="SOURCE",
                     help="a folder of snapshots (a training run) to project onto the plane; required by "
                          "--directions pca, whose centre is its last snapshot unless --checkpoint is given")
    src.add_argument("--select", metavar="EXPR", help="filter the snapshots of --checkpoint/--trajectory, e.g. "
                                                      "'trajectory == \"main\"' (as in pylandscape.mds)")
    src.add_argument("--model", default="dcnn",
                     help="dcnn (the paper's network, widths read from the checkpoint; default), fc2, or "
                          "module:factory, a function returning your nn.Module")
    dat = ap.add_argument_group("data")
    dat.add_argument("--data", default="digits",
                     help="digits (embedded, default), cifar10, an .npz with x and y (optionally x_test, "
                          "y_test), or an image folder ROOT/CLASS/*.png (or ROOT/train, ROOT/test)")
    dat.add_argument("--root", help="CIFAR-10 folder (default $PYLANDSCAPE_DATA or ~/.cache/pylandscape)")
    dat.add_argument("--train-size", type=int, help="use this many training images (a fixed random subset)")
    dat.add_argument("--sets", default="train", help="where to measure loss and error: train, test or "
                                                     "train,test (default train)")
    grid = ap.add_argument_group("grid")
    grid.add_argument("--grid", default="51", help="points per axis: 51 or 51x31 (default 51)")
    grid.add_argument("--dims", type=int, choices=(1, 2), default=None,
                      help="1 (a curve) or 2 (a surface) directions around --checkpoint (default 2; "
                           "--through gives 1 for two models, 2 for three)")
    grid.add_argument("--range", default=None,
                      help="coordinate range LOW:HIGH (default -1:1 around a model, -0.5:1.5 through models)")
    grid.add_argument("--yrange", default=None, help="range of the second axis (default: --range)")
    grid.add_argument("--directions", default="filter", choices=surf.DIRECTION_KINDS,
                      help="filter: random, filter-normalised as Li et al. 2018 (default); layer: random with "
                           "sigma = x * S per layer (x = coordinate, S = the layer's std, as our perturbations); "
                           "none: raw Gaussian; pca: top PCA axes of --trajectory")
    grid.add_argument("--bias-directions", default="zero", choices=BIAS_MODES,
                      help="random directions on biases / 1-D tensors: zero (Li et al.'s default), copy (= the "
                           "weights), filter (rescaled to the tensor's norm)")
    grid.add_argument("--seed", type=int, default=0, help="seed of the random directions (noise stream)")
    ev = ap.add_argument_group("evaluation")
    ev.add_argument("--bn", default="reestimate", choices=BN_CHOICES,
                    help="BatchNorm statistics per grid point: reestimate (exactly, on the training images; "
                         "default), keep (the checkpoint's), train (each batch's own statistics)")
    ev.add_argument("--route", default="auto", choices=ROUTES,
                    help="how many models run at once: auto (default), loop, grouped, vmap")
    ev.add_argument("--forward", default="auto", choices=FORWARDS,
                    help="CPU loop route: auto (default: plain conv nets run in oneDNN's layout with BatchNorm "
                         "folded, others eagerly), eager (plain PyTorch modules), onednn (insist)")
    ev.add_argument("--batch-size", type=int, help="images per forward pass (default 256 on CPU, 1024 on GPU)")
    ev.add_argument("--max-memory", default="512M", help="memory for grid points and activations (default 512M)")
    ev.add_argument("--device", default="auto", help="auto (GPU if available), cpu, cuda, cuda:1 ...")
    ev.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    ev.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    out = ap.add_argument_group("output")
    out.add_argument("--out", default="surface_out", help="output folder (default ./surface_out)")
    out.add_argument("--no-figures", action="store_true", help="only surface.npz/.csv/.json")
    out.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap


def _sets(data, names: str) -> dict:
    wanted = [s.strip() for s in names.split(",") if s.strip()]
    bad = [s for s in wanted if s not in data.sets]
    if bad or not wanted:
        raise InputError(f"--sets {names!r}: available sets are {', '.join(data.sets)}")
    return {s: data.sets[s] for s in wanted}


def run(args: argparse.Namespace) -> surf.Surface:
    if args.threads:
        torch.set_num_threads(args.threads)
    if not (args.checkpoint or args.through or args.trajectory):
        raise InputError("give --checkpoint FILE, --through A B [C] or --trajectory SOURCE (see --help)")
    if args.through and args.checkpoint:
        raise InputError("--through and --checkpoint exclude each other")
    if args.through and not 2 <= len(args.through) <= 3:
        raise InputError(f"--through takes 2 or 3 models, got {len(args.through)}")
    if args.directions == "pca" and not args.trajectory:
        raise InputError("--directions pca needs --trajectory")
    device = resolve_device(args.device)
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    grid = parse_grid(args.grid)
    data = load_data(args.data, train_size=args.train_size, root=args.root)
    sets = _sets(data, args.sets)
    first = next(iter(data.sets.values()))[0]
    image_size = int(first.shape[-1]) if first.dim() == 4 else 32

    # the architecture: from the first weights file's shapes
    first_src = args.through[0] if args.through else (args.checkpoint or args.trajectory)
    sset0 = open_weights(first_src, args.select if not args.through else None)
    model = build_model(args.model, sset0.spec, image_size)

    traj = traj_meta = None
    if args.trajectory:
        tset = sset0 if first_src == args.trajectory else open_weights(args.trajectory, args.select)
        rows = tset.filter_rows(select=args.select) if args.select else list(range(len(tset)))
        tw = read_weights(model, tset, rows, args.trajectory)
        traj, traj_meta = tw.flats.to(device=device, dtype=dtype), tw.meta

    model = model.to(device=device, dtype=dtype)
    eval_kw = {"bn": args.bn, "route": args.route, "forward": args.forward, "batch_size": args.batch_size,
               "max_memory": parse_memory(args.max_memory), "progress": not args.quiet}
    sets = {k: (x.to(device=device, dtype=dtype), y.to(device)) for k, (x, y) in sets.items()}
    bn_x = data.sets["train"][0].to(device=device, dtype=dtype) if "train" in data.sets else None
    eval_kw["bn_x"] = bn_x
    bn_file = None

    if args.through:
        flats, names = [], []
        for f in args.through:
            ss = open_weights(f)
            w = read_weights(model, ss, [single_row(ss, f, None)], f)
            flats.append(w.flats[0])
            names.append(Path(f).stem)
        dims = len(args.through) - 1
        r = parse_range(args.range or "-0.5:1.5")
        ranges = [r, parse_range(args.yrange) if args.yrange else r]
        g = tuple(grid) if len(grid) == dims else (grid[0],) * dims
        bn_file = Path(args.through[0])
        if args.bn == "keep":
            load_buffers_(model, bn_file)
        s = surf.through(model, torch.stack(flats).to(device=device, dtype=dtype), sets, grid=g, ranges=ranges,
                         names=names, trajectory=traj, trajectory_meta=traj_meta, **eval_kw)
        s.info["checkpoints"] = list(args.through)
    else:
        if args.checkpoint:
            ss = sset0
            row = single_row(ss, args.checkpoint, args.select)
            theta = read_weights(model, ss, [row], args.checkpoint).flats[0]
            centre = args.checkpoint
            bn_file = ss.items[row].path
        else:
            theta = traj[-1].cpu()
            centre = f"{args.trajectory} (last snapshot: {traj_meta[-1].get('path')})"
            bn_file = sset0.items[rows[-1]].path
        if args.bn == "keep":
            if bn_file is None:
                raise InputError("--bn keep needs BatchNorm statistics from a file; use --bn reestimate")
            load_buffers_(model, bn_file)
        dims = args.dims or (len(grid) if len(grid) > 1 else 2)
        g = tuple(grid) if len(grid) == dims else (grid[0],) * dims
        r = parse_range(args.range or "-1:1")
        ranges = [r, parse_range(args.yrange) if args.yrange else r]
        s = surf.around(model, sets, theta=theta.to(device=device, dtype=dtype), directions=args.directions,
                        grid=g, ranges=ranges[:dims], seed=args.seed, bias=args.bias_directions,
                        trajectory=traj, trajectory_meta=traj_meta, **eval_kw)
        s.info["checkpoint"] = centre
    s.info.update(model=args.model, data=data.description, device=str(device), dtype=args.dtype,
                  num_threads=torch.get_num_threads())
    return s


def write_all(s: surf.Surface, out: Path, *, figures_too: bool = True) -> list[Path]:
    paths = outputs.write_data(s, out)
    if figures_too:
        paths += runs.draw(s, out)
    return paths


def join_negative_values(argv: list[str], options: tuple[str, ...]) -> list[str]:
    """['--range', '-1:1'] -> ['--range=-1:1']: argparse would take '-1:1' for an option."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] in options and i + 1 < len(argv) and argv[i + 1].startswith("-") and ":" in argv[i + 1]:
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(join_negative_values(argv, ("--range", "--yrange")))
    t0 = time.perf_counter()
    try:
        with caller_threads():
            s = run(args)
    except (InputError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    paths = write_all(s, out, figures_too=not args.no_figures)
    origin = s.anchors.get("origin") or next(iter(s.anchors.values()))
    at = surf.values_at(s, origin)
    print(f"{s.info['num_points']} grid points in {s.info['evaluation_seconds']:.1f} s "
          f"({s.info['route']}, {s.info.get('forward', 'eager')} forwards, {s.info['bn_description']}); total {time.perf_counter() - t0:.1f} s")
    print("at " + ("the centre" if s.kind == "around" else next(iter(s.anchors))) + ": " +
          json.dumps({k: round(v, 5) for k, v in at.items()}))
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
