"""The task functions behind ``capsrun train`` and ``capsrun eval``: config in, run dir out.

This module and :mod:`capsrun.build` are the only ones that read a config.
"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from capsrun import build, checkpoint
from capsrun.errors import CheckpointError, ConfigError
from capsrun.train import Interrupted, evaluate, evaluate_ensemble, fit

log = logging.getLogger("capsrun")


class StopOnSignal:
    """SIGINT/SIGTERM ask training to stop after the current step (and save); a second one aborts."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("%s: saving a checkpoint after this step (send it again to abort)", signal.Signals(signum).name)

    def __enter__(self) -> StopOnSignal:
        for s in (signal.SIGINT, signal.SIGTERM):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)

    def __call__(self) -> bool:
        return self.signum is not None


def _run_dir() -> Path:
    return Path(HydraConfig.get().runtime.output_dir)


def _swept_hparams(cfg: DictConfig) -> dict[str, Any]:
    """The values that distinguish this run: a few always, plus every command-line override."""
    hp: dict[str, Any] = {
        "model": cfg.model.name,
        "dataset": cfg.dataset.name,
        "routing.iterations": cfg.routing.iterations,
        "seed": cfg.seed,
        "trainer.epochs": cfg.trainer.epochs,
        "trainer.batch_size": cfg.trainer.batch_size,
        "optimizer.lr": cfg.optimizer.lr,
    }
    for override in HydraConfig.get().overrides.task:
        key, _, value = override.lstrip("+~").partition("=")
        if key.startswith("hydra.") or key in ("trainer.resume", "trainer.progress"):
            continue
        try:
            hp[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            hp[key] = value
    return hp


def _resume_path(spec: Any, run_dir: Path) -> Path | None:
    if spec in (None, "never", False):
        return None
    if spec == "auto":
        last = run_dir / "checkpoints" / "last.pt"
        return last if last.is_file() else None
    path = Path(str(spec)).expanduser()
    if not path.is_file():
        raise ConfigError(f"trainer.resume={spec}: no such checkpoint; use auto, never or a path to a .pt file")
    return path


def train(cfg: DictConfig) -> dict[str, float]:
    """``capsrun train``: build, train, evaluate and log one run in the Hydra run dir."""
    build.validate_train(cfg)
    run_dir = _run_dir()
    dev = build.device(cfg.trainer.device)
    resume_from = _resume_path(cfg.trainer.resume, run_dir)
    torch.manual_seed(cfg.seed)
    loaders = build.loaders(cfg, dev)
    model = build.model(cfg).to(dev)
    objective = build.objective(cfg)
    opt = build.optimizer(cfg, model.parameters())
    sched = build.scheduler(cfg, opt)
    n_params = sum(p.numel() for p in model.parameters())
    with StopOnSignal() as stop:
        log.info(
            "%s on %s (%d train / %d test images), %s parameters, device %s, run dir %s",
            cfg.model.name,
            cfg.dataset.name,
            loaders.train.num_examples,
            loaders.tests["test"].num_examples,
            f"{n_params:,}",
            dev,
            run_dir,
        )
        try:
            metrics = fit(
                model,
                objective,
                loaders.train,
                loaders.tests,
                opt,
                sched,
                epochs=cfg.trainer.epochs,
                run_dir=run_dir,
                config=OmegaConf.to_container(cfg, resolve=True),
                hparams=_swept_hparams(cfg),
                resume_from=resume_from,
                log_every=cfg.trainer.log_every,
                num_images=cfg.trainer.num_images,
                progress=cfg.trainer.progress,
                should_stop=stop,
            )
        except Interrupted as e:
            log.warning(
                "%s; continue with: capsrun train hydra.run.dir=%s trainer.resume=auto (and the same overrides)",
                e,
                run_dir,
            )
            sys.exit(128 + (stop.signum or signal.SIGINT))
    log.info(
        "test accuracy %.2f%% (error %.2f%%), best %.2f%%; metrics in %s",
        metrics["test/accuracy"],
        metrics["test/error"],
        metrics["best/test/accuracy"],
        run_dir / "metrics.json",
    )
    return metrics


def _eval_dataset(cfg: DictConfig, trained: DictConfig) -> DictConfig:
    """The dataset config to evaluate on: the checkpoint's, or ``dataset=NAME`` of the same shape."""
    other = cfg.get("dataset")
    if other is None:
        return trained
    shape = ("channels", "image_size", "num_classes")
    if any(other[k] != trained[k] for k in shape):
        raise ConfigError(
            f"dataset={other.name} has {other.channels}x{other.image_size}x{other.image_size} inputs and "
            f"{other.num_classes} classes; the checkpoint was trained on {trained.name} "
            f"({trained.channels}x{trained.image_size}x{trained.image_size}, {trained.num_classes} classes)"
        )
    return other


def evaluate_checkpoint(cfg: DictConfig) -> dict[str, float]:
    """``capsrun eval checkpoint=PATH``: the test metrics of a checkpoint, from its own config.
    ``checkpoint=[A,B,C]`` (or ``checkpoint=A,B,C``) evaluates an ensemble that sums the
    members' capsule lengths (arXiv:1710.09829 Sec. 7), and each member alone."""
    from hydra.utils import to_absolute_path

    if OmegaConf.is_missing(cfg, "checkpoint"):
        raise ConfigError("no checkpoint given; use capsrun eval checkpoint=<run dir>/checkpoints/best.pt")
    specs = list(cfg.checkpoint) if OmegaConf.is_list(cfg.checkpoint) else [cfg.checkpoint]
    paths = [Path(to_absolute_path(str(p))) for p in specs]
    dev = build.device(cfg.trainer.device)
    ckpts = [checkpoint.load(p, map_location=dev) for p in paths]
    configs = [OmegaConf.create(c["config"]) for c in ckpts]
    dataset = _eval_dataset(cfg, configs[0].dataset)
    for path, c in zip(paths[1:], configs[1:]):
        if c.dataset.name != configs[0].dataset.name:
            raise ConfigError(f"{path} was trained on {c.dataset.name}, {paths[0]} on {configs[0].dataset.name}")
    run_cfg = configs[0]
    run_cfg.dataset = dataset
    run_cfg.data = OmegaConf.merge(run_cfg.data, cfg.data)
    build.validate_train(run_cfg)
    loaders = build.loaders(run_cfg, dev, train=False, eval_batch_size=cfg.trainer.batch_size)
    models, metrics = [], {}
    for i, (path, ckpt, c) in enumerate(zip(paths, ckpts, configs)):
        c.dataset = dataset
        model = build.model(c).to(dev)
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            raise CheckpointError(f"{path} does not match its own config ({str(e).splitlines()[0][:160]})") from None
        models.append(model)
        member = "" if len(paths) == 1 else f"member/{i}/"
        for name, loader in loaders.tests.items():
            result = evaluate(model, build.objective(c), loader, progress=cfg.trainer.progress, prefix=name)
            metrics.update({member + k: v for k, v in result.metrics.items()})
            log.info(
                "%s (epoch %d): %s accuracy %.2f%% on %d images",
                path,
                ckpt["epoch"],
                name,
                result.metrics[f"{name}/accuracy"],
                loader.num_examples,
            )
    if len(models) > 1:
        for name, loader in loaders.tests.items():
            metrics.update(evaluate_ensemble(models, loader, prefix=name))
            log.info(
                "ensemble of %d (summed capsule lengths): %s accuracy %.2f%%",
                len(models),
                name,
                metrics[f"{name}/accuracy"],
            )
    checkpoint.save_json(_run_dir() / "metrics.json", {**metrics, "checkpoints": [str(p) for p in paths]})
    return metrics
