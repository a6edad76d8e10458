"""Datasets, one file each, and the loaders of each paper protocol.

:func:`make_loaders` is the one entry point: a dataset name and plain arguments in, a training
loader and named test loaders out. Every loader yields ``(x, y)`` or, for MultiMNIST,
``(x, y [B, 2], base_alone, partner_alone)``, and replays an epoch from ``(seed, epoch)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from capsrun.datasets import affnist, cifar10
from capsrun.datasets.loader import PLACEMENTS, BatchLoader, Placement, random_shift
from capsrun.datasets.mnist import FASHION_MNIST, MNIST, load_idx_split
from capsrun.datasets.multimnist import MultiMNISTLoader
from capsrun.errors import ConfigError

_IDX = {"mnist": MNIST, "fashion_mnist": FASHION_MNIST}
DATASETS = ("mnist", "fashion_mnist", "affnist", "multimnist", "cifar10")


def load_split(name: str, root: str | Path, train: bool, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images uint8 [N, C, H, W], labels int64 [N])`` of an IDX dataset's split."""
    if name not in _IDX:
        raise ValueError(f"unknown dataset {name!r} (not an IDX dataset); known: {', '.join(_IDX)}")
    return load_idx_split(_IDX[name], root, train, download)


def subset(images: torch.Tensor, labels: torch.Tensor, limit: int | None, seed: int = 0):
    """A fixed, seeded subset of ``limit`` examples (all of them for ``None``), in file order."""
    if limit is None or limit >= len(labels):
        return images, labels
    idx = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:limit].sort().values
    return images[idx], labels[idx]


def holdout(n: int, val_split: int | float | None, seed: int = 0) -> torch.Tensor:
    """Indices of a fixed validation subset of a training split of ``n`` examples: ``val_split``
    examples (an int) or that fraction of them (a float in (0, 1)); none for None or 0. Seeded by
    ``seed`` alone, so every run of a sweep holds out the same images."""
    if not val_split:
        return torch.zeros(0, dtype=torch.long)
    k = int(val_split) if val_split >= 1 else round(val_split * n)
    if not 0 < k < n:
        raise ConfigError(f"data.val_split={val_split} leaves no training or no validation images of {n}; e.g. 5000")
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].sort().values


@dataclass
class Loaders:
    """``train`` (None for evaluation only) and the evaluation sets by name: ``"test"`` first,
    then ``"val"`` (held out from the training split, with ``val_split``) and any the protocol
    adds (``"affnist"``). ``best.pt`` is picked on ``"val"`` when there is one, else ``"test"``."""

    train: BatchLoader | MultiMNISTLoader | None
    evals: dict[str, BatchLoader | MultiMNISTLoader]


@dataclass(frozen=True)
class Batching:
    """How a protocol's loaders batch: ``batch_size`` for training, ``eval_batch_size`` for the
    evaluation sets, ``seed`` for the epochs' order and augmentation, and where they live
    (``at``: :class:`~capsrun.datasets.loader.Placement`; MultiMNIST's source digits always live
    on ``at.device``: 47 MB)."""

    batch_size: int
    eval_batch_size: int
    seed: int = 0
    at: Placement = Placement()


@dataclass(frozen=True)
class _Source:
    """What a protocol's builder reads: ``split(train, limit)`` (images and labels of a split,
    :func:`_split`), the data ``root`` and whether to ``download``, whether to build the ``train``
    loader and the limits of each split, and the :class:`Batching`."""

    split: Callable
    root: Path
    download: bool
    train: bool
    train_limit: int | None
    test_limit: int | None
    batching: Batching


