"""`python -m pylandscape plot RUN_DIR`: redraw every figure of a finished run from its saved results.

RUN_DIR/config.json names the experiment; its module's `plot(out_dir)` redraws the figures (the
experiments registry, pylandscape.experiments.load_all). A demo folder also gets its report rewritten.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import demo
from .experiments import load_all
from .experiments.outdir import read_run_info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m pylandscape plot",
        description="Redraw every figure of an experiment's output folder (the --out of "
                    "`python -m pylandscape run NAME` or of `demo`) from its saved results; nothing is "
                    "retrained. Figures go to RUN_DIR/figures/.")
    ap.add_argument("run_dir", metavar="RUN_DIR", help="output folder of a finished run")
    args = ap.parse_args(argv)
    run_dir = Path(args.run_dir)
    try:
        info = read_run_info(run_dir)
        mods = load_all()
        name = info.get("experiment")
        if name not in mods:
            raise ValueError(f"{run_dir / 'config.json'} names experiment {name!r}, which this version does "
                             f"not know (known: {', '.join(mods)})")
        paths = mods[name].plot(run_dir)
        if demo.is_demo_run(info):
            paths.append(demo.write_report(run_dir, None))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
