"""What watches a training run as it goes: the expected time, non-finite losses and weights, the
step log (training scalars, step hooks, the stop request), a collapsed classifier, the epoch's
summary line and the run's first TensorBoard records. The loop itself is :mod:`capsrun.train`."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import replace

import torch
from torch import nn
from tqdm import tqdm

from capsrun import distributed
from capsrun.errors import CapsrunError
from capsrun.metrics import Meter
from capsrun.progress import duration
from capsrun.resume import TrainState
from capsrun.run import EvalResult, Loop, Run
from capsrun.tblog import TBLogger, loss_layout

log = logging.getLogger("capsrun")


def selection(run: Run) -> tuple[str, str, str]:
    """``(split, metric, mode)`` that picks best.pt: the objective's ``monitor`` on the validation
    set when there is one (never tune on the test set), else on the test set."""
    name, mode = getattr(run.objective, "monitor", ("accuracy", "max"))
    return ("val" if "val" in run.eval_loaders else "test"), name, mode


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


class NoLog:
    """The TensorBoard writer of ranks other than 0: they write nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


class RunClock:
    """Says once how long the rest of the run will take, from the first timed steps: the first
    ``skip`` steps (warm-up, compilation) are not timed, then steps are timed until
    ``min_seconds`` have passed or ``max_steps`` were made, and never fewer than ``min_steps``
    (one slow step is no estimate). A run too short for that says nothing. One device sync, at
    that point."""

    def __init__(
        self,
        remaining_steps: int,
        batch_size: float,
        device: torch.device,
        skip: int = 2,
        min_seconds: float = 5.0,
        max_steps: int = 50,
        min_steps: int = 3,
    ):
        self.remaining, self.batch_size, self.device = remaining_steps, batch_size, device
        self.skip, self.min_seconds, self.max_steps, self.min_steps = skip, min_seconds, max_steps, min_steps
        self.steps, self.t0, self.said = 0, 0.0, remaining_steps < skip + min_steps

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
        if timed < self.min_steps or (timed < self.max_steps and time.perf_counter() - self.t0 < self.min_seconds):
            return None
        per_step = (self._now() - self.t0) / timed
        self.said = True
        left = self.remaining - self.steps
        return (
            f"timed {timed} steps: {per_step:.3g} s a step ({self.batch_size / per_step:,.0f} images/s); "
            f"the remaining {left:,} steps take about {duration(left * per_step)}, plus evaluation after each epoch"
        )


def grad_averager(objective: nn.Module) -> Callable[[], None] | None:
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


def summary(metrics: dict[str, float], results: dict, split: str, name: str) -> str:
    """``train loss 0.1234 acc 98.00%  test loss ... (best test accuracy 98.1)  val acc ...``."""

    def part(prefix: str) -> str:
        text = prefix
        if f"{prefix}/loss/total" in metrics:
            text += f" loss {metrics[f'{prefix}/loss/total']:.4f}"
        if f"{prefix}/accuracy" in metrics:
            text += f" acc {metrics[f'{prefix}/accuracy']:.2f}%"
        if text == prefix and f"{prefix}/{name}" in metrics:  # a model without labels: its selection metric
            text += f" {name.removeprefix('loss/').replace('/', ' ')} {metrics[f'{prefix}/{name}']:.4g}"
        return text

    best = f"(best {split} {name} {metrics[f'best/{split}/{name}']:.4g})"
    others = "".join(f"  {part(n)}" for n in results if n != "test")
    return f"{part('train')}  {part('test')} {best}{others}"


def warn_if_collapsed(result: EvalResult, metrics: dict[str, float], split: str, epoch: int) -> None:
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


def start_records(tb: TBLogger, run: Run) -> None:
    """A fresh run's first TensorBoard records: the HParams trial with the metrics it will log
    declared, the custom-scalars layout and the config text."""
    split, name, _ = selection(run)
    splits = list(run.eval_loaders)
    declared = [f"{s}/{name}" for s in splits] + [f"best/{split}/{name}"]
    declared += [f"{s}/error" for s in splits if name == "accuracy"] + [f"{s}/loss/total" for s in splits]
    declared = [t for t in dict.fromkeys(declared) if t not in run.trial.metrics]
    tb.start(replace(run.trial, metrics=(*run.trial.metrics, *declared)), loss_layout(tuple(splits), name))
    tb.config(run.trial.config if run.trial.config is not None else run.config)


class StepLog:
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

    def _extras_line(self) -> str:
        """``; the end-of-epoch work ... about 12 min`` from the epoch hooks' own estimates."""
        epochs = range(self.state.epoch + 1, self.loop.epochs + 1)
        seconds = sum(hook.seconds(self.run.model, epochs) for hook in self.run.epoch_hooks if hasattr(hook, "seconds"))
        if seconds < 1:
            return ""
        names = ", ".join(hook.what for hook in self.run.epoch_hooks if hasattr(hook, "seconds"))
        return f"; the end-of-epoch work ({names}) about {duration(seconds)} more"

    def __call__(self) -> bool:
        run, step = self.run, self.state.step
        said = self.clock.step()
        if said is not None and self.main:
            log.info(said + self._extras_line())
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
