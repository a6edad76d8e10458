"""The RBM and the capsule RBM: energies, conditionals, chains, inference, likelihood and gradient
estimators against exact values on models small enough to enumerate (9 pixels: 512 visible
states; the capsule RBM's 9 one-pixel patches and 2 capsules: 512 routes, 25 hidden states)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from capsrun.mcmc.chains import gibbs
from capsrun.models.capsrbm import CapsuleRBM, mean_field_couplings
from capsrun.models.energy import RBMLoss
from capsrun.models.rbm import RBM
from helpers import (
    all_images,
    all_routes,
    exact_distribution,
    exact_free_energy_at,
    histogram,
    sampling_floor,
    small_capsrbm,
    small_grouped_capsrbm,
    small_rbm,
)

# --- the capsule RBM's states, enumerated -----------------------------------------------------------


def _hidden_configs(caps: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """z [K, caps] and z*h [K, caps, dim] for every on/off pattern and every pose of the capsules
    that are on (K = (1 + 2^dim)^caps)."""
    per_capsule = [(0.0, (0.0,) * dim)] + [(1.0, h) for h in itertools.product([0.0, 1.0], repeat=dim)]
    combos = list(itertools.product(per_capsule, repeat=caps))
    z = torch.tensor([[c[0] for c in combo] for combo in combos], dtype=torch.float64)
    pose = torch.tensor([[c[1] for c in combo] for combo in combos], dtype=torch.float64)
    return z, pose


def _log_joint(model: CapsuleRBM, v: torch.Tensor, routes: torch.Tensor, z: torch.Tensor, pose: torch.Tensor):
    """-E(v, r, z, h) ``[B]`` written out from the module docstring: a.v + sum_j z_j (b_j + beta_j.h_j)
    + sum_ij r_ij (z_j h_j . W_ij v_i + pi_ij); ``routes`` [B, P * G], ``z`` [B, N], ``pose`` [B, N, D];
    r_ij = 1 where one of patch i's G parents is j."""
    r = F.one_hot(model.parents(routes), model.caps).view(len(v), model.in_caps, model.groups, -1).sum(2).double()
    u = model.votes(v)  # [B, P, N, D]
    return (
        v.flatten(1) @ model.visible_bias
        + (z * model.switch_bias).sum(-1)
        + (pose * model.pose_bias).sum((-1, -2))
        + (r * torch.einsum("bjd,bijd->bij", pose, u)).sum((1, 2))
        + (r * model.prior).sum((1, 2))
    )


def _joint_table(model: CapsuleRBM, v: torch.Tensor, routes: torch.Tensor) -> torch.Tensor:
    """-E for one image ``v`` [1, C, H, W] and one route ``routes`` [P] at every hidden state [K]."""
    z, pose = _hidden_configs(model.caps, model.dim)
    return _log_joint(model, v.expand(len(z), -1, -1, -1), routes.expand(len(z), -1), z, pose)


@pytest.mark.parametrize(
    "make, pixels, images, routes, hidden",
    [  # one group: 25 capsule states x 2^9 hidden units; two groups of two, one parent in each: 625 x 2^8
        (small_capsrbm, 9, [5, 200, 417], [0, 77, 300], (25, 9)),
        (small_grouped_capsrbm, 4, [3, 9, 14], [0, 101, 255], (625, 8)),
    ],
    ids=["one-group", "two-groups"],
)
def test_the_joint_free_energy_is_the_hidden_capsules_summed_out(make, pixels, images, routes, hidden):
    """F(v, r) against the joint summed over every hidden state by hand."""
    model = make()
    v, r = all_images(pixels)[images], all_routes(model)[routes]
    with torch.no_grad():
        for i in range(3):
            table = _joint_table(model, v[i : i + 1], r[i])
            state = model.chain_state(v[i : i + 1], r[i : i + 1])
            torch.testing.assert_close(model.free_energy_at(v[i : i + 1], state)[0], -torch.logsumexp(table, 0))
    states, bits = hidden
    assert len(table) == states and math.exp(model.log_hidden_states()) == pytest.approx(states * 2**bits)


