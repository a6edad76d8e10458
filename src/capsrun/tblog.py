"""The one TensorBoard writer of a run. Tags are namespaced: ``train/loss/margin``,
``test/accuracy``, ``routing/digit_caps/coupling``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summary
from torchvision.utils import make_grid


def two_colour_overlay(images: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    """The input in dim grey with reconstruction 1 in red and reconstruction 2 in green over it, as
    in Fig. 5 of arXiv:1710.09829. ``images`` ``[n, 1, H, W]``, ``reconstructions``
    ``[n, 2, 1, H, W]`` -> RGB ``[n, 3, H, W]`` in [0, 1]."""
    grey = 0.35 * images
    red, green = reconstructions[:, 0], reconstructions[:, 1]
    return torch.cat([grey + red, grey + green, grey], dim=1).clamp(0, 1)


class TBLogger:
    def __init__(self, log_dir: Path, purge_step: int | None = None):
        # purge_step drops events a killed run wrote after its last checkpoint
        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)

    def scalars(self, metrics: dict[str, float], step: int) -> None:
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value, step)

    def config(self, config: dict[str, Any]) -> None:
        text = yaml.safe_dump(config, sort_keys=False)
        # four-space indent: a Markdown code block in TensorBoard's text tab
        self.writer.add_text("config", "\n".join("    " + line for line in text.splitlines()), 0)

    def evaluation(self, result, step: int) -> None:
        """Inputs above their reconstructions, capsule lengths and routing couplings."""
        if result.reconstructions is not None:
            images, recon = result.images, result.reconstructions.to(result.images.dtype)
            if recon.dim() == 5:  # two objects per image (MultiMNIST): Fig. 5's colours
                recon = two_colour_overlay(images, recon)
                images = images.expand(-1, 3, -1, -1)
            grid = make_grid(torch.cat([images, recon]), nrow=images.shape[0], padding=2, pad_value=0.5)
            self.writer.add_image("test/reconstructions", grid, step)
        if result.coupling is not None:  # a capsule model: scores are capsule lengths (-KL for vcaps)
            self.writer.add_histogram("test/digit_caps/length", result.scores, step)
            self.writer.add_histogram("routing/digit_caps/coupling", result.coupling, step)

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

    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        """One HParams entry for the run, in the run's own event file (not a sub-run), so a
        multirun compares in TensorBoard's HParams tab."""
        clean = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()}
        for summary in hparams_summary(clean, metrics):
            self.writer.file_writer.add_summary(summary)

    def flush(self) -> None:
        """Put every event so far on disk (before a checkpoint records them as written)."""
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
