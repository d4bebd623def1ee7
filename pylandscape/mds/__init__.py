"""Classical (Torgerson) MDS of weight snapshots: where training went, as a 2-D map.

Data flow: snapshot files (pylandscape.snapshots) -> per-tensor Grams [L, N, N] float64 (pipeline.py,
cached by gram_cache.py) -> Δ² of the selected tensors (dissimilarity.py: cosine (1 - c)², the paper's;
chordal 2 (1 - c); euclidean |w_i - w_j|²) -> B = -1/2 J Δ² J and its top-k eigenpairs (solvers.py)
-> coordinates sqrt(λ_m) v_m (estimator.py) -> mds.csv/json/png/html (outputs.py). The command line
is cli.py (``python -m pylandscape.mds``).
"""
from .cli import build_parser, main
from .dissimilarity import (
                            METRICS,
                            NEGATIVE_TOL,
                            cosine_distance,
                            cosine_distance_from_gram,
                            double_center,
                            layer_gram,
                            squared_dissimilarity,
)
from .estimator import SOLVERS, ClassicalMDS
from .outputs import coord_names, write_csv, write_json, write_outputs
from .pipeline import MDSResult, compute_grams, embed, parse_memory
from .solvers import DENSE_MAX_N

__all__ = ["ClassicalMDS", "DENSE_MAX_N", "METRICS", "MDSResult", "NEGATIVE_TOL", "SOLVERS",
           "build_parser", "compute_grams", "coord_names", "cosine_distance", "cosine_distance_from_gram",
           "double_center", "embed", "layer_gram", "main", "parse_memory", "squared_dissimilarity",
           "write_csv", "write_json", "write_outputs"]
