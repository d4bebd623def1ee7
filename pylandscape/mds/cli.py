"""The command line: python -m pylandscape.mds --snapshots DIR [--layer ...] [--select ...]."""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from ..snapshots import open_source, select_tensors
from . import gram_cache
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
  python -m pylandscape.mds cache --list        (or --clear): the Gram cache

input: every .pt/.pth/.ckpt/.bin/.pth.tar/.safetensors/.npz file below --snapshots (state_dicts, also
nested under "state_dict", "model" or "module") and pylandscape stores. Run layouts understood:
HF Trainer output_dir (checkpoint-N/ + trainer_state.json), accelerate save_state (checkpoint_N/),
Lightning ModelCheckpoint (epoch=E-step=S.ckpt, last.ckpt), torchvision references (model_E.pth,
checkpoint.pth), timm (checkpoint-E.pth.tar, last/model_best.pth.tar), DeepSpeed global_stepN/,
Megatron iter_N/. A numbered checkpoint folder is one point of the run in the folder above it; the
epoch/step a file records (or trainer_state.json) is preferred to the one in its name (csv column
time_source). Optimizer, scheduler, RNG and training-argument files are skipped with one summary
line. Snapshots with identical weights (last.ckpt, model_best, a final save) are drawn once; the
csv's "aliases" column lists the copies. Files are never unpickled beyond tensors and a short
allow-list of plain data (argparse.Namespace, paths, numpy arrays). BatchNorm running statistics
are not weights and are skipped.

outputs in --out: mds.csv (path, x, y[, z | x1..xk], metadata), mds.png (or --format), mds.json
(eigenvalues, captured share, timings) and mds.html (hover a point to see its file and errors).
The per-tensor Gram is cached in $XDG_CACHE_HOME/pylandscape (default ~/.cache/pylandscape; never in
--snapshots), so re-running with another --layer, --metric, --select or --trajectory reads no
weights. See it with `python -m pylandscape.mds cache --list`, empty it with `cache --clear`.
"""

CACHE_EPILOG = """\
The Gram cache holds one file per set of snapshots (per-tensor Grams, float64 [L, N, N]) in
$PYLANDSCAPE_CACHE_DIR, else $XDG_CACHE_HOME/pylandscape, else ~/.cache/pylandscape. Files written by
another version of the Gram algorithm are never reused; the least recently used files are removed when
the folder exceeds --cache-max of the main command (default 4G).
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
                   help="regex searched in each checkpoint's path relative to --snapshots ('/' separators, "
                        "e.g. 'seed1/checkpoint-500/model.safetensors'); named groups 'traj' (and 'step') "
                        "define runs and time order; paths it does not match are left out with a note")
    p.add_argument("--out", default="mds_out", metavar="DIR", help="output folder (default ./mds_out)")
    p.add_argument("--format", default="png", choices=("png", "svg", "pdf"),
                   help="also write the figure as mds.svg or mds.pdf (mds.png is always written)")
    p.add_argument("--annotate", default="label",
                   help="label points with this metadata column: label (default: epoch, else step, else "
                        "file name), epoch, step, train_error, ..., or none")
    p.add_argument("--title", default=None, help="figure title (default: what is shown)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="where the Gram and eigensolver run (auto: CUDA when available)")
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="bound on the weights held in memory at once, e.g. 4G (default: half the free RAM)")
    p.add_argument("--solver", default="auto", choices=SOLVERS,
                   help=f"eigensolver: dense for N <= {DENSE_MAX_N}, iterative (Lanczos) above (auto)")
    p.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="where to cache the Gram (default $XDG_CACHE_HOME/pylandscape or "
                        "~/.cache/pylandscape)")
    p.add_argument("--cache-max", default=None, metavar="SIZE",
                   help="size limit of the cache folder, least recently used files removed first "
                        "(default 4G)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the Gram cache")
    p.add_argument("--keep-copies", action="store_true",
                   help="draw snapshots with identical weights (last.ckpt, model_best, ...) separately")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip unreadable, mismatched or non-finite checkpoints with a warning")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def build_cache_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pylandscape.mds cache",
                                description="Show or empty the Gram cache of python -m pylandscape.mds.",
                                epilog=CACHE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group()
    what.add_argument("--list", action="store_true", help="list the cache files (the default)")
    what.add_argument("--clear", action="store_true", help="remove every cache file")
    p.add_argument("--cache-dir", default=None, metavar="DIR", help="another cache folder")
    return p


def cache_main(argv: list[str]) -> int:
    args = build_cache_parser().parse_args(argv)
    d = Path(args.cache_dir) if args.cache_dir else gram_cache.default_dir()
    if not d.is_dir():
        print(f"Gram cache {d}: empty (no such folder)")
        return 0
    if args.clear:
        n, size = gram_cache.clear(d)
        print(f"Gram cache {d}: removed {n} file(s), {size / 2**20:.1f} MiB")
        return 0
    print(gram_cache.describe(d))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["cache"]:
        return cache_main(argv[1:])
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
                        skip_bad=args.skip_bad, cache_max=args.cache_max,
                        copies="keep" if args.keep_copies else "auto")
            for s in res.notes:
                say(f"note: {s}")
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

