"""The command line: python -m pylandscape.mds --snapshots DIR [--layer ...] [--select ...]."""
from __future__ import annotations

import argparse
import sys
import warnings

from ..snapshots import open_source, select_tensors
from .dissimilarity import METRICS
from .estimator import SOLVERS
from .pipeline import embed
from .solvers import DENSE_MAX_N

EPILOG = """\
examples:
  python -m pylandscape.mds --snapshots ckpts/
      all parameters, 1 - cos (the paper's metric), 2-D map in ./mds_out/
  python -m pylandscape.mds --snapshots ckpts/ --layer 2 --annotate train_error
      only the paper's layer 2 (the first conv/linear module: its weight and bias)
  python -m pylandscape.mds --snapshots runs/sgd --layer 'features.0.*' --select 'stage >= 5'
  python -m pylandscape.mds --snapshots ckpts/ --group-by '(?P<traj>seed\\d+)/.*?(?P<step>\\d+)\\.pt$'

input: every .pt/.pth/.ckpt/.safetensors/.npz file below --snapshots (state_dicts, also nested under
"state_dict" or "model" as Lightning saves them) and pylandscape stores. Files are never unpickled
beyond tensors. Folder = trajectory, last number in the file name = step (override with --group-by).
BatchNorm running statistics are not weights and are skipped.

outputs in --out: mds.csv (path, x, y[, z | x1..xk], metadata), mds.png (or --format), mds.json
(eigenvalues, captured share, timings) and mds.html (hover a point to see its file and errors).
The per-tensor Gram is cached in <snapshots>/.pylandscape-cache/, so re-running with another --layer,
--metric, --select or --trajectory takes well under a second.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pylandscape.mds",
        description="Classical MDS of a folder of checkpoints: a 2-D map of where training went in "
                    "weight space (Liao & Poggio's Figs. 3, 8-13).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--snapshots", required=True, metavar="DIR",
                   help="folder (searched recursively) or single store of checkpoints")
    p.add_argument("--layer", default=None,
                   help="which weights: a name glob ('conv1.*', 'features.0.weight', comma-separated for "
                        "several) or the paper's layer number ('2' or 'layer2' = first conv/linear module; "
                        "layer 1 is the input). Default: all parameters")
    p.add_argument("--metric", choices=METRICS, default="cosine",
                   help="cosine: 1 - cos (the paper's, default); chordal: sqrt(2(1 - cos)) = PCA of "
                        "normalised weights; euclidean: ||w_i - w_j|| = PCA of the weights")
    p.add_argument("--dims", type=int, default=2, help="number of MDS dimensions (default 2)")
    p.add_argument("--select", default=None,
                   help="filter on metadata, e.g. 'stage >= 5', 'epoch < 100 and trajectory in (a, b)'")
    p.add_argument("--trajectory", action="append", default=None, metavar="NAME",
                   help="only this trajectory (repeat for several)")
    p.add_argument("--group-by", default=None, metavar="REGEX",
                   help="regex on the relative path with named groups 'traj' (and 'step') "
                        "that defines trajectories and time order")
    p.add_argument("--out", default="mds_out", metavar="DIR", help="output folder (default ./mds_out)")
    p.add_argument("--format", default="png", choices=("png", "svg", "pdf"),
                   help="also write the figure as mds.svg or mds.pdf (mds.png is always written)")
    p.add_argument("--annotate", default="epoch",
                   help="label points with this metadata column: epoch (default), train_error, step, none")
    p.add_argument("--title", default=None, help="figure title (default: what is shown)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="where the Gram and eigensolver run (auto: CUDA when available)")
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="bound on the weights held in memory at once, e.g. 4G (default: half the free RAM)")
    p.add_argument("--solver", default="auto", choices=SOLVERS,
                   help=f"eigensolver: dense for N <= {DENSE_MAX_N}, iterative (Lanczos) above (auto)")
    p.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="where to cache the Gram (default <snapshots>/.pylandscape-cache)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the Gram cache")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip unreadable, mismatched or non-finite checkpoints with a warning")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def say(msg: str) -> None:
        print(msg, file=sys.stderr)

    try:
        if args.dims < 1:
            raise ValueError(f"--dims must be >= 1, got {args.dims}")
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = lambda m, *a, **k: say(f"warning: {m}")
            sset = open_source(args.snapshots, group_by=args.group_by, skip_bad=args.skip_bad)
            idx = select_tensors(sset.spec, args.layer)
            sizes = sset.spec.sizes
            names = [sset.spec.names[i] for i in idx]
            shown = ", ".join(f"{sset.spec.names[i]} {list(sset.spec.shapes[i])}" for i in idx[:12])
            say(f"{len(sset)} snapshots in {len({str(m.get('trajectory')) for m in sset.meta})} "
                f"trajectories; tensors used ({len(names)}, {sum(sizes[i] for i in idx):,} params): "
                f"{shown}{' ...' if len(idx) > 12 else ''}")
            for s in sset.skipped:
                say(f"note: {s}")
            cols = {k for m in sset.meta for k in m}
            if args.annotate not in ("none", "") and args.annotate not in cols:
                say(f"warning: --annotate {args.annotate}: no such metadata column (have "
                    f"{', '.join(sorted(cols))}); points are not labelled")
                args.annotate = "none"
            res = embed(sset, layer=args.layer, metric=args.metric, dims=args.dims, select=args.select,
                        trajectory=args.trajectory, out_dir=args.out, annotate=args.annotate,
                        title=args.title, device=args.device, solver=args.solver,
                        cache=not args.no_cache, cache_dir=args.cache_dir, max_memory=args.max_memory,
                        progress=False if args.no_progress else None,
                        formats=tuple(dict.fromkeys(("png", args.format))),
                        skip_bad=args.skip_bad)
    except (ValueError, FileNotFoundError, OSError, KeyError) as e:
        if args.debug:
            raise
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if isinstance(e, KeyError):
            msg = str(e.args[0]) if e.args else msg
        say(f"error: {msg}")
        return 2
    ev = ", ".join(f"{v:.4g}" for v in res.eigenvalues[:args.dims])
    say(f"MDS ({res.metric}, {res.solver} solver) of {res.n} snapshots x {res.n_params:,} params: "
        f"eigenvalues {ev}; {100 * res.captured:.1f}% of positive mass captured, "
        f"negative mass {100 * res.negative_mass:.1f}%")
    t = res.timings
    say(f"time: gram {t.get('gram', 0):.2f}s (cache {t.get('cache')}), mds {t.get('mds', 0):.3f}s, "
        f"outputs {t.get('outputs', 0):.2f}s, total {t.get('total', 0):.2f}s")
    say(f"wrote {', '.join(sorted(res.files.values()))}")
    return 0

