"""Data, model, training and evaluation in the forms the experiments use (one call per unit of work)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import torch

from ..data import load_dataset
from ..devices import resolve_device
from ..distributed.executor import current_executor, train_units
from ..evaluate import evaluate_many
from ..flat import ParamSpec, flatten_module, load_flat_
from ..models import biases_before_batchnorm, dcnn
from ..store import SnapshotStore
from ..train import TrainConfig, train, train_many
from .outdir import Progress, fresh_store, log


def set_threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(int(n))


def generator(seed: int) -> torch.Generator:
    """A CPU torch.Generator seeded with `seed`."""
    g = torch.Generator()
    g.manual_seed(int(seed))
    return g


_UNSET = object()


def load_data(config: Any, *, labels: str = "true", inputs: str = "real", seed: int | None = None,
              train_size: Any = _UNSET):
    """The config's data set (fields dataset, data_root, train_size, seed, device)."""
    n = getattr(config, "train_size", None) if train_size is _UNSET else train_size
    return load_dataset(config.dataset, getattr(config, "data_root", None), train_size=n, labels=labels, inputs=inputs,
                        seed=config.seed if seed is None else seed,
                        device=str(resolve_device(getattr(config, "device", "cpu"))))


def model_fn(config: Any, data, *, width: float | None = None, activation: str | None = None,
             poly_degree: int | None = None, **dcnn_kw: Any):
    """A zero-argument constructor of the paper's network shaped for `data` (for train_many).

    Uses the config's width, widths (None: models.DCNN_WIDTHS), activation and poly_degree when it has
    them; dcnn_kw go to models.dcnn as they are."""
    x = data.x_train
    w = config.width if width is None else width
    act = activation or getattr(config, "activation", "relu")
    deg = poly_degree or getattr(config, "poly_degree", 2)
    device = str(resolve_device(getattr(config, "device", "cpu")))
    kw = {"widths": getattr(config, "widths", None), **dcnn_kw}

    def make():
        return dcnn(width=w, in_channels=int(x.shape[1]), num_classes=int(data.num_classes),
                    image_size=int(x.shape[-1]), activation=act, poly_degree=deg, **kw).to(device)
    return make


def frozen_biases(config: Any, make) -> list[str]:
    """The biases a BatchNorm cancels (no gradient), unless config.pre_bn_biases keeps them in."""
    return [] if getattr(config, "pre_bn_biases", False) else biases_before_batchnorm(make())


def init_flat(make, seed: int):
    """(model, flat [P], spec) of a freshly initialised network, reproducible from `seed`."""
    torch.manual_seed(int(seed))
    model = make()
    flat, spec = flatten_module(model)
    return model, flat.clone(), spec


class Start(NamedTuple):
    """What a training experiment's run() starts from."""
    out: Path
    prog: Progress
    data: Any
    make: Any
    flat0: torch.Tensor
    spec: ParamSpec
    frozen: list[str]


def start(config: Any, out_dir) -> Start:
    """Threads, output folder progress, data, model factory, the seeded initial weights and the biases a
    BatchNorm cancels, in this order (the order fixes the random streams, so runs stay bit-identical)."""
    set_threads(config.threads)
    out = Path(out_dir)
    prog = Progress(out)
    data = load_data(config)
    make = model_fn(config, data)
    _, flat0, spec = init_flat(make, config.seed)
    return Start(out, prog, data, make, flat0, spec, frozen_biases(config, make))


def train_config(config: Any, **kw: Any):
    """A TrainConfig from the experiment's config fields of the same name, updated with kw."""
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    base = {n: getattr(config, n) for n in names if hasattr(config, n) and n not in kw}
    base.update(kw)
    base["device"] = str(resolve_device(base.get("device", "cpu")))
    if isinstance(base.get("snapshot_epochs"), tuple):
        base["snapshot_epochs"] = list(base["snapshot_epochs"])
    return TrainConfig(**base)


def evaluate_flats(make, flats: torch.Tensor, data, *, test: bool = True) -> dict[str, list[float]]:
    """Train (and test) error and loss of K weight vectors [K, P] in one batch, BatchNorm re-estimated
    on the training set for each vector."""
    model = make()
    flats = flats.to(next(model.parameters()).device)
    out = {}
    err, loss = evaluate_many(model, flats, data.x_train, data.y_train, bn="reestimate", bn_x=data.x_train)
    out["train_error"], out["train_loss"] = err.tolist(), loss.tolist()
    if test:
        err, loss = evaluate_many(model, flats, data.x_test, data.y_test, bn="reestimate", bn_x=data.x_train)
        out["test_error"], out["test_loss"] = err.tolist(), loss.tolist()
    return out


def run_train(make, start: torch.Tensor, data, tconfig, store_path: Path, *, meta: dict,
              resume: bool, info: Mapping[str, Any] | None = None) -> list[dict]:
    """Train one model from `start` into the store at store_path, continuing it when it exists."""
    model = make()
    load_flat_(model, start.to(next(model.parameters()).device))
    spec = ParamSpec.from_module(model)
    store_path = Path(store_path)
    if resume and SnapshotStore.is_store(store_path):
        store = SnapshotStore(store_path, spec)
    else:
        store = fresh_store(store_path, spec, info)
        resume = False
    return train(model, data, tconfig, store=store, meta=meta, resume=resume, progress=False)


def run_train_many(make, starts: torch.Tensor, data, tconfig, store_path: Path, *, seeds: list[int],
                   metas: list[dict], resume: bool, spec, info: Mapping[str, Any] | None = None):
    """K trajectories at once into one store (continued when it exists)."""
    store_path = Path(store_path)
    if resume and SnapshotStore.is_store(store_path):
        store = SnapshotStore(store_path, spec)
    else:
        store = fresh_store(store_path, spec, info)
        resume = False
    executor = current_executor()  # hook (issue 15): `run NAME --executor ray`, pylandscape/distributed
    if executor is not None and executor.name != "inprocess":
        return train_units(executor, make, starts, data, tconfig, store, seeds=seeds, metas=metas)
    return train_many(make, starts, data, tconfig, seeds=seeds, store=store, metas=metas, resume=resume,
                      progress=False)


def run_train_to_zero(make, start: torch.Tensor, data, tconfig: TrainConfig, store_path: Path, *, meta: dict,
                      max_epochs: int, name: str, warn_if_longer: bool = True) -> tuple[list[dict], int | None]:
    """Train at least tconfig.epochs, then on until the training error is zero (evaluated after every
    epoch from tconfig.epochs on; TrainConfig.stop_at_zero_error_from) or max_epochs is reached; say so
    loudly when tconfig.epochs was not enough (warn_if_longer=False: tconfig.epochs is only a start).
    Resumable like run_train. Returns (history, first evaluated epoch with zero training error or None)."""
    tc = dataclasses.replace(tconfig, epochs=max_epochs, stop_at_zero_error_from=tconfig.epochs)
    hist = run_train(make, start, data, tc, store_path, meta=meta, resume=True)
    zero = next((r["epoch"] for r in hist if r["train_error"] == 0), None)
    end = hist[-1]
    if warn_if_longer and end["epoch"] > tconfig.epochs:
        log(f"WARNING: {name}: training error was not zero after {tconfig.epochs} epochs; trained on to epoch "
            f"{end['epoch']}")
    if end["train_error"] != 0:
        log(f"WARNING: {name}: training error still {end['train_error']:.4f} after {max_epochs} epochs "
            f"(the cap): NOT at zero training error")
    else:
        log(f"{name}: zero training error at epoch {end['epoch']} (first reached at epoch {zero})")
    return hist, zero
