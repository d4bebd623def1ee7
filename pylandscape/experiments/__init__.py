"""The paper's experiments, one module each, run by `python -m pylandscape run NAME`.

Every experiment module defines:
    NAME: str                     command name, e.g. "sgd-stages"
    FIGURE: str                   what it reproduces, e.g. "Liao & Poggio Fig. 3, 8-13"
    DESCRIPTION: str              a few sentences for --help
    Config                        a dataclass; its defaults are the paper's settings
    PRESETS: dict[str, Config]    at least "paper" and "quick" (digits, minutes on a 2-core CPU)
    PROTOCOLS: dict[str, Protocol] (optional) per preset: the paper's sentence it follows and the
                                  choices made where the paper is silent (config.Protocol)
    run(config, out_dir: Path) -> dict     writes snapshots, metrics (CSV + JSON) and figures; resumable
    plot(out_dir: Path) -> list[Path]      redraws the figures from saved results only
"""
from __future__ import annotations

import importlib

# Adding an experiment: write a module with the names above and list it here.
MODULES = (
    "sgd_stages", "bgd_branches", "perturb_retrain", "agreement", "interpolate", "polynomial",
    "overparam", "random_labels", "minimum_dimension", "activation_regions", "feature_rank",
)


def load_all() -> dict:
    """name -> module for every experiment module that imports."""
    out = {}
    for m in MODULES:
        try:
            mod = importlib.import_module(f"{__name__}.{m}")
        except ModuleNotFoundError as e:
            if e.name == f"{__name__}.{m}":
                continue
            raise
        out[mod.NAME] = mod
    return out
