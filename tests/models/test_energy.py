"""The energy models' shared machinery (capsrun.models.energy): free energies and visible logits
at one inverse temperature per row, and PCD's persistent chains at the top of a training ladder
(kept in checkpoints, re-spaced as the model trains, shifted, tapered)."""

from __future__ import annotations

import pytest
import torch

import capsrun.models.energy as energy
from capsrun.mcmc.base import base_rate
from capsrun.mcmc.tempering import RETUNE_EVERY, ladder, retune
from capsrun.models.capsrbm import CapsuleRBM
from capsrun.models.energy import RBMLoss
from capsrun.models.rbm import RBM
from helpers import LADDER_BASE as BASE
from helpers import all_images, small_rbm, tempering_capsrbm

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


@pytest.mark.parametrize("make", [small_rbm, tempering_capsrbm], ids=["rbm", "capsrbm"])
def test_one_inverse_temperature_per_row_is_each_row_at_its_own(make):
    """The ladder runs as one batch with a beta per row: the free energy (and the capsules'
    evidence) of each row is the one computed at that row's beta alone."""
    model = make()
    v = all_images()[::37]
    betas = torch.linspace(0, 1, len(v), dtype=torch.float64)
    enc = model.encode(v)
    rows = torch.stack(
        [model.free_energy_at(v[i : i + 1], model.encode(v[i : i + 1]), float(b), BASE)[0] for i, b in enumerate(betas)]
    )
    torch.testing.assert_close(model.free_energy_at(v, enc, betas, BASE), rows)
    torch.testing.assert_close(model.visible_logits(betas, None)[3], float(betas[3]) * model.visible_bias)
    if isinstance(model, CapsuleRBM):
        evidence = torch.stack([model.evidence(enc.s[i : i + 1], float(b))[0] for i, b in enumerate(betas)])
        torch.testing.assert_close(model.evidence(enc.s, betas), evidence)


@pytest.mark.parametrize("make", [small_rbm, tempering_capsrbm], ids=["rbm", "capsrbm"])
def test_the_visible_input_is_the_tempered_visible_logits_in_place(make):
    """beta (top-down + a) + (1 - beta) base, for one beta or one per row, written over the
    top-down input; at beta = 1 exactly top-down + a, whatever the base."""
    model = make()
    top_down = torch.randn(5, 9, dtype=torch.float64)
    betas = torch.tensor([0.0, 0.25, 0.5, 0.9, 1.0], dtype=torch.float64)
    a = model.visible_bias.detach()
    expected = betas[:, None] * (top_down + a) + (1 - betas[:, None]) * BASE
    given = top_down.clone()
    out = model.visible_input(given, betas, BASE)
    assert out.data_ptr() == given.data_ptr()  # in place: no [B, V] temporary
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(model.visible_input(top_down.clone(), betas, None), betas[:, None] * (top_down + a))
    torch.testing.assert_close(model.visible_input(top_down.clone(), 0.5, BASE), 0.5 * (top_down + a) + 0.5 * BASE)
    assert torch.equal(model.visible_input(top_down.clone(), 1.0, BASE), top_down + a)


def test_training_with_tempering_keeps_a_ladder_and_logs_its_swap_rate():
    torch.manual_seed(0)
    model = RBM(image_size=4, hidden=5, chains=6, tempering=3)
    x = (torch.rand(6, 1, 4, 4) < 0.3).float()
    out = model.train()(x)
    losses = RBMLoss()(out, x)
    assert 0 <= float(losses["chain/swap_rate"]) <= 1
    torch.testing.assert_close(model.base_rate, base_rate(x))
    assert model.ladder_chains.shape == (2, 6, 1, 4, 4) and int(model.sweeps) == 1
    state = model.state_dict()
    assert {"ladder_chains", "betas", "swap_rates", "base_rate", "sweeps"} <= set(state)
    again = RBM(image_size=4, hidden=5, chains=6, tempering=3)
    again.load_state_dict(state)
    assert torch.equal(again.ladder_chains, model.ladder_chains)
    assert "ladder_chains" not in RBM(image_size=4, hidden=5, chains=6).state_dict()  # plain PCD: keys as before


def test_a_training_ladder_from_a_lowest_level_keeps_that_level_as_it_retunes():
    """``ladder_from``: the levels start evenly from it to 1 (0: exactly :func:`ladder`) and
    :func:`retune` moves the inner levels only; settings that cannot work are refused."""
    assert RBM(image_size=3, tempering=5).betas.tolist() == ladder(5)
    model = RBM(image_size=4, hidden=5, chains=6, tempering=5, ladder_from=0.5)
    assert model.betas.tolist() == [0.5, 0.625, 0.75, 0.875, 1.0]
    moved = retune(model.betas, torch.tensor([0.9, 0.1, 0.9, 0.9], dtype=torch.float64), step=1.0)
    assert moved[0] == 0.5 and moved[-1] == 1.0 and (moved.diff() > 0).all()
    assert float(moved[2] - moved[1]) < 0.125  # the slow pair's levels drawn together
    torch.manual_seed(0)
    x = (torch.rand(6, 1, 4, 4) < 0.3).float()
    for _ in range(RETUNE_EVERY + 1):
        model.train()(x)
    assert model.betas[0] == 0.5 and model.betas[-1] == 1.0
    for kwargs in ({"tempering": 5, "ladder_from": 1.0}, {"tempering": 1, "ladder_from": 0.5}):
        with pytest.raises(ValueError, match=r"ladder_from must be in \[0, 1\) and needs tempering >= 2"):
            RBM(image_size=4, hidden=5, **kwargs)


