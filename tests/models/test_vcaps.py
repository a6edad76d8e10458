"""Variational capsules: KL, KL margin loss, the masked decoder, sampling and the adversary."""

from __future__ import annotations

import math

import pytest
import torch
from hydra import compose, initialize_config_dir

from capsrun import build, registry, sampling
from capsrun.cli import conf_dir
from capsrun.losses import gaussian_kl, kl_margin_loss
from capsrun.models.vcaps import Discriminator, VariationalCapsNet, VCapsLoss


def _tiny(**kw) -> VariationalCapsNet:
    torch.manual_seed(0)
    args = dict(conv1_channels=8, primary_types=2, latent_dim=4, decoder_hidden=(16, 32), routing_iterations=2)
    return VariationalCapsNet(**{**args, **kw})


# --- KL -----------------------------------------------------------------------------------------


def test_kl_hand_computed():
    mu = torch.tensor([1.0, 0.0])
    logvar = torch.tensor([0.0, math.log(2.0)])
    # 0.5 * [(1 + 1 - 0 - 1) + (0 + 2 - log 2 - 1)] = 0.5 * (2 - log 2)
    assert gaussian_kl(mu, logvar).item() == pytest.approx(0.5 * (2 - math.log(2.0)))
    assert gaussian_kl(torch.zeros(3, 16), torch.zeros(3, 16)).abs().max().item() == 0.0


def test_kl_matches_monte_carlo():
    torch.manual_seed(0)
    mu, logvar = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    z = q.sample((200_000,))
    mc = (q.log_prob(z) - p.log_prob(z)).sum(-1).mean(0)  # E_q[log q - log p], [5]
    torch.testing.assert_close(gaussian_kl(mu, logvar), mc, rtol=0.02, atol=0.02)


def test_kl_margin_loss_hand_computed():
    kl = torch.tensor([[0.5, 3.0, 10.0], [6.0, 1.0, 0.0]])
    loss = kl_margin_loss(kl, torch.tensor([1, 0]), m_present=1.0, m_absent=5.0, down_weight=0.5)
    # row 0: class 1 present: (3-1)^2 = 4; absent 0: 0.5*(5-0.5)^2 = 10.125; absent 2: 0
    # row 1: class 0 present: (6-1)^2 = 25; absent 1: 0.5*16 = 8; absent 2: 0.5*25 = 12.5
    assert loss.item() == pytest.approx((4 + 10.125 + 25 + 8 + 12.5) / 2)
    multi = kl_margin_loss(kl, torch.tensor([[1, 1, 0], [1, 0, 0]]), 1.0, 5.0, 0.5)
    assert multi.item() == pytest.approx((0 + 4 + 0 + 25 + 8 + 12.5) / 2)  # two present in row 0


# --- model --------------------------------------------------------------------------------------


def test_shapes_scores_and_prediction():
    model = _tiny().eval()
    out = model(torch.rand(3, 1, 28, 28))
    assert out.mu.shape == out.logvar.shape == (3, 10, 4)
    assert out.kl.shape == (3, 10) and (out.kl >= 0).all()
    torch.testing.assert_close(out.kl, gaussian_kl(out.mu, out.logvar))
    torch.testing.assert_close(out.scores, -out.kl)
    assert out.reconstruction.shape == (3, 1, 28, 28)
    assert out.prior_sample is None  # only in training, for the discriminator
    assert out.coupling.shape == (3, model.num_primary_caps, 10)
    # the test-time reconstruction decodes the posterior mean of the smallest-KL class
    torch.testing.assert_close(out.reconstruction, model.reconstruct(out.mu, out.kl.argmin(-1)))


def test_training_forward_samples_and_draws_prior_images():
    model = _tiny().train()
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    a, b = model(x, y), model(x, y)
    assert not torch.equal(a.reconstruction, b.reconstruction)  # z = mu + sigma * eps
    assert a.prior_sample.shape == (4, 1, 28, 28)


def test_decoder_sees_only_the_chosen_capsule():
    model = _tiny().eval()
    z = torch.randn(2, 10, 4, requires_grad=True)
    labels = torch.tensor([3, 7])
    out = model.reconstruct(z, labels)
    out.sum().backward()
    grad = z.grad.abs().sum(-1)  # [2, 10]
    chosen = torch.zeros(2, 10, dtype=torch.bool)
    chosen[0, 3] = chosen[1, 7] = True
    assert (grad[~chosen] == 0).all() and (grad[chosen] > 0).all()
    z2 = z.detach().clone()
    z2[~chosen] = torch.randn(int((~chosen).sum()), 4) * 10  # other capsules: any value
    torch.testing.assert_close(model.reconstruct(z2, labels), out.detach())


def test_generate_shapes_range_and_seed():
    model = _tiny()
    images, classes = sampling.class_conditional(model, 10, 3, torch.Generator().manual_seed(1))
    assert images.shape == (30, 1, 28, 28) and classes.tolist() == [k for k in range(10) for _ in range(3)]
    assert images.min() >= 0 and images.max() <= 1
    again, _ = sampling.class_conditional(model, 10, 3, torch.Generator().manual_seed(1))
    torch.testing.assert_close(images, again)


