"""Error and loss of many weight vectors of one architecture: THE code path for surfaces, 1-D curves
and the perturb-sweep ("evaluate many perturbed copies").

`evaluate_points(model, points, {"train": (x, y), "test": (xt, yt)}, bn=...)` takes K weight vectors
(a [K, P] tensor or a `points.PointSet` that forms them chunk by chunk with our kernels) and returns
float64 error and mean cross-entropy per vector and data set. BatchNorm statistics are handled once
per vector, then every data set is evaluated with them.

BatchNorm (`bn`, said in every output):
- "reestimate" (default): each vector gets running statistics recomputed exactly on `bn_x` (the
  training images) as in `pylandscape.evaluate`: perturbed or interpolated weights have no valid
  statistics of their own.
- "keep": the model's stored running statistics for every vector (what copying weights into a model
  in eval mode does, e.g. the `loss-landscapes` package).
- "train": train-mode BatchNorm: each data batch is normalised with its own statistics (results
  depend on `batch_size`; running statistics are never touched).

Routes (how the K models run; all give the same numbers to float32 rounding):
- "loop": one model, weights copied in per vector, data in cache-sized batches. Fastest for
  convolutional nets on CPU (measured: bench/bench_landscape.py; grouped or vmapped convolutions
  run 2-7x slower per model there than one dense convolution).
- "grouped": K copies as one `models.GroupedNet` (grouped convolutions, batched matmuls) for
  nn.Sequential models such as dcnn / fc2 (as `train_many` does).
- "vmap": `torch.func.functional_call` + `vmap` over the stacked weights: any nn.Module.
- "auto": on CUDA "grouped" when the model allows it, else "vmap"; on CPU "loop" for models with
  convolutions, "vmap" otherwise.
Chunks of vectors are sized so that weights plus activations stay under `max_memory`.
"""
from __future__ import annotations

import copy
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap
from torch.nn.modules.batchnorm import _BatchNorm

from ..evaluate import (
    grouped_metrics,
    model_metrics,
    reestimate_bn_,
    reestimate_grouped_bn_,
)
from ..flat import ParamSpec, load_flat_
from ..models import GroupedNet
from . import bn_sweep, onednn
from .points import PointSet, as_points

BN_CHOICES = ("reestimate", "keep", "train")
ROUTES = ("auto", "loop", "grouped", "vmap")
FORWARDS = ("auto", "eager", "onednn")
DEFAULT_MAX_MEMORY = 512 * 2**20
BN_DESCRIPTIONS = {
    "reestimate": "BatchNorm statistics re-estimated exactly on the training images for every weight vector",
    "keep": "BatchNorm statistics of the loaded model kept for every weight vector",
    "train": "train-mode BatchNorm: each evaluation batch normalised with its own statistics",
    "none": "the model has no BatchNorm",
}


@dataclass
class BatchedResult:
    """errors[name], losses[name]: float64 [K] per data set; how they were computed in `info`."""

    errors: dict[str, torch.Tensor]
    losses: dict[str, torch.Tensor]
    bn: str
    route: str
    models_per_pass: int
    batch_size: int
    seconds: float
    info: dict = field(default_factory=dict)

    def describe(self) -> str:
        return (f"{BN_DESCRIPTIONS[self.bn]}; route {self.route}, {self.models_per_pass} models per pass, "
                f"{self.info.get('workers', 1)} worker(s), batches of {self.batch_size} images, "
                f"{self.info.get('forward', 'eager')} forwards")


