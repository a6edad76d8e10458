"""What the plain RBM and the capsule RBM share: chains, visible states, the output and the loss.

Both are energy models over binary pixels v in {0, 1}^(C*H*W) with binary hidden units summed out
in closed form: the RBM's all of them, so that F(v) = -log sum_h exp(-E(v, h)) is exact and
p(v) = exp(-F(v)) / Z; the capsule RBM's all but its routes, which its chains carry beside v
(:meth:`chain_state`) and its likelihood sums by importance sampling (:meth:`marginal_free_energy`).
A subclass says how to get from v to its hidden inputs (:meth:`encode`), the free energy at an
inverse temperature (:meth:`free_energy_at`) and one step of its Markov chain (:meth:`transition`):
the :class:`~capsrun.mcmc.base.EnergyChain` protocol that the samplers of :mod:`capsrun.mcmc` run.
This class keeps PCD's persistent chains (and their tempering ladder) as checkpointed buffers, runs
the negative phase with :mod:`capsrun.mcmc`, sets the visible biases from the data and fills
:class:`RBMOutput`; :class:`RBMLoss` is the maximum-likelihood surrogate.

Inverse temperatures beta interpolate from the base-rate model (beta = 0) to the model (beta = 1),
as AIS does (:mod:`capsrun.mcmc.base`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from capsrun.mcmc.base import Beta, base_rate, latent_of
from capsrun.mcmc.chains import gibbs
from capsrun.mcmc.tempering import RETUNE_EVERY, ladder, retune, run_ladder


def per_row(beta: Beta, dims: int) -> Beta:
    """``beta`` ready to scale a tensor of ``dims`` dimensions whose first is the batch: a float as
    it is, one per row [B] viewed as [B, 1, ...]."""
    return beta.view(-1, *([1] * (dims - 1))) if isinstance(beta, torch.Tensor) else beta


def bernoulli(p: torch.Tensor) -> torch.Tensor:
    """Binary draws with probabilities ``p`` (any shape): u < p, u uniform in [0, 1). On a CPU the
    very draws of ``torch.bernoulli(p)`` from the same seed (tested), several times faster
    (docs/performance.md); the comparison is made in place on the uniforms (0.0 / 1.0 in ``p``'s
    dtype, the same values as a bool tensor converted)."""
    return torch.rand_like(p).lt_(p)


def softplus(x: torch.Tensor) -> torch.Tensor:
    """log(1 + e^x) (any shape). Where no gradient flows (the chains, the swap tests, AIS) it is
    max(x, 0) + log(1 + e^-|x|), in place on two temporaries: on a CPU ``F.softplus`` runs a
    scalar log1p, several times slower (docs/performance.md), with the same absolute error (5e-7
    against float64 for |x| < 10). Where a gradient flows, ``F.softplus`` (its derivative at 0 is
    1/2; that of the split form is not)."""
    if x.requires_grad and torch.is_grad_enabled():
        return torch.nn.functional.softplus(x)
    return x.clamp_min(0).add_(x.abs().neg_().exp_().add_(1).log_())


class RBMOutput(NamedTuple):
    """``hidden_prob`` [B, N]: p(hidden unit / capsule on | v_data); ``free_energy`` [B]: F(v_data);
    ``reconstruction`` [B, C, H, W]: p(v = 1 | h) after one up-down pass and ``visible`` [B, C, H, W]:
    the binary images it reconstructs (evaluation only);
    ``pseudo_likelihood`` [B]: the stochastic log pseudo-likelihood (evaluation only); in training
    ``model_free_energy`` [B]: F of the chains' samples, ``acceptance``: their mean acceptance, and
    with tempering ``swap_rate``: the lowest swap rate of the ladder's neighbouring pairs (its
    bottleneck). ``scores`` is None: the model has no classes."""

    hidden_prob: torch.Tensor
    free_energy: torch.Tensor
    reconstruction: torch.Tensor | None = None
    pseudo_likelihood: torch.Tensor | None = None
    model_free_energy: torch.Tensor | None = None
    acceptance: torch.Tensor | None = None
    swap_rate: torch.Tensor | None = None
    visible: torch.Tensor | None = None

    @property
    def scores(self) -> None:
        return None


class EnergyModel(nn.Module):
    """Chains and bookkeeping for a binary-visible energy model; subclasses define the energy.

    ``cd_steps``: chain steps per training step (CD-k from the data, or PCD's steps per update);
    ``persistent``: PCD (Tieleman, ICML 2008) with ``chains`` chains started at the first batch
    (``chain_init=data``) or at noise; a batch of B images takes its model term from min(B,
    ``chains``) of them; ``data_init``: visible biases from the first training batch's
    pixel means (Hinton, "A practical guide to training RBMs", UTML TR 2010-003, Sec. 8.1);
    ``tempering``: the persistent chains are the beta = 1 level of a parallel-tempering ladder of
    that many inverse temperatures from the base-rate model to the model
    (:mod:`capsrun.mcmc.tempering`; Desjardins et al., AISTATS 2010), so that the negative phase
    moves between the model's modes as a chain at one temperature cannot; 1: plain PCD;
    ``ladder_width``: chains a level below the top of that ladder (None: ``chains``). Only the
    top's chains give the model term, the levels below carry states between the modes; fewer of
    them cost less (the top's chains take turns at the swaps) but bring the top new classes more
    slowly, and the model learns the top's class mix. ``ladder_from``: the ladder's lowest inverse
    temperature (0: the base-rate model itself); the levels start evenly spaced from there to 1 and
    are re-spaced as the model trains (:func:`~capsrun.mcmc.tempering.retune`, which keeps both
    ends). Above 0 the ladder spends no levels on the melted states a model of digits has at low
    beta. ``ladder_shift``: logits added to the base-rate model for the ladder's path (the top, the
    model, is unchanged). The checks of these values with the config keys' names live in
    :mod:`capsrun.settings`; the ones here guard the Python API.
    """

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        /,
        cd_steps: int = 1,
        persistent: bool = True,
        chains: int = 100,
        chain_init: str = "data",
        data_init: bool = True,
        tempering: int = 1,
        ladder_width: int | None = None,
        ladder_from: float = 0.0,
        ladder_shift: float = 0.0,
    ):
        super().__init__()
        if cd_steps < 1:
            raise ValueError(f"cd_steps must be >= 1, got {cd_steps}")
        if tempering < 1 or (tempering > 1 and not persistent):
            raise ValueError(f"tempering must be >= 1 (and 1 unless persistent), got {tempering}")
        if persistent and chains < 1:
            raise ValueError(f"PCD needs at least one persistent chain: chains must be >= 1, got {chains}")
        if ladder_width is not None and not 1 <= ladder_width <= chains:
            raise ValueError(f"ladder_width must be null or between 1 and chains ({chains}), got {ladder_width}")
        if not 0 <= ladder_from < 1 or (ladder_from > 0 and tempering < 2):
            raise ValueError(
                f"ladder_from must be in [0, 1) and needs tempering >= 2, got {ladder_from}; "
                "e.g. tempering=8 ladder_from=0.55"
            )
        if not 0 <= ladder_shift <= 10 or (ladder_shift and tempering < 2):
            raise ValueError(
                f"ladder_shift must be in [0, 10] and needs tempering >= 2, got {ladder_shift}; "
                "e.g. tempering=8 ladder_shift=1"
            )
        if chain_init not in ("data", "noise"):
            raise ValueError(f"chain_init must be data or noise, got {chain_init!r}")
        self.image_shape = tuple(image_shape)
        self.cd_steps, self.persistent, self.chain_init = cd_steps, persistent, chain_init
        n_visible = image_shape[0] * image_shape[1] * image_shape[2]
        self.visible_bias = nn.Parameter(torch.zeros(n_visible))
        # PCD's chains live on between steps and in checkpoints; started at the first batch
        self.register_buffer("chains", torch.zeros(chains if persistent else 0, *self.image_shape))
        self.register_buffer("chains_started", torch.zeros((), dtype=torch.bool))
        self.register_buffer("bias_from_data", torch.tensor(not data_init))
        self.tempering = tempering
        self.ladder_shift = float(ladder_shift)  # the training ladder's base: base_rate + this (a config, not state)
        if tempering > 1:  # only then: checkpoints of plain PCD keep their keys
            # the levels beta < 1 of the ladder, their inverse temperatures (tuned as the model
            # trains, :func:`retune`), the running swap rates, and the base-rate model at beta = 0
            width = ladder_width or len(self.chains)  # a tapered ladder: fewer chains below the top
            self.register_buffer("ladder_chains", torch.zeros(tempering - 1, width, *self.image_shape))
            betas = torch.tensor(ladder(tempering), dtype=torch.float64)  # even from 0 (or ladder_from) to 1
            self.register_buffer("betas", ladder_from + (1 - ladder_from) * betas)
            self.register_buffer("swap_rates", torch.full((tempering - 1,), 0.5, dtype=torch.float64))
            self.register_buffer("base_rate", torch.zeros(n_visible))
            self.register_buffer("sweeps", torch.zeros((), dtype=torch.long))  # which neighbours swap next

    # --- what a subclass defines ----------------------------------------------------------------

    def encode(self, v: torch.Tensor) -> Any:
        """What the free energy and the chain need of ``v`` [B, C, H, W] (the hidden inputs)."""
        raise NotImplementedError

    def hidden_energy(self, enc: Any, beta: Beta) -> torch.Tensor:
        """log sum_h exp(-beta E_hidden(v, h)) ``[B]``: the hidden units summed out at ``beta``
        (a float, or one inverse temperature per row ``[B]``)."""
        raise NotImplementedError

    def transition(
        self, v: torch.Tensor, enc: Any, beta: Beta = 1.0, base: torch.Tensor | None = None, encode: bool = True
    ) -> tuple[torch.Tensor, Any, torch.Tensor]:
        """One step of the chain that leaves p_beta invariant: ``(v', encode(v'), acceptance [B])``;
        ``beta`` a float or one inverse temperature per row ``[B]`` (a whole ladder in one batch).
        ``encode=False``: the last step of a run, whose encode(v') nobody reads; it may be None."""
        raise NotImplementedError

    def inference(self, v: torch.Tensor) -> Any:
        """:meth:`encode` as evaluation reports it: where a model's inference is a capsule layer,
        through that layer's forward, so that the capsule-health probe sees it once per image."""
        return self.encode(v)

    def chain_state(self, v: torch.Tensor, latent: torch.Tensor | None = None) -> Any:
        """A chain's state at ``v`` [B, C, H, W]: :meth:`encode`'s output, with the model's latent
        variables that the chain carries besides v (the capsule RBM's routes) set to ``latent``
        [B, ...] (None: drawn as at beta = 0). A model whose hidden units are all summed out has
        none: its state is :meth:`encode`."""
        return self.encode(v)

    def register_latent(self, shape: tuple[int, ...]) -> None:
        """Give the persistent chains (and the ladder's) a latent state of ``shape`` per chain
        (integers, checkpointed with them): for a model whose chains carry more than v."""
        self.register_buffer("chain_latent", torch.zeros(len(self.chains), *shape, dtype=torch.long))
        if self.tempering > 1:
            k, width = self.ladder_chains.shape[:2]
            self.register_buffer("ladder_latent", torch.zeros(k, width, *shape, dtype=torch.long))

    def marginal_free_energy(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """F(v) = -log sum_h p*(v, h) ``[B]`` for the log-likelihood, and the spread of its
        estimate ``[B]``: exact here (None); a model that estimates it overrides this."""
        return self.free_energy(v), None

    def firing(self, enc: Any) -> torch.Tensor:
        """p(hidden unit / capsule on | v) ``[B, N]`` from :meth:`encode`'s output."""
        raise NotImplementedError

    def hidden_prob(self, v: torch.Tensor) -> torch.Tensor:
        return self.firing(self.encode(v))

    def log_hidden_states(self) -> float:
        """log of the number of hidden configurations: the hidden part of log Z at beta = 0."""
        raise NotImplementedError

    def up_down(self, v: torch.Tensor) -> torch.Tensor:
        """p(v = 1 | h) for h ~ p(h | v): one up-down pass ``[B, C, H, W]`` (what an energy model
        makes of an image; a CapsNet's ``reconstruct`` is a masked decode instead)."""
        raise NotImplementedError

    # --- shared -------------------------------------------------------------------------------

    def visible_logits(self, beta: Beta, base: torch.Tensor | None) -> torch.Tensor:
        """The visible biases of p_beta: beta a + (1 - beta) base, ``[C*H*W]`` for one inverse
        temperature, ``[B, C*H*W]`` for one per row (``beta`` [B])."""
        if isinstance(beta, torch.Tensor):
            b = beta.unsqueeze(-1)
            return b * self.visible_bias if base is None else b * self.visible_bias + (1 - b) * base
        if base is None or beta == 1:
            return beta * self.visible_bias
        return beta * self.visible_bias + (1 - beta) * base

    def visible_input(self, top_down: torch.Tensor, beta: Beta, base: torch.Tensor | None) -> torch.Tensor:
        """The logits of p_beta(v = 1 | hidden) ``[B, V]`` from the hidden layer's top-down input
        ``top_down`` [B, V], which it overwrites: beta (top_down + a) + (1 - beta) base, computed
        as beta (top_down + a - base) + base, three passes in place."""
        if not isinstance(beta, torch.Tensor) and beta == 1:  # the model itself: no base
            return top_down.add_(self.visible_bias)
        if base is None:
            return top_down.add_(self.visible_bias).mul_(per_row(beta, 2))
        return top_down.add_(self.visible_bias - base).mul_(per_row(beta, 2)).add_(base)

    def free_energy_at(
        self, v: torch.Tensor, enc: Any, beta: Beta = 1.0, base: torch.Tensor | None = None
    ) -> torch.Tensor:
        """-log sum_h p*_beta(v, h) ``[B]`` (the model's F(v) at beta = 1); ``beta`` a float or one
        per row ``[B]``."""
        if isinstance(beta, torch.Tensor):  # beta (v . a) + (1 - beta) (v . base): two dot products
            flat = v.flatten(1)
            visible = beta * (flat @ self.visible_bias)
            if base is not None:
                visible = visible + (1 - beta) * (flat @ base)
        else:
            visible = v.flatten(1) @ self.visible_logits(beta, base)
        return -visible - self.hidden_energy(enc, beta)

    def free_energy(self, v: torch.Tensor) -> torch.Tensor:
        """F(v) ``[B]``: log p(v) = -F(v) - log Z."""
        return self.free_energy_at(v, self.encode(v))

    def log_base_partition(self, base: torch.Tensor) -> torch.Tensor:
        """log Z of p_0: the base-rate visible units times the uniform hidden ones (exact)."""
        return torch.nn.functional.softplus(base.double()).sum() + self.log_hidden_states()

    def noise(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Where chains from noise start: uniform random bits ``[n, C, H, W]`` on the CPU."""
        return (torch.rand(n, *self.image_shape, generator=generator) < 0.5).float()

    @staticmethod
    def visible_states(x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> binary visible states, thresholded at 0.5 (deterministic, so that
        the free energies of training and held-out images compare)."""
        return (x > 0.5).to(x.dtype)

    @torch.no_grad()
    def init_visible_bias(self, v: torch.Tensor) -> None:
        """a_k = logit(p_k), p_k = (sum_b v_bk + 1/2) / (B + 1): the visible biases alone give every
        pixel the batch's mean (a pixel off in the whole batch gets a finite bias)."""
        p = (v.flatten(1).sum(0) + 0.5) / (len(v) + 1)
        self.visible_bias.copy_(torch.logit(p))

    @torch.no_grad()
    def pseudo_likelihood(self, v: torch.Tensor, enc: Any) -> torch.Tensor:
        """Stochastic log pseudo-likelihood ``[B]``: V log sigmoid(F(v~) - F(v)), v~ = v with one
        random pixel flipped per image (Besag 1975; as scikit-learn's BernoulliRBM scores)."""
        flat = v.flatten(1).clone()
        idx = torch.randint(flat.shape[1], (len(v),), device=v.device)
        rows = torch.arange(len(v), device=v.device)
        flat[rows, idx] = 1 - flat[rows, idx]
        flipped = flat.view_as(v)
        gap = self.free_energy_at(flipped, self.encode(flipped)) - self.free_energy_at(v, enc)
        return flat.shape[1] * torch.nn.functional.logsigmoid(gap)

    def model_samples(self, v_data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, Any]:
        """CD-k: ``cd_steps`` steps from the data; PCD: from the persistent chains (the first
        min(B, ``chains``) of them), which keep the result; with ``tempering`` > 1, ``cd_steps`` sweeps of the
        ladder whose top they are. Returns the samples, the chains' mean acceptance, with
        tempering the lowest swap rate of the ladder (else None), and the samples' latent state
        (:meth:`chain_state`; None for a model without one)."""
        if not self.persistent:
            v, acceptance, carried = gibbs(self, v_data, self.cd_steps)
            return v, acceptance, None, carried
        # PCD's model term needs no more fantasy particles than a batch has images (Tieleman 2008
        # kept 100 whatever the batch): a bigger batch over the same chains runs fewer of their
        # sweeps per epoch, the cost that dominates a tempered step
        b = min(len(v_data), len(self.chains))
        latent = getattr(self, "chain_latent", None)
        if not self.chains_started:
            self.chains.copy_(self.noise(len(self.chains)).to(self.chains))
            if self.chain_init == "data":
                self.chains[:b] = v_data[:b]
            if latent is not None:
                latent.copy_(latent_of(self.chain_state(self.chains)))
            if self.tempering > 1:
                below = self.ladder_chains
                below.copy_(self.noise(below.shape[0] * below.shape[1]).view_as(below).to(below))
                if latent is not None:
                    drawn = latent_of(self.chain_state(below.flatten(0, 1)))
                    self.ladder_latent.copy_(drawn.view_as(self.ladder_latent))
            self.chains_started.fill_(True)
        if self.tempering > 1:
            m = min(b, self.ladder_chains.shape[1])  # chains a level below the top
            below = self.ladder_chains[:, :m]
            states = torch.cat([below.flatten(0, 1), self.chains[:b]])
            widths = [m] * len(below) + [b]
            first = int(self.sweeps)
            base = self.base_rate + self.ladder_shift if self.ladder_shift else self.base_rate
            carried = None if latent is None else torch.cat([self.ladder_latent[:, :m].flatten(0, 1), latent[:b]])
            states, acceptance, rates, carried = run_ladder(
                self, states, self.cd_steps, base, first, self.betas, widths, carried
            )
            top = states[len(below) * m :]
            self.ladder_chains[:, :m] = states[: len(below) * m].view_as(below)
            self.chains[:b] = top
            if latent is not None:
                self.ladder_latent[:, :m] = carried[: len(below) * m].view(len(below), m, *latent.shape[1:])
                latent[:b] = carried[len(below) * m :]
            self.sweeps.add_(self.cd_steps)
            # the running swap rate of each pair, of the pairs tried (one sweep tries every other)
            tried = torch.zeros_like(self.swap_rates, dtype=torch.bool)
            tried[first % 2 :: 2] = True
            if self.cd_steps > 1:
                tried[:] = True
            self.swap_rates[tried] = 0.98 * self.swap_rates[tried] + 0.02 * rates[tried].double()
            if int(self.sweeps) % RETUNE_EVERY < self.cd_steps:
                self.betas.copy_(retune(self.betas, self.swap_rates))
            return top, acceptance, rates[tried].min(), None if latent is None else latent[:b]
        v, acceptance, carried = gibbs(
            self, self.chains[:b], self.cd_steps, latent=None if latent is None else latent[:b]
        )
        self.chains[:b] = v
        if latent is not None:
            latent[:b] = carried
        return v, acceptance, None, carried

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> RBMOutput:
        """``x`` [B, C, H, W] in [0, 1]; ``labels`` are ignored (trained without labels). Training
        runs the chains and fills ``model_free_energy``; evaluation the monitors."""
        v = self.visible_states(x)
        if self.training and not self.bias_from_data:
            self.init_visible_bias(v)
            self.bias_from_data.fill_(True)
        if self.training and self.tempering > 1 and not self.chains_started:
            self.base_rate.copy_(base_rate(v))
        if self.training:
            v_model, acceptance, swap_rate, latent = self.model_samples(v)
            if latent is None:  # one pass through the hidden layer for both terms
                both = torch.cat([v, v_model])
                enc = self.encode(both)
                f = self.free_energy_at(both, enc)
                f_data, f_model = f[: len(v)], f[len(v) :]
            else:  # the data through inference, the samples with the latent state their chains drew
                enc = self.encode(v)
                f_data = self.free_energy_at(v, enc)
                f_model = self.free_energy_at(v_model, self.chain_state(v_model, latent))
            with torch.no_grad():
                prob = self.firing(enc)[: len(v)]
            return RBMOutput(prob, f_data, model_free_energy=f_model, acceptance=acceptance, swap_rate=swap_rate)
        enc = self.inference(v)
        return RBMOutput(
            self.firing(enc),
            self.free_energy_at(v, enc),
            reconstruction=self.up_down(v),
            pseudo_likelihood=self.pseudo_likelihood(v, enc),
            visible=v,
        )


class RBMLoss(nn.Module):
    """Maximum likelihood for an :class:`EnergyModel` through the surrogate
    ``total = mean F(v_data) - mean F(v_model)`` (v_model constant: its gradient is minus the
    log-likelihood gradient, the model term estimated by the chains), plus what monitors it:
    ``free_energy/data`` (its train-test gap shows overfitting), ``free_energy/model``,
    ``hidden/on`` (mean p(on | v)), ``chain/acceptance``, ``chain/swap_rate`` (tempering: the
    ladder's lowest swap rate; near 0, add levels); in evaluation ``reconstruction`` (sum of
    squared pixel errors of one up-down pass) and ``log_likelihood/pseudo`` (per image, nats;
    what picks ``best.pt``)."""

    monitor = ("log_likelihood/pseudo", "max")

    def forward(self, out: RBMOutput, target: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        losses = {"free_energy/data": out.free_energy.mean().detach(), "hidden/on": out.hidden_prob.mean().detach()}
        if out.reconstruction is not None:
            # the binary image the model saw (a MultiMNIST target is the two digits apart: not it)
            binary = out.visible if out.visible is not None else (target > 0.5).to(out.reconstruction.dtype)
            losses["reconstruction"] = (out.reconstruction - binary).pow(2).flatten(1).sum(1).mean().detach()
        if out.pseudo_likelihood is not None:
            losses["log_likelihood/pseudo"] = out.pseudo_likelihood.mean().detach()
        if out.model_free_energy is not None:
            losses["total"] = out.free_energy.mean() - out.model_free_energy.mean()
            losses["free_energy/model"] = out.model_free_energy.mean().detach()
            losses["chain/acceptance"] = out.acceptance.detach()
        if out.swap_rate is not None:
            losses["chain/swap_rate"] = out.swap_rate.detach()
        return losses
