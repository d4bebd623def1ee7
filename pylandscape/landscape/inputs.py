"""What the surface and hessian commands read: a model (ours, inferred from a checkpoint's shapes, or
the user's `module:factory`), weights from any checkpoint `python -m pylandscape.mds` reads, and a
data set (ours, an .npz with x and y, or an ImageFolder-style directory).

Checkpoints are untrusted: weights come through `pylandscape.snapshots` (torch.load(weights_only=True),
np.load(allow_pickle=False), safetensors headers parsed by us); BatchNorm running statistics (only
needed for --bn keep) are read the same safe ways.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .. import snapshots
from ..data import DATASETS, load_dataset
from ..flat import NON_PARAMETER_SUFFIXES, ParamSpec
from ..models import dcnn, fc2

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


class InputError(ValueError):
    """Bad command-line input; the message names the argument or file and fits on one line."""


@dataclass
class Weights:
    """Weight vectors [N, P] in the model's parameter order, their metadata, and the file they came from."""

    flats: torch.Tensor
    meta: list[dict]
    source: str
    buffers: dict[str, torch.Tensor] | None = None   # of the last row's file, when asked for


@dataclass
class Data:
    sets: dict[str, tuple[torch.Tensor, torch.Tensor]]
    num_classes: int
    description: str


# ------------------------------------------------------------------------------------------- models
def _shapes(spec: ParamSpec) -> dict[str, tuple[int, ...]]:
    return dict(zip(spec.names, spec.shapes))


def infer_dcnn(spec: ParamSpec, image_size: int) -> nn.Module:
    """The paper's network with the widths, input channels and classes the checkpoint's shapes say."""
    sh = _shapes(spec)
    try:
        widths = [sh[f"conv{i}.weight"][0] for i in range(1, 5)]
        in_ch, classes = sh["conv1.weight"][1], sh["conv5.weight"][0]
    except KeyError as e:
        raise InputError(f"--model dcnn: the checkpoint has no tensor {e.args[0]!r} (tensors: "
                         f"{', '.join(spec.names[:8])}...); pass --model module:factory for other networks") from None
    return dcnn(widths=widths, in_channels=in_ch, num_classes=classes, image_size=image_size)


def infer_fc2(spec: ParamSpec) -> nn.Module:
    sh = _shapes(spec)
    if "fc1.weight" not in sh or "fc2.weight" not in sh:
        raise InputError("--model fc2: the checkpoint has no fc1.weight / fc2.weight")
    width, in_dim = sh["fc1.weight"]
    return fc2(in_dim, width, sh["fc2.weight"][0], bias="fc1.bias" in sh)


def factory_model(text: str) -> nn.Module:
    """`package.module:function` -> function() (an nn.Module). Imports the user's module (their code)."""
    mod_name, _, fn_name = text.partition(":")
    if not mod_name or not fn_name:
        raise InputError(f"--model {text!r}: expected dcnn, fc2 or module:factory (e.g. mypkg.nets:make_net)")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise InputError(f"--model {text!r}: cannot import {mod_name!r} ({e}); is it on PYTHONPATH?") from None
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise InputError(f"--model {text!r}: {mod_name} has no callable {fn_name!r}")
    m = fn()
    if not isinstance(m, nn.Module):
        raise InputError(f"--model {text!r}: {fn_name}() returned {type(m).__name__}, not an nn.Module")
    return m


def build_model(name: str, spec: ParamSpec | None, image_size: int = 32) -> nn.Module:
    if name == "dcnn":
        return infer_dcnn(spec, image_size) if spec is not None else dcnn()
    if name == "fc2":
        if spec is None:
            raise InputError("--model fc2 needs a checkpoint to take its sizes from")
        return infer_fc2(spec)
    return factory_model(name)


# ------------------------------------------------------------------------------------------ weights
def _order(model: nn.Module, spec: ParamSpec, source: str) -> list[int]:
    """For each model parameter, its tensor index in the checkpoint's spec (shapes checked)."""
    sh = _shapes(spec)
    idx = {n: i for i, n in enumerate(spec.names)}
    out = []
    for name, p in model.named_parameters():
        if name not in idx:
            raise InputError(f"{source}: no tensor {name!r} for the model's parameter (checkpoint has "
                             f"{', '.join(spec.names[:8])}{'...' if len(spec) > 8 else ''})")
        if tuple(sh[name]) != tuple(p.shape):
            raise InputError(f"{source}: tensor {name!r} has shape {list(sh[name])}, the model expects {list(p.shape)}")
        out.append(idx[name])
    return out


