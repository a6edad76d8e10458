"""What a run writes for TensorBoard, read back with TensorBoard's own reader: per-epoch training
scalars, the HParams records (written at the start, with an end status), the custom-scalars
layout and the config text. A toy model through the real ``fit``."""

from __future__ import annotations

import re

import pytest
import torch
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.custom_scalar import metadata as cs_metadata
from tensorboard.plugins.hparams import api_pb2, backend_context, plugin_data_pb2

from capsrun.tblog import Trial, trial_summaries
from capsrun.train import Diverged, Interrupted, Loop, fit
from helpers import PoisonedLoss, toy_run

TRIAL = Trial(
    name="routing.iterations=3 (sweep/1)",
    hparams={"trainer.epochs": 2, "routing.iterations": 3, "model": "toy", "zeta": [1, 2], "amp": False},
    swept=("routing.iterations",),
    config={"model": {"net": {"in_channels": 1}}},
)


def _fit(run_dir, epochs=2, loss=None, **kw):
    run = toy_run(loss=loss, config={"stored": True}, trial=TRIAL)
    return fit(run, Loop(epochs=epochs, log_every=100, progress=False), run_dir, **kw)


def _events(run_dir):
    ea = event_accumulator.EventAccumulator(str(run_dir), size_guidance={event_accumulator.SCALARS: 0})
    ea.Reload()
    return ea


def _hparams(ea) -> dict[str, plugin_data_pb2.HParamsPluginData]:
    return {tag: plugin_data_pb2.HParamsPluginData.FromString(c) for tag, c in ea.PluginTagToContent("hparams").items()}


def test_a_run_shorter_than_log_every_has_a_training_curve_per_epoch(tmp_path):
    metrics = _fit(tmp_path)  # 4 steps an epoch, log_every 100: no interval point at all
    ea = _events(tmp_path)
    assert "train/loss/total" not in ea.Tags()["scalars"]
    points = ea.Scalars("train/epoch/loss/total")
    assert [p.step for p in points] == [4, 8]
    assert points[-1].value == pytest.approx(metrics["train/loss/total"], rel=1e-6)
    assert [p.step for p in ea.Scalars("train/epoch/accuracy")] == [4, 8]


def test_hparams_records_name_the_trial_list_the_swept_key_first_and_end_in_success(tmp_path):
    _fit(tmp_path)
    records = _hparams(_events(tmp_path))
    experiment = records["_hparams_/experiment"].experiment
    assert [(h.name, h.differs) for h in experiment.hparam_infos][:2] == [
        ("routing.iterations", True),
        ("trainer.epochs", False),
    ]
    types = {h.name: h.type for h in experiment.hparam_infos}
    assert types["zeta"] == api_pb2.DATA_TYPE_STRING and types["amp"] == api_pb2.DATA_TYPE_BOOL
    declared = [m.name.tag for m in experiment.metric_infos]
    assert declared == ["test/accuracy", "best/test/accuracy", "test/error", "test/loss/total"]
    start = records["_hparams_/session_start_info"].session_start_info
    assert start.group_name == "routing.iterations=3 (sweep/1)"
    assert start.hparams["routing.iterations"].number_value == 3 and start.hparams["zeta"].string_value == "[1, 2]"
    assert records["_hparams_/session_end_info"].session_end_info.status == api_pb2.STATUS_SUCCESS


def test_tensorboard_ticks_the_swept_key_among_many_overrides():
    """TensorBoard's own ordering (sort, then the first five hyperparameters are shown) keeps
    the swept key however many other overrides sort before it by name."""
    hparams = {f"a{i}.setting": i for i in range(8)} | {"z.swept": 1}
    experiment_summary, _ = trial_summaries(Trial("t", hparams, swept=("z.swept",)))
    content = experiment_summary.value[0].metadata.plugin_data.content
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content).experiment
    backend_context._sort_and_reduce_to_hparams_limit(experiment, 5)
    assert experiment.hparam_infos[0].name == "z.swept"