def _assert_one_step_keeps_the_joint(model, v_all: torch.Tensor, routes: torch.Tensor, n: int) -> None:
    """``n`` exact draws of (v, r) from p(v, r) over every image ``v_all`` and route ``routes``
    (binary routes, enumerated in binary order), one step of the chain: the pairs still follow
    p(v, r), within 1.1 times what sampling alone gives (total variation)."""
    images, k = len(v_all), len(routes)
    with torch.no_grad():
        states = (model.chain_state(v_all, r.expand(images, -1)) for r in routes)
        p = torch.softmax(torch.stack([-model.free_energy_at(v_all, state) for state in states], 1).flatten(), 0)
        idx = torch.multinomial(p.float(), n, replacement=True)
        v, r = v_all[idx // k], routes[idx % k]
        new, state, _ = model.transition(v, model.chain_state(v, r))
        pixels, bits = new[0].numel(), routes.shape[1]
        v_idx = (new.flatten(1) * 2 ** torch.arange(pixels - 1, -1, -1, dtype=new.dtype)).sum(1).long()
        r_idx = (state.routes * 2 ** torch.arange(bits - 1, -1, -1)).sum(1)
        seen = torch.bincount(v_idx * k + r_idx, minlength=images * k).double() / n
    tv = float(0.5 * (seen - p).abs().sum())
    assert tv < 1.1 * sampling_floor(p, n), (tv, sampling_floor(p, n))


def test_with_groups_the_routes_are_a_softmax_within_each_group_and_a_chain_step_keeps_the_joint():
    """p(r | v, z, h) from the joint over all 256 routes against ``sample_routes`` (each patch
    picks one parent per group); then exact draws of (v, r) from p(v, r) (16 images x 256
    routes), one step of the chain: the pairs still follow p(v, r)."""
    model = small_grouped_capsrbm()
    v_all, routes = all_images(4), all_routes(model)
    z = torch.ones(1, 4, dtype=torch.float64)
    pose = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]]], dtype=torch.float64)
    torch.manual_seed(0)
    n = 40000
    with torch.no_grad():
        v = v_all[6:7]
        joint = _log_joint(model, v.expand(len(routes), -1, -1, -1), routes, z.expand(len(routes), -1),
                           pose.expand(len(routes), -1, -1))  # fmt: skip
        p = torch.softmax(joint, 0)
        exact = torch.stack([p @ F.one_hot(routes[:, k], 2).double() for k in range(8)])  # [P * G, K]
        drawn = model.sample_routes(model.agreement(v, pose).expand(n, -1, -1))
        seen = F.one_hot(drawn, 2).double().mean(0)
        assert (seen - exact).abs().max() < 4 * math.sqrt(0.25 / n), (seen, exact)
        assert (exact[:, 0] - 0.5).abs().max() > 0.1
    _assert_one_step_keeps_the_joint(model, v_all, routes, n)  # 16 images x 256 routes


def test_with_groups_importance_sampling_estimates_the_exact_free_energy():
    model = small_grouped_capsrbm()
    v = all_images(4)
    exact = exact_free_energy_at(model, v)
    with torch.no_grad():
        assert bool((model.free_energy(v) >= exact - 1e-9).all())  # the mean-field bound
        model.samples = 20000
        torch.manual_seed(0)
        estimate, _ = model.marginal_free_energy(v)
    assert float((estimate - exact).abs().max()) < 0.03, (estimate, exact)


def test_one_capsule_per_group_is_the_gated_rbm():
    """groups = N: every patch's only choice is every capsule, s_j = beta_j + sum_i W_ij v_i, and
    F(v) has the closed form -a.v - sum_j softplus(b_j + sum_d softplus(s_jd))."""
    torch.manual_seed(1)
    model = CapsuleRBM(image_size=4, patch=2, hidden_caps=3, hidden_dim=2, groups=3, weight_std=1.0).double()
    v = torch.bernoulli(torch.full((5, 1, 4, 4), 0.5, dtype=torch.float64))
    with torch.no_grad():
        s = torch.einsum("bpi,pin->bn", model.visible_caps(v), model.weight).view(5, 3, 2) + model.pose_bias
        gated = -v.flatten(1) @ model.visible_bias - F.softplus(model.switch_bias + F.softplus(s).sum(-1)).sum(-1)
        gated = gated - model.prior.sum()
        torch.testing.assert_close(model.free_energy(v), gated)
        torch.testing.assert_close(model.marginal_free_energy(v)[0], gated)
        assert bool((model.encode(v).coupling == 1).all())


def test_the_capsule_fires_with_the_probability_of_its_routed_input():
    """p(z_j = 1 | v, r) and p(h | v, r, z = 1) from the joint, against the closed forms."""
    model = small_capsrbm()
    v, routes = all_images()[300:301], all_routes(model)[123]
    z, pose = _hidden_configs(2, 2)
    with torch.no_grad():
        weights = torch.softmax(_joint_table(model, v, routes), 0)
        state = model.chain_state(v, routes[None])
        torch.testing.assert_close(model.firing(state)[0], weights @ z)
        expected_pose = torch.sigmoid(state.s[0]) * model.firing(state)[0, :, None]  # E[z_j h_j]
        torch.testing.assert_close((weights[:, None, None] * pose).sum(0), expected_pose)


