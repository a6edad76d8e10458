"""The one place where a config becomes objects: data, model, loss, optimizers, schedule, hooks
and the assembled :class:`~capsrun.train.Run`. Settings are checked before they get here
(:mod:`capsrun.settings`); models are built through :mod:`capsrun.registry`. Nothing below this
module sees a config."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from capsrun import averaging, datasets, distributed, registry, sampling, settings, speed
from capsrun.batch import first_images, first_labelled, unpack
from capsrun.errors import ConfigError
from capsrun.judge import Judge
from capsrun.registry import SHAPE_KEYS, instantiate_node
from capsrun.run import Loop, Run
from capsrun.tblog import Trial

log = logging.getLogger("capsrun")


def data_root(cfg: DictConfig) -> Path:
    """``data.root`` made absolute against the directory the command was started in."""
    from hydra.utils import to_absolute_path

    try:
        return Path(to_absolute_path(str(cfg.data.root)))
    except ValueError:  # outside a Hydra run (tests, notebooks)
        return Path(str(cfg.data.root)).expanduser().resolve()


def loaders(
    cfg: DictConfig, dev: torch.device, train: bool = True, eval_batch_size: int | None = None
) -> datasets.Loaders:
    """The dataset's test loaders and, when ``train``, its training loader, per its protocol.
    The dataset config's keys beyond its shape are the protocol's options (``max_shift``, ...)."""
    ds = cfg.dataset
    options = {k: v for k, v in OmegaConf.to_container(ds, resolve=True).items() if k not in SHAPE_KEYS}
    unknown = sorted(set(options) - datasets.options(ds.name)) if ds.name in datasets.DATASETS else []
    if unknown:
        known = ", ".join(sorted(datasets.options(ds.name)))
        raise ConfigError(f"dataset.{unknown[0]} is not a setting of {ds.name}; its settings: {known}")
    batching = datasets.Batching(
        cfg.trainer.batch_size,
        eval_batch_size or cfg.trainer.eval_batch_size,
        cfg.seed,
        datasets.Placement(dev, cfg.data.get("placement", "auto")),
    )
    return datasets.make_loaders(
        ds.name,
        data_root(cfg),
        batching,
        download=cfg.data.download,
        train=train,
        train_limit=cfg.data.train_limit,
        test_limit=cfg.data.test_limit,
        val_split=cfg.data.get("val_split"),
        **options,
    )


def checkpoint_data(stored: DictConfig, given: DictConfig) -> DictConfig:
    """The ``data`` settings of a command on a checkpoint (eval, sample, analyze): the stored
    run's, with the command's own on top. ``data.root``: the one given (``data.root=`` or
    ``$CAPSRUN_DATA``), else the run's own data root when it still exists, else ``./data``."""
    data = OmegaConf.merge(stored, {k: v for k, v in given.items() if k != "root"})
    root = given.get("root")
    if root is None:
        saved = stored.get("root")
        root = saved if saved is not None and Path(str(saved)).is_dir() else "./data"
        if root == saved:
            log.info("data from the run's own data root, %s (data.root= to read another)", saved)
    data.root = str(root)
    return data


def shown_config(cfg: DictConfig, total_steps: int | None = None) -> dict:
    """``cfg`` as plain data with every value resolved and the ``???`` that capsrun fills in code
    filled as it fills them (the network's sizes from the dataset, ``scheduler.total_steps``), for
    people to read (TensorBoard's Text tab); what is still unknown stays ``???``."""
    shown = OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)
    ds = cfg.dataset
    sizes = {"in_channels": ds.channels, "image_size": ds.image_size, "num_classes": ds.num_classes}
    net, loss = shown.get("model", {}).get("net", {}), shown.get("model", {}).get("loss", {})
    for key, value in sizes.items():
        if net.get(key) == "???":
            net[key] = value
    if net.get("hidden_caps") == "???":
        net["hidden_caps"] = registry.hidden_caps(cfg)
    if loss.get("in_channels") == "???":
        loss["in_channels"] = ds.channels
    if total_steps is not None and shown.get("scheduler", {}).get("total_steps") == "???":
        shown["scheduler"]["total_steps"] = total_steps
    return shown


