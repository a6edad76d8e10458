"""Unit tests of what keeps runs safe: the model registry, resume settings, the run-dir lock, the
non-finite guards, valid JSON, the CIFAR10 unpickler (the CLI tests are in test_cli_safety.py)."""

from __future__ import annotations

import json
import logging
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from capsrun import build, checkpoint, registry, rundir
from capsrun.datasets import cifar10
from capsrun.errors import CheckpointError, ConfigError, DatasetError
from capsrun.monitors import Diverged, NonFiniteWatch, finite_model, warn_if_collapsed
from capsrun.run import EvalResult, Loop
from capsrun.train import fit
from helpers import PoisonedLoss, compose_config, toy_run

# --- the registry ----------------------------------------------------------------------------------


def _stored(model: str = "capsnet") -> dict:
    cfg = compose_config("train", f"model={model}")
    return OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize("name", ["baseline_cnn", "capsnet", "deep_capsnet", "vcaps", "rbm", "capsrbm"])
def test_the_registry_builds_what_instantiate_built(name):
    """Same class, same parameter shapes and, from one seed, the same weights as Hydra's instantiate."""
    from hydra.utils import instantiate

    cfg = compose_config("train", f"model={name}")
    torch.manual_seed(0)
    mine = registry.model(cfg)
    ds = cfg.dataset
    sizes = dict(in_channels=ds.channels, image_size=ds.image_size, num_classes=ds.num_classes)
    if name == "deep_capsnet":
        sizes["hidden_caps"] = registry.hidden_caps(cfg)
    torch.manual_seed(0)
    theirs = instantiate(cfg.model.net, **sizes)
    assert type(mine) is type(theirs)
    for (k, a), (_, b) in zip(mine.state_dict().items(), theirs.state_dict().items()):
        assert torch.equal(a, b), k


def test_a_stored_config_names_a_model_not_an_import_path(tmp_path):
    path = tmp_path / "x.pt"
    good = _stored()
    assert registry.stored_config({"config": good}, path).model.name == "capsnet"
    for edit, needle in (
        (lambda c: c["model"]["net"].__setitem__("_target_", "os.system"), "names 'os.system'"),
        (lambda c: c["model"]["loss"].__setitem__("_target_", "builtins.exec"), "names 'builtins.exec'"),
        (lambda c: c["model"]["net"].__setitem__("digit_dim", {"_target_": "os.getcwd"}), "must be a number"),
        (lambda c: c["model"]["net"].__setitem__("_args_", ["rm"]), "has no setting '_args_'"),
        (lambda c: c["model"].__setitem__("name", "subprocess"), "names model 'subprocess'"),
        (lambda c: c["dataset"].__setitem__("name", "imagenet"), "names dataset 'imagenet'"),
        (lambda c: c["dataset"].__setitem__("image_size", "28"), "dataset.image_size='28'"),
        (lambda c: c.__setitem__("seed", "${oc.env:HOME}"), "interpolations"),
        (lambda c: c.pop("dataset"), "has no dataset section"),
    ):
        crafted = _stored()
        edit(crafted)
        with pytest.raises(CheckpointError, match=needle.replace("(", r"\(").replace("[", r"\[")):
            registry.stored_config({"config": crafted}, path)


def test_unknown_model_settings_in_the_users_config_are_one_clear_error():
    cfg = compose_config("train", "model=capsnet", "+model.net.dgit_dim=4")
    with pytest.raises(ConfigError, match="has no setting 'dgit_dim'; its settings are: .*digit_dim"):
        registry.model(cfg)


def test_a_zero_sized_layer_is_refused():
    cfg = compose_config("train", "model=capsnet", "model.net.digit_dim=0")
    with pytest.raises(ConfigError, match=r"empty layer \(digit_caps.weight of shape \[1152, 8, 0\]\)"):
        registry.model(cfg)


def test_the_blank_forward_pass_leaves_the_rng_and_the_mode_alone():
    cfg = compose_config("train", "model=capsrbm")
    net = registry.model(cfg)
    net.train()
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    build.check_input(net, cfg)
    assert torch.equal(torch.rand(3), expected) and net.training


# --- resume settings and the lock --------------------------------------------------------------------


def test_resume_conflicts_name_each_differing_fixed_setting():
    saved = {"seed": 0, "model": {"net": {"a": 1, "b": [1, 2]}}, "trainer": {"batch_size": 8, "epochs": 3}}
    same = json.loads(json.dumps(saved))
    assert rundir.resume_conflicts(saved, same) == []
    other = json.loads(json.dumps(saved))
    other["trainer"]["epochs"] = 10  # may change: a longer run continues the schedule
    assert rundir.resume_conflicts(saved, other) == []
    other["seed"], other["model"]["net"]["b"], other["trainer"]["batch_size"] = 1, [1, 3], 16
    assert rundir.resume_conflicts(saved, other) == [
        ("seed", 0, 1),
        ("model.net.b", [1, 2], [1, 3]),
        ("trainer.batch_size", 8, 16),
    ]


def test_the_lock_refuses_a_second_holder(tmp_path):
    import subprocess
    import sys

    rundir.lock(tmp_path)
    rundir.lock(tmp_path)  # the same process again: it holds it already
    code = f"from capsrun import rundir; from pathlib import Path; rundir.lock(Path({str(tmp_path)!r}))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert other.returncode != 0 and "is in use by another capsrun process" in other.stderr, other.stderr


