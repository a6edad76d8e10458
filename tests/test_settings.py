"""capsrun.settings: the sampler resolved against the model it samples, the judge's and AIS's
settings, every refusal in one line naming its key; keys of earlier releases refused with their
new name; a checkpoint of the earlier config layout still resumes."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from capsrun import rundir, settings
from capsrun.errors import ConfigError
from capsrun.mcmc.chains import ChainSpec
from helpers import compose_config


def _sampler(trained: dict | None = None, seed: int = 0, **given) -> settings.SamplerSettings:
    node = OmegaConf.merge(compose_config("sample", "checkpoint=x").sampler, given)
    return settings.sampler_settings(node, trained or {}, seed)


def test_the_sampler_defaults_to_the_model_s_own_chain():
    """A model trained without a ladder: its plain chain, no shift, no tuning, 100 x 2,000."""
    found = _sampler({"tempering": 1})
    assert found.chains == 100 and found.spec == ChainSpec(2000, seed=0)


def test_a_ladder_trained_model_is_sampled_on_its_ladder_shifted_and_tuned_by_default():
    """tempering null: the training ladder's levels; shift and tune null: LADDER_SHIFT and
    LADDER_TUNE (at most half the steps) with a ladder."""
    found = _sampler({"tempering": 8, "ladder_from": 0.55}, seed=3)
    assert found.spec == ChainSpec(2000, 8, 0.0, settings.LADDER_SHIFT, settings.LADDER_TUNE, 1.0, 3)
    short = _sampler({"tempering": 8}, steps=300)
    assert short.spec.tune == 150
    assert _sampler({"tempering": 8}, ladder_shift=0, ladder_tune=0).spec.shift == 0.0


@pytest.mark.parametrize(
    "trained, given, message",
    [
        ({"tempering": 8, "ladder_from": 0.55}, {"ladder_from": 0.3}, "is below the training ladder's lowest level"),
        ({"tempering": 1}, {"ladder_from": 0.5}, "sampler.ladder_from needs a tempering ladder"),
        ({}, {"tempering": 3, "temperature": 2.0}, "a tempering ladder samples the model at temperature 1"),
        ({}, {"tempering": 1, "ladder_shift": 1.0}, "shape a tempering ladder"),
        ({}, {"tempering": 0}, "sampler.tempering must be an integer >= 1, got 0"),
        ({}, {"chains": -1}, "sampler.chains must be an integer >= 1"),
        ({}, {"temperature": float("inf")}, "sampler.temperature must be a number > 0, got inf"),
    ],
)
def test_sampler_settings_that_cannot_work_are_one_line_naming_the_key(trained, given, message):
    with pytest.raises(ConfigError, match=message) as err:
        _sampler(trained, **given)
    assert "\n" not in str(err.value)


def test_a_bad_training_ladder_is_one_line_naming_its_key(capsrun_here, tmp_path, mnist_root):
    """``model.net.tempering=abc`` with an explicit sampler ladder: one line naming the key, not
    a traceback from comparing it (nor the constructor's comparison error)."""
    assert _sampler({"tempering": "abc", "ladder_from": "x"}, tempering=4).spec.tempering == 4
    args = ("train", "model=rbm", "model.net.tempering=abc", "sampler.tempering=4", "trainer.progress=false")
    result = capsrun_here(*args, cwd=tmp_path, data_root=mnist_root)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (
        result.stderr.strip()
        == "capsrun: error: model.net.tempering must be an integer >= 1, got 'abc'; e.g. model.net.tempering=8"
    )


def test_a_sampling_ladder_may_start_at_or_above_the_training_ladder():
    trained = {"tempering": 8, "ladder_from": 0.55}
    assert _sampler(trained, ladder_from=0.55).spec.ladder_from == 0.55
    assert _sampler(trained, ladder_from=0.7).spec.ladder_from == 0.7
    assert _sampler({"tempering": 1}, tempering=4, ladder_from=0.2).spec.ladder_from == 0.2  # no ladder of its own


def test_train_resolves_the_sample_grid_against_the_training_ladder():
    cfg = compose_config("train", "experiment=capsrbm_mnist")
    checked = settings.check_train(cfg, energy=True)
    assert checked.sampler.chains == 100 and checked.sampler.spec.steps == 1500
    assert checked.sampler.spec.tempering == 8 and checked.sampler.spec.ladder_from == 0.55
    assert checked.ais.runs == 50 and checked.judging.every_epochs == 0
    assert settings.check_train(compose_config("train"), energy=False).sampler is None


def test_judging_and_ais_settings_are_checked():
    with pytest.raises(ConfigError, match="sample_quality.confidence must be a number in \\(0, 1\\), got 1"):
        settings.judging(compose_config("train", "sample_quality.confidence=1").sample_quality)
    with pytest.raises(ConfigError, match="ais.temperatures must be an integer >= 2, got 1"):
        settings.ais_settings(compose_config("train", "ais.temperatures=1").ais)


@pytest.mark.parametrize(
    "command, override, new",
    [
        ("train", "model.tempering=8", "model.net.tempering"),
        ("train", "model.ladder_from=0.55", "model.net.ladder_from"),
        ("train", "model.samples.gibbs_steps=100", "sampler.steps"),
        ("train", "model.samples.chains=100", "sampler.chains"),
        ("sample", "num_samples=1000", "sampler.chains"),
        ("sample", "gibbs_steps=500", "sampler.steps"),
        ("sample", "tempering=8", "sampler.tempering"),
    ],
)
def test_a_key_of_an_earlier_release_names_its_new_key(capsrun_here, tmp_path, command, override, new):
    result = capsrun_here(command, override, cwd=tmp_path)
    key, _, value = override.partition("=")
    assert result.returncode == 2
    assert result.stderr.strip() == f"capsrun: error: {key} is now {new}; e.g. {new}={value}"


def test_a_checkpoint_of_the_earlier_layout_resumes():
    """The config a capsrbm last.pt kept before the energy settings moved (mirrors under model.*,
    the grid under model.samples) is the same run as today's config of those settings."""
    current = OmegaConf.to_container(compose_config("train", "experiment=capsrbm_mnist"), resolve=True)
    saved = OmegaConf.to_container(compose_config("train", "experiment=capsrbm_mnist"), resolve=True)
    net = saved["model"]["net"]
    saved["model"].update({k: net[k] for k in ("cd_steps", "persistent", "tempering", "ladder_from", "ladder_shift")})
    saved["model"]["samples"] = {"chains": 100, "gibbs_steps": 3000, "tempering": 8, "ladder_from": 0.55}
    assert rundir.resume_conflicts(saved, current) == []
    saved["model"]["net"] = {**net, "tempering": 20}  # a setting that does decide the result still counts
    assert [c[0] for c in rundir.resume_conflicts(saved, current)] == ["model.net.tempering"]
