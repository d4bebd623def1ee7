"""The paper's all-convolutional network, its polynomial variant and a two-layer net for theory probes.

Layer numbering follows Liao & Poggio: layer 1 is the input, layers 2..6 are conv1..conv5, so the
paper's "layer 2" is our `conv1.weight`/`conv1.bias` and its "layer 6" (the logits) is `conv5.*`.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import numpy as np
import torch
from torch import nn

# Hidden widths of conv1..conv4 at width=1. With 3x3 kernels, biases, 3 input channels and 10 classes
# they give exactly 188,810 parameters, the paper's count (896 + 18,496 + 87,704 + 76,664 + 5,050).
# The paper gives the count, not the widths: 3,148 tuples (a, b, c, d) with every width in 8..512 give
# 188,810 (enumerated over a <= 128, b <= 256, c <= 320), e.g. (32, 64, 110, 98), (32, 128, 88, 56),
# (16, 32, 34, 438). This one is our choice: it starts like the usual 32-64 progression.
DCNN_WIDTHS: tuple[int, int, int, int] = (32, 64, 152, 56)
PAPER_NUM_PARAMETERS = 188_810
ACTIVATIONS = ("relu", "poly")


def _fit_relu_polynomial(degree: int, interval: tuple[float, float]) -> np.ndarray:
    """Monomial coefficients c[0..degree] (c[i] multiplies x**i) of the least-squares fit of ReLU.

    Least squares on 512 Chebyshev-Gauss nodes of the interval (in the Chebyshev basis, then converted
    to monomials): close to the minimax fit and free of Runge oscillation at the interval's ends.
    """
    a, b = float(interval[0]), float(interval[1])
    if not a < b:
        raise ValueError(f"poly_interval must be (low, high) with low < high, got {interval}")
    if int(degree) != degree or degree < 1:
        raise ValueError(f"poly_degree must be an integer >= 1, got {degree}")
    n = 512
    t = np.cos(np.pi * (np.arange(n) + 0.5) / n)
    x = 0.5 * (a + b) + 0.5 * (b - a) * t
    fit = np.polynomial.Chebyshev.fit(x, np.maximum(x, 0.0), int(degree), domain=[a, b])
    return fit.convert(kind=np.polynomial.Polynomial, domain=[-1, 1], window=[-1, 1]).coef


class PolyActivation(nn.Module):
    """Elementwise polynomial that approximates ReLU on `interval`; makes the loss a polynomial in the weights.

    The coefficients are a non-persistent buffer (they follow .to()/.double() but are not weights, so
    they stay out of state_dicts and flat buffers; they are rebuilt from degree and interval).
    """

    def __init__(self, degree: int = 2, interval: Sequence[float] = (-3.0, 3.0)):
        super().__init__()
        self.degree = int(degree)
        self.interval = (float(interval[0]), float(interval[1]))
        coeffs = torch.tensor(_fit_relu_polynomial(degree, self.interval), dtype=torch.float32)
        self.register_buffer("coeffs", coeffs, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.coeffs.to(x.dtype)
        out = c[-1].expand_as(x)
        for i in range(c.numel() - 2, -1, -1):  # Horner
            out = out * x + c[i]
        return out

    def extra_repr(self) -> str:
        return f"degree={self.degree}, interval={self.interval}"


def make_activation(activation: str, poly_degree: int = 2,
                    poly_interval: Sequence[float] = (-3.0, 3.0)) -> nn.Module:
    if activation == "relu":
        return nn.ReLU()
    if activation == "poly":
        return PolyActivation(poly_degree, poly_interval)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


class DCNN(nn.Sequential):
    """conv1 -> bn1 -> act1 -> ... -> conv4 -> bn4 -> act4 -> conv5 -> flatten (logits [B, classes]).

    A plain nn.Sequential so that the K-models-at-once machinery in `pylandscape.train` can rebuild it
    layer by layer as grouped convolutions.
    """


def dcnn(width: float = 1.0, in_channels: int = 3, num_classes: int = 10, image_size: int = 32,
         activation: str = "relu", poly_degree: int = 2,
         poly_interval: Sequence[float] = (-3.0, 3.0), widths: Sequence[int] | None = None) -> DCNN:
    """The paper's network: five 3x3 stride-2 convolutions (32->16->8->4->2->1), padding 1, no pooling.

    BatchNorm without affine parameters sits between hidden layers (after each of conv1..conv4, before
    the activation); conv5 outputs `num_classes` channels at 1x1, the logits. `width` multiplies the
    hidden widths `widths` (default DCNN_WIDTHS -> 188,810 parameters at width 1, 3x32x32, 10 classes).
    Inputs up to 32x32 end at 1x1; larger ones are refused.

    The paper states the parameter count (188,810), not the widths: (32, 64, 152, 56) is one of many
    width tuples with that count (e.g. (32, 64, 110, 98), (32, 128, 88, 56)); pass `widths` (or
    `--set widths=a,b,c,d` / `train --widths a,b,c,d`) for another. The biases of conv1..conv4 feed a
    BatchNorm, which subtracts the per-channel batch mean and with it the bias: they get no gradient
    and never change (`biases_before_batchnorm` lists them).
    """
    if not width > 0:
        raise ValueError(f"width must be > 0, got {width}")
    if image_size < 1 or image_size > 32:
        raise ValueError(f"image_size must be in 1..32 (five stride-2 convs reach 1x1), got {image_size}")
    if in_channels < 1 or num_classes < 1:
        raise ValueError(f"in_channels and num_classes must be >= 1, got {in_channels}, {num_classes}")
    base = tuple(widths) if widths is not None else DCNN_WIDTHS
    if len(base) != 4:
        raise ValueError(f"widths must list 4 hidden widths (conv1..conv4), got {base}")
    hidden = [max(1, int(round(width * w))) for w in base]
    make_activation(activation, poly_degree, poly_interval)  # validate before building
    layers: "OrderedDict[str, nn.Module]" = OrderedDict()
    chans = [in_channels] + hidden
    for i in range(4):
        layers[f"conv{i + 1}"] = nn.Conv2d(chans[i], chans[i + 1], 3, stride=2, padding=1)
        layers[f"bn{i + 1}"] = nn.BatchNorm2d(chans[i + 1], affine=False)
        layers[f"act{i + 1}"] = make_activation(activation, poly_degree, poly_interval)
    layers["conv5"] = nn.Conv2d(chans[4], num_classes, 3, stride=2, padding=1)
    layers["flatten"] = nn.Flatten(1)
    return DCNN(layers)


class FC2(nn.Sequential):
    """fc1 -> act -> fc2: a two-layer fully connected network (inputs are flattened first)."""


def fc2(in_dim: int, width: int, out_dim: int = 1, activation: str = "relu", bias: bool = True,
        poly_degree: int = 2, poly_interval: Sequence[float] = (-3.0, 3.0)) -> FC2:
    """Two-layer fully connected net for the theory probes: flatten, fc1 [width x in_dim], act, fc2."""
    if in_dim < 1 or width < 1 or out_dim < 1:
        raise ValueError(f"in_dim, width and out_dim must be >= 1, got {in_dim}, {width}, {out_dim}")
    return FC2(OrderedDict([
        ("flatten", nn.Flatten(1)),
        ("fc1", nn.Linear(in_dim, width, bias=bias)),
        ("act", make_activation(activation, poly_degree, poly_interval)),
        ("fc2", nn.Linear(width, out_dim, bias=bias)),
    ]))


def biases_before_batchnorm(model: nn.Module) -> list[str]:
    """Names of the biases that a BatchNorm cancels: a Conv/Linear bias whose layer is directly followed
    by a BatchNorm in an nn.Sequential (dcnn: conv1.bias .. conv4.bias).

    BatchNorm subtracts the per-channel mean over the batch, which contains the bias, so the output and
    the loss do not depend on it: its gradient is exactly zero and it stays at its initial value. Where
    the paper means "the weights of layer k", these tensors carry no information about training and are
    left out of perturbations and MDS by default in the experiments (switch: `pre_bn_biases`)."""
    out = []
    for seq_name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        children = list(seq.named_children())
        for (name, mod), (_, nxt) in zip(children, children[1:]):
            if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) and mod.bias is not None and \
                    isinstance(nxt, nn.modules.batchnorm._BatchNorm):
                out.append(f"{seq_name}.{name}.bias" if seq_name else f"{name}.bias")
    return out


def count_parameters(model: nn.Module) -> int:
    """Number of trainable weights (BatchNorm running statistics are buffers and do not count)."""
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------ K models as one network
# Layers that act elementwise (and hold no weights) can be applied to K models' activations unchanged.
ELEMENTWISE = (nn.ReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.LeakyReLU, nn.ELU, nn.Softplus, nn.Identity,
               PolyActivation)


CONV_IMPLS = ("auto", "grouped", "split")


class _GConv2d(nn.Module):
    """K Conv2d layers on [B, K*C, H, W]: model k's channels form group k.

    impl "grouped" (= "auto"): one grouped convolution (groups=K). "split": one ordinary convolution
    per model on channel slices. Whole SGD epochs of K=8 paper nets on this 2-core CPU
    (bench/bench_train.py, interleaved runs on a shared, loaded machine): with 2 threads grouped 4.4x
    one trajectory, split 10.6x; with 1 thread the two were within noise (7-12x).
    """

    def __init__(self, conv: nn.Conv2d, K: int, impl: str = "auto"):
        super().__init__()
        if impl not in CONV_IMPLS:
            raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {impl!r}")
        self.impl = impl
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise NotImplementedError("grouped models support zero padding given as numbers only")
        self.K, self.groups = K, conv.groups
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.weight = nn.Parameter(conv.weight.detach().unsqueeze(0).repeat(K, *[1] * conv.weight.dim()))
        self.bias = (nn.Parameter(conv.bias.detach().unsqueeze(0).repeat(K, 1)) if conv.bias is not None
                     else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, K*C_in, H, W]
        K, o = self.K, self.weight.shape[1]
        if self.impl == "split":
            xs = x.split(x.shape[1] // K, dim=1)
            b = self.bias if self.bias is not None else [None] * K
            return torch.cat([torch.nn.functional.conv2d(xs[k], self.weight[k], b[k], self.stride, self.padding,
                                                         self.dilation, self.groups) for k in range(K)], dim=1)
        w = self.weight.reshape(K * o, *self.weight.shape[2:])
        b = self.bias.reshape(K * o) if self.bias is not None else None
        return torch.nn.functional.conv2d(x, w, b, self.stride, self.padding, self.dilation, K * self.groups)


class _GLinear(nn.Module):
    """K Linear layers as one batched matmul on [K, B, F]."""

    def __init__(self, lin: nn.Linear, K: int):
        super().__init__()
        self.weight = nn.Parameter(lin.weight.detach().unsqueeze(0).repeat(K, 1, 1))
        self.bias = nn.Parameter(lin.bias.detach().unsqueeze(0).repeat(K, 1)) if lin.bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [K, B, F]
        out = torch.bmm(x, self.weight.transpose(1, 2))
        return out + self.bias[:, None, :] if self.bias is not None else out


class _GBatchNorm(nn.Module):
    """K BatchNorm layers: one BatchNorm over K*C channels (statistics are per channel, hence per model)."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, K: int):
        super().__init__()
        C = bn.num_features
        cls = nn.BatchNorm2d if isinstance(bn, nn.BatchNorm2d) else nn.BatchNorm1d
        self.two_d = cls is nn.BatchNorm2d
        self.K, self.C = K, C
        self.bn = cls(K * C, eps=bn.eps, momentum=bn.momentum, affine=False,
                      track_running_stats=bn.track_running_stats)
        ref = bn.running_mean if bn.track_running_stats else bn.weight
        if ref is not None:
            self.bn.to(device=ref.device, dtype=ref.dtype)
        if bn.track_running_stats:
            with torch.no_grad():
                self.bn.running_mean.copy_(bn.running_mean.repeat(K))
                self.bn.running_var.copy_(bn.running_var.repeat(K))
                self.bn.num_batches_tracked.copy_(bn.num_batches_tracked)
        self.weight = nn.Parameter(bn.weight.detach().repeat(K, 1)) if bn.affine else None
        self.bias = nn.Parameter(bn.bias.detach().repeat(K, 1)) if bn.affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.two_d:  # [B, K*C, H, W]
            y = self.bn(x)
            if self.weight is not None:
                y = y * self.weight.reshape(1, -1, 1, 1) + self.bias.reshape(1, -1, 1, 1)
            return y
        K, B = x.shape[0], x.shape[1]  # [K, B, C]
        y = self.bn(x.transpose(0, 1).reshape(B, K * self.C)).reshape(B, K, self.C).transpose(0, 1)
        if self.weight is not None:
            y = y * self.weight[:, None, :] + self.bias[:, None, :]
        return y