def make_loaders(
    name: str,
    root: str | Path,
    batching: Batching,
    *,
    download: bool,
    train: bool = True,
    train_limit: int | None = None,
    test_limit: int | None = None,
    val_split: int | float | None = None,
    **options,
) -> Loaders:
    """Loaders of one protocol; ``options`` are the dataset config's own keys (see ``conf/dataset``).
    ``val_split`` holds out that many (or that fraction of) training images as ``"val"``,
    evaluated like the test set (:func:`holdout`); ``train_limit`` then subsets the rest."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    split = partial(_split, name, root, download, val_split, "test")
    source = _Source(split, Path(root), download, train, train_limit, test_limit, batching)
    loaders = _BUILDERS[name](source, **options)
    if val_split:
        # the held-out training images through the protocol's own test-time path
        val_split_fn = partial(_split, name, root, download, val_split, "val")
        opts = {**options, "affnist_limit": 0} if name == "affnist" else options
        val = _BUILDERS[name](_Source(val_split_fn, Path(root), download, False, None, None, batching), **opts)
        loaders.evals["val"] = val.evals["test"]
    return loaders


def _split(name: str, root, download: bool, val_split, test_part: str, train: bool, limit: int | None):
    """The training split less its validation images, or the test split; with
    ``test_part="val"`` the validation images stand in for the test split."""
    from_train = train or test_part == "val"
    if name == "cifar10":
        x, y = cifar10.load_cifar10_split(root, from_train, download)
    else:
        x, y = load_split("mnist" if name in ("affnist", "multimnist") else name, root, from_train, download)
    if from_train and val_split:
        idx = holdout(len(y), val_split)
        if not train:
            return x[idx], y[idx]
        keep = torch.ones(len(y), dtype=torch.bool)
        keep[idx] = False
        x, y = x[keep], y[keep]
    return subset(x, y, limit)


def _idx(src: _Source, max_shift: int = 2) -> Loaders:
    """MNIST / Fashion-MNIST (arXiv:1710.09829 Sec. 5): shifts of up to ``max_shift`` px."""
    b = src.batching
    test = BatchLoader(*src.split(False, src.test_limit), b.eval_batch_size, at=b.at)
    tr = BatchLoader(*src.split(True, src.train_limit), b.batch_size, True, max_shift, b.seed, b.at)
    return Loaders(tr if src.train else None, {"test": test})


def _affnist(src: _Source, max_shift=6, canvas=40, affnist_limit=None) -> Loaders:
    """Sec. 5.2: train on MNIST at a random shift of up to 6 px on a 40x40 canvas; test on the
    padded MNIST test set (``test``) and on the first ``affnist_limit`` affNIST images (``affnist``;
    all for None, none for 0)."""
    b = src.batching
    x, y = src.split(False, src.test_limit)
    tests = {"test": BatchLoader(affnist.pad_to_canvas(x, canvas), y, b.eval_batch_size, at=b.at)}
    if affnist_limit != 0:
        affine = affnist.load_affnist_test(src.root, src.download, affnist_limit)
        tests["affnist"] = BatchLoader(*affine, b.eval_batch_size, at=b.at)
    tr = None
    if src.train:
        x, y = src.split(True, src.train_limit)
        tr = BatchLoader(affnist.pad_to_canvas(x, canvas), y, b.batch_size, True, max_shift, b.seed, b.at)
    return Loaders(tr, tests)


def _multimnist(src: _Source, max_shift=4, canvas=36, test_size=10000, test_seed=0, epoch_size=None) -> Loaders:
    """Sec. 6: pairs of digits drawn on the fly; the test set is a fixed draw of ``test_size``
    images from the MNIST test digits, seeded by ``test_seed`` (not the run's seed, so every run
    meets the same test set)."""
    b, dev = src.batching, src.batching.at.device
    test = MultiMNISTLoader(
        *src.split(False, src.test_limit), b.eval_batch_size, max_shift, canvas, seed=test_seed, epoch_size=test_size,
        device=dev,
    )  # fmt: skip
    tr = None
    if src.train:
        tr = MultiMNISTLoader(
            *src.split(True, src.train_limit), b.batch_size, max_shift, canvas, seed=b.seed, epoch_size=epoch_size,
            device=dev,
        )  # fmt: skip
    return Loaders(tr, {"test": test})


def _cifar10(src: _Source, crop=24) -> Loaders:
    """Sec. 7 and the authors' code: random crop, flip, brightness/contrast jitter and per-image
    standardisation for training; central crop and standardisation at test."""
    b = src.batching
    test = BatchLoader(
        *src.split(False, src.test_limit),
        b.eval_batch_size,
        at=b.at,
        transform=lambda x, gen: cifar10.eval_transform(x, crop),
    )
    tr = None
    if src.train:
        train_transform = partial(cifar10.train_transform, size=crop)
        tr = BatchLoader(*src.split(True, src.train_limit), b.batch_size, True, 0, b.seed, b.at, train_transform)
    return Loaders(tr, {"test": test})


_BUILDERS = {"mnist": _idx, "fashion_mnist": _idx, "affnist": _affnist, "multimnist": _multimnist, "cifar10": _cifar10}

__all__ = [
    "DATASETS",
    "PLACEMENTS",
    "BatchLoader",
    "Batching",
    "Loaders",
    "MultiMNISTLoader",
    "Placement",
    "load_split",
    "make_loaders",
    "random_shift",
    "subset",
]


def options(name: str) -> set[str]:
    """The protocol options dataset ``name`` takes (its config keys beyond name and shape)."""
    import inspect

    params = inspect.signature(_BUILDERS[name]).parameters
    return {k for k, p in list(params.items())[1:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
