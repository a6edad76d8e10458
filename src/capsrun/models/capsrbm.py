"""A capsule RBM: a product of expert capsules, mixed by dynamic routing, trained without labels.

Paper (Hauser, "Training products of expert capsules with mixing by dynamic routing",
arXiv:1907.11643, 2019; companion arXiv:1907.11639, trained by contrastive divergence): by
analogy with an RBM's binary hidden units, a capsule's length, in (0, 1), is the probability that
it is on; an energy with no hidden-hidden connections, so that hidden capsules are independent
given the visible layer, designed so that a capsule fires with the probability dynamic routing
gives it. The sources say no more; everything below is capsrun's design, derived and argued in
docs/capsrbm.md (why not the energy -a.v - sum_j z_j log|s_j|^2: "Energy, conditionals and free
energy").

Visible layer: binary pixels v, cut into non-overlapping ``patch x patch`` visible capsules v_i.
Hidden layer: N capsules; capsule j has an on/off switch z_j and D binary pose units h_j, which
are off when the switch is off (as the capsule RBM of Li & Zhu, 2019, which has no routing).
Votes u_{j|i} = W_ij v_i [D]; couplings c_ij(v) from routing by agreement; the routed input

    s_j(v) = N sum_i c_ij(v) u_{j|i} + beta_j                                         [D]

(times N: uniform couplings, one routing iteration, give the plain sum sum_i u_{j|i}, an RBM layer).

    E(v, z, h) = -a . v - sum_j z_j (b_j + h_j . s_j(v))
    p(z_j = 1 | v) = sigmoid(b_j + sum_d softplus(s_jd(v)))              (the capsule fires)
    p(h_jd = 1 | v, z_j = 1) = sigmoid(s_jd(v))                          (its pose)
    F(v) = -a . v - sum_j softplus(b_j + sum_d softplus(s_jd(v)))

Deviations from the paper's words, ours: the firing probability is a logistic function of the
routed capsule, as the squash length |s|^2 / (1 + |s|^2) = sigmoid(log |s|^2) is, with the
evidence b_j + sum_d softplus(s_jd) in place of log |s_j|^2 (it grows linearly, so weight scale
sharpens p(v), and it has a sign). Routing is Procedure 1 of arXiv:1710.09829 with the capsule's
mean E[z_j h_j | v] = p(z_j = 1 | v) sigmoid(s_j) in place of squash(s_j): c_i <- softmax_j(b_ij),
b_ij += u_{j|i} . E[z_j h_j | v], each update bounded as ``agreement_bound * tanh(a / bound)``;
a deterministic function of v, so F(v) is exact.

Chain: z, h ~ p(z, h | v) exactly; then v' from the visible conditional with the couplings frozen
at c(v), a factorial Bernoulli sigmoid(a + N sum_j c_ij W_ij^T z_j h_j), accepted with the
Metropolis-Hastings ratio that accounts for c(v') != c(v), so the chain leaves p(v, z, h)
invariant exactly (``mh=False`` skips the test: biased). With one routing iteration the couplings
are uniform whatever v is: the ratio is exactly 1 (the test is skipped), and s(v) and the top-down
pass are one matmul each over the pixels (the patches' weights in pixel order), an RBM's cost.
That is also the model's gap: with one iteration routing plays no part, and with two or more PCD
diverges (docs/capsrbm.md, "Routing").

Gradient: d log p(v) / d theta = -dF(v)/d theta + E_model[dF/d theta], through the routing,
estimated by CD-k or PCD chains (:class:`~capsrun.models.energy.EnergyModel`).

Shapes (MNIST, patch 7): x [B, 1, 28, 28] -> visible capsules [B, 16, 49] -> votes [B, 16, N, D]
-> couplings [B, 16, N], s [B, N, D] -> p(z | v) [B, N]; F(v) [B].
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from capsrun.mcmc.base import Beta
from capsrun.models.energy import EnergyModel, bernoulli, per_row, softplus


class Routed(NamedTuple):
    """``s`` [B, N, D]: the routed capsules; ``coupling`` [B, P, N]: c_ij of the last iteration."""

    s: torch.Tensor
    coupling: torch.Tensor


def route(
    u_hat: torch.Tensor,
    iterations: int,
    switch_bias: torch.Tensor,
    pose_bias: torch.Tensor,
    bound: float | None = None,
) -> Routed:
    """Routing by agreement for the capsule RBM (Procedure 1 of arXiv:1710.09829, agreement with
    the capsule's mean E[z_j h_j | v] = p(z_j = 1 | v) sigmoid(s_j) instead of squash(s_j)).

    ``u_hat`` [B, P, N, D] votes; ``switch_bias`` [N]; ``pose_bias`` [N, D]; ``bound``: each
    agreement update is ``bound * tanh(a / bound)`` (None: a itself). Couplings start uniform
    (logits 0), so one iteration gives s_j = sum_i u_{j|i} + beta_j."""
    batch, children, parents, _ = u_hat.shape
    logits = u_hat.new_zeros(batch, children, parents)
    for it in range(iterations):
        coupling = torch.softmax(logits, dim=-1)
        s = parents * torch.einsum("bij,bijd->bjd", coupling, u_hat) + pose_bias
        if it == iterations - 1:
            return Routed(s, coupling)
        on = torch.sigmoid(switch_bias + F.softplus(s).sum(-1))  # p(z_j = 1 | v) [B, N]
        agreement = torch.einsum("bijd,bjd->bij", u_hat, on.unsqueeze(-1) * torch.sigmoid(s))
        logits = logits + (agreement if bound is None else bound * torch.tanh(agreement / bound))
    raise ValueError(f"routing iterations must be >= 1, got {iterations}")


class CapsuleRBM(EnergyModel):
    """See the module docstring for the energy, the conditionals, the chain and the gradient."""

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 28,
        num_classes: int | None = None,  # unused: the model never sees labels
        patch: int = 4,
        hidden_caps: int = 50,
        hidden_dim: int = 10,
        routing_iterations: int = 1,
        agreement_bound: float | None = 0.1,
        weight_std: float = 0.01,
        mh: bool = True,
        **training,
    ):
        """``training``: how it is trained (:class:`~capsrun.models.energy.EnergyModel`:
        ``cd_steps``, ``persistent``, ``chains``, ``tempering``, ...)."""
        super().__init__((in_channels, image_size, image_size), **training)
        if image_size % patch:
            raise ValueError(f"image_size {image_size} must be a multiple of patch {patch}")
        if min(hidden_caps, hidden_dim, routing_iterations) < 1:
            raise ValueError("hidden_caps, hidden_dim and routing_iterations must be >= 1")
        if agreement_bound is not None and not agreement_bound > 0:
            raise ValueError(f"agreement_bound must be null or > 0, got {agreement_bound}")
        self.patch, self.iterations, self.mh, self.bound = patch, routing_iterations, mh, agreement_bound
        self.caps, self.dim = hidden_caps, hidden_dim
        self.in_caps, self.in_dim = (image_size // patch) ** 2, in_channels * patch * patch
        self.weight = nn.Parameter(torch.randn(self.in_caps, self.in_dim, hidden_caps * hidden_dim) * weight_std)
        self.pose_bias = nn.Parameter(torch.zeros(hidden_caps, hidden_dim))
        # -D log 2: a capsule with no evidence (s = 0) is on with probability 1/2
        self.switch_bias = nn.Parameter(torch.full((hidden_caps,), -hidden_dim * math.log(2)))

    # --- from pixels to capsules and back ------------------------------------------------------

    def visible_caps(self, v: torch.Tensor) -> torch.Tensor:
        """``v`` [B, C, H, W] -> visible capsules [B, P, C * patch^2] (row-major patches)."""
        return F.unfold(v, kernel_size=self.patch, stride=self.patch).transpose(1, 2)

    def votes(self, v: torch.Tensor) -> torch.Tensor:
        """u_{j|i} = W_ij v_i ``[B, P, N, D]``: one batched matmul over the children."""
        u = torch.bmm(self.visible_caps(v).transpose(0, 1), self.weight)  # [P, B, N*D]
        return u.view(self.in_caps, len(v), self.caps, self.dim).transpose(0, 1)

    def encode(self, v: torch.Tensor) -> Routed:
        if self.iterations == 1:  # uniform couplings: s_j = sum_i W_ij v_i + beta_j, one matmul
            s = (v.flatten(1) @ self._pixel_weight()).view(len(v), self.caps, self.dim) + self.pose_bias
            return Routed(s, s.new_full((1, 1, 1), 1.0 / self.caps).expand(len(v), self.in_caps, self.caps))
        return route(self.votes(v), self.iterations, self.switch_bias, self.pose_bias, self.bound)

    def _pixel_weight(self) -> torch.Tensor:
        """The votes' weights as one matrix ``[C*H*W, N*D]`` with rows in pixel order: what
        sum_i W_ij v_i is for uniform couplings (the same sum, without cutting v into patches)."""
        if not hasattr(self, "_pixel_rows"):
            pixels = torch.arange(len(self.visible_bias), dtype=torch.float64).view(1, *self.image_shape)
            order = self.visible_caps(pixels).flatten().long()  # row r of the patch weights is pixel order[r]
            self._pixel_rows = torch.argsort(order)
        key = (self.weight._version, self.weight.data_ptr(), self.weight.dtype)
        if torch.is_grad_enabled() or getattr(self, "_pixel_cache", (None,))[0] != key:
            rows = self._pixel_rows.to(self.weight.device)
            weight = self.weight.view(-1, self.caps * self.dim).index_select(0, rows)
            if torch.is_grad_enabled():
                return weight  # part of the graph: never cached
            self._pixel_cache = (key, weight)  # chains and evaluation: the same weights step after step
        return self._pixel_cache[1]

    def _top_down(self, coupling: torch.Tensor, pose: torch.Tensor) -> torch.Tensor:
        """N sum_j c_ij W_ij^T (z_j h_j) for every pixel ``[B, V]``: what the hidden capsules say
        to the visible ones with the couplings ``coupling`` [B, P, N]; ``pose`` [B, N, D]."""
        if self.iterations == 1:  # uniform couplings: N * (1/N) W^T z h, one matmul
            return pose.flatten(1) @ self._pixel_weight().T
        weighted = self.caps * coupling.unsqueeze(-1) * pose.unsqueeze(1)  # [B, P, N, D]
        cols = torch.bmm(weighted.flatten(2).transpose(0, 1), self.weight.transpose(1, 2))  # [P, B, C*p*p]
        image = F.fold(cols.permute(1, 2, 0), self.image_shape[1:], kernel_size=self.patch, stride=self.patch)
        return image.flatten(1)

    # --- the energy and the chain --------------------------------------------------------------

    def evidence(self, s: torch.Tensor, beta: Beta = 1.0) -> torch.Tensor:
        """beta b_j + sum_d softplus(beta s_jd) ``[B, N]``: p_beta(z_j = 1 | v) = sigmoid of it
        (``beta`` a float or one per row [B])."""
        return per_row(beta, 2) * self.switch_bias + softplus(per_row(beta, 3) * s).sum(-1)

    def hidden_energy(self, enc: Routed, beta: Beta) -> torch.Tensor:
        return softplus(self.evidence(enc.s, beta)).sum(-1)

    def log_hidden_states(self) -> float:
        return self.caps * math.log1p(2.0**self.dim)  # per capsule: off, or on with 2^D poses

    def firing(self, enc: Routed) -> torch.Tensor:
        """p(z_j = 1 | v) ``[B, N]``: the probability that capsule j fires."""
        return torch.sigmoid(self.evidence(enc.s))

    def sample_hidden(self, enc: Routed, beta: Beta = 1.0) -> torch.Tensor:
        """z_j h_j ~ p_beta(z, h | v) ``[B, N, D]`` (zero where the switch is off)."""
        scaled = per_row(beta, 3) * enc.s  # beta s, once for the switch and the pose
        on = bernoulli(torch.sigmoid(per_row(beta, 2) * self.switch_bias + softplus(scaled).sum(-1)))
        return bernoulli(torch.sigmoid(scaled)).mul_(on.unsqueeze(-1))  # in place on the fresh draws

    @torch.no_grad()
    def transition(self, v, enc: Routed, beta: Beta = 1.0, base: torch.Tensor | None = None, encode: bool = True):
        """z, h ~ p_beta(z, h | v); v' ~ the visible conditional with the couplings frozen at c(v),
        accepted with the MH ratio (see the module docstring). ``(v', routing of v', acceptance)``."""
        pose = self.sample_hidden(enc, beta)
        # logits of p_beta(v | z, h; c(v)), in place on the fresh top-down pass
        g = self.visible_input(self._top_down(enc.coupling, pose), beta, base)
        flat = v.flatten(1)
        proposal = bernoulli(torch.sigmoid(g))
        new = proposal.view_as(v)
        if not self.mh or self.iterations == 1:  # one iteration: the couplings are uniform, the ratio 1
            return new, self.encode(new) if encode else None, torch.ones(len(v), device=v.device)
        enc_new = self.encode(new)
        g_new = self.visible_input(self._top_down(enc_new.coupling, pose), beta, base)
        # log p(v', z, h) - log p(v, z, h) + log q(v | v') - log q(v' | v); p(v, z, h) ~ exp(v . g(v))
        log_ratio = (
            (proposal * g_new).sum(1)
            - (flat * g).sum(1)
            + (flat * g_new).sum(1)
            - softplus(g_new).sum(1)
            - (proposal * g).sum(1)
            + softplus(g).sum(1)
        )
        accept = torch.rand_like(log_ratio).log() < log_ratio
        keep = accept.view(-1, 1, 1, 1)
        routed = Routed(
            torch.where(keep.view(-1, 1, 1), enc_new.s, enc.s),
            torch.where(keep.view(-1, 1, 1), enc_new.coupling, enc.coupling),
        )
        return torch.where(keep, new, v), routed, accept.float()

    @torch.no_grad()
    def up_down(self, v: torch.Tensor) -> torch.Tensor:
        """One up-down pass: z, h ~ p(z, h | v), then p(v = 1 | z, h) with the couplings of v."""
        enc = self.encode(v)
        g = self._top_down(enc.coupling, self.sample_hidden(enc)) + self.visible_bias
        return torch.sigmoid(g).view_as(v)
