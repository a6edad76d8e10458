"""``capsrun bench``: train and eval images/s and peak memory per model and speed setting,
against the eager fp32 reference of each (timing in :mod:`capsrun.bench`)."""

from __future__ import annotations

import logging
import sys
from typing import Any

import torch
from omegaconf import DictConfig

from capsrun import build, checkpoint, registry, settings, speed
from capsrun.commands import common
from capsrun.errors import ConfigError

log = logging.getLogger("capsrun")


def bench(cfg: DictConfig) -> dict[str, Any]:
    """``capsrun bench``: train and eval images/s and peak memory per model and speed setting,
    each with its ratio over the straightforward eager reference measured in the same run;
    a table on stdout and in ``bench.md``, the figures in ``bench.json`` (see :mod:`capsrun.bench`)."""
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from capsrun import bench as benchmark

    dev = settings.device(cfg.trainer.device)
    warmup, steps, repeats = settings.check_bench(cfg, cpu=dev.type == "cpu")
    groups = _bench_settings(cfg, dev)
    with logging_redirect_tqdm():  # log lines above the progress bar, not through it
        results = _bench_all(cfg, dev, groups, warmup, steps, repeats, tqdm)
    benchmark.with_ratios(results)
    speed.set_matmul_precision("fp32")
    header = (
        f"# capsrun bench\n\ndevice: {benchmark.device_description(dev)}; torch {torch.__version__}; "
        f"dataset shape: {cfg.dataset}; {warmup} warm-up steps, then {repeats} blocks of {steps} timed steps per "
        "figure (images/s from the median block; spread: interquartile range over the median); "
        f"synthetic batches\n\ncommand: `{' '.join(sys.argv)}`\n"
    )
    text = f"{header}\n{benchmark.table(results)}\n"
    print(text)
    run_dir = common.output_dir()
    checkpoint.atomic_write(run_dir / "bench.md", lambda f: f.write(text.encode()))
    rows = [m.row() for m in results]
    checkpoint.save_json(
        run_dir / "bench.json",
        {
            "device": benchmark.device_description(dev),
            "torch": torch.__version__,
            "command": " ".join(sys.argv),
            "warmup": warmup,
            "steps": steps,
            "repeats": repeats,
            "results": rows,
        },
    )
    log.info("bench table in %s", run_dir / "bench.md")
    return {"results": rows}


NOISY = 0.10  # a spread above this between timed blocks: the figure is not to be trusted


def _bench_all(cfg: DictConfig, dev: torch.device, groups, warmup: int, steps: int, repeats: int, tqdm) -> list:
    """One :class:`capsrun.bench.Measurement` per setting, each on a freshly built model."""
    from capsrun import bench as benchmark

    cpu = dev.type == "cpu"
    results = []
    for s in tqdm(groups, desc="bench", disable=None if cfg.trainer.progress else True):
        run_cfg = _bench_config(cfg, s.model, s.iterations or 3, s.batch_size)
        torch.manual_seed(cfg.seed)
        torch._dynamo.reset()  # a fresh model per setting: do not run into dynamo's recompile limit
        model = registry.model(run_cfg).to(dev)
        objective = registry.objective(run_cfg).to(dev)
        ds = run_cfg.dataset
        per_image = 2 if ds.name == "multimnist" else 1
        batch = benchmark.synthetic_batch(
            s.batch_size, ds.channels, ds.image_size, ds.num_classes, per_image, dev, cfg.seed
        )
        m = benchmark.measure(
            s, model, objective, build.optimizers(run_cfg, model, objective), batch, warmup, steps, repeats
        )
        results.append(m)
        log.info(
            "%s: train %s img/s (spread %.0f%%), eval %s img/s (spread %.0f%%)",
            s,
            f"{m.train_images_per_second:,.1f}",
            100 * m.train_spread,
            f"{m.eval_images_per_second:,.1f}",
            100 * m.eval_spread,
        )
        if max(m.train_spread, m.eval_spread) > NOISY:
            log.warning(
                "%s: the timed blocks differ by %.0f%% (more than %.0f%%): the machine is busy or the steps vary; "
                "close other work or raise steps= and repeats=",
                s,
                100 * max(m.train_spread, m.eval_spread),
                100 * NOISY,
            )
        del model, objective, batch
        if not cpu:
            torch.cuda.empty_cache()
    return results


def _bench_config(cfg: DictConfig, model: str, iterations: int, batch_size: int) -> DictConfig:
    """The training config of one benchmarked model, composed like ``capsrun train model=...``."""
    from hydra import compose
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    overrides = [
        f"model={model}",
        f"dataset={cfg.dataset}",
        f"routing.iterations={iterations}",
        f"trainer.batch_size={batch_size}",
        *cfg.overrides,
    ]
    try:
        return compose(config_name="train", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(f"bench: cannot compose {' '.join(overrides)}: {str(e).splitlines()[0]}") from None


def _bench_settings(cfg: DictConfig, dev: torch.device) -> list:
    """Every (model, routing iterations, batch size) group: its reference (fp32, eager, NCHW)
    first, then each other precision x compile setting. TF32 is skipped on a CPU (it is fp32)."""
    from capsrun.bench import Setting

    found = []
    for name in cfg.models:
        # routed: the model's iterations follow routing.iterations (every capsule model's do)
        routed = _bench_config(cfg, name, 3, 128).model.net.get("routing_iterations") == 3 and (
            _bench_config(cfg, name, 1, 128).model.net.get("routing_iterations") == 1
        )
        for iterations in cfg.iterations if routed else [None]:
            for size in cfg.batch_sizes:
                group = [Setting(name, iterations, size)]
                for precision in cfg.precisions:
                    if precision == "tf32" and dev.type != "cuda":
                        continue
                    for compiled in cfg.compile:
                        s = Setting(
                            name,
                            iterations,
                            size,
                            precision,
                            bool(compiled),
                            speed.use_channels_last("auto", precision),
                        )
                        if not s.reference:
                            group.append(s)
                found.extend(group)
    return found
