"""Inference of a plain conv net in oneDNN's blocked layout, for the CPU "loop" route of evaluate_points.

Why: eager PyTorch on CPU runs each Conv2d in oneDNN but converts the activations back to plain NCHW
after every layer and runs BatchNorm and ReLU as separate passes over memory. Keeping the activations in
oneDNN's own layout from the first convolution to the last, folding eval-mode BatchNorm into the
convolution before it and applying ReLU in place measured 1.45x faster per model on one core for the
paper's dcnn on digits (83 -> 57 ms per 1,500 images, bench/bench_landscape.py). Weights are re-packed
per weight vector (188,810 numbers: negligible next to a pass over the data).

Numbers: folding BN rescales the convolution's weights, so logits differ from eager in the last float32
bits (measured ~2e-8 absolute on dcnn logits); losses agree with eager and the reference packages to
float tolerance (tests/test_landscape_onednn.py).

Supported: an nn.Sequential of Conv2d (zero padding, numeric padding), BatchNorm2d directly after a
Conv2d (running statistics, any affine), ReLU, Flatten and Linear (Linear runs in plain layout after
Flatten). Anything else: `plan_for` returns None and the caller runs the model eagerly.
"""
from __future__ import annotations

import torch
from torch import nn

_SIMPLE = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Flatten, nn.Linear, nn.Identity, nn.Dropout)


def available() -> bool:
    return bool(torch.backends.mkldnn.is_available())


def _conv_ok(c: nn.Conv2d) -> bool:
    return c.padding_mode == "zeros" and not isinstance(c.padding, str)


def supported(model: nn.Module) -> bool:
    """True when `plan_for` can run `model` (see the module docstring)."""
    if not available() or not isinstance(model, nn.Sequential):
        return False
    children = list(model.children())
    seen_flatten = False
    for i, c in enumerate(children):
        if not isinstance(c, _SIMPLE) or type(c) not in _SIMPLE:
            return False  # subclasses may override forward
        if isinstance(c, nn.Conv2d) and (seen_flatten or not _conv_ok(c)):
            return False
        if isinstance(c, nn.BatchNorm2d) and (
                i == 0 or not isinstance(children[i - 1], nn.Conv2d) or not c.track_running_stats):
            return False
        if isinstance(c, nn.Flatten):
            if c.start_dim != 1 or c.end_dim != -1:
                return False
            seen_flatten = True
        if isinstance(c, nn.Linear) and not seen_flatten:
            return False
    return any(isinstance(c, nn.Conv2d) for c in children)


class OneDNNPlan:
    """Runs an eval-mode nn.Sequential (see `supported`) with the weights it holds at the last `load()`."""

    def __init__(self, model: nn.Sequential):
        if not supported(model):
            raise ValueError(f"{type(model).__name__} is not a plain Conv2d/BatchNorm2d/ReLU/Flatten/Linear "
                             f"nn.Sequential; run it eagerly")
        self.model = model
        self.steps: list[tuple] = []

    @torch.no_grad()
    def load(self) -> OneDNNPlan:
        """Re-pack the model's current weights (BatchNorm running statistics folded into the conv)."""
        children = list(self.model.children())
        steps: list[tuple] = []
        dense = False
        i = 0
        while i < len(children):
            c = children[i]
            if isinstance(c, nn.Conv2d):
                w = c.weight.detach().float()
                b = c.bias.detach().float() if c.bias is not None else torch.zeros(w.shape[0])
                if i + 1 < len(children) and isinstance(children[i + 1], nn.BatchNorm2d):
                    bn = children[i + 1]
                    s = (bn.running_var.float() + bn.eps).rsqrt()
                    shift = -bn.running_mean.float() * s
                    if bn.affine:
                        s = s * bn.weight.float()
                        shift = shift * bn.weight.float() + bn.bias.float()
                    w = w * s.view(-1, 1, 1, 1)
                    b = b * s + shift
                    i += 1
                stride, padding, dilation = list(c.stride), list(c.padding), list(c.dilation)
                wm = torch._C._nn.mkldnn_reorder_conv2d_weight(w.contiguous().to_mkldnn(), padding, stride,
                                                              dilation, c.groups)
                steps.append(("conv", wm, b.contiguous().to_mkldnn(), padding, stride, dilation, c.groups))
            elif isinstance(c, nn.ReLU):
                steps.append(("relu",))
            elif isinstance(c, nn.Flatten):
                steps.append(("flatten",))
                dense = True
            elif isinstance(c, nn.Linear):
                steps.append(("linear", c.weight.detach().float(), None if c.bias is None else c.bias.detach().float()))
            # Identity, Dropout (eval): nothing
            i += 1
        if not dense:
            steps.append(("dense",))
        self.steps = steps
        return self

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float().contiguous().to_mkldnn()
        in_mkldnn = True
        for st in self.steps:
            kind = st[0]
            if kind == "conv":
                _, w, b, padding, stride, dilation, groups = st
                h = torch.mkldnn_convolution(h, w, b, padding, stride, dilation, groups)
            elif kind == "relu":
                h = torch.relu_(h)
            elif kind in ("flatten", "dense"):
                if in_mkldnn:
                    h = h.to_dense()
                    in_mkldnn = False
                if kind == "flatten":
                    h = h.flatten(1)
            elif kind == "linear":
                h = torch.nn.functional.linear(h, st[1], st[2])
        return h


def plan_for(model: nn.Module, device: torch.device) -> OneDNNPlan | None:
    """A OneDNNPlan when `model` is supported and runs on the CPU in float32, else None."""
    if device.type != "cpu" or not supported(model):
        return None
    if any(p.dtype != torch.float32 for p in model.parameters()):
        return None
    return OneDNNPlan(model)
