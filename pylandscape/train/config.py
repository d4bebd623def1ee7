"""TrainConfig: the settings of one training run (the paper's SGD by default)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

from ..evaluate import BN_MODES

OPTIMIZERS = ("sgd", "gd")
# Full-batch GD on digits (width 1, seed 0, one chunk): lr 0.3 reaches zero training error at epoch 28,
# lr 0.1 at epoch 47, lr 1.0 diverges (train error still 50% after 12 epochs). Measured 2026-11-23.
GD_DEFAULT_LR = 0.3
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