def check_images(cfg: DictConfig, loaders: datasets.Loaders) -> None:
    """The images the loaders make have the shape the model is built for: ``dataset.crop`` or
    ``dataset.canvas`` change the image size, ``dataset.image_size`` sizes the model."""
    ds = cfg.dataset
    expected = (ds.channels, ds.image_size, ds.image_size)
    sources = [("test", loaders.evals["test"])] + ([("train", loaders.train)] if loaders.train is not None else [])
    for split, loader in sources:
        shape = tuple(unpack(next(iter(loader.epoch(0))))[0].shape[1:])
        if shape != expected:
            c, h, w = shape
            raise ConfigError(
                f"{ds.name}'s {split} images are {c}x{h}x{w}, but dataset.image_size={ds.image_size} and "
                f"dataset.channels={ds.channels} size the model; settings such as dataset.crop or dataset.canvas "
                f"change the image size: set dataset.image_size={h} with them"
            )


def check_input(net: torch.nn.Module, cfg: DictConfig) -> None:
    """One forward pass of two blank images of the dataset's shape, so that a model that cannot
    take them (kernels larger than the image, a layer size that does not fit) fails in one line
    before training starts. The RNG and the model's mode are left as they were."""
    ds = cfg.dataset
    param = next(net.parameters(), None)
    x = torch.zeros(2, ds.channels, ds.image_size, ds.image_size, device=None if param is None else param.device)
    was_training = net.training
    devices = [x.device] if x.device.type == "cuda" else []
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            net.eval()(x)
    except (RuntimeError, ValueError, IndexError) as e:
        first = " ".join(str(e).split())[:200]
        raise ConfigError(
            f"the {cfg.model.name} model cannot take {ds.name}'s {ds.channels}x{ds.image_size}x{ds.image_size} "
            f"images ({first}); check the model.net sizes against the dataset"
        ) from None
    finally:
        net.train(was_training)


def _settings_error(group: str, e: Exception) -> ConfigError:
    """A value the optimizer or the lr schedule refused: one line naming the group, e.g.
    ``optimizer: Invalid learning rate: -0.1``."""
    text = " ".join(str(e).split())[:200] or type(e).__name__
    return ConfigError(f"{group}: {text}; check the {group}.* values (capsrun train --cfg job)")


def optimizer(cfg: DictConfig, params) -> torch.optim.Optimizer:
    """``cfg.optimizer`` over ``params``; a value it refuses (``lr=-0.1``, ``betas=[2,3]``,
    ``lr=fast``) is a :class:`ConfigError`."""
    return _optimizer(cfg.optimizer, params, "optimizer", "optimizer")


def _optimizer(node: DictConfig, params, what: str, group: str) -> torch.optim.Optimizer:
    for key in ("lr", "weight_decay", "momentum", "eps"):
        value = node.get(key)
        if key in node and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ConfigError(f"{group}.{key} must be a number, got {value!r}; e.g. {group}.{key}=0.001")
    try:
        return instantiate_node(node, what)(params)
    except (ValueError, TypeError, RuntimeError) as e:
        raise _settings_error(group, e) from None


def optimizers(cfg: DictConfig, net: torch.nn.Module, loss: torch.nn.Module) -> list[torch.optim.Optimizer]:
    """The model's optimizer (``cfg.optimizer``), then, when the loss has parameters of its own
    (the VCaps discriminator), theirs, built from ``cfg.model.adversary_optimizer``."""
    opts = [optimizer(cfg, net.parameters())]
    own = [p for p in loss.parameters() if p.requires_grad]
    if own:
        node = cfg.model.get("adversary_optimizer")
        if node is None:
            raise ConfigError(f"model {cfg.model.name}: its loss has parameters but no model.adversary_optimizer")
        opts.append(_optimizer(node, own, "adversary optimizer", "model.adversary_optimizer"))
    return opts