def test_training_on_a_tapered_ladder_keeps_fewer_chains_below_the_top():
    """``ladder_width``: 2 chains a level below 6 at the top; the model term is still every top
    chain's free energy, and the checkpoint holds the narrower ladder. Wider than the top: refused."""
    torch.manual_seed(0)
    model = RBM(image_size=4, hidden=5, chains=6, tempering=3, ladder_width=2)
    x = (torch.rand(6, 1, 4, 4) < 0.3).float()
    for _ in range(3):
        out = model.train()(x)
    assert model.ladder_chains.shape == (2, 2, 1, 4, 4) and int(model.sweeps) == 3
    with torch.no_grad():
        torch.testing.assert_close(out.model_free_energy, model.free_energy(model.chains))
    assert 0 <= float(RBMLoss()(out, x)["chain/swap_rate"]) <= 1
    again = RBM(image_size=4, hidden=5, chains=6, tempering=3, ladder_width=2)
    again.load_state_dict(model.state_dict())
    assert torch.equal(again.ladder_chains, model.ladder_chains)
    with pytest.raises(ValueError, match=r"ladder_width must be null or between 1 and chains \(6\), got 7"):
        RBM(image_size=4, hidden=5, chains=6, tempering=3, ladder_width=7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("make", "sizes"), [(RBM, {"hidden": 5}), (CapsuleRBM, {"patch": 2})], ids=["rbm", "capsrbm"])
def test_tempered_training_retunes_its_ladder_on_the_model_device(make, sizes, device):
    """Every RETUNE_EVERY sweeps the ladder is re-spaced from its running swap rates; that must run
    where the model lives (on an H200 it first stopped with a CPU/CUDA mix in retune's
    searchsorted) and move the inner levels, the ends staying 0 and 1."""
    torch.manual_seed(0)
    model = make(image_size=4, chains=4, tempering=4, **sizes).to(device).train()
    x = (torch.rand(4, 1, 4, 4, device=device) < 0.3).float()
    start = model.betas.clone()
    for _ in range(RETUNE_EVERY):
        model(x)
    betas = model.betas
    assert betas.device.type == device and int(model.sweeps) == RETUNE_EVERY
    assert float(betas[0]) == 0 and float(betas[-1]) == 1 and bool((betas.diff() > 0).all())
    assert not torch.equal(betas, start)  # the rates were not all equal: the inner levels moved


def test_a_batch_bigger_than_the_chains_takes_its_model_term_from_every_chain():
    """PCD with fewer fantasy particles than images a batch (Tieleman 2008): the model term is the
    mean free energy of all the chains, which keep their new states; the data term has every image."""
    torch.manual_seed(0)
    x = (torch.rand(8, 1, 4, 4) < 0.3).float()
    for tempering in (1, 3):
        model = RBM(image_size=4, hidden=5, chains=3, tempering=tempering)
        out = model.train()(x)
        assert out.free_energy.shape == (8,) and out.model_free_energy.shape == (3,)
        with torch.no_grad():
            torch.testing.assert_close(out.model_free_energy, model.free_energy(model.chains))
        losses = RBMLoss()(out, x)
        torch.testing.assert_close(losses["total"], out.free_energy.mean() - out.model_free_energy.mean())
        if tempering > 1:
            assert model.ladder_chains.shape == (2, 3, 1, 4, 4)


def test_tempering_needs_persistent_chains():
    with pytest.raises(ValueError, match="tempering"):
        RBM(tempering=0)
    with pytest.raises(ValueError, match="tempering"):
        CapsuleRBM(image_size=8, patch=4, persistent=False, tempering=3)


def test_a_shifted_training_ladder_tempers_towards_the_raised_base_rate(monkeypatch):
    """``ladder_shift``: the training ladder's path runs from the base rate of the data plus the
    shift (the buffer keeps the data's own, for sampling and AIS); refused without a ladder or
    out of range."""
    torch.manual_seed(0)
    x = (torch.rand(6, 1, 4, 4) < 0.3).float()
    model = RBM(image_size=4, hidden=5, chains=6, tempering=3, ladder_shift=1.5)
    seen = []
    run_ladder = energy.run_ladder

    def spy(model, states, steps, base, *args):
        seen.append(base.clone())
        return run_ladder(model, states, steps, base, *args)

    monkeypatch.setattr(energy, "run_ladder", spy)
    model.train()(x)
    torch.testing.assert_close(model.base_rate, base_rate(x))
    torch.testing.assert_close(seen[0], base_rate(x) + 1.5)
    for kwargs in ({"tempering": 1, "ladder_shift": 1.0}, {"tempering": 3, "ladder_shift": -1.0}):
        with pytest.raises(ValueError, match=r"ladder_shift must be in \[0, 10\] and needs tempering >= 2"):
            RBM(image_size=4, hidden=5, **kwargs)
