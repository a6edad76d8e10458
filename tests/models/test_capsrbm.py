"""The RBM and the capsule RBM: energies, conditionals, chains and gradient estimators against exact
values on models small enough to enumerate (9 pixels: 512 visible states)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from capsrun.mcmc.chains import gibbs
from capsrun.models.capsrbm import CapsuleRBM, route
from capsrun.models.energy import RBMLoss
from capsrun.models.rbm import RBM
from helpers import all_images, exact_distribution, histogram, sampling_floor, small_capsrbm, small_rbm

# --- the capsule RBM's hidden configurations, enumerated -------------------------------------------


def _hidden_configs(caps: int, dim: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(z [caps], z*h [caps, dim]) for every on/off pattern and every pose of the capsules that are on."""
    per_capsule = [(0.0, (0.0,) * dim)] + [(1.0, h) for h in itertools.product([0.0, 1.0], repeat=dim)]
    out = []
    for combo in itertools.product(per_capsule, repeat=caps):
        z = torch.tensor([c[0] for c in combo], dtype=torch.float64)
        pose = torch.tensor([c[1] for c in combo], dtype=torch.float64)
        out.append((z, pose))
    return out


def _log_joint(model: CapsuleRBM, v: torch.Tensor, z: torch.Tensor, pose: torch.Tensor) -> torch.Tensor:
    """-E(v, z, h) = a.v + sum_j z_j (b_j + h_j . s_j(v)), written out from the module docstring."""
    s = model.encode(v).s
    return v.flatten(1) @ model.visible_bias + (z * model.switch_bias).sum(-1) + (pose * s).sum((-1, -2))


def test_capsrbm_free_energy_is_the_hidden_configurations_summed_out():
    model = small_capsrbm()
    v = all_images()
    with torch.no_grad():
        joint = torch.stack([_log_joint(model, v, z, p) for z, p in _hidden_configs(2, 2)], 1)  # [512, 25]
        torch.testing.assert_close(model.free_energy(v), -torch.logsumexp(joint, 1))
        assert joint.shape[1] == 25 and math.exp(model.log_hidden_states()) == pytest.approx(25)


def test_capsrbm_capsule_fires_with_the_probability_of_its_routed_input():
    model = small_capsrbm()
    v = all_images()
    with torch.no_grad():
        configs = _hidden_configs(2, 2)
        joint = torch.stack([_log_joint(model, v, z, p) for z, p in configs], 1)
        weights = torch.softmax(joint, 1)
        on = weights @ torch.stack([z for z, _ in configs])  # p(z_j = 1 | v) from the joint
        torch.testing.assert_close(model.hidden_prob(v), on)
        s = model.encode(v).s
        expected = torch.sigmoid(model.switch_bias + torch.nn.functional.softplus(s).sum(-1))
        torch.testing.assert_close(model.hidden_prob(v), expected)


def test_routing_with_one_iteration_is_the_plain_sum_of_votes():
    torch.manual_seed(0)
    u = torch.randn(3, 4, 5, 2)
    out = route(u, 1, torch.zeros(5), torch.zeros(5, 2))
    torch.testing.assert_close(out.s, u.sum(1))
    torch.testing.assert_close(out.coupling, torch.full((3, 4, 5), 0.2))


def test_routing_couplings_sum_to_one_and_the_bound_limits_them():
    torch.manual_seed(0)
    u = torch.randn(3, 4, 5, 2) * 10
    for bound in (0.1, 0.5, None):
        c = route(u, 3, torch.zeros(5), torch.zeros(5, 2), bound).coupling
        torch.testing.assert_close(c.sum(-1), torch.ones(3, 4))
        if bound is not None:  # logits within +-bound per update, two updates: c_ij / c_ik <= e^(4 bound)
            assert (c.max(-1).values / c.min(-1).values).max() <= math.exp(4 * bound) + 1e-5
    unbounded = route(u, 3, torch.zeros(5), torch.zeros(5, 2), None).coupling
    assert unbounded.max() > 0.9  # agreement concentrates a child on one parent


def test_capsrbm_votes_and_top_down_are_transposes():
    """v . top_down(c, pose) == sum_j pose_j . (N sum_i c_ij u_ij): the energy is linear in v for
    frozen couplings, which makes the block proposal exact when routing does not move."""
    torch.manual_seed(1)
    model = CapsuleRBM(image_size=8, patch=4, hidden_caps=3, hidden_dim=2, routing_iterations=2).double()
    v = torch.bernoulli(torch.full((5, 1, 8, 8), 0.4, dtype=torch.float64))
    enc = model.encode(v)
    pose = torch.bernoulli(torch.full((5, 3, 2), 0.5, dtype=torch.float64))
    left = (v.flatten(1) * model._top_down(enc.coupling, pose)).sum(1)
    right = (pose * (enc.s - model.pose_bias)).sum((1, 2))
    torch.testing.assert_close(left, right)


@pytest.mark.parametrize(
    "make", [small_rbm, lambda: small_capsrbm(iterations=3, bound=None, std=1.5)], ids=["rbm", "capsrbm"]
)
def test_chains_sample_the_model_distribution(make):
    model = make()
    torch.manual_seed(2)
    start = torch.bernoulli(torch.full((20000, 1, 3, 3), 0.5, dtype=torch.float64))
    # measured from this start (capsrbm): 2.7x the floor after 50 sweeps, 0.93x after 100 and 200
    v, acceptance = gibbs(model, start, 150)
    exact = exact_distribution(model)
    tv = 0.5 * (histogram(v) - exact).abs().sum()
    assert tv < 1.3 * sampling_floor(exact, len(v)), tv
    assert 0 < acceptance <= 1


