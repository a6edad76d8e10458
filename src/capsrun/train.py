"""The training loop as plain functions: ``train_one_epoch``, ``evaluate`` and ``fit``.

Metrics are summed on the device and read once per log interval or epoch, so the loop never
forces a host-device sync per step. ``fit`` writes TensorBoard through one :class:`TBLogger`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from capsrun import checkpoint, distributed, speed
from capsrun.averaging import WeightAverage
from capsrun.batch import aligned_top, unpack
from capsrun.datasets import BatchLoader
from capsrun.errors import CapsrunError, CheckpointError
from capsrun.metrics import Meter, correct
from capsrun.tblog import TBLogger, Trial, loss_layout

log = logging.getLogger("capsrun")


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint."""

    epoch: int = 0  # completed epochs
    batch: int = 0  # batches done in the current epoch (non-zero only after an interrupt)
    step: int = 0  # optimizer steps so far
    best_score: float = -1.0  # the best selection score so far (higher is better: an accuracy, or minus a loss)
    last_metrics: dict[str, float] = field(default_factory=dict)


class Interrupted(Exception):
    """Training stopped on request (SIGINT/SIGTERM) after saving ``last.pt``."""


class Diverged(CapsrunError):
    """The loss or the weights became NaN or infinite; nothing non-finite was saved."""


def finite_model(model: nn.Module) -> bool:
    """Whether every parameter and floating buffer of ``model`` is finite (one host sync)."""
    tensors = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()) if tensors else True


class NonFiniteWatch:
    """Remembers, on the device, the first step whose total loss was NaN or infinite and that loss,
    without a host sync per step; :meth:`check` reads it (at log intervals and epoch ends) and
    raises :class:`Diverged` with the step, the loss and the fix."""

    def __init__(self, device: torch.device):
        self.step = torch.full((), -1, dtype=torch.long, device=device)
        self.loss = torch.zeros((), device=device)

    def update(self, total: torch.Tensor, step: int) -> None:
        bad = ~torch.isfinite(total.detach().float()) & (self.step < 0)
        self.step = torch.where(bad, torch.full_like(self.step, step), self.step)
        self.loss = torch.where(bad, total.detach().float(), self.loss)

    def check(self, lr: float) -> None:
        step = int(self.step)
        if step >= 0:
            raise Diverged(
                f"the training loss became {float(self.loss)} at step {step}; nothing non-finite was saved "
                f"(last.pt holds the last finite epoch); try a lower optimizer.lr (now {lr:g}) or "
                "trainer.precision=fp32"
            )


def train_one_epoch(
    model: nn.Module,
    objective: nn.Module,
    loader: BatchLoader,
    optimizers: Sequence[torch.optim.Optimizer],
    scheduler,
    state: TrainState,
    meters: list[Meter],
    on_step: Callable[[], bool],
    bar: tqdm | None = None,
    sync_grads: Callable[[], None] | None = None,
    precision: str = "fp32",
    watch: NonFiniteWatch | None = None,
) -> bool:
    """Train from ``state.batch`` to the end of epoch ``state.epoch``; ``on_step`` runs after
    every step and returns True to stop early. Returns whether the epoch was completed.

    ``optimizers``: the model's, then any the objective's own parameters need (a discriminator);
    one backward pass of ``total`` feeds them all, ``scheduler`` sets the first one's lr.
    ``sync_grads`` runs between backward and the optimizer steps (averaging the gradients of
    parameters that DistributedDataParallel does not own, across ranks). ``precision``: see
    :mod:`capsrun.speed` (the forward pass and the losses run under its autocast). ``watch``: a
    :class:`NonFiniteWatch` that each step's total loss is shown to."""
    model.train()
    for batch in loader.epoch(state.epoch, start=state.batch):
        x, y, target = unpack(batch)
        with speed.autocast(x.device, precision):
            out = model(x, y)
            losses = objective(out, target, y)
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        if watch is not None:
            watch.update(losses["total"], state.step + 1)
        losses["total"].backward()
        if sync_grads is not None:
            sync_grads()
        for optimizer in optimizers:
            optimizer.step()
        scheduler.step()
        scores = getattr(out, "scores", None)  # None: a model without labels (the capsule RBM)
        right = None if scores is None else correct(scores, y)
        for meter in meters:
            meter.update(losses, right, len(y))
        state.batch += 1
        state.step += 1
        if bar is not None:
            bar.update(1)
        if on_step():
            return False
    return True


