"""The one place where a config becomes objects. Nothing below this module sees a config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from capsrun import datasets
from capsrun.errors import ConfigError


def _positive_int(cfg: DictConfig, key: str, minimum: int = 1, example: str = "3") -> int:
    value = OmegaConf.select(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key} must be an integer >= {minimum}, got {value!r}; e.g. {key}={example}")
    return value


def _optional_limit(cfg: DictConfig, key: str) -> int | None:
    value = OmegaConf.select(cfg, key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key} must be null (all) or a positive integer, got {value!r}; e.g. {key}=1000")
    return value


def validate_train(cfg: DictConfig) -> None:
    """Check the values a user types most, with a one-line fix for each."""
    _positive_int(cfg, "routing.iterations")
    _positive_int(cfg, "trainer.epochs", example="10")
    _positive_int(cfg, "trainer.batch_size", example="128")
    _positive_int(cfg, "trainer.eval_batch_size", example="512")
    _positive_int(cfg, "trainer.log_every", example="50")
    precision(cfg)
    compile_mode(cfg)
    channels_last = cfg.trainer.get("channels_last", "auto")
    if channels_last not in ("auto", True, False):
        raise ConfigError(f"trainer.channels_last must be auto, true or false, got {channels_last!r}")
    _optional_limit(cfg, "data.train_limit")
    _optional_limit(cfg, "data.test_limit")
    val = cfg.data.get("val_split")
    count = isinstance(val, int) and not isinstance(val, bool) and val >= 0
    fraction = isinstance(val, float) and 0 < val < 1
    if not (val is None or count or fraction):
        raise ConfigError(
            f"data.val_split must be null, a count or a fraction in (0, 1), got {val!r}; e.g. data.val_split=5000"
        )
    placement = cfg.data.get("placement", "auto")
    if placement not in datasets.PLACEMENTS:
        raise ConfigError(f"data.placement must be one of {', '.join(datasets.PLACEMENTS)}, got {placement!r}")
    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool):
        raise ConfigError(f"seed must be an integer, got {cfg.seed!r}; e.g. seed=0")
    for key in ("max_shift", "crop", "canvas", "test_size", "epoch_size", "affnist_limit", "test_seed"):
        value = cfg.dataset.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise ConfigError(f"dataset.{key} must be an integer >= 0, got {value!r}; e.g. dataset.{key}=4")
    if cfg.dataset.name not in datasets.DATASETS:
        raise ConfigError(f"dataset.name {cfg.dataset.name!r} is not one of {', '.join(datasets.DATASETS)}")


def precision(cfg: DictConfig) -> str:
    """``trainer.precision``, checked, with the process-wide TF32 switches set to match it."""
    from capsrun import speed

    value = cfg.trainer.get("precision", "fp32")
    if value not in speed.PRECISIONS:
        raise ConfigError(
            f"trainer.precision must be one of {', '.join(speed.PRECISIONS)}, got {value!r}; "
            "e.g. trainer.precision=bf16"
        )
    speed.set_matmul_precision(value)
    return value


def compile_mode(cfg: DictConfig) -> str | None:
    """``trainer.compile`` as a ``torch.compile`` mode, or None for eager."""
    from capsrun import speed

    try:
        return speed.compile_mode(cfg.trainer.get("compile", False))
    except ValueError as e:
        raise ConfigError(f"trainer.{e}; e.g. trainer.compile=true") from None


def device(spec: str) -> torch.device:
    """``auto`` picks CUDA when there is one; ``cuda`` without one is an error, not a fallback."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError):
        raise ConfigError(f"trainer.device must be auto, cpu, cuda or cuda:N, got {spec!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device=cuda but no CUDA device is available; use trainer.device=cpu or auto")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"trainer.device must be auto, cpu, cuda or cuda:N, got {spec!r}")
    return dev


def data_root(cfg: DictConfig) -> Path:
    """``data.root`` made absolute against the directory the command was started in."""
    from hydra.utils import to_absolute_path

    try:
        return Path(to_absolute_path(str(cfg.data.root)))
    except ValueError:  # outside a Hydra run (tests, notebooks)
        return Path(str(cfg.data.root)).expanduser().resolve()


_SHAPE_KEYS = ("name", "channels", "image_size", "num_classes")


def loaders(
    cfg: DictConfig, dev: torch.device, train: bool = True, eval_batch_size: int | None = None
) -> datasets.Loaders:
    """The dataset's test loaders and, when ``train``, its training loader, per its protocol.
    The dataset config's keys beyond its shape are the protocol's options (``max_shift``, ...)."""
    ds = cfg.dataset
    options = {k: v for k, v in OmegaConf.to_container(ds, resolve=True).items() if k not in _SHAPE_KEYS}
    return datasets.make_loaders(
        ds.name,
        data_root(cfg),
        download=cfg.data.download,
        batch_size=cfg.trainer.batch_size,
        eval_batch_size=eval_batch_size or cfg.trainer.eval_batch_size,
        seed=cfg.seed,
        device=dev,
        train=train,
        train_limit=cfg.data.train_limit,
        test_limit=cfg.data.test_limit,
        val_split=cfg.data.get("val_split"),
        placement=cfg.data.get("placement", "auto"),
        **options,
    )


def _instantiate(node: DictConfig, what: str, **kwargs: Any) -> Any:
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__ or e
        raise ConfigError(f"cannot build the {what} from its config: {cause}".replace("\n", " ")) from None