def test_capsrbm_without_the_mh_test_is_biased_where_routing_moves():
    """Large weights, unbounded routing: the frozen-coupling proposal alone samples the wrong
    distribution, and the MH test is what corrects it."""
    model = small_capsrbm(iterations=3, bound=None, std=2.0, seed=3)
    exact = exact_distribution(model)
    tvs = {}
    for mh in (True, False):
        torch.manual_seed(4)
        start = torch.bernoulli(torch.full((20000, 1, 3, 3), 0.5, dtype=torch.float64))
        # measured: with the test 1.47x the floor after 25 sweeps, 0.79-0.99x after 50-200; without
        # it 13.8x from 10 sweeps on. 100 sweeps are twice what either needs.
        model.mh = mh
        v, acceptance = gibbs(model, start, 100)
        tvs[mh] = float(0.5 * (histogram(v) - exact).abs().sum())
        if mh:
            assert acceptance < 0.99  # some moves are refused
    floor = sampling_floor(exact, 20000)
    assert tvs[True] < 1.5 * floor and tvs[False] > 5 * floor, (tvs, floor)


@pytest.mark.parametrize("make", [small_rbm, small_capsrbm], ids=["rbm", "capsrbm"])
def test_gradient_estimator_matches_the_exact_log_likelihood_gradient(make):
    """The surrogate mean F(data) - mean F(model samples) with exact model samples has the expected
    gradient -d log p(data) / d theta; here with the model expectation taken exactly."""
    model = make()
    data = all_images()[[3, 100, 300, 511]]
    states, p = all_images(), exact_distribution(model)
    loss = model.free_energy(data).mean() - (p.detach() * model.free_energy(states)).sum()
    estimated = torch.autograd.grad(loss, list(model.parameters()))
    log_z = torch.logsumexp(-model.free_energy(states), 0)
    nll = (model.free_energy(data) + log_z).mean()
    exact = torch.autograd.grad(nll, list(model.parameters()))
    for e, x in zip(estimated, exact):
        torch.testing.assert_close(e, x)


def test_training_forward_runs_the_chains_and_the_loss_is_the_surrogate():
    torch.manual_seed(0)
    model = CapsuleRBM(image_size=8, patch=4, hidden_caps=3, hidden_dim=2, chains=6, cd_steps=2)
    x = torch.rand(6, 1, 8, 8)
    out = model.train()(x)
    losses = RBMLoss()(out, x)
    torch.testing.assert_close(losses["total"], out.free_energy.mean() - out.model_free_energy.mean())
    assert out.reconstruction is None and 0 < float(out.acceptance) <= 1
    assert bool(model.chains_started) and set(model.chains.unique().tolist()) <= {0.0, 1.0}
    out = model.eval()(x)
    losses = RBMLoss()(out, x)
    assert "total" not in losses and out.reconstruction.shape == x.shape
    assert losses["log_likelihood/pseudo"] < 0 and 0 < losses["hidden/on"] < 1


def test_visible_biases_from_the_first_batch_give_each_pixel_the_data_mean():
    model = RBM(image_size=2, hidden=2, chains=4)
    x = torch.tensor([[1.0, 0, 1, 1], [1, 0, 0, 1], [1, 0, 1, 0], [1, 0, 0, 0]]).view(4, 1, 2, 2)
    model.train()(x)
    expected = torch.logit(torch.tensor([4.5, 0.5, 2.5, 2.5]) / 5)
    torch.testing.assert_close(model.visible_bias.detach(), expected)
    model.train()(torch.zeros_like(x))  # only once
    torch.testing.assert_close(model.visible_bias.detach(), expected, atol=0.1, rtol=0)


def test_pseudo_likelihood_is_exact_for_one_pixel():
    """For a 1-pixel model, V log sigmoid(F(flip) - F(v)) is log p(v) exactly."""
    model = RBM(image_size=1, hidden=2, weight_std=1.0, persistent=False).double()
    v = torch.tensor([[[[1.0]]], [[[0.0]]]], dtype=torch.float64)
    with torch.no_grad():
        exact = -model.free_energy(v) - torch.logsumexp(-model.free_energy(v), 0)
        torch.testing.assert_close(model.pseudo_likelihood(v, model.encode(v)), exact)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="multiple of patch"):
        CapsuleRBM(image_size=28, patch=5)
    with pytest.raises(ValueError, match="agreement_bound"):
        CapsuleRBM(agreement_bound=0)
    with pytest.raises(ValueError, match="cd_steps"):
        RBM(cd_steps=0)
    with pytest.raises(ValueError, match="chain_init"):
        RBM(chain_init="prior")
    with pytest.raises(ValueError, match="chains must be >= 1"):
        RBM(chains=0)


def test_one_routing_iteration_takes_the_one_matmul_path_with_the_same_values():
    """Uniform couplings: encode and top-down skip the patches (one matmul each) and give what the
    routed, patch-wise computation gives."""
    torch.manual_seed(0)
    model = CapsuleRBM(image_size=8, patch=4, hidden_caps=3, hidden_dim=2, routing_iterations=1, weight_std=0.5)
    model = model.double()
    v = torch.bernoulli(torch.full((5, 1, 8, 8), 0.4, dtype=torch.float64))
    fast = model.encode(v)
    slow = route(model.votes(v), 1, model.switch_bias, model.pose_bias)
    torch.testing.assert_close(fast.s, slow.s)
    torch.testing.assert_close(fast.coupling, slow.coupling)
    pose = torch.bernoulli(torch.full((5, 3, 2), 0.5, dtype=torch.float64))
    model.iterations = 2  # the patch-wise top-down, with the same uniform couplings
    patchwise = model._top_down(slow.coupling, pose)
    model.iterations = 1
    torch.testing.assert_close(model._top_down(fast.coupling, pose), patchwise)
