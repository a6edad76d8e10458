"""CapsNet with dynamic routing.

Sabour, Frosst, Hinton, "Dynamic Routing Between Capsules", NIPS 2017, arXiv:1710.09829, Sec. 4
(architecture, Fig. 1), Sec. 4.1 (reconstruction as a regulariser, Fig. 2).

MNIST shapes: input [B, 1, 28, 28] -> conv1 (256, 9x9, ReLU) [B, 256, 20, 20]
-> primary_caps (32 types x 8D, 9x9, stride 2) [B, 1152, 8] -> digit_caps (10 x 16D, routing)
[B, 10, 16] -> lengths [B, 10] -> decoder (masked 160 -> 512 -> 1024 -> 784, sigmoid).
8,215,568 parameters without capsule biases; 8,215,728 with the digit-capsule bias.

Deliberate deviations, all configurable:
- ``capsule_bias`` (default on): a learned b_j added to s_j before the squash, as in the
  authors' code; the paper's text has none.
- ``padding`` (default 0): the CIFAR10 model of the paper uses SAME padding.
- ``routing_leaky``/``routing_detach_inner``: see :func:`capsrun.layers.dynamic_routing`.
- ``hidden_caps`` (default none): routed capsule layers between the primary and the class
  capsules, for :mod:`capsrun.models.deep_capsnet`.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from capsrun.layers import PrimaryCaps, RoutedCaps


class CapsNetOutput(NamedTuple):
    """``lengths`` [B, classes] (class scores); ``digit_caps`` [B, classes, dim];
    ``coupling`` [B, primary caps, classes]; ``reconstruction`` [B, C, H, W], or
    [B, k, C, H, W] for k labels per image (MultiMNIST), or None without a decoder."""

    lengths: torch.Tensor
    digit_caps: torch.Tensor
    coupling: torch.Tensor
    reconstruction: torch.Tensor | None

    @property
    def scores(self) -> torch.Tensor:
        """Class scores for the engine: the capsule lengths (Sec. 3: length = probability)."""
        return self.lengths


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def capsule_trunk(
    in_channels: int,
    image_size: int,
    conv1_channels: int,
    conv1_kernel: int,
    primary_types: int,
    primary_dim: int,
    primary_kernel: int,
    primary_stride: int,
    padding: int,
) -> tuple[nn.Conv2d, PrimaryCaps, int]:
    """The trunk every capsule model here shares (Sec. 4, Fig. 1): ``conv1`` (ReLU applied by the
    caller), the primary capsules, and how many primary capsules an image makes
    (``primary_types`` x side x side; 1152 for MNIST)."""
    conv1 = nn.Conv2d(in_channels, conv1_channels, conv1_kernel, padding=padding)
    primary_caps = PrimaryCaps(
        conv1_channels, primary_types, primary_dim, primary_kernel, primary_stride, padding=padding
    )
    side = _conv_out(_conv_out(image_size, conv1_kernel, 1, padding), primary_kernel, primary_stride, padding)
    if side < 1:
        raise ValueError(f"image_size {image_size} is too small for the conv1/primary kernels")
    return conv1, primary_caps, primary_types * side * side


def capsule_lengths(v: torch.Tensor) -> torch.Tensor:
    """``||v_j||`` ``[B, caps]`` of capsules ``v`` ``[B, caps, dim]``, in fp32 also under bf16
    autocast: lengths near 1 (the margin loss's m+ = 0.9) need more than bf16's 8 bits."""
    return torch.sqrt(v.float().pow(2).sum(-1) + 1e-8)


def masked_reconstruction(decoder: Decoder, caps: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Decode ``caps`` [B, classes, dim] masked to ``labels``: ``[B]`` class indices give
    ``[B, C, H, W]``; ``[B, k]`` give k reconstructions ``[B, k, C, H, W]``, one per label, as for
    the two digits of a MultiMNIST image (Sec. 6)."""
    if labels.dim() == 1:
        return decoder(caps, F.one_hot(labels, num_classes))
    return torch.stack([decoder(caps, F.one_hot(labels[:, i], num_classes)) for i in range(labels.shape[1])], 1)


class Decoder(nn.Module):
    """Three FC layers from the masked digit capsules to the image (Fig. 2).

    Input ``[B, classes, dim]`` and the mask ``[B, classes]``; output ``[B, C, H, W]`` in (0, 1).
    """

    def __init__(self, num_classes: int, dim: int, hidden: tuple[int, ...], image_shape: tuple[int, int, int]):
        super().__init__()
        self.image_shape = image_shape
        sizes = [num_classes * dim, *hidden]
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(sizes):
            layers += [nn.Linear(a, b), nn.ReLU(inplace=True)]
        layers.append(nn.Linear(sizes[-1], image_shape[0] * image_shape[1] * image_shape[2]))
        self.net = nn.Sequential(*layers)

    def forward(self, digit_caps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        masked = (digit_caps * mask.unsqueeze(-1).to(digit_caps.dtype)).flatten(1)
        return torch.sigmoid(self.net(masked)).view(-1, *self.image_shape)


class CapsNet(nn.Module):
    """The paper's three-layer CapsNet; see the module docstring for shapes and deviations."""

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 28,
        num_classes: int = 10,
        conv1_channels: int = 256,
        conv1_kernel: int = 9,
        primary_types: int = 32,
        primary_dim: int = 8,
        primary_kernel: int = 9,
        primary_stride: int = 2,
        padding: int = 0,
        digit_dim: int = 16,
        routing_iterations: int = 3,
        routing_leaky: bool = False,
        routing_detach_inner: bool = False,
        capsule_bias: bool = True,
        weight_std: float = 0.1,
        decoder_hidden: tuple[int, ...] | list[int] | None = (512, 1024),
        hidden_caps: Sequence[int] = (),
        hidden_dims: int | Sequence[int] = 8,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.conv1, self.primary_caps, self.num_primary_caps = capsule_trunk(
            in_channels, image_size, conv1_channels, conv1_kernel, primary_types, primary_dim, primary_kernel,
            primary_stride, padding,
        )  # fmt: skip
        routing = dict(
            iterations=routing_iterations,
            bias=capsule_bias,
            leaky=routing_leaky,
            detach_inner=routing_detach_inner,
            weight_std=weight_std,
        )
        # routed capsule layers between the primary and the class capsules: none in the paper
        # (arXiv:1710.09829); models.deep_capsnet stacks them
        hidden_caps = list(hidden_caps)
        dims = [hidden_dims] * len(hidden_caps) if isinstance(hidden_dims, int) else list(hidden_dims)
        if len(dims) != len(hidden_caps) or any(n < 1 for n in hidden_caps) or any(d < 1 for d in dims):
            raise ValueError(f"hidden_caps {hidden_caps} and hidden_dims {hidden_dims} must be positive, one per layer")
        sizes = [(self.num_primary_caps, primary_dim), *zip(hidden_caps, dims)]
        self.hidden_caps = nn.ModuleList(
            RoutedCaps(n_in, d_in, n_out, d_out, **routing)
            for (n_in, d_in), (n_out, d_out) in itertools.pairwise(sizes)
        )
        self.digit_caps = RoutedCaps(*sizes[-1], num_classes, digit_dim, **routing)
        self.decoder = (
            Decoder(num_classes, digit_dim, tuple(decoder_hidden), (in_channels, image_size, image_size))
            if decoder_hidden is not None
            else None
        )

    def reconstruct(self, digit_caps: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """:func:`masked_reconstruction` of ``digit_caps`` [B, classes, dim] for ``labels``."""
        return masked_reconstruction(self.decoder, digit_caps, labels, self.num_classes)

    def primary(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [B, C, H, W] -> the primary capsules ``u`` [B, primary caps, primary dim]."""
        return self.primary_caps(F.relu(self.conv1(x), inplace=True))

    def route(self, u: torch.Tensor):
        """The routed layers from the primary capsules ``u`` to the class capsules: the hidden
        capsule layers (none in the paper), each passing its squashed v_j on as the next layer's
        u_i, then the class capsules, whose ``coupling`` is returned."""
        for layer in self.hidden_caps:
            u = layer(u).v
        return self.digit_caps(u)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> CapsNetOutput:
        """``x``: ``[B, C, H, W]``. The decoder reconstructs the capsules of ``labels`` (see
        :meth:`reconstruct`) when given, as in training, else the longest capsule, as at test."""
        routed = self.route(self.primary(x))
        v = routed.v
        lengths = capsule_lengths(v)
        reconstruction = None
        if self.decoder is not None:
            reconstruction = self.reconstruct(v, lengths.argmax(dim=-1) if labels is None else labels)
        return CapsNetOutput(lengths, v, routed.coupling, reconstruction)