def test_clean_stale_removes_only_temporary_files(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    keep = [tmp_path / "metrics.json", tmp_path / "checkpoints" / "last.pt", tmp_path / "notes.tmp"]
    stale = [tmp_path / ".metrics.json.ab12.tmp", tmp_path / "checkpoints" / ".best.pt.cd34.tmp"]
    for p in keep + stale:
        p.write_bytes(b"x")
    assert rundir.clean_stale(tmp_path) == 2
    assert all(p.exists() for p in keep) and not any(p.exists() for p in stale)


# --- non-finite training, valid JSON -----------------------------------------------------------------


def test_save_json_writes_non_finite_numbers_as_null(tmp_path):
    path = tmp_path / "m.json"
    checkpoint.save_json(path, {"a": math.nan, "b": [1.0, math.inf], "c": {"d": -math.inf, "e": 2}})
    assert json.loads(path.read_text()) == {"a": None, "b": [1.0, None], "c": {"d": None, "e": 2}}


def test_the_watch_remembers_the_first_non_finite_step():
    watch = NonFiniteWatch(torch.device("cpu"))
    for step, loss in enumerate([1.0, 0.5, math.inf, math.nan, 0.1], start=1):
        watch.update(torch.tensor(loss), step)
    with pytest.raises(Diverged, match=r"became inf at step 3;.*optimizer.lr \(now 0.5\)"):
        watch.check(0.5)
    fine = NonFiniteWatch(torch.device("cpu"))
    fine.update(torch.tensor(1.0), 1)
    fine.check(0.1)  # finite: nothing raised


def test_finite_model():
    net = nn.Linear(2, 2)
    assert finite_model(net)
    with torch.no_grad():
        net.bias[0] = math.nan
    assert not finite_model(net)


def test_a_run_that_diverges_keeps_the_last_finite_checkpoints(tmp_path):
    run = toy_run(loss=PoisonedLoss(poison_at=6))  # 4 steps an epoch: NaN at step 6, in epoch 2
    with pytest.raises(Diverged, match="became nan at step 6"):
        fit(run, Loop(epochs=3, log_every=100, progress=False), tmp_path)
    for name in ("best.pt", "last.pt"):
        ckpt = torch.load(tmp_path / "checkpoints" / name, weights_only=True)
        assert ckpt["epoch"] == 1 and all(torch.isfinite(t).all() for t in ckpt["model"].values())
    assert json.loads((tmp_path / "metrics.json").read_text())["epoch"] == 1


def test_a_collapsed_classifier_is_a_warning(caplog):
    scores = torch.zeros(100, 10)
    scores[:, 3] = 1  # one class for every image
    result = EvalResult({}, torch.zeros(1), None, scores, None)
    with caplog.at_level(logging.WARNING, logger="capsrun"):
        warn_if_collapsed(result, {"test/accuracy": 10.0}, "test", 2)
    assert "predicts one class for 100% of the test images" in caplog.text
    caplog.clear()
    healthy = torch.eye(10).repeat(10, 1)
    with caplog.at_level(logging.WARNING, logger="capsrun"):
        warn_if_collapsed(EvalResult({}, torch.zeros(1), None, healthy, None), {"test/accuracy": 95.0}, "test", 2)
    assert caplog.text == ""


# --- CIFAR10's restricted unpickler ------------------------------------------------------------------


def test_the_cifar10_unpickler_reads_a_real_format_batch_and_refuses_anything_else(tmp_path):
    data = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072) % 251
    good = tmp_path / "data_batch_1"
    good.write_bytes(pickle.dumps({"data": data, "labels": [3, 7], "batch_label": "x", "filenames": ["a", "b"]}, 2))
    images, labels = cifar10.read_batch(good)
    assert images.shape == (2, 3, 32, 32) and labels.tolist() == [3, 7]
    assert torch.equal(images.flatten(1), torch.from_numpy(data))

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "touched",))

    bad = tmp_path / "data_batch_2"
    bad.write_bytes(pickle.dumps({"data": Exploit(), "labels": [0]}, 2))
    with pytest.raises(DatasetError, match="names .*getattr, which no CIFAR10 batch holds"):
        cifar10.read_batch(bad)
    assert not (tmp_path / "touched").exists()


def test_checkpoint_data_root_given_then_the_runs_own_then_dot_data(tmp_path):
    from omegaconf import OmegaConf

    stored = OmegaConf.create({"root": str(tmp_path), "download": True, "test_limit": None, "train_limit": 50})
    given = OmegaConf.create({"root": None, "download": False, "test_limit": 10})
    data = build.checkpoint_data(stored, given)
    assert data.root == str(tmp_path) and data.download is False and data.test_limit == 10 and data.train_limit == 50
    assert build.checkpoint_data(stored, OmegaConf.merge(given, {"root": "/elsewhere"})).root == "/elsewhere"
    gone = OmegaConf.merge(stored, {"root": str(tmp_path / "deleted")})
    assert build.checkpoint_data(gone, given).root == "./data"


def test_a_checkpoint_naming_a_moved_schedule_still_resumes_the_same_run():
    old = {"scheduler": {"_target_": "capsrun.train.exponential_decay", "decay_rate": 0.96}}
    new = {"scheduler": {"_target_": "capsrun.schedules.exponential_decay", "decay_rate": 0.96}}
    assert rundir.resume_conflicts(old, new) == []
    other = {"scheduler": {"_target_": "capsrun.schedules.linear_decay", "decay_rate": 0.96}}
    assert rundir.resume_conflicts(old, other)[0][0] == "scheduler._target_"


def test_a_checkpoint_from_before_trainer_average_resumes_only_without_averaging():
    old = {"seed": 0, "trainer": {"batch_size": 8}}  # written before trainer.average existed
    assert rundir.resume_conflicts(old, {"seed": 0, "trainer": {"batch_size": 8, "average": 0.0}}) == []
    assert rundir.resume_conflicts(old, {"seed": 0, "trainer": {"batch_size": 8, "average": 0.2}}) == [
        ("trainer.average", 0.0, 0.2)
    ]
    assert "average" not in old["trainer"]  # the caller's config is left as it was
