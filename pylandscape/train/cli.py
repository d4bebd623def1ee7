"""`python -m pylandscape train` (also `python -m pylandscape.train`): train and record snapshots."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

from ..data import DATASETS, load_dataset
from ..flat import load_flat_
from ..models import ACTIVATIONS, dcnn
from ..store import SnapshotStore, atomic_write_json
from .config import GD_DEFAULT_LR, TRAIN_MANY_ROUTES, TrainConfig
from .loop import init_flats_for, train, train_many


def _int_list(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if ":" in part:  # start:stop[:step], stop inclusive
            a = [int(v) for v in part.split(":")]
            out.extend(range(a[0], a[1] + 1, a[2] if len(a) > 2 else 1))
        else:
            out.append(int(part))
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pylandscape train",
        description="Train the paper's network (Liao & Poggio: five stride-2 3x3 convolutions, BatchNorm "
                    "without affine parameters, 188,810 weights) and record weight snapshots into a store "
                    "folder that `python -m pylandscape mds` and the experiments read.",
        epilog="examples:\n"
               "  python -m pylandscape train --epochs 5 --out runs/sgd          # SGD on the embedded digits\n"
               "  python -m pylandscape train --optimizer gd --lr 0.3 --epochs 30 --out runs/gd\n"
               "  python -m pylandscape train --trajectories 8 --epochs 3 --out runs/k8   # 8 at once\n"
               "  python -m pylandscape train --out runs/sgd --epochs 5 --resume   # continue a killed run",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--data", default="digits", choices=DATASETS,
                   help="digits: embedded 1,797 handwritten digits resized to 3x32x32 (default); "
                        "cifar10: needs the cifar-10-batches-py folder under --root")
    d.add_argument("--root", default=None, help="CIFAR-10 location (default $PYLANDSCAPE_DATA or ~/.cache/pylandscape)")
    d.add_argument("--download", action="store_true", help="cifar10: fetch the official tarball (needs a network)")
    d.add_argument("--train-size", type=int, default=None, help="stratified training subset of this size")
    d.add_argument("--random-labels", action="store_true", help="train on uniformly random labels")
    d.add_argument("--random-inputs", action="store_true", help="Gaussian noise images (implies --random-labels)")
    d.add_argument("--data-seed", type=int, default=0, help="seed of the subset / random labels / random inputs")
    m = p.add_argument_group("model")
    m.add_argument("--width", type=float, default=1.0, help="multiplier of the hidden widths (1 = 188,810 weights)")
    m.add_argument("--activation", default="relu", help=f"one of {ACTIVATIONS} (poly = polynomial fit of ReLU)")
    m.add_argument("--poly-degree", type=int, default=2)
    m.add_argument("--poly-interval", type=float, nargs=2, default=(-3.0, 3.0), metavar=("LOW", "HIGH"))
    m.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    o = p.add_argument_group("optimisation")
    o.add_argument("--optimizer", default="sgd", help="sgd (minibatches) or gd (full-batch gradient descent)")
    o.add_argument("--lr", type=float, default=None,
                   help=f"learning rate (default 0.01 for sgd, {GD_DEFAULT_LR} for gd)")
    o.add_argument("--batch-size", type=int, default=100)
    o.add_argument("--momentum", type=float, default=0.0)
    o.add_argument("--weight-decay", type=float, default=0.0)
    o.add_argument("--epochs", type=int, default=10)
    o.add_argument("--chunk-size", type=int, default=None, help="gd: examples per forward pass (default: all)")
    o.add_argument("--device", default="cpu")
    r = p.add_argument_group("trajectories and output")
    r.add_argument("--seed", type=int, default=0, help="first seed: trajectory k uses seed+k for init and data order")
    r.add_argument("--seeds", default=None, help="explicit comma-separated seeds, one per trajectory")
    r.add_argument("--trajectories", "-K", type=int, default=1, help="K trajectories trained at once")
    r.add_argument("--route", default="auto", choices=TRAIN_MANY_ROUTES,
                   help="how K trajectories run: grouped (one wide grouped-convolution network) or loop "
                        "(K models in lockstep, bit-identical to K single runs); auto = grouped on CUDA, "
                        "loop on CPU")
    r.add_argument("--same-init", action="store_true", help="all trajectories start from the init of the first seed")
    r.add_argument("--out", default=None, help="store folder for snapshots (created); none = no snapshots")
    r.add_argument("--run", default=None, help="run name recorded in every snapshot's metadata")
    r.add_argument("--snapshot-epochs", default=None,
                   help="e.g. '0,1,2,5:50:5' (start:stop:step, inclusive); default every epoch and 0")
    r.add_argument("--eval-every", type=int, default=1)
    r.add_argument("--eval-bn", default="reestimate", help="BatchNorm stats for the records: reestimate or keep")
    r.add_argument("--resume", action="store_true", help="continue the run stored in --out from its last snapshot")
    r.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    """`python -m pylandscape train`: see --help."""
    args = _parser().parse_args(argv)
    try:
        if args.trajectories < 1:
            raise ValueError(f"--trajectories must be >= 1, got {args.trajectories}")
        seeds = (_int_list(args.seeds) if args.seeds else [args.seed + k for k in range(args.trajectories)])
        if len(seeds) != args.trajectories:
            raise ValueError(f"--seeds lists {len(seeds)} seeds for --trajectories {args.trajectories}")
        if args.resume and not args.out:
            raise ValueError("--resume needs --out (the store of the interrupted run)")
        lr = args.lr if args.lr is not None else (GD_DEFAULT_LR if args.optimizer == "gd" else 0.01)
        cfg = TrainConfig(optimizer=args.optimizer, lr=lr, batch_size=args.batch_size, momentum=args.momentum,
                          weight_decay=args.weight_decay, epochs=args.epochs, seed=seeds[0],
                          snapshot_epochs=_int_list(args.snapshot_epochs) if args.snapshot_epochs else None,
                          eval_every=args.eval_every, chunk_size=args.chunk_size, device=args.device,
                          eval_bn=args.eval_bn)
        dtype = torch.float64 if args.dtype == "float64" else torch.float32
        data = load_dataset(args.data, args.root, train_size=args.train_size,
                            labels="random" if (args.random_labels or args.random_inputs) else "true",
                            inputs="random" if args.random_inputs else "real", seed=args.data_seed,
                            device=args.device, dtype=dtype, download=args.download)

        def model_fn() -> nn.Module:
            return dcnn(args.width, data.in_channels, data.num_classes, data.image_size, args.activation,
                        args.poly_degree, tuple(args.poly_interval)).to(dtype)

        model_fn()  # validates the model options before anything is written
        inits = init_flats_for(model_fn, [seeds[0]] * len(seeds) if args.same_init else seeds).to(dtype)
        extra = {"run": args.run} if args.run else {}
        metas = [{**extra, "trajectory": k} for k in range(len(seeds))]
        t0 = time.perf_counter()
        if len(seeds) == 1:
            model = model_fn()
            load_flat_(model, inits[0])
            hists = [train(model, data, cfg, store=args.out, meta=metas[0], resume=args.resume,
                           progress=not args.no_progress)]
        else:
            hists = train_many(model_fn, inits, data, cfg, seeds=seeds, store=args.out, metas=metas,
                               resume=args.resume, progress=not args.no_progress, route=args.route)
        wall = time.perf_counter() - t0
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for k, h in enumerate(hists):
        last = h[-1]
        print(f"trajectory {k} (seed {seeds[k]}): epoch {last['epoch']} step {last['step']}  "
              f"train error {last['train_error']:.4f} loss {last['train_loss']:.4f}  "
              f"test error {last['test_error']:.4f} loss {last['test_loss']:.4f}")
    if args.out:
        atomic_write_json(Path(args.out) / "train_history.json",
                          {"config": cfg.to_json(), "seeds": seeds, "args": vars(args), "histories": hists})
        print(f"{len(SnapshotStore(args.out))} snapshots in {args.out} ({wall:.1f} s)")
    return 0
