"""Capsule layers: primary capsules and fully connected capsules with routing.

Sabour, Frosst, Hinton, "Dynamic Routing Between Capsules", arXiv:1710.09829, Sec. 4.
"""

from __future__ import annotations

import torch
from torch import nn

from capsrun.layers.routing import RoutingResult, dynamic_routing
from capsrun.layers.squash import squash


class PrimaryCaps(nn.Module):
    """A convolution whose channels are grouped into ``num_types`` capsule types of ``dim``
    dimensions, squashed over ``dim`` (Sec. 4: 32 types of 8D, 9x9 kernel, stride 2).

    Input ``[batch, in_channels, H, W]``; output ``[batch, num_types * H' * W', dim]``, capsules
    ordered type-major (type, row, column).
    """

    def __init__(self, in_channels: int, num_types: int, dim: int, kernel_size: int, stride: int, padding: int = 0):
        super().__init__()
        self.num_types, self.dim = num_types, dim
        self.conv = nn.Conv2d(in_channels, num_types * dim, kernel_size, stride=stride, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        b, _, h, w = out.shape
        u = out.view(b, self.num_types, self.dim, h, w).permute(0, 1, 3, 4, 2)
        return squash(u.reshape(b, self.num_types * h * w, self.dim))


class RoutedCaps(nn.Module):
    """Fully connected capsule layer (``digit_caps`` in the paper).

    Every (child i, parent j) pair has its own transformation W_ij (``in_dim x out_dim``);
    votes are u_hat_{j|i} = W_ij u_i (Eq. 2), combined by :func:`dynamic_routing`.

    W is stored once as ``[in_caps, in_dim, out_caps * out_dim]`` and applied as one batched
    matmul over the children; it is never tiled over the batch (the public ports that do so
    use ~3x the memory and run slower).

    Args:
        bias: add a learned b_j (init 0.1) to s_j before the squash, as in the authors' code
            (Sarasra/models research/capsules); not described in the paper's text.
        weight_std: std of the normal init of W; the authors' code uses a truncated normal,
            std 0.1 is not confirmed against the paper (unconfirmed).
    """

    def __init__(
        self,
        in_caps: int,
        in_dim: int,
        out_caps: int,
        out_dim: int,
        iterations: int = 3,
        bias: bool = True,
        leaky: bool = False,
        detach_inner: bool = False,
        weight_std: float = 0.1,
    ):
        super().__init__()
        self.in_caps, self.in_dim, self.out_caps, self.out_dim = in_caps, in_dim, out_caps, out_dim
        self.iterations, self.leaky, self.detach_inner = iterations, leaky, detach_inner
        self.weight = nn.Parameter(torch.empty(in_caps, in_dim, out_caps * out_dim))
        nn.init.trunc_normal_(self.weight, std=weight_std, a=-2 * weight_std, b=2 * weight_std)
        self.bias = nn.Parameter(torch.full((out_caps, out_dim), 0.1)) if bias else None

    def votes(self, u: torch.Tensor) -> torch.Tensor:
        """``u``: ``[batch, in_caps, in_dim]`` -> u_hat ``[batch, in_caps, out_caps, out_dim]``."""
        b = u.shape[0]
        u_hat = torch.bmm(u.transpose(0, 1), self.weight)  # [in_caps, batch, out_caps*out_dim]
        return u_hat.view(self.in_caps, b, self.out_caps, self.out_dim).transpose(0, 1)

    def forward(self, u: torch.Tensor) -> RoutingResult:
        return dynamic_routing(
            self.votes(u), self.iterations, bias=self.bias, leaky=self.leaky, detach_inner=self.detach_inner
        )