def bn_layers(model: nn.Module) -> list[_BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


def use_batch_statistics_(model: nn.Module) -> nn.Module:
    """Make every BatchNorm of `model` (a copy!) normalise with batch statistics, in any mode."""
    for b in bn_layers(model):
        b.track_running_stats = False
        b.running_mean = None
        b.running_var = None
        b.num_batches_tracked = None
    return model


def _has_conv(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())


def _groupable(model: nn.Module) -> bool:
    try:
        GroupedNet(model, 1)
    except NotImplementedError:
        return False
    return True


def choose_route(model: nn.Module, device: torch.device, route: str = "auto") -> str:
    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
    if route == "grouped" and not _groupable(model):
        raise ValueError(f"route 'grouped' needs an nn.Sequential of Conv2d/Linear/BatchNorm/activations; "
                         f"{type(model).__name__} is not one (use route 'vmap')")
    if route != "auto":
        return route
    if device.type == "cuda":
        return "grouped" if _groupable(model) else "vmap"
    return "loop" if _has_conv(model) else "vmap"


@torch.no_grad()
def activation_bytes_per_sample(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of all module outputs for one sample (a forward pass of x[:1] with hooks)."""
    total = [0]

    def hook(mod, inp, out):
        if isinstance(out, torch.Tensor):
            total[0] += out.numel() * out.element_size()

    m = copy.deepcopy(model).eval()
    handles = [mod.register_forward_hook(hook) for mod in m.modules() if mod is not m]
    try:
        m(x[:1])
    finally:
        for h in handles:
            h.remove()
    return max(total[0], x[:1].numel() * x.element_size())


def _normalise_sets(sets) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    if isinstance(sets, tuple) and len(sets) == 2 and isinstance(sets[0], torch.Tensor):
        sets = {"train": sets}
    if not isinstance(sets, Mapping) or not sets:
        raise ValueError("sets must be a non-empty mapping name -> (x, y), or one (x, y) pair")
    out = {}
    for name, (x, y) in sets.items():
        if x.shape[0] == 0:
            raise ValueError(f"data set {name!r} is empty")
        if y.dim() != 1 or y.shape[0] != x.shape[0]:
            raise ValueError(f"data set {name!r}: labels must be [N={x.shape[0]}], got {tuple(y.shape)}")
        out[str(name)] = (x, y)
    return out


def _metrics_from_logits(out: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(wrong counts [k], summed cross-entropy [k]) float64 from logits [k, B, C]."""
    k = out.shape[0]
    wrong = (out.argmax(2) != yb).sum(1).double()
    ce = F.cross_entropy(out.reshape(-1, out.shape[-1]), yb.repeat(k), reduction="none").view(k, -1).double().sum(1)
    return wrong, ce


def _same_tensor(a: torch.Tensor, b: torch.Tensor | None) -> bool:
    return b is not None and (a is b or (a.data_ptr() == b.data_ptr() and a.shape == b.shape
                                        and a.stride() == b.stride() and a.dtype == b.dtype))


class _LoopRoute:
    """One model, weights copied in per vector. With bn="reestimate" on an nn.Sequential whose
    activations on bn_x fit in memory, one layer-by-layer sweep re-estimates the statistics and yields
    the logits on bn_x at once (bn_sweep); otherwise evaluate.reestimate_bn_ (one pass per BatchNorm)."""

    def __init__(self, model, bn, bn_x, batch_size, act_bytes, max_memory, forward="auto"):
        self.m = copy.deepcopy(model).eval()
        if bn == "train":
            use_batch_statistics_(self.m)
        self.bn, self.bn_x, self.batch_size = bn, bn_x, batch_size
        device = next(self.m.parameters()).device
        # eval-mode forwards in oneDNN's layout with BatchNorm folded (landscape/onednn.py); batch
        # statistics ("train") cannot be folded
        self.plan = None
        if forward != "eager" and bn != "train":
            self.plan = onednn.plan_for(self.m, device)
            if forward == "onednn" and self.plan is None:
                raise ValueError(f"forward 'onednn' needs a float32 CPU nn.Sequential of Conv2d/BatchNorm2d/ReLU/"
                                 f"Flatten/Linear; {type(model).__name__} on {device} is not one (use 'eager')")
        self.forward = "oneDNN, BatchNorm folded" if self.plan is not None else "eager"
        self._plan_loaded = False  # the plan holds the weights of the current vector
        self.sweep = None
        if (bn == "reestimate" and bn_sweep.sweepable(self.m)
                and bn_sweep.bytes_needed(self.m, bn_x) <= max_memory):
            self.sweep = bn_sweep.Sweeper(self.m, bn_x, batch_size)
            self.bn_method = "one pass, layer by layer (bn_sweep)"
            if self.plan is not None:
                self.forward = ("eager sweep on the BatchNorm images (statistics and their logits at once), "
                                "oneDNN with BatchNorm folded on other images")

    def run(self, rows, sets):
        k = rows.shape[0]
        res = {n: (torch.zeros(k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)) for n in sets}
        for i in range(k):
            load_flat_(self.m, rows[i])
            self._plan_loaded = False
            logits = None
            if self.sweep is not None:
                logits = self.sweep()
            elif self.bn == "reestimate":
                reestimate_bn_(self.m, self.bn_x, self.batch_size)
            self.m.eval()
            for n, (x, y) in sets.items():
                if logits is not None and _same_tensor(x, self.bn_x):
                    w, c = _metrics_from_logits(logits.unsqueeze(0), y)
                    e, l = float(w[0]) / x.shape[0], float(c[0]) / x.shape[0]
                elif self.plan is not None:
                    e, l = self._plan_metrics(x, y)
                else:
                    e, l = model_metrics(self.m, x, y, self.batch_size)
                res[n][0][i], res[n][1][i] = e, l
        return res

    def _plan_metrics(self, x, y):
        if not self._plan_loaded:
            self.plan.load()
            self._plan_loaded = True
        wrong, ce = 0.0, 0.0
        for s in range(0, x.shape[0], self.batch_size):
            w, c = _metrics_from_logits(self.plan(x[s:s + self.batch_size]).unsqueeze(0), y[s:s + self.batch_size])
            wrong += float(w[0])
            ce += float(c[0])
        return wrong / x.shape[0], ce / x.shape[0]


class _GroupedRoute:
    """K copies as one GroupedNet (rebuilt only when the chunk size changes)."""

    def __init__(self, model, bn, bn_x, batch_size, act_bytes, max_memory):
        self.model, self.bn, self.bn_x, self.batch_size = model, bn, bn_x, batch_size
        self.g: GroupedNet | None = None

    def run(self, rows, sets):
        k = rows.shape[0]
        if self.g is None or self.g.K != k:
            dev = next(self.model.parameters()).device
            self.g = GroupedNet(self.model, k).to(dev)
            if self.bn == "train":
                use_batch_statistics_(self.g)
        self.g.load_flats_(rows)
        if self.bn == "reestimate":
            reestimate_grouped_bn_(self.g, self.bn_x, self.batch_size)
        self.g.eval()
        return {n: grouped_metrics(self.g, x, y, self.batch_size) for n, (x, y) in sets.items()}


class _VmapRoute:
    """functional_call + vmap over stacked weights (and, for "reestimate", stacked buffers)."""

    def __init__(self, model, bn, bn_x, batch_size, act_bytes, max_memory):
        self.m = copy.deepcopy(model).eval()
        if bn == "train":
            use_batch_statistics_(self.m)
        self.spec = ParamSpec.from_module(self.m)
        self.bn, self.bn_x, self.batch_size = bn, bn_x, batch_size
        self.helper = copy.deepcopy(self.m) if bn == "reestimate" else None

    def _params(self, rows):
        k, out, start = rows.shape[0], {}, 0
        for name, shape, n in zip(self.spec.names, self.spec.shapes, self.spec.sizes):
            out[name] = rows[:, start:start + n].reshape(k, *shape)
            start += n
        return out

    def _buffers(self, rows):
        if self.bn != "reestimate":
            return dict(self.m.named_buffers()), None
        per = []
        for i in range(rows.shape[0]):  # statistics per vector (exact, as evaluate.reestimate_bn_)
            load_flat_(self.helper, rows[i])
            reestimate_bn_(self.helper, self.bn_x, self.batch_size)
            per.append({n: b.clone() for n, b in self.helper.named_buffers()})
        return {n: torch.stack([p[n] for p in per]) for n in per[0]}, 0

    @torch.no_grad()
    def run(self, rows, sets):
        params = self._params(rows)
        buffers, bdim = self._buffers(rows)

        def f(p, b, xb):
            return functional_call(self.m, (p, b), (xb,))
        fv = vmap(f, in_dims=(0, bdim, None))
        res = {}
        for n, (x, y) in sets.items():
            wrong = torch.zeros(rows.shape[0], dtype=torch.float64, device=x.device)
            ce = torch.zeros_like(wrong)
            for s in range(0, x.shape[0], self.batch_size):
                w, c = _metrics_from_logits(fv(params, buffers, x[s:s + self.batch_size]), y[s:s + self.batch_size])
                wrong += w
                ce += c
            res[n] = ((wrong / x.shape[0]).cpu(), (ce / x.shape[0]).cpu())
        return res


_ROUTE_CLASSES = {"loop": _LoopRoute, "grouped": _GroupedRoute, "vmap": _VmapRoute}


def models_per_pass(route: str, num_params: int, itemsize: int, act_bytes: int, batch_size: int,
                    max_memory: int) -> int:
    """How many vectors to form and run at once: weights (x3: the chunk, the model copies, slack)
    plus, for the batched routes, each model's activations on one batch (x2: outputs and temporaries)."""
    per_model = 3 * num_params * itemsize
    if route != "loop":
        per_model += 2 * batch_size * act_bytes
    return max(1, int(max_memory // max(per_model, 1)))


def evaluate_points(model: nn.Module, points, sets, *, bn: str = "reestimate", bn_x: torch.Tensor | None = None,
                    route: str = "auto", batch_size: int | None = None, max_memory: int | None = None,
                    chunk: int | None = None, workers: int | None = None, progress: bool = False,
                    forward: str = "auto") -> BatchedResult:
    """Error and mean cross-entropy of K weight vectors on each data set (see the module docstring).

    model: the architecture (its weights are ignored; its BatchNorm buffers are used by bn="keep").
    points: [K, P] tensor or PointSet (rows in `flat` order: model.named_parameters()).
    sets: {"train": (x, y), ...} or one (x, y); x on the model's device.
    bn_x: images for bn="reestimate" (default: the "train" set's, else the first set's).
    batch_size: images per forward (default 256 on CPU, 1024 on CUDA); chunk: vectors per pass
    (default: from max_memory, 512 MiB unless given).
    workers: route "loop" on CPU only: this many models evaluated concurrently, one per thread, each
    single-threaded (default torch.get_num_threads()); independent models need no synchronisation,
    whereas one model's convolutions split over threads wait at every layer (and stall when other
    processes share the cores). The intra-op thread count is set to 1 meanwhile and restored.
    forward: route "loop" only: "auto" runs eval-mode forwards of a plain conv nn.Sequential on the CPU in
    oneDNN's layout with BatchNorm folded (landscape/onednn.py), other models eagerly; "eager" always
    eagerly; "onednn" insists (an error when the model does not qualify).
    """
    if bn not in BN_CHOICES:
        raise ValueError(f"bn must be one of {BN_CHOICES}, got {bn!r}")
    pts: PointSet = as_points(points)
    sets = _normalise_sets(sets)
    P = sum(p.numel() for p in model.parameters())
    if pts.num_params != P:
        raise ValueError(f"points have {pts.num_params} parameters per vector, the model has {P}")
    first_x = sets["train"][0] if "train" in sets else next(iter(sets.values()))[0]
    device = first_x.device
    has_bn = bool(bn_layers(model))
    bn_used = bn if has_bn else "none"
    bn_eff = bn if has_bn else "keep"
    if bn_eff == "reestimate" and bn_x is None:
        bn_x = first_x
    rname = choose_route(model, device, route)
    if forward not in FORWARDS:
        raise ValueError(f"forward must be one of {FORWARDS}, got {forward!r}")
    batch_size = int(batch_size or (1024 if device.type == "cuda" else 256))
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    max_memory = int(max_memory or DEFAULT_MAX_MEMORY)
    act = activation_bytes_per_sample(model, first_x)
    if chunk is None:
        chunk = models_per_pass(rname, P, first_x.element_size(), act, batch_size, max_memory)
    chunk = max(1, min(int(chunk), max(len(pts), 1)))
    if workers is None:
        workers = torch.get_num_threads() if (rname == "loop" and device.type == "cpu") else 1
    workers = max(1, min(int(workers), max(len(pts), 1))) if rname == "loop" and device.type == "cpu" else 1
    kw = {"forward": forward} if rname == "loop" else {}
    runners = [_ROUTE_CLASSES[rname](model, bn_eff, bn_x, batch_size, act, max_memory / workers, **kw)
               for _ in range(workers)]
    K = len(pts)
    errors = {n: torch.empty(K, dtype=torch.float64) for n in sets}
    losses = {n: torch.empty(K, dtype=torch.float64) for n in sets}
    t0 = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import (
            tqdm,  # optional progress bar: tqdm's import costs ~0.1 s, only when asked
        )
        bar = tqdm(total=K, desc=f"evaluating ({rname})", unit="model", leave=False)
    threads = torch.get_num_threads()
    pool = ThreadPoolExecutor(workers) if workers > 1 else None
    try:
        if pool is not None:
            torch.set_num_threads(1)
        for s in range(0, K, chunk):
            rows = pts.rows(s, min(K, s + chunk)).to(device)
            if pool is None:
                parts = [(0, runners[0].run(rows, sets))]
            else:
                bounds = [round(i * rows.shape[0] / workers) for i in range(workers + 1)]
                futs = [(a, pool.submit(r.run, rows[a:b], sets))
                        for r, a, b in zip(runners, bounds[:-1], bounds[1:]) if b > a]
                parts = [(a, f.result()) for a, f in futs]
            for a, out in parts:
                for n, (e, l) in out.items():
                    errors[n][s + a:s + a + e.shape[0]] = e
                    losses[n][s + a:s + a + e.shape[0]] = l
            if bar is not None:
                bar.update(rows.shape[0])
    finally:
        if pool is not None:
            pool.shutdown()
            torch.set_num_threads(threads)
        if bar is not None:
            bar.close()
    info = {"num_vectors": K, "num_params": P, "workers": workers,
            "forward": getattr(runners[0], "forward", "eager"),
            "set_sizes": {n: int(x.shape[0]) for n, (x, _) in sets.items()}}
    if bn_eff == "reestimate":
        info["bn_method"] = getattr(runners[0], "bn_method", "per-layer passes (evaluate.reestimate_bn_)")
    return BatchedResult(errors, losses, bn_used, rname, chunk, batch_size, time.perf_counter() - t0, info)