def test_posterior_variations_first_column_is_the_mean():
    model = _tiny()
    x = torch.rand(2, 1, 28, 28)
    var = sampling.posterior_variations(model, x, num=5)
    assert var.shape == (2, 5, 1, 28, 28)
    torch.testing.assert_close(var[:, 0], model.eval()(x).reconstruction)
    assert not torch.equal(var[:, 1], var[:, 2])


# --- loss and adversary -------------------------------------------------------------------------


def test_loss_terms_and_kl_statistics():
    model = _tiny().train()
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    out = model(x, y)
    losses = VCapsLoss(m_present=1.0, m_absent=5.0, reconstruction_weight=0.01)(out, x, y)
    assert set(losses) == {"kl_margin", "reconstruction", "total", "kl/present", "kl/absent"}
    expected = (
        kl_margin_loss(out.kl, y, 1.0, 5.0, 0.5) + 0.01 * ((out.reconstruction - x) ** 2).flatten(1).sum(1).mean()
    )
    torch.testing.assert_close(losses["total"], expected)
    present = out.kl[torch.arange(4), y]
    torch.testing.assert_close(losses["kl/present"], present.mean())


def test_adversarial_weight_zero_has_no_discriminator():
    assert list(VCapsLoss(adversarial_weight=0.0).parameters()) == []
    assert len(list(VCapsLoss(adversarial_weight=0.1).parameters())) > 0
    with pytest.raises(ValueError):
        VCapsLoss(adversarial_weight=-1.0)


def test_each_adversarial_term_reaches_only_its_own_parameters():
    model = _tiny().train()
    loss = VCapsLoss(adversarial_weight=0.5)
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    losses = loss(model(x, y), x, y)
    d_params, m_params = list(loss.parameters()), list(model.parameters())
    g = torch.autograd.grad(losses["adversarial"], d_params + m_params, allow_unused=True)
    assert all(t is None for t in g[: len(d_params)]), "the generator's term must not train the discriminator"
    assert any(t is not None and t.abs().sum() > 0 for t in g[len(d_params) :])
    g = torch.autograd.grad(losses["discriminator"], d_params + m_params, allow_unused=True)
    assert all(t is not None for t in g[: len(d_params)])
    assert all(t is None for t in g[len(d_params) :]), "the discriminator's term must not train the model"


def test_discriminator_shape_any_size():
    assert Discriminator(3)(torch.rand(5, 3, 24, 24)).shape == (5,)
    assert Discriminator(1)(torch.rand(2, 1, 36, 36)).shape == (2,)


def _cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(config_name="train", overrides=["model=vcaps", *overrides])


@pytest.mark.parametrize(("weight", "count"), [(0.0, 1), (0.01, 2)])
def test_adversarial_switch_changes_the_optimizer_set(weight, count):
    cfg = _cfg(f"model.adversarial_weight={weight}", "model.net.conv1_channels=8", "model.net.primary_types=2")
    net, loss = registry.model(cfg), registry.objective(cfg)
    opts = build.optimizers(cfg, net, loss)
    assert len(opts) == count
    assert {id(p) for g in opts[0].param_groups for p in g["params"]} == {id(p) for p in net.parameters()}
    if count == 2:
        assert opts[1].param_groups[0]["lr"] == cfg.model.adversary_optimizer.lr
        assert {id(p) for g in opts[1].param_groups for p in g["params"]} == {id(p) for p in loss.parameters()}


# --- sample quality -----------------------------------------------------------------------------


def test_frechet_distance_hand_computed():
    torch.manual_seed(0)
    a = torch.randn(4000, 1, dtype=torch.float64)
    b = 3.0 + 2.0 * torch.randn(4000, 1, dtype=torch.float64)
    # 1-D: (m_a - m_b)^2 + s_a^2 + s_b^2 - 2 s_a s_b, with the sample moments
    ma, mb, sa, sb = a.mean(), b.mean(), a.std(), b.std()
    expected = ((ma - mb) ** 2 + sa**2 + sb**2 - 2 * sa * sb).item()
    assert sampling.frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(9 + 1, rel=0.1)


def test_frechet_distance_of_a_set_with_itself_and_a_shift():
    torch.manual_seed(0)
    a = torch.randn(500, 8)
    assert sampling.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shift = torch.tensor([1.0, 2.0] + [0.0] * 6)
    assert sampling.frechet_distance(a, a + shift) == pytest.approx(5.0, rel=1e-4)


def test_capsule_perturbations_move_one_dimension_per_row():
    model = _tiny().eval()
    x = torch.rand(2, 1, 28, 28)
    deltas = torch.tensor([-0.25, 0.0, 0.25])
    grids = sampling.capsule_perturbations(model, x, deltas)
    assert grids.shape == (2, 4, 3, 1, 28, 28)
    # the middle column is the unperturbed capsule in every row
    base = model(x).reconstruction
    for d in range(4):
        torch.testing.assert_close(grids[:, d, 1], base)
    assert not torch.allclose(grids[:, 0, 0], grids[:, 0, 2])
