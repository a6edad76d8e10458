"""Throughput measurement: the training step and the evaluation pass of a model, timed.

Pure measurement, no config: :mod:`capsrun.commands` builds the models (the same builders as
``capsrun train``) and calls :func:`measure` per setting. What is timed:

- train: forward + losses + backward + optimizer step(s) on one synthetic batch of the
  dataset's shape (uniform pixels, random labels), repeated; the data pipeline is not included
  (``capsrun train`` logs the whole epoch time, ``time/epoch_seconds``);
- eval: the forward pass in eval mode without gradients, as ``capsrun eval`` runs it.

Warm-up steps (compilation, cuDNN autotuning, the optimizer's first-step state) are excluded.
Then ``repeats`` blocks of ``steps`` steps are timed by ``torch.utils.benchmark.Timer`` (which
runs a short warm-up of its own before each block, synchronises the device at each block's ends,
and here keeps the process's thread count); a
figure is the median over the blocks, its spread the interquartile range relative to the median.
Peak memory is ``torch.cuda.max_memory_allocated`` over the timed training steps (CUDA only).
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from capsrun import speed
from capsrun.batch import unpack


@dataclass(frozen=True)
class Setting:
    """One row of the table. ``reference``: the straightforward eager version the others are
    compared with (fp32, eager, NCHW) of the same model, routing iterations and batch size."""

    model: str
    iterations: int | None  # None: a model without routing (the baseline CNN)
    batch_size: int
    precision: str = "fp32"
    compile: bool = False
    channels_last: bool = False

    @property
    def reference(self) -> bool:
        return self.precision == "fp32" and not self.compile and not self.channels_last

    def group(self) -> tuple:
        """Settings with the same group share one reference."""
        return (self.model, self.iterations, self.batch_size)

    def __str__(self) -> str:
        routing = f", {self.iterations} routing iterations" if self.iterations else ""
        extras = [x for x, on in (("compiled", self.compile), ("channels-last", self.channels_last)) if on]
        return f"{self.model}{routing}, batch {self.batch_size}, {self.precision}{''.join(', ' + x for x in extras)}"


@dataclass
class Measurement:
    setting: Setting
    train_images_per_second: float
    eval_images_per_second: float
    peak_memory_mib: float | None
    train_spread: float = 0.0  # interquartile range over the median of the timed blocks
    eval_spread: float = 0.0
    train_ratio: float = 1.0  # over the reference of the same group
    eval_ratio: float = 1.0

    def row(self) -> dict:
        return {**asdict(self.setting), **{k: v for k, v in asdict(self).items() if k != "setting"}}


def synthetic_batch(
    batch_size: int, channels: int, image_size: int, num_classes: int, labels_per_image: int, device, seed: int = 0
) -> tuple:
    """A batch shaped like the dataset's: ``(x, y)``, or for two labels per image (MultiMNIST)
    ``(x, y [B, 2], first alone, second alone)`` with two different classes per image."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(batch_size, channels, image_size, image_size, generator=gen)
    if labels_per_image == 1:
        return x.to(device), torch.randint(0, num_classes, (batch_size,), generator=gen).to(device)
    y = torch.stack([torch.randperm(num_classes, generator=gen)[:2] for _ in range(batch_size)])
    return x.to(device), y.to(device), x.to(device), x.to(device)


def time_steps(step: Callable[[], None], warmup: int, steps: int, repeats: int):
    """``repeats`` blocks of ``steps`` calls of ``step``, after ``warmup`` untimed ones, as one
    ``torch.utils.benchmark`` measurement (per-step times; ``.median``, ``.iqr``)."""
    # importing torch.utils.benchmark loads cpp_extension, which warns on stderr about a CUDA
    # toolkit nobody asked for; the warning says nothing about the measurement
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils.benchmark import Measurement as Timing
    from torch.utils.benchmark import Timer

    for _ in range(warmup):
        step()
    timer = Timer(stmt="step()", globals={"step": step}, num_threads=torch.get_num_threads())
    return Timing.merge([timer.timeit(number=steps) for _ in range(repeats)])[0]


def measure(
    setting: Setting,
    model: nn.Module,
    objective: nn.Module,
    optimizers: Sequence[torch.optim.Optimizer],
    batch: tuple,
    warmup: int,
    steps: int,
    repeats: int = 1,
) -> Measurement:
    """Train and eval throughput of ``model`` (already on its device) under ``setting``."""
    device = batch[0].device
    speed.set_matmul_precision(setting.precision)
    if setting.channels_last:
        model = speed.to_channels_last(model)
    size = setting.batch_size
    forward = speed.Compiled(model, {size}) if setting.compile else model
    x, y, target = unpack(batch)

    def train_step() -> None:
        with speed.autocast(device, setting.precision):
            losses = objective(forward(x, y), target, y)
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        for optimizer in optimizers:
            optimizer.step()

    @torch.no_grad()
    def eval_step() -> None:
        with speed.autocast(device, setting.precision):
            forward(x)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    train = time_steps(train_step, warmup, steps, repeats)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    model.eval()
    evaluation = time_steps(eval_step, warmup, steps, repeats)
    return Measurement(
        setting,
        size / train.median,
        size / evaluation.median,
        peak,
        train_spread=train.iqr / train.median,
        eval_spread=evaluation.iqr / evaluation.median,
    )


def with_ratios(results: list[Measurement]) -> list[Measurement]:
    """Fill in each measurement's ratios over the reference of its group."""
    refs = {m.setting.group(): m for m in results if m.setting.reference}
    for m in results:
        ref = refs.get(m.setting.group())
        if ref is not None:
            m.train_ratio = m.train_images_per_second / ref.train_images_per_second
            m.eval_ratio = m.eval_images_per_second / ref.eval_images_per_second
    return results


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"CPU {name}, {torch.get_num_threads()} threads"


def _rate(images_per_second: float) -> str:
    return f"{images_per_second:.1f}" if images_per_second < 100 else f"{images_per_second:,.0f}"


def table(results: list[Measurement]) -> str:
    """A Markdown table, one row per measurement: images/s from the median step time, the
    spread (interquartile range over median) of the timed blocks."""
    head = (
        "| model | routing | batch | precision | compile | channels-last | train img/s | spread | x ref "
        "| eval img/s | spread | x ref | peak MiB |"
    )
    lines = [head, "|" + "---|" * 13]
    for m in results:
        s = m.setting
        lines.append(
            f"| {s.model}{' (reference)' if s.reference else ''} | {s.iterations if s.iterations else '-'} "
            f"| {s.batch_size} | {s.precision} | {'on' if s.compile else 'off'} | {'on' if s.channels_last else 'off'} "
            f"| {_rate(m.train_images_per_second)} | {m.train_spread:.0%} | {m.train_ratio:.2f} "
            f"| {_rate(m.eval_images_per_second)} | {m.eval_spread:.0%} | {m.eval_ratio:.2f} "
            f"| {'-' if m.peak_memory_mib is None else f'{m.peak_memory_mib:,.0f}'} |"
        )
    return "\n".join(lines)
