"""A plain Bernoulli-Bernoulli restricted Boltzmann machine: the anchor of the capsule RBM.

Smolensky 1986; Hinton, "Training products of experts by minimizing contrastive divergence",
Neural Computation 2002 (CD-k); Tieleman, ICML 2008 (PCD). Binary pixels v in {0, 1}^V, binary
hidden units h in {0, 1}^H, weights W [H, V], biases a [V] (visible) and b [H] (hidden):

    E(v, h) = -a . v - b . h - h . W v
    p(h_j = 1 | v) = sigmoid((W v + b)_j),        p(v_k = 1 | h) = sigmoid((W^T h + a)_k)
    F(v) = -a . v - sum_j softplus((W v + b)_j)

Both conditionals factorise, so the chain is exact block Gibbs (acceptance 1). It is to the
capsule RBM (:mod:`capsrun.models.capsrbm`) what the baseline CNN is to CapsNet: every figure of
the capsule model stands beside this one's, trained the same way on the same images. Published:
500 hidden units, CD-25, test log-likelihood -86.34 nats on (stochastically binarised) MNIST by AIS
(Salakhutdinov & Murray, ICML 2008, Table 1).

Shapes: x [B, 1, 28, 28] -> v [B, 784] -> W v + b [B, H] -> F(v) [B].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from capsrun.mcmc.base import Beta
from capsrun.models.energy import EnergyModel, bernoulli, per_row, softplus


class RBM(EnergyModel):
    """See the module docstring; chains, PCD and the output are :class:`EnergyModel`'s."""

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 28,
        num_classes: int | None = None,  # unused: the model never sees labels
        hidden: int = 500,
        weight_std: float = 0.01,
        **training,
    ):
        """``training``: how it is trained (:class:`~capsrun.models.energy.EnergyModel`:
        ``cd_steps``, ``persistent``, ``chains``, ``tempering``, ...)."""
        super().__init__((in_channels, image_size, image_size), **training)
        if hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {hidden}")
        self.weight = nn.Parameter(torch.randn(hidden, len(self.visible_bias)) * weight_std)
        self.hidden_bias = nn.Parameter(torch.zeros(hidden))

    def encode(self, v: torch.Tensor) -> torch.Tensor:
        """The hidden units' inputs W v + b ``[B, H]``."""
        return F.linear(v.flatten(1), self.weight, self.hidden_bias)

    def hidden_energy(self, enc: torch.Tensor, beta: Beta) -> torch.Tensor:
        return softplus(per_row(beta, 2) * enc).sum(-1)

    def log_hidden_states(self) -> float:
        return len(self.hidden_bias) * math.log(2)

    def firing(self, enc: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(enc)

    def _visible_prob(self, h: torch.Tensor, beta: Beta = 1.0, base: torch.Tensor | None = None) -> torch.Tensor:
        """p_beta(v = 1 | h) ``[B, V]``."""
        return torch.sigmoid(self.visible_input(h @ self.weight, beta, base))

    @torch.no_grad()
    def transition(self, v, enc, beta: Beta = 1.0, base: torch.Tensor | None = None, encode: bool = True):
        """Block Gibbs: h ~ p_beta(h | v), then v ~ p_beta(v | h); always accepted."""
        h = bernoulli(torch.sigmoid(per_row(beta, 2) * enc))
        v = bernoulli(self._visible_prob(h, beta, base)).view_as(v)
        return v, self.encode(v) if encode else None, torch.ones(len(v), device=v.device)

    @torch.no_grad()
    def up_down(self, v: torch.Tensor) -> torch.Tensor:
        h = bernoulli(self.hidden_prob(v))
        return self._visible_prob(h).view_as(v)
