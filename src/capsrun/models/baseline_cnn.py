"""The baseline CNNs that CapsNet is compared with, and their cross-entropy objective.

Sabour, Frosst, Hinton, "Dynamic Routing Between Capsules", NIPS 2017, arXiv:1710.09829.

:class:`BaselineCNN` (Sec. 5, MNIST): three conv layers of 256, 256, 128 channels, 5x5, stride 1,
SAME padding, ReLU, no pooling; FC 328, FC 192, dropout, FC 10 (softmax cross-entropy).
Shapes: ``[B, 1, 28, 28]`` -> ``[B, 256, 28, 28]`` -> ``[B, 256, 28, 28]`` -> ``[B, 128, 28, 28]``
-> flatten 100,352 -> 328 -> 192 -> 10 logits. With biases everywhere this is exactly
35,445,522 parameters (the paper's "35.4M"): conv 6,656 + 1,638,656 + 819,328; FC 32,915,784 +
63,168 + 1,930. Almost all of it (93%) is the first FC layer, because nothing pools.

:class:`BaselineCNNMulti` (Sec. 6, MultiMNIST; the wording is unconfirmed against the paper's
text): conv 512 9x9 -> maxpool 2 -> conv 256 5x5 -> maxpool 2 -> FC 1024 -> FC 10, SAME padding,
ReLU, sigmoid cross-entropy. Shapes: ``[B, 1, 36, 36]`` -> ``[B, 512, 36, 36]`` -> pool
``[B, 512, 18, 18]`` -> ``[B, 256, 18, 18]`` -> pool ``[B, 256, 9, 9]`` -> flatten 20,736 -> 1024
-> 10. Exactly 24,563,978 parameters (conv 41,984 + 3,277,056; FC 21,234,688 + 10,250), which
agrees with the spec's "24.56M", so the wording is at least consistent with the published size.

Deliberate choices the paper does not state, all configurable:
- dropout (MNIST model) sits after the ReLU of FC 192, before the last FC, with p = 0.5; the paper
  names dropout but not its rate. The MultiMNIST wording names no dropout: default 0 there.
- PyTorch's default initialisation; SAME padding as ``kernel // 2`` (odd kernels only).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from capsrun.losses import multi_hot


class CNNOutput(NamedTuple):
    """``logits`` ``[B, classes]``."""

    logits: torch.Tensor

    @property
    def scores(self) -> torch.Tensor:
        """Class scores for the engine (predictions are ``scores.argmax``): the logits."""
        return self.logits


def _same_conv(in_channels: int, out_channels: int, kernel: int) -> nn.Conv2d:
    if kernel % 2 == 0:
        raise ValueError(f"SAME padding needs an odd kernel, got {kernel}")
    return nn.Conv2d(in_channels, out_channels, kernel, stride=1, padding=kernel // 2)


def _classifier(in_features: int, hidden: tuple[int, ...], num_classes: int, dropout: float) -> nn.Sequential:
    """FC + ReLU for each of ``hidden``, dropout, then the FC to the logits."""
    layers: list[nn.Module] = []
    for size in hidden:
        layers += [nn.Linear(in_features, size), nn.ReLU(inplace=True)]
        in_features = size
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(in_features, num_classes))
    return nn.Sequential(*layers)


class BaselineCNN(nn.Module):
    """The MNIST baseline of Sec. 5; see the module docstring for shapes and the parameter count.

    ``x``: ``[B, in_channels, image_size, image_size]`` -> :class:`CNNOutput` with logits
    ``[B, num_classes]``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 28,
        num_classes: int = 10,
        channels: tuple[int, ...] | list[int] = (256, 256, 128),
        kernel: int = 5,
        hidden: tuple[int, ...] | list[int] = (328, 192),
        dropout: float = 0.5,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        for c in channels:
            layers += [_same_conv(in_channels, c, kernel), nn.ReLU(inplace=True)]
            in_channels = c
        self.features = nn.Sequential(*layers)
        # SAME padding, stride 1 and no pooling keep the spatial size
        self.classifier = _classifier(in_channels * image_size * image_size, tuple(hidden), num_classes, dropout)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> CNNOutput:
        """``labels`` is accepted and ignored, so the engine calls every model the same way."""
        return CNNOutput(self.classifier(self.features(x).flatten(1)))


class BaselineCNNMulti(nn.Module):
    """The MultiMNIST baseline of Sec. 6 (unconfirmed wording); conv + ReLU + maxpool per stage.

    ``x``: ``[B, in_channels, image_size, image_size]`` -> :class:`CNNOutput` with logits
    ``[B, num_classes]`` (one independent sigmoid per class when trained on two labels).
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 36,
        num_classes: int = 10,
        channels: tuple[int, ...] | list[int] = (512, 256),
        kernels: tuple[int, ...] | list[int] = (9, 5),
        pool: int = 2,
        hidden: tuple[int, ...] | list[int] = (1024,),
        dropout: float = 0.0,
    ):
        super().__init__()
        if len(channels) != len(kernels):
            raise ValueError(f"one kernel per conv layer: {len(channels)} channels, {len(kernels)} kernels")
        layers: list[nn.Module] = []
        side = image_size
        for c, k in zip(channels, kernels):
            layers += [_same_conv(in_channels, c, k), nn.ReLU(inplace=True), nn.MaxPool2d(pool)]
            in_channels, side = c, side // pool
        if side < 1:
            raise ValueError(f"image_size {image_size} is too small for {len(channels)} poolings by {pool}")
        self.features = nn.Sequential(*layers)
        self.classifier = _classifier(in_channels * side * side, tuple(hidden), num_classes, dropout)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> CNNOutput:
        """``labels`` is accepted and ignored, so the engine calls every model the same way."""
        return CNNOutput(self.classifier(self.features(x).flatten(1)))


class CrossEntropyObjective(nn.Module):
    """Cross-entropy on the logits, as a dict ``{"cross_entropy", "total"}`` like :class:`CapsNetLoss`.

    ``labels`` int64 ``[B]``: softmax cross-entropy, mean over the batch (MNIST). ``labels`` int64
    ``[B, k]``, k classes present per image (MultiMNIST): one sigmoid cross-entropy per class
    against the multi-hot targets, summed over classes, mean over the batch.
    """

    def forward(self, output: CNNOutput, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = output.logits
        if labels.dim() == 1:
            loss = F.cross_entropy(logits, labels)
        else:
            targets = multi_hot(labels, logits.shape[-1]).to(logits.dtype)
            bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
            loss = bce.sum(dim=-1).mean()
        return {"cross_entropy": loss, "total": loss}