@dataclass
class EvalResult:
    metrics: dict[str, float]
    images: torch.Tensor  # first test inputs [n, C, H, W]
    reconstructions: torch.Tensor | None
    scores: torch.Tensor | None  # [N, classes]: capsule lengths for capsule models; None without labels
    coupling: torch.Tensor | None  # couplings of the first batch's first examples [n, in_caps, classes]
    labels: torch.Tensor | None = None  # the first test labels [n] ([n, 2] for two objects)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    objective: nn.Module,
    loader,
    num_images: int = 8,
    progress: bool = True,
    prefix: str = "test",
    precision: str = "fp32",
) -> EvalResult:
    """Metrics ``<prefix>/...`` with the decoder masked to the predicted classes, as at test time
    in the paper. ``model`` may be a :class:`capsrun.speed.Compiled` wrapper."""
    model.eval()
    meter, scores, first = Meter(), [], None
    batches = tqdm(loader.epoch(0), total=len(loader), desc=prefix, disable=None if progress else True, leave=False)
    for batch in batches:
        x, y, target = unpack(batch)
        with speed.autocast(x.device, precision):
            out = model(x)
            if y.dim() == 2 and getattr(out, "reconstruction", None) is not None:
                out = out._replace(reconstruction=model.reconstruct(out.digit_caps, aligned_top(out.scores, y)))
            losses = objective(out, target, y)
        batch_scores = getattr(out, "scores", None)
        meter.update(losses, None if batch_scores is None else correct(batch_scores, y), len(y))
        if batch_scores is not None:
            scores.append(batch_scores)
        if first is None:
            reconstruction = getattr(out, "reconstruction", None)
            coupling = getattr(out, "coupling", None)
            first = (
                x[:num_images],
                None if reconstruction is None else reconstruction[:num_images],
                None if coupling is None else coupling[:32].float().cpu(),
                y[:num_images].cpu(),
            )
    metrics = meter.compute(prefix)
    if f"{prefix}/accuracy" in metrics:
        metrics[f"{prefix}/error"] = 100.0 - metrics[f"{prefix}/accuracy"]
    images, reconstructions, coupling, labels = first
    return EvalResult(
        metrics,
        images.float().cpu(),
        None if reconstructions is None else reconstructions.float().cpu(),
        torch.cat(scores).float().cpu() if scores else None,
        coupling,
        labels,
    )


