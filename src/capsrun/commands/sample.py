"""``capsrun sample checkpoint=PATH``: sample grids from a checkpoint (VCaps classes, CapsNet
perturbations, energy-model chains: :mod:`capsrun.commands.sample_chains`), as PNG and
TensorBoard, with their quality."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from capsrun import build, checkpoint, registry, sampling, settings
from capsrun.batch import first_images, unpack
from capsrun.commands import common, sample_chains
from capsrun.errors import ConfigError

log = logging.getLogger("capsrun")


def sample(cfg: DictConfig) -> dict[str, float]:
    """``capsrun sample checkpoint=PATH``: class-conditional samples and posterior variations
    (variational capsules) and the capsule-perturbation grid (every capsule model), as PNG grids
    and TensorBoard images in the run dir; sample quality with ``eval_classifier``."""
    from hydra.utils import to_absolute_path

    from capsrun.tblog import TBLogger

    checked = settings.check_sample(cfg)
    path = Path(to_absolute_path(str(cfg.checkpoint)))
    dev = settings.device(cfg.trainer.device)
    model, run_cfg, ckpt = registry.from_checkpoint(path, dev)
    if sampling.can_sample_chains(model):
        return sample_chains.sample_chains(cfg, checked, model, run_cfg, path, ckpt["epoch"])
    if not hasattr(model, "decoder") or model.decoder is None:
        raise ConfigError(f"{path} is a {run_cfg.model.name} without a decoder: it cannot draw images")
    model.eval()
    torch.manual_seed(cfg.seed)
    run_cfg.data = build.checkpoint_data(run_cfg.data, cfg.data)
    loaders = build.loaders(run_cfg, dev, train=False, eval_batch_size=cfg.trainer.batch_size)
    x = unpack(next(iter(loaders.evals["test"].epoch(0))))[0][: cfg.inputs]
    out_dir, tb, metrics = common.output_dir(), TBLogger(common.output_dir()), {}
    written: list[Path] = []

    def emit(name: str, image: torch.Tensor) -> None:
        common.save_png(out_dir / f"{name}.png", image)
        tb.image(f"samples/{name}", image, 0)
        written.append(out_dir / f"{name}.png")

    try:
        classes = run_cfg.dataset.num_classes
        if sampling.can_generate(model):
            gen = torch.Generator().manual_seed(cfg.seed)
            images, _ = sampling.class_conditional(model, classes, cfg.samples_per_class, gen)
            classifier = common.load_classifier(cfg, dev, run_cfg.dataset)
            emit("class_conditional", sampling.judged_grid(images, cfg.samples_per_class, classifier))
            var = sampling.posterior_variations(model, x, cfg.variations, cfg.variation_scale)
            rows = torch.cat([x.unsqueeze(1).to(var.dtype), var], dim=1)  # the input first
            emit("variations", sampling.judged_grid(rows.flatten(0, 1), cfg.variations + 1))
            if classifier is None:
                log.info(
                    "sample quality skipped: set eval_classifier=<best.pt of a capsnet trained on %s>",
                    run_cfg.dataset.name,
                )
            else:
                real = first_images(loaders.evals["test"], checked.judging.real_images)
                quality = sampling.SampleQuality(
                    classes, classifier, real, per_class=checked.judging.per_class, seed=cfg.seed
                )
                metrics.update(quality.measure(model))
                tb.scalars(metrics, 0)
                log.info(
                    "samples: %.2f%% recognised by the classifier, Frechet distance %.3f",
                    metrics["samples/classifier_accuracy"],
                    metrics["samples/frechet_distance"],
                )
        steps = round(cfg.perturb.range / cfg.perturb.step)
        deltas = torch.arange(-steps, steps + 1, dtype=torch.float32) * cfg.perturb.step
        grids = sampling.capsule_perturbations(model, x, deltas)  # [n, dim, m, C, H, W]
        for i, g in enumerate(grids):
            emit(f"perturbations_{i}", sampling.grid(g.flatten(0, 1), len(deltas)))
    finally:
        tb.close()
    checkpoint.save_json(out_dir / "metrics.json", {**metrics, "checkpoint": str(path)})
    log.info("%d grids from %s (%s, epoch %d) in %s", len(written), path, run_cfg.model.name, ckpt["epoch"], out_dir)
    return metrics
