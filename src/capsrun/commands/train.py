"""``capsrun train``: build, train, evaluate and log one run (a sweep: one per job).

The run's objects come from :mod:`capsrun.build`; the loop is :func:`capsrun.train.fit`. Also
here: the resume rules (``trainer.resume``) and the run's HParams trial for TensorBoard."""

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

from capsrun import build, checkpoint, distributed, rundir, sampling
from capsrun.commands import common
from capsrun.errors import ConfigError
from capsrun.tblog import Trial
from capsrun.train import Interrupted, fit

log = logging.getLogger("capsrun")


class StopOnSignal:
    """SIGINT/SIGTERM ask training to stop after the current step (and save); a second one aborts."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum, frame):
        if self.signum is not None:
            from capsrun.cli import abort

            abort(signum)
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


def _sweep_keys() -> set[str] | None:
    """The keys a multirun sweeps: those given several values on the command line
    (``routing.iterations=1,3``, ``range(...)``) and a sweeper's search space
    (``hydra.sweeper.params``); None for a single run or when the command line is not at hand
    (a job started by a remote launcher)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    keys = set((hydra_cfg.sweeper.get("params") or {}).keys())
    try:
        parsed = OverridesParser.create().parse_overrides([a for a in sys.argv[1:] if "=" in a and a[0] != "-"])
    except Exception:  # an argument the parser does not take: fall back to every override
        return keys or None
    keys |= {o.key_or_group for o in parsed if o.is_sweep_override()}
    return keys or None


def _trial(cfg: DictConfig, run_dir: Path, config: dict[str, Any]) -> Trial:
    """The run as TensorBoard's HParams tab shows it: every command-line override, then the
    settings that always tell runs apart. The keys a multirun sweeps (:func:`_sweep_keys`; in a
    single run every override) are listed first and marked as differing, so TensorBoard ticks
    them. Named by the swept values (the last part of each key: ``iterations=3``) and run dir."""
    overridden: dict[str, Any] = {}
    for override in HydraConfig.get().overrides.task:
        key, _, value = override.lstrip("+~").partition("=")
        if key.startswith("hydra.") or key in ("trainer.resume", "trainer.progress"):
            continue
        try:
            overridden[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            overridden[key] = value
    sweep = _sweep_keys()
    swept = [k for k in overridden if sweep is None or k in sweep]
    always = {
        "model": cfg.model.name,
        "dataset": cfg.dataset.name,
        "routing.iterations": cfg.routing.iterations,
        "seed": cfg.seed,
        "trainer.epochs": cfg.trainer.epochs,
        "trainer.batch_size": cfg.trainer.batch_size,
        "optimizer.lr": cfg.optimizer.lr,
    }
    # the values that tell the runs apart, short: TensorBoard's Trial ID column shows ~18 characters
    shown = " ".join(f"{k.rsplit('.', 1)[-1]}={overridden[k]}" for k in swept) or "defaults"
    return Trial(
        name=f"{shown} ({run_dir.parent.name}/{run_dir.name})",
        hparams={**overridden, **{k: v for k, v in always.items() if k not in overridden}},
        swept=tuple(swept),
        config=config,
    )


def resume_path(spec: Any, run_dir: Path) -> Path | None:
    if spec in (None, "never", False):
        return None
    if spec == "auto":
        last = run_dir / "checkpoints" / "last.pt"
        return last if last.is_file() else None
    path = Path(str(spec)).expanduser()
    if not path.is_file():
        raise ConfigError(f"trainer.resume={spec}: no such checkpoint; use auto, never or a path to a .pt file")
    return path


def check_resume(cfg: DictConfig, run_dir: Path, resume_from: Path | None) -> None:
    """A resume continues the same run: the settings that decide its result (:data:`rundir.FIXED`)
    must match the checkpoint's; a longer or shorter ``trainer.epochs`` is applied with a warning.
    ``trainer.resume=never`` does not overwrite a run dir that already holds a run."""
    last = run_dir / "checkpoints" / "last.pt"
    if resume_from is None:
        if last.is_file():
            raise ConfigError(
                f"{run_dir} already holds a run (checkpoints/last.pt) and trainer.resume={cfg.trainer.resume}: "
                "continue it with trainer.resume=auto, or start over in another hydra.run.dir (nothing was overwritten)"
            )
        return
    saved = checkpoint.load(resume_from)
    current = OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)
    conflicts = rundir.resume_conflicts(saved["config"], current)
    if conflicts:
        key, old, new = conflicts[0]
        more = f" (and {len(conflicts) - 1} more settings)" if len(conflicts) > 1 else ""
        raise ConfigError(
            f"{resume_from} was trained with {key}={old}, this run has {key}={new}{more}; resume with the "
            "checkpoint's settings, or start a new run in another hydra.run.dir"
        )
    trained = rundir.select(saved["config"], "trainer.epochs")
    if trained != cfg.trainer.epochs:
        log.warning(
            "resuming a run configured for %s epochs (at epoch %d) as one of %d epochs",
            trained,
            saved["epoch"],
            cfg.trainer.epochs,
        )


