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


# --- continuous visible units (v in [0, 1], MALA on the free energy) ----------------------------


def _tiny_continuous(step_size: float = 2.0) -> CapsuleRBM:
    """4 pixels in [0, 1]: p(v) integrates on a grid over the unit box."""
    model = _tiny()
    model.visible, model.step_size = "continuous", step_size
    with torch.no_grad():
        model.hidden.weight.mul_(3)  # a density with some shape, not only the biases'
    return model


def _box_grid(points: int = 32) -> torch.Tensor:
    """Midpoints of a ``points``^4 grid over [0, 1]^4, ``[points^4, 1, 2, 2]``."""
    g = (torch.arange(points, dtype=torch.float64) + 0.5) / points
    return torch.cartesian_prod(g, g, g, g).view(-1, 1, 2, 2)


def _moments(v: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """E[v_k] and E[v_0 v_k] under ``weights`` (a distribution over rows) or the empirical one."""
    flat = v.flatten(1)
    feats = torch.cat([flat, flat[:, :1] * flat], 1)
    return feats.mean(0) if weights is None else weights @ feats


def test_langevin_chains_sample_the_continuous_model_distribution():
    model = _tiny_continuous()
    grid = _box_grid()
    with torch.no_grad():
        exact = _moments(grid, torch.softmax(-model.free_energy(grid), 0))
    torch.manual_seed(1)
    v, acceptance = model.gibbs(torch.rand(8000, 1, 2, 2, dtype=torch.float64), 150)
    assert 0.2 < acceptance < 0.9  # a step large enough that the MH test rejects
    assert 0 < v.min() and v.max() < 1
    assert (_moments(v) - exact).abs().max() < 0.012  # ~3 standard errors
    # the unadjusted algorithm (mh=False) is biased at this step size: the MH test is what fixes it
    torch.manual_seed(1)
    biased, _ = model.gibbs(torch.rand(8000, 1, 2, 2, dtype=torch.float64), 150, mh=False)
    assert (_moments(biased) - exact).abs().max() > 0.03  # measured: 0.06


def test_gradient_estimator_matches_the_exact_gradient_for_continuous_units():
    model = _tiny_continuous()
    data = torch.tensor([[0.9, 0.1, 0.8, 0.2], [0.7, 0.6, 0.1, 0.0], [1.0, 0.3, 0.5, 0.5]], dtype=torch.float64)
    data = data.view(-1, 1, 2, 2)
    params = list(model.parameters())
    grid = _box_grid(24)  # log Z by the midpoint rule: its constant cell volume drops out of the gradient
    loglik = -model.free_energy(data).mean() - torch.logsumexp(-model.free_energy(grid), 0)
    exact = torch.cat([g.flatten() for g in torch.autograd.grad(loglik, params)])
    torch.manual_seed(2)
    v_model, _ = model.gibbs(torch.rand(8000, 1, 2, 2, dtype=torch.float64), 150)
    estimate = -torch.cat([g.flatten() for g in torch.autograd.grad(model.surrogate_loss(data, v_model), params)])
    relative = (estimate - exact).norm() / exact.norm()
    assert relative < 0.05, relative.item()


def test_continuous_units_keep_grey_levels_and_reconstruct_inside_the_box():
    torch.manual_seed(0)
    model = CapsuleRBM(in_channels=1, image_size=8, patch=4, hidden_caps=4, hidden_dim=2, visible="continuous")
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(model.visible_states(x), x) and set(model.binarize(x).unique().tolist()) <= {0.0, 1.0}
    rec = model.reconstruct(x)
    assert rec.shape == x.shape and 0 <= rec.min() and rec.max() <= 1
    # the truncated-exponential mean: g = 0 gives 1/2, large |g| the edge it favours
    g = torch.tensor([-50.0, -1.0, 0.0, 1e-5, 1.0, 50.0])
    model._proposal_logits = lambda v, z, t: (None, g)
    mean = model.reconstruct(torch.zeros(1, 1, 8, 8))
    expected = [1 / 50, 1 / (1 - torch.e) + 1, 0.5, 0.5, 1 / (1 - 1 / torch.e) - 1, 1 - 1 / 50]
    torch.testing.assert_close(mean, torch.tensor(expected), atol=1e-5, rtol=1e-4)
    noise = model.noise(5, torch.Generator().manual_seed(0))
    assert noise.shape == (5, 1, 8, 8) and len(noise.unique()) > 2
    with pytest.raises(ValueError, match="visible must be"):
        CapsuleRBM(image_size=8, patch=4, visible="gaussian")


@pytest.mark.parametrize("visible", ["binary", "continuous"])
def test_visible_biases_from_the_first_batch_give_each_pixel_the_data_mean(visible):
    from capsrun.models.capsrbm import _box_mean

    torch.manual_seed(0)
    model = CapsuleRBM(image_size=8, patch=4, hidden_caps=2, hidden_dim=2, visible=visible, persistent=True, chains=8)
    x = torch.rand(7, 1, 8, 8) * torch.linspace(0, 1, 64).view(1, 1, 8, 8)  # pixel 0 is off in every image
    v = model.visible_states(x)
    p = (v.flatten(1).sum(0) + 0.5) / 8  # smoothed: a pixel off in the whole batch keeps a finite bias
    model.train()(x)
    a = model.visible_bias.detach().double()
    marginal = torch.sigmoid(a) if visible == "binary" else _box_mean(a)
    torch.testing.assert_close(marginal, p.double(), atol=1e-6, rtol=1e-5)
    assert a[0] < -2.5 and torch.isfinite(a).all()  # p_0 = 1/16: logit -2.7, box -16
    model.train()(torch.ones(7, 1, 8, 8))  # only the first batch sets them
    torch.testing.assert_close(model.visible_bias.detach().double(), a)
    fresh = CapsuleRBM(image_size=8, patch=4, hidden_caps=2, hidden_dim=2, data_init=False)
    fresh.train()(x)
    assert torch.equal(fresh.visible_bias.detach(), torch.zeros(64))


def test_checkpoints_from_before_data_init_load_with_their_biases_kept():
    model = CapsuleRBM(image_size=8, patch=4, hidden_caps=2, hidden_dim=2)
    state = {k: v for k, v in model.state_dict().items() if k != "bias_from_data"}
    state["visible_bias"] = torch.full((64,), -3.0)
    fresh = CapsuleRBM(image_size=8, patch=4, hidden_caps=2, hidden_dim=2)
    fresh.load_state_dict(state)
    fresh.train()(torch.rand(4, 1, 8, 8))  # a resumed run must not overwrite trained biases
    assert bool(fresh.bias_from_data) and torch.equal(fresh.visible_bias.detach(), torch.full((64,), -3.0))