def test_the_routes_given_the_capsules_are_the_softmax_of_agreement():
    """p(r_i | v, z, h) summed from the joint over all 512 routes, against the draws of
    ``sample_routes`` (routing by agreement as a Gibbs step)."""
    model = small_capsrbm(std=1.5)
    v = all_images()[333:334]
    routes = all_routes(model)
    z = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    pose = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]], dtype=torch.float64)
    with torch.no_grad():
        joint = _log_joint(model, v.expand(len(routes), -1, -1, -1), routes, z.expand(len(routes), -1),
                           pose.expand(len(routes), -1, -1))  # fmt: skip
        p = torch.softmax(joint, 0)
        exact = torch.stack([p @ F.one_hot(routes[:, i], 2).double() for i in range(9)])  # [P, N]
        torch.manual_seed(0)
        n = 40000
        drawn = model.sample_routes(model.agreement(v, pose).expand(n, -1, -1))
        seen = F.one_hot(drawn, 2).double().mean(0)
    assert (seen - exact).abs().max() < 4 * math.sqrt(0.25 / n), (seen, exact)
    assert (exact[:, 0] - 0.5).abs().max() > 0.1  # a case where the agreement decides


def test_the_pixels_given_routes_and_capsules_are_independent_bernoullis():
    """p(v | r, z, h) from the joint over all 512 images is the product of the per-pixel
    sigmoids of a + sum_j r_ij W_ij^T z_j h_j (each patch drawn by its parent)."""
    model = small_capsrbm(std=1.5)
    v, routes = all_images(), all_routes(model)[200]
    z = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    pose = torch.tensor([[[0.0, 1.0], [1.0, 1.0]]], dtype=torch.float64)
    with torch.no_grad():
        n = len(v)
        log_p = torch.log_softmax(
            _log_joint(model, v, routes.expand(n, -1), z.expand(n, -1), pose.expand(n, -1, -1)), 0
        )
        logits = model._top_down(routes[None], pose) + model.visible_bias
        factorial = (v.flatten(1) * F.logsigmoid(logits) + (1 - v.flatten(1)) * F.logsigmoid(-logits)).sum(1)
    torch.testing.assert_close(log_p, factorial)


@pytest.mark.parametrize("make", [small_rbm, lambda: small_capsrbm(std=1.5)], ids=["rbm", "capsrbm"])
def test_chains_sample_the_model_distribution(make):
    model = make()
    torch.manual_seed(2)
    start = torch.bernoulli(torch.full((20000, 1, 3, 3), 0.5, dtype=torch.float64))
    v, acceptance, _ = gibbs(model, start, 150)
    exact = exact_distribution(model)
    tv = 0.5 * (histogram(v) - exact).abs().sum()
    assert tv < 1.3 * sampling_floor(exact, len(v)), tv
    assert acceptance == 1  # block Gibbs: every step is a draw from an exact conditional


def test_one_chain_step_leaves_the_joint_of_images_and_routes_invariant():
    """Exact draws of (v, r) from p(v, r) (all 512 x 512 states), one step of the chain: the
    pairs still follow p(v, r), within what sampling alone gives."""
    model = small_capsrbm(std=1.5)
    v_all, routes = all_images(), all_routes(model)
    torch.manual_seed(0)
    _assert_one_step_keeps_the_joint(model, v_all, routes, 40000)  # 512 images x 512 routes


def test_mean_field_routing_in_a_two_parent_case_by_hand():
    """One patch, two parents with one pose unit each: c after 1, 2 and 3 passes from the
    fixed-point equations written out by hand."""
    votes = torch.tensor([[[[2.0], [-1.0]]]], dtype=torch.float64)  # [B=1, P=1, N=2, D=1]
    prior = torch.tensor([[0.5, 0.0]], dtype=torch.float64)
    switch, pose_bias = torch.tensor([0.2, -0.3], dtype=torch.float64), torch.zeros(2, 1, dtype=torch.float64)

    def by_hand(passes: int) -> list[float]:
        c = [math.exp(0.5) / (math.exp(0.5) + 1), 1 / (math.exp(0.5) + 1)]
        for _ in range(passes - 1):
            s = [c[0] * 2.0, c[1] * -1.0]
            on = [1 / (1 + math.exp(-(b + math.log1p(math.exp(x))))) for b, x in zip((0.2, -0.3), s)]
            mu = [o / (1 + math.exp(-x)) for o, x in zip(on, s)]
            logits = [0.5 + 2.0 * mu[0], 0.0 - 1.0 * mu[1]]
            norm = math.exp(logits[0]) + math.exp(logits[1])
            c = [math.exp(logits[0]) / norm, math.exp(logits[1]) / norm]
        return c

    for passes in (1, 2, 3):
        got = mean_field_couplings(votes, prior, switch, pose_bias, passes)[0, 0].tolist()
        assert got == pytest.approx(by_hand(passes), abs=1e-12)
    assert by_hand(3)[0] > by_hand(1)[0]  # the agreeing parent gains
    with pytest.raises(ValueError, match="routing iterations must be >= 1"):
        mean_field_couplings(votes, prior, switch, pose_bias, 0)


