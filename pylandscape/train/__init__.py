"""Trainers that record weight trajectories: SGD and full-batch GD, one or K trajectories at once.

config.py   TrainConfig (the paper's SGD by default)
loop.py     train, train_many, init_flats_for: the epoch loop, snapshots, resume
runners.py  one model, K models as a GroupedNet, K models in lockstep
resume.py   the resume file (full training state beside each snapshot)
cli.py      python -m pylandscape train --help
"""
from .config import GD_DEFAULT_LR, OPTIMIZERS, TRAIN_MANY_ROUTES, TrainConfig
from .loop import init_flats_for, train, train_many

__all__ = ["TrainConfig", "OPTIMIZERS", "GD_DEFAULT_LR", "TRAIN_MANY_ROUTES", "train", "train_many",
           "init_flats_for"]
