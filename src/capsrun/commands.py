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

from capsrun import build, checkpoint, distributed, rundir, sampling, speed
from capsrun.errors import ConfigError
from capsrun.tblog import Trial
from capsrun.train import Interrupted, evaluate, evaluate_ensemble, fit

log = logging.getLogger("capsrun")

ENERGY_MODELS = ("rbm", "capsrbm")  # model.name of the energy models: no classes, log-likelihood by AIS


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


def _run_dir() -> Path:
    return Path(HydraConfig.get().runtime.output_dir)


def _stored_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config a checkpoint keeps, its data root absolute, so that eval, sample and
    analyze find the data from any working directory."""
    config = OmegaConf.to_container(cfg, resolve=True)
    config["data"]["root"] = str(Path(config["data"]["root"]).expanduser().absolute())
    return config


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
        if cfg.trainer.batch_size % world.size:
            fix = cfg.trainer.batch_size // world.size * world.size or world.size
            raise ConfigError(
                f"trainer.batch_size={cfg.trainer.batch_size} (the global batch) must divide by the "
                f"{world.size} processes; e.g. trainer.batch_size={fix}"
            )
        if not world.is_main:
            log.setLevel(logging.WARNING)
    run_dir = distributed.broadcast(_run_dir()) if world.distributed else _run_dir()  # rank 0's
    if world.is_main:  # before anything is read or written: one process per run dir
        rundir.lock(run_dir)
        rundir.clean_stale(run_dir)
        rundir.writable(run_dir / "checkpoints", "checkpoints folder")
    resume_from = resume_path(cfg.trainer.resume, run_dir)
    if world.is_main:
        check_resume(cfg, run_dir, resume_from)
    classifier = _classifier(cfg, dev, cfg.dataset)  # before any data is read: a wrong one fails fast
    torch.manual_seed(cfg.seed)
    loaders = build.loaders(cfg, dev)
    build.check_images(cfg, loaders)
    model = build.model(cfg).to(dev)
    build.check_input(model, cfg)
    precision = build.precision(cfg)
    if speed.use_channels_last(cfg.trainer.channels_last, precision):
        model = speed.to_channels_last(model)
    objective = build.objective(cfg).to(dev)
    opts = build.optimizers(cfg, model, objective)
    sched = build.scheduler(cfg, opts[0], total_steps=cfg.trainer.epochs * len(loaders.train))
    hooks = _sample_hooks(cfg, model, classifier, loaders)
    health = build.health_monitor(cfg, loaders.tests["test"])
    train_model, train_loader, test_loaders = model, loaders.train, loaders.tests
    if world.distributed:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
        train_loader = distributed.ShardedLoader(loaders.train, world)
        test_loaders = {k: distributed.ShardedLoader(v, world) for k, v in loaders.tests.items()}
        # different training-time noise (VCaps samples) on each rank, the same on every launch
        torch.manual_seed(cfg.seed * 1_000_003 + world.rank)
    eval_model = None
    mode = build.compile_mode(cfg)
    if mode is not None:  # full batches compiled, the last partial one eager (speed.Compiled)
        train_model = speed.Compiled(train_model, {cfg.trainer.batch_size // world.size}, mode)
        eval_model = speed.Compiled(model, {-(-cfg.trainer.eval_batch_size // world.size)}, mode)
    n_params = sum(p.numel() for p in model.parameters())
    with StopOnSignal() as stop:
        log.info(
            "%s on %s (%d train / %d test images), %s parameters, device %s (%s%s%s)%s, run dir %s",
            cfg.model.name,
            cfg.dataset.name,
            loaders.train.num_examples,
            loaders.tests["test"].num_examples,
            f"{n_params:,}",
            dev,
            precision,
            ", channels-last" if speed.use_channels_last(cfg.trainer.channels_last, precision) else "",
            f", compiled ({mode})" if mode else "",
            f" x {world.size} processes ({torch.distributed.get_backend()})" if world.distributed else "",
            run_dir,
        )
        try:
            metrics = fit(
                model,
                objective,
                train_loader,
                test_loaders,
                opts,
                sched,
                epochs=cfg.trainer.epochs,
                run_dir=run_dir,
                config=_stored_config(cfg),
                trial=_trial(cfg, run_dir, build.shown_config(cfg, cfg.trainer.epochs * len(loaders.train))),
                resume_from=resume_from,
                log_every=cfg.trainer.log_every,
                num_images=cfg.trainer.num_images,
                progress=cfg.trainer.progress,
                should_stop=stop,
                epoch_hooks=hooks,
                step_hooks=[] if health is None else [health],
                train_model=train_model,
                eval_model=eval_model,
                precision=precision,
                world=world,
            )
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


def _classifier(cfg: DictConfig, dev: torch.device, dataset: DictConfig):
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


def _sample_hooks(cfg: DictConfig, model, classifier, loaders) -> list:
    """For a model that generates: the sample grid every epoch, and with ``eval_classifier`` the
    sample-quality metrics (every ``sample_quality.every_epochs`` epochs and after the last); for
    an energy model also its AIS test log-likelihood after the last epoch (``ais.at_end``)."""
    sq = cfg.sample_quality
    every = build._positive_int(cfg, "sample_quality.every_epochs", minimum=0, example="1")
    if sampling.can_sample_chains(model):
        chains = build._positive_int(cfg, "model.samples.chains", example="100")
        steps = build._positive_int(cfg, "model.samples.gibbs_steps", example="1000")
        confidence = _confidence(sq.confidence, "sample_quality.confidence")
        real = None
        if classifier is None:
            log.info(
                "sample quality skipped: set eval_classifier=<best.pt of a capsnet trained on %s>", cfg.dataset.name
            )
        else:
            real = model.visible_states(sampling.first_images(loaders.tests["test"], sq.real_images))
        hooks: list = [
            sampling.ChainSamples(
                model.image_shape,
                chains=chains,
                steps=steps,
                seed=cfg.seed,
                classifier=classifier,
                real_images=real,
                num_classes=cfg.dataset.num_classes,
                every_epochs=every,
                confidence=confidence,
            )
        ]
        if cfg.ais.at_end:
            settings, progress = _ais_settings(cfg), cfg.trainer.progress

            def log_likelihood(m, epoch: int, last: bool) -> dict:
                return _log_likelihood(m, loaders, settings, progress) if last else {}

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
    real = None if classifier is None else sampling.first_images(loaders.tests["test"], sq.real_images)
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


def _confidence(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ConfigError(f"{key} must be a number in (0, 1), got {value!r}; e.g. {key}=0.9")
    return float(value)


def _ais_settings(cfg: DictConfig) -> dict[str, int]:
    """``ais.*`` checked: runs >= 1, temperatures >= 2 (0 and 1), base_images >= 1, an int seed."""
    return {
        "runs": build._positive_int(cfg, "ais.runs", example="100"),
        "temperatures": build._positive_int(cfg, "ais.temperatures", minimum=2, example="10000"),
        "base_images": build._positive_int(cfg, "ais.base_images", example="10000"),
        "seed": build._positive_int(cfg, "ais.seed", minimum=0, example="0"),
    }


def _log_likelihood(model, loaders, settings: dict[str, int], progress: bool) -> dict[str, float]:
    """The AIS test log-likelihood (and of every other test split) of an energy model, in nats;
    the base-rate model from the first ``base_images`` training images (:mod:`capsrun.ais`)."""
    from capsrun import ais
    from capsrun.train import unpack

    if loaders.train is None:
        raise ConfigError("AIS needs the training images for its base-rate model")
    base = ais.base_rate(model.visible_states(sampling.first_images(loaders.train, settings["base_images"])))
    base = base.to(next(model.parameters()).device)
    log.info("AIS: %d runs x %d temperatures ...", settings["runs"], settings["temperatures"])
    result = ais.log_partition(
        model, base, settings["temperatures"], settings["runs"], seed=settings["seed"], progress=progress
    )
    metrics: dict[str, float] = {}
    for name, loader in loaders.tests.items():
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
    configs = [build.stored_config(c, p) for c, p in zip(ckpts, paths)]
    dataset = _eval_dataset(cfg, configs[0].dataset)
    for path, c in zip(paths[1:], configs[1:]):
        if c.dataset.name != configs[0].dataset.name:
            raise ConfigError(f"{path} was trained on {c.dataset.name}, {paths[0]} on {configs[0].dataset.name}")
    run_cfg = configs[0]
    run_cfg.dataset = dataset
    run_cfg.data = build.checkpoint_data(run_cfg.data, cfg.data)
    build.validate_train(run_cfg)
    energy = run_cfg.model.name in ENERGY_MODELS
    if energy and len(paths) > 1:
        raise ConfigError(f"an ensemble needs class scores; {run_cfg.model.name} has none: give one checkpoint")
    ais_settings = _ais_settings(cfg) if energy else None  # checked before any data is read
    # the base-rate model of AIS comes from training images
    loaders = build.loaders(run_cfg, dev, train=energy, eval_batch_size=cfg.trainer.batch_size)
    models, metrics = [], {}
    for i, (path, ckpt, c) in enumerate(zip(paths, ckpts, configs)):
        c.dataset = dataset
        model, _, _ = build.from_checkpoint(path, dev, dataset)
        models.append(model)
        member = "" if len(paths) == 1 else f"member/{i}/"
        objective = build.objective(c, trusted=False)
        for name, loader in loaders.tests.items():
            result = evaluate(model, objective, loader, progress=cfg.trainer.progress, prefix=name)
            metrics.update({member + k: v for k, v in result.metrics.items()})
            shown = f"{name}/accuracy" if f"{name}/accuracy" in result.metrics else f"{name}/log_likelihood/pseudo"
            log.info(
                "%s (epoch %d): %s %s %.2f on %d images",
                path,
                ckpt["epoch"],
                name,
                shown.split("/", 1)[1],
                result.metrics[shown],
                loader.num_examples,
            )
        if energy:
            metrics.update(_log_likelihood(model, loaders, ais_settings, cfg.trainer.progress))
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


def _trained_model(path: Path, dev: torch.device) -> tuple[torch.nn.Module, DictConfig, dict[str, Any]]:
    """The model of a checkpoint (:func:`capsrun.build.from_checkpoint`), its config and the
    checkpoint itself."""
    return build.from_checkpoint(path, dev)


def _save_png(path: Path, image: torch.Tensor) -> None:
    from torchvision.utils import save_image

    checkpoint.atomic_write(path, lambda f: save_image(image, f, format="png"))


def sample(cfg: DictConfig) -> dict[str, float]:
    """``capsrun sample checkpoint=PATH``: class-conditional samples and posterior variations
    (variational capsules) and the capsule-perturbation grid (every capsule model), as PNG grids
    and TensorBoard images in the run dir; sample quality with ``eval_classifier``."""
    from hydra.utils import to_absolute_path

    from capsrun.tblog import TBLogger

    if OmegaConf.is_missing(cfg, "checkpoint"):
        raise ConfigError("no checkpoint given; use capsrun sample checkpoint=<run dir>/checkpoints/best.pt")
    for key in ("samples_per_class", "inputs", "variations", "num_samples", "gibbs_steps"):
        value = cfg[key]  # every setting checked, also those this checkpoint's model does not use
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{key} must be an integer >= 1, got {value!r}; e.g. {key}=8")
    if not cfg.perturb.step > 0 or not cfg.perturb.range >= 0:
        raise ConfigError("perturb.step must be > 0 and perturb.range >= 0; e.g. perturb.range=0.25 perturb.step=0.05")
    path = Path(to_absolute_path(str(cfg.checkpoint)))
    dev = build.device(cfg.trainer.device)
    model, run_cfg, ckpt = _trained_model(path, dev)
    if sampling.can_sample_chains(model):
        return _sample_chains(cfg, model, run_cfg, dev, path, ckpt["epoch"])
    if not hasattr(model, "decoder") or model.decoder is None:
        raise ConfigError(f"{path} is a {run_cfg.model.name} without a decoder: it cannot draw images")
    model.eval()
    torch.manual_seed(cfg.seed)
    run_cfg.data = build.checkpoint_data(run_cfg.data, cfg.data)
    loaders = build.loaders(run_cfg, dev, train=False, eval_batch_size=cfg.trainer.batch_size)
    from capsrun.train import unpack

    x = unpack(next(iter(loaders.tests["test"].epoch(0))))[0][: cfg.inputs]
    out_dir, tb, metrics = _run_dir(), TBLogger(_run_dir()), {}
    written: list[Path] = []

    def emit(name: str, image: torch.Tensor) -> None:
        _save_png(out_dir / f"{name}.png", image)
        tb.image(f"samples/{name}", image, 0)
        written.append(out_dir / f"{name}.png")

    try:
        classes = run_cfg.dataset.num_classes
        if sampling.can_generate(model):
            gen = torch.Generator().manual_seed(cfg.seed)
            images, _ = sampling.class_conditional(model, classes, cfg.samples_per_class, gen)
            emit("class_conditional", sampling.grid(images, cfg.samples_per_class))
            var = sampling.posterior_variations(model, x, cfg.variations, cfg.variation_scale)
            rows = torch.cat([x.unsqueeze(1).to(var.dtype), var], dim=1)  # the input first
            emit("variations", sampling.grid(rows.flatten(0, 1), cfg.variations + 1))
            classifier = _classifier(cfg, dev, run_cfg.dataset)
            if classifier is None:
                log.info(
                    "sample quality skipped: set eval_classifier=<best.pt of a capsnet trained on %s>",
                    run_cfg.dataset.name,
                )
            else:
                real = sampling.first_images(loaders.tests["test"], cfg.sample_quality.real_images)
                quality = sampling.SampleQuality(
                    classes, classifier, real, per_class=cfg.sample_quality.per_class, seed=cfg.seed
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
    """A run's command-line overrides, from its ``.hydra/overrides.yaml``."""
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    skip = ("hydra.", "trainer.progress", "trainer.resume")
    return [o for o in yaml.safe_load(path.read_text()) or [] if not o.startswith(skip)]


