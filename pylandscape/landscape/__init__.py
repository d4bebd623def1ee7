"""Loss surfaces and curvature around models: directions, batched evaluation of many weight vectors,
surfaces (`python -m pylandscape.surface`) and Hessian spectra (`python -m pylandscape.hessian`)."""
from .batched import BN_CHOICES, BatchedResult, evaluate_points
from .directions import normalize_filters, pca_directions, project, random_direction, random_directions
from .points import CombinationPoints, InterpolationPoints, PerturbedPoints, PointSet, StackedPoints

__all__ = ["BN_CHOICES", "BatchedResult", "evaluate_points", "normalize_filters", "pca_directions", "project",
           "random_direction", "random_directions", "CombinationPoints", "InterpolationPoints",
           "PerturbedPoints", "PointSet", "StackedPoints"]
