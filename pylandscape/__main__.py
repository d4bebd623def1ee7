"""`python -m pylandscape COMMAND ...` (also installed as the `pylandscape` console script)."""
from __future__ import annotations

import gc
import importlib
import sys

from . import __version__, has_cuda_kernels, has_extension
from ._program import end_process

COMMANDS = {
    "demo": ("pylandscape.demo", "train on digits, perturb, average, embed with MDS, write a report (~5 min on CPU)"),
    "run": ("pylandscape.experiments.cli", "run one of the paper's experiments (`run --list` lists them)"),
    "train": ("pylandscape.train.cli", "train the paper's network and record snapshots into a store"),
    "mds": ("pylandscape.mds", "classical MDS of a folder of checkpoints (same as python -m pylandscape.mds)"),
    "surface": ("pylandscape.landscape.surface_cli", "loss surface around a model or through 2-3 models (Li et al. 2018)"),
    "hessian": ("pylandscape.landscape.hessian_cli", "Hessian top eigenvalues, trace and spectral density, per layer"),
    "plot": ("pylandscape.plot", "redraw every figure of an experiment's (or surface/hessian) output folder"),
}


def _usage() -> str:
    lines = ["usage: python -m pylandscape COMMAND [options]   (COMMAND --help for details)", "", "commands:"]
    lines += [f"  {name:<7} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "start here:  python -m pylandscape demo"]
    return "\n".join(lines)


def main(argv: list[str] | None = None, *, freeze: bool = False) -> int:
    """freeze: as a program (console() and python -m), the imports' objects go to the collector's
    permanent generation, which the interpreter's collections at exit skip (see pylandscape/mds/__main__.py)."""
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
    if freeze:
        gc.freeze()
    return int(module.main(rest) or 0)


def console() -> int:
    """The `pylandscape` console script (ends the process: _program.end_process)."""
    end_process(main(freeze=True))
    return 0  # not reached


if __name__ == "__main__":
    end_process(main(freeze=True))