def _run_labels(runs: list[Path]) -> list[str]:
    """Name each run by the overrides that set it apart from the others (a sweep's swept
    values), else by its directory."""
    overrides = [_run_overrides(r) for r in runs]
    common = set.intersection(*(set(o) for o in overrides))
    labels = [" ".join(o for o in over if o not in common) for over in overrides]
    return [label or run.name for label, run in zip(labels, runs)]


def analyze(cfg: DictConfig) -> dict[str, Any]:
    """``capsrun analyze checkpoint=PATH``: capsule health (:mod:`capsrun.diagnostics`) of one
    checkpoint or of every run below a directory, as a table and ``health.json``."""
    from hydra.utils import to_absolute_path

    from capsrun import diagnostics
    from capsrun.train import unpack

    if OmegaConf.is_missing(cfg, "checkpoint"):
        raise ConfigError("no checkpoint given; use capsrun analyze checkpoint=<best.pt, run dir or multirun dir>")
    if cfg.split not in ("test", "train"):
        raise ConfigError(f"split must be test or train, got {cfg.split!r}; e.g. split=test")
    if isinstance(cfg.examples, bool) or not isinstance(cfg.examples, int) or cfg.examples < 2:
        raise ConfigError(f"examples must be an integer >= 2, got {cfg.examples!r}; e.g. examples=1000")
    root = Path(to_absolute_path(str(cfg.checkpoint)))
    dev = build.device(cfg.trainer.device)
    affine = diagnostics.AffineSpec(**cfg.affine)
    report: dict[str, Any] = {}
    targets = _analyze_targets(root)
    for (run_dir, path), label in zip(targets, _run_labels([t[0] for t in targets])):
        model, run_cfg, ckpt = _trained_model(path, dev)
        run_cfg.data = build.checkpoint_data(run_cfg.data, cfg.data)
        run_cfg.data.train_limit = run_cfg.data.test_limit = None
        train = cfg.split == "train"
        loaders = build.loaders(run_cfg, dev, train=train, eval_batch_size=cfg.trainer.batch_size)
        source = loaders.train.epoch(0) if train else loaders.tests["test"].epoch(0)
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
        objective = build.objective(run_cfg, trusted=False).to(dev)
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            objective(model(bx, by), target, by)["total"].backward()
        health.scalars = {**diagnostics.gradient_norms(model), **health.scalars}  # rows in forward order
        model.zero_grad(set_to_none=True)
        report[str(path)] = {
            "run": label,
            "model": run_cfg.model.name,
            "dataset": run_cfg.dataset.name,
            "epoch": ckpt["epoch"],
            "test/accuracy": (ckpt.get("state") or {}).get("last_metrics", {}).get("test/accuracy"),
            "health": health.scalars,
        }
        log.info(
            "analyzed %s (%s, epoch %d) on %d %s images", path, run_cfg.model.name, ckpt["epoch"], len(x), cfg.split
        )
    table = diagnostics.health_table({v["run"]: v["health"] for v in report.values()})
    print(table)
    out = _run_dir() / "health.json"
    checkpoint.save_json(out, {"split": cfg.split, "examples": cfg.examples, "runs": report})
    log.info("health of %d run(s) in %s", len(report), out)
    return report


