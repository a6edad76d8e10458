"""Weight averaging (``trainer.average``): the running mean against means computed by hand, the
swap in and out, and a training run whose evaluation, best.pt and last.pt hold what they say."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from capsrun import averaging, checkpoint, registry
from capsrun.errors import CheckpointError
from capsrun.train import Loop, evaluate, fit
from helpers import PoisonedLoss, Toy, toy_run


def test_the_average_is_the_mean_of_the_steps_after_the_start():
    net = nn.Linear(2, 1)
    average = averaging.WeightAverage(net, start_step=2)
    seen = []
    for step, value in enumerate([1.0, 2.0, 4.0, 8.0, 16.0], start=1):
        with torch.no_grad():
            net.weight.fill_(value)
            net.bias.fill_(-value)
        average.update(net, step)
        seen.append(value)
    assert average.steps == 3  # steps 3, 4, 5
    torch.testing.assert_close(average.params["weight"], torch.full((1, 2), (4 + 8 + 16) / 3))
    torch.testing.assert_close(average.params["bias"], torch.full((1,), -(4 + 8 + 16) / 3))


def test_applied_swaps_the_mean_in_and_the_own_weights_back_bit_for_bit():
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    own = {k: v.clone() for k, v in net.state_dict().items()}
    average = averaging.WeightAverage(net, start_step=0)
    with average.applied(net) as active:  # nothing averaged yet: the model as it is
        assert not active and torch.equal(net.weight, own["weight"])
    average.update(net, 1)
    with torch.no_grad():
        net.weight.mul_(3.0)
    average.update(net, 2)
    moved = {k: v.clone() for k, v in net.state_dict().items()}
    with average.applied(net) as active:
        assert active
        torch.testing.assert_close(net.weight, 2.0 * own["weight"])  # (w + 3 w) / 2
        torch.testing.assert_close(net.bias, own["bias"])
    for key, value in moved.items():
        assert torch.equal(net.state_dict()[key], value), key


@pytest.mark.parametrize("fraction, total, start", [(0.0, 100, None), (0.25, 100, 75), (0.001, 100, 99), (0.5, 7, 3)])
def test_start_step_averages_the_last_fraction_and_at_least_one_step(fraction, total, start):
    assert averaging.start_step(fraction, total) == start


class _Record:
    """A step hook that keeps the weights after every optimizer step."""

    every_steps = 1

    def __init__(self):
        self.weights: list[dict[str, torch.Tensor]] = []

    def __call__(self, model, step):
        self.weights.append({k: v.detach().clone() for k, v in model.named_parameters()})
        return {}


def test_a_run_with_averaging_evaluates_and_keeps_the_mean_of_its_last_steps(tmp_path, monkeypatch):
    monkeypatch.setattr("capsrun.tblog.TBLogger.health", lambda self, health, step: None)
    run = toy_run(lr=5.0, average=0.5)  # 3 epochs of 4 steps: the mean of steps 7-12
    record = _Record()
    run.step_hooks = [record]
    metrics = fit(run, Loop(epochs=3, log_every=100, progress=False), tmp_path)
    mean = {k: torch.stack([w[k] for w in record.weights[6:]]).mean(0) for k in record.weights[0]}
    last = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert last["average"]["steps"] == 6
    for key, value in mean.items():
        torch.testing.assert_close(last["average"]["params"][key], value)
        assert torch.equal(last["model"][key], record.weights[-1][key])  # resume needs the own weights
    # the metrics of the last epoch are the mean's, not the last weights'
    model = Toy()
    model.load_state_dict(mean)
    expected = evaluate(model, PoisonedLoss(), run.eval_loaders["test"], progress=False).metrics
    assert metrics["test/accuracy"] == pytest.approx(expected["test/accuracy"])
    assert metrics["test/loss/total"] == pytest.approx(expected["test/loss/total"], rel=1e-5)
    model.load_state_dict(record.weights[-1])
    own = evaluate(model, PoisonedLoss(), run.eval_loaders["test"], progress=False).metrics
    assert own["test/loss/total"] != pytest.approx(expected["test/loss/total"], rel=1e-3)  # the two differ here
    assert metrics["average/steps"] == 6
    assert json.loads((tmp_path / "metrics.json").read_text())["average/steps"] == 6


def test_eval_and_sample_read_the_mean_from_last_pt(tmp_path):
    """``registry.from_checkpoint`` (eval, sample, analyze) gives the mean weights of a last.pt that
    holds them, and refuses averaged weights that are not the model's."""
    torch.manual_seed(0)
    cfg = {
        "model": {"name": "rbm", "net": {"in_channels": 1, "image_size": 4, "num_classes": 10, "hidden": 3}},
        "dataset": {"name": "mnist", "channels": 1, "image_size": 4, "num_classes": 10},
        "data": {"root": str(tmp_path)},
        "trainer": {},
    }
    cfg["model"]["loss"] = {"_target_": "capsrun.models.energy.RBMLoss"}
    cfg["model"]["net"]["_target_"] = "capsrun.models.rbm.RBM"
    net = registry.model(OmegaConf.create(cfg))
    mean = {name: torch.full_like(p, 0.25) for name, p in net.named_parameters()}
    path = tmp_path / "last.pt"

    def save(params):
        average = {"start_step": 4, "steps": 3, "params": params}
        checkpoint.save(path, {"model": net.state_dict(), "config": cfg, "epoch": 2, "average": average})

    save(mean)
    loaded, _, _ = registry.from_checkpoint(path, torch.device("cpu"))
    for name, p in loaded.named_parameters():
        assert torch.equal(p, mean[name]), name
    save({"evil": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="averaged weights name parameters its model lacks"):
        registry.from_checkpoint(path, torch.device("cpu"))


def test_a_resume_refuses_a_crafted_weight_average_in_one_line(tmp_path):
    """A last.pt whose ``average`` entry is not the model's mean: a CheckpointError, no traceback."""
    fit(toy_run(lr=5.0, average=0.5), Loop(epochs=3, log_every=100, progress=False), tmp_path / "run")
    good = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    crafted = {
        "unknown names": {**good["average"], "params": {"evil": torch.zeros(1)}},
        "a wrong shape": {**good["average"], "params": {k: torch.zeros(7) for k in good["average"]["params"]}},
        "counts not numbers": {**good["average"], "steps": "six"},
        "not a mapping": "mean",
    }
    for what, average in crafted.items():
        path = tmp_path / "crafted.pt"
        checkpoint.save(path, {**good, "average": average})
        with pytest.raises(CheckpointError, match="does not fit the configured model") as caught:
            fit(toy_run(average=0.5), Loop(epochs=4, log_every=100, progress=False), tmp_path / what, resume_from=path)
        assert "weight average" in str(caught.value) and "\n" not in str(caught.value), what


def test_best_pt_is_the_mean_once_it_has_begun_whatever_the_metric_says(tmp_path, monkeypatch):
    """The selection metric never improves after epoch 1 here; best.pt is still the mean of the
    last epochs, the run's result, not epoch 1's weights."""
    monkeypatch.setattr("capsrun.train.improved", lambda score, best, first: first)
    run = toy_run(lr=5.0, average=0.5)
    record = _Record()
    run.step_hooks = [record]
    monkeypatch.setattr("capsrun.tblog.TBLogger.health", lambda self, health, step: None)
    fit(run, Loop(epochs=3, log_every=100, progress=False), tmp_path)
    best = torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=True)
    assert best["epoch"] == 3 and best["averaged_steps"] == 6
    for key in record.weights[0]:
        torch.testing.assert_close(best["model"][key], torch.stack([w[key] for w in record.weights[6:]]).mean(0))
