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
Metropolis-Hastings with a gradient-informed proposal (ours, after Grathwohl et al., "Oops I took
a gradient", ICML 2021): flip pixel i with probability ``flips`` * softmax_i(-dE_i / 2), dE_i the
first-order energy change of flipping it, and accept with the MH ratio, so the chain leaves
p(v | z) invariant exactly (``mh=False`` skips the test: biased). A first version proposed all
pixels at once from the linearised conditional; on a trained MNIST model its acceptance fell to
0 and the chains froze (measured), hence the few-pixel proposal.

Continuous visible units (``visible=continuous``, ../shared/spec/generative.md: "binary or in
[0, 1]"; ours): v in [0, 1]^(C*H*W), the same E(v, z) on the unit box, so p(z | v) and F(v) are
unchanged and p(v) = exp(-F(v)) / Z is a density on the box. Chains run Langevin dynamics on F
with z summed out, Metropolis-adjusted (MALA) in the coordinates x = logit(v), whose potential is
U(x) = F(sigmoid(x)) / T + sum_k [softplus(x_k) + softplus(-x_k)] (the second sum: minus the
log-Jacobian of v = sigmoid(x)); every pixel moves at every step, which the bit flips above cannot
do. One up-down pass for continuous units gives the mean of the linearised conditional, a truncated
exponential ~ exp(g v) on [0, 1] per pixel, mean 1 / (1 - e^-g) - 1/g.

Visible biases start (``data_init``) where they alone give every pixel the first training batch's
mean (Hinton, UTML TR 2010-003, Sec. 8.1): otherwise uniform noise, far from the data, holds most
of the model's probability at the start.

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
_EDGE = 1e-6  # continuous pixels of exactly 0 or 1 enter the logit coordinates at logit(1e-6)


def _box_mean(g: torch.Tensor) -> torch.Tensor:
    """Mean 1 / (1 - e^-g) - 1/g of the density ~ exp(g v) on [0, 1] (1/2 + g/12 near g = 0)."""
    small = g.abs() < 1e-3
    safe = torch.where(small, torch.ones_like(g), g)
    return torch.where(small, 0.5 + g / 12, 1 / (-torch.expm1(-safe)) - 1 / safe)


class RBMOutput(NamedTuple):
    """``hidden_prob`` [B, N]: p(z_j = 1 | v_data); ``free_energy`` [B]: F(v_data);
    ``reconstruction`` [B, C, H, W]: the mean of the linearised visible conditional after one
    up-down pass; in training also ``model_free_energy`` [B]: F of the chains' samples, and
    ``acceptance``: their mean MH acceptance. ``scores`` is None: the model has no classes."""

    hidden_prob: torch.Tensor
    free_energy: torch.Tensor
    reconstruction: torch.Tensor
    model_free_energy: torch.Tensor | None = None
    acceptance: torch.Tensor | None = None

    @property
    def scores(self) -> None:
        return None


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
        cd_steps: int = 1,
        persistent: bool = False,
        chains: int = 128,
        mh: bool = True,
        temperature: float = 1.0,
        flips: float = 4.0,
        visible: str = "binary",
        step_size: float = 0.5,
        chain_init: str = "data",
        data_init: bool = True,
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
        if cd_steps < 1:
            raise ValueError(f"cd_steps must be >= 1, got {cd_steps}")
        if visible not in ("binary", "continuous"):
            raise ValueError(f"visible must be binary or continuous, got {visible!r}")
        if chain_init not in ("data", "noise"):
            raise ValueError(f"chain_init must be data or noise, got {chain_init!r}")
        if not step_size > 0:
            raise ValueError(f"step_size must be > 0, got {step_size}")
        self.visible, self.step_size, self.chain_init = visible, step_size, chain_init
        self.cd_steps, self.persistent, self.mh, self.temperature = cd_steps, persistent, mh, temperature
        self.flips = flips
        # PCD's chains live on between steps and in checkpoints; started from the first batch
        self.register_buffer("chains", torch.zeros(chains if persistent else 0, *self.image_shape))
        self.register_buffer("chains_started", torch.zeros((), dtype=torch.bool))
        # data_init: the visible biases are set from the first training batch (then saved)
        self.register_buffer("bias_from_data", torch.tensor(not data_init))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints from before data_init existed: their biases were trained, keep them as they are
        state_dict.setdefault(prefix + "bias_from_data", torch.tensor(True))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

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

    def _flip_probs(self, grad: torch.Tensor, v: torch.Tensor, temperature: float) -> torch.Tensor:
        """Per-pixel flip probabilities ``[B, C, H, W]``: ``flips`` times the softmax over pixels
        of -dE_i / 2T, where dE_i = dE/dv_i (1 - 2 v_i) is the first-order energy change of
        flipping pixel i; clamped into (0, 1)."""
        delta = (grad * (1 - 2 * v)).flatten(1)
        f = self.flips * torch.softmax(-delta / (2 * temperature), dim=1)
        return f.clamp(1e-7, 1 - 1e-7).view_as(v)

    @torch.no_grad()
    def sample_visible(
        self, v: torch.Tensor, z: torch.Tensor, mh: bool = True, temperature: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One Metropolis-Hastings step that leaves p(v | z)^(1/T) invariant: flip each pixel with
        the gradient-informed probability of :meth:`_flip_probs` (about ``flips`` pixels), accept
        with the MH ratio (``mh=False``: always, which is biased). Returns the new binary ``v``
        [B, C, H, W] and the per-chain acceptance [B]."""
        e, logits = self._proposal_logits(v, z, temperature)
        f = self._flip_probs(-logits * temperature, v, temperature)
        flip = torch.bernoulli(f)
        proposal = (v + flip) % 2
        if not mh:
            return proposal, torch.ones(len(v), device=v.device)
        e_new, logits_new = self._proposal_logits(proposal, z, temperature)
        f_back = self._flip_probs(-logits_new * temperature, proposal, temperature)

        def log_q(probs: torch.Tensor) -> torch.Tensor:  # the same set of flips, forward or back
            return (flip * probs.log() + (1 - flip) * torch.log1p(-probs)).flatten(1).sum(-1)

        log_ratio = (e - e_new) / temperature + log_q(f_back) - log_q(f)
        accept = torch.rand_like(log_ratio).log() < log_ratio
        return torch.where(accept.view(-1, 1, 1, 1), proposal, v), accept.float()

    # --- continuous visible units: Langevin on the free energy ------------------------------

    def _logit_potential(self, x: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """U(x) = F(sigmoid(x)) / T + sum_k [softplus(x_k) + softplus(-x_k)] ``[B]`` and dU/dx:
        the negative log-density of x = logit(v) when v ~ p(v)^(1/T) on the unit box (the
        second term is minus the log-Jacobian of v = sigmoid(x))."""
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            jac = (F.softplus(x) + F.softplus(-x)).flatten(1).sum(1)
            u = self.free_energy(torch.sigmoid(x)) / temperature + jac
            (grad,) = torch.autograd.grad(u.sum(), x)
        return u.detach(), grad

    def _logit_state(self, v: torch.Tensor, temperature: float) -> tuple[torch.Tensor, ...]:
        x = torch.logit(v.clamp(_EDGE, 1 - _EDGE))
        return (x, *self._logit_potential(x, temperature))

    def _mala(self, state: tuple[torch.Tensor, ...], mh: bool, temperature: float) -> tuple[torch.Tensor, ...]:
        """One Metropolis-adjusted Langevin (MALA) step on p(v)^(1/T), z summed out, in the
        unconstrained coordinates x = logit(v): x' = x - (eps^2 / 2) dU/dx + eps * noise, with
        eps = ``step_size``, accepted with the MH ratio (``mh=False``: always, the unadjusted and
        biased Langevin algorithm). Every pixel moves at every step. State (x, U(x), dU/dx) ->
        (x', U(x'), dU/dx', acceptance [B]); x [B, C, H, W]. The state's potential is carried
        between steps, so a step costs one forward and backward pass."""
        x, u, grad = state[:3]
        eps = self.step_size
        proposal = x - 0.5 * eps**2 * grad + eps * torch.randn_like(x)
        u_new, grad_new = self._logit_potential(proposal, temperature)
        if not mh:
            return proposal, u_new, grad_new, torch.ones_like(u)

        def log_q(to: torch.Tensor, frm: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
            return -(to - frm + 0.5 * eps**2 * g).pow(2).flatten(1).sum(1) / (2 * eps**2)

        log_ratio = u - u_new + log_q(x, proposal, grad_new) - log_q(proposal, x, grad)
        accept = torch.rand_like(log_ratio).log() < log_ratio
        keep = accept.view(-1, *([1] * (x.dim() - 1)))
        return (
            torch.where(keep, proposal, x),
            torch.where(accept, u_new, u),
            torch.where(keep, grad_new, grad),
            accept.float(),
        )

    # --- chains, whichever the visible units ------------------------------------------------

    @torch.no_grad()
    def gibbs(
        self, v: torch.Tensor, steps: int, mh: bool = True, temperature: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``steps`` steps of the model's Markov chain; returns v and the mean acceptance. Binary
        visible units: alternations z ~ p(z | v), v ~ p(v | z) (:meth:`sample_visible`);
        continuous: Langevin steps on the free energy (:meth:`_mala`)."""
        acceptance = torch.zeros((), device=v.device)
        if self.visible == "continuous":
            state = self._logit_state(v, temperature)
            for _ in range(steps):
                state = self._mala(state, mh, temperature)
                acceptance = acceptance + state[3].mean()
            return (torch.sigmoid(state[0]) if steps else v), acceptance / max(steps, 1)
        for _ in range(steps):
            v, acc = self.sample_visible(v, self.sample_hidden(v), mh=mh, temperature=temperature)
            acceptance = acceptance + acc.mean()
        return v, acceptance / max(steps, 1)

    def noise(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Where chains from noise start, ``[n, C, H, W]`` on the CPU: uniform random bits (binary
        visible units) or uniform values in [0, 1] (continuous)."""
        u = torch.rand(n, *self.image_shape, generator=generator)
        return (u < 0.5).float() if self.visible == "binary" else u

    def visible_states(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> the visible layer's states: thresholded at 0.5 for binary units
        (deterministic, so that free energies of training and held-out images compare), as they
        are (clamped to [0, 1]) for continuous units."""
        return self.binarize(x) if self.visible == "binary" else x.clamp(0, 1)

    @torch.no_grad()
    def reconstruct(self, v: torch.Tensor) -> torch.Tensor:
        """One up-down pass: z ~ p(z | v), then the mean of the visible conditional linearised at
        ``v`` (g = -dE/dv): sigmoid(g) for binary units; for continuous ones the mean
        1 / (1 - e^-g) - 1/g of the truncated exponential density ~ exp(g v) on [0, 1].
        ``[B, C, H, W]`` in (0, 1)."""
        _, g = self._proposal_logits(v, self.sample_hidden(v), 1.0)
        if self.visible == "binary":
            return torch.sigmoid(g)
        return _box_mean(g).clamp(0, 1)

    @torch.no_grad()
    def init_visible_bias(self, v: torch.Tensor) -> None:
        """Visible biases that alone give every pixel the data's mean p_k (Hinton, "A practical
        guide to training RBMs", UTML TR 2010-003, Sec. 8.1): a_k = logit(p_k) for binary units;
        for continuous ones the a_k whose truncated exponential ~ exp(a_k v) on [0, 1] has mean
        p_k (bisection). ``v`` [B, C, H, W]; p_k = (sum_b v_bk + 1/2) / (B + 1), so that a pixel
        off in the whole batch gets a finite bias."""
        p = ((v.flatten(1).sum(0) + 0.5) / (len(v) + 1)).double()
        if self.visible == "binary":
            self.visible_bias.copy_(torch.logit(p))
            return
        lo, hi = torch.full_like(p, -1e3), torch.full_like(p, 1e3)
        for _ in range(60):
            mid = (lo + hi) / 2
            above = _box_mean(mid) > p
            lo, hi = torch.where(above, lo, mid), torch.where(above, mid, hi)
        self.visible_bias.copy_((lo + hi) / 2)

    def surrogate_loss(self, v_data: torch.Tensor, v_model: torch.Tensor) -> torch.Tensor:
        """mean F(v_data) - mean F(v_model): its gradient is minus the log-likelihood gradient
        estimated with the model samples ``v_model`` (treated as constants)."""
        return self.free_energy(v_data).mean() - self.free_energy(v_model.detach()).mean()

    @staticmethod
    def binarize(x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> binary visible states, thresholded at 0.5 (deterministic, so that
        the free energies of training and held-out images compare)."""
        return (x > 0.5).to(x.dtype)

    def model_samples(self, v_data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CD-k: ``cd_steps`` Gibbs steps from the data; PCD: from the persistent chains (the
        first ``B`` of them), which keep the result."""
        b = len(v_data)
        if not self.persistent:
            return self.gibbs(v_data, self.cd_steps, self.mh, self.temperature)
        if b > len(self.chains):
            raise ValueError(
                f"a batch of {b} needs at least as many persistent chains (model.net.chains={len(self.chains)})"
            )
        if not self.chains_started:
            self.chains.copy_(self.noise(len(self.chains)).to(self.chains))
            if self.chain_init == "data":
                self.chains[:b] = v_data
            self.chains_started.fill_(True)
        v, acceptance = self.gibbs(self.chains[:b], self.cd_steps, self.mh, self.temperature)
        self.chains[:b] = v
        return v, acceptance

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> RBMOutput:
        """``x`` [B, C, H, W] in [0, 1]; ``labels`` are ignored (trained without labels). In
        training mode the chains run and ``model_free_energy`` is filled."""
        v = self.visible_states(x)
        if self.training and not self.bias_from_data:
            self.init_visible_bias(v)
            self.bias_from_data.fill_(True)
        out = RBMOutput(self.hidden_prob(v), self.free_energy(v), self.reconstruct(v))
        if not self.training:
            return out
        v_model, acceptance = self.model_samples(v)
        return out._replace(model_free_energy=self.free_energy(v_model), acceptance=acceptance)


class RBMLoss(nn.Module):
    """Maximum likelihood for :class:`CapsuleRBM` through the surrogate
    ``total = mean F(v_data) - mean F(v_model)`` (training only), plus what monitors it:
    ``reconstruction`` (sum of squared pixel errors of one up-down pass, per image; what picks
    ``best.pt``), ``free_energy/data`` (its train-test gap shows overfitting),
    ``free_energy/model``, ``hidden/on`` (mean p(z_j = 1 | v): sparsity) and ``chain/acceptance``."""

    monitor = ("loss/reconstruction", "min")

    def forward(self, out: RBMOutput, target: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        losses = {
            "reconstruction": (out.reconstruction - target).pow(2).flatten(1).sum(1).mean().detach(),
            "free_energy/data": out.free_energy.mean().detach(),
            "hidden/on": out.hidden_prob.mean().detach(),
        }
        if out.model_free_energy is not None:
            losses["total"] = out.free_energy.mean() - out.model_free_energy.mean()
            losses["free_energy/model"] = out.model_free_energy.mean().detach()
            losses["chain/acceptance"] = out.acceptance.detach()
        return losses
