"""``capsrun eval checkpoint=PATH``: the test metrics of a checkpoint (an ensemble of several),
from its own config; energy models add the AIS test log-likelihood."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from capsrun import build, checkpoint, registry, settings
from capsrun.commands import common
from capsrun.errors import ConfigError
from capsrun.likelihood import ais_log_likelihood
from capsrun.likelihood import kind as likelihood_kind
from capsrun.plots import per_class_image
from capsrun.registry import ENERGY_MODELS
from capsrun.train import evaluate, evaluate_ensemble

log = logging.getLogger("capsrun")


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

    ais = settings.check_eval(cfg)
    specs = list(cfg.checkpoint) if OmegaConf.is_list(cfg.checkpoint) else [cfg.checkpoint]
    paths = [Path(to_absolute_path(str(p))) for p in specs]
    dev = settings.device(cfg.trainer.device)
    ckpts = [checkpoint.load(p, map_location=dev) for p in paths]
    configs = [registry.stored_config(c, p) for c, p in zip(ckpts, paths)]
    dataset = _eval_dataset(cfg, configs[0].dataset)
    for path, c in zip(paths[1:], configs[1:]):
        if c.dataset.name != configs[0].dataset.name:
            raise ConfigError(f"{path} was trained on {c.dataset.name}, {paths[0]} on {configs[0].dataset.name}")
    run_cfg = configs[0]
    run_cfg.dataset = dataset
    run_cfg.data = build.checkpoint_data(run_cfg.data, cfg.data)
    settings.check_model_run(run_cfg)
    energy = run_cfg.model.name in ENERGY_MODELS
    if energy and len(paths) > 1:
        raise ConfigError(f"an ensemble needs class scores; {run_cfg.model.name} has none: give one checkpoint")
    # the base-rate model of AIS comes from training images
    loaders = build.loaders(run_cfg, dev, train=energy, eval_batch_size=cfg.trainer.batch_size)
    models, metrics = [], {}
    for i, (path, ckpt, c) in enumerate(zip(paths, ckpts, configs)):
        c.dataset = dataset
        model, _, _ = registry.from_checkpoint(path, dev, dataset)
        models.append(model)
        member = "" if len(paths) == 1 else f"member/{i}/"
        objective = registry.objective(c, trusted=False)
        for name, loader in loaders.evals.items():
            result = evaluate(model, objective, loader, progress=cfg.trainer.progress, prefix=name)
            metrics.update({member + k: v for k, v in {**result.metrics, **result.per_class}.items()})
            picture = per_class_image(result.per_class, name, f"{path} (epoch {ckpt['epoch']})")
            if picture is not None:
                common.save_png(common.output_dir() / f"{member.replace('/', '_')}{name}_confusion.png", picture)
            accuracy = result.metrics.get(f"{name}/accuracy")
            shown = (
                f"accuracy {accuracy:.2f}%"
                if accuracy is not None
                else f"pseudo-log-likelihood {result.metrics[f'{name}/log_likelihood/pseudo']:.2f} nats"
            )
            log.info("%s (epoch %d): %s %s on %d images", path, ckpt["epoch"], name, shown, loader.num_examples)
        if energy:
            metrics.update(ais_log_likelihood(model, loaders, ais, cfg.trainer.progress))
            metrics["log_likelihood_kind"] = likelihood_kind(model)
    if len(models) > 1:
        for name, loader in loaders.evals.items():
            metrics.update(evaluate_ensemble(models, loader, prefix=name))
            log.info(
                "ensemble of %d (summed capsule lengths): %s accuracy %.2f%%",
                len(models),
                name,
                metrics[f"{name}/accuracy"],
            )
    out = common.output_dir() / "metrics.json"
    checkpoint.save_json(out, {**metrics, "checkpoints": [str(p) for p in paths]})
    pictures = sorted(p.name for p in out.parent.glob("*_confusion.png"))
    log.info("metrics in %s%s", out, f" (per-class: {', '.join(pictures)})" if pictures else "")
    return metrics
