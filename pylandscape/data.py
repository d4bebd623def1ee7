"""Data sets as device tensors (no DataLoader): the embedded digits and CIFAR-10, with random-label options.

digits (default, embedded, no download): scikit-learn's 1,797 real 8x8 handwritten digits, resized
bilinearly to 32x32, grey replicated to 3 channels, so the paper's exact network applies. Fixed
stratified split: 1,500 training and 297 test images (split seed DIGITS_SPLIT_SEED, independent of `seed`).

cifar10: the standard `cifar-10-batches-py` folder (data_batch_1..5, test_batch). Those files are
Python pickles; they are read with a restricted unpickler that can build numpy arrays and nothing else.

Both are normalised with per-channel mean/std of the (full) training split. No augmentation.
"""
from __future__ import annotations

import _codecs
import hashlib
import io
import os
import pickle
import tarfile
import urllib.request
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.functional import interpolate

try:
    from numpy._core import multiarray as numpy_multiarray  # numpy >= 2
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as numpy_multiarray

DATASETS = ("digits", "cifar10")
DIGITS_TRAIN_SIZE = 1500
DIGITS_SPLIT_SEED = 0
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_TGZ_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_FILE = "test_batch"


@dataclass
class Dataset:
    """Images [N, C, H, W] (normalised floats) and labels [N] int64 for a training and a test split."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    name: str
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def in_channels(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.x_train.shape[-1])

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "Dataset":
        return replace(self, x_train=self.x_train.to(device=device, dtype=dtype),
                       x_test=self.x_test.to(device=device, dtype=dtype),
                       y_train=self.y_train.to(device), y_test=self.y_test.to(device))


def default_root() -> Path:
    """$PYLANDSCAPE_DATA, else ~/.cache/pylandscape."""
    env = os.environ.get("PYLANDSCAPE_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pylandscape"


# --------------------------------------------------------------------------------------------- pickles
# The only globals a CIFAR-10 batch needs: numpy's array reconstruction (stored under numpy.core in
# old pickles, numpy._core in numpy 2), plus _codecs.encode, which protocol-2 pickles written by
# Python 3 use to rebuild bytes objects (torch's weights_only unpickler allows it too; it only encodes
# a string). Everything else (os.system, eval, builtins.getattr, ...) is refused.
def _numpy_globals() -> dict[tuple[str, str], Any]:
    allowed = {}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "_reconstruct")] = numpy_multiarray._reconstruct
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    allowed[("_codecs", "encode")] = _codecs.encode
    return allowed


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def __init__(self, f, source: str):
        super().__init__(f, encoding="bytes")
        self._source = source
        self._allowed = _numpy_globals()

    def find_class(self, module: str, name: str):
        obj = self._allowed.get((module, name))
        if obj is None:
            raise pickle.UnpicklingError(
                f"{self._source}: refusing to load global {module}.{name} (only numpy arrays are allowed; "
                f"this is not a genuine CIFAR-10 batch)")
        return obj


def safe_unpickle(path: str | os.PathLike) -> Any:
    """Load a pickle that may only contain builtins and numpy arrays (anything else raises UnpicklingError)."""
    path = Path(path)
    with open(path, "rb") as f:
        return _NumpyOnlyUnpickler(io.BytesIO(f.read()), str(path)).load()


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR-10 batch {path} is missing")
    d = safe_unpickle(path)
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(d).__name__}")
    data = d.get(b"data", d.get("data"))
    labels = d.get(b"labels", d.get("labels"))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"{path}: b'data' must be a uint8 array [N, 3072], got {desc}")
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != data.shape[0] or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: b'labels' must be {data.shape[0]} integers, got {labels.dtype} {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{path}: labels outside 0..9")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download_cifar10(root: str | os.PathLike) -> Path:
    """Fetch the official tarball into root, check its MD5 and unpack it; returns the batches folder."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tgz = root / "cifar-10-python.tar.gz"
    if not tgz.exists():
        tmp = tgz.with_suffix(".part")
        try:
            urllib.request.urlretrieve(CIFAR_URL, tmp)
        except OSError as e:
            raise FileNotFoundError(
                f"could not download CIFAR-10 from {CIFAR_URL} ({e}); put the extracted folder "
                f"{CIFAR_FOLDER}/ under {root}") from None
        os.replace(tmp, tgz)
    if _md5(tgz) != CIFAR_TGZ_MD5:
        raise ValueError(f"{tgz}: MD5 {_md5(tgz)} differs from the official {CIFAR_TGZ_MD5}; delete it and retry")
    with tarfile.open(tgz, "r:gz") as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(CIFAR_FOLDER + "/") and m.isfile()
                   and ".." not in Path(m.name).parts]
        try:
            tar.extractall(root, members=members, filter="data")
        except TypeError:  # Python without extraction filters; members are checked above
            tar.extractall(root, members=members)
    return root / CIFAR_FOLDER


