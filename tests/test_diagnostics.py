"""Capsule health metrics against hand-built tensors with known answers, and the deep CapsNet."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from capsrun import diagnostics, registry, settings
from capsrun.cli import conf_dir
from capsrun.errors import ConfigError
from capsrun.models.capsnet import CapsNet
from capsrun.models.deep_capsnet import DeepCapsNet

SMALL = dict(
    in_channels=1,
    image_size=28,
    num_classes=10,
    conv1_channels=8,
    primary_types=4,
    primary_dim=8,
    digit_dim=8,
    decoder_hidden=[16],
)


def test_dead_share_all_dead_none_dead_and_one_example_keeps_a_capsule_alive():
    lengths = torch.zeros(5, 4)
    assert diagnostics.dead_share(lengths) == 1.0
    assert diagnostics.dead_share(torch.full((5, 4), 0.5)) == 0.0
    lengths[3, 1] = 0.2  # capsule 1 fires for one example only: alive
    lengths[:, 2] = 0.009  # below the threshold everywhere: dead
    assert diagnostics.dead_share(lengths, threshold=0.01) == 0.75
    assert diagnostics.dead_share(lengths, threshold=0.005) == 0.5


def test_constant_share_finds_capsules_that_ignore_the_input():
    lengths = torch.tensor([[0.07, 0.1, 0.0], [0.07, 0.5, 0.0], [0.07, 0.9, 0.0]])
    assert diagnostics.constant_share(lengths) == pytest.approx(2 / 3)  # column 0 alive but constant, 2 dead
    assert diagnostics.dead_share(lengths) == pytest.approx(1 / 3)


def test_length_stats_hand_computed():
    lengths = torch.arange(11, dtype=torch.float32).view(1, 11) / 10  # 0.0, 0.1, ..., 1.0
    stats = diagnostics.length_stats(lengths)
    assert stats["length/mean"] == pytest.approx(0.5)
    assert stats["length/q10"] == pytest.approx(0.1)
    assert stats["length/q50"] == pytest.approx(0.5)
    assert stats["length/q90"] == pytest.approx(0.9)


def test_one_hot_couplings_are_a_sharp_tree():
    c = torch.nn.functional.one_hot(torch.randint(0, 5, (3, 7)), 5).float()
    out = diagnostics.coupling_sharpness(c)
    assert out["coupling/max"] == pytest.approx(1.0)
    assert out["coupling/entropy"] == pytest.approx(0.0, abs=1e-6)


def test_uniform_couplings_have_max_one_over_j_and_entropy_one():
    out = diagnostics.coupling_sharpness(torch.full((3, 7, 4), 0.25))
    assert out["coupling/max"] == pytest.approx(0.25)
    assert out["coupling/entropy"] == pytest.approx(1.0)


def test_coupling_entropy_hand_computed_and_leaky_couplings_are_renormalised():
    c = torch.tensor([[[0.5, 0.5, 0.0, 0.0]]])  # entropy log 2 of log 4
    out = diagnostics.coupling_sharpness(c)
    assert out["coupling/entropy"] == pytest.approx(0.5, abs=1e-5)
    assert out["coupling/max"] == pytest.approx(0.5)
    leaky = diagnostics.coupling_sharpness(c * 0.6)  # a leak took 40 %: same distribution
    assert leaky["coupling/entropy"] == pytest.approx(0.5, abs=1e-5)


def test_input_independent_couplings_have_static_routing():
    one = torch.softmax(torch.randn(1, 6, 3), -1)
    out = diagnostics.routing_dynamics(one.expand(8, -1, -1))
    assert out["routing/std"] == pytest.approx(0.0, abs=1e-7)
    assert out["routing/deviation"] == pytest.approx(0.0, abs=1e-7)


def test_routing_dynamics_hand_computed():
    a = torch.tensor([[[1.0, 0.0]]])
    b = torch.tensor([[[0.0, 1.0]]])
    out = diagnostics.routing_dynamics(torch.cat([a, b]))  # every c_ij is 0 or 1 around a mean of 0.5
    assert out["routing/std"] == pytest.approx(0.5)
    assert out["routing/deviation"] == pytest.approx(0.5)


def test_mean_coupling_image_rows_are_parents():
    c = torch.zeros(2, 6, 3)
    c[:, :, 1] = 1.0  # every child routes to parent 1
    image = diagnostics.mean_coupling_image(c, row_height=2)
    assert image.shape == (1, 6, 6)
    assert image[0, 2:4].eq(1).all() and image[0, :2].eq(0).all() and image[0, 4:].eq(0).all()


def test_gradient_norm_hand_computed():
    layer = nn.Linear(2, 1)
    assert diagnostics.gradient_norm(layer) is None
    layer.weight.grad = torch.tensor([[3.0, 0.0]])
    layer.bias.grad = torch.tensor([4.0])
    assert diagnostics.gradient_norm(layer) == pytest.approx(5.0)


def test_identity_transform_changes_nothing_and_affine_change_is_relative():
    x = torch.rand(3, 1, 12, 12)
    same = diagnostics.random_affine(x, 0.0, 0.0, 0.0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(same, x, atol=1e-5, rtol=0)
    u = torch.randn(4, 5, 3)
    assert diagnostics.affine_change(u, u) == 0.0
    assert diagnostics.affine_change(u, 3 * u) == pytest.approx(2.0)


def test_affine_moves_rotates_and_scales_as_documented():
    x = torch.zeros(1, 1, 9, 9)
    x[0, 0, 4, 6] = 1.0  # two pixels right of the centre
    one = torch.ones(1)
    moved = diagnostics.affine(x, torch.zeros(1), one, torch.tensor([[1.0, -2.0]]))
    assert divmod(int(moved.flatten().argmax()), 9) == (2, 7) and moved.max() == pytest.approx(1.0)
    turned = diagnostics.affine(x, torch.full((1,), 90.0), one, torch.zeros(1, 2))
    assert divmod(int(turned.flatten().argmax()), 9) == (2, 4)  # counter-clockwise: right -> up
    torch.testing.assert_close(turned, torch.rot90(x, 1, dims=(2, 3)), atol=1e-5, rtol=0)
    grown = diagnostics.affine(x, torch.zeros(1), torch.full((1,), 2.0), torch.zeros(1, 2))
    assert divmod(int(grown.flatten().argmax()), 9)[1] in (7, 8)  # 2 px from the centre -> ~4


def test_probe_records_every_capsule_layer_in_forward_order_and_unhooks():
    model = DeepCapsNet(hidden_caps=[6, 5], hidden_dims=[4, 3], **SMALL)
    probe = diagnostics.CapsuleProbe(model)
    assert [t for t, _ in probe.layers] == ["primary_caps", "hidden_caps_0", "hidden_caps_1", "digit_caps"]
    with probe.recording() as rec:
        model(torch.rand(2, 1, 28, 28))
    assert rec["primary_caps"].capsules[0].shape == (2, 144, 8) and not rec["primary_caps"].coupling
    assert rec["hidden_caps_0"].coupling[0].shape == (2, 144, 6)
    assert rec["hidden_caps_1"].capsules[0].shape == (2, 5, 3)
    assert rec["digit_caps"].coupling[0].shape == (2, 5, 10)
    model(torch.rand(2, 1, 28, 28))
    assert len(rec["digit_caps"].capsules) == 1  # hooks are gone


def test_one_routing_iteration_gives_uniform_static_couplings_in_every_layer():
    model = DeepCapsNet(hidden_caps=[6], routing_iterations=1, **SMALL)
    health = diagnostics.measure(model, torch.rand(6, 1, 28, 28), full=True)
    for layer, parents in (("hidden_caps_0", 6), ("digit_caps", 10)):
        assert health.scalars[f"{layer}/coupling/max"] == pytest.approx(1 / parents, rel=1e-4)
        assert health.scalars[f"{layer}/coupling/entropy"] == pytest.approx(1.0, abs=1e-5)
        assert health.scalars[f"{layer}/routing/std"] == pytest.approx(0.0, abs=1e-6)


def test_measure_keeps_mode_and_rng_and_finds_a_zeroed_layer_dead():
    model = DeepCapsNet(hidden_caps=[6], **SMALL)
    with torch.no_grad():
        model.hidden_caps[0].weight.zero_()  # no votes reach the hidden capsules
        model.hidden_caps[0].bias.zero_()
    model.train()
    x = torch.rand(5, 1, 28, 28)
    rng = torch.get_rng_state()
    health = diagnostics.measure(model, x, full=True)
    assert model.training and torch.equal(rng, torch.get_rng_state())
    assert health.scalars["hidden_caps_0/dead_share"] == 1.0
    assert health.scalars["primary_caps/dead_share"] == 0.0
    assert set(health.images) == {"hidden_caps_0/mean_coupling", "digit_caps/mean_coupling"}
    assert "primary_caps/length" in health.histograms and "digit_caps/coupling" in health.histograms
    assert 0 <= health.scalars["affine/agreement"] <= 100


def test_light_measure_skips_the_costly_metrics():
    health = diagnostics.measure(CapsNet(**SMALL), torch.rand(4, 1, 28, 28), full=False)
    assert "digit_caps/coupling/entropy" in health.scalars
    assert not any("routing/" in k or "affine" in k for k in health.scalars)
    assert not health.histograms and not health.images


def test_gradient_norms_name_every_weight_layer():
    model = DeepCapsNet(hidden_caps=[6], **SMALL)
    model(torch.rand(2, 1, 28, 28), torch.tensor([1, 2])).lengths.sum().backward()
    norms = diagnostics.gradient_norms(model)
    assert list(norms) == [
        "conv1/grad_norm",
        "primary_caps/grad_norm",
        "hidden_caps_0/grad_norm",
        "digit_caps/grad_norm",
    ]  # the decoder got no gradient from the lengths
    assert all(v > 0 for v in norms.values())


def test_deep_capsnet_shapes_and_depth_zero_is_capsnet():
    model = DeepCapsNet(hidden_caps=[7, 5], hidden_dims=6, **SMALL)
    out = model(torch.rand(3, 1, 28, 28))
    assert out.lengths.shape == (3, 10) and out.coupling.shape == (3, 5, 10)
    assert out.reconstruction.shape == (3, 1, 28, 28)
    assert [n for n, _ in model.named_children()] == ["conv1", "primary_caps", "hidden_caps", "digit_caps", "decoder"]
    flat = DeepCapsNet(hidden_caps=[], **SMALL)
    assert sum(p.numel() for p in flat.parameters()) == sum(p.numel() for p in CapsNet(**SMALL).parameters())
    with pytest.raises(ValueError):
        DeepCapsNet(hidden_caps=[4, 4], hidden_dims=[8], **SMALL)


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(config_name="train", overrides=["model=deep_capsnet", *overrides])


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ([], [32, 32]),
        (["model.depth=4", "model.width=16"], [16] * 4),
        (["model.depth=0"], []),
        (["model.capsule_layers=[32,16,8]", "model.depth=1"], [32, 16, 8]),
    ],
)
def test_hidden_layers_from_depth_width_or_an_explicit_list(overrides, expected):
    cfg = _compose(*overrides, "model.net.conv1_channels=8", "model.net.primary_types=2")
    model = registry.model(cfg)
    assert [layer.out_caps for layer in model.hidden_caps] == expected


@pytest.mark.parametrize("override", ["model.depth=-1", "model.width=0", "model.capsule_layers=[32,0]"])
def test_bad_depth_is_a_config_error(override):
    with pytest.raises(ConfigError, match="model\\."):
        registry.hidden_caps(_compose(override))


def test_diagnostics_levels_compose():
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        assert settings.diagnostics_level(compose(config_name="train")) == "off"
        for level in ("off", "light", "full"):
            cfg = compose(config_name="train", overrides=[f"diagnostics={level}"])
            assert settings.diagnostics_level(cfg) == level
        cfg = compose(config_name="train", overrides=["diagnostics=full", "diagnostics.level=loud"])
        with pytest.raises(ConfigError, match="off, light, full"):
            settings.diagnostics_level(cfg)


def test_health_table_one_row_per_layer():
    runs = {
        "model.depth=1": {"conv1/grad_norm": 1e-3, "digit_caps/dead_share": 0.25, "affine/agreement": 90.0},
        "model.depth=2": {"hidden_caps_0/dead_share": 1.0, "digit_caps/dead_share": 0.0},
    }
    lines = diagnostics.health_table(runs).splitlines()
    assert lines[0].split()[:4] == ["run", "layer", "dead", "const"]
    assert lines[1].split()[:2] == ["model.depth=1", "conv1"] and "1.00e-03" in lines[1]
    assert lines[2].split()[:3] == ["digit_caps", "25.0%", "-"]
    assert "90.0%" in lines[3]
    assert lines[4].split()[:3] == ["model.depth=2", "hidden_caps_0", "100.0%"]
    assert len(lines) == 6
