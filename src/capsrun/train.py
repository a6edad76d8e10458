"""The training loop as plain functions: ``train_one_epoch``, ``evaluate`` and ``fit``.

Metrics are summed on the device and read once per log interval or epoch, so the loop never
forces a host-device sync per step. ``fit`` writes TensorBoard through one :class:`TBLogger`.
Where training stands and what a checkpoint keeps is :mod:`capsrun.resume`; what watches the run
(its clock, non-finite values, the step log) is :mod:`capsrun.monitors`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from capsrun import checkpoint, speed
from capsrun.batch import aligned_top, unpack
from capsrun.metrics import Confusion, Meter, correct
from capsrun.monitors import (
    Diverged,
    NoLog,
    NonFiniteWatch,
    StepLog,
    finite_model,
    grad_averager,
    selection,
    start_records,
    summary,
    warn_if_collapsed,
)
from capsrun.resume import TrainState, restore, snapshot, weights
from capsrun.run import EvalResult, Loop, Run
from capsrun.tblog import TBLogger

log = logging.getLogger("capsrun")

__all__ = ["Diverged", "EvalResult", "Interrupted", "Loop", "Run", "evaluate", "evaluate_ensemble", "fit"]


class Interrupted(Exception):
    """Training stopped on request (SIGINT/SIGTERM) after saving ``last.pt``."""


def train_one_epoch(
    run: Run,
    state: TrainState,
    meters: list[Meter],
    on_step: Callable[[], bool],
    bar: tqdm | None = None,
    watch: NonFiniteWatch | None = None,
    sync_grads: Callable[[], None] | None = None,
) -> bool:
    """Train ``run.train_model`` (else ``run.model``) from ``state.batch`` to the end of epoch
    ``state.epoch`` of ``run.train_loader``; ``on_step`` runs after every step and returns True to
    stop early. Returns whether the epoch was completed.

    ``run.optimizers``: the model's, then any the objective's own parameters need (a
    discriminator); one backward pass of ``total`` feeds them all, ``run.scheduler`` sets the
    first one's lr. The forward pass and the losses run under ``run.precision``'s autocast
    (:mod:`capsrun.speed`). ``watch``: a :class:`~capsrun.monitors.NonFiniteWatch` each step's
    total loss is shown to; ``sync_grads`` runs between backward and the optimizer steps
    (averaging across ranks the gradients that DistributedDataParallel does not own)."""
    model = run.train_model or run.model
    model.train()
    for batch in run.train_loader.epoch(state.epoch, start=state.batch):
        x, y, target = unpack(batch)
        with speed.autocast(x.device, run.precision):
            out = model(x, y)
            losses = run.objective(out, target, y)
        for optimizer in run.optimizers:
            optimizer.zero_grad(set_to_none=True)
        if watch is not None:
            watch.update(losses["total"], state.step + 1)
        losses["total"].backward()
        if sync_grads is not None:
            sync_grads()
        for optimizer in run.optimizers:
            optimizer.step()
        run.scheduler.step()
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
    in the paper, and for a classifier its per-class results (:class:`~capsrun.metrics.Confusion`,
    ``EvalResult.per_class``). ``model`` may be a :class:`capsrun.speed.Compiled` wrapper."""
    model.eval()
    meter, scores, first, confusion = Meter(), [], None, None
    batches = tqdm(loader.epoch(0), total=len(loader), desc=prefix, disable=None if progress else True, leave=False)
    for batch in batches:
        x, y, target = unpack(batch)
        with speed.autocast(x.device, precision):
            out = model(x)
            # two objects an image: decode each predicted class capsule (a model without class
            # capsules, as an energy model's up-down pass, keeps its own reconstruction)
            decodes = getattr(out, "reconstruction", None) is not None and getattr(out, "digit_caps", None) is not None
            if y.dim() == 2 and decodes:
                out = out._replace(reconstruction=model.reconstruct(out.digit_caps, aligned_top(out.scores, y)))
            losses = objective(out, target, y)
        batch_scores = getattr(out, "scores", None)
        meter.update(losses, None if batch_scores is None else correct(batch_scores, y), len(y))
        if batch_scores is not None:
            scores.append(batch_scores)
            confusion = confusion or Confusion(batch_scores.shape[-1], batch_scores.device)
            confusion.update(batch_scores, y)
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
        {} if confusion is None else confusion.compute(prefix),
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


def improved(score: float, best: float, first: bool) -> bool:
    """Whether an epoch's selection ``score`` (higher is better) makes a new best.pt: the first
    finite score does, then only a strictly higher one; a non-finite score never does."""
    return math.isfinite(score) and (first or not math.isfinite(best) or score > best)


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
    split, name, mode = selection(run)
    value = metrics[f"{split}/{name}"]
    score = value if mode == "max" else -value
    better = improved(score, state.best_score, first=state.epoch == 1)
    state.best_score = score if better or state.epoch == 1 else state.best_score
    metrics[f"best/{split}/{name}"] = state.best_score if mode == "max" else -state.best_score
    return better


def _log_epoch(tb, metrics: dict, train_metrics: dict, result: EvalResult, step: int) -> None:
    tb.scalars({k: v for k, v in metrics.items() if not k.startswith(("train/", "epoch"))}, step)
    tb.scalars({"epoch": metrics["epoch"]}, step)
    # the epoch's training means too, so that a run shorter than log_every steps has a curve
    tb.scalars({f"train/epoch/{k[len('train/') :]}": v for k, v in train_metrics.items()}, step)
    tb.evaluation(result, step)


def _train_epoch(run: Run, loop: Loop, state: TrainState, meters, on_step: StepLog, sync_grads, tb, ckpt_dir) -> float:
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
    done = train_one_epoch(run, state, meters, on_step, on_step.bar, on_step.watch, sync_grads)
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