def _sample_chains(cfg: DictConfig, model, run_cfg: DictConfig, dev: torch.device, path: Path, epoch: int) -> dict:
    """``capsrun sample`` for an energy model (the RBM, the capsule RBM): chains of the model's own
    sampler from noise or data; grids, ``samples.pt`` (the final states, float [N, C, H, W] in
    [0, 1]) and, with ``eval_classifier``, how a CapsNet sees them."""
    from capsrun.tblog import TBLogger

    for key in ("num_samples", "gibbs_steps"):
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{key} must be an integer >= 1, got {value!r}; e.g. {key}=100")
    if cfg.init not in ("noise", "data"):
        raise ConfigError(f"init must be noise or data, got {cfg.init!r}; e.g. init=noise")
    temperature = cfg.temperature
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ConfigError(f"temperature must be a number > 0, got {temperature!r}; e.g. temperature=1.0")
    confidence = _confidence(cfg.sample_quality.confidence, "sample_quality.confidence")
    classifier = _classifier(cfg, dev, run_cfg.dataset)  # before the chains run: a wrong one fails fast
    model.eval()
    run_cfg.data = build.checkpoint_data(run_cfg.data, cfg.data)
    loaders = build.loaders(run_cfg, dev, train=False, eval_batch_size=cfg.trainer.batch_size)
    test = loaders.tests["test"]
    gen = torch.Generator().manual_seed(cfg.seed)
    if cfg.init == "data":
        start = model.visible_states(sampling.first_images(test, cfg.num_samples))
    else:
        start = model.noise(cfg.num_samples, gen).to(dev)
    log.info("%d chains from %s, %d steps ...", len(start), cfg.init, cfg.gibbs_steps)
    v, snaps, acceptance = sampling.gibbs_chains(
        model, start, cfg.gibbs_steps, snapshots=8, mh=cfg.mh, temperature=float(temperature), seed=cfg.seed
    )
    real = model.visible_states(sampling.first_images(test, cfg.sample_quality.real_images))
    with torch.no_grad(), torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        metrics = {
            "samples/acceptance": acceptance,
            "samples/free_energy": model.free_energy(v).mean().item(),
            "test/free_energy/data": model.free_energy(real[:1000]).mean().item(),
        }
        mean = model.reconstruct(v)
    if classifier is not None:
        _, real_features, real_confidence = sampling.classifier_outputs(classifier, real)
        metrics.update(
            sampling.unconditional_quality(
                classifier, v, (real_features, real_confidence), run_cfg.dataset.num_classes, confidence
            )
        )
    nrow = max(int(len(v) ** 0.5), 1)
    rows = min(len(v), 8)
    chain = torch.stack([start[:rows], *(s[:rows] for s in snaps)], 1).flatten(0, 1)  # row i: chain i
    out_dir, tb = _run_dir(), TBLogger(_run_dir())
    try:
        for name, image in (
            ("gibbs", sampling.grid(v, nrow)),
            ("gibbs_mean", sampling.grid(mean, nrow)),
            ("chain", sampling.grid(chain, len(snaps) + 1)),
        ):
            _save_png(out_dir / f"{name}.png", image)
            tb.image(f"samples/{name}", image, 0)
        tb.scalars(metrics, 0)
    finally:
        tb.close()
    samples = v.detach().float().cpu().clamp(0, 1).contiguous()
    checkpoint.atomic_write(out_dir / "samples.pt", lambda f: torch.save(samples, f))
    checkpoint.save_json(out_dir / "metrics.json", {**metrics, "checkpoint": str(path)})
    quality = ""
    if classifier is not None:
        shares = [metrics[f"samples/class_share/{k}"] for k in range(run_cfg.dataset.num_classes)]
        quality = (
            f"; {metrics['samples/recognised']:.1f}% recognised with confidence > {confidence} "
            f"(binarised test images: {metrics['samples/recognised_real']:.1f}%), "
            f"classes {min(shares):.0f}-{max(shares):.0f}%, Frechet distance {metrics['samples/frechet_distance']:.2f}"
        )
    log.info(
        "acceptance %.3f, free energy of samples %.2f vs test data %.2f%s; gibbs.png, gibbs_mean.png, chain.png, "
        "samples.pt from %s (epoch %d) in %s",
        acceptance,
        metrics["samples/free_energy"],
        metrics["test/free_energy/data"],
        quality,
        path,
        epoch,
        out_dir,
    )
    return metrics


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

    examples = {"models": "[capsnet]", "iterations": "[1,3]", "batch_sizes": "[128]", "precisions": "[fp32,bf16]"}
    for key in ("models", "iterations", "batch_sizes", "precisions", "compile"):
        if not OmegaConf.is_list(cfg[key]) or not cfg[key]:
            raise ConfigError(
                f"bench.{key} must be a non-empty list, got {cfg[key]}; e.g. {key}={examples.get(key, '[false]')}"
            )
    for key in ("iterations", "batch_sizes"):
        for n in cfg[key]:
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ConfigError(f"bench.{key} must hold integers >= 1, got {n!r}; e.g. {key}={examples[key]}")
    for p in cfg.precisions:
        if p not in speed.PRECISIONS:
            raise ConfigError(f"precisions: {p!r} is not one of {', '.join(speed.PRECISIONS)}")
    settings = []
    for name in cfg.models:
        # routed: the model's iterations follow routing.iterations (the capsule RBM fixes its own)
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
                settings.extend(group)
    return settings