def open_weights(source: str | Path, select: str | None = None) -> snapshots.SnapshotSet:
    try:
        sset = snapshots.open_source(str(source))
    except (FileNotFoundError, snapshots.SnapshotError) as e:
        raise InputError(str(e)) from None
    if select:
        rows = sset.filter_rows(select=select)
        if not rows:
            raise InputError(f"{source}: --select {select!r} matches no snapshot")
    return sset


def read_weights(model: nn.Module, sset: snapshots.SnapshotSet, rows: Sequence[int], source: str) -> Weights:
    """[len(rows), P] float32 in the model's parameter order."""
    order = _order(model, sset.spec, source)
    offs = sset.spec.offsets.tolist()
    pieces = [(t, 0, offs[t + 1] - offs[t]) for t in order]
    block = sset.read_block(list(rows), pieces)
    return Weights(torch.from_numpy(block), [dict(sset.meta[r]) for r in rows], source)


def single_row(sset: snapshots.SnapshotSet, source: str, select: str | None) -> int:
    """The one snapshot --checkpoint means: the only one, or the last step of the only trajectory."""
    rows = sset.filter_rows(select=select) if select else list(range(len(sset)))
    trajs = {str(sset.meta[r].get("trajectory")) for r in rows}
    if len(rows) > 1 and len(trajs) > 1:
        raise InputError(f"{source} holds {len(rows)} snapshots of {len(trajs)} trajectories; pick one with "
                         f"--select (e.g. --select 'trajectory == \"{sorted(trajs)[0]}\"')")
    return rows[-1]


