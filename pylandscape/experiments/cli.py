"""`python -m pylandscape run NAME --preset quick|paper --out DIR [--set field=value ...] [--resume]`."""
from __future__ import annotations

import argparse
import sys
import textwrap
import time
from pathlib import Path

from ..devices import caller_threads
from ..distributed.executor import EXECUTORS, make_executor, use_executor
from . import load_all
from .config import apply_overrides, describe_fields
from .outdir import log, prepare_out

USAGE = """usage: python -m pylandscape run --list
       python -m pylandscape run NAME --help
       python -m pylandscape run NAME [--preset quick|paper] [--out DIR] [--set field=value ...] [--resume]"""


def _list(mods: dict) -> str:
    lines = ["experiments (python -m pylandscape run NAME --help for details):", ""]
    for name, mod in mods.items():
        lines.append(f"  {name:<20} {mod.FIGURE}")
    lines += ["", "presets: quick (digits, a few minutes on a 2-core CPU, the paper's optimiser at another "
              "learning rate), paper (the paper's protocol on CIFAR-10, GPU; `run NAME --help` quotes the "
              "sentence each follows and lists every choice the paper leaves open), and paper-* variants"]
    return "\n".join(lines)


def _wrap(text: str, indent: str) -> list[str]:
    return textwrap.wrap(text, width=110, initial_indent=indent, subsequent_indent=indent + "  ")


def _preset_help(mod) -> list[str]:
    """Per preset: the fields that differ from `paper`, the paper's words it follows, the choices."""
    paper = mod.PRESETS.get("paper")
    protocols = getattr(mod, "PROTOCOLS", {})
    lines = []
    for pname, cfg in mod.PRESETS.items():
        lines.append(f"preset {pname}:")
        if pname not in ("paper", "quick") and paper is not None:
            diff = [f"{f}={v}" for (f, v), (_, pv) in zip(describe_fields(cfg), describe_fields(paper)) if v != pv]
            lines += _wrap("differs from paper in: " + (", ".join(diff) or "nothing"), "  ")
        proto = protocols.get(pname)
        if proto is not None:
            lines += _wrap(f"follows: {proto.follows}", "  ")
            for c in proto.choices:
                lines += _wrap(f"choice: {c}", "  ")
    return lines


def _parser(name: str, mod) -> argparse.ArgumentParser:
    presets = list(mod.PRESETS)
    quick = mod.PRESETS.get("quick")
    paper = mod.PRESETS.get("paper")
    fields = []
    for (f, q), (_, p) in zip(describe_fields(quick), describe_fields(paper)):
        fields.append(f"  {f:<22} quick: {q:<22} paper: {p}")
    epilog = "\n".join([
        f"reproduces: {mod.FIGURE}", "",
        "config fields (change any with --set field=value; lists as a,b,c):", *fields, "",
        *_preset_help(mod), "",
        "Quotes marked (issue 12) are issue 12's reading of the paper's protocol (the paper's text is not",
        "available offline to verify the wording). The protocol and choices are also in OUT/config.json.", "",
        "output folder: config.json, progress.json, metrics/*.csv|json, stores/ (weight snapshots),",
        "figures/*.png, results.json. Redraw the figures with: python -m pylandscape plot OUT",
        "", "example:",
        f"  python -m pylandscape run {name} --preset quick --out runs/{name}",
    ])
    ap = argparse.ArgumentParser(
        prog=f"python -m pylandscape run {name}", description=mod.DESCRIPTION.strip(), epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=presets, default="quick",
                    help="settings to start from: quick (small, CPU), paper (the paper's protocol, GPU) or a "
                         "paper-* variant (see below) [quick]")
    ap.add_argument("--out", default=None, help=f"output folder [runs/{name}]")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="FIELD=VALUE",
                    help="change one config field (repeatable), e.g. --set epochs=5")
    ap.add_argument("--resume", action="store_true",
                    help="continue an interrupted run in --out; finished parts are skipped")
    ap.add_argument("--device", default=None, help="cpu, cuda, ... (same as --set device=...)")
    # issue 15: independent units (trajectories trained together) as Ray tasks, pylandscape/distributed
    ap.add_argument("--executor", choices=EXECUTORS, default="inprocess",
                    help="inprocess (default) or ray: the trajectories of a multi-trajectory unit run as Ray "
                         "tasks, each a contiguous slice of trajectories (pip install .[ray]); the driver writes "
                         "the output folder; results are bit-identical on CPU with the same thread count")
    ap.add_argument("--address", default=None,
                    help="ray: auto (a running cluster), ray://host:port (Ray Client); default: a local Ray")
    ap.add_argument("--gpus-per-task", type=float, default=0.0,
                    help="ray: GPUs per task, fractional allowed (0.25 = four tasks share a GPU) [0]")
    ap.add_argument("--workers", type=int, default=None,
                    help="ray without --address: CPUs of the local Ray (= concurrent 1-CPU tasks) [all]")
    ap.add_argument("--cpus-per-task", type=float, default=1.0,
                    help="ray: CPUs per task, also its torch threads (bit-identical to an in-process run with "
                         "that many threads) [1]")
    ap.add_argument("--unit-size", type=int, default=None,
                    help="ray: trajectories per task (trained in lockstep); default: the trajectories spread "
                         "evenly over the cluster's task slots (one task per slot), which pays a task's start "
                         "once per slice; smaller slices balance uneven workers and lose less to a failure")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    mods = load_all()
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE + "\n\n" + _list(mods))
        return 0
    if argv[0] in ("--list", "-l", "list"):
        print(_list(mods))
        return 0
    name, rest = argv[0], argv[1:]
    if name not in mods:
        alt = name.replace("_", "-")
        if alt in mods:
            name = alt
        else:
            print(f"error: unknown experiment {name!r}; known: {', '.join(mods)}", file=sys.stderr)
            return 2
    mod = mods[name]
    args = _parser(name, mod).parse_args(rest)
    config = mod.PRESETS[args.preset]
    sets = list(args.sets) + ([f"device={args.device}"] if args.device else [])
    try:
        config = apply_overrides(config, sets)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out or f"runs/{name}")
    t0 = time.perf_counter()
    log(f"{name} ({mod.FIGURE}), preset {args.preset}, output {out}")
    try:
        prepare_out(out, name, config, preset=args.preset, resume=args.resume,
                    protocol=getattr(mod, "PROTOCOLS", {}).get(args.preset), overrides=sets)
        executor = make_executor(args.executor, address=args.address, gpus_per_task=args.gpus_per_task,
                                 num_cpus=args.workers, cpus_per_task=args.cpus_per_task, unit_size=args.unit_size)
        try:
            with use_executor(executor), caller_threads():
                results = mod.run(config, out)
        finally:
            executor.close()
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log(f"{name} finished in {time.perf_counter() - t0:.1f} s; results in {out}")
    for k, v in (results or {}).items():
        if isinstance(v, (int, float, str)) or v is None:
            print(f"  {k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
