"""What the plain RBM and the capsule RBM share: chains, visible states, the output and the loss.

Both are energy models over binary pixels v in {0, 1}^(C*H*W) with binary hidden units summed out
in closed form, so that the free energy F(v) = -log sum_h exp(-E(v, h)) is exact and
p(v) = exp(-F(v)) / Z. A subclass says how to get from v to its hidden inputs (:meth:`encode`),
the free energy at an inverse temperature (:meth:`free_energy_at`) and one step of its Markov chain
(:meth:`transition`); this class runs CD-k and PCD chains with them, sets the visible biases from
the data and fills :class:`RBMOutput`. :mod:`capsrun.ais` estimates log Z with the same three.

Inverse temperatures follow Salakhutdinov & Murray, "On the quantitative analysis of deep belief
networks", ICML 2008, Sec. 4.1: with visible biases ``base`` of the base-rate model,

    p_beta(v, h) ~ exp((1 - beta) base . v - beta E(v, h)),

so beta = 0 is the base-rate model with the hidden units uniform and beta = 1 the model; with
``base`` = 0, p_beta is the joint at temperature T = 1 / beta (what ``temperature=`` samples).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn


class RBMOutput(NamedTuple):
    """``hidden_prob`` [B, N]: p(hidden unit / capsule on | v_data); ``free_energy`` [B]: F(v_data);
    ``reconstruction`` [B, C, H, W]: p(v = 1 | h) after one up-down pass (evaluation only);
    ``pseudo_likelihood`` [B]: the stochastic log pseudo-likelihood (evaluation only); in training
    ``model_free_energy`` [B]: F of the chains' samples, and ``acceptance``: their mean acceptance.
    ``scores`` is None: the model has no classes."""

    hidden_prob: torch.Tensor
    free_energy: torch.Tensor
    reconstruction: torch.Tensor | None = None
    pseudo_likelihood: torch.Tensor | None = None
    model_free_energy: torch.Tensor | None = None
    acceptance: torch.Tensor | None = None

    @property
    def scores(self) -> None:
        return None


class EnergyModel(nn.Module):
    """Chains and bookkeeping for a binary-visible energy model; subclasses define the energy.

    ``cd_steps``: chain steps per training step (CD-k from the data, or PCD's steps per update);
    ``persistent``: PCD (Tieleman, ICML 2008) with ``chains`` chains started at the first batch
    (``chain_init=data``) or at noise; ``data_init``: visible biases from the first training batch's
    pixel means (Hinton, "A practical guide to training RBMs", UTML TR 2010-003, Sec. 8.1).
    """

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        cd_steps: int = 1,
        persistent: bool = True,
        chains: int = 100,
        chain_init: str = "data",
        data_init: bool = True,
    ):
        super().__init__()
        if cd_steps < 1:
            raise ValueError(f"cd_steps must be >= 1, got {cd_steps}")
        if chain_init not in ("data", "noise"):
            raise ValueError(f"chain_init must be data or noise, got {chain_init!r}")
        self.image_shape = tuple(image_shape)
        self.cd_steps, self.persistent, self.chain_init = cd_steps, persistent, chain_init
        self.mh = True
        n_visible = image_shape[0] * image_shape[1] * image_shape[2]
        self.visible_bias = nn.Parameter(torch.zeros(n_visible))
        # PCD's chains live on between steps and in checkpoints; started at the first batch
        self.register_buffer("chains", torch.zeros(chains if persistent else 0, *self.image_shape))
        self.register_buffer("chains_started", torch.zeros((), dtype=torch.bool))
        self.register_buffer("bias_from_data", torch.tensor(not data_init))

    # --- what a subclass defines ----------------------------------------------------------------

    def encode(self, v: torch.Tensor) -> Any:
        """What the free energy and the chain need of ``v`` [B, C, H, W] (the hidden inputs)."""
        raise NotImplementedError

    def hidden_energy(self, enc: Any, beta: float) -> torch.Tensor:
        """log sum_h exp(-beta E_hidden(v, h)) ``[B]``: the hidden units summed out at ``beta``."""
        raise NotImplementedError

    def transition(
        self, v: torch.Tensor, enc: Any, beta: float = 1.0, base: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, Any, torch.Tensor]:
        """One step of the chain that leaves p_beta invariant: ``(v', encode(v'), acceptance [B])``."""
        raise NotImplementedError

    def firing(self, enc: Any) -> torch.Tensor:
        """p(hidden unit / capsule on | v) ``[B, N]`` from :meth:`encode`'s output."""
        raise NotImplementedError

    def hidden_prob(self, v: torch.Tensor) -> torch.Tensor:
        return self.firing(self.encode(v))

    def log_hidden_states(self) -> float:
        """log of the number of hidden configurations: the hidden part of log Z at beta = 0."""
        raise NotImplementedError

    def reconstruct(self, v: torch.Tensor) -> torch.Tensor:
        """p(v = 1 | h) for h ~ p(h | v): one up-down pass ``[B, C, H, W]``."""
        raise NotImplementedError

    # --- shared -------------------------------------------------------------------------------

    def visible_logits(self, beta: float, base: torch.Tensor | None) -> torch.Tensor:
        """The visible biases of p_beta: beta a + (1 - beta) base ``[C*H*W]``."""
        if base is None or beta == 1:
            return beta * self.visible_bias
        return beta * self.visible_bias + (1 - beta) * base

    def free_energy_at(
        self, v: torch.Tensor, enc: Any, beta: float = 1.0, base: torch.Tensor | None = None
    ) -> torch.Tensor:
        """-log sum_h p*_beta(v, h) ``[B]`` (the model's F(v) at beta = 1)."""
        return -(v.flatten(1) @ self.visible_logits(beta, base)) - self.hidden_energy(enc, beta)

    def free_energy(self, v: torch.Tensor) -> torch.Tensor:
        """F(v) ``[B]``: log p(v) = -F(v) - log Z."""
        return self.free_energy_at(v, self.encode(v))

    def log_base_partition(self, base: torch.Tensor) -> torch.Tensor:
        """log Z of p_0: the base-rate visible units times the uniform hidden ones (exact)."""
        return torch.nn.functional.softplus(base.double()).sum() + self.log_hidden_states()

    @torch.no_grad()
    def gibbs(
        self, v: torch.Tensor, steps: int, mh: bool = True, temperature: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``steps`` chain steps at ``temperature`` from ``v``; returns v and the mean acceptance.
        ``mh=False`` skips the Metropolis-Hastings test where the model has one (biased)."""
        mh_was, self.mh = self.mh, mh
        try:
            beta, enc = 1.0 / temperature, self.encode(v)
            acceptance = torch.zeros((), device=v.device)
            for _ in range(steps):
                v, enc, acc = self.transition(v, enc, beta)
                acceptance = acceptance + acc.mean()
        finally:
            self.mh = mh_was
        return v, acceptance / max(steps, 1)

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

    def model_samples(self, v_data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CD-k: ``cd_steps`` steps from the data; PCD: from the persistent chains (the first ``B``
        of them), which keep the result."""
        b = len(v_data)
        if not self.persistent:
            return self.gibbs(v_data, self.cd_steps, self.mh)
        if b > len(self.chains):
            raise ValueError(
                f"a batch of {b} needs at least as many persistent chains (model.net.chains={len(self.chains)})"
            )
        if not self.chains_started:
            self.chains.copy_(self.noise(len(self.chains)).to(self.chains))
            if self.chain_init == "data":
                self.chains[:b] = v_data
            self.chains_started.fill_(True)
        v, acceptance = self.gibbs(self.chains[:b], self.cd_steps, self.mh)
        self.chains[:b] = v
        return v, acceptance

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> RBMOutput:
        """``x`` [B, C, H, W] in [0, 1]; ``labels`` are ignored (trained without labels). Training
        runs the chains and fills ``model_free_energy``; evaluation the monitors."""
        v = self.visible_states(x)
        if self.training and not self.bias_from_data:
            self.init_visible_bias(v)
            self.bias_from_data.fill_(True)
        if self.training:
            v_model, acceptance = self.model_samples(v)
            both = torch.cat([v, v_model])  # one pass through the hidden layer for both terms
            enc = self.encode(both)
            f = self.free_energy_at(both, enc)
            with torch.no_grad():
                prob = self.firing(enc)[: len(v)]
            return RBMOutput(prob, f[: len(v)], model_free_energy=f[len(v) :], acceptance=acceptance)
        enc = self.encode(v)
        return RBMOutput(
            self.firing(enc),
            self.free_energy_at(v, enc),
            reconstruction=self.reconstruct(v),
            pseudo_likelihood=self.pseudo_likelihood(v, enc),
        )


class RBMLoss(nn.Module):
    """Maximum likelihood for an :class:`EnergyModel` through the surrogate
    ``total = mean F(v_data) - mean F(v_model)`` (v_model constant: its gradient is minus the
    log-likelihood gradient, the model term estimated by the chains), plus what monitors it:
    ``free_energy/data`` (its train-test gap shows overfitting), ``free_energy/model``,
    ``hidden/on`` (mean p(on | v)), ``chain/acceptance``; in evaluation ``reconstruction`` (sum of
    squared pixel errors of one up-down pass) and ``log_likelihood/pseudo`` (per image, nats;
    what picks ``best.pt``)."""

    monitor = ("log_likelihood/pseudo", "max")

    def forward(self, out: RBMOutput, target: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        losses = {"free_energy/data": out.free_energy.mean().detach(), "hidden/on": out.hidden_prob.mean().detach()}
        if out.reconstruction is not None:
            binary = (target > 0.5).to(out.reconstruction.dtype)
            losses["reconstruction"] = (out.reconstruction - binary).pow(2).flatten(1).sum(1).mean().detach()
        if out.pseudo_likelihood is not None:
            losses["log_likelihood/pseudo"] = out.pseudo_likelihood.mean().detach()
        if out.model_free_energy is not None:
            losses["total"] = out.free_energy.mean() - out.model_free_energy.mean()
            losses["free_energy/model"] = out.model_free_energy.mean().detach()
            losses["chain/acceptance"] = out.acceptance.detach()
        return losses
