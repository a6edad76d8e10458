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

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

Beta = float | torch.Tensor  # one inverse temperature, or one per row of the batch [B]


def per_row(beta: Beta, dims: int) -> Beta:
    """``beta`` ready to scale a tensor of ``dims`` dimensions whose first is the batch: a float as
    it is, one per row [B] viewed as [B, 1, ...]."""
    return beta.view(-1, *([1] * (dims - 1))) if isinstance(beta, torch.Tensor) else beta


def bernoulli(p: torch.Tensor) -> torch.Tensor:
    """Binary draws with probabilities ``p`` (any shape): u < p, u uniform in [0, 1). On a CPU the
    very draws of ``torch.bernoulli(p)`` from the same seed (tested), 3.4x faster (2,000 x 784:
    5.7 ms against 19.5 ms, 2 cores): the draws were half of what a ladder sweep cost. The
    comparison is made in place on the uniforms (0.0 / 1.0 in ``p``'s dtype, the same values as
    a bool tensor converted): 670 x 784 in 1.8-2.2 ms against 2.3-2.9 ms, 2 cores."""
    return torch.rand_like(p).lt_(p)


def softplus(x: torch.Tensor) -> torch.Tensor:
    """log(1 + e^x) (any shape). Where no gradient flows (the chains, the swap tests, AIS) it is
    max(x, 0) + log(1 + e^-|x|), in place on two temporaries: on a CPU ``F.softplus`` runs a
    scalar log1p, 3.7x slower (670 x 500: 1.67 ms against 0.45 ms, 2 cores; it was the most
    costly element-wise pass of a ladder sweep), with the same absolute error (5e-7 against
    float64 for |x| < 10), which is what free energies and logits need. Where a gradient flows,
    ``F.softplus`` (its derivative at 0 is 1/2; that of the split form is not)."""
    if x.requires_grad and torch.is_grad_enabled():
        return torch.nn.functional.softplus(x)
    return x.clamp_min(0).add_(x.abs().neg_().exp_().add_(1).log_())