def _load_cifar10(root: Path, download: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    folder = root / CIFAR_FOLDER
    if not folder.is_dir() and (root / CIFAR_TRAIN_FILES[0]).is_file():
        folder = root  # root given as the batches folder itself
    if not folder.is_dir():
        if download:
            folder = download_cifar10(root)
        else:
            raise FileNotFoundError(
                f"CIFAR-10 not found: expected the folder {folder} with data_batch_1..5 and test_batch "
                f"(extract {CIFAR_URL} under {root}, set $PYLANDSCAPE_DATA, or pass download=True where a "
                f"network exists)")
    xs, ys = zip(*(_read_cifar_batch(folder / f) for f in CIFAR_TRAIN_FILES))
    xt, yt = _read_cifar_batch(folder / CIFAR_TEST_FILE)
    return np.concatenate(xs), np.concatenate(ys), xt, yt


# --------------------------------------------------------------------------------------------- digits
def _stratified_split(y: np.ndarray, n_first: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (first [n_first], rest) with class proportions kept (largest-remainder rounding)."""
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    counts = np.array([(y == c).sum() for c in classes])
    exact = counts * n_first / len(y)
    take = np.floor(exact).astype(int)
    short = n_first - take.sum()
    take[np.argsort(-(exact - take), kind="stable")[:short]] += 1
    first, rest = [], []
    for c, k in zip(classes, take):
        idx = rng.permutation(np.flatnonzero(y == c))
        first.append(idx[:k])
        rest.append(idx[k:])
    return np.sort(np.concatenate(first)), np.sort(np.concatenate(rest))


def _load_digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    with resources.files("pylandscape").joinpath("data_files/digits.npz").open("rb") as f:
        z = np.load(io.BytesIO(f.read()), allow_pickle=False)
        images, target = z["images"], z["target"].astype(np.int64)
    tr, te = _stratified_split(target, DIGITS_TRAIN_SIZE, DIGITS_SPLIT_SEED)
    return images[tr], target[tr], images[te], target[te]


def _digits_to_32(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images.astype(np.float32) / 16.0).unsqueeze(1)  # [N, 1, 8, 8] in 0..1
    x = interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    return x.expand(-1, 3, -1, -1).contiguous()


# --------------------------------------------------------------------------------------------- public
def load_dataset(name: str = "digits", root: str | os.PathLike | None = None, *,
                 train_size: int | None = None, labels: str = "true", inputs: str = "real",
                 seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 download: bool = False) -> Dataset:
    """Load a data set onto `device`.

    train_size: keep a stratified random subset (drawn with `seed`) of the training split.
    labels="random": training labels drawn uniformly from the classes with `seed` (test labels stay
        true, so test error measures chance); fixed by the seed.
    inputs="random": training and test images replaced by standard Gaussian noise of the same shape
        (drawn with `seed`); the paper pairs this with labels="random".
    root: CIFAR-10 location (default $PYLANDSCAPE_DATA or ~/.cache/pylandscape); unused for digits.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose one of {DATASETS}")
    if labels not in ("true", "random"):
        raise ValueError(f"labels must be 'true' or 'random', got {labels!r}")
    if inputs not in ("real", "random"):
        raise ValueError(f"inputs must be 'real' or 'random', got {inputs!r}")
    if name == "digits":
        xtr, ytr, xte, yte = _load_digits()
        x_train, x_test = _digits_to_32(xtr), _digits_to_32(xte)
        info: dict[str, Any] = {"source": "scikit-learn digits (embedded), 8x8 -> 3x32x32 bilinear",
                                "split_seed": DIGITS_SPLIT_SEED}
    else:
        root = Path(root).expanduser() if root is not None else default_root()
        xtr, ytr, xte, yte = _load_cifar10(root, download)
        x_train = torch.from_numpy(xtr.astype(np.float32) / 255.0)
        x_test = torch.from_numpy(xte.astype(np.float32) / 255.0)
        info = {"source": str(root)}
    y_train, y_test = torch.from_numpy(ytr), torch.from_numpy(yte)
    num_classes = 10
    # Per-channel statistics of the full training split, so subsets and seeds share one normalisation.
    mean = x_train.double().mean(dim=(0, 2, 3))
    std = x_train.double().std(dim=(0, 2, 3))
    if (std <= 0).any():
        raise ValueError(f"{name}: a channel of the training images is constant; cannot normalise")
    x_train = ((x_train.double() - mean[:, None, None]) / std[:, None, None]).float()
    x_test = ((x_test.double() - mean[:, None, None]) / std[:, None, None]).float()
    info.update(mean=mean.tolist(), std=std.tolist())

    if train_size is not None:
        n = len(y_train)
        if not 1 <= train_size <= n:
            raise ValueError(f"train_size must be in 1..{n} for {name}, got {train_size}")
        if train_size < n:
            keep, _ = _stratified_split(y_train.numpy(), int(train_size), seed)
            keep_t = torch.from_numpy(keep)
            x_train, y_train = x_train[keep_t], y_train[keep_t]
    gen = torch.Generator().manual_seed(int(seed))
    if inputs == "random":
        x_train = torch.randn(x_train.shape, generator=gen)
        x_test = torch.randn(x_test.shape, generator=gen)
    if labels == "random":
        y_train = torch.randint(0, num_classes, y_train.shape, generator=gen)
    info.update(labels=labels, inputs=inputs, seed=int(seed), train_size=int(len(y_train)))
    return Dataset(x_train.to(device=device, dtype=dtype), y_train.to(device),
                   x_test.to(device=device, dtype=dtype), y_test.to(device), num_classes, name, info)
