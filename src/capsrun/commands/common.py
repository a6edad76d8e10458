"""What several commands share: the run dir, the sample judge (``eval_classifier``), the AIS
settings and estimate, a checkpoint's model, PNG output."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from capsrun import build, checkpoint, sampling
from capsrun.batch import unpack
from capsrun.errors import ConfigError
from capsrun.images import write_png

log = logging.getLogger("capsrun")


ENERGY_MODELS = ("rbm", "capsrbm")  # model.name of the energy models: no classes, log-likelihood by AIS


def output_dir() -> Path:
    return Path(HydraConfig.get().runtime.output_dir)


def load_classifier(cfg: DictConfig, dev: torch.device, dataset: DictConfig):
    """The ``eval_classifier`` checkpoint, checked to know the same dataset, or None."""
    from hydra.utils import to_absolute_path

    if cfg.get("eval_classifier") in (None, ""):
        return None
    net, trained_on = build.classifier(Path(to_absolute_path(str(cfg.eval_classifier))), dev)
    if trained_on.name != dataset.name:
        raise ConfigError(
            f"eval_classifier was trained on {trained_on.name}, the samples are {dataset.name}; "
            f"give a capsnet checkpoint trained on {dataset.name}"
        )
    return net


def judge(classifier, model, test, sq: DictConfig) -> sampling.Judge:
    """The judge of an energy model's samples: ``classifier`` with the first
    ``sq.real_images`` test images, binarised as the model sees them, calibrated on them when
    ``sq.calibrate`` (:func:`capsrun.sampling.judge_temperature`); the next ``sq.held_out`` test
    images (as many as the test set has) give the Frechet distance of real digits at the
    samples' number (:func:`capsrun.sampling.frechet_floor`)."""
    reference, held = reference_settings(sq)
    images, labels = sampling.first_labelled(test, reference + held)
    real, labels, held_out = model.visible_states(images[:reference]), labels[:reference], images[reference:]
    held_out = model.visible_states(held_out) if len(held_out) >= 2 else None
    found = sampling.Judge(classifier, real, labels, calibrate=bool(sq.get("calibrate", True)), held_out=held_out)
    log.info(
        "sample judge: temperature %.3g on %d binarised test images; %d more held out (real digits' Frechet distance)",
        found.temperature,
        len(real),
        0 if held_out is None else len(held_out),
    )
    return found


def reference_settings(sq: DictConfig) -> tuple[int, int]:
    """``sample_quality.real_images`` (>= 2) and ``sample_quality.held_out`` (>= 0), checked."""
    reference = build.integer(sq.get("real_images"), "sample_quality.real_images", 2, 5000)
    return reference, build.integer(sq.get("held_out", 0), "sample_quality.held_out", 0, 5000)


def confidence_setting(value: Any, key: str) -> float:
    return build.number(value, key, lambda v: 0 < v < 1, "a number in (0, 1)", 0.9)


def ladder_from_setting(value: Any, key: str, levels: int, levels_key: str) -> float:
    """A sampling ladder's lowest inverse temperature ``key``: a number in [0, 1), above 0 only
    with a ladder (``levels_key`` >= 2)."""
    lowest = build.number(value, key, lambda v: 0 <= v < 1, "a number in [0, 1)", 0.55)
    if lowest > 0 and levels < 2:
        raise ConfigError(f"{key} needs a tempering ladder of 2 or more levels; e.g. {levels_key}=8 {key}=0.55")
    return lowest


