"""The resume file: the full training state saved atomically beside each snapshot.

`<store>/resume*.safetensors` holds the model's state_dict ("model.*"), the SGD momentum buffers
("opt.<i>.momentum_buffer"), the data-order generator states ("gen.<k>") and, in its metadata, the
position (epoch, pos, step), the histories, the config, the metas and the seeds. Tensors only
(safetensors), so reading one never unpickles anything.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open

from ..store import atomic_save_safetensors
from .config import TrainConfig
from .runners import SingleRunner

RESUME_KEY = "pylandscape_resume"
# Config fields that may differ when resuming (more epochs, another device, finer logging).
RESUMABLE_CHANGES = ("epochs", "device", "eval_every", "eval_batch_size")
IDENTITY_FIELDS = ("run", "stage", "trajectory")


def default_resume_name(metas: Sequence[dict], many: bool) -> str:
    parts = ["resume-many" if many else "resume"]
    for f in IDENTITY_FIELDS:
        if many and f == "trajectory":
            continue
        vals = {json.dumps(m.get(f), sort_keys=True) for m in metas}
        if len(vals) == 1 and metas[0].get(f) is not None:
            parts.append(f"{f}={metas[0][f]}")
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", "-".join(parts))


def write_resume(path: Path, runner: SingleRunner, opt: torch.optim.Optimizer,
                  gen_states: list[torch.Tensor], info: dict) -> None:
    tensors = {f"model.{k}": v for k, v in runner.module().state_dict().items()}
    for i, p in enumerate(runner.parameters()):
        buf = opt.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            tensors[f"opt.{i}.momentum_buffer"] = buf
    for k, st in enumerate(gen_states):
        tensors[f"gen.{k}"] = st
    atomic_save_safetensors(path, tensors, {RESUME_KEY: json.dumps(info, sort_keys=True)})


def read_resume(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if RESUME_KEY not in meta:
            raise ValueError(f"{path} is not a pylandscape resume file")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, json.loads(meta[RESUME_KEY])


def jsonable_meta(meta: dict) -> dict:
    return json.loads(json.dumps(meta, sort_keys=True, default=str))


def restore(path: Path, runner: SingleRunner, opt: torch.optim.Optimizer, gens: list[torch.Generator],
            cfg: TrainConfig, metas: list[dict], seeds: Sequence[int], kind: str):
    """Load the state in `path` into runner/opt/gens; return (epoch, pos, step, histories).

    Raises ValueError naming the file when the interrupted run differs (config beyond
    RESUMABLE_CHANGES, metas, seeds, route) or is already past cfg.epochs."""
    cfg_json = cfg.to_json()
    tensors, info = read_resume(path)
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
    for i, p in enumerate(runner.parameters()):
        buf = tensors.get(f"opt.{i}.momentum_buffer")
        if buf is not None:
            opt.state[p]["momentum_buffer"] = buf.to(p.device, p.dtype).clone()
    for k, g in enumerate(gens):
        g.set_state(tensors[f"gen.{k}"])
    return int(info["epoch"]), int(info["pos"]), int(info["step"]), info["histories"]
