"""Chains from a start (capsrun.mcmc.chains.run_chains, and the epoch grid that runs them): the
same draws as the ladder run by hand, in segments or in one go; a ladder from a lowest level, shifted
and tuned as it runs, still samples the model exactly (9-pixel models, two wells)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from capsrun import sampling
from capsrun.mcmc.chains import ChainSpec, Watch, gibbs, run_chains
from capsrun.mcmc.tempering import ladder, run_ladder, sampling_ladder
from capsrun.models.rbm import RBM
from helpers import LADDER_BASE as BASE
from helpers import all_images, exact_at, sampling_floor, share_on, small_rbm, tempering_capsrbm, tv, two_wells


def _noise(n: int) -> torch.Tensor:
    return torch.bernoulli(torch.full((n, 1, 3, 3), 0.5, dtype=torch.float64))


def _from_base(start: torch.Tensor, levels: int, base: torch.Tensor = BASE) -> torch.Tensor:
    """The levels below the top drawn from the base-rate model, as run_chains draws them."""
    p = torch.sigmoid(base).expand(len(start), -1)
    return torch.stack([torch.bernoulli(p).view_as(start) for _ in range(levels - 1)] + [start])


def test_a_ladder_starts_where_it_is_told():
    """``below``: the levels under the top start there (a checkpoint's own ladder, ``capsrun sample
    init=chains``), not at draws from the base rate; the same sweeps as the ladder run by hand."""
    model = small_rbm()
    start = _noise(30)
    below = torch.stack([torch.full_like(start, float(k % 2)) for k in range(4)])  # all-0 and all-1 levels
    spec = ChainSpec(3, tempering=5, seed=7)
    run = run_chains(model, start, spec, BASE, below)
    torch.manual_seed(7)
    levels, _, _, _ = run_ladder(model, torch.cat([below, start[None]]), 3, BASE)
    assert torch.equal(run.v, levels[-1])
    assert not torch.equal(run_chains(model, start, spec, BASE).v, run.v)  # the start below reaches the top
    with pytest.raises(ValueError, match="below must be"):
        run_chains(model, start, replace(spec, tempering=4), BASE, below)


def test_a_ladder_that_stops_short_of_the_base_rate_model_still_samples_the_model():
    """The two wells, every chain started in the 'off' one: a ladder of 6 levels from beta = 0.3
    (where block Gibbs crosses between the wells by itself) gives the top the wells' exact mass,
    as the full ladder from 0 does; from 0.8 the lowest level no longer crosses."""
    model = two_wells()
    exact = exact_at(model)
    on = float(exact[all_images().flatten(1).sum(1) >= 5].sum())
    n = 2000
    start = torch.zeros(n, 1, 3, 3, dtype=torch.float64)
    run = run_chains(model, start, ChainSpec(400, tempering=6, ladder_from=0.3, seed=3), BASE)
    assert abs(share_on(run.v) - on) < 0.05, (share_on(run.v), on)
    assert tv(run.v, exact) < 2.2 * sampling_floor(exact, n)  # as the full ladder's (0.8-1.4x on seeds 0-3)
    torch.manual_seed(3)
    below = torch.bernoulli(torch.sigmoid(BASE).expand(5 * n, -1)).view(5, n, 1, 3, 3)
    betas = torch.linspace(0.3, 1, 6, dtype=torch.float64)  # an even ladder from 0.3: the model has none of its own
    levels, _, _, _ = run_ladder(model, torch.cat([below, start[None]]), 400, BASE, betas=betas)
    assert torch.equal(run.v, levels[-1])
    assert run.betas == pytest.approx(betas.tolist())
    high = run_chains(model, start[:1000], ChainSpec(400, tempering=6, ladder_from=0.8), BASE)
    assert share_on(high.v) < on - 0.1  # 0.24-0.28 on seeds 0-3


def test_a_sampling_ladder_is_the_upper_part_of_the_model_s_own():
    """``sampling_ladder``: None for 0 (the model's own ladder as it is), else the upper part of
    the model's tuned ladder, evenly spaced when it has none."""
    assert sampling_ladder(None, 4, 0.0) is None
    torch.testing.assert_close(sampling_ladder(None, 4, 0.4), torch.tensor([0.4, 0.6, 0.8, 1.0], dtype=torch.float64))
    tuned = torch.tensor([0.0, 0.05, 0.2, 0.6, 0.9, 1.0], dtype=torch.float64)
    torch.testing.assert_close(sampling_ladder(tuned, 3, 0.6), torch.tensor([0.6, 0.9, 1.0], dtype=torch.float64))


def test_the_epoch_grid_draws_what_run_chains_draws():
    """``ChainSamples``: chains from the same noise every epoch (seeded by the spec's seed), run
    with the spec's seed plus the epoch; its grid is run_chains' states on the ladder it was told."""
    model = small_rbm()
    spec = ChainSpec(5, tempering=4, ladder_from=0.4, seed=2)
    hook = sampling.ChainSamples(spec, chains=20, base=BASE)
    got = hook(model, 1, False)["images"]["samples/gibbs"]
    start = model.noise(20, torch.Generator().manual_seed(2))
    run = run_chains(model, start, replace(spec, seed=3), BASE)
    assert torch.equal(got, sampling.judged_grid(run.v, 4))
    other = run_chains(model, start, replace(spec, seed=3, ladder_from=0.0), BASE)  # the even ladder from 0
    assert not torch.equal(got, sampling.judged_grid(other.v, 4))
    assert sampling.ChainSamples(spec, 20, every_epochs=2, base=BASE)(model, 1, False) == {}  # not due


def test_a_tempered_run_reports_the_swap_rates_and_snapshots():
    model = small_rbm()
    run = run_chains(model, _noise(40), ChainSpec(20, tempering=5), BASE, watch=Watch(snapshots=4))
    assert len(run.swap_rates) == 4 and all(0 <= r <= 1 for r in run.swap_rates)
    assert len(run.snapshots) == 4 and torch.equal(run.snapshots[-1], run.v)
    with pytest.raises(ValueError, match="base-rate"):
        run_chains(model, _noise(40), ChainSpec(20, tempering=5))


@pytest.mark.parametrize("tempering", [1, 5])
def test_chains_in_segments_draw_what_one_run_draws(tempering):
    """The chains run in segments (progress, snapshots, ``observe``): 37 steps in segments equal
    37 steps run by hand in one go, bit for bit, and what ``observe`` sees after 20 of them is the
    final state of a 20-step run with the same seed (the state carries over exactly)."""
    model = tempering_capsrbm() if tempering == 1 else small_rbm()
    start = _noise(30)
    seen: dict[int, torch.Tensor] = {}
    watch = Watch(snapshots=3, every=20, observe=lambda step, v: seen.setdefault(step, v.clone()))
    run = run_chains(model, start, ChainSpec(37, tempering=tempering, seed=5), BASE, watch=watch)
    torch.manual_seed(5)
    if tempering > 1:
        by_hand = run_ladder(model, _from_base(start, tempering), 37, BASE)[0][-1]
    else:
        by_hand = gibbs(model, start, 37)[0]
    assert torch.equal(run.v, by_hand)
    assert list(seen) == [20]  # not at the last step: the caller has the final state
    shorter = run_chains(model, start, ChainSpec(20, tempering=tempering, seed=5), BASE)
    assert torch.equal(seen[20], shorter.v)
    assert [len(run.snapshots), torch.equal(run.snapshots[-1], run.v)] == [3, True]
    with pytest.raises(ValueError, match="watch.every"):
        run_chains(model, start, ChainSpec(3), watch=Watch(every=-1))


def test_swap_rates_count_the_tries_of_each_pair():
    """Pair k proposes on every other sweep; the reported rate is its swaps over its own tries,
    the same whether the sweeps run in one segment or in many odd-length ones (7 sweeps: pairs 0
    and 2 try 4 times, pairs 1 and 3 three times)."""
    model = small_rbm()
    start = _noise(50)
    looked = []
    watch = Watch(every=3, observe=lambda step, _: looked.append(step))
    run = run_chains(model, start, ChainSpec(7, tempering=5, seed=2), BASE, watch=watch)
    torch.manual_seed(2)
    _, _, rates, _ = run_ladder(model, _from_base(start, 5), 7, BASE)  # one segment: swaps over tries, counted in there
    assert looked == [3, 6]  # segments of 3, 3 and 1 sweeps
    assert run.swap_rates == pytest.approx(rates.tolist(), abs=1e-6)  # float32 rates


@pytest.mark.parametrize("make", [small_rbm, tempering_capsrbm], ids=["rbm", "capsrbm"])
def test_a_shifted_ladder_tuned_as_it_runs_still_samples_the_model(make):
    """The base-rate model's logits raised by 1 for the levels below the top and the ladder
    re-spaced every 50 sweeps in the first 100 of 150, 20,000 chains from noise: the top within
    1.3x the floor of exact draws from the model (the shift and the tuning shape only the path),
    the tuned ladder increasing from the same ends and no longer even."""
    model = make()
    n = 20000
    torch.manual_seed(2)
    start = _noise(n)
    run = run_chains(model, start, ChainSpec(150, tempering=4, shift=1.0, tune=100, seed=2), BASE)
    exact = exact_at(model)
    assert tv(run.v, exact) < 1.3 * sampling_floor(exact, n), tv(run.v, exact)
    tuned = torch.tensor(run.betas)
    assert tuned[0] == 0 and tuned[-1] == 1 and (tuned.diff() > 0).all()
    assert (tuned - torch.tensor(ladder(4))).abs().max() > 0.01, run.betas
    assert len(run.swap_rates) == 3 and all(0 < r <= 1 for r in run.swap_rates)


def test_the_shift_raises_the_base_rate_of_the_levels_below_only():
    """``spec.shift``: the same run as one given the raised base-rate model itself."""
    model = small_rbm()
    start = _noise(40)
    shifted = run_chains(model, start, ChainSpec(9, tempering=4, shift=1.0, seed=4), BASE)
    raised = run_chains(model, start, ChainSpec(9, tempering=4, seed=4), BASE + 1.0)
    assert torch.equal(shifted.v, raised.v)
    assert not torch.equal(shifted.v, run_chains(model, start, ChainSpec(9, tempering=4, seed=4), BASE).v)


def test_tuning_the_ladder_changes_nothing_after_its_sweeps():
    """A run tuned in its first 50 sweeps and one given no tuning draw different ladders; the
    tuned run is reproducible from its seed; a negative tune is refused."""
    model = small_rbm()
    start = _noise(300)
    spec = ChainSpec(80, tempering=4, tune=50, seed=1)
    tuned = run_chains(model, start, spec, BASE)
    kept = run_chains(model, start, replace(spec, tune=0), BASE)
    assert kept.betas == pytest.approx(ladder(4)) and tuned.betas != pytest.approx(ladder(4))
    again = run_chains(model, start, spec, BASE)
    assert torch.equal(again.v, tuned.v) and again.betas == tuned.betas  # seeded: reproducible
    with pytest.raises(ValueError, match="spec.tune"):
        run_chains(model, start, replace(spec, tune=-1), BASE)


def test_a_shifted_tuned_ladder_crosses_between_wells():
    """The two wells, every top chain in 'off': with the base shifted by 1 and 100 tuning sweeps
    the top still reaches the wells' exact mass in 600 sweeps."""
    model = two_wells()
    on = float(exact_at(model)[all_images().flatten(1).sum(1) >= 5].sum())
    start = torch.zeros(4000, 1, 3, 3, dtype=torch.float64)
    torch.manual_seed(3)
    run = run_chains(model, start, ChainSpec(600, tempering=12, shift=1.0, tune=100, seed=3), BASE)
    assert abs(share_on(run.v) - on) < 0.05, (share_on(run.v), on)


def test_a_tuned_model_ladder_is_what_a_ladder_from_0_runs():
    """ladder_from 0 with a model trained on a ladder of as many levels: its own tuned betas."""
    model = RBM(image_size=3, hidden=3, tempering=4).double()
    model.betas.copy_(torch.tensor([0.0, 0.2, 0.7, 1.0], dtype=torch.float64))
    run = run_chains(model, _noise(10), ChainSpec(3, tempering=4), BASE)
    assert run.betas == [0.0, 0.2, 0.7, 1.0]


def test_the_sample_grid_says_how_long_it_will_take(monkeypatch):
    """A grid's expected time: one timed step of the model's chain on all its states (chains x
    levels) times the sweeps, once per epoch it is due in (every ``every_epochs``, and the last)."""
    from capsrun import sampling

    sizes = []
    monkeypatch.setattr(sampling, "step_seconds", lambda model, n: sizes.append(n) or 0.002)
    grid = sampling.ChainSamples(ChainSpec(500, tempering=4), chains=30, every_epochs=0)
    assert grid.seconds(None, range(1, 11)) == pytest.approx(500 * 0.002)  # the last epoch only
    assert sizes == [120]
    every = sampling.ChainSamples(ChainSpec(500, tempering=4), chains=30, every_epochs=3)
    assert every.seconds(None, range(5, 11)) == pytest.approx(3 * 500 * 0.002)  # epochs 6, 9 and 10
    assert every.seconds(None, range(11, 11)) == 0
