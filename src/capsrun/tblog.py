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
        """Inputs beside their reconstructions, capsule lengths and routing couplings."""
        if result.reconstructions is not None:
            n = result.images.shape[0]
            grid = make_grid(
                torch.cat([result.images, result.reconstructions.to(result.images.dtype)]),
                nrow=n,
                padding=2,
                pad_value=0.5,
            )
            self.writer.add_image("test/reconstructions", grid, step)
        if result.coupling is not None:  # a capsule model: scores are capsule lengths
            self.writer.add_histogram("test/digit_caps/length", result.scores, step)
            self.writer.add_histogram("routing/digit_caps/coupling", result.coupling, step)

    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        """One HParams entry for the run, in the run's own event file (not a sub-run), so a
        multirun compares in TensorBoard's HParams tab."""
        clean = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()}
        for summary in hparams_summary(clean, metrics):
            self.writer.file_writer.add_summary(summary)

    def close(self) -> None:
        self.writer.close()
