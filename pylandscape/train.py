"""Trainers that record weight trajectories: SGD and full-batch GD, one or K trajectories at once.

Snapshots go to a SnapshotStore. With each snapshot the full training state (weights, BatchNorm
statistics, optimizer state, data-order generators, history) is saved atomically in one file
`<store>/resume*.safetensors`, so a run killed at any moment resumes from its last snapshot and
continues bit-identically (on CPU) without duplicating or losing snapshots: a snapshot that was
written just before a kill is recognised by its (run, stage, trajectory, epoch, step) and not written
again (it is identical, the rerun being bit-identical).

Data order comes from explicit torch.Generators (one per trajectory), never the global RNG.

Command line: python -m pylandscape train --help
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from .data import DATASETS, Dataset, load_dataset
from .evaluate import (BN_MODES, grouped_metrics, model_metrics, prepare_copy, reestimate_grouped_bn_)
from .flat import ParamSpec, flatten_module, load_flat_
from .models import ACTIVATIONS, GroupedNet, count_parameters, dcnn
from .store import SnapshotStore, atomic_save_safetensors, atomic_write_json

OPTIMIZERS = ("sgd", "gd")
# Full-batch GD on digits (width 1, seed 0, one chunk): lr 0.3 reaches zero training error at epoch 28,
# lr 0.1 at epoch 47, lr 1.0 diverges (train error still 50% after 12 epochs). Measured 2026-11-23.
GD_DEFAULT_LR = 0.3
RESUME_KEY = "pylandscape_resume"
# Config fields that may differ when resuming (more epochs, another device, finer logging).
RESUMABLE_CHANGES = ("epochs", "device", "eval_every", "eval_batch_size")
IDENTITY_FIELDS = ("run", "stage", "trajectory")
# How train_many runs K models: "grouped" (one GroupedNet: grouped convolutions, one wide network),
# "loop" (K models in lockstep; bit-identical to train()); "auto": grouped on CUDA, loop on CPU.
TRAIN_MANY_ROUTES = ("auto", "loop", "grouped")


@dataclass
class TrainConfig:
    """Training settings; the defaults are the paper's SGD (lr 0.01, batch 100, no momentum).

    optimizer: "sgd" (minibatches of batch_size in a fresh random order each epoch; a last smaller
        batch when batch_size does not divide N) or "gd" (full-batch gradient descent: one step per
        epoch with the exact gradient of the mean loss over the whole training set, accumulated over
        chunks of chunk_size examples; chunk_size=None = one chunk. BatchNorm normalises each chunk
        with that chunk's own statistics, so with several chunks the "full batch" net is a per-chunk
        BN net; use one chunk for the true full-batch network).
    snapshot_epochs: epochs after which a snapshot is written (None = every epoch, plus epoch 0 = the
        initial weights). snapshot_steps: also snapshot after these global steps.
    eval_every: record train/test error and loss every this many epochs (snapshot epochs, epoch 0 and
        the last epoch always are).
    eval_bn: BatchNorm statistics for those records: "reestimate" (exact, on the training set, see
        pylandscape.evaluate) or "keep" (the running averages of training).
    eval_batch_size: images per forward pass in evaluation (None = the whole set when N <= 2000,
        else 1000).
    seed: data-order seed of train() (train_many takes one seed per trajectory instead).
    """

    optimizer: str = "sgd"
    lr: float = 0.01
    batch_size: int = 100
    momentum: float = 0.0
    weight_decay: float = 0.0
    epochs: int = 10
    seed: int = 0
    snapshot_epochs: Sequence[int] | None = None
    snapshot_steps: Sequence[int] | None = None
    eval_every: int = 1
    chunk_size: int | None = None
    device: str = "cpu"
    eval_bn: str = "reestimate"
    eval_batch_size: int | None = None

    def __post_init__(self):
        self.validate()

    def validate(self) -> "TrainConfig":
        """Raise ValueError naming the first bad field."""
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        for name in ("lr", "momentum", "weight_decay"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        for name in ("batch_size", "eval_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if not isinstance(self.epochs, int) or self.epochs < 0:
            raise ValueError(f"epochs must be an integer >= 0, got {self.epochs!r}")
        for name in ("chunk_size", "eval_batch_size"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be None or an integer >= 1, got {v!r}")
        if self.snapshot_epochs is not None:
            if any(int(e) != e or e < 0 for e in self.snapshot_epochs):
                raise ValueError(f"snapshot_epochs must be integers >= 0, got {list(self.snapshot_epochs)}")
        if self.snapshot_steps is not None:
            if any(int(s) != s or s < 1 for s in self.snapshot_steps):
                raise ValueError(f"snapshot_steps must be integers >= 1, got {list(self.snapshot_steps)}")
        if self.eval_bn not in BN_MODES:
            raise ValueError(f"eval_bn must be one of {BN_MODES}, got {self.eval_bn!r}")
        return self

    def to_json(self) -> dict:
        d = asdict(self)
        for k in ("snapshot_epochs", "snapshot_steps"):
            if d[k] is not None:
                d[k] = sorted(int(v) for v in d[k])
        return d


# --------------------------------------------------------------------------------------------- runners
class _SingleRunner:
    """One model as it is (the reference semantics)."""

    def __init__(self, model: nn.Module):
        self.model, self.K = model, 1

    def parameters(self) -> list[torch.Tensor]:
        return list(self.model.parameters())

    def module(self) -> nn.Module:
        return self.model

    def minibatch_loss(self, x, y, idx):  # idx [1, B]
        return F.cross_entropy(self.model(x[idx[0]]), y[idx[0]])

    def chunk_loss(self, xc, yc, n):
        return F.cross_entropy(self.model(xc), yc, reduction="sum") / n

    def metrics(self, data: Dataset, cfg: TrainConfig, bs: int) -> list[tuple[float, float, float, float]]:
        m = prepare_copy(self.model, None, cfg.eval_bn, data.x_train, data.x_train, bs)
        tr = model_metrics(m, data.x_train, data.y_train, bs)
        te = model_metrics(m, data.x_test, data.y_test, bs)
        return [(tr[0], tr[1], te[0], te[1])]

    def flats(self) -> torch.Tensor:
        return flatten_module(self.model)[0].unsqueeze(0)


class _GroupedRunner(_SingleRunner):
    """K models as one GroupedNet: each model sees its own minibatch in its own channel group."""

    def __init__(self, g: GroupedNet):
        self.model, self.K = g, g.K

    def minibatch_loss(self, x, y, idx):  # idx [K, B]
        K, B = idx.shape
        out = self.model(x[idx])  # [K, B, C]
        per = F.cross_entropy(out.reshape(K * B, -1), y[idx].reshape(-1), reduction="none").view(K, B)
        return per.mean(1).sum()  # d/d(model k) of the sum = gradient of model k's own mean loss

    def chunk_loss(self, xc, yc, n):
        K = self.K
        out = self.model(xc.unsqueeze(0).expand(K, *xc.shape))
        per = F.cross_entropy(out.reshape(-1, out.shape[-1]), yc.repeat(K), reduction="none").view(K, -1)
        return (per.sum(1) / n).sum()

    def metrics(self, data, cfg, bs):
        g = copy.deepcopy(self.model)
        if cfg.eval_bn == "reestimate":
            reestimate_grouped_bn_(g, data.x_train, bs)
        g.eval()
        tre, trl = grouped_metrics(g, data.x_train, data.y_train, bs)
        tee, tel = grouped_metrics(g, data.x_test, data.y_test, bs)
        return [(float(tre[k]), float(trl[k]), float(tee[k]), float(tel[k])) for k in range(self.K)]

    def flats(self) -> torch.Tensor:
        return self.model.flats()


class _LoopRunner(_SingleRunner):
    """K separate models stepped in lockstep (one optimizer, one resume state).

    The same arithmetic as K runs of train() (the summed loss gives each model exactly its own
    gradient), hence bit-identical to them; slower than GroupedNet with 2+ threads (bench/bench_train.py).
    """

    def __init__(self, models: Sequence[nn.Module]):
        self.model, self.K = nn.ModuleList(models), len(models)

    def minibatch_loss(self, x, y, idx):  # idx [K, B]
        return sum(F.cross_entropy(m(x[idx[k]]), y[idx[k]]) for k, m in enumerate(self.model))

    def chunk_loss(self, xc, yc, n):
        return sum(F.cross_entropy(m(xc), yc, reduction="sum") / n for m in self.model)

    def metrics(self, data, cfg, bs):
        out = []
        for m in self.model:
            out += _SingleRunner(m).metrics(data, cfg, bs)
        return out

    def flats(self) -> torch.Tensor:
        return torch.stack([flatten_module(m)[0] for m in self.model])


# --------------------------------------------------------------------------------------------- resume
def _resume_name(metas: Sequence[dict], many: bool) -> str:
    parts = ["resume-many" if many else "resume"]
    for f in IDENTITY_FIELDS:
        if many and f == "trajectory":
            continue
        vals = {json.dumps(m.get(f), sort_keys=True) for m in metas}
        if len(vals) == 1 and metas[0].get(f) is not None:
            parts.append(f"{f}={metas[0][f]}")
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", "-".join(parts))


def _write_resume(path: Path, runner: _SingleRunner, opt: torch.optim.Optimizer,
                  gen_states: list[torch.Tensor], info: dict) -> None:
    tensors = {f"model.{k}": v for k, v in runner.module().state_dict().items()}
    for i, p in enumerate(runner.parameters()):
        buf = opt.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            tensors[f"opt.{i}.momentum_buffer"] = buf
    for k, st in enumerate(gen_states):
        tensors[f"gen.{k}"] = st
    atomic_save_safetensors(path, tensors, {RESUME_KEY: json.dumps(info, sort_keys=True)})


def _read_resume(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if RESUME_KEY not in meta:
            raise ValueError(f"{path} is not a pylandscape resume file")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, json.loads(meta[RESUME_KEY])


def _jsonable_meta(meta: dict) -> dict:
    return json.loads(json.dumps(meta, sort_keys=True, default=str))


# --------------------------------------------------------------------------------------------- loop
def _open_store(store, model: nn.Module, cfg: TrainConfig) -> SnapshotStore | None:
    if store is None or isinstance(store, SnapshotStore):
        return store
    return SnapshotStore(store, ParamSpec.from_module(model),
                         info={"train_config": cfg.to_json(), "num_parameters": count_parameters(model)})


def _run(runner: _SingleRunner, data: Dataset, cfg: TrainConfig, seeds: Sequence[int],
         store: SnapshotStore | None, metas: list[dict], resume: bool, progress: bool,
         callback: Callable[[int, dict], Any] | None, resume_name: str) -> list[list[dict]]:
    cfg.validate()
    K = runner.K
    dev = torch.device(cfg.device)
    data = data.to(dev)
    x, y = data.x_train, data.y_train
    N = int(y.shape[0])
    sgd = cfg.optimizer == "sgd"
    bs = min(cfg.batch_size, N)
    steps_per_epoch = math.ceil(N / bs) if sgd else 1
    chunk = cfg.chunk_size or N
    ebs = cfg.eval_batch_size or (N if N <= 2000 else 1000)
    params = runner.parameters()
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    snap_epochs = None if cfg.snapshot_epochs is None else {int(e) for e in cfg.snapshot_epochs}
    snap_steps = {int(s) for s in (cfg.snapshot_steps or ())}
    histories: list[list[dict]] = [[] for _ in range(K)]
    epoch, pos, step = 0, 0, 0
    fresh = True
    path = store.root / f"{resume_name}.safetensors" if store is not None else None
    cfg_json = cfg.to_json()
    metas = [_jsonable_meta(m) for m in metas]
    kind = {_SingleRunner: "single", _GroupedRunner: "grouped", _LoopRunner: "loop"}[type(runner)]

    if resume and store is None:
        raise ValueError("resume=True needs a store (the folder the interrupted run wrote to)")
    if store is not None and not resume:
        for m in metas:
            ident = {f: m[f] for f in IDENTITY_FIELDS if f in m}
            if store.select(**ident):
                raise ValueError(f"{store.root} already holds snapshots of {ident or 'this run'}; pass "
                                 f"resume=True (--resume) to continue it, or use another store or 'run' name")
    if resume and path.exists():
        tensors, info = _read_resume(path)
        diff = [k for k in cfg_json if k not in RESUMABLE_CHANGES and info["config"].get(k) != cfg_json[k]]
        if diff:
            raise ValueError(f"{path}: cannot resume with a different config: "
                             + ", ".join(f"{k}={cfg_json[k]!r} (was {info['config'].get(k)!r})" for k in diff))
        if info["metas"] != metas or [int(s) for s in info["seeds"]] != [int(s) for s in seeds]:
            raise ValueError(f"{path}: the interrupted run had other metadata/seeds "
                             f"({info['metas']}, seeds {info['seeds']})")
        if info.get("runner", kind) != kind:
            raise ValueError(f"{path}: the interrupted run used route {info['runner']!r}, not {kind!r}")
        if info["epoch"] > cfg.epochs:
            raise ValueError(f"{path}: the run is already at epoch {info['epoch']} > epochs={cfg.epochs}")
        sd = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        runner.module().load_state_dict(sd)
        for i, p in enumerate(params):
            buf = tensors.get(f"opt.{i}.momentum_buffer")
            if buf is not None:
                opt.state[p]["momentum_buffer"] = buf.to(p.device, p.dtype).clone()
        for k, g in enumerate(gens):
            g.set_state(tensors[f"gen.{k}"])
        epoch, pos, step = int(info["epoch"]), int(info["pos"]), int(info["step"])
        histories = info["histories"]
        fresh = False

    def record(ep: float, with_history: bool) -> list[dict]:
        rows = []
        for k, (tre, trl, tee, tel) in enumerate(runner.metrics(data, cfg, ebs)):
            row = {"epoch": ep, "step": step, "train_error": tre, "train_loss": trl,
                   "test_error": tee, "test_loss": tel}
            rows.append(row)
            if with_history:
                histories[k].append(row)
            if callback is not None:
                callback(k, row)
        return rows

    n_written = [0]

    def snapshot(rows: list[dict], gen_states: list[torch.Tensor], ep_done: int, pos_: int) -> None:
        if store is None:
            return
        flats = runner.flats().detach().cpu()
        for k in range(K):
            meta = {**metas[k], **rows[k], "seed": int(seeds[k])}
            key = {f: meta[f] for f in (*IDENTITY_FIELDS, "epoch", "step") if f in meta}
            if store.select(**key):  # written just before an interruption: identical, keep it
                continue
            store.append(flats[k], **meta)
            n_written[0] += 1
        _write_resume(path, runner, opt, gen_states, {
            "epoch": ep_done, "pos": pos_, "step": step, "histories": histories, "config": cfg_json,
            "metas": metas, "seeds": [int(s) for s in seeds], "K": K, "runner": kind})

    def is_snap_epoch(e: int) -> bool:
        return snap_epochs is None or e in snap_epochs

    if fresh:
        rows = record(0, True)
        if is_snap_epoch(0):
            snapshot(rows, [g.get_state() for g in gens], 0, 0)

    bar = tqdm(total=cfg.epochs, initial=epoch, disable=not progress, desc=f"train ({cfg.optimizer}, K={K})",
               unit="epoch", leave=False)
    last_loss = float("nan")
    try:
        while epoch < cfg.epochs:
            start_states = [g.get_state() for g in gens]
            if sgd:
                idx_all = torch.stack([torch.randperm(N, generator=g) for g in gens]).to(dev)
            runner.module().train()
            for s in range(pos, steps_per_epoch):
                opt.zero_grad(set_to_none=True)
                if sgd:
                    loss = runner.minibatch_loss(x, y, idx_all[:, s * bs:(s + 1) * bs])
                    loss.backward()
                    last_loss = float(loss.detach()) / K
                else:
                    total = 0.0
                    for c in range(0, N, chunk):
                        loss = runner.chunk_loss(x[c:c + chunk], y[c:c + chunk], N)
                        loss.backward()
                        total += float(loss.detach())
                    last_loss = total / K
                opt.step()
                step += 1
                if step in snap_steps and s + 1 < steps_per_epoch:  # a snapshot inside the epoch
                    rows = record(round(epoch + (s + 1) / steps_per_epoch, 6), False)
                    snapshot(rows, start_states, epoch, s + 1)
                    runner.module().train()
            pos = 0
            epoch += 1
            snap = is_snap_epoch(epoch) or step in snap_steps
            if snap or epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
                rows = record(epoch, True)
                if snap:
                    snapshot(rows, [g.get_state() for g in gens], epoch, 0)
                bar.set_postfix(loss=f"{last_loss:.4f}", err=f"{sum(r['train_error'] for r in rows) / K:.4f}",
                                snaps=n_written[0])
            bar.update(1)
    finally:
        bar.close()
    if store is not None and not is_snap_epoch(epoch):
        # The end state, so that resume=True on a finished run returns at once (and more epochs continue it).
        _write_resume(path, runner, opt, [g.get_state() for g in gens], {
            "epoch": epoch, "pos": 0, "step": step, "histories": histories, "config": cfg_json,
            "metas": metas, "seeds": [int(s) for s in seeds], "K": K, "runner": kind})
    return histories


# --------------------------------------------------------------------------------------------- public
def train(model: nn.Module, data: Dataset, config: TrainConfig, *,
          store: SnapshotStore | str | Path | None = None, meta: dict | None = None, resume: bool = False,
          progress: bool = True, callback: Callable[[dict], Any] | None = None,
          resume_name: str | None = None) -> list[dict]:
    """Train `model` in place; return one dict per evaluated epoch (epoch, step, train_error,
    train_loss, test_error, test_loss), epoch 0 = before training; errors/losses on the FULL sets.

    store: a SnapshotStore or a folder (created with the model's ParamSpec). Snapshot metadata: run,
        trajectory, stage (from `meta`; trajectory defaults to 0), epoch, step, errors, losses, seed,
        plus the rest of `meta`.
    resume: continue from the last complete snapshot of this run (same store, config, meta) and return
        the whole history, exactly as an uninterrupted run would (bit-identical on CPU).
    callback: called with each evaluated row, including those of snapshot_steps inside an epoch (which
        are not in the history); raise from it to stop, e.g. to simulate a kill in tests.
    resume_name: file name stem of the resume state in the store root (default from run/stage/trajectory
        in `meta`); runs sharing a store need distinct ones.
    """
    config.validate()
    meta = {"trajectory": 0, **(meta or {})}
    model.to(config.device)
    st = _open_store(store, model, config)
    cb = (lambda k, row: callback(row)) if callback is not None else None
    return _run(_SingleRunner(model), data, config, [config.seed], st, [meta], resume, progress, cb,
                resume_name or _resume_name([meta], many=False))[0]


def train_many(model_fn: Callable[[], nn.Module], init_flats: torch.Tensor, data: Dataset,
               config: TrainConfig, *, seeds: Sequence[int], store: SnapshotStore | str | Path | None = None,
               metas: Sequence[dict] | None = None, resume: bool = False, progress: bool = True,
               callback: Callable[[int, dict], Any] | None = None,
               resume_name: str | None = None, route: str = "auto") -> list[list[dict]]:
    """Train K = len(init_flats) trajectories at once (one optimizer, one resume state, one store).

    Trajectory k starts from init_flats[k] (weights [P] in model_fn()'s parameter order), draws its data
    order from seeds[k] and equals, within float tolerance, train(model_fn() loaded with init_flats[k],
    data, config with seed=seeds[k]) (config.seed is not used). Its snapshots carry metadata metas[k]
    (default {"trajectory": k}). callback(k, row). Returns the K histories.

    route: "auto" = "grouped" on CUDA, "loop" on CPU; "grouped" = one GroupedNet (grouped convolutions),
    equal to K train() runs within float tolerance; "loop" = K models stepped in lockstep, bit-identical to
    K train() runs. Measured
    (bench/bench_train.py, K=8 paper nets, SGD epoch on 500 digits, shared loaded 2-core CPU): with 2
    threads grouped 4.4-5.7x the time of one trajectory, loop 8.8-9.5x; with 1 thread both 7-12x
    (within noise). GPUs: not measured. Models GroupedNet cannot group use the loop.
    """
    if route not in TRAIN_MANY_ROUTES:
        raise ValueError(f"route must be one of {TRAIN_MANY_ROUTES}, got {route!r}")
    config.validate()
    init_flats = torch.as_tensor(init_flats)
    if init_flats.dim() != 2:
        raise ValueError(f"init_flats must be [K, P], got {tuple(init_flats.shape)}")
    K = init_flats.shape[0]
    seeds = [int(s) for s in seeds]
    if len(seeds) != K:
        raise ValueError(f"seeds has {len(seeds)} entries for K={K} trajectories")
    metas = [dict(m) for m in metas] if metas is not None else [{"trajectory": k} for k in range(K)]
    if len(metas) != K:
        raise ValueError(f"metas has {len(metas)} entries for K={K} trajectories")
    for k, m in enumerate(metas):
        m.setdefault("trajectory", k)
    template = model_fn().to(config.device)
    P = count_parameters(template)
    if init_flats.shape[1] != P:
        raise ValueError(f"init_flats has {init_flats.shape[1]} columns, model_fn() has {P} parameters")
    st = _open_store(store, template, config)
    dev = torch.device(config.device)
    runner: _SingleRunner | None = None
    if route == "auto":
        # Measured side by side on the 2-core CPU (bench/bench_train.py, K=8, quiet machine): loop 5.3x the
        # time of one trajectory, grouped 10x; grouped convolutions are meant for GPUs.
        route = "grouped" if dev.type == "cuda" else "loop"
    if route == "grouped":
        try:
            g = GroupedNet(template, K).to(dev)
            p0 = next(g.parameters())
            runner = _GroupedRunner(g.load_flats_(init_flats.to(p0.device, p0.dtype)))
        except NotImplementedError:
            runner = None
    if runner is None:
        models = []
        for k in range(K):
            m = model_fn().to(dev)
            p0 = next(m.parameters())
            load_flat_(m, init_flats[k].to(p0.device, p0.dtype))
            models.append(m)
        runner = _LoopRunner(models)
    return _run(runner, data, config, seeds, st, metas, resume, progress, callback,
                resume_name or _resume_name(metas, many=True))


def init_flats_for(model_fn: Callable[[], nn.Module], seeds: Sequence[int]) -> torch.Tensor:
    """[K, P] initial weights of model_fn() drawn with each seed (the global RNG is restored afterwards)."""
    rows = []
    for s in seeds:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(s))
            rows.append(flatten_module(model_fn())[0])
    return torch.stack(rows)


# --------------------------------------------------------------------------------------------- CLI
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


if __name__ == "__main__":
    sys.exit(main())
