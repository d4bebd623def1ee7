"""`python -m pylandscape COMMAND ...` (also installed as the `pylandscape` console script)."""
from __future__ import annotations

import importlib
import sys

from . import __version__, has_cuda_kernels, has_extension

COMMANDS = {
    "demo": ("pylandscape.demo", "train on digits, perturb, average, embed with MDS, write a report (~5 min on CPU)"),
    "run": ("pylandscape.experiments.cli", "run one of the paper's experiments (`run --list` lists them)"),
    "train": ("pylandscape.train.cli", "train the paper's network and record snapshots into a store"),
    "mds": ("pylandscape.mds", "classical MDS of a folder of checkpoints (same as python -m pylandscape.mds)"),
    "plot": ("pylandscape.plot", "redraw every figure of an experiment's output folder"),
}


def _usage() -> str:
    lines = ["usage: python -m pylandscape COMMAND [options]   (COMMAND --help for details)", "", "commands:"]
    lines += [f"  {name:<6} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "start here:  python -m pylandscape demo"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"pylandscape {__version__} (compiled kernels: {has_extension()}, CUDA kernels: {has_cuda_kernels()})")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