@torch.no_grad()
def evaluate_ensemble(models: list[nn.Module], loader, prefix: str = "test") -> dict[str, float]:
    """Accuracy of an ensemble that sums the members' class scores (for CapsNets the capsule
    lengths) and takes the largest, as for the 7-model CIFAR10 result of arXiv:1710.09829 Sec. 7."""
    for model in models:
        model.eval()
    right, n = 0, 0
    for batch in loader.epoch(0):
        x, y, _ = unpack(batch)
        scores = sum(model(x).scores.float() for model in models)
        right += int(correct(scores, y))
        n += len(y)
    accuracy = 100.0 * right / n
    return {f"{prefix}/accuracy": accuracy, f"{prefix}/error": 100.0 - accuracy}


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def restore(
    path: Path, model, objective, optimizers, scheduler, meters: list[Meter], device, average: WeightAverage | None
) -> TrainState:
    """Load a checkpoint into the objects and return the state to continue from."""
    ckpt = checkpoint.load(path, map_location=device)
    if "optimizer" not in ckpt:
        raise CheckpointError(
            f"{path} holds the weights only (a best.pt, for eval and sample); resume from the run's checkpoints/last.pt"
        )
    try:
        model.load_state_dict(ckpt["model"])
        objective.load_state_dict(ckpt.get("objective", {}))
        optimizers[0].load_state_dict(ckpt["optimizer"])
        extra = ckpt.get("objective_optimizers", [])
        if len(extra) != len(optimizers) - 1:
            raise ValueError(f"the checkpoint has {len(extra)} objective optimizers, the config {len(optimizers) - 1}")
        for optimizer, saved in zip(optimizers[1:], extra):
            optimizer.load_state_dict(saved)
        scheduler.load_state_dict(ckpt["scheduler"])
        if average is not None and "average" in ckpt:
            average.load_state_dict(ckpt["average"])
    except (RuntimeError, KeyError, ValueError) as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(
            f"{path} does not fit the configured model ({first[:200]}); resume with the config it was "
            "trained with, or start over with trainer.resume=never"
        ) from None
    for meter, s in zip(meters, ckpt["meters"]):
        meter.load_state_dict(s, device)
    _set_rng_state(ckpt["rng"])
    saved = dict(ckpt["state"])
    if "best_accuracy" in saved:  # what checkpoints written before the rename call the best score
        saved["best_score"] = saved.pop("best_accuracy")
    return TrainState(**saved)


class _NoLog:
    """The TensorBoard writer of ranks other than 0: they write nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def duration(seconds: float) -> str:
    """``seconds`` as people say it: ``45 s``, ``12 min``, ``3 h 20 min``, ``2.5 days``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        hours, minutes = divmod(round(seconds / 60), 60)
        return f"{hours} h {minutes:02d} min"
    return f"{seconds / 86400:.1f} days"


class RunClock:
    """Says once how long the rest of the run will take, from the first timed steps: the first
    ``skip`` steps (warm-up, compilation) are not timed, then steps are timed until
    ``min_seconds`` have passed or ``max_steps`` were made. One device sync, at that point."""

    def __init__(
        self,
        remaining_steps: int,
        batch_size: float,
        device: torch.device,
        skip: int = 2,
        min_seconds: float = 5.0,
        max_steps: int = 50,
    ):
        self.remaining, self.batch_size, self.device = remaining_steps, batch_size, device
        self.skip, self.min_seconds, self.max_steps = skip, min_seconds, max_steps
        self.steps, self.t0, self.said = 0, 0.0, remaining_steps <= skip

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def step(self) -> str | None:
        """Call after every optimizer step; returns the estimate once, when it is made."""
        if self.said:
            return None
        self.steps += 1
        if self.steps == self.skip:
            self.t0 = self._now()
            return None
        timed = self.steps - self.skip
        if timed <= 0 or (timed < self.max_steps and time.perf_counter() - self.t0 < self.min_seconds):
            return None
        per_step = (self._now() - self.t0) / timed
        self.said = True
        left = self.remaining - self.steps
        return (
            f"timed {timed} steps: {per_step:.3g} s a step ({self.batch_size / per_step:,.0f} images/s); "
            f"the remaining {left:,} steps take about {duration(left * per_step)}, plus evaluation after each epoch"
        )


def _grad_averager(objective: nn.Module) -> Callable[[], None] | None:
    """Average across ranks the gradients of the objective's own parameters (the VCaps
    discriminator), which DistributedDataParallel on the model does not see."""
    params = [p for p in objective.parameters() if p.requires_grad]
    if not params:
        return None

    def average() -> None:
        for p in params:
            if p.grad is not None:
                distributed.all_reduce_sum(p.grad).div_(distributed.dist.get_world_size())

    return average


