"""The training loop: SGD or full-batch GD for one or K trajectories, with snapshots and resume.

Snapshots go to a SnapshotStore. With each snapshot the full training state (weights, BatchNorm
statistics, optimizer state, data-order generators, history) is saved atomically in one file
`<store>/resume*.safetensors` (resume.py), so a run killed at any moment resumes from its last snapshot
and continues bit-identically (on CPU) without duplicating or losing snapshots: a snapshot that was
written just before a kill is recognised by its (run, stage, trajectory, epoch, step) and not written
again (it is identical, the rerun being bit-identical).

Data order comes from explicit torch.Generators (one per trajectory), never the global RNG.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data import Dataset
from ..flat import ParamSpec, flatten_module, load_flat_
from ..models import GroupedNet, count_parameters
from ..store import SnapshotStore
from .config import TRAIN_MANY_ROUTES, TrainConfig
from .resume import IDENTITY_FIELDS, default_resume_name, jsonable_meta, restore, write_resume
from .runners import RUNNER_KINDS, GroupedRunner, LoopRunner, SingleRunner


def _open_store(store, model: nn.Module, cfg: TrainConfig) -> SnapshotStore | None:
    if store is None or isinstance(store, SnapshotStore):
        return store
    return SnapshotStore(store, ParamSpec.from_module(model),
                         info={"train_config": cfg.to_json(), "num_parameters": count_parameters(model)})


def _run(runner: SingleRunner, data: Dataset, cfg: TrainConfig, seeds: Sequence[int],
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
    metas = [jsonable_meta(m) for m in metas]
    kind = RUNNER_KINDS[type(runner)]

    if resume and store is None:
        raise ValueError("resume=True needs a store (the folder the interrupted run wrote to)")
    if store is not None and not resume:
        for m in metas:
            ident = {f: m[f] for f in IDENTITY_FIELDS if f in m}
            if store.select(**ident):
                raise ValueError(f"{store.root} already holds snapshots of {ident or 'this run'}; pass "
                                 f"resume=True (--resume) to continue it, or use another store or 'run' name")
    if resume and path.exists():
        epoch, pos, step, histories = restore(path, runner, opt, gens, cfg, metas, seeds, kind)
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
        write_resume(path, runner, opt, gen_states, {
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
        write_resume(path, runner, opt, [g.get_state() for g in gens], {
            "epoch": epoch, "pos": 0, "step": step, "histories": histories, "config": cfg_json,
            "metas": metas, "seeds": [int(s) for s in seeds], "K": K, "runner": kind})
    return histories


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
    return _run(SingleRunner(model), data, config, [config.seed], st, [meta], resume, progress, cb,
                resume_name or default_resume_name([meta], many=False))[0]


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
    runner: SingleRunner | None = None
    if route == "auto":
        # Measured side by side on the 2-core CPU (bench/bench_train.py, K=8, quiet machine): loop 5.3x the
        # time of one trajectory, grouped 10x; grouped convolutions are meant for GPUs.
        route = "grouped" if dev.type == "cuda" else "loop"
    if route == "grouped":
        try:
            g = GroupedNet(template, K).to(dev)
            p0 = next(g.parameters())
            runner = GroupedRunner(g.load_flats_(init_flats.to(p0.device, p0.dtype)))
        except NotImplementedError:
            runner = None
    if runner is None:
        models = []
        for k in range(K):
            m = model_fn().to(dev)
            p0 = next(m.parameters())
            load_flat_(m, init_flats[k].to(p0.device, p0.dtype))
            models.append(m)
        runner = LoopRunner(models)
    return _run(runner, data, config, seeds, st, metas, resume, progress, callback,
                resume_name or default_resume_name(metas, many=True))


def init_flats_for(model_fn: Callable[[], nn.Module], seeds: Sequence[int]) -> torch.Tensor:
    """[K, P] initial weights of model_fn() drawn with each seed (the global RNG is restored afterwards)."""
    rows = []
    for s in seeds:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(s))
            rows.append(flatten_module(model_fn())[0])
    return torch.stack(rows)
