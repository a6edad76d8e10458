"""The one TensorBoard writer of a run. Tags are namespaced: ``train/loss/margin``,
``test/accuracy``, ``routing/digit_caps/coupling``; training means per epoch under
``train/epoch/...`` beside the per-interval ``train/...``.

HParams: the trial (its hyperparameters and the metrics it will log) is written when a run
starts and its end status when it ends, so TensorBoard's HParams tab has a row for running and
interrupted runs too. TensorBoard keeps the *first* record of each hparams tag in a run and
ticks the first five hyperparameters of the experiment after sorting those marked ``differs``
first, so the swept keys are marked ``differs`` and each record is written once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
from torch.utils.tensorboard import SummaryWriter

from capsrun.images import tile


@dataclass
class Trial:
    """One run as TensorBoard's HParams and Text tabs show it: ``name`` (the overrides),
    ``hparams`` (name -> value), ``swept`` (the names given on the command line: listed and ticked
    first), ``metrics`` (the scalar tags to show as columns), ``config`` (the run's whole config,
    every value resolved, the sizes set from the dataset filled in)."""

    name: str
    hparams: dict[str, Any]
    swept: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()
    config: dict[str, Any] | None = None
    start_time: float = field(default_factory=time.time)


def _hparam_value(value: Any) -> tuple[Any, int]:
    """A value TensorBoard can store and its data type (lists and None become strings)."""
    if isinstance(value, bool):
        return value, api_pb2.DATA_TYPE_BOOL
    if isinstance(value, (int, float)):
        return float(value), api_pb2.DATA_TYPE_FLOAT64
    return value if isinstance(value, str) else str(value), api_pb2.DATA_TYPE_STRING


def _plugin_summary(tag: str, **data) -> Summary:
    content = plugin_data_pb2.HParamsPluginData(version=metadata.PLUGIN_DATA_VERSION, **data)
    meta = SummaryMetadata(
        plugin_data=SummaryMetadata.PluginData(plugin_name=metadata.PLUGIN_NAME, content=content.SerializeToString())
    )
    return Summary(value=[Summary.Value(tag=tag, metadata=meta)])


def trial_summaries(trial: Trial) -> list[Summary]:
    """The experiment (hyperparameter and metric columns) and the session start of ``trial``."""
    start = plugin_data_pb2.SessionStartInfo(group_name=trial.name, start_time_secs=trial.start_time)
    infos = []
    order = [k for k in trial.swept if k in trial.hparams] + [k for k in trial.hparams if k not in trial.swept]
    for key in order:
        value, kind = _hparam_value(trial.hparams[key])
        if kind == api_pb2.DATA_TYPE_BOOL:
            start.hparams[key].bool_value = value
        elif kind == api_pb2.DATA_TYPE_FLOAT64:
            start.hparams[key].number_value = value
        else:
            start.hparams[key].string_value = value
        infos.append(api_pb2.HParamInfo(name=key, type=kind, differs=key in trial.swept))
    metrics = [api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag), display_name=tag) for tag in trial.metrics]
    experiment = api_pb2.Experiment(hparam_infos=infos, metric_infos=metrics, time_created_secs=trial.start_time)
    return [
        _plugin_summary(metadata.EXPERIMENT_TAG, experiment=experiment),
        _plugin_summary(metadata.SESSION_START_INFO_TAG, session_start_info=start),
    ]


def end_summary(status: str) -> Summary:
    """The session end: ``status`` is ``"success"``, ``"failure"`` or ``"aborted"``."""
    end = plugin_data_pb2.SessionEndInfo(
        status=api_pb2.Status.Value(f"STATUS_{status.upper()}"), end_time_secs=time.time()
    )
    return _plugin_summary(metadata.SESSION_END_INFO_TAG, session_end_info=end)


def loss_layout(splits: tuple[str, ...], monitor: str) -> dict:
    """Custom scalars (``SummaryWriter.add_custom_scalars``): the training loss (per epoch and per
    interval) and every evaluated split's on one chart; the selection metric of each on another."""
    tags = "|".join(["train/epoch", "train", *splits])
    return {
        "capsrun": {
            "loss: train and test": ["Multiline", [rf"^({tags})/loss/total$"]],
            f"{monitor}: every split": ["Multiline", [rf"^({tags}|best/\w+)/{monitor}$"]],
        }
    }