def _summary(metrics: dict[str, float], results: dict, split: str, name: str) -> str:
    """``train loss 0.1234 acc 98.00%  test loss ... (best test accuracy 98.1)  val acc ...``."""

    def part(prefix: str) -> str:
        text = prefix
        if f"{prefix}/loss/total" in metrics:
            text += f" loss {metrics[f'{prefix}/loss/total']:.4f}"
        if f"{prefix}/accuracy" in metrics:
            text += f" acc {metrics[f'{prefix}/accuracy']:.2f}%"
        if text == prefix and name.startswith("loss/"):
            text += f" {name[5:]} {metrics.get(f'{prefix}/{name}', math.nan):.4g}"
        return text

    best = f"(best {split} {name} {metrics[f'best/{split}/{name}']:.4g})"
    others = "".join(f"  {part(n)}" for n in results if n != "test")
    return f"{part('train')}  {part('test')} {best}{others}"


def _warn_if_collapsed(result: EvalResult, metrics: dict[str, float], split: str, epoch: int) -> None:
    """A classifier that predicts one class for nearly every test image, or scores at chance, has
    collapsed without a NaN (saturated capsules, a too-high lr): worth a line in the log."""
    scores = result.scores
    if scores is None or scores.dim() != 2 or scores.shape[1] < 2 or len(scores) < 20:
        return
    classes = scores.shape[1]
    share = torch.bincount(scores.argmax(1), minlength=classes).max().item() / len(scores)
    accuracy = metrics.get(f"{split}/accuracy")
    chance = 100.0 / classes
    if share >= 0.9 or (epoch >= 2 and accuracy is not None and accuracy <= 1.2 * chance):
        log.warning(
            "epoch %d: the model predicts one class for %.0f%% of the test images (accuracy %s, chance %.0f%%): "
            "it may have collapsed; a lower optimizer.lr usually helps",
            epoch,
            100 * share,
            "n/a" if accuracy is None else f"{accuracy:.1f}%",
            chance,
        )


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


def improved(score: float, best: float, first: bool) -> bool:
    """Whether an epoch's selection ``score`` (higher is better) makes a new best.pt: the first
    finite score does, then only a strictly higher one; a non-finite score never does."""
    return math.isfinite(score) and (first or not math.isfinite(best) or score > best)


def snapshot(run: Run, state: TrainState, meters: Sequence[Meter]) -> dict[str, Any]:
    """last.pt: everything a resume needs to continue exactly (weights, optimizer and scheduler
    state, the meters' partial sums, the RNG states, where training stands, the config)."""
    return {
        "model": run.model.state_dict(),
        "objective": run.objective.state_dict(),
        "optimizer": run.optimizers[0].state_dict(),
        "objective_optimizers": [o.state_dict() for o in run.optimizers[1:]],
        "scheduler": run.scheduler.state_dict(),
        "meters": [m.state_dict() for m in meters],
        "rng": _rng_state(),
        "state": asdict(state),
        "epoch": state.epoch,
        "config": run.config,
        **({"average": run.average.state_dict()} if run.average is not None else {}),
    }


def weights(run: Run, state: TrainState) -> dict[str, Any]:
    """best.pt: what eval, sample and analyze read (no optimizer state, a third of last.pt's size);
    written while the weight average, once begun, is in the model."""
    return {
        "model": run.model.state_dict(),
        "averaged_steps": 0 if run.average is None else run.average.steps,
        "objective": run.objective.state_dict(),
        "epoch": state.epoch,
        "config": run.config,
        "metrics": dict(state.last_metrics),
    }


def _selection(run: Run) -> tuple[str, str, str]:
    """``(split, metric, mode)`` that picks best.pt: the objective's ``monitor`` on the validation
    set when there is one (never tune on the test set), else on the test set."""
    name, mode = getattr(run.objective, "monitor", ("accuracy", "max"))
    return ("val" if "val" in run.eval_loaders else "test"), name, mode


