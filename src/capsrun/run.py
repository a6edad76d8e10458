"""What a training run is: :class:`Run`, assembled once by :func:`capsrun.build.run`;
:class:`Loop`, how :func:`capsrun.train.fit` runs it; :class:`EvalResult`, what an evaluation
returns. Data only: the loop, its monitors and its checkpoints all read these."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from capsrun import distributed
from capsrun.averaging import WeightAverage
from capsrun.tblog import Trial


@dataclass
class EvalResult:
    metrics: dict[str, float]
    images: torch.Tensor  # first test inputs [n, C, H, W]
    reconstructions: torch.Tensor | None
    scores: torch.Tensor | None  # [N, classes]: capsule lengths for capsule models; None without labels
    coupling: torch.Tensor | None  # couplings of the first batch's first examples [n, in_caps, classes]
    labels: torch.Tensor | None = None  # the first test labels [n] ([n, 2] for two objects)
    per_class: dict[str, list] = field(default_factory=dict)  # capsrun.metrics.Confusion's lists


@dataclass
class Run:
    """One training run, assembled once (:func:`capsrun.build.run`): what :func:`fit` trains.

    ``optimizers``: see :func:`train_one_epoch`. ``train_model``: what the training step calls
    (``model``, or a DistributedDataParallel or :class:`capsrun.speed.Compiled` wrapper of it);
    ``eval_model``: what evaluation calls (``model`` or a compiled one). ``train_loader`` and
    ``eval_loaders`` are this rank's shards. ``epoch_hooks``: called after each evaluation as
    ``hook(model, epoch, last)``; each returns scalars (merged into the metrics) and images
    (``{tag: [C, H, W]}`` under the key ``"images"``) to log, e.g. sample quality.
    ``step_hooks``: called as ``hook(model, step)`` after every ``hook.every_steps``-th optimizer
    step, while that step's gradients are still there; each returns a
    :class:`capsrun.diagnostics.Health`, logged under ``health/`` (capsule health). ``config``:
    what the checkpoints keep; ``trial``: what TensorBoard shows of the run. ``average``: the
    weights' running mean over the last steps (``trainer.average``); once it has begun,
    evaluation and the epoch hooks see the mean, not the last weights, and best.pt is the mean
    after every epoch (the best-checkpoint rule no longer picks)."""

    model: nn.Module
    objective: nn.Module
    train_loader: Any
    eval_loaders: dict
    optimizers: Sequence[torch.optim.Optimizer]
    scheduler: Any
    config: dict[str, Any]
    trial: Trial
    train_model: nn.Module | None = None
    eval_model: Any = None
    precision: str = "fp32"
    channels_last: bool = False
    compile_mode: str | None = None
    world: distributed.World = distributed.SINGLE
    epoch_hooks: Sequence[Callable[[nn.Module, int, bool], dict[str, Any]]] = ()
    step_hooks: Sequence[Any] = ()
    loaders: Any = None  # the whole splits (datasets.Loaders), for what is built beside the run
    average: WeightAverage | None = None


@dataclass(frozen=True)
class Loop:
    """How :func:`fit` runs: ``epochs``, a training log every ``log_every`` steps,
    ``num_images`` reconstructions in TensorBoard, a ``progress`` bar."""

    epochs: int
    log_every: int = 50
    num_images: int = 8
    progress: bool = True