def test_mean_field_with_groups_is_a_softmax_within_each_group():
    """Two groups of two parents: every pass re-weighs each patch's parents within its group,
    written out with two separate softmaxes; each group's couplings sum to 1."""
    from capsrun.models.capsrbm import capsule_mean

    gen = torch.Generator().manual_seed(0)
    votes = torch.randn(3, 2, 4, 2, generator=gen, dtype=torch.float64)  # [B, P, N = 4, D]
    prior = torch.randn(2, 4, generator=gen, dtype=torch.float64)
    switch, pose_bias = torch.randn(4, generator=gen, dtype=torch.float64), torch.zeros(4, 2, dtype=torch.float64)

    def within_groups(logits):
        return torch.cat([torch.softmax(logits[..., :2], -1), torch.softmax(logits[..., 2:], -1)], -1)

    c = within_groups(prior).expand(3, 2, 4)
    for passes in (1, 2, 3):
        got = mean_field_couplings(votes, prior, switch, pose_bias, passes, groups=2)
        torch.testing.assert_close(got, c)
        torch.testing.assert_close(got.view(3, 2, 2, 2).sum(-1), torch.ones(3, 2, 2, dtype=torch.float64))
        mu = capsule_mean(torch.einsum("bij,bijd->bjd", c, votes) + pose_bias, switch)
        c = within_groups(prior + torch.einsum("bijd,bjd->bij", votes, mu))
    assert (c[0] - c[1]).abs().max() > 0.05  # routed by agreement: the images differ


def test_inference_bounds_and_importance_sampling_estimates_the_exact_free_energy():
    """-F(v, c) + H(c) <= log sum_r e^{-F(v, r)} for every image; more mean-field passes tighten it;
    the importance-sampled estimate is within 0.03 nats of the exact value with K = 20,000
    (measured: 0.014 at most; up to 0.06 with K = 100; the weights are heavy-tailed)."""
    model = small_capsrbm(iterations=1, std=1.5)
    v = all_images()
    exact = exact_free_energy_at(model, v)
    with torch.no_grad():
        bounds = {}
        for passes in (1, 2, 4):
            model.hidden_caps.iterations = passes
            bounds[passes] = model.free_energy(v)
            assert bool((bounds[passes] >= exact - 1e-9).all())
        assert float(bounds[4].mean()) < float(bounds[1].mean()) - 0.01
        model.samples = 20000
        torch.manual_seed(0)
        estimate, spread = model.marginal_free_energy(v[::50])
    error = (estimate - exact[::50]).abs()
    assert float(error.max()) < 0.03 and bool((spread >= 0).all()) and float(spread.max()) > 0.1, (error, spread)


def test_the_gradient_estimator_is_the_gradient_of_the_mean_field_bound_plus_log_z():
    """The surrogate mean F(data, c) - H(c) - E_{p(v, r)} F(v, r), with the model's expectation
    taken exactly, has the gradient of -(bound - log Z): positive phase from mean field, negative
    phase from the joint of images and routes."""
    model = small_capsrbm(iterations=3, std=1.0)
    data = all_images()[[3, 100, 300, 511]]
    v_all, routes = all_images(), all_routes(model)[::8]  # 64 routes: enough for the identity
    model.prior.data[:] = 0.0

    def joint_f():
        return torch.stack([model.free_energy_at(v_all, model.chain_state(v_all, r.expand(512, -1))) for r in routes])

    with torch.no_grad():
        p = torch.softmax(-joint_f().flatten(), 0).view(len(routes), 512)
    loss = model.free_energy(data).mean() - (p * joint_f()).sum()
    estimated = torch.autograd.grad(loss, list(model.parameters()))

    def restricted_log_z():  # log Z over the 64 routes the expectation used
        return torch.logsumexp(-joint_f().flatten(), 0)

    bound = model.free_energy(data).mean() + restricted_log_z()
    exact = torch.autograd.grad(bound, list(model.parameters()))
    for e, x in zip(estimated, exact):
        torch.testing.assert_close(e, x)


