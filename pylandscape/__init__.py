"""pylandscape: where training goes in weight space.

Record weight snapshots, perturb and retrain, interpolate and average models, embed trajectories
with classical MDS, and probe the degeneracy of global minima (Liao & Poggio, "Theory of Deep
Learning II: Landscape of the Empirical Risk").
"""
from ._ext import has_cuda_kernels, has_extension

__version__ = "0.1.0"
__all__ = ["has_extension", "has_cuda_kernels", "__version__"]