def _averaged(run: Run):
    """The weight average in the model, once it has begun (yields whether it is)."""
    return run.average.applied(run.model) if run.average is not None else contextlib.nullcontext(False)


def _end_epoch(
    run: Run, loop: Loop, state: TrainState, meters, tb, run_dir: Path, train_seconds: float, urgent
) -> dict:
    """After an epoch's training: evaluate, apply the best-checkpoint rule, log, and write best.pt
    (if due), metrics.json and last.pt, in that order; then run the epoch hooks (:func:`_extras`).
    Once the weight average has begun (``run.average``) all but last.pt see the mean weights."""
    main, epoch_meter = run.world.is_main, meters[0]
    train_metrics = epoch_meter.compute("train")
    with _averaged(run) as averaged:
        results, eval_seconds = _evaluate_splits(run, loop)
        metrics = {
            **train_metrics,
            **{k: v for r in results.values() for k, v in r.metrics.items()},
            **{k: v for r in results.values() for k, v in r.per_class.items()},
            "time/epoch_seconds": train_seconds,
            "time/train_images_per_second": run.train_loader.num_examples / train_seconds,
            "time/eval_seconds": eval_seconds,
        }
        if averaged:
            metrics["average/steps"] = run.average.steps
        state.epoch += 1
        state.batch = 0
        epoch_meter.reset()
        better = _record_best(run, state, metrics)
        # the mean is the run's result once it has begun: best.pt follows it, whatever the metric says
        better = better or averaged
        metrics["epoch"] = state.epoch
        state.last_metrics = metrics
        _log_epoch(tb, metrics, train_metrics, results["test"], state.step)
        if main:
            tb.flush()
            if better:
                checkpoint.save(run_dir / "checkpoints" / "best.pt", weights(run, state))
    # the hooks still to run after this epoch (sample grids, AIS): last.pt keeps the list, so that
    # a kill or a stop in them loses at most the one running, and a resume runs only what is missing
    state.extras = list(range(len(run.epoch_hooks))) if main else []
    state.best_extras = bool(better and state.extras)  # best.pt is written again with their figures
    if main:
        # last.pt is the record of a completed epoch, so it is written last: a kill before it
        # replays the epoch from the previous last.pt, which rewrites the same files
        checkpoint.save_json(run_dir / "metrics.json", metrics)
        checkpoint.save(run_dir / "checkpoints" / "last.pt", snapshot(run, state, meters))
    split, name, _ = selection(run)
    warn_if_collapsed(results["test"], metrics, split, state.epoch)
    line = summary(metrics, results, split, name)
    log.info("epoch %d/%d  %s  %.1f s (+ %.1f s eval)", state.epoch, loop.epochs, line, train_seconds, eval_seconds)
    return _extras(run, loop, state, meters, tb, run_dir, urgent)


def _extras(run: Run, loop: Loop, state: TrainState, meters, tb, run_dir: Path, urgent) -> dict:
    """Run the epoch hooks still due after epoch ``state.epoch`` (``state.extras``), each with the
    mean weights once averaging has begun; after each, log what it returned, add it to the
    epoch's metrics and write metrics.json and last.pt (best.pt too after the last, when the epoch
    was the best). ``urgent()``: a context in which a stop request interrupts at once (it raises
    :class:`Interrupted`): everything before it is on disk. Returns the epoch's metrics."""
    metrics = state.last_metrics
    for index in list(state.extras):
        hook = run.epoch_hooks[index]
        try:
            with _averaged(run), urgent():
                extra = hook(run.model, state.epoch, state.epoch == loop.epochs)
        except Interrupted:
            raise Interrupted(
                f"stopped in the end-of-epoch work after epoch {state.epoch}; "
                f"{run_dir / 'checkpoints' / 'last.pt'} holds the epoch and the work finished after it"
            ) from None
        images = extra.pop("images", {})
        metrics.update(extra)
        tb.scalars(extra, state.step)
        for tag, image in images.items():
            tb.image(tag, image, state.step)
        tb.flush()
        state.extras.remove(index)
        if not state.extras and state.best_extras:
            state.best_extras = False
            with _averaged(run):
                checkpoint.save(run_dir / "checkpoints" / "best.pt", weights(run, state))
        checkpoint.save_json(run_dir / "metrics.json", metrics)
        checkpoint.save(run_dir / "checkpoints" / "last.pt", snapshot(run, state, meters))
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
    tb = TBLogger(run_dir, purge_step=state.step + 1 if resume_from is not None else 0) if main else NoLog()
    on_step = StepLog(run, loop, state, interval_meter, tb, should_stop, device)
    sync_grads = grad_averager(run.objective) if run.world.distributed else None
    if resume_from is None:  # a resumed run keeps the records its first start wrote
        start_records(tb, run)
    metrics: dict[str, float] = dict(state.last_metrics)
    urgent = getattr(should_stop, "urgent", contextlib.nullcontext)
    redirect = logging_redirect_tqdm()  # log lines above the progress bar, not through it
    redirect.__enter__()
    try:
        if state.extras and main:  # stopped in the hooks after an epoch: run those still missing
            log.info("epoch %d was saved before its end-of-epoch work; running what is missing", state.epoch)
            metrics = _extras(run, loop, state, meters, tb, run_dir, urgent)
        while state.epoch < loop.epochs:
            train_seconds = _train_epoch(run, loop, state, meters, on_step, sync_grads, tb, ckpt_dir)
            metrics = _end_epoch(run, loop, state, meters, tb, run_dir, train_seconds, urgent)
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
