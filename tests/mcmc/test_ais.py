"""AIS estimates of log Z against exact values on models small enough to enumerate."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from capsrun.mcmc import ais
from capsrun.mcmc.base import base_rate
from capsrun.models.capsrbm import CapsuleRBM
from capsrun.models.rbm import RBM
from helpers import exact_free_energy_at


def _states(n: int) -> torch.Tensor:
    return torch.tensor(list(itertools.product([0.0, 1.0], repeat=n)))


def _tiny_rbm() -> RBM:
    torch.manual_seed(0)
    model = RBM(image_size=3, hidden=4, weight_std=1.0, persistent=False)  # 9 pixels: 512 states
    with torch.no_grad():
        model.visible_bias.copy_(torch.linspace(-1, 1, 9))
        model.hidden_bias.copy_(torch.tensor([0.5, -0.5, 1.0, 0.0]))
    return model


def _tiny_capsrbm(iterations: int = 2) -> CapsuleRBM:
    torch.manual_seed(0)
    model = CapsuleRBM(
        image_size=3,
        patch=1,
        hidden_caps=2,
        hidden_dim=2,
        routing_iterations=iterations,
        weight_std=0.7,
        persistent=False,
    )
    with torch.no_grad():
        model.visible_bias.copy_(torch.linspace(-1, 1, 9))
    return model


def _exact_log_z(model) -> float:
    v = _states(9).view(-1, *model.image_shape)
    return float(torch.logsumexp(-exact_free_energy_at(model, v).double(), 0))


def test_base_partition_is_exact_at_beta_zero():
    """At beta = 0 p*(v) = exp(base . v) times the number of hidden states: sum it by hand."""
    for model in (_tiny_rbm(), _tiny_capsrbm()):
        base = torch.linspace(-2, 1, 9)
        v = _states(9).view(-1, *model.image_shape)
        with torch.no_grad():
            exact = torch.logsumexp(-exact_free_energy_at(model, v, 0.0, base).double(), 0)
        assert float(model.log_base_partition(base)) == pytest.approx(float(exact), abs=1e-5)


def test_rbm_hidden_states_count():
    assert _tiny_rbm().log_hidden_states() == pytest.approx(4 * math.log(2))
    # each of 9 patches routed to one of 2 capsules; each capsule off, or on with 4 poses
    assert _tiny_capsrbm().log_hidden_states() == pytest.approx(9 * math.log(2) + 2 * math.log(1 + 4))


@pytest.mark.parametrize("make", [_tiny_rbm, _tiny_capsrbm], ids=["rbm", "capsrbm"])
def test_ais_log_z_agrees_with_the_exact_value(make):
    model = make()
    exact = _exact_log_z(model)
    base = torch.zeros(9)
    result = ais.log_partition(model, base, temperatures=1000, runs=200, seed=1)
    assert abs(result.log_z - exact) < 0.05, (result.log_z, exact)
    assert result.reliable and result.log_w_std < 0.5
    assert result.runs == 200 and result.temperatures == 1000


@pytest.mark.parametrize("make", [_tiny_rbm, _tiny_capsrbm], ids=["rbm", "capsrbm"])
def test_ais_is_unbiased_with_a_few_temperatures(make):
    """The mean importance weight is unbiased for Z / Z_0 whatever the number of temperatures,
    provided each transition leaves its own intermediate distribution invariant: with 10
    temperatures and 50,000 runs the estimate is within 0.05 nats of exact log Z (measured on
    the RBM: 0.0003-0.007 over three seeds), while a transition run at the previous temperature
    is off by 0.36 nats."""
    model = make()
    exact = _exact_log_z(model)
    for temperatures in (5, 10):
        result = ais.log_partition(model, torch.zeros(9), temperatures=temperatures, runs=50_000, seed=1)
        assert abs(result.log_z - exact) < 0.05, (temperatures, result.log_z, exact)


def test_a_too_short_schedule_shows_in_the_weight_spread():
    """Two temperatures (straight from the base to the model) is plain importance sampling: the
    estimate is off, and the spread of the log weights says so."""
    torch.manual_seed(0)
    model = RBM(image_size=4, hidden=8, weight_std=2.0, persistent=False)  # sharp: far from the base
    with torch.no_grad():
        exact = float(torch.logsumexp(-model.free_energy(_states(16).view(-1, 1, 4, 4)).double(), 0))
    bad = ais.log_partition(model, torch.zeros(16), temperatures=2, runs=100, seed=0)
    good = ais.log_partition(model, torch.zeros(16), temperatures=3000, runs=100, seed=0)
    assert bad.log_w_std > ais.UNRELIABLE_STD and not bad.reliable
    assert good.reliable and abs(good.log_z - exact) < 0.2
    assert abs(bad.log_z - exact) > abs(good.log_z - exact)


def test_schedule_is_increasing_from_zero_to_one_and_densest_near_one():
    betas = ais.schedule(14500)
    assert len(betas) == 14500 and betas[0] == 0 and betas[-1] == 1
    assert (betas.diff() > 0).all()
    assert betas.diff()[-1] < betas.diff()[0]
    for n in range(2, 40):  # every length ends at 1
        assert len(ais.schedule(n)) == n and ais.schedule(n)[-1] == 1 and ais.schedule(n)[0] == 0
    with pytest.raises(ValueError, match="at least 2"):
        ais.schedule(1)


def test_base_rate_is_the_smoothed_pixel_mean():
    v = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0]]).view(3, 1, 1, 2)
    expected = torch.logit(torch.tensor([3.5 / 4, 1.5 / 4]))
    torch.testing.assert_close(base_rate(v), expected)


def test_log_likelihood_is_minus_mean_free_energy_minus_log_z():
    result = ais.AISResult(log_z=100.0, log_z_base=90.0, log_w_std=0.3, runs=10, temperatures=50)
    m = ais.log_likelihood_metrics(result, mean_f=-20.0)
    assert m["test/log_likelihood"] == -80.0 and m["ais/log_w_std"] == 0.3 and m["ais/runs"] == 10


@pytest.mark.parametrize("make", [_tiny_rbm, _tiny_capsrbm], ids=["rbm", "capsrbm"])
def test_a_start_from_noise_is_a_base_rate_draw_after_one_step_at_beta_zero(make):
    """The first step at beta = 0 forgets the start: from all-ones, the pixels come out
    independent with the base rate's means sigmoid(base)."""
    model = make()
    base = torch.linspace(-2, 1, 9)
    start = torch.ones(4000, *model.image_shape)
    out = ais.anneal(model, base, temperatures=2, seed=3, start=start)
    flat = out.v.flatten(1)
    assert out.v.shape == start.shape and set(flat.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(flat.mean(0), torch.sigmoid(base), atol=0.03, rtol=0)
    corr = torch.corrcoef(flat.T)
    assert (corr - torch.eye(9)).abs().max() < 0.08


def _two_wells() -> RBM:
    """9 pixels, one hidden unit that switches all of them on: two wells, all-off (light) and
    all-on (dark), with masses set by the biases; the dark well is reached late in annealing."""
    model = RBM(image_size=3, hidden=1, weight_std=0.0, persistent=False)
    with torch.no_grad():
        model.weight.fill_(6.0)  # strong: at beta = 1 a chain stays in its well
        model.visible_bias.fill_(-3.0)
        model.hidden_bias.fill_(-28.0)  # the dark well holds 0.27 of p(v); annealing ends there 0.43 of the time
    return model


def test_importance_weights_give_the_wells_their_exact_masses():
    """The share of runs that end in the dark well is set by how the annealing crossed; weighted
    by their importance weights it is the well's exact mass under p(v) (enumerated)."""
    model = _two_wells()
    v = _states(9).view(-1, 1, 3, 3)
    with torch.no_grad():
        p = torch.softmax(-model.free_energy(v).double(), 0)
    dark = v.flatten(1).sum(1) > 4.5
    exact = float(p[dark].sum())
    out = ais.anneal(model, torch.zeros(9), temperatures=100, runs=4000, seed=0)
    ends_dark = out.v.flatten(1).sum(1) > 4.5
    weighted = float(out.weights[ends_dark].sum())
    plain = float(ends_dark.double().mean())
    assert 0.15 < exact < 0.85, exact  # two real wells
    assert abs(weighted - exact) < 0.04, (weighted, exact, plain)
    assert abs(plain - exact) > 0.1, (plain, exact)  # the annealing alone would have been wrong
    assert 100 < out.ess < 4000


def test_anneal_keeps_the_states_where_the_path_passes_a_ladder():
    model = _tiny_rbm()
    out = ais.anneal(model, torch.zeros(9), temperatures=200, runs=7, seed=0, keep=[0.0, 0.5, 0.95])
    assert out.kept.shape == (3, 7, 1, 3, 3) and out.v.shape == (7, 1, 3, 3)
    assert out.log_w.dtype == torch.float64 and 1 <= out.ess <= 7
    assert ais.anneal(model, torch.zeros(9), temperatures=20, runs=2).kept is None
    with pytest.raises(ValueError, match="keep must be increasing"):
        ais.anneal(model, torch.zeros(9), temperatures=20, runs=2, keep=[0.5, 0.2])
    with pytest.raises(ValueError, match="keep must be increasing"):
        ais.anneal(model, torch.zeros(9), temperatures=20, runs=2, keep=[1.0])
