"""Batches from a split held in memory as one uint8 tensor, augmentation done per batch.

The MNIST family (47 MB) and CIFAR10 (150 MB) fit in a GPU's memory, so by default the whole
split lives on the training device and each epoch is a seeded permutation: batches are gathered,
shifted, cropped and flipped there, with no worker processes, no per-image Python and no
host-to-device copy per step; and an epoch can be replayed exactly from ``(seed, epoch)`` to
resume in the middle of it. A split too large for the device stays in (pinned) host memory and
only each batch is copied over (``data.placement``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F


def epoch_generator(seed: int, epoch: int, batch: int | None = None) -> torch.Generator:
    """The generator of epoch ``epoch`` of a run seeded ``seed`` (and of one batch of it): every
    loader derives its shuffling, shifts and augmentation from this, so an epoch, and so a resume,
    replays exactly."""
    key = seed * 1_000_003 + epoch
    return torch.Generator().manual_seed(key if batch is None else key * 100_003 + batch)


def random_shift(images: torch.Tensor, offsets: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Shift each image by its own integer offset with zero fill (arXiv:1710.09829 Sec. 5:
    "shifted by up to 2 pixels in each direction with zero padding").

    ``images``: ``[B, C, H, W]``; ``offsets``: ``[B, 2]`` integers in ``[-max_shift, max_shift]``
    as (dy, dx); returns ``[B, C, H, W]``.
    """
    if max_shift == 0:
        return images
    b, c, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4)
    # out[r, c] = in[r - dy, c - dx]: row r of the output reads row r - dy + max_shift of padded
    rows = max_shift - offsets[:, 0:1] + torch.arange(h, device=images.device)
    cols = max_shift - offsets[:, 1:2] + torch.arange(w, device=images.device)
    batch_idx = torch.arange(b, device=images.device)[:, None, None, None]
    chan_idx = torch.arange(c, device=images.device)[None, :, None, None]
    return padded[batch_idx, chan_idx, rows[:, None, :, None], cols[:, None, None, :]]


Transform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
PLACEMENTS = ("auto", "device", "host")


def storage_device(placement: str, device: torch.device, nbytes: int) -> torch.device:
    """Where a split of ``nbytes`` lives when batches are wanted on ``device``.

    ``device``: on it (CPU training: the same thing as ``host``); ``host``: in CPU memory, each
    batch copied over; ``auto``: on a CUDA device when the split takes under a quarter of its free
    memory, else on the host.
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
    if device.type == "cpu" or placement == "device":
        return device
    if placement == "host":
        return torch.device("cpu")
    free, _ = torch.cuda.mem_get_info(device)
    return device if nbytes < free // 4 else torch.device("cpu")


class Placement(NamedTuple):
    """Where a loader yields its batches (``device``) and where it keeps its images
    (``placement``: device, host or auto; :func:`storage_device`)."""

    device: torch.device | str = "cpu"
    placement: str = "device"


class BatchLoader:
    """Iterates ``(images [B, C, H, W] float in [0, 1], labels [B])`` over an in-memory split.

    ``shuffle`` draws a permutation per epoch and ``max_shift`` random shifts, both from a
    generator seeded by ``(seed, epoch)``; ``transform(x, gen)`` (crops, flips, jitter,
    standardisation) gets a CPU generator seeded by ``(seed, epoch, batch)``. So
    ``epoch(e, start=k)`` replays epoch ``e`` from batch ``k`` exactly as an uninterrupted run
    would have seen it. ``at``: where ``images`` are kept (:func:`storage_device`); batches and
    labels are always on ``at.device``, augmentation runs there.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        shuffle: bool = False,
        max_shift: int = 0,
        seed: int = 0,
        at: Placement | None = None,
        transform: Transform | None = None,
    ):
        self.transform = transform
        at = at or Placement()
        self.device = device = torch.device(at.device)
        self.storage = storage_device(at.placement, self.device, images.numel() * images.element_size())
        self.images = images.to(self.storage)
        if self.storage.type == "cpu" and self.device.type == "cuda":
            self.images = self.images.pin_memory()
        self.labels = labels.to(device)
        self.batch_size, self.shuffle, self.max_shift, self.seed = batch_size, shuffle, max_shift, seed

    def __len__(self) -> int:
        return (len(self.labels) + self.batch_size - 1) // self.batch_size

    @property
    def num_examples(self) -> int:
        return len(self.labels)

    def epoch(self, epoch: int = 0, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.labels)
        gen = epoch_generator(self.seed, epoch)
        order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        offsets = torch.randint(-self.max_shift, self.max_shift + 1, (n, 2), generator=gen)
        stored = order.to(self.storage)
        order, offsets = order.to(self.device), offsets.to(self.device)
        for i in range(start, len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            x = self.images[stored[i * self.batch_size : (i + 1) * self.batch_size]]
            x = x.to(self.device, non_blocking=True).float().div_(255.0)
            if self.max_shift:
                x = random_shift(x, offsets[idx], self.max_shift)
            if self.transform is not None:
                x = self.transform(x, epoch_generator(self.seed, epoch, batch=i))
            yield x, self.labels[idx]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.epoch(0)