def train(cfg: DictConfig) -> dict[str, float]:
    """``capsrun train``: build, train, evaluate and log one run in the Hydra run dir."""
    build.validate_train(cfg)
    dev = build.device(cfg.trainer.device)
    world = distributed.init(dev.type == "cuda")
    if world.distributed:
        if dev.type == "cuda":
            dev = torch.device("cuda", world.local_rank)
        if not world.is_main:
            log.setLevel(logging.WARNING)
    run_dir = distributed.broadcast(common.output_dir()) if world.distributed else common.output_dir()  # rank 0's
    if world.is_main:  # before anything is read or written: one process per run dir
        rundir.lock(run_dir)
        rundir.clean_stale(run_dir)
        rundir.writable(run_dir / "checkpoints", "checkpoints folder")
    resume_from = resume_path(cfg.trainer.resume, run_dir)
    if world.is_main:
        check_resume(cfg, run_dir, resume_from)
    classifier = common.load_classifier(cfg, dev, cfg.dataset)  # before any data is read: a wrong one fails fast
    run = build.run(cfg, dev, world, lambda model, loaders: _sample_hooks(cfg, model, classifier, loaders))
    run.trial = _trial(cfg, run_dir, run.trial.config)
    with StopOnSignal() as stop:
        log.info(
            "%s on %s (%d train / %d test images), %s parameters, device %s (%s%s%s)%s, run dir %s",
            cfg.model.name,
            cfg.dataset.name,
            run.loaders.train.num_examples,
            run.loaders.evals["test"].num_examples,
            f"{sum(p.numel() for p in run.model.parameters()):,}",
            dev,
            run.precision,
            ", channels-last" if run.channels_last else "",
            f", compiled ({run.compile_mode})" if run.compile_mode else "",
            f" x {world.size} processes ({torch.distributed.get_backend()})" if world.distributed else "",
            run_dir,
        )
        try:
            metrics = fit(run, build.loop(cfg), run_dir, resume_from, should_stop=stop)
        except Interrupted as e:
            log.warning(
                "%s; continue with: capsrun train hydra.run.dir=%s trainer.resume=auto (and the same overrides)",
                e,
                run_dir,
            )
            sys.exit(128 + (stop.signum or signal.SIGINT))
    distributed.shutdown()
    best = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k.startswith("best/"))
    if "test/accuracy" in metrics:
        result = f"test accuracy {metrics['test/accuracy']:.2f}% (error {metrics['test/error']:.2f}%)"
    else:
        result = "test " + ", ".join(f"{k[5:]} {v:.4g}" for k, v in metrics.items() if k.startswith("test/"))
    log.info("%s, %s; metrics in %s", result, best, run_dir / "metrics.json")
    return metrics


def _sample_hooks(cfg: DictConfig, model, classifier, loaders) -> list:
    """For a model that generates: the sample grid every epoch, and with ``eval_classifier`` the
    sample-quality metrics (every ``sample_quality.every_epochs`` epochs and after the last); for
    an energy model also its AIS test log-likelihood after the last epoch (``ais.at_end``)."""
    sq = cfg.sample_quality
    every = build._positive_int(cfg, "sample_quality.every_epochs", minimum=0, example="1")
    if sampling.can_sample_chains(model):
        chains = build._positive_int(cfg, "model.samples.chains", example="100")
        steps = build._positive_int(cfg, "model.samples.gibbs_steps", example="1000")
        tempering = build._positive_int(cfg, "model.samples.tempering", example="10")
        lowest = OmegaConf.select(cfg, "model.samples.ladder_from", default=0)
        ladder_from = common.ladder_from_setting(
            lowest, "model.samples.ladder_from", tempering, "model.samples.tempering"
        )
        trained_from = OmegaConf.select(cfg, "model.ladder_from", default=0) or 0
        if 0 < ladder_from < trained_from:
            raise ConfigError(
                f"model.samples.ladder_from={ladder_from} is below the training ladder's lowest level "
                f"(model.ladder_from={trained_from}); e.g. model.samples.ladder_from={trained_from}"
            )
        shift, tune = common.ladder_start_settings(
            OmegaConf.select(cfg, "model.samples.ladder_shift", default=0),
            OmegaConf.select(cfg, "model.samples.ladder_tune", default=0),
            "model.samples.ladder_",
            tempering,
            steps,
        )
        confidence = common.confidence_setting(sq.confidence, "sample_quality.confidence")
        common.reference_settings(sq)
        judge = None
        if classifier is None:
            log.info(
                "sample quality skipped: set eval_classifier=<best.pt of a capsnet trained on %s>", cfg.dataset.name
            )
        else:
            judge = common.judge(classifier, model, loaders.evals["test"], sq)
        hooks: list = [
            sampling.ChainSamples(
                model.image_shape,
                chains=chains,
                steps=steps,
                seed=cfg.seed,
                judge=judge,
                num_classes=cfg.dataset.num_classes,
                every_epochs=every,
                confidence=confidence,
                tempering=tempering,
                base=common.sampler_base(model, loaders) if tempering > 1 else None,
                ladder_from=ladder_from,
                ladder_shift=shift,
                ladder_tune=tune,
            )
        ]
        if cfg.ais.at_end:
            settings, progress = common.ais_settings(cfg), cfg.trainer.progress

            def log_likelihood(m, epoch: int, last: bool) -> dict:
                return common.ais_log_likelihood(m, loaders, settings, progress) if last else {}

            hooks.append(log_likelihood)
        return hooks
    if not sampling.can_generate(model):
        if classifier is not None:
            log.warning("eval_classifier is ignored: %s does not generate images", cfg.model.name)
        return []
    if classifier is None:
        log.info(
            "sample quality skipped: no classifier; set eval_classifier=<best.pt of a capsnet trained on %s>",
            cfg.dataset.name,
        )
    real = None if classifier is None else sampling.first_images(loaders.evals["test"], sq.real_images)
    return [
        sampling.SampleQuality(
            cfg.dataset.num_classes,
            classifier,
            real,
            per_class=sq.per_class,
            grid_per_class=sq.grid_per_class,
            every_epochs=every,
            seed=cfg.seed,
        )
    ]
