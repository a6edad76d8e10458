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
from capsrun.errors import ConfigError
from capsrun.train import Interrupted, evaluate, fit

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
            loaders.test.num_examples,
            f"{n_params:,}",
            dev,
            run_dir,
        )
        try:
            metrics = fit(
                model,
                objective,
                loaders.train,
                loaders.test,
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


def evaluate_checkpoint(cfg: DictConfig) -> dict[str, float]:
    """``capsrun eval checkpoint=PATH``: the test metrics of a checkpoint, from its own config."""
    from hydra.utils import to_absolute_path

    if OmegaConf.is_missing(cfg, "checkpoint"):
        raise ConfigError("no checkpoint given; use capsrun eval checkpoint=<run dir>/checkpoints/best.pt")
    path = Path(to_absolute_path(str(cfg.checkpoint)))
    dev = build.device(cfg.trainer.device)
    ckpt = checkpoint.load(path, map_location=dev)
    run_cfg = OmegaConf.create(ckpt["config"])
    run_cfg.data = OmegaConf.merge(run_cfg.data, cfg.data)
    build.validate_train(run_cfg)
    loaders = build.loaders(run_cfg, dev, train=False, eval_batch_size=cfg.trainer.batch_size)
    model = build.model(run_cfg).to(dev)
    model.load_state_dict(ckpt["model"])
    result = evaluate(model, build.objective(run_cfg), loaders.test)
    metrics = {**result.metrics, "epoch": ckpt["epoch"]}
    checkpoint.save_json(_run_dir() / "metrics.json", metrics)
    log.info(
        "%s (epoch %d): test accuracy %.2f%% (error %.2f%%) on %d images",
        path,
        ckpt["epoch"],
        metrics["test/accuracy"],
        metrics["test/error"],
        loaders.test.num_examples,
    )
    return metrics