def test_a_diverged_run_ends_in_failure(tmp_path):
    with pytest.raises(Diverged):
        _fit(tmp_path, epochs=3, loss=PoisonedLoss(poison_at=6))
    records = _hparams(_events(tmp_path))
    assert records["_hparams_/session_end_info"].session_end_info.status == api_pb2.STATUS_FAILURE


def test_an_interrupted_run_has_a_row_without_status_and_its_resume_ends_in_success(tmp_path):
    calls = iter(range(1000))
    with pytest.raises(Interrupted):
        _fit(tmp_path, should_stop=lambda: next(calls) == 5)  # in epoch 2
    records = _hparams(_events(tmp_path))
    assert "_hparams_/session_start_info" in records and "_hparams_/session_end_info" not in records
    _fit(tmp_path, resume_from=tmp_path / "checkpoints" / "last.pt")
    records = _hparams(_events(tmp_path))
    assert records["_hparams_/session_end_info"].session_end_info.status == api_pb2.STATUS_SUCCESS
    assert records["_hparams_/session_start_info"].session_start_info.group_name == TRIAL.name


def test_custom_scalars_put_train_and_test_loss_on_one_chart_and_the_text_is_the_shown_config(tmp_path):
    _fit(tmp_path)
    ea = _events(tmp_path)
    layout = layout_pb2.Layout.FromString(ea.Tensors(cs_metadata.CONFIG_SUMMARY_TAG)[0].tensor_proto.string_val[0])
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    (pattern,) = charts["loss: train and test"]
    tags = ea.Tags()["scalars"]
    assert sorted(t for t in tags if re.match(pattern, t)) == ["test/loss/total", "train/epoch/loss/total"]
    (score,) = charts["accuracy: every split"]
    assert sorted(t for t in tags if re.match(score, t)) == [
        "best/test/accuracy",
        "test/accuracy",
        "train/epoch/accuracy",
    ]
    text = ea.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "in_channels: 1" in text and "stored" not in text


@pytest.mark.parametrize("model", ["vcaps", "baseline_cnn", "rbm", "capsrbm", "deep_capsnet"])
def test_the_shown_config_fills_every_size_set_in_code(model):
    from capsrun import build
    from helpers import compose_config

    cfg = compose_config("train", f"model={model}", "scheduler=linear", "dataset=cifar10")
    shown = build.shown_config(cfg, total_steps=1234)
    assert "???" not in repr(shown)
    assert shown["scheduler"]["total_steps"] == 1234
    net = shown["model"]["net"]
    if "in_channels" in net:
        assert net["in_channels"] == 3
    assert "hydra" not in shown


def test_reconstructions_are_captioned_with_true_and_predicted_class_red_where_wrong():
    from capsrun.tblog import captioned

    grid = torch.zeros(3, 62, 4 * 30 + 2)
    out = captioned(grid, [0, 1, 2, 3], [0, 1, 7, 3], cell=30)
    assert out.shape == (3, 62 + 24, 122) and torch.equal(out[:, :62], grid)
    predicted_row = out[:, 62 + 12 :]
    red = (predicted_row[0] > 0.9) & (predicted_row[1] < 0.5)  # [rows, width]
    columns = {int(c) // 30 for c in red.nonzero()[:, 1]}
    assert columns == {2}  # only the wrong prediction is red
    true_row = out[:, 62 : 62 + 12]
    for col in range(4):  # every column has its true class written (white pixels)
        assert (true_row[:, :, col * 30 : (col + 1) * 30].min(0).values > 0.9).any()


def test_a_checkpoint_from_before_the_best_score_rename_resumes(tmp_path):
    calls = iter(range(1000))
    with pytest.raises(Interrupted):
        _fit(tmp_path, should_stop=lambda: next(calls) == 5)
    last = tmp_path / "checkpoints" / "last.pt"
    ckpt = torch.load(last, weights_only=True)
    ckpt["state"]["best_accuracy"] = ckpt["state"].pop("best_score")  # as older capsrun wrote it,
    ckpt.pop("digest")  # with no digest
    torch.save(ckpt, last)
    metrics = _fit(tmp_path, resume_from=last)
    reference = _fit(tmp_path / "uninterrupted")
    assert metrics["best/test/accuracy"] == reference["best/test/accuracy"] and metrics["epoch"] == 2