def bench(cfg: DictConfig) -> dict[str, Any]:
    """``capsrun bench``: train and eval images/s and peak memory per model and speed setting,
    each with its ratio over the straightforward eager reference measured in the same run;
    a table on stdout and in ``bench.md``, the figures in ``bench.json`` (see :mod:`capsrun.bench`)."""
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from capsrun import bench as benchmark

    dev = build.device(cfg.trainer.device)
    cpu = dev.type == "cpu"
    warmup = cfg.warmup if cfg.warmup != "auto" else (2 if cpu else 10)
    steps = cfg.steps if cfg.steps != "auto" else (3 if cpu else 30)
    repeats = cfg.repeats if cfg.repeats != "auto" else (3 if cpu else 5)
    for key, value in (("warmup", warmup), ("steps", steps), ("repeats", repeats)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if key == "warmup" else 1):
            raise ConfigError(f"{key} must be auto or a positive integer, got {value!r}; e.g. {key}=5")
    settings = _bench_settings(cfg, dev)
    with logging_redirect_tqdm():  # log lines above the progress bar, not through it
        results = _bench_all(cfg, dev, settings, warmup, steps, repeats, tqdm)
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
    run_dir = _run_dir()
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


def _bench_all(cfg: DictConfig, dev: torch.device, settings, warmup: int, steps: int, repeats: int, tqdm) -> list:
    """One :class:`capsrun.bench.Measurement` per setting, each on a freshly built model."""
    from capsrun import bench as benchmark

    cpu = dev.type == "cpu"
    results = []
    for s in tqdm(settings, desc="bench", disable=None if cfg.trainer.progress else True):
        run_cfg = _bench_config(cfg, s.model, s.iterations or 3, s.batch_size)
        torch.manual_seed(cfg.seed)
        torch._dynamo.reset()  # a fresh model per setting: do not run into dynamo's recompile limit
        model = build.model(run_cfg).to(dev)
        objective = build.objective(run_cfg).to(dev)
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