def read_buffers(path: Path, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """BatchNorm running statistics from one file, read safely (weights_only / no pickle / safetensors)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file  # only for --bn keep with a safetensors file
        sd = load_file(str(path))
    elif path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            sd = {k: torch.from_numpy(z[k]) for k in z.files}
    else:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        sd = obj if isinstance(obj, dict) else {}
        for key in snapshots.STATE_DICT_KEYS:
            if isinstance(sd.get(key), dict):
                sd = sd[key]
                break
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    for prefix in snapshots.WRAPPER_PREFIXES:  # the same wrapper prefixes the snapshot reader strips
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    missing = [n for n in names if n not in sd]
    if missing:
        raise InputError(f"{path}: --bn keep needs the BatchNorm statistics, but {', '.join(missing[:4])} "
                         f"{'is' if len(missing) == 1 else 'are'} missing; use --bn reestimate")
    return {n: sd[n] for n in names}


def buffer_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_buffers() if n.rsplit(".", 1)[-1] in NON_PARAMETER_SUFFIXES]


# --------------------------------------------------------------------------------------------- data
def _to_nchw(x: np.ndarray, name: str) -> torch.Tensor:
    if x.dtype.kind in "ui":
        x = x.astype(np.float32) / 255.0
    if x.dtype.kind != "f":
        raise InputError(f"{name}: x must hold numbers, got dtype {x.dtype}")
    if x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)  # NHWC -> NCHW
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def _labels(y: np.ndarray, n: int, name: str) -> torch.Tensor:
    if y.ndim != 1 or y.shape[0] != n or y.dtype.kind not in "ui":
        raise InputError(f"{name}: y must be {n} integer labels, got dtype {y.dtype} shape {list(y.shape)}")
    return torch.from_numpy(y.astype(np.int64))


def load_npz(path: Path) -> Data:
    """x [N, ...] (NCHW or NHWC images, uint8 scaled by 1/255), y [N]; optional x_test, y_test."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise InputError(f"--data {path}: cannot read as .npz ({e})") from None
    if "x" not in arrays or "y" not in arrays:
        raise InputError(f"--data {path}: needs arrays 'x' and 'y' (has {', '.join(arrays) or 'none'})")
    x = _to_nchw(arrays["x"], f"--data {path}")
    sets = {"train": (x, _labels(arrays["y"], x.shape[0], f"--data {path}"))}
    if "x_test" in arrays and "y_test" in arrays:
        xt = _to_nchw(arrays["x_test"], f"--data {path} x_test")
        sets["test"] = (xt, _labels(arrays["y_test"], xt.shape[0], f"--data {path} y_test"))
    classes = int(max(int(y.max()) for _, y in sets.values())) + 1
    return Data(sets, classes, f"{path} (train {x.shape[0]} images)")


def _image_folder(root: Path, classes: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    from PIL import Image  # pillow comes with matplotlib; only image folders need it
    classes = classes or sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise InputError(f"--data {root}: no class folders (expected {root}/CLASS/image.png)")
    xs, ys, size = [], [], None
    for ci, c in enumerate(classes):
        for f in sorted((root / c).iterdir()) if (root / c).is_dir() else []:
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            with Image.open(f) as im:
                a = np.asarray(im.convert("RGB"), dtype=np.uint8)
            if size is None:
                size = a.shape
            elif a.shape != size:
                raise InputError(f"--data {f}: image is {a.shape[1]}x{a.shape[0]}, the others {size[1]}x{size[0]} "
                                 f"(resize them first)")
            xs.append(a)
            ys.append(ci)
    if not xs:
        raise InputError(f"--data {root}: no images ({', '.join(IMAGE_SUFFIXES)}) in the class folders")
    x = torch.from_numpy(np.stack(xs).transpose(0, 3, 1, 2).astype(np.float32) / 255.0)
    return x, torch.tensor(ys, dtype=torch.int64), classes


def load_image_folder(root: Path) -> Data:
    """ROOT/CLASS/*.png (classes in sorted order, as torchvision's ImageFolder), or ROOT/train and
    ROOT/test (or val) holding such folders. Pixels scaled to [0, 1], nothing else."""
    sub = {d.name: d for d in root.iterdir() if d.is_dir()}
    if "train" in sub:
        x, y, classes = _image_folder(sub["train"])
        sets = {"train": (x, y)}
        test = sub.get("test") or sub.get("val")
        if test is not None:
            xt, yt, _ = _image_folder(test, classes)
            sets["test"] = (xt, yt)
    else:
        x, y, classes = _image_folder(root)
        sets = {"train": (x, y)}
    return Data(sets, len(classes), f"{root} ({len(classes)} classes, train {sets['train'][0].shape[0]} images)")


def load_data(spec: str, *, train_size: int | None = None, root: str | None = None, seed: int = 0) -> Data:
    """digits / cifar10 (pylandscape.data), a .npz file, or an image folder."""
    if spec in DATASETS:
        d = load_dataset(spec, root, train_size=train_size, seed=seed)
        return Data({"train": (d.x_train, d.y_train), "test": (d.x_test, d.y_test)}, d.num_classes,
                    f"{spec} (train {d.x_train.shape[0]}, test {d.x_test.shape[0]} images)")
    path = Path(spec)
    if not path.exists():
        raise InputError(f"--data {spec}: not one of {', '.join(DATASETS)} and no such file or folder")
    data = load_npz(path) if path.is_file() else load_image_folder(path)
    if train_size is not None:
        x, y = data.sets["train"]
        if not 1 <= train_size <= x.shape[0]:
            raise InputError(f"--train-size must be in 1..{x.shape[0]}, got {train_size}")
        keep = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:train_size].sort().values
        data.sets["train"] = (x[keep], y[keep])
    return data


def parse_grid(text: str) -> tuple[int, ...]:
    """'51' -> (51,), '51x31' -> (51, 31)."""
    try:
        parts = tuple(int(p) for p in text.lower().split("x"))
    except ValueError:
        raise InputError(f"--grid {text!r}: expected N or NxM, e.g. 51 or 51x51") from None
    if not 1 <= len(parts) <= 2 or min(parts) < 1:
        raise InputError(f"--grid {text!r}: expected N or NxM with positive sizes")
    return parts


def parse_range(text: str) -> tuple[float, float]:
    """'-1:1' -> (-1.0, 1.0)."""
    try:
        lo, hi = (float(v) for v in text.split(":"))
    except ValueError:
        raise InputError(f"--range {text!r}: expected LOW:HIGH, e.g. -1:1") from None
    if not hi > lo:
        raise InputError(f"--range {text!r}: LOW must be below HIGH")
    return lo, hi

