"""Parallel tempering (capsrun.mcmc.tempering): ladders and their re-spacing by hand, the swap
test against the tempered densities summed by hand, every level of a ladder against its exact
distribution on 9-pixel models, and a two-well model that a plain chain cannot cross and a
ladder does."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from capsrun.mcmc.base import base_rate
from capsrun.mcmc.chains import gibbs
from capsrun.mcmc.tempering import ladder, level_pairs, retune, run_ladder, swap_tries, tempered_sweep, upper_ladder
from capsrun.models.rbm import RBM
from helpers import LADDER_BASE as BASE
from helpers import all_images, exact_at, sampling_floor, small_rbm, tempering_capsrbm, tv, two_wells


def test_ladder_is_even_from_the_base_rate_model_to_the_model():
    assert ladder(5) == [0.0, 0.25, 0.5, 0.75, 1.0]
    with pytest.raises(ValueError, match="at least 2 levels"):
        ladder(1)


def test_upper_ladder_keeps_the_spacing_of_the_ladder_it_cuts():
    """Levels at evenly spaced positions of the given ladder's index from where ``lowest`` falls
    (by hand: 0.3 is position 1.5 of [0, 0.1, 0.5, 1]; positions 1.5, 2.25, 3 are 0.3, 0.625, 1)."""
    torch.testing.assert_close(
        upper_ladder([0.0, 0.1, 0.5, 1.0], 3, 0.3), torch.tensor([0.3, 0.625, 1.0], dtype=torch.float64)
    )
    torch.testing.assert_close(upper_ladder(ladder(5), 3, 0.5), torch.tensor([0.5, 0.75, 1.0], dtype=torch.float64))
    torch.testing.assert_close(upper_ladder(ladder(5), 4, 0.4), torch.tensor([0.4, 0.6, 0.8, 1.0], dtype=torch.float64))
    tuned = torch.tensor([0.0, 0.05, 0.2, 0.6, 0.9, 1.0], dtype=torch.float64)
    torch.testing.assert_close(upper_ladder(tuned, 6, 0.0), tuned)  # from 0 with as many levels: itself
    torch.testing.assert_close(upper_ladder(tuned[2:], 4, 0.2), tuned[2:])  # a ladder trained from 0.2
    torch.testing.assert_close(upper_ladder(tuned, 3, 0.6), torch.tensor([0.6, 0.9, 1.0], dtype=torch.float64))
    for args, message in [
        (([0.0, 0.5, 0.9], 3, 0.2), "increase from"),
        (([0.0, 0.7, 0.5, 1.0], 3, 0.2), "increase from"),
        (([0.5, 0.7, 1.0], 3, 0.2), r"in \[0.5, 1\)"),
        ((ladder(5), 1, 0.2), "at least 2 levels"),
        ((ladder(5), 3, 1.0), r"in \[0, 1\)"),
    ]:
        with pytest.raises(ValueError, match=message):
            upper_ladder(*args)


def _lengths(betas: torch.Tensor, sigma: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """sqrt(-log A) of each pair of ``betas`` when the spread per unit beta is ``sigma`` [m] on the
    intervals between ``edges`` [m + 1]: the integral of sigma over each gap."""

    def cumulative(b):
        return sum(float(s_ * (min(max(b, lo), hi) - lo)) for s_, lo, hi in zip(sigma, edges[:-1], edges[1:]))

    c = torch.tensor([cumulative(float(b)) for b in betas], dtype=torch.float64)
    return c.diff()


def test_retune_equalises_the_swap_rates_of_a_known_profile():
    """A spread of 8 per unit beta on [0, 0.25], 1 on [0.25, 0.875], 5 on [0.875, 1] (constant
    within each gap of the even ladder of 9): from that ladder's rates, one full step (step=1)
    gives a ladder whose pairs all have one rate, and the damped step lands halfway."""
    sigma = torch.tensor([8.0, 1.0, 5.0], dtype=torch.float64)
    edges = torch.tensor([0.0, 0.25, 0.875, 1.0], dtype=torch.float64)
    even = torch.tensor(ladder(9), dtype=torch.float64)
    rates = torch.exp(-(_lengths(even, sigma, edges) ** 2))
    tuned = retune(even, rates, step=1.0)
    lengths = _lengths(tuned, sigma, edges)
    assert tuned[0] == 0 and tuned[-1] == 1 and (tuned.diff() > 0).all()
    torch.testing.assert_close(lengths, torch.full_like(lengths, float(lengths.mean())), atol=1e-9, rtol=1e-9)
    assert float(lengths.mean()) == pytest.approx((8 * 0.25 + 0.625 + 5 * 0.125) / 8)
    torch.testing.assert_close(retune(even, rates), (even + tuned) / 2)
    torch.testing.assert_close(retune(even, torch.full((8,), 0.3)), even)  # equal rates: left alone


def test_base_rate_is_the_smoothed_pixel_mean():
    v = torch.tensor([[1.0, 0, 1], [1, 0, 0]]).view(2, 1, 1, 3)
    torch.testing.assert_close(base_rate(v), torch.logit(torch.tensor([2.5, 0.5, 1.5]) / 3))


def _tempered_log_density(model: RBM, v: torch.Tensor, beta: float) -> torch.Tensor:
    """log sum_h exp((1 - beta) base . v - beta E(v, h)), every h enumerated (not the closed form)."""
    hs = torch.tensor(list(itertools.product([0.0, 1.0], repeat=len(model.hidden_bias))), dtype=torch.float64)
    flat = v.flatten(1)
    energy = -(flat @ model.visible_bias)[:, None] - hs @ model.hidden_bias - (flat @ model.weight.T) @ hs.T
    return torch.logsumexp((1 - beta) * (flat @ BASE)[:, None] - beta * energy, 1)


def test_swap_is_accepted_with_the_ratio_of_the_tempered_densities(monkeypatch):
    """Chain steps stubbed out, so that only the exchange acts: x at beta 0.3, y at 0.8, 40,000
    proposals; the share exchanged matches min(1, p_0.3(y) p_0.8(x) / (p_0.3(x) p_0.8(y))) with
    the hidden units summed by hand."""
    model = small_rbm()
    monkeypatch.setattr(model, "transition", lambda v, enc, beta, base, encode=True: (v, enc, torch.ones(len(v))))
    states = all_images()
    x, y = states[37], states[422]
    lo, hi = 0.3, 0.8
    d = {b: _tempered_log_density(model, torch.stack([x, y]), b) for b in (lo, hi)}
    exact = min(1.0, math.exp(float((d[lo][1] + d[hi][0] - d[lo][0] - d[hi][1]).detach())))
    n = 40000
    states = torch.stack([x.expand(n, -1, -1, -1), y.expand(n, -1, -1, -1)])
    torch.manual_seed(0)
    betas = torch.tensor([lo, hi], dtype=torch.float64)
    states, enc, _, rates = tempered_sweep(
        model, states, model.chain_state(states.flatten(0, 1)), betas, BASE, parity=0
    )
    assert 0.05 < exact < 0.95  # a case where the test decides
    assert abs(float(rates[0]) - exact) < 4 * math.sqrt(exact * (1 - exact) / n), (float(rates[0]), exact)
    swapped = (states[0].flatten(1) == y.flatten()).all(1)
    assert float(swapped.double().mean()) == pytest.approx(float(rates[0]))
    assert torch.equal(states[1][swapped], x.expand(int(swapped.sum()), -1, -1, -1))
    assert torch.equal(states[1][~swapped], y.expand(int((~swapped).sum()), -1, -1, -1))
    torch.testing.assert_close(
        enc, model.chain_state(states.flatten(0, 1))
    )  # the hidden inputs travel with their states


def test_swap_rates_count_only_the_pairs_tried():
    model = small_rbm()
    states = torch.bernoulli(torch.full((4, 50, 1, 3, 3), 0.5, dtype=torch.float64))
    betas = torch.tensor(ladder(4), dtype=torch.float64)
    _, _, _, rates = tempered_sweep(model, states, model.chain_state(states.flatten(0, 1)), betas, BASE, parity=1)
    assert rates[0] == 0 and rates[2] == 0 and 0 <= rates[1] <= 1


@pytest.mark.parametrize("make", [small_rbm, tempering_capsrbm], ids=["rbm", "capsrbm"])
def test_every_level_of_the_ladder_samples_its_tempered_distribution(make):
    """20,000 ladders of 4 levels from noise, 150 sweeps: each level's states are distributed as
    p_beta (the bottom one as the base-rate model), within 1.3x the floor of exact draws."""
    model = make()
    n, betas = 20000, ladder(4)
    torch.manual_seed(1)
    levels = torch.bernoulli(torch.full((len(betas), n, 1, 3, 3), 0.5, dtype=torch.float64))
    # measured (capsrbm): the lower levels reach the floor within 25-50 sweeps, the top one does
    # not at 60 (1.3-1.5x the floor on seeds 2-4; this seed: 1.1x at 100 and 150 sweeps)
    levels, acceptance, rates, _ = run_ladder(model, levels, 150, BASE)
    for v, beta in zip(levels, betas):
        exact = exact_at(model, beta)
        assert tv(v, exact) < 1.3 * sampling_floor(exact, n), (beta, tv(v, exact))
    assert ((rates > 0.05) & (rates <= 1)).all() and 0 < acceptance <= 1


def test_level_pairs_meet_chain_by_chain_or_a_random_subset_of_the_wider_level():
    """Levels of 2, 2 and 3 chains, one after another in the batch (rows 0-1, 2-3, 4-6): parity 0
    pairs level 0 with 1 chain by chain; parity 1 pairs level 1's 2 chains with 2 distinct chains
    of the top, drawn afresh each sweep, so that over sweeps every top chain takes part."""
    ((lo, hi),) = level_pairs([2, 2, 3], 0)
    assert lo.tolist() == [0, 1] and hi.tolist() == [2, 3]
    torch.manual_seed(0)
    met = torch.zeros(7)
    for _ in range(300):
        ((lo, hi),) = level_pairs([2, 2, 3], 1)
        assert lo.tolist() == [2, 3] and len(set(hi.tolist())) == 2 and set(hi.tolist()) <= {4, 5, 6}
        met[hi] += 1
    assert met[:4].sum() == 0 and ((met[4:] / 300 - 2 / 3).abs() < 0.1).all(), met  # each top chain 2/3 of sweeps
    assert level_pairs([5, 5], 1) == []  # one pair, of parity 0


def test_a_ladder_of_equal_widths_given_as_widths_is_the_same_ladder():
    """The flat form (``widths``) and the [K, n] form of one ladder draw the same sweeps."""
    model = small_rbm()
    levels = torch.bernoulli(torch.full((4, 50, 1, 3, 3), 0.5, dtype=torch.float64))
    torch.manual_seed(5)
    stacked, acc, rates, _ = run_ladder(model, levels, 7, BASE)
    torch.manual_seed(5)
    flat, acc_flat, rates_flat, _ = run_ladder(model, levels.flatten(0, 1), 7, BASE, widths=[50] * 4)
    assert torch.equal(flat, stacked.flatten(0, 1)) and torch.equal(rates_flat, rates) and acc_flat == acc


@pytest.mark.parametrize("make", [small_rbm, tempering_capsrbm], ids=["rbm", "capsrbm"])
def test_a_tapered_ladder_samples_every_level_s_distribution(make):
    """20,000 chains at the top, 5,000 at each level below (the cheaper ladder of training's
    ``ladder_width``), 150 sweeps from noise: every level within 1.3x the floor of exact draws of
    its own size."""
    model = make()
    betas, widths = ladder(4), [5000, 5000, 5000, 20000]
    torch.manual_seed(1)
    states = torch.bernoulli(torch.full((sum(widths), 1, 3, 3), 0.5, dtype=torch.float64))
    states, acceptance, rates, _ = run_ladder(model, states, 150, BASE, widths=widths)
    for v, beta in zip(states.split(widths), betas):
        exact = exact_at(model, beta)
        assert tv(v, exact) < 1.3 * sampling_floor(exact, len(v)), (beta, tv(v, exact))
    assert ((rates > 0.05) & (rates <= 1)).all() and 0 < acceptance <= 1


def test_a_tapered_ladder_still_crosses_between_wells():
    """4,000 top chains all in the 'off' well, 500 a level below: the top reaches the wells' mass
    (its chains take turns at the swaps with the narrower level)."""
    model = two_wells()
    on = float(exact_at(model)[all_images().flatten(1).sum(1) >= 5].sum())
    n, m = 4000, 500
    below = torch.bernoulli(torch.sigmoid(BASE).expand(11 * m, -1)).view(-1, 1, 3, 3)
    states = torch.cat([below, torch.zeros(n, 1, 3, 3, dtype=torch.float64)])
    torch.manual_seed(3)
    states, _, rates, _ = run_ladder(model, states, 600, BASE, widths=[m] * 11 + [n])
    share = float((states[-n:].flatten(1).sum(1) >= 5).double().mean())
    assert abs(share - on) < 0.05, (share, on)


def test_the_ladder_crosses_between_wells_that_a_plain_chain_cannot():
    model = two_wells()
    exact = exact_at(model)
    mostly_on = all_images().flatten(1).sum(1) >= 5
    on = float(exact[mostly_on].sum())
    assert 0.4 < on < 0.6, on  # two wells of about equal mass
    n = 4000
    start = torch.zeros(n, 1, 3, 3, dtype=torch.float64)  # every chain in the 'off' well
    torch.manual_seed(3)
    plain, _, _ = gibbs(model, start, 300)
    below = torch.sigmoid(BASE).expand(n, -1)
    levels = torch.stack([torch.bernoulli(below).view_as(start) for _ in range(11)] + [start])
    levels, _, rates, _ = run_ladder(model, levels, 600, BASE)
    share_on = {k: float((v.flatten(1).sum(1) >= 5).double().mean()) for k, v in (("plain", plain), ("pt", levels[-1]))}
    assert share_on["plain"] < 0.01, share_on  # stuck where it started
    assert abs(share_on["pt"] - on) < 0.05, (share_on, on)
    # two wells make the chains' draws lumpier than independent ones: over seeds 0-5 a correct
    # ladder gives 1.1-1.8x the floor of exact draws; one that lost a well is near 0.5 / floor
    assert tv(levels[-1], exact) < 2.2 * sampling_floor(exact, n)


def test_swap_tries_count_each_pairs_proposals_by_parity():
    """Pair k proposes on the sweeps t with t % 2 == k % 2, counted by hand."""
    assert swap_tries(0, 7, 4).tolist() == [4, 3, 4, 3]  # t = 0..6: 4 even sweeps, 3 odd
    assert swap_tries(3, 1, 2).tolist() == [0, 1]  # t = 3: only the odd pair
    assert swap_tries(1, 2, 3).tolist() == [1, 1, 1]