def scheduler(cfg: DictConfig, opt: torch.optim.Optimizer, total_steps: int | None = None):
    """The lr schedule of ``cfg.scheduler``; one that declares ``total_steps: ???`` gets the
    run's number of optimizer steps, ``total_steps``."""
    node = cfg.scheduler
    extra = {}
    if "total_steps" in node.keys() and OmegaConf.is_missing(node, "total_steps"):
        if total_steps is None:
            raise ConfigError("scheduler.total_steps is ??? and this command does not know the run's length")
        extra["total_steps"] = total_steps
    try:
        return instantiate_node(node, "lr schedule", **extra)(opt)
    except (ValueError, TypeError, ZeroDivisionError, OverflowError) as e:
        raise _settings_error("scheduler", e) from None


def health_monitor(health: settings.Diagnostics, test_loader, seed: int, affine: Any) -> Any:
    """The :class:`capsrun.diagnostics.HealthMonitor` of the checked ``diagnostics.*`` on the
    first ``examples`` test images, or None for ``diagnostics=off``."""
    from capsrun import diagnostics

    if health.level == "off":
        return None
    xs, n = [], 0
    for batch in test_loader.epoch(0):
        x = unpack(batch)[0]
        xs.append(x[: health.examples - n])
        n += len(xs[-1])
        if n >= health.examples:
            break
    return diagnostics.HealthMonitor(
        torch.cat(xs),
        health.every_steps,
        full=health.level == "full",
        threshold=float(health.dead_threshold),
        affine=diagnostics.AffineSpec(**(affine or {})),
        seed=seed,
    )


def make_judge(classifier: torch.nn.Module, model, test, judging: settings.Judging) -> Judge:
    """The judge of an energy model's samples: ``classifier`` with the first
    ``judging.real_images`` test images, binarised as the model sees them, calibrated on them when
    ``judging.calibrate`` (:func:`capsrun.judge.judge_temperature`); the next ``judging.held_out``
    test images (as many as the test set has) give real digits' Frechet distance at the samples'
    number (:func:`capsrun.judge.frechet_floor`)."""
    reference, held = judging.real_images, judging.held_out
    images, labels = first_labelled(test, reference + held)
    real, labels, held_out = model.visible_states(images[:reference]), labels[:reference], images[reference:]
    held_out = model.visible_states(held_out) if len(held_out) >= 2 else None
    found = Judge(classifier, real, labels, calibrate=judging.calibrate, held_out=held_out)
    log.info(
        "sample judge: temperature %.3g on %d binarised test images; %d more held out (real digits' Frechet distance)",
        found.temperature,
        len(real),
        0 if held_out is None else len(held_out),
    )
    return found


def epoch_hooks(cfg: DictConfig, model, data: datasets.Loaders, checked: settings.TrainSettings, classifier) -> list:
    """For a model that generates: the sample grid every epoch, and with a ``classifier`` (the
    checked ``eval_classifier``) its judged quality every ``sample_quality.every_epochs`` epochs
    and after the last; for an energy model its chains from noise (``sampler.*``) and its AIS
    test log-likelihood after the last epoch (``ais.at_end``)."""
    from capsrun.likelihood import LogLikelihoodHook, base_of

    judging, classes = checked.judging, cfg.dataset.num_classes
    if classifier is None and (checked.sampler is not None or sampling.can_generate(model)):
        log.info("sample quality skipped: set eval_classifier=<best.pt of a capsnet trained on %s>", cfg.dataset.name)
    if checked.sampler is not None and sampling.can_sample_chains(model):
        judge = None if classifier is None else make_judge(classifier, model, data.evals["test"], judging)
        spec = checked.sampler.spec
        base = base_of(model, data) if spec.tempering > 1 else None
        every, confidence = judging.every_epochs, judging.confidence
        hooks: list = [sampling.ChainSamples(spec, checked.sampler.chains, judge, classes, every, confidence, base)]
        if checked.ais.at_end:
            hooks.append(LogLikelihoodHook(data, checked.ais, cfg.trainer.progress))
        return hooks
    if not sampling.can_generate(model):
        if classifier is not None:
            log.warning("eval_classifier is ignored: %s does not generate images", cfg.model.name)
        return []
    real = None if classifier is None else first_images(data.evals["test"], judging.real_images)
    quality = sampling.SampleQuality(
        classes, classifier, real, judging.per_class, judging.grid_per_class, judging.every_epochs, cfg.seed
    )
    return [quality]


