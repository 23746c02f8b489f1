"""In-memory image datasets for teacher training and distillation (docs/definitions.md §6).

``load_data(spec)`` reads one of the registered formats into uint8 ``(N, C, H, W)`` tensors:

- ``digits``: scikit-learn's 1,797 8x8 digits, fixed stratified 80/20 train/test split.
- ``fashion-mnist[:DIR]``: the four IDX ``.gz`` files (default DIR /usr/share/datasets/fashion-mnist).
- ``fashion-mnist-canvas[:DIR][,key=value...]``: the same items, each pasted at a random position
  of a larger canvas among dimmer clutter fragments (``distill.canvas.make_canvas_dataset``); the
  options are that function's keywords (``canvas=96,clutter=4,scale=1-1,clutter_size=8-16,
  clutter_intensity=0.3-0.6,seed=0``; a range is ``lo-hi``). Train canvases use the canvas ``seed``, test
  canvases ``seed + 1``; all 70k are rendered at load (a few seconds).
- ``cifar10:DIR`` / ``cifar100:DIR``: python pickle batches (``DIR/cifar-10-batches-py`` or DIR).
- ``stl10:DIR``: ``train_X.bin`` ... ``test_y.bin`` (``DIR/stl10_binary`` or DIR), labelled splits.
- ``imagefolder:DIR``: ``DIR/train/<class>/*.png|jpg`` and ``DIR/test`` (or ``DIR/val``), via Pillow.

A format may take options: ``,key=value`` items after the name (and DIR), typed by their defaults.

A seeded, class-balanced validation split is carved from the training images; ``train_subset``
keeps a seeded, class-balanced subset of the rest; the test split is untouched. Conversion to
float, resizing, augmentation (random crop with zero padding, horizontal flip) and normalisation
happen per batch in ``DataBundle.preprocess`` with torch ops, drawing from an explicit generator.

>>> bundle = load_data("digits", val_fraction=0.1)
>>> len(bundle.train) + len(bundle.val), len(bundle.test), bundle.input_size
(1437, 360, (8, 8))
>>> x, y = next(iter(torch.utils.data.DataLoader(bundle.train, batch_size=4)))
>>> bundle.preprocess(x, train=False).shape
torch.Size([4, 1, 8, 8])
"""

from __future__ import annotations

import gzip
import inspect
import io
import pickle
import re
import struct
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from memplan.errors import MemplanError
from memplan.registry import Registry, UnknownNameError

__all__ = ["FORMATS", "DataBundle", "DataError", "ImageDataset", "Preprocess", "load_data", "register_format"]


class DataError(MemplanError, ValueError):
    """A bad data spec, or a dataset file that is missing, unreadable or malformed (the message names it)."""


class _UnknownFormat(DataError, UnknownNameError):
    """A data spec naming no registered format."""


class ImageDataset(Dataset):
    """uint8 images ``(N, C, H, W)`` and int64 labels ``(N,)``, indexed to ``(image, label)``."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise DataError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise DataError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
        self.images = images
        self.labels = labels.to(torch.int64)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index], self.labels[index]


@dataclass(frozen=True)
class Preprocess:
    """uint8 batch -> normalised float batch of ``size``; with ``train=True`` also augments.

    Random draws come from ``generator`` (a CPU generator; the global RNG when None).

    >>> p = Preprocess(mean=(0.5,), std=(0.5,), size=(4, 4), crop_padding=1, hflip=True)
    >>> x = torch.full((2, 1, 4, 4), 255, dtype=torch.uint8)
    >>> p(x, train=False).unique().tolist()
    [1.0]
    >>> p(x, train=True, generator=torch.Generator().manual_seed(0)).shape
    torch.Size([2, 1, 4, 4])
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    size: tuple[int, int]
    crop_padding: int = 0
    hflip: bool = False

    def __call__(self, images: Tensor, *, train: bool, generator: torch.Generator | None = None) -> Tensor:
        x = images.to(torch.float32) / 255.0
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", antialias=True, align_corners=False)
        if train and self.crop_padding > 0:
            x = _random_crop(x, self.crop_padding, generator)
        if train and self.hflip:
            flip = (torch.rand(x.shape[0], generator=generator) < 0.5).to(x.device)
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std


