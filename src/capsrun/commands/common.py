"""What several commands share: their run dir, the sample judge's checkpoint (``eval_classifier``),
PNG output."""

from __future__ import annotations

from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from capsrun import checkpoint, registry
from capsrun.errors import ConfigError
from capsrun.images import write_png


def output_dir() -> Path:
    """This command's run dir (Hydra's)."""
    return Path(HydraConfig.get().runtime.output_dir)


def load_classifier(cfg: DictConfig, dev: torch.device, dataset: DictConfig):
    """The ``eval_classifier`` checkpoint, checked to know the same dataset, or None."""
    from hydra.utils import to_absolute_path

    if cfg.get("eval_classifier") in (None, ""):
        return None
    net, trained_on = registry.classifier(Path(to_absolute_path(str(cfg.eval_classifier))), dev)
    if trained_on.name != dataset.name:
        raise ConfigError(
            f"eval_classifier was trained on {trained_on.name}, the samples are {dataset.name}; "
            f"give a capsnet checkpoint trained on {dataset.name}"
        )
    return net


def save_png(path: Path, image: torch.Tensor) -> None:
    """An image ``[C, H, W]`` in [0, 1] as a PNG, written atomically."""
    checkpoint.atomic_write(path, lambda f: write_png(image, f))
