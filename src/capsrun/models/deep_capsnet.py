"""A CapsNet with routed capsule layers between the primary and the class capsules.

The paper's CapsNet (Sabour, Frosst, Hinton 2017, arXiv:1710.09829, Sec. 4) has one routed layer.
Stacking more is where capsule networks stop training: Peer et al. ("Limitation of capsule
networks", Pattern Recognition Letters 2021) and Mitterreiter et al. (arXiv:2301.01583, AAAI 2023)
report vanishing gradients that leave most capsules of intermediate layers inactive
("starvation"). This model exists to reproduce and measure that with :mod:`capsrun.diagnostics`.

Shapes (MNIST, ``hidden_caps=[32, 32]``, ``hidden_dims=8``): x [B, 1, 28, 28] -> conv1
[B, 256, 20, 20] -> primary_caps [B, 1152, 8] -> hidden_caps.0 [B, 32, 8] -> hidden_caps.1
[B, 32, 8] -> digit_caps [B, 10, 16] -> lengths [B, 10] -> decoder, as in CapsNet.

Every routed layer is a :class:`~capsrun.layers.RoutedCaps` with the same routing settings (our
choice: the papers above give no per-layer recipe); an intermediate capsule's output is its
squashed v_j, which becomes the next layer's u_i. With ``hidden_caps=[]`` this is CapsNet itself.
"""

from __future__ import annotations

from collections.abc import Sequence

from capsrun.models.capsnet import CapsNet


class DeepCapsNet(CapsNet):
    """CapsNet's conv1, primary capsules and decoder around a stack of routed capsule layers.

    Args:
        hidden_caps: capsules per intermediate layer, e.g. ``[32, 32, 32]``.
        hidden_dims: their dimensions, one int for all or one per layer.
        The remaining arguments are :class:`~capsrun.models.capsnet.CapsNet`'s, which builds the
        stack (layers in forward order: conv1, primary, hidden_caps.0, ..., digit_caps, decoder).
    """

    def __init__(self, hidden_caps: Sequence[int] = (32,), hidden_dims: int | Sequence[int] = 8, **capsnet):
        super().__init__(hidden_caps=hidden_caps, hidden_dims=hidden_dims, **capsnet)
