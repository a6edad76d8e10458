"""``capsrun analyze checkpoint=PATH``: capsule health of a checkpoint, a run dir or a multirun dir."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import DictConfig

from capsrun import build, checkpoint, registry, rundir, settings
from capsrun.batch import unpack
from capsrun.commands import common
from capsrun.errors import ConfigError

log = logging.getLogger("capsrun")


def _analyze_targets(path: Path) -> list[tuple[Path, Path]]:
    """``(run dir, checkpoint)`` pairs: a .pt file; a run dir; or every run dir below a directory."""
    if path.is_file():
        return [(path.parent.parent if path.parent.name == "checkpoints" else path.parent, path)]
    if not path.is_dir():
        raise ConfigError(f"checkpoint={path}: no such file or directory; give a .pt file, a run dir or a multirun dir")
    runs = sorted(
        {p.parent for p in path.rglob("checkpoints")}, key=lambda p: [int(s) if s.isdigit() else s for s in p.parts]
    )
    pairs = []
    for run in runs:
        for name in ("best.pt", "last.pt"):
            if (run / "checkpoints" / name).is_file():
                pairs.append((run, run / "checkpoints" / name))
                break
    if not pairs:
        raise ConfigError(f"no checkpoints/best.pt or last.pt under {path}; give a run dir of capsrun train")
    return pairs


def _run_overrides(run_dir: Path) -> list[str]:
    """A run's command-line settings (:func:`capsrun.rundir.run_overrides`), as ``key=value``."""
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    return [f"{key}={text}" for key, text in rundir.run_overrides(yaml.safe_load(path.read_text()) or [])]


def _run_labels(runs: list[Path]) -> list[str]:
    """Name each run by the overrides that set it apart from the others (a sweep's swept
    values), else by its directory."""
    overrides = [_run_overrides(r) for r in runs]
    common = set.intersection(*(set(o) for o in overrides))
    labels = [" ".join(o for o in over if o not in common) for over in overrides]
    return [label or run.name for label, run in zip(labels, runs)]


def analyze(cfg: DictConfig) -> dict[str, Any]:
    """``capsrun analyze checkpoint=PATH``: capsule health (:mod:`capsrun.diagnostics`) of one
    checkpoint or of every run below a directory, as a table, ``health.json`` and the images (mean
    couplings; the capsule RBM's parse of the first test images) as PNGs."""
    from hydra.utils import to_absolute_path

    from capsrun import diagnostics

    settings.check_analyze(cfg)
    root = Path(to_absolute_path(str(cfg.checkpoint)))
    dev = settings.device(cfg.trainer.device)
    affine = diagnostics.AffineSpec(**cfg.affine)
    report: dict[str, Any] = {}
    targets = _analyze_targets(root)
    for (run_dir, path), label in zip(targets, _run_labels([t[0] for t in targets])):
        model, run_cfg, ckpt = registry.from_checkpoint(path, dev)
        run_cfg.data = build.checkpoint_data(run_cfg.data, cfg.data)
        run_cfg.data.train_limit = run_cfg.data.test_limit = None
        train = cfg.split == "train"
        loaders = build.loaders(run_cfg, dev, train=train, eval_batch_size=cfg.trainer.batch_size)
        source = loaders.train.epoch(0) if train else loaders.evals["test"].epoch(0)
        batches, n = [], 0
        for batch in source:
            batches.append(unpack(batch))
            n += len(batches[-1][0])
            if n >= cfg.examples:
                break
        x = torch.cat([b[0] for b in batches])[: cfg.examples]
        health = diagnostics.measure(
            model,
            x,
            threshold=cfg.dead_threshold,
            full=True,
            affine=affine,
            seed=cfg.seed,
            batch_size=cfg.trainer.batch_size,
        )
        # gradient norms of the training loss on the first batch, as training would see them
        bx, by, target = batches[0]
        objective = registry.objective(run_cfg, trusted=False).to(dev)
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            objective(model(bx, by), target, by)["total"].backward()
        health.scalars = {**diagnostics.gradient_norms(model), **health.scalars}  # rows in forward order
        model.zero_grad(set_to_none=True)
        pictures = []  # the mean couplings and, for the capsule RBM, the parse of the first images
        prefix = "" if len(targets) == 1 else label.replace(" ", "_").replace("/", "-") + "_"
        for tag, image in health.images.items():
            name = f"{prefix}{tag.replace('/', '_')}.png"
            common.save_png(common.output_dir() / name, image)
            pictures.append(name)
        report[str(path)] = {
            "run": label,
            "model": run_cfg.model.name,
            "dataset": run_cfg.dataset.name,
            "epoch": ckpt["epoch"],
            "test/accuracy": (ckpt.get("state") or {}).get("last_metrics", {}).get("test/accuracy"),
            "health": health.scalars,
            "images": pictures,
        }
        log.info(
            "analyzed %s (%s, epoch %d) on %d %s images", path, run_cfg.model.name, ckpt["epoch"], len(x), cfg.split
        )
    table = diagnostics.health_table({v["run"]: v["health"] for v in report.values()})
    print(table)
    out = common.output_dir() / "health.json"
    checkpoint.save_json(out, {"split": cfg.split, "examples": cfg.examples, "runs": report})
    log.info("health of %d run(s) in %s", len(report), out)
    return report