def two_colour_overlay(images: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    """The input in dim grey with reconstruction 1 in red and reconstruction 2 in green over it, as
    in Fig. 5 of arXiv:1710.09829. ``images`` ``[n, 1, H, W]``, ``reconstructions``
    ``[n, 2, 1, H, W]`` -> RGB ``[n, 3, H, W]`` in [0, 1]."""
    grey = 0.35 * images
    red, green = reconstructions[:, 0], reconstructions[:, 1]
    return torch.cat([grey + red, grey + green, grey], dim=1).clamp(0, 1)


def captioned(grid: torch.Tensor, true: list[int], predicted: list[int], cell: int) -> torch.Tensor:
    """``grid`` ``[3, H, W]`` with two text rows below it: under each column the true class and,
    below that, the predicted one, red where it is wrong. ``cell``: a column's width in pixels."""
    from PIL import Image, ImageDraw

    _, height, width = grid.shape
    strip = Image.new("RGB", (width, 24), (40, 40, 40))
    draw = ImageDraw.Draw(strip)
    for i, (t, p) in enumerate(zip(true, predicted)):
        x = 2 + i * cell + max(cell - 6 * len(str(t)), 0) // 2 - 1
        draw.text((x, 1), str(t), fill=(255, 255, 255))
        draw.text((x, 12), str(p), fill=(255, 255, 255) if p == t else (255, 70, 70))
    text = torch.from_numpy(np.asarray(strip).copy()).permute(2, 0, 1).float() / 255
    return torch.cat([grid.float(), text], dim=1)


# counters and settings a run logs to be read, not compared (where the run stands, the schedule's
# lr, how many steps the weight average holds): TensorBoard orders tag groups by name, so under
# a group that sorts after every result group (best, health, routing, samples, test, time, train,
# val). metrics.json keeps their plain names.
BOOKKEEPING_GROUP = "zz_bookkeeping"
BOOKKEEPING = {"epoch": "epoch", "lr": "lr", "average/steps": "average_steps"}


def tb_tag(key: str) -> str:
    """The TensorBoard tag of a metric: itself, or ``zz_bookkeeping/<name>`` (:data:`BOOKKEEPING`)."""
    return f"{BOOKKEEPING_GROUP}/{BOOKKEEPING[key]}" if key in BOOKKEEPING else key


class TBLogger:
    def __init__(self, log_dir: Path, purge_step: int | None = None):
        # purge_step drops events a killed run wrote after its last checkpoint
        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)

    def scalars(self, metrics: dict[str, Any], step: int) -> None:
        """Each number of ``metrics`` under its tag (:func:`tb_tag`); lists (a confusion
        matrix in metrics.json) are not scalars and are left to :meth:`image`."""
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(tb_tag(key), value, step)

    def config(self, config: dict[str, Any]) -> None:
        """The run's config, as YAML, in the Text tab."""
        text = yaml.safe_dump(config, sort_keys=False)
        # four-space indent: a Markdown code block in TensorBoard's text tab
        self.writer.add_text("config", "\n".join("    " + line for line in text.splitlines()), 0)

    def evaluation(self, result, step: int) -> None:
        """Inputs above their reconstructions (with the true and predicted class under each
        column, for one object per image), capsule lengths and routing couplings."""
        if result.reconstructions is not None:
            images, recon = result.images, result.reconstructions.to(result.images.dtype)
            if recon.dim() == 5:  # two objects per image (MultiMNIST): Fig. 5's colours
                recon = two_colour_overlay(images, recon)
                images = images.expand(-1, 3, -1, -1)
            grid = tile(torch.cat([images, recon]), nrow=images.shape[0])
            if result.labels is not None and result.labels.dim() == 1 and result.scores is not None:
                predicted = result.scores[: len(result.labels)].argmax(-1)
                grid = captioned(grid, result.labels.tolist(), predicted.tolist(), images.shape[-1] + 2)
            self.writer.add_image("test/reconstructions", grid, step)
        self.per_class(result.per_class, "test", step)
        if result.coupling is not None:  # a capsule model: scores are capsule lengths (-KL for vcaps)
            self.writer.add_histogram("test/digit_caps/length", result.scores, step)
            self.writer.add_histogram("routing/digit_caps/coupling", result.coupling, step)

    def per_class(self, per_class: dict[str, list], prefix: str, step: int) -> None:
        """A classifier's per-class results (:class:`capsrun.metrics.Confusion`): each class's
        accuracy as ``<prefix>_per_class/accuracy/<k>`` (a group after ``<prefix>``'s own, whose
        charts come first) and the picture of the matrix as
        ``<prefix>/confusion`` (:func:`capsrun.plots.per_class_image`)."""
        from capsrun.plots import per_class_image

        for k, value in enumerate(per_class.get(f"{prefix}/class_accuracy") or []):
            if value is not None:
                self.writer.add_scalar(f"{prefix}_per_class/accuracy/{k}", value, step)
        image = per_class_image(per_class, prefix, f"step {step}")
        if image is not None:
            self.image(f"{prefix}/confusion", image, step)

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        """One image ``[C, H, W]`` in [0, 1], e.g. a grid of samples."""
        self.writer.add_image(tag, image.float().clamp(0, 1), step)

    def histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        self.writer.add_histogram(tag, values.float(), step)

    def health(self, health, step: int) -> None:
        """A :class:`capsrun.diagnostics.Health` under ``health/``."""
        self.scalars({f"health/{k}": v for k, v in health.scalars.items()}, step)
        for tag, values in health.histograms.items():
            self.histogram(f"health/{tag}", values, step)
        for tag, image in health.images.items():
            self.image(f"health/{tag}", image, step)

    def start(self, trial: Trial, layout: dict | None = None) -> None:
        """What a fresh run writes first: its HParams row and the custom-scalars layout."""
        for summary in trial_summaries(trial):
            self.writer.file_writer.add_summary(summary)
        if layout is not None:
            self.writer.add_custom_scalars(layout)

    def end(self, status: str) -> None:
        """The run's HParams status (:func:`end_summary`), once, when it has ended for good."""
        self.writer.file_writer.add_summary(end_summary(status))

    def flush(self) -> None:
        """Put every event so far on disk (before a checkpoint records them as written)."""
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
