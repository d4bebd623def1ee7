"""Pure-PyTorch twins of every kernel: the fallback, the test oracle and the benchmark baseline.

They follow the kernels' definitions exactly (the Philox stream and the normal transform included),
so results match the compiled ops bit for bit where the math is elementwise, and to rounding where
sums are reordered.
"""
from __future__ import annotations

import torch


# ======================================================================================
# Section: Philox counter-based RNG and the normal transform
# ======================================================================================


# ======================================================================================
# Section: layer statistics and layerwise perturbation
# ======================================================================================


# ======================================================================================
# Section: interpolation and weighted combinations of models
# ======================================================================================


# ======================================================================================
# Section: per-layer Gram matrices of snapshots (segment_gram)
# ======================================================================================
