"""A capsule RBM: a product of expert capsules, mixed by dynamic routing, trained without labels.

Principle (Hauser, "Training products of expert capsules with mixing by dynamic routing",
arXiv:1907.11643, 2019; companion arXiv:1907.11639, trained by contrastive divergence): by
analogy with the binary hidden units of an RBM, the length of a squashed capsule is the
probability that the capsule is on; an energy with no hidden-hidden connections makes the hidden
capsules independent given the visible layer, and the probability of a capsule firing agrees with
dynamic routing. The sources give no more than that; the energy below is capsrun's own
(../shared/spec/generative.md).

Visible layer: binary pixels v in {0, 1}^(C*H*W), cut into non-overlapping ``patch x patch``
visible capsules v_i (dimension C * patch^2). Hidden layer: N capsules of D dimensions with
on/off states z_j in {0, 1}. Votes u_hat_{j|i} = W_ij v_i, couplings c_ij(v) from dynamic
routing (arXiv:1710.09829, Procedure 1, reused from :class:`~capsrun.layers.RoutedCaps`), and

    s_j(v) = sum_i c_ij(v) u_hat_{j|i} + b_j                                  (total input)
    E(v, z) = -a . v - sum_j z_j log |s_j(v)|^2                                (energy)

Hidden conditional (no hidden-hidden terms, so it factorises):

    p(z_j = 1 | v) = exp(log|s_j|^2) / (1 + exp(log|s_j|^2)) = |s_j|^2 / (1 + |s_j|^2) = |squash(s_j)|

which is exactly the length of the routed, squashed capsule. Free energy (z summed out):

    F(v) = -a . v - sum_j log(1 + |s_j(v)|^2),        p(v) = exp(-F(v)) / Z.

Log-likelihood gradient (theta = W, b, a):

    d log p(v) / d theta = -dF(v)/d theta + E_{v' ~ p} [dF(v')/d theta],

estimated with model samples v' from Markov chains (CD-k: k steps started at the data; PCD:
persistent chains) as the gradient of the surrogate loss mean F(v_data) - mean F(v_model), v_model
detached (:meth:`CapsuleRBM.surrogate_loss`).

Visible conditional: p(v | z) ~ exp(a . v + sum_j z_j log |s_j(v)|^2) does not factorise over
pixels, because routing and the norm make s_j non-linear in v. capsrun samples it by
Metropolis-Hastings with a factorial proposal from the energy's gradient (ours; the idea of
Grathwohl et al., "Oops I took a gradient", ICML 2021): q(v' | v) = prod_i Bernoulli(sigma(-dE/dv_i
at v)), accepted with the MH ratio, so the chain leaves p(v | z) invariant exactly. Without the MH
test (``mh=False``) the step is the linearised conditional alone: faster mixing, biased.

Shapes (MNIST, patch 4): x [B, 1, 28, 28] -> visible capsules [B, 49, 16] -> votes
[B, 49, N, D] -> s [B, N, D] -> p(z | v) [B, N]; F(v) [B].
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from capsrun.layers import RoutedCaps

_TINY = 1e-12  # log |s|^2 of an exactly zero total input: the energy of z_j = 1 stays finite


class RBMOutput(NamedTuple):
    """``hidden_prob`` [B, N]: p(z_j = 1 | v); ``free_energy`` [B]; ``reconstruction``
    [B, C, H, W]: the mean of the linearised visible conditional after one up-down pass."""

    hidden_prob: torch.Tensor
    free_energy: torch.Tensor
    reconstruction: torch.Tensor


class CapsuleRBM(nn.Module):
    """See the module docstring for the energy, the conditionals and the gradient."""

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 28,
        num_classes: int | None = None,  # unused: the model never sees labels
        patch: int = 4,
        hidden_caps: int = 64,
        hidden_dim: int = 8,
        routing_iterations: int = 3,
        routing_leaky: bool = False,
        weight_std: float = 0.05,
    ):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image_size {image_size} must be a multiple of patch {patch}")
        self.image_shape = (in_channels, image_size, image_size)
        self.patch = patch
        n_visible = (image_size // patch) ** 2
        self.hidden = RoutedCaps(
            n_visible,
            in_channels * patch * patch,
            hidden_caps,
            hidden_dim,
            iterations=routing_iterations,
            bias=True,
            leaky=routing_leaky,
            weight_std=weight_std,
        )
        self.visible_bias = nn.Parameter(torch.zeros(in_channels * image_size * image_size))

    # --- the energy and what follows from it ------------------------------------------------

    def visible_caps(self, v: torch.Tensor) -> torch.Tensor:
        """``v`` [B, C, H, W] -> visible capsules [B, patches, C * patch^2] (row-major patches)."""
        cols = F.unfold(v, kernel_size=self.patch, stride=self.patch)  # [B, C*p*p, patches]
        return cols.transpose(1, 2)

    def total_input_sq(self, v: torch.Tensor) -> torch.Tensor:
        """|s_j(v)|^2 ``[B, N]``: the squared total input of each hidden capsule after routing."""
        return self.hidden(self.visible_caps(v)).s.pow(2).sum(-1)

    def hidden_prob(self, v: torch.Tensor) -> torch.Tensor:
        """p(z_j = 1 | v) = |s_j|^2 / (1 + |s_j|^2), the squashed capsule's length ``[B, N]``."""
        sq = self.total_input_sq(v)
        return sq / (1.0 + sq)

    def energy(self, v: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """E(v, z) ``[B]`` for visible ``v`` [B, C, H, W] and hidden states ``z`` [B, N]."""
        sq = self.total_input_sq(v)
        return -(v.flatten(1) @ self.visible_bias) - (z * torch.log(sq + _TINY)).sum(-1)

    def free_energy(self, v: torch.Tensor) -> torch.Tensor:
        """F(v) = -log sum_z exp(-E(v, z)) = -a.v - sum_j log(1 + |s_j|^2), ``[B]``."""
        return -(v.flatten(1) @ self.visible_bias) - torch.log1p(self.total_input_sq(v)).sum(-1)

    # --- sampling -----------------------------------------------------------------------------

    def sample_hidden(self, v: torch.Tensor) -> torch.Tensor:
        return torch.bernoulli(self.hidden_prob(v))

    def _proposal_logits(
        self, v: torch.Tensor, z: torch.Tensor, temperature: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """E(v, z) and the logits -dE/dv / T of the factorial proposal, per pixel."""
        with torch.enable_grad():
            v = v.detach().requires_grad_(True)
            e = self.energy(v, z)
            (grad,) = torch.autograd.grad(e.sum(), v)
        return e.detach(), -grad / temperature

    @torch.no_grad()
    def sample_visible(
        self, v: torch.Tensor, z: torch.Tensor, mh: bool = True, temperature: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One step of a chain that leaves p(v | z) invariant (``mh``) or of its linearised
        approximation. Returns the new ``v`` (binary, [B, C, H, W]) and per-chain acceptance [B]."""
        e, logits = self._proposal_logits(v, z, temperature)
        proposal = torch.bernoulli(torch.sigmoid(logits))
        if not mh:
            return proposal, torch.ones(len(v), device=v.device)
        e_new, logits_new = self._proposal_logits(proposal, z, temperature)

        def log_q(target, lg):  # log prod_i Bernoulli(target_i; sigmoid(lg_i))
            return -F.binary_cross_entropy_with_logits(lg, target, reduction="none").flatten(1).sum(-1)

        log_ratio = (e - e_new) / temperature + log_q(v, logits_new) - log_q(proposal, logits)
        accept = torch.rand_like(log_ratio).log() < log_ratio
        return torch.where(accept.view(-1, 1, 1, 1), proposal, v), accept.float()

    @torch.no_grad()
    def gibbs(
        self, v: torch.Tensor, steps: int, mh: bool = True, temperature: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``steps`` alternations z ~ p(z | v), v ~ p(v | z); returns v and the mean acceptance."""
        acceptance = torch.zeros((), device=v.device)
        for _ in range(steps):
            v, acc = self.sample_visible(v, self.sample_hidden(v), mh=mh, temperature=temperature)
            acceptance = acceptance + acc.mean()
        return v, acceptance / max(steps, 1)

    @torch.no_grad()
    def reconstruct(self, v: torch.Tensor) -> torch.Tensor:
        """One up-down pass: z ~ p(z | v), then the mean sigma(-dE/dv) of the linearised visible
        conditional, ``[B, C, H, W]`` in (0, 1)."""
        _, logits = self._proposal_logits(v, self.sample_hidden(v), 1.0)
        return torch.sigmoid(logits)

    def surrogate_loss(self, v_data: torch.Tensor, v_model: torch.Tensor) -> torch.Tensor:
        """mean F(v_data) - mean F(v_model): its gradient is minus the log-likelihood gradient
        estimated with the model samples ``v_model`` (treated as constants)."""
        return self.free_energy(v_data).mean() - self.free_energy(v_model.detach()).mean()

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> RBMOutput:
        """``x`` [B, C, H, W]: binary visible states (or pixel probabilities at evaluation)."""
        return RBMOutput(self.hidden_prob(x), self.free_energy(x), self.reconstruct(x))