def hidden_caps(cfg: DictConfig) -> list[int]:
    """Intermediate capsule layer sizes of a deep CapsNet: ``model.capsule_layers`` when given,
    else ``model.depth`` layers of ``model.width`` capsules."""
    layers = cfg.model.get("capsule_layers")
    if layers is not None:
        sizes = list(layers) if OmegaConf.is_list(layers) else [layers]
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in sizes):
            raise ConfigError(f"model.capsule_layers must be a list of positive integers, got {layers}; e.g. [32,32]")
        return sizes
    depth = _positive_int(cfg, "model.depth", minimum=0, example="2")
    width = _positive_int(cfg, "model.width", example="32")
    return [width] * depth


def model(cfg: DictConfig) -> torch.nn.Module:
    """The network of ``cfg.model.net``, sized by ``cfg.dataset``."""
    ds = cfg.dataset
    fill = "hidden_caps" in cfg.model.net.keys() and OmegaConf.is_missing(cfg.model.net, "hidden_caps")
    extra = {"hidden_caps": hidden_caps(cfg)} if fill else {}
    return _instantiate(
        cfg.model.net, "model", in_channels=ds.channels, image_size=ds.image_size, num_classes=ds.num_classes, **extra
    )


def objective(cfg: DictConfig) -> torch.nn.Module:
    """The loss of ``cfg.model.loss``; a loss with its own network (a discriminator) declares
    ``in_channels: ???`` and gets it from the dataset."""
    extra = {"in_channels": cfg.dataset.channels} if "in_channels" in cfg.model.loss.keys() else {}
    return _instantiate(cfg.model.loss, "loss", **extra)


def optimizer(cfg: DictConfig, params) -> torch.optim.Optimizer:
    return _instantiate(cfg.optimizer, "optimizer")(params)


def optimizers(cfg: DictConfig, net: torch.nn.Module, loss: torch.nn.Module) -> list[torch.optim.Optimizer]:
    """The model's optimizer (``cfg.optimizer``), then, when the loss has parameters of its own
    (the VCaps discriminator), theirs, built from ``cfg.model.adversary_optimizer``."""
    opts = [optimizer(cfg, net.parameters())]
    own = [p for p in loss.parameters() if p.requires_grad]
    if own:
        node = cfg.model.get("adversary_optimizer")
        if node is None:
            raise ConfigError(f"model {cfg.model.name}: its loss has parameters but no model.adversary_optimizer")
        opts.append(_instantiate(node, "adversary optimizer")(own))
    return opts


def classifier(path: Path, dev: torch.device) -> tuple[torch.nn.Module, DictConfig]:
    """A trained CapsNet for sample quality, rebuilt from the config stored in its checkpoint, and
    the dataset config it was trained on. Its class capsules are the feature space."""
    from capsrun import checkpoint
    from capsrun.errors import CheckpointError

    if not path.is_file():
        raise ConfigError(
            f"eval_classifier={path}: no such file; give the best.pt of a CapsNet trained on this dataset"
        )
    ckpt = checkpoint.load(path, map_location=dev)
    cfg = OmegaConf.create(ckpt["config"])
    net = model(cfg).to(dev)
    try:
        net.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not match its own config ({str(e).splitlines()[0][:160]})") from None
    if cfg.model.name != "capsnet":
        raise ConfigError(f"eval_classifier={path} is a {cfg.model.name}; sample quality needs a capsnet checkpoint")
    return net.eval(), cfg.dataset


def scheduler(cfg: DictConfig, opt: torch.optim.Optimizer, total_steps: int | None = None):
    """The lr schedule of ``cfg.scheduler``; one that declares ``total_steps: ???`` gets the
    run's number of optimizer steps, ``total_steps``."""
    node = cfg.scheduler
    extra = {}
    if "total_steps" in node.keys() and OmegaConf.is_missing(node, "total_steps"):
        if total_steps is None:
            raise ConfigError("scheduler.total_steps is ??? and this command does not know the run's length")
        extra["total_steps"] = total_steps
    return _instantiate(node, "lr schedule", **extra)(opt)


def diagnostics_level(cfg: DictConfig) -> str:
    """``off``, ``light`` or ``full``; YAML reads a bare ``off`` as false, which means off too."""
    node = cfg.get("diagnostics")
    level = "off" if node is None or node.get("level") in (None, False) else str(node.level)
    if level not in ("off", "light", "full"):
        raise ConfigError(f"diagnostics level {level!r} is not one of off, light, full; e.g. diagnostics=full")
    return level


def health_monitor(cfg: DictConfig, test_loader) -> Any:
    """The :class:`capsrun.diagnostics.HealthMonitor` of ``cfg.diagnostics`` on the first
    ``diagnostics.examples`` test images, or None for ``diagnostics=off``."""
    from capsrun import diagnostics
    from capsrun.train import unpack

    level = diagnostics_level(cfg)
    if level == "off":
        return None
    every = _positive_int(cfg, "diagnostics.every_steps", example="200")
    examples = _positive_int(cfg, "diagnostics.examples", example="256")
    threshold = cfg.diagnostics.get("dead_threshold", 0.01)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or threshold < 0:
        raise ConfigError(f"diagnostics.dead_threshold must be a number >= 0, got {threshold!r}; e.g. 0.01")
    xs, n = [], 0
    for batch in test_loader.epoch(0):
        x = unpack(batch)[0]
        xs.append(x[: examples - n])
        n += len(xs[-1])
        if n >= examples:
            break
    affine = cfg.diagnostics.get("affine") or {}
    return diagnostics.HealthMonitor(
        torch.cat(xs),
        every,
        full=level == "full",
        threshold=float(threshold),
        affine=diagnostics.AffineSpec(**affine),
        seed=cfg.seed,
    )
