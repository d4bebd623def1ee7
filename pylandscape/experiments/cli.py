"""`python -m pylandscape run NAME --preset quick|paper --out DIR [--set field=value ...] [--resume]`."""
from __future__ import annotations

import argparse
import sys
import textwrap
import time
from pathlib import Path

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
        results = mod.run(config, out)
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