def loop(cfg: DictConfig) -> Loop:
    """How the training loop runs, from ``cfg.trainer``."""
    t = cfg.trainer
    return Loop(epochs=t.epochs, log_every=t.log_every, num_images=t.num_images, progress=t.progress)


def stored_run_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config a checkpoint keeps, its data root absolute, so that eval, sample and
    analyze find the data from any working directory."""
    config = OmegaConf.to_container(cfg, resolve=True)
    config["data"]["root"] = str(Path(config["data"]["root"]).expanduser().absolute())
    return config


def run(
    cfg: DictConfig, dev: torch.device, world: distributed.World, checked: settings.TrainSettings, classifier=None
) -> Run:
    """Assemble one training run from ``cfg`` and its ``checked`` settings, each decided once: the
    data (checked against the model's input), the model (channels-last when the precision wants
    it), its loss, optimizers and lr schedule, the epoch hooks (:func:`epoch_hooks`, with the
    judge ``classifier``), the capsule-health hook, and for ``world`` the DistributedDataParallel
    wrapper, this rank's shards and seed, and the compiled wrappers. The global batch must divide
    by the processes."""
    if world.distributed and cfg.trainer.batch_size % world.size:
        fix = cfg.trainer.batch_size // world.size * world.size or world.size
        raise ConfigError(
            f"trainer.batch_size={cfg.trainer.batch_size} (the global batch) must divide by the "
            f"{world.size} processes; e.g. trainer.batch_size={fix}"
        )
    torch.manual_seed(cfg.seed)
    data = loaders(cfg, dev)
    check_images(cfg, data)
    net = registry.model(cfg).to(dev)
    check_input(net, cfg)
    prec = settings.precision(cfg)
    speed.set_matmul_precision(prec)
    channels_last = speed.use_channels_last(cfg.trainer.channels_last, prec)
    if channels_last:
        net = speed.to_channels_last(net)
    loss = registry.objective(cfg).to(dev)
    opts = optimizers(cfg, net, loss)
    total_steps = cfg.trainer.epochs * len(data.train)
    sched = scheduler(cfg, opts[0], total_steps=total_steps)
    start = averaging.start_step(settings.average_fraction(cfg), total_steps)
    average = None if start is None else averaging.WeightAverage(net, start)
    hooks = epoch_hooks(cfg, net, data, checked, classifier)
    affine = cfg.diagnostics.get("affine") if cfg.get("diagnostics") is not None else None
    health = health_monitor(checked.diagnostics, data.evals["test"], cfg.seed, affine)
    train_model, train_loader, eval_loaders = net, data.train, data.evals
    if world.distributed:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(net, device_ids=[dev.index] if dev.type == "cuda" else None)
        train_loader = distributed.ShardedLoader(data.train, world)
        eval_loaders = {k: distributed.ShardedLoader(v, world) for k, v in data.evals.items()}
        # different training-time noise (VCaps samples) on each rank, the same on every launch
        torch.manual_seed(cfg.seed * 1_000_003 + world.rank)
    eval_model = None
    mode = settings.compile_mode(cfg)
    if mode is not None:  # full batches compiled, the last partial one eager (speed.Compiled)
        train_model = speed.Compiled(train_model, {cfg.trainer.batch_size // world.size}, mode)
        eval_model = speed.Compiled(net, {-(-cfg.trainer.eval_batch_size // world.size)}, mode)
    return Run(
        model=net,
        objective=loss,
        train_loader=train_loader,
        eval_loaders=eval_loaders,
        optimizers=opts,
        scheduler=sched,
        config=stored_run_config(cfg),
        trial=Trial("", {}, config=shown_config(cfg, total_steps)),
        train_model=train_model,
        eval_model=eval_model,
        precision=prec,
        channels_last=channels_last,
        compile_mode=mode,
        world=world,
        epoch_hooks=hooks,
        step_hooks=[] if health is None else [health],
        loaders=data,
        average=average,
    )