class GroupedNet(nn.Module):
    """K copies of a feed-forward nn.Sequential (e.g. dcnn, fc2) evaluated as ONE network.

    Convolutions become grouped convolutions (model k = channel group k), linear layers batched
    matmuls, BatchNorm one BatchNorm over K*C channels; so K models train or evaluate at the cost of
    one wide network. Input: xs [K, B, ...] (each model's own batch); output [K, B, ...].
    Supported children: Conv2d, Linear, BatchNorm1d/2d, Flatten(1), elementwise activations;
    anything else raises NotImplementedError. conv_impl: see _GConv2d.
    """

    def __init__(self, template: nn.Module, K: int, conv_impl: str = "auto"):
        super().__init__()
        if not isinstance(template, nn.Sequential):
            raise NotImplementedError(f"GroupedNet needs an nn.Sequential, got {type(template).__name__}")
        if K < 1:
            raise ValueError(f"K must be >= 1, got {K}")
        self.K = K
        self.layers = nn.ModuleList()
        self.kinds: list[str] = []
        self.param_names: list[str] = []   # template names, in template order
        self._targets: list[tuple[int, str]] = []  # (layer index, attribute) holding each stacked tensor
        for name, mod in template.named_children():
            i = len(self.layers)
            if isinstance(mod, nn.Conv2d):
                g, kind = _GConv2d(mod, K, conv_impl), "conv"
            elif isinstance(mod, nn.Linear):
                g, kind = _GLinear(mod, K), "linear"
            elif isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
                g, kind = _GBatchNorm(mod, K), "bn2d" if isinstance(mod, nn.BatchNorm2d) else "bn1d"
            elif isinstance(mod, nn.Flatten):
                if mod.start_dim != 1 or mod.end_dim != -1:
                    raise NotImplementedError("only Flatten(1) is supported in grouped models")
                g, kind = nn.Identity(), "flatten"
            elif isinstance(mod, ELEMENTWISE):
                g, kind = mod, "elementwise"
            else:
                raise NotImplementedError(f"GroupedNet cannot group layer {name!r} ({type(mod).__name__})")
            for pname, _ in mod.named_parameters(recurse=False):
                self.param_names.append(f"{name}.{pname}")
                self._targets.append((i, pname))
            self.layers.append(g)
            self.kinds.append(kind)
        self.template_param_names = [n for n, _ in template.named_parameters()]
        if self.template_param_names != self.param_names:
            raise NotImplementedError("template has parameters outside its direct children")

    def stacked_parameters(self) -> list[torch.Tensor]:
        """The [K, *shape] tensors, in the template's parameter order."""
        return [getattr(self.layers[i], a) for i, a in self._targets]

    def flats(self) -> torch.Tensor:
        """[K, P] weights, row k = model k's flat buffer (template parameter order)."""
        return torch.cat([p.detach().reshape(self.K, -1) for p in self.stacked_parameters()], dim=1)

    @torch.no_grad()
    def load_flats_(self, flats: torch.Tensor) -> "GroupedNet":
        params = self.stacked_parameters()
        P = sum(p[0].numel() for p in params)
        if flats.dim() != 2 or tuple(flats.shape) != (self.K, P):
            raise ValueError(f"flats has shape {tuple(flats.shape)}, expected [{self.K}, {P}]")
        start = 0
        for p in params:
            n = p[0].numel()
            p.copy_(flats[:, start:start + n].reshape(p.shape))
            start += n
        return self

    def forward(self, xs: torch.Tensor) -> torch.Tensor:
        K = self.K
        if xs.shape[0] != K:
            raise ValueError(f"grouped input must be [K={K}, B, ...], got {tuple(xs.shape)}")
        layout, x = "stack", xs  # stack: [K, B, ...]; conv: [B, K*C, H, W]
        for kind, layer in zip(self.kinds, self.layers):
            if kind in ("conv", "bn2d"):
                if layout == "stack":
                    x = x.transpose(0, 1).reshape(x.shape[1], K * x.shape[2], *x.shape[3:])
                    layout = "conv"
            elif kind in ("linear", "bn1d", "flatten"):
                if layout == "conv":
                    x = x.reshape(x.shape[0], K, -1).transpose(0, 1)
                    layout = "stack"
                elif kind == "flatten" or x.dim() > 3:
                    x = x.reshape(K, x.shape[1], -1)
            x = layer(x)
        if layout == "conv":
            B = x.shape[0]
            x = x.reshape(B, K, x.shape[1] // K, *x.shape[2:]).transpose(0, 1)
        return x
