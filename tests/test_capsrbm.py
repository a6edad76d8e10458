"""The capsule RBM's energy, conditionals, sampler and gradient estimator against exact values
on models small enough to enumerate."""

from __future__ import annotations

import itertools

import pytest
import torch

from capsrun.models.capsrbm import CapsuleRBM


def _tiny(seed: int = 0, hidden_caps: int = 2) -> CapsuleRBM:
    """4 binary pixels (a 2x2 image, 1-pixel patches): 16 visible states to enumerate."""
    torch.manual_seed(seed)
    model = CapsuleRBM(
        in_channels=1,
        image_size=2,
        patch=1,
        hidden_caps=hidden_caps,
        hidden_dim=2,
        routing_iterations=2,
        weight_std=1.0,
    )
    with torch.no_grad():
        model.visible_bias.copy_(torch.tensor([0.5, -1.0, 0.3, -0.2]))
    return model.double()


def _all_states(n: int = 4) -> torch.Tensor:
    return torch.tensor(list(itertools.product([0.0, 1.0], repeat=n)), dtype=torch.float64).view(-1, 1, 2, 2)


def test_hidden_conditional_is_the_length_of_the_routed_squashed_capsule():
    torch.manual_seed(1)
    model = CapsuleRBM(in_channels=1, image_size=8, patch=4, hidden_caps=5, hidden_dim=3)
    v = torch.bernoulli(torch.full((6, 1, 8, 8), 0.4))
    routed = model.hidden(model.visible_caps(v))
    lengths = routed.v.pow(2).sum(-1).sqrt()
    torch.testing.assert_close(model.hidden_prob(v), lengths, atol=1e-4, rtol=1e-4)
    assert model.hidden_prob(v).shape == (6, 5)


def test_visible_capsules_are_the_patches():
    model = CapsuleRBM(in_channels=1, image_size=4, patch=2, hidden_caps=2, hidden_dim=2)
    v = torch.arange(16.0).view(1, 1, 4, 4)
    caps = model.visible_caps(v)
    assert caps.shape == (1, 4, 4)
    assert caps[0, 0].tolist() == [0.0, 1.0, 4.0, 5.0] and caps[0, 3].tolist() == [10.0, 11.0, 14.0, 15.0]


def test_free_energy_equals_a_brute_force_sum_over_hidden_states():
    model = _tiny(hidden_caps=3)
    v = _all_states()
    zs = torch.tensor(list(itertools.product([0.0, 1.0], repeat=3)), dtype=torch.float64)
    energies = torch.stack([model.energy(v, z.expand(len(v), -1)) for z in zs], 1)  # [16, 8]
    torch.testing.assert_close(model.free_energy(v), -torch.logsumexp(-energies, 1))


def test_hidden_conditional_matches_the_energy():
    model = _tiny(hidden_caps=3)
    v = _all_states()
    zs = torch.tensor(list(itertools.product([0.0, 1.0], repeat=3)), dtype=torch.float64)
    weights = torch.softmax(-torch.stack([model.energy(v, z.expand(len(v), -1)) for z in zs], 1), 1)
    marginal = weights @ zs  # p(z_j = 1 | v) from the joint
    torch.testing.assert_close(model.hidden_prob(v), marginal)


def _exact_distribution(model: CapsuleRBM) -> torch.Tensor:
    with torch.no_grad():
        return torch.softmax(-model.free_energy(_all_states()), 0)


def _chain_samples(model: CapsuleRBM, chains: int, steps: int, mh: bool = True) -> torch.Tensor:
    torch.manual_seed(5)
    v = torch.bernoulli(torch.full((chains, 1, 2, 2), 0.5, dtype=torch.float64))
    v, acceptance = model.gibbs(v, steps, mh=mh)
    assert 0 < acceptance <= 1
    return v


def _histogram(v: torch.Tensor) -> torch.Tensor:
    index = (v.flatten(1) * torch.tensor([8.0, 4.0, 2.0, 1.0], dtype=v.dtype)).sum(1).long()
    return torch.bincount(index, minlength=16).double() / len(v)


def test_gibbs_chains_sample_the_model_distribution():
    model = _tiny()
    exact = _exact_distribution(model)
    empirical = _histogram(_chain_samples(model, 20000, 40))
    assert 0.5 * (empirical - exact).abs().sum() < 0.02  # total variation
    samples = _chain_samples(model, 50, 3)
    assert samples.shape == (50, 1, 2, 2) and set(samples.unique().tolist()) <= {0.0, 1.0}


def test_gradient_estimator_matches_the_exact_log_likelihood_gradient():
    model = _tiny()
    data = _all_states()[[0, 3, 3, 5, 9, 12, 15, 15]]
    params = list(model.parameters())
    # exact: d/dtheta [mean(-F(data)) - log Z], Z summed over all 16 visible states
    loglik = -model.free_energy(data).mean() - torch.logsumexp(-model.free_energy(_all_states()), 0)
    exact = torch.cat([g.flatten() for g in torch.autograd.grad(loglik, params)])
    # estimator: minus the gradient of the surrogate loss with model samples from the chains
    v_model = _chain_samples(model, 20000, 40)
    surrogate = model.surrogate_loss(data, v_model)
    estimate = -torch.cat([g.flatten() for g in torch.autograd.grad(surrogate, params)])
    relative = (estimate - exact).norm() / exact.norm()
    assert relative < 0.05, relative.item()


def test_reconstruction_and_forward_shapes():
    model = CapsuleRBM(in_channels=1, image_size=8, patch=2, hidden_caps=4, hidden_dim=2)
    x = torch.rand(3, 1, 8, 8)
    out = model(x)
    assert out.hidden_prob.shape == (3, 4) and out.free_energy.shape == (3,)
    assert out.reconstruction.shape == (3, 1, 8, 8)
    assert 0 < out.reconstruction.min() and out.reconstruction.max() < 1
    with pytest.raises(ValueError, match="multiple of patch"):
        CapsuleRBM(image_size=10, patch=4)


def test_training_forward_runs_the_chains_and_the_loss_is_the_surrogate():
    from capsrun.models.capsrbm import RBMLoss

    torch.manual_seed(0)
    model = CapsuleRBM(in_channels=1, image_size=8, patch=4, hidden_caps=4, hidden_dim=2, persistent=True, chains=6)
    x = torch.rand(4, 1, 8, 8)
    out = model.train()(x)
    losses = RBMLoss()(out, x)
    torch.testing.assert_close(losses["total"], out.free_energy.mean() - out.model_free_energy.mean())
    assert set(losses) == {
        "total",
        "reconstruction",
        "free_energy/data",
        "free_energy/model",
        "hidden/on",
        "chain/acceptance",
    }
    assert bool(model.chains_started) and set(model.chains.unique().tolist()) <= {0.0, 1.0}
    before = model.chains.clone()
    model(x)
    assert not torch.equal(before[:4], model.chains[:4]) and torch.equal(before[4:], model.chains[4:])
    evaluation = RBMLoss()(model.eval()(x), x)
    assert "total" not in evaluation and out.scores is None
    with pytest.raises(ValueError, match="persistent chains"):
        model.train()(torch.rand(7, 1, 8, 8))