def _start_records(tb: TBLogger, run: Run) -> None:
    """A fresh run's first TensorBoard records: the HParams trial with the metrics it will log
    declared, the custom-scalars layout and the config text."""
    split, name, _ = _selection(run)
    splits = list(run.eval_loaders)
    declared = [f"{s}/{name}" for s in splits] + [f"best/{split}/{name}"]
    declared += [f"{s}/error" for s in splits if name == "accuracy"] + [f"{s}/loss/total" for s in splits]
    declared = [t for t in dict.fromkeys(declared) if t not in run.trial.metrics]
    tb.start(replace(run.trial, metrics=(*run.trial.metrics, *declared)), loss_layout(tuple(splits), name))
    tb.config(run.trial.config if run.trial.config is not None else run.config)


class _StepLog:
    """What :func:`fit` does after every optimizer step: the run's expected time once, the
    training scalars every ``log_every`` steps (the only per-interval host-device sync), the step
    hooks, and whether to stop (decided by all ranks together at log intervals)."""

    def __init__(self, run: Run, loop: Loop, state: TrainState, meter: Meter, tb, should_stop, device):
        self.run, self.loop, self.state, self.meter, self.tb = run, loop, state, meter, tb
        self.should_stop, self.device, self.main = should_stop, device, run.world.is_main
        self.watch = NonFiniteWatch(device)
        batches = len(run.train_loader)
        self.clock = RunClock(loop.epochs * batches - state.step, run.train_loader.num_examples / batches, device)
        self.bar: tqdm | None = None

    def __call__(self) -> bool:
        run, step = self.run, self.state.step
        said = self.clock.step()
        if said is not None and self.main:
            log.info(said)
        at_interval = step % self.loop.log_every == 0
        if at_interval:
            lr = run.scheduler.get_last_lr()[0]
            self.watch.check(lr)
            metrics = {**self.meter.compute("train"), "lr": lr}
            self.meter.reset()
            self.tb.scalars(metrics, step)
            if self.bar is not None:
                postfix = {"loss": f"{metrics.get('train/loss/total', math.nan):.4f}"}
                if "train/accuracy" in metrics:
                    postfix["acc"] = f"{metrics['train/accuracy']:.2f}"
                self.bar.set_postfix(postfix)
        if run.average is not None:
            run.average.update(run.model, step)
            if step == run.average.start_step + 1 and self.main:
                log.info("averaging the weights from step %d on (trainer.average): evaluation sees their mean", step)
        for hook in run.step_hooks if self.main else ():
            if step % hook.every_steps == 0:
                self.tb.health(hook(run.model, step), step)
        if run.world.distributed:  # one collective per log interval, so that all ranks stop together
            return distributed.any_rank(self.should_stop(), self.device) if at_interval else False
        return self.should_stop()


def _evaluate_splits(run: Run, loop: Loop) -> tuple[dict[str, EvalResult], float]:
    """Every evaluation split (``test`` first), and the seconds it took."""
    t0 = time.perf_counter()
    show = loop.progress and run.world.is_main
    results = {
        name: evaluate(run.eval_model or run.model, run.objective, loader, loop.num_images, show, name, run.precision)
        for name, loader in run.eval_loaders.items()
    }
    return results, time.perf_counter() - t0  # evaluate() ends with a host copy: synced


def _record_best(run: Run, state: TrainState, metrics: dict[str, float]) -> bool:
    """Apply the best-checkpoint rule (:func:`improved`) to the epoch just finished: update the
    best score, add ``best/<split>/<metric>`` to ``metrics``; returns whether best.pt is due."""
    split, name, mode = _selection(run)
    value = metrics[f"{split}/{name}"]
    score = value if mode == "max" else -value
    better = improved(score, state.best_score, first=state.epoch == 1)
    state.best_score = score if better or state.epoch == 1 else state.best_score
    metrics[f"best/{split}/{name}"] = state.best_score if mode == "max" else -state.best_score
    return better