def test_training_forward_runs_the_chains_and_keeps_their_routes():
    torch.manual_seed(0)
    model = CapsuleRBM(image_size=8, patch=4, hidden_caps=3, hidden_dim=2, chains=6, cd_steps=2, tempering=3)
    x = torch.rand(6, 1, 8, 8)
    out = model.train()(x)
    losses = RBMLoss()(out, x)
    torch.testing.assert_close(losses["total"], out.free_energy.mean() - out.model_free_energy.mean())
    assert out.reconstruction is None and float(out.acceptance) == 1
    assert bool(model.chains_started) and set(model.chains.unique().tolist()) <= {0.0, 1.0}
    assert model.chain_latent.shape == (6, 4) and model.ladder_latent.shape == (2, 6, 4)
    before = model.chain_latent.clone()
    # the model term is F(v, r) of the chains' own routes: recomputed from the buffers, the same
    with torch.no_grad():
        again = model.free_energy_at(model.chains, model.chain_state(model.chains, model.chain_latent))
    torch.testing.assert_close(out.model_free_energy.detach(), again)
    model.train()(x)
    assert not torch.equal(before, model.chain_latent) and int(model.chain_latent.max()) < 3
    assert "chain_latent" in model.state_dict() and "ladder_latent" in model.state_dict()
    out = model.eval()(x)
    losses = RBMLoss()(out, x)
    assert "total" not in losses and out.reconstruction.shape == x.shape
    assert losses["log_likelihood/pseudo"] < 0 and 0 < losses["hidden/on"] < 1


def test_routing_depends_on_the_image_only_with_two_or_more_passes():
    torch.manual_seed(0)
    model = CapsuleRBM(image_size=8, patch=4, hidden_caps=3, hidden_dim=4, routing_iterations=1, weight_std=1.0)
    v = torch.bernoulli(torch.full((5, 1, 8, 8), 0.4))
    with torch.no_grad():
        one = model.encode(v).coupling
        model.hidden_caps.iterations = 2
        two = model.encode(v).coupling
    assert torch.allclose(one, one[:1].expand_as(one))  # the prior alone: the same for every image
    assert (two - two[:1]).abs().amax() > 0.05  # routed by agreement: they differ between images
    picture = model.hidden_caps.parse_image(v, two)
    assert picture.shape == (3, 3 * 8, 3 * 5 * 9)
    ink = torch.ones(1, 1, 8, 8)  # every patch inked: its tint is its parent's colour alone
    to_first, to_second = (
        F.one_hot(torch.zeros(1, 4, dtype=torch.long), 3),
        F.one_hot(torch.ones(1, 4, dtype=torch.long), 3),
    )
    first, second = (model.hidden_caps.parse_image(ink, c.float()) for c in (to_first, to_second))
    assert torch.equal(first[:, :12, :12], first[:, 12:24, 12:24])  # same parent, same colour
    assert not torch.equal(first[:, :12, :12], second[:, :12, :12])  # another parent, another colour
    grouped = CapsuleRBM(image_size=8, patch=4, hidden_caps=4, hidden_dim=2, groups=2)
    c = F.one_hot(torch.tensor([[0, 1, 0, 0, 1, 1, 1, 0]]), 2).float()  # patch i, group g: entry 2 i + g
    picture = grouped.hidden_caps.parse_image(ink, c)
    assert picture.shape == (3, 3 * 17, 3 * 9)  # one row per group, a white line between
    assert torch.equal(picture[:, 27:39, 12:24], picture[:, :12, 12:24])  # patch 1: the first capsule in both
    assert not torch.equal(picture[:, 27:39, :12], picture[:, :12, :12])  # patch 0: the second in group 1
    assert bool((picture[:, 24:27] == 1).all())


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
    for key in ("routing_iterations", "likelihood_samples", "groups"):
        with pytest.raises(ValueError, match=f"{key} must be an integer >= 1, got 0"):
            CapsuleRBM(**{key: 0})
    with pytest.raises(ValueError, match="hidden_caps 50 must be a multiple of groups 3"):
        CapsuleRBM(groups=3)
    with pytest.raises(ValueError, match="cd_steps"):
        RBM(cd_steps=0)
    with pytest.raises(ValueError, match="chain_init"):
        RBM(chain_init="prior")
    with pytest.raises(ValueError, match="chains must be >= 1"):
        RBM(chains=0)