def _random_crop(x: Tensor, pad: int, generator: torch.Generator | None) -> Tensor:
    """Per-sample random crop of the zero-padded batch back to its size."""
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    top = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device)
    left = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device)
    rows = (top[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (left[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chans = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chans, rows, cols]


@dataclass(frozen=True)
class DataBundle:
    """Train/val/test splits of one dataset and how to preprocess its batches."""

    name: str
    train: ImageDataset
    val: ImageDataset
    test: ImageDataset
    num_classes: int
    in_chans: int
    input_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...]
    crop_padding: int
    hflip: bool

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess(self.mean, self.std, self.input_size, self.crop_padding, self.hflip)


@dataclass(frozen=True)
class RawSplits:
    """What a format handler returns: uint8 NCHW images and int64 labels of the two splits."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple[str, ...]


Loader = Callable[..., RawSplits]


@dataclass(frozen=True)
class DataFormat:
    """A registered format: its loader and per-dataset preprocessing defaults.

    ``mean``/``std`` None: computed from the training portion. ``crop_padding`` None: size // 8.
    ``default_dir`` None with ``takes_dir``: a directory must be given. ``options``: keyword
    defaults the loader takes after ``(dir, size)``; spec values are parsed to the default's type.
    """

    load: Loader
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    hflip: bool
    crop_padding: int | None = None
    takes_dir: bool = True
    default_dir: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)


FORMATS: Registry[DataFormat] = Registry("data format", unknown_error=_UnknownFormat)


def register_format(
    name: str,
    *,
    mean: tuple[float, ...] | None,
    std: tuple[float, ...] | None,
    hflip: bool,
    crop_padding: int | None = None,
    takes_dir: bool = True,
    default_dir: str | None = None,
    options: Mapping[str, Any] | None = None,
) -> Callable[[Loader], Loader]:
    """Decorator registering ``loader(dir, image_size, **options) -> RawSplits`` as format ``name``.

    ``options`` maps option names to defaults (int, float, str or a ``(lo, hi)`` pair).
    """

    def add(loader: Loader) -> Loader:
        FORMATS.add(name, DataFormat(loader, mean, std, hflip, crop_padding, takes_dir, default_dir, dict(options or {})))
        return loader

    return add


def load_data(
    spec: str,
    *,
    val_fraction: float = 0.1,
    train_subset: int | None = None,
    seed: int = 0,
    image_size: int | None = None,
) -> DataBundle:
    """Load ``spec`` (``name[:DIR][,key=value...]``) with a seeded validation split and optional subset.

    ``image_size`` resizes to a square ``image_size`` (per batch; at decode time for imagefolder).

    >>> load_data("digits", train_subset=100).train.labels.bincount().tolist()
    [10, 10, 10, 10, 10, 10, 10, 10, 10, 10]
    """
    name = re.split("[:,]", spec, maxsplit=1)[0]
    fmt = FORMATS[name]
    rest = spec[len(name) :]
    if not fmt.options and rest.startswith(","):
        raise DataError(f"data format {name!r} takes no options, got {rest[1:]!r}")
    directory, *items = rest.split(",") if fmt.options else [rest]  # without options a DIR may hold commas
    directory = directory.removeprefix(":")
    options = _parse_options(name, fmt.options, items)
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if directory and not fmt.takes_dir:
        raise DataError(f"data format {name!r} takes no directory, got {spec!r}")
    directory = directory or fmt.default_dir or ""
    if fmt.takes_dir and not directory:
        raise DataError(f"data format {name!r} needs a directory: '{name}:DIR'")
    size = (image_size, image_size) if image_size else None
    raw = fmt.load(Path(directory), size, **options)
    num_classes = len(raw.class_names)
    for split, labels in (("train", raw.train_labels), ("test", raw.test_labels)):
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise DataError(f"{spec}: {split} labels outside [0, {num_classes})")

    rng = np.random.default_rng(seed)
    train_idx, val_idx = _stratified_split(raw.train_labels, val_fraction, rng)
    if train_subset is not None:
        train_idx = train_idx[_balanced_subset(raw.train_labels[train_idx], train_subset, rng)]
    train_images = torch.from_numpy(np.ascontiguousarray(raw.train_images[train_idx]))
    if fmt.mean is None or fmt.std is None:
        mean, std = _channel_stats(train_images)
    else:
        mean, std = fmt.mean, fmt.std
    native = tuple(raw.train_images.shape[2:])
    input_size = size or (native[0], native[1])
    return DataBundle(
        name=name,
        train=_dataset(raw.train_images, raw.train_labels, train_idx),
        val=_dataset(raw.train_images, raw.train_labels, val_idx),
        test=_dataset(raw.test_images, raw.test_labels, np.arange(len(raw.test_labels))),
        num_classes=num_classes,
        in_chans=raw.train_images.shape[1],
        input_size=input_size,
        mean=mean,
        std=std,
        class_names=raw.class_names,
        crop_padding=input_size[0] // 8 if fmt.crop_padding is None else fmt.crop_padding,
        hflip=fmt.hflip,
    )


def _parse_options(name: str, defaults: Mapping[str, Any], items: list[str]) -> dict[str, Any]:
    """``key=value`` items of a spec, typed like ``defaults`` (a pair is ``lo-hi`` or one value)."""
    parsed = dict(defaults)
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or key not in defaults:
            raise DataError(
                f"data option {item!r} of {name!r}: expected key=value with key in {', '.join(defaults)}"
            )
        default = defaults[key]
        try:
            if isinstance(default, tuple):
                lo, _, hi = text.partition("-")
                parsed[key] = (type(default[0])(lo), type(default[1])(hi or lo))
            else:
                parsed[key] = type(default)(text)
        except ValueError:
            raise DataError(
                f"data option {item!r} of {name!r}: cannot parse {text!r} like {default!r}"
            ) from None
    return parsed


def _channel_stats(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (unbiased) std of uint8 ``(N, C, H, W)`` images in [0, 1], via histograms."""
    levels = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for c in range(images.shape[1]):
        counts = torch.bincount(images[:, c].reshape(-1), minlength=256).to(torch.float64)
        n = counts.sum()
        mean = (counts * levels).sum() / n
        var = (counts * (levels - mean) ** 2).sum() / (n - 1).clamp(min=1)
        means.append(float(mean))
        stds.append(float(var.sqrt()))
    return tuple(means), tuple(stds)


def _dataset(images: np.ndarray, labels: np.ndarray, idx: np.ndarray) -> ImageDataset:
    return ImageDataset(
        torch.from_numpy(np.ascontiguousarray(images[idx])), torch.from_numpy(labels[idx].astype(np.int64))
    )


def _stratified_split(
    labels: np.ndarray, fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Per class, move ``round(n_c * fraction)`` (at least 1, at most n_c - 1) indices to the second part."""
    keep, take = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = min(max(round(len(idx) * fraction), 1), len(idx) - 1) if len(idx) > 1 else 0
        take.append(idx[:k])
        keep.append(idx[k:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(take))


def _balanced_subset(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``n`` samples spread evenly over the classes (remainder to the lowest classes)."""
    if not 0 < n <= len(labels):
        raise DataError(f"train_subset must be in [1, {len(labels)}], got {n}")
    classes = np.unique(labels)
    base, extra = divmod(n, len(classes))
    chosen = []
    for i, c in enumerate(classes):
        quota = base + (1 if i < extra else 0)
        idx = np.flatnonzero(labels == c)
        if len(idx) < quota:
            raise DataError(f"train_subset={n} needs {quota} images of class {c}, only {len(idx)} available")
        chosen.append(rng.permutation(idx)[:quota])
    return np.sort(np.concatenate(chosen))


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None


# ---------------------------------------------------------------------------------------------
# digits


@register_format("digits", mean=None, std=None, hflip=False, crop_padding=1, takes_dir=False)
def _load_digits(directory: Path, size: tuple[int, int] | None) -> RawSplits:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    labels = digits.target.astype(np.int64)
    train, test = train_test_split(np.arange(len(labels)), test_size=0.2, stratify=labels, random_state=0)
    train, test = np.sort(train), np.sort(test)
    names = tuple(str(i) for i in range(10))
    return RawSplits(images[train], labels[train], images[test], labels[test], names)


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST (IDX)

_IDX_IMAGES, _IDX_LABELS = 0x00000803, 0x00000801
FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Read a gzipped IDX file of unsigned bytes, checking its magic number and size."""
    raw = _read_bytes(path)
    try:
        data = gzip.decompress(raw)
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot decompress ({exc})") from None
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated header ({len(data)} bytes)")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise DataError(f"{path}: bad magic number {found:#010x}, expected {magic:#010x}")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(dims))
    if len(data) - header != expected:
        raise DataError(f"{path}: {len(data) - header} data bytes, header {dims} needs {expected}")
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims)


@register_format(
    "fashion-mnist",
    mean=(0.2860,),
    std=(0.3530,),
    hflip=True,
    crop_padding=0,
    default_dir="/usr/share/datasets/fashion-mnist",
)
def _load_fashion(directory: Path, size: tuple[int, int] | None) -> RawSplits:
    splits = []
    for prefix in ("train", "t10k"):
        images = read_idx(directory / f"{prefix}-images-idx3-ubyte.gz", _IDX_IMAGES)
        label_path = directory / f"{prefix}-labels-idx1-ubyte.gz"
        labels = read_idx(label_path, _IDX_LABELS).astype(np.int64)
        if len(labels) != len(images):
            raise DataError(f"{label_path}: {len(labels)} labels for {len(images)} images")
        splits += [images[:, None], labels]
    return RawSplits(*splits, FASHION_CLASSES)


def _canvas_options() -> dict[str, Any]:
    from distill.canvas import make_canvas_dataset

    params = inspect.signature(make_canvas_dataset).parameters.values()
    return {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY and p.name != "chunk"}


@register_format(
    "fashion-mnist-canvas",
    mean=None,
    std=None,
    hflip=True,
    crop_padding=0,
    default_dir="/usr/share/datasets/fashion-mnist",
    options=_canvas_options(),
)
def _load_fashion_canvas(
    directory: Path, size: tuple[int, int] | None, seed: int, **options: Any
) -> RawSplits:
    from distill.canvas import make_canvas_dataset

    items = _load_fashion(directory, size)
    splits = []
    for images, labels, split_seed in (
        (items.train_images, items.train_labels, seed),
        (items.test_images, items.test_labels, seed + 1),
    ):
        x, y = make_canvas_dataset(
            torch.from_numpy(images.copy()), torch.from_numpy(labels), seed=split_seed, **options
        )
        splits += [x.numpy(), y.numpy()]
    return RawSplits(*splits, FASHION_CLASSES)


# ---------------------------------------------------------------------------------------------
# CIFAR-10/100 (python pickle batches)

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler limited to what CIFAR batches contain: numpy arrays and builtins."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict[str, Any]:
    raw = _read_bytes(path)
    try:
        obj = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as exc:  # a corrupt pickle can raise nearly anything
        raise DataError(f"{path}: not a CIFAR python batch ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a dict, found {type(obj).__name__}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(path)
    if "data" not in batch or label_key not in batch:
        raise DataError(f"{path}: missing 'data' or {label_key!r} entry")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: 'data' must be uint8 (N, 3072), found {data.dtype} {data.shape}")
    if labels.shape != (data.shape[0],):
        raise DataError(f"{path}: {labels.size} labels for {data.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{path}: labels outside [0, {num_classes})")
    return data.reshape(-1, 3, 32, 32), labels


def _cifar_splits(
    root: Path, train_files: list[str], test_file: str, label_key: str, names: tuple[str, ...]
) -> RawSplits:
    parts = [_cifar_batch(root / f, label_key, len(names)) for f in train_files]
    test_x, test_y = _cifar_batch(root / test_file, label_key, len(names))
    return RawSplits(
        np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), test_x, test_y, names
    )


_CIFAR_STATS10 = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
_CIFAR_STATS100 = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))


@register_format("cifar10", mean=_CIFAR_STATS10[0], std=_CIFAR_STATS10[1], hflip=True, crop_padding=4)
def _load_cifar10(directory: Path, size: tuple[int, int] | None) -> RawSplits:
    root = directory / "cifar-10-batches-py" if (directory / "cifar-10-batches-py").is_dir() else directory
    train = [f"data_batch_{i}" for i in range(1, 6)]
    return _cifar_splits(root, train, "test_batch", "labels", CIFAR10_CLASSES)


@register_format("cifar100", mean=_CIFAR_STATS100[0], std=_CIFAR_STATS100[1], hflip=True, crop_padding=4)
def _load_cifar100(directory: Path, size: tuple[int, int] | None) -> RawSplits:
    root = directory / "cifar-100-python" if (directory / "cifar-100-python").is_dir() else directory
    names = tuple(str(i) for i in range(100))
    if (root / "meta").exists():
        meta = _unpickle(root / "meta").get("fine_label_names", [])
        if len(meta) != 100:
            raise DataError(f"{root / 'meta'}: expected 100 fine_label_names, found {len(meta)}")
        names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in meta)
    return _cifar_splits(root, ["train"], "test", "fine_labels", names)


# ---------------------------------------------------------------------------------------------
# STL-10 (binary)

STL10_CLASSES = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck")


def _stl_split(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    x_path, y_path = root / f"{split}_X.bin", root / f"{split}_y.bin"
    pixels = np.frombuffer(_read_bytes(x_path), np.uint8)
    per_image = 3 * 96 * 96
    if pixels.size % per_image:
        raise DataError(f"{x_path}: {pixels.size} bytes is not a multiple of 3*96*96")
    labels = np.frombuffer(_read_bytes(y_path), np.uint8).astype(np.int64) - 1
    n = pixels.size // per_image
    if labels.size != n:
        raise DataError(f"{y_path}: {labels.size} labels for {n} images in {x_path.name}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{y_path}: labels outside 1..10")
    # stored column-major per channel: (N, C, W, H) -> (N, C, H, W)
    return pixels.reshape(n, 3, 96, 96).transpose(0, 1, 3, 2), labels


@register_format(
    "stl10", mean=(0.4467, 0.4398, 0.4066), std=(0.2603, 0.2566, 0.2713), hflip=True, crop_padding=12
)
def _load_stl10(directory: Path, size: tuple[int, int] | None) -> RawSplits:
    root = directory / "stl10_binary" if (directory / "stl10_binary").is_dir() else directory
    return RawSplits(*_stl_split(root, "train"), *_stl_split(root, "test"), STL10_CLASSES)


# ---------------------------------------------------------------------------------------------
# ImageFolder (Pillow)

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


def _read_folder(
    root: Path, classes: tuple[str, ...], size: tuple[int, int] | None, resize: bool
) -> tuple[list[np.ndarray], list[int], tuple[int, int] | None]:
    """Decode the class subfolders; resize to ``size`` or require every image to match it."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise DataError(f"{root}: imagefolder needs Pillow (pip install pillow)") from None
    images, labels = [], []
    for label, name in enumerate(classes):
        class_dir = root / name
        if not class_dir.is_dir():
            continue
        files = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
        for path in files:
            try:
                with warnings.catch_warnings():  # the size is checked below, before anything is decoded
                    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                    im = Image.open(path)
                with im:
                    width, height = im.size
                    limit = Image.MAX_IMAGE_PIXELS
                    if limit and width * height > limit:
                        raise DataError(f"{path}: {width}x{height} pixels is over Pillow's decompression limit "
                                        f"({limit:,} pixels); refusing to decode it")
                    rgb = im.convert("RGB")
            except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
                raise DataError(f"{path}: cannot decode image ({exc})") from None
            if resize:
                rgb = rgb.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            array = np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)
            if size is None:
                size = (array.shape[1], array.shape[2])
            elif array.shape[1:] != size:
                raise DataError(
                    f"{path}: size {array.shape[2]}x{array.shape[1]} differs from {size[1]}x{size[0]}; "
                    "pass image_size to resize"
                )
            images.append(array)
            labels.append(label)
    return images, labels, size


@register_format("imagefolder", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), hflip=True)
def _load_imagefolder(directory: Path, size: tuple[int, int] | None) -> RawSplits:
    train_root = directory / "train"
    if not train_root.is_dir():
        raise DataError(f"{train_root}: directory not found")
    test_root = next((directory / d for d in ("test", "val") if (directory / d).is_dir()), None)
    if test_root is None:
        raise DataError(f"{directory}: neither test/ nor val/ directory found")
    classes = tuple(sorted(p.name for p in train_root.iterdir() if p.is_dir()))
    if not classes:
        raise DataError(f"{train_root}: no class directories")
    extra = sorted({p.name for p in test_root.iterdir() if p.is_dir()} - set(classes))
    if extra:
        raise DataError(f"{test_root}: classes {extra} are not in {train_root}")
    resize = size is not None
    train_x, train_y, size = _read_folder(train_root, classes, size, resize)
    empty = [classes[i] for i in sorted(set(range(len(classes))) - set(train_y))]
    if empty:
        raise DataError(f"{train_root / empty[0]}: no .png/.jpg images")
    test_x, test_y, _ = _read_folder(test_root, classes, size, resize)
    if not test_x:
        raise DataError(f"{test_root}: no .png/.jpg images")
    return RawSplits(
        np.stack(train_x),
        np.asarray(train_y, np.int64),
        np.stack(test_x),
        np.asarray(test_y, np.int64),
        classes,
    )
