"""Exact BatchNorm re-estimation in ONE forward pass for feed-forward nn.Sequential models.

`evaluate.reestimate_bn_` needs one pass per BatchNorm layer when the data does not fit in one batch
(each pass stops at the next layer to re-estimate). For a plain nn.Sequential we can go layer by
layer over all the data instead: keep every batch's activation at the current layer, and when the
layer is a BatchNorm, set its running statistics to the mean / population variance over all batches
(per-batch torch.var_mean combined with Chan's pairwise update in float64), then apply it in eval
mode. The result is the definition in `pylandscape.evaluate` (statistics of each layer computed with
the layers below already re-estimated), and the last layer's outputs are the eval-mode logits on
x, so evaluating on the same images costs nothing more.

Memory: all batches' activations at one layer at a time (N x the widest layer); callers check
`fits(...)` and fall back to `reestimate_bn_` otherwise.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def sweepable(model: nn.Module) -> bool:
    """An nn.Sequential whose BatchNorms are direct children (nested containers are not swept)."""
    if not isinstance(model, nn.Sequential):
        return False
    for child in model.children():
        if not isinstance(child, _BatchNorm) and any(isinstance(m, _BatchNorm) for m in child.modules()):
            return False
    return True


def fits(activation_bytes_per_sample: int, n: int, max_bytes: int) -> bool:
    """Twice the widest layer's activations for n samples (input and output of a layer) under max_bytes."""
    return 2 * activation_bytes_per_sample * n <= max_bytes


def _stats(chunks: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 (mean [C], population variance [C]) over dim 0 and the spatial dims of all chunks."""
    n_tot, mean, m2 = 0, None, None
    for t in chunks:
        dims = [0] + list(range(2, t.dim()))
        nb = t.numel() // t.shape[1]
        vb, mb = torch.var_mean(t, dim=dims, correction=0)
        mb, m2b = mb.double(), vb.double() * nb
        if mean is None:
            n_tot, mean, m2 = nb, mb, m2b
        else:
            delta = mb - mean
            tot = n_tot + nb
            mean = mean + delta * (nb / tot)
            m2 = m2 + m2b + delta ** 2 * (n_tot * nb / tot)
            n_tot = tot
    return mean, m2 / n_tot


@torch.no_grad()
def sweep_(model: nn.Sequential, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Re-estimate every BatchNorm of `model` in place on x; return the eval-mode outputs on x [N, ...].

    The model is left in eval mode.
    """
    model.eval()
    chunks = [x[s:s + batch_size] for s in range(0, x.shape[0], batch_size)]
    for child in model.children():
        if isinstance(child, _BatchNorm) and child.track_running_stats:
            mean, var = _stats(chunks)
            child.running_mean.copy_(mean.to(child.running_mean.dtype))
            child.running_var.copy_(var.to(child.running_var.dtype))
        chunks = [child(c) for c in chunks]
    return torch.cat(chunks)