def ladder_start_settings(shift: Any, tune: Any, prefix: str, levels: int, steps: int) -> tuple[float, int]:
    """A sampling ladder's ``<prefix>shift`` (logits added to the base-rate model for the levels
    below 1, a number in [0, 10]) and ``<prefix>tune`` (sweeps of adaptive re-spacing, an integer
    >= 0), each null for the default: with a ladder (``levels`` >= 2)
    :data:`~capsrun.sampling.LADDER_SHIFT` and :data:`~capsrun.sampling.LADDER_TUNE` sweeps (at most
    half the ``steps``), without one 0. A value other than 0 without a ladder is an error."""
    ladder = levels > 1
    if shift is None:
        shift = sampling.LADDER_SHIFT if ladder else 0.0
    if tune is None:
        tune = min(sampling.LADDER_TUNE, steps // 2) if ladder else 0
    shift = build.number(shift, f"{prefix}shift", lambda v: 0 <= v <= 10, "a number in [0, 10] or null", 1.0)
    tune = build.integer(tune, f"{prefix}tune", 0, 500)
    if (shift or tune) and not ladder:
        raise ConfigError(
            f"{prefix}shift and {prefix}tune shape a tempering ladder; give one (2 or more levels) or leave them null"
        )
    return shift, tune


def sampler_base(model, loaders, images: int = 10_000) -> torch.Tensor:
    """The base-rate model at the bottom of a tempering ladder ``[C*H*W]``: the model's own, when
    it was trained with tempering, else the base rate of the first ``images`` training images."""
    if hasattr(model, "base_rate"):
        return model.base_rate
    from capsrun import ais

    if loaders.train is None:
        raise ConfigError("tempering needs the training images for its base-rate model")
    base = ais.base_rate(model.visible_states(sampling.first_images(loaders.train, images)))
    return base.to(next(model.parameters()).device)


def ais_settings(cfg: DictConfig) -> dict[str, int]:
    """``ais.*`` checked: runs >= 1, temperatures >= 2 (0 and 1), base_images >= 1, an int seed."""
    return {
        "runs": build._positive_int(cfg, "ais.runs", example="100"),
        "temperatures": build._positive_int(cfg, "ais.temperatures", minimum=2, example="10000"),
        "base_images": build._positive_int(cfg, "ais.base_images", example="10000"),
        "seed": build._positive_int(cfg, "ais.seed", minimum=0, example="0"),
    }


def ais_log_likelihood(model, loaders, settings: dict[str, int], progress: bool) -> dict[str, float]:
    """The AIS test log-likelihood (and of every other test split) of an energy model, in nats;
    the base-rate model from the first ``base_images`` training images (:mod:`capsrun.ais`)."""
    from capsrun import ais

    if loaders.train is None:
        raise ConfigError("AIS needs the training images for its base-rate model")
    base = ais.base_rate(model.visible_states(sampling.first_images(loaders.train, settings["base_images"])))
    base = base.to(next(model.parameters()).device)
    log.info("AIS: %d runs x %d temperatures ...", settings["runs"], settings["temperatures"])
    result = ais.log_partition(
        model, base, settings["temperatures"], settings["runs"], seed=settings["seed"], progress=progress
    )
    metrics: dict[str, float] = {}
    for name, loader in loaders.evals.items():
        mean_f, n = ais.mean_free_energy(model, (unpack(b)[0] for b in loader.epoch(0)))
        metrics.update(ais.log_likelihood_metrics(result, mean_f, prefix=name))
        log.info(
            "%s log-likelihood %.2f nats per image on %d images (AIS log Z %.2f, std of log weights %.2f, "
            "%d runs x %d temperatures)",
            name,
            metrics[f"{name}/log_likelihood"],
            n,
            result.log_z,
            result.log_w_std,
            result.runs,
            result.temperatures,
        )
    return metrics


def trained_model(path: Path, dev: torch.device) -> tuple[torch.nn.Module, DictConfig, dict[str, Any]]:
    """The model of a checkpoint (:func:`capsrun.build.from_checkpoint`), its config and the
    checkpoint itself."""
    return build.from_checkpoint(path, dev)


def save_png(path: Path, image: torch.Tensor) -> None:
    """An image ``[C, H, W]`` in [0, 1] as a PNG, written atomically."""
    checkpoint.atomic_write(path, lambda f: write_png(image, f))
