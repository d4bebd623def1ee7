"""Past one process: the Gram across torch.distributed ranks (gram.py)."""
from .gram import DEFAULT_PANEL_ROWS, Plan, distributed_gram, local_gram, make_plan

__all__ = ["DEFAULT_PANEL_ROWS", "Plan", "distributed_gram", "local_gram", "make_plan"]
