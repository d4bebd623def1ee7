"""How one or K models compute their loss, metrics and flat weights for the training loop.

SingleRunner is the reference semantics; GroupedRunner trains K models as one GroupedNet (grouped
convolutions, fast on GPUs); LoopRunner steps K separate models in lockstep (bit-identical to K train()
runs). All three expose the same five methods, so loop.run_training never asks which it has.
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn
from torch.nn.functional import cross_entropy

from ..data import Dataset
from ..evaluate import grouped_metrics, model_metrics, prepare_copy, reestimate_grouped_bn_
from ..flat import flatten_module
from ..models import GroupedNet
from .config import TrainConfig


class SingleRunner:
    """One model as it is (the reference semantics)."""

    def __init__(self, model: nn.Module):
        self.model, self.K = model, 1

    def parameters(self) -> list[torch.Tensor]:
        return list(self.model.parameters())

    def module(self) -> nn.Module:
        return self.model

    def minibatch_loss(self, x, y, idx):  # idx [1, B]
        return cross_entropy(self.model(x[idx[0]]), y[idx[0]])

    def chunk_loss(self, xc, yc, n):
        return cross_entropy(self.model(xc), yc, reduction="sum") / n

    def metrics(self, data: Dataset, cfg: TrainConfig, bs: int) -> list[tuple[float, float, float, float]]:
        m = prepare_copy(self.model, None, cfg.eval_bn, data.x_train, data.x_train, bs)
        tr = model_metrics(m, data.x_train, data.y_train, bs)
        te = model_metrics(m, data.x_test, data.y_test, bs)
        return [(tr[0], tr[1], te[0], te[1])]

    def flats(self) -> torch.Tensor:
        return flatten_module(self.model)[0].unsqueeze(0)


class GroupedRunner(SingleRunner):
    """K models as one GroupedNet: each model sees its own minibatch in its own channel group."""

    def __init__(self, g: GroupedNet):
        self.model, self.K = g, g.K

    def minibatch_loss(self, x, y, idx):  # idx [K, B]
        K, B = idx.shape
        out = self.model(x[idx])  # [K, B, C]
        per = cross_entropy(out.reshape(K * B, -1), y[idx].reshape(-1), reduction="none").view(K, B)
        return per.mean(1).sum()  # d/d(model k) of the sum = gradient of model k's own mean loss

    def chunk_loss(self, xc, yc, n):
        K = self.K
        out = self.model(xc.unsqueeze(0).expand(K, *xc.shape))
        per = cross_entropy(out.reshape(-1, out.shape[-1]), yc.repeat(K), reduction="none").view(K, -1)
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


class LoopRunner(SingleRunner):
    """K separate models stepped in lockstep (one optimizer, one resume state).

    The same arithmetic as K runs of train() (the summed loss gives each model exactly its own
    gradient), hence bit-identical to them; slower than GroupedNet with 2+ threads (bench/bench_train.py).
    """

    def __init__(self, models: Sequence[nn.Module]):
        self.model, self.K = nn.ModuleList(models), len(models)

    def minibatch_loss(self, x, y, idx):  # idx [K, B]
        return sum(cross_entropy(m(x[idx[k]]), y[idx[k]]) for k, m in enumerate(self.model))

    def chunk_loss(self, xc, yc, n):
        return sum(cross_entropy(m(xc), yc, reduction="sum") / n for m in self.model)

    def metrics(self, data, cfg, bs):
        out = []
        for m in self.model:
            out += SingleRunner(m).metrics(data, cfg, bs)
        return out

    def flats(self) -> torch.Tensor:
        return torch.stack([flatten_module(m)[0] for m in self.model])


# The name each runner is recorded under in the resume file (a resume must use the same route).
RUNNER_KINDS = {SingleRunner: "single", GroupedRunner: "grouped", LoopRunner: "loop"}
