"""Datasets, one file each, and the in-memory batch loader."""

from __future__ import annotations

from pathlib import Path

import torch

from capsrun.data.loader import BatchLoader, random_shift
from capsrun.data.mnist import FASHION_MNIST, MNIST, load_idx_split

_IDX = {"mnist": MNIST, "fashion_mnist": FASHION_MNIST}
DATASETS = tuple(_IDX)


def load_split(name: str, root: str | Path, train: bool, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images uint8 [N, C, H, W], labels int64 [N])`` of a named dataset's split."""
    if name not in _IDX:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return load_idx_split(_IDX[name], root, train, download)


def subset(images: torch.Tensor, labels: torch.Tensor, limit: int | None, seed: int = 0):
    """A fixed, seeded subset of ``limit`` examples (all of them for ``None``), in file order."""
    if limit is None or limit >= len(labels):
        return images, labels
    idx = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:limit].sort().values
    return images[idx], labels[idx]


__all__ = ["DATASETS", "BatchLoader", "load_split", "random_shift", "subset"]
