"""Public wrappers of the kernels: validate arguments, then call torch.ops.pylandscape.* or, when the
extension is unavailable, the pure-torch twin in `pylandscape._reference` (same results).
"""
from __future__ import annotations

import torch

from . import _ext
from . import _reference as ref


# ======================================================================================
# Section: argument checks shared by every op
# (owned by the kernels work; the Gram section below may use these helpers)
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


# ======================================================================================
# Section: torch.compile support (register_fake), guarded on the extension being loaded
# ======================================================================================
