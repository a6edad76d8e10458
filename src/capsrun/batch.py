"""The batch format every loader yields and every consumer reads: ``(x, y)``, or for two
objects per image (MultiMNIST) ``(x, y [B, 2], first object alone, second alone)``."""

from __future__ import annotations

import torch

from capsrun.metrics import predictions


def unpack(batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x, y, reconstruction target)`` of a batch: the target is ``x`` itself, or for
    MultiMNIST batches ``(x, y [B, 2], base_alone, partner_alone)`` the two digits alone
    ``[B, 2, C, H, W]``."""
    if len(batch) == 2:
        x, y = batch
        return x, y, x
    x, y, *alone = batch
    return x, y, torch.stack(alone, dim=1)


def aligned_top(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The k longest capsules ``[B, k]``, ordered like ``labels`` where they match, so that at test
    time reconstruction i (of a predicted class) is compared with digit i alone."""
    top = predictions(scores, labels.shape[1])
    if labels.shape[1] == 2:
        swap = (top[:, 0] == labels[:, 1]) | (top[:, 1] == labels[:, 0])
        top = torch.where(swap[:, None], top.flip(-1), top)
    return top


def first_images(loader, limit: int) -> torch.Tensor:
    """The first ``limit`` images of a loader's epoch 0, [N, C, H, W] (the reference images for
    sample quality, the base-rate model of AIS)."""
    return first_labelled(loader, limit)[0]


def first_labelled(loader, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``limit`` images [N, C, H, W] of a loader's epoch 0 and their labels [N] (what a
    :class:`~capsrun.judge.Judge` is calibrated on)."""
    images, labels, n = [], [], 0
    for batch in loader.epoch(0):
        x, y = unpack(batch)[:2]
        images.append(x)
        labels.append(y)
        n += len(x)
        if n >= limit:
            break
    return torch.cat(images)[:limit], torch.cat(labels)[:limit]