def _log_epoch(tb, metrics: dict, train_metrics: dict, result: EvalResult, images: dict, step: int) -> None:
    tb.scalars({k: v for k, v in metrics.items() if not k.startswith(("train/", "epoch"))}, step)
    tb.scalars({"epoch": metrics["epoch"]}, step)
    # the epoch's training means too, so that a run shorter than log_every steps has a curve
    tb.scalars({f"train/epoch/{k[len('train/') :]}": v for k, v in train_metrics.items()}, step)
    tb.evaluation(result, step)
    for tag, image in images.items():
        tb.image(tag, image, step)


def _train_epoch(run: Run, loop: Loop, state: TrainState, meters, on_step: _StepLog, sync_grads, tb, ckpt_dir) -> float:
    """Train the rest of epoch ``state.epoch`` with a progress bar; returns its seconds. A stop
    request saves last.pt and raises :class:`Interrupted`; non-finite weights raise
    :class:`Diverged` (nothing saved)."""
    device, main = next(run.model.parameters()).device, run.world.is_main
    t0 = time.perf_counter()
    on_step.bar = tqdm(
        total=len(run.train_loader),
        initial=state.batch,
        desc=f"epoch {state.epoch + 1}/{loop.epochs}",
        disable=None if loop.progress and main else True,
        leave=False,
        dynamic_ncols=True,
    )
    done = train_one_epoch(
        run.train_model or run.model, run.objective, run.train_loader, run.optimizers, run.scheduler, state,
        meters, on_step, on_step.bar, sync_grads, run.precision, on_step.watch,
    )  # fmt: skip
    on_step.bar.close()
    lr = run.scheduler.get_last_lr()[0]
    on_step.watch.check(lr)
    if not finite_model(run.model):
        raise Diverged(
            f"the weights became NaN or infinite in epoch {state.epoch + 1} (the loss stayed finite); "
            f"nothing non-finite was saved; try a lower optimizer.lr (now {lr:g})"
        )
    if not done:
        if main:
            tb.flush()  # the events up to this step are kept on resume: on disk before last.pt
            checkpoint.save(ckpt_dir / "last.pt", snapshot(run, state, meters))
        raise Interrupted(f"stopped at epoch {state.epoch + 1}, batch {state.batch}; saved {ckpt_dir / 'last.pt'}")
    if device.type == "cuda":  # kernels are queued asynchronously: time their end
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def _end_epoch(run: Run, loop: Loop, state: TrainState, meters, tb, run_dir: Path, train_seconds: float) -> dict:
    """After an epoch's training: evaluate, run the epoch hooks, apply the best-checkpoint rule,
    log, and write best.pt (if due), metrics.json and last.pt, in that order; returns the metrics.
    Once the weight average has begun (``run.average``) all but last.pt see the mean weights."""
    main, epoch_meter = run.world.is_main, meters[0]
    train_metrics = epoch_meter.compute("train")
    with run.average.applied(run.model) if run.average is not None else contextlib.nullcontext(False) as averaged:
        results, eval_seconds = _evaluate_splits(run, loop)
        metrics = {
            **train_metrics,
            **{k: v for r in results.values() for k, v in r.metrics.items()},
            "time/epoch_seconds": train_seconds,
            "time/train_images_per_second": run.train_loader.num_examples / train_seconds,
            "time/eval_seconds": eval_seconds,
        }
        if averaged:
            metrics["average/steps"] = run.average.steps
        hook_images: dict[str, torch.Tensor] = {}
        for hook in run.epoch_hooks if main else ():
            extra = hook(run.model, state.epoch + 1, state.epoch + 1 == loop.epochs)
            hook_images.update(extra.pop("images", {}))
            metrics.update(extra)
        state.epoch += 1
        state.batch = 0
        epoch_meter.reset()
        better = _record_best(run, state, metrics)
        # the mean is the run's result once it has begun: best.pt follows it, whatever the metric says
        better = better or averaged
        metrics["epoch"] = state.epoch
        state.last_metrics = metrics
        _log_epoch(tb, metrics, train_metrics, results["test"], hook_images, state.step)
        if main:
            tb.flush()
            if better:
                checkpoint.save(run_dir / "checkpoints" / "best.pt", weights(run, state))
    if main:
        # last.pt is the record of a completed epoch, so it is written last: a kill before it
        # replays the epoch from the previous last.pt, which rewrites the same files
        checkpoint.save_json(run_dir / "metrics.json", metrics)
        checkpoint.save(run_dir / "checkpoints" / "last.pt", snapshot(run, state, meters))
    split, name, _ = _selection(run)
    _warn_if_collapsed(results["test"], metrics, split, state.epoch)
    summary = _summary(metrics, results, split, name)
    log.info("epoch %d/%d  %s  %.1f s (+ %.1f s eval)", state.epoch, loop.epochs, summary, train_seconds, eval_seconds)
    return metrics


