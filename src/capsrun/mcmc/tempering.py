"""Parallel tempering (replica exchange; Swendsen & Wang 1986, Geyer 1991) for energy models.

A ladder is K inverse temperatures 0 <= beta_1 < ... < beta_K = 1 between the base-rate model
and the model (:mod:`capsrun.mcmc.base`); one chain state (or several) per level. A sweep
proposes to exchange the states of neighbouring levels and then moves every level by the model's
own chain at its beta. Both moves leave the product of the p_beta invariant, so the top level
samples the model, while states climb down to where the model is melted, change mode there and
climb back up: the moves between modes that one chain at beta = 1 almost never makes (Desjardins
et al., AISTATS 2010; Cho, Raiko & Ilin, IJCNN 2010, for RBMs).

Everything here is a pure function of tensors and an :class:`~capsrun.mcmc.base.EnergyChain`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from capsrun.mcmc.base import EnergyChain, latent_of, take

RETUNE_EVERY = 100  # training sweeps between two re-spacings of a model's ladder


def ladder(levels: int) -> list[float]:
    """The inverse temperatures of a parallel-tempering ladder: ``levels`` evenly spaced from 0
    (the base-rate model) to 1 (the model). Evenly, not geometrically: on an RBM of MNIST the swap
    rates of an even ladder stay inside (0.1, 0.9), a geometric one starves its top pair."""
    if levels < 2:
        raise ValueError(f"a tempering ladder needs at least 2 levels (0 and 1), got {levels}")
    return torch.linspace(0, 1, levels, dtype=torch.float64).tolist()


def own_ladder(model: Any, levels: int) -> torch.Tensor | list[float]:
    """The ladder a model's sampler runs with ``levels`` levels: its own tuned inverse
    temperatures (``model.betas``) when it has that many, else :func:`ladder` (even from 0)."""
    own = getattr(model, "betas", None)
    return own if own is not None and len(own) == levels else ladder(levels)


def upper_ladder(betas: Sequence[float] | torch.Tensor, levels: int, lowest: float) -> torch.Tensor:
    """A ladder of ``levels`` inverse temperatures from ``lowest`` to 1, spaced as the ladder
    ``betas`` (increasing to 1 from ``betas[0]`` <= ``lowest``, e.g. a model's tuned one)
    ``[levels]``: level i sits at position p_i of ``betas``' index, p evenly spaced from where
    ``lowest`` falls to the end, linearly between neighbouring levels. A tuned ladder puts its
    levels at equal thermodynamic length (:func:`retune`), so its upper part keeps that.

    Why a ladder may stop short of the base-rate model: the round trips of parallel tempering,
    not its levels, decorrelate the top's states, and a level needs to reach no lower than where
    the model's own chain forgets its state in a few sweeps."""
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


def sampling_ladder(own: torch.Tensor | None, levels: int, lowest: float) -> torch.Tensor | None:
    """The inverse temperatures ``[levels]`` of a sampling ladder from ``lowest`` to 1, spaced as
    a model's own tuned ladder ``own`` (evenly when None; :func:`upper_ladder`), on ``own``'s
    device; None when ``lowest`` is 0: the ladder the model's sampler runs anyway
    (:func:`own_ladder`)."""
    if lowest == 0:
        return None
    spacing = own if own is not None else ladder(levels)
    placed = upper_ladder(spacing, levels, lowest)
    return placed if own is None else placed.to(own.device)


def retune(betas: torch.Tensor, rates: torch.Tensor, step: float = 0.5) -> torch.Tensor:
    """The ladder re-spaced so that every neighbouring pair swaps about equally often ``[K]``.

    Model: pair k is accepted with rate A_k = exp(-(sigma_k * gap_k)^2), sigma_k the (constant)
    spread of the log-density ratio per unit beta on [beta_k, beta_k+1]; the thermodynamic length
    sum_k sigma_k * gap_k is divided into K - 1 equal parts, both ends kept; the levels move
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
    model: EnergyChain,
    states: torch.Tensor,
    enc: Any,
    betas: torch.Tensor,
    base: torch.Tensor,
    parity: int,
    encode: bool = True,
    widths: Sequence[int] | None = None,
) -> tuple[torch.Tensor, Any, torch.Tensor, torch.Tensor]:
    """One sweep over ``states`` [K, n, C, H, W] (level k at inverse temperature ``betas`` [K],
    increasing) and ``enc``, their ``encode`` as one batch of K * n; or, with ``widths`` [K]
    (chains a level), over ``states`` [sum(widths), C, H, W], the levels one after another (a
    tapered ladder: :func:`level_pairs` pairs them). Every neighbouring pair (k, k + 1) with k of
    ``parity`` proposes to exchange its states, chain by chain, accepted with

        log a = F_k(x) + F_k+1(y) - F_k(y) - F_k+1(x)     (x at level k, y at level k + 1)

    where F_beta is the free energy of p_beta above the base-rate model ``base``; then one step of
    the model's own chain at every level, all levels as one batch with one inverse temperature
    per row. Returns the states, their ``enc`` (None when ``encode`` is False: the last sweep of a
    run), the acceptance of the top level's chain step [n] and the swap rate of every pair
    [K - 1] (0 for the pairs not of ``parity``)."""
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


@torch.no_grad()
def run_ladder(
    model: EnergyChain,
    states: torch.Tensor,
    steps: int,
    base: torch.Tensor,
    first_sweep: int = 0,
    betas: Sequence[float] | torch.Tensor | None = None,
    widths: Sequence[int] | None = None,
    latent: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``steps`` sweeps of parallel tempering over ``states`` [K, n, C, H, W] (one level per
    inverse temperature of ``betas``, increasing to 1; None: :func:`own_ladder`) above the
    base-rate model ``base``, the first of parity ``first_sweep``; with ``widths`` (chains a
    level, [K]) ``states`` [sum(widths), C, H, W], the levels one after another; ``latent``: the
    states' latent part, one row per state (:func:`~capsrun.mcmc.base.latent_of`). Returns the
    states, the mean acceptance of the top level's chain, the swap rate of each neighbouring pair
    per try ``[K - 1]`` and the final latent part (None if the model has none)."""
    levels = len(widths) if widths is not None else len(states)
    if betas is None:
        betas = own_ladder(model, levels)
    betas = torch.as_tensor(betas, dtype=states.dtype).to(states.device)
    enc = model.chain_state(states if widths is not None else states.flatten(0, 1), latent)
    acceptance = torch.zeros((), device=states.device)
    swapped = torch.zeros(levels - 1, device=states.device)
    for t in range(steps):
        last = t == steps - 1
        states, enc, acc, rates = tempered_sweep(
            model, states, enc, betas, base, (first_sweep + t) % 2, not last, widths
        )
        acceptance, swapped = acceptance + acc.mean(), swapped + rates
    tried = swap_tries(first_sweep, steps, levels - 1)
    return (
        states,
        acceptance / max(steps, 1),
        swapped / tried.clamp_min(1).to(swapped),
        latent_of(enc) if steps else latent,
    )