class RBMOutput(NamedTuple):
    """``hidden_prob`` [B, N]: p(hidden unit / capsule on | v_data); ``free_energy`` [B]: F(v_data);
    ``reconstruction`` [B, C, H, W]: p(v = 1 | h) after one up-down pass (evaluation only);
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
    that many inverse temperatures from the base-rate model to the model (:func:`tempered_sweep`;
    Desjardins et al., AISTATS 2010; Cho, Raiko & Ilin, IJCNN 2010), so that the negative phase
    moves between the model's modes as a chain at one temperature cannot; 1: plain PCD;
    ``ladder_width``: chains a level below the top of that ladder (None: ``chains``). Only the
    top's chains give the model term, the levels below carry states between the modes; fewer of
    them cost less (:func:`level_pairs`: the top's chains take turns at the swaps) but bring the
    top new classes more slowly, and the model learns the top's mix (docs/capsrbm.md, "A
    full-width ladder": 30 below 100 left classes under 5 % that 100 below 100 did not).
    ``ladder_from``: the ladder's lowest inverse temperature (0: the base-rate model itself); the
    levels start evenly spaced from there to 1 and are re-spaced as the model trains (:func:`retune`,
    which keeps both ends). Above 0 the ladder spends no levels on the melted states that a model of
    digits has at low beta (docs/capsrbm.md, "A shorter ladder").
    """

    def __init__(
        self,
        image_shape: tuple[int, int, int],
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
            raise ValueError(f"PCD needs at least one persistent chain: model.net.chains must be >= 1, got {chains}")
        if ladder_width is not None and not 1 <= ladder_width <= chains:
            raise ValueError(
                f"model.net.ladder_width must be null or between 1 and model.net.chains ({chains}), got {ladder_width}"
            )
        if not 0 <= ladder_from < 1 or (ladder_from > 0 and tempering < 2):
            raise ValueError(
                f"model.ladder_from must be in [0, 1) and needs model.tempering >= 2, got {ladder_from}; "
                "e.g. model.tempering=8 model.ladder_from=0.55"
            )
        if not 0 <= ladder_shift <= 10 or (ladder_shift and tempering < 2):
            raise ValueError(
                f"model.ladder_shift must be in [0, 10] and needs model.tempering >= 2, got {ladder_shift}; "
                "e.g. model.tempering=8 model.ladder_shift=1"
            )
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
        as beta (top_down + a - base) + base, three passes in place (five passes and three
        [B, V] temporaries written out: 1.8 ms of a 670-row ladder sweep, 2 cores)."""
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
            for t in range(steps):
                v, enc, acc = self.transition(v, enc, beta, encode=t < steps - 1)
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

    @torch.no_grad()
    def tempered(
        self,
        states: torch.Tensor,
        steps: int,
        base: torch.Tensor,
        first_sweep: int = 0,
        betas: Sequence[float] | torch.Tensor | None = None,
        widths: Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``steps`` sweeps of parallel tempering over ``states`` [K, n, C, H, W] (one level per
        inverse temperature ``betas``, increasing to 1; None: the model's own tuned ladder when it
        has one of K levels, else :func:`ladder`) above the base-rate model ``base``; returns the
        states, the mean acceptance of the beta = 1 chain and the swap rate of each neighbouring
        pair ``[K - 1]``. With ``widths`` (chains a level, [K]): ``states`` [sum(widths), C, H, W],
        the levels one after another (:func:`tempered_sweep`)."""
        levels = len(widths) if widths is not None else len(states)
        if betas is None:
            betas = own_ladder(self, levels)
        betas = torch.as_tensor(betas, dtype=states.dtype).to(states.device)
        enc = self.encode(states if widths is not None else states.flatten(0, 1))
        acceptance = torch.zeros((), device=states.device)
        swapped = torch.zeros(levels - 1, device=states.device)
        for t in range(steps):
            last = t == steps - 1
            states, enc, acc, rates = tempered_sweep(
                self, states, enc, betas, base, (first_sweep + t) % 2, not last, widths
            )
            acceptance, swapped = acceptance + acc.mean(), swapped + rates
        tried = swap_tries(first_sweep, steps, levels - 1)
        return states, acceptance / max(steps, 1), swapped / tried.clamp_min(1).to(swapped)

    def model_samples(self, v_data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """CD-k: ``cd_steps`` steps from the data; PCD: from the persistent chains (the first
        min(B, ``chains``) of them), which keep the result; with ``tempering`` > 1, ``cd_steps`` sweeps of the
        ladder whose top they are. Returns the samples, the chains' mean acceptance and, with
        tempering, the lowest swap rate of the ladder (else None)."""
        if not self.persistent:
            return (*self.gibbs(v_data, self.cd_steps, self.mh), None)
        # PCD's model term needs no more fantasy particles than a batch has images (Tieleman 2008
        # kept 100 whatever the batch): a bigger batch over the same chains runs fewer of their
        # sweeps per epoch, the cost that dominates a tempered step
        b = min(len(v_data), len(self.chains))
        if not self.chains_started:
            self.chains.copy_(self.noise(len(self.chains)).to(self.chains))
            if self.chain_init == "data":
                self.chains[:b] = v_data[:b]
            if self.tempering > 1:
                below = self.ladder_chains
                below.copy_(self.noise(below.shape[0] * below.shape[1]).view_as(below).to(below))
            self.chains_started.fill_(True)
        if self.tempering > 1:
            m = min(b, self.ladder_chains.shape[1])  # chains a level below the top
            below = self.ladder_chains[:, :m]
            states = torch.cat([below.flatten(0, 1), self.chains[:b]])
            widths = [m] * len(below) + [b]
            first = int(self.sweeps)
            base = self.base_rate + self.ladder_shift if self.ladder_shift else self.base_rate
            states, acceptance, rates = self.tempered(states, self.cd_steps, base, first, self.betas, widths)
            top = states[len(below) * m :]
            self.ladder_chains[:, :m] = states[: len(below) * m].view_as(below)
            self.chains[:b] = top
            self.sweeps.add_(self.cd_steps)
            # the running swap rate of each pair, of the pairs tried (one sweep tries every other)
            tried = torch.zeros_like(self.swap_rates, dtype=torch.bool)
            tried[first % 2 :: 2] = True
            if self.cd_steps > 1:
                tried[:] = True
            self.swap_rates[tried] = 0.98 * self.swap_rates[tried] + 0.02 * rates[tried].double()
            if int(self.sweeps) % RETUNE_EVERY < self.cd_steps:
                self.betas.copy_(retune(self.betas, self.swap_rates))
            return top, acceptance, rates[tried].min()
        v, acceptance = self.gibbs(self.chains[:b], self.cd_steps, self.mh)
        self.chains[:b] = v
        return v, acceptance, None

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
            v_model, acceptance, swap_rate = self.model_samples(v)
            both = torch.cat([v, v_model])  # one pass through the hidden layer for both terms
            enc = self.encode(both)
            f = self.free_energy_at(both, enc)
            with torch.no_grad():
                prob = self.firing(enc)[: len(v)]
            return RBMOutput(
                prob, f[: len(v)], model_free_energy=f[len(v) :], acceptance=acceptance, swap_rate=swap_rate
            )
        enc = self.encode(v)
        return RBMOutput(
            self.firing(enc),
            self.free_energy_at(v, enc),
            reconstruction=self.reconstruct(v),
            pseudo_likelihood=self.pseudo_likelihood(v, enc),
        )


def base_rate(v: torch.Tensor) -> torch.Tensor:
    """The base-rate model's visible biases ``[C*H*W]``: logit of each pixel's mean over the binary
    images ``v`` [N, C, H, W], smoothed as (sum + 1/2) / (N + 1) (a pixel never on stays finite)."""
    p = (v.flatten(1).double().sum(0) + 0.5) / (len(v) + 1)
    return torch.logit(p).float()


def ladder(levels: int) -> list[float]:
    """The inverse temperatures of a parallel-tempering ladder: ``levels`` evenly spaced from 0
    (the base-rate model) to 1 (the model). Evenly spaced because the swap rates, measured on an
    RBM trained on MNIST with 30 levels, stay between 0.1 and 0.9 everywhere (geometric spacing
    left the top pair at 0)."""
    if levels < 2:
        raise ValueError(f"a tempering ladder needs at least 2 levels (0 and 1), got {levels}")
    return torch.linspace(0, 1, levels, dtype=torch.float64).tolist()


def own_ladder(model: nn.Module, levels: int) -> torch.Tensor | list[float]:
    """The ladder a model's sampler runs with ``levels`` levels: its own tuned inverse
    temperatures when it has that many, else :func:`ladder` (even from 0)."""
    own = getattr(model, "betas", None)
    return own if own is not None and len(own) == levels else ladder(levels)


def upper_ladder(betas: Sequence[float] | torch.Tensor, levels: int, lowest: float) -> torch.Tensor:
    """A ladder of ``levels`` inverse temperatures from ``lowest`` to 1, spaced as the ladder
    ``betas`` (increasing to 1 from ``betas[0]`` <= ``lowest``, e.g. a model's tuned one) ``[levels]``: level i sits at
    position p_i of ``betas``' index, p evenly spaced from where ``lowest`` falls to the end,
    between neighbouring levels linearly. A tuned ladder puts its levels at equal thermodynamic
    length (every pair swaps about equally often, :func:`retune`), so its upper part keeps that.

    Why a ladder that stops short of the base-rate model: the round trips of parallel tempering,
    not its levels, decorrelate the top's states, and a level needs to reach no lower than where
    the model's own chain forgets its state in a few sweeps. On the capsule RBM of
    ``experiment=capsrbm_mnist`` that is beta <= 0.7 (a chain started at a test digit leaves its class
    within 50 steps; at 0.8 in 400), and 8 levels from 0.55 make about 5x the round trips of the
    trained 20 from 0 for the same compute (docs/capsrbm.md, "A shorter ladder for sampling")."""
    own = torch.as_tensor(betas, dtype=torch.float64).cpu()
    if len(own) < 2 or not (own.diff() >= 0).all() or not 0 <= float(own[0]) < 1 or float(own[-1]) != 1.0:
        raise ValueError(f"betas must increase from [0, 1) to 1, got {own.tolist()}")
    if levels < 2:
        raise ValueError(f"a tempering ladder needs at least 2 levels, got {levels}")
    if not float(own[0]) <= lowest < 1:
        raise ValueError(f"the lowest inverse temperature must be in [{float(own[0]):.3g}, 1), got {lowest}")
    k = int(torch.searchsorted(own, torch.tensor(lowest, dtype=torch.float64), right=True)) - 1
    k = min(k, len(own) - 2)
    gap = float(own[k + 1] - own[k])
    start = k + ((lowest - float(own[k])) / gap if gap > 0 else 0.0)
    position = torch.linspace(start, len(own) - 1, levels, dtype=torch.float64)
    i = position.floor().long().clamp(max=len(own) - 2)
    placed = own[i] + (position - i) * (own[i + 1] - own[i])
    placed[0], placed[-1] = lowest, 1.0
    return placed


RETUNE_EVERY = 100  # training sweeps between two re-spacings of the ladder


def retune(betas: torch.Tensor, rates: torch.Tensor, step: float = 0.5) -> torch.Tensor:
    """The ladder re-spaced so that every neighbouring pair swaps about equally often ``[K]``.

    Model: pair k is accepted with rate A_k = exp(-(sigma_k * gap_k)^2), sigma_k the (constant)
    spread of the log-density ratio per unit beta on [beta_k, beta_k+1]; the thermodynamic length
    sum_k sigma_k * gap_k is divided into K - 1 equal parts, the ends (0 or the lowest, and 1) kept; the levels move
    ``step`` of the way there (damped: the rates are running means). As Katzgraber et al.'s
    feedback ladders (J. Stat. Mech. 2006) and Vousden, Farr & Mandel (arXiv:1501.05823), simpler."""
    betas, rates = betas.double(), rates.double().clamp(1e-3, 0.999)
    gaps = betas.diff().clamp_min(1e-9)
    length = torch.cat([betas.new_zeros(1), torch.sqrt(-torch.log(rates)).cumsum(0)])  # at each beta_k
    targets = torch.linspace(0, float(length[-1]), len(betas), dtype=torch.float64, device=betas.device)
    # invert the piecewise-linear map beta -> length at the equal targets
    k = torch.searchsorted(length, targets, right=True).clamp(1, len(gaps)) - 1
    frac = ((targets - length[k]) / (length[k + 1] - length[k]).clamp_min(1e-12)).clamp(0, 1)
    placed = betas[k] + frac * gaps[k]
    placed[0], placed[-1] = betas[0], 1.0
    moved = (1 - step) * betas + step * placed
    return torch.cummax(moved, 0).values  # increasing, as the sweep needs


def swap_tries(first_sweep: int, steps: int, pairs: int) -> torch.Tensor:
    """How often each neighbouring pair k of a ladder proposes a swap in the sweeps
    ``first_sweep`` .. ``first_sweep + steps - 1`` ``[pairs]``: pair k on the sweeps t with
    t % 2 == k % 2 (:func:`tempered_sweep`'s parity)."""
    t = torch.arange(first_sweep, first_sweep + steps)
    return ((t[None] - torch.arange(pairs)[:, None]) % 2 == 0).sum(1).double()


def take(enc: Any, rows: torch.Tensor) -> Any:
    """The rows ``rows`` of an :meth:`EnergyModel.encode` output: a tensor [B, ...] or a tuple of
    them; a tensor expanded along its rows (stride 0: every row the same) stays expanded."""
    if isinstance(enc, torch.Tensor):
        return enc[: len(rows)] if enc.stride(0) == 0 else enc.index_select(0, rows)
    return type(enc)(*(take(x, rows) for x in enc))


def level_pairs(widths: Sequence[int], parity: int, device: torch.device | None = None) -> list:
    """Which chains of a ladder with ``widths`` chains a level (levels one after another in one
    batch) propose to swap in a sweep of ``parity``: for each neighbouring pair (k, k + 1) with
    k % 2 == ``parity``, the rows ``(lo [m], hi [m])``, m = min(widths[k], widths[k + 1]); chain i of
    a level with m chains meets chain i of the other, or a random m of its chains when it has more
    (drawn afresh each sweep, independent of the states, so the swap test stays exact)."""
    offsets = [0]
    for w in widths:
        offsets.append(offsets[-1] + w)

    def pick(k: int, m: int) -> torch.Tensor:
        chosen = torch.arange(m, device=device) if widths[k] == m else torch.randperm(widths[k], device=device)[:m]
        return chosen + offsets[k]

    pairs = []
    for k in range(parity, len(widths) - 1, 2):
        m = min(widths[k], widths[k + 1])
        pairs.append((pick(k, m), pick(k + 1, m)))
    return pairs


@torch.no_grad()
def tempered_sweep(
    model: EnergyModel,
    states: torch.Tensor,
    enc: Any,
    betas: torch.Tensor,
    base: torch.Tensor,
    parity: int,
    encode: bool = True,
    widths: Sequence[int] | None = None,
) -> tuple[torch.Tensor, Any, torch.Tensor, torch.Tensor]:
    """One sweep of parallel tempering (replica exchange; Swendsen & Wang 1986, Geyer 1991) over
    ``states`` [K, n, C, H, W] (level k at inverse temperature ``betas`` [K], increasing) and
    ``enc``, their :meth:`~EnergyModel.encode` as one batch of K * n; or, with ``widths`` [K]
    (chains a level), over ``states`` [sum(widths), C, H, W], the levels one after another (a
    tapered ladder: fewer chains below the top cost less, :func:`level_pairs` pairs them). Every
    neighbouring pair (k, k + 1) with k of ``parity`` proposes to exchange its states, chain by
    chain, accepted with

        log a = F_k(x) + F_k+1(y) - F_k(y) - F_k+1(x)     (x at level k, y at level k + 1)

    where F_beta is the free energy of p_beta, the base-rate model ``base`` tempered into the model
    (Salakhutdinov & Murray 2008, as AIS uses); then one step of the model's own chain at every
    level, all levels as one batch with one inverse temperature per row (one matmul each way
    for the whole ladder). Both moves leave the product of the p_beta invariant, so the last level
    samples the model. Returns the states, their ``enc`` (None when ``encode`` is False: the last
    sweep of a run), the acceptance of the last level's chain step [n] and the swap rate of every
    pair [K - 1] (0 for the pairs not of ``parity``)."""
    k_levels, tapered = len(betas), widths is not None
    flat = states if tapered else states.flatten(0, 1)
    if not tapered:
        widths = [states.shape[1]] * k_levels
    if len(widths) != k_levels or sum(widths) != len(flat):
        raise ValueError(f"widths {list(widths)} do not match {k_levels} levels of {len(flat)} states")
    counts = torch.tensor(widths, device=flat.device)
    own = betas.repeat_interleave(counts)
    pairs = level_pairs(widths, parity, flat.device)
    rates = torch.zeros(k_levels - 1, device=flat.device)
    if pairs:
        lo, hi = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
        partner = own.clone()  # each state's inverse temperature if it swaps (its own if it cannot)
        partner[lo], partner[hi] = own[hi], own[lo]
        # each state's free energy at its own level and at its partner's: 2 evaluations for all
        f_own = model.free_energy_at(flat, enc, own, base)
        f_other = model.free_energy_at(flat, enc, partner, base)
        log_a = f_own[lo] + f_own[hi] - f_other[lo] - f_other[hi]  # [pairs' chains]
        swap = torch.rand_like(log_a).log() < log_a
        rows = torch.arange(len(flat), device=flat.device)
        rows[lo] = torch.where(swap, hi, lo)
        rows[hi] = torch.where(swap, lo, hi)
        flat, enc = flat.index_select(0, rows), take(enc, rows)
        per_pair = swap.to(rates.dtype).split([len(p[0]) for p in pairs])
        rates[parity::2] = torch.stack([r.mean() for r in per_pair])
    flat, enc, acc = model.transition(flat, enc, own, base, encode=encode)
    top = acc[len(acc) - widths[-1] :]
    return (flat if tapered else flat.view_as(states)), enc, top, rates


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
            binary = (target > 0.5).to(out.reconstruction.dtype)
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