def fit(
    run: Run,
    loop: Loop,
    run_dir: Path,
    resume_from: Path | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> dict[str, float]:
    """Train ``run`` for ``loop.epochs``, evaluate after each, checkpoint, log; return the final
    metrics. Every rank trains and evaluates its shard; only rank 0 runs the hooks and writes logs
    and checkpoints; the ranks decide to stop together (``should_stop``, polled every step).

    After each epoch writes, in this order, ``checkpoints/best.pt`` when the selection score
    (the objective's ``monitor`` on ``"val"`` when there is one, else on ``"test"``) improves and
    is finite, ``metrics.json`` keyed by TensorBoard tags, and ``checkpoints/last.pt`` last, so
    that ``last.pt`` is the record of a completed epoch; ``metrics.json`` once more at the end.
    Raises :class:`Interrupted` when ``should_stop`` turns true, after saving ``last.pt``, and
    :class:`Diverged` when the loss or the weights become non-finite, without saving them.
    """
    model, device, main = run.model, next(run.model.parameters()).device, run.world.is_main
    ckpt_dir = run_dir / "checkpoints"
    epoch_meter, interval_meter = Meter(), Meter()
    meters = [epoch_meter, interval_meter]
    state = TrainState()
    if resume_from is not None:
        state = restore(resume_from, model, run.objective, run.optimizers, run.scheduler, meters, device, run.average)
        if not main:  # the saved partial sums are rank 0's: count them once
            epoch_meter.reset()
            interval_meter.reset()
        log.info("resumed from %s: epoch %d, batch %d (step %d)", resume_from, state.epoch + 1, state.batch, state.step)
    # a resume drops the events a killed run wrote after its checkpoint's step and keeps that step's
    # own; a fresh start drops those of an attempt killed before its first checkpoint
    tb = TBLogger(run_dir, purge_step=state.step + 1 if resume_from is not None else 0) if main else _NoLog()
    on_step = _StepLog(run, loop, state, interval_meter, tb, should_stop, device)
    sync_grads = _grad_averager(run.objective) if run.world.distributed else None
    if resume_from is None:  # a resumed run keeps the records its first start wrote
        _start_records(tb, run)
    metrics: dict[str, float] = dict(state.last_metrics)
    redirect = logging_redirect_tqdm()  # log lines above the progress bar, not through it
    redirect.__enter__()
    try:
        while state.epoch < loop.epochs:
            train_seconds = _train_epoch(run, loop, state, meters, on_step, sync_grads, tb, ckpt_dir)
            metrics = _end_epoch(run, loop, state, meters, tb, run_dir, train_seconds)
        tb.end("success")
        if main:  # also when a resume found the run finished (a kill after its last last.pt)
            checkpoint.save_json(run_dir / "metrics.json", metrics)
    except Interrupted:
        raise  # resumable: no end status yet (TensorBoard keeps the first one written)
    except BaseException:
        tb.end("failure")
        raise
    finally:
        if on_step.bar is not None:
            on_step.bar.close()
        tb.close()
        redirect.__exit__(None, None, None)
    return metrics
