"""``capsrun train``: build, train, evaluate and log one run (a sweep: one per job).

The settings are checked by :mod:`capsrun.settings`, the run's objects come from
:mod:`capsrun.build`, the loop is :func:`capsrun.train.fit` and the resume rules are
:mod:`capsrun.resume`'s. Also here: Ctrl-C and SIGTERM, and the run's HParams trial."""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from capsrun import build, distributed, rundir, settings
from capsrun.commands import common
from capsrun.errors import abort
from capsrun.registry import ENERGY_MODELS
from capsrun.resume import check_resume, resume_path
from capsrun.tblog import Trial
from capsrun.train import Interrupted, fit

log = logging.getLogger("capsrun")


class StopOnSignal:
    """SIGINT/SIGTERM ask training to stop after the current step (and save); a second one aborts.
    Within :meth:`urgent` (the end-of-epoch work, whose epoch is already saved) the first one
    stops at once."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, Any] = {}
        self._urgent = False

    def _handle(self, signum, frame):
        if self.signum is not None:
            abort(signum)
        self.signum = signum
        if self._urgent:
            log.warning("%s: stopping the end-of-epoch work now (the epoch is saved)", signal.Signals(signum).name)
            raise Interrupted("stopped")
        log.warning("%s: saving a checkpoint after this step (send it again to abort)", signal.Signals(signum).name)

    @contextlib.contextmanager
    def urgent(self) -> Iterator[None]:
        """A block in which a stop request raises :class:`~capsrun.train.Interrupted` at once (and
        on entry, if one came before)."""
        if self.signum is not None:
            raise Interrupted("stopped")
        self._urgent = True
        try:
            yield
        finally:
            self._urgent = False

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
    overrides = rundir.run_overrides(list(HydraConfig.get().overrides.task))
    overridden: dict[str, Any] = {key: rundir.yaml_value(text) for key, text in overrides}
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
    # a sweep's job dir is named by its values (conf/hydra/capsrun.yaml): the sweep's dir tells sweeps apart
    where = run_dir.parent.name if sweep is not None else f"{run_dir.parent.name}/{run_dir.name}"
    return Trial(
        name=f"{shown} ({where})",
        hparams={**overridden, **{k: v for k, v in always.items() if k not in overridden}},
        swept=tuple(swept),
        config=config,
    )


def train(cfg: DictConfig) -> dict[str, float]:
    """``capsrun train``: build, train, evaluate and log one run in the Hydra run dir."""
    checked = settings.check_train(cfg, energy=cfg.model.name in ENERGY_MODELS)
    dev = settings.device(cfg.trainer.device)
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
    run = build.run(cfg, dev, world, checked, classifier)
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
    del run  # its DistributedDataParallel model holds the process group: freed before the teardown
    distributed.shutdown()
    best = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k.startswith("best/"))
    if "test/accuracy" in metrics:
        result = f"test accuracy {metrics['test/accuracy']:.2f}% (error {metrics['test/error']:.2f}%)"
    else:
        result = "test " + ", ".join(f"{k[5:]} {v:.4g}" for k, v in metrics.items() if k.startswith("test/"))
    log.info("%s, %s; metrics in %s", result, best, run_dir / "metrics.json")
    return metrics
