"""The models capsrun builds, and the one way back from a checkpoint to a model.

A model is registered by name (``model.name``) with its network and loss classes
(:func:`models`). A config builds a registered model from capsrun's own class, every setting
checked against the class's parameters; a checkpoint's stored config builds nothing else: never
a class named by an import path read from a file (``_target_``), never a setting that Hydra would
instantiate. This module is the trust boundary for ``checkpoint=`` and ``eval_classifier=``.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from capsrun import averaging, checkpoint, datasets
from capsrun.errors import CheckpointError, ConfigError
from capsrun.settings import positive_int

log = logging.getLogger("capsrun")

ENERGY_MODELS = ("rbm", "capsrbm")  # model.name of the energy models: no classes, log-likelihood by AIS
SHAPE_KEYS = ("name", "channels", "image_size", "num_classes")  # a dataset config's shape; the rest is its protocol


def instantiate_node(node: DictConfig, what: str, **kwargs: Any) -> Any:
    """Hydra's ``instantiate`` of a trusted config node (the user's own ``conf/``): an optimizer,
    a schedule, an unregistered model; its error as one :class:`ConfigError` line."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__ or e
        raise ConfigError(f"cannot build the {what} from its config: {cause}".replace("\n", " ")) from None


def models() -> dict[str, tuple[type, type]]:
    """``model.name`` -> (network class, loss class) of every model capsrun builds: the only way
    from a checkpoint back to a model."""
    from capsrun import losses
    from capsrun.models import baseline_cnn, capsnet, capsrbm, deep_capsnet, energy, rbm, vcaps

    return {
        "baseline_cnn": (baseline_cnn.BaselineCNN, baseline_cnn.CrossEntropyObjective),
        "baseline_cnn_multi": (baseline_cnn.BaselineCNNMulti, baseline_cnn.CrossEntropyObjective),
        "capsnet": (capsnet.CapsNet, losses.CapsNetLoss),
        "deep_capsnet": (deep_capsnet.DeepCapsNet, losses.CapsNetLoss),
        "vcaps": (vcaps.VariationalCapsNet, vcaps.VCapsLoss),
        "rbm": (rbm.RBM, energy.RBMLoss),
        "capsrbm": (capsrbm.CapsuleRBM, energy.RBMLoss),
    }


def _plain(value: Any) -> bool:
    """Settings a registered class takes: numbers, strings, booleans, None and lists of them."""
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def _parameters(cls: type) -> list[str]:
    """The named parameters of ``cls``; where its ``__init__`` passes ``**kwargs`` on to its base
    class (the deep CapsNet to CapsNet), the base's as well."""
    names: list[str] = []
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(vars(klass)["__init__"]).parameters.values()
        names += [p.name for p in params if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return names


def _settings(cls: type, node: DictConfig, what: str, error: type[Exception], fill: tuple[str, ...] = ()) -> dict:
    """The settings of ``node`` for ``cls``, checked: ``_target_`` may only name ``cls`` itself,
    every other key must be one of its parameters and hold plain data (nothing Hydra would
    instantiate). ``fill``: keys the dataset sets (``in_channels``, ...), left out here."""
    settings = OmegaConf.to_container(node, resolve=True)
    if not isinstance(settings, dict):
        raise error(f"the {what} config is not a mapping")
    settings = {k: v for k, v in settings.items() if k not in fill}
    target = settings.pop("_target_", None)
    expected = f"{cls.__module__}.{cls.__qualname__}"
    if target is not None and target != expected:
        raise error(f"the {what} config names {target!r}, but capsrun builds this model with {expected}")
    accepted = _parameters(cls)
    for key, value in settings.items():
        if key not in accepted or key.startswith("_"):
            known = ", ".join(k for k in accepted if k not in fill)
            raise error(f"the {what} has no setting {key!r}; its settings are: {known}")
        if not _plain(value):
            shown = repr(value)[:80]
            raise error(f"the {what} setting {key!r} must be a number, string, boolean or list, got {shown}")
    return settings


def construct(cls: type, node: DictConfig, what: str, error: type[Exception], **fill: Any) -> Any:
    """``cls(**settings)`` with :func:`_settings` and ``fill`` (the sizes set by the dataset)."""
    settings = {**_settings(cls, node, what, error, tuple(fill)), **fill}
    try:
        with warnings.catch_warnings():  # a zero-sized layer is reported below, in one line
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
            built = cls(**settings)
    except (TypeError, ValueError, RuntimeError, ZeroDivisionError) as e:
        raise error(f"cannot build the {what} from its config: {' '.join(str(e).split())[:200]}") from None
    empty = next(((n, tuple(p.shape)) for n, p in built.named_parameters() if p.numel() == 0), None)
    if empty is not None:
        raise error(f"the {what} has an empty layer ({empty[0]} of shape {list(empty[1])}): a size setting is 0")
    return built


def model(cfg: DictConfig, trusted: bool = True) -> torch.nn.Module:
    """The network of ``cfg.model.net``, sized by ``cfg.dataset``. A registered ``model.name``
    (:func:`models`) is built from capsrun's own class with its settings checked; any other name
    only from a ``trusted`` config (the user's own ``conf/``, through Hydra's ``instantiate``),
    never from a checkpoint's (``trusted=False``)."""
    ds = cfg.dataset
    fill = "hidden_caps" in cfg.model.net.keys() and OmegaConf.is_missing(cfg.model.net, "hidden_caps")
    extra = {"hidden_caps": hidden_caps(cfg)} if fill else {}
    sizes = dict(in_channels=ds.channels, image_size=ds.image_size, num_classes=ds.num_classes, **extra)
    registry = models()
    error = ConfigError if trusted else CheckpointError
    if cfg.model.name in registry:
        return construct(registry[cfg.model.name][0], cfg.model.net, f"{cfg.model.name} model", error, **sizes)
    if not trusted:
        raise error(f"model {cfg.model.name!r} is not one of capsrun's models ({', '.join(models())})")
    return instantiate_node(cfg.model.net, "model", **sizes)


def objective(cfg: DictConfig, trusted: bool = True) -> torch.nn.Module:
    """The loss of ``cfg.model.loss``, from the registry as :func:`model`; a loss with its own
    network (a discriminator) declares ``in_channels: ???`` and gets it from the dataset."""
    extra = {"in_channels": cfg.dataset.channels} if "in_channels" in cfg.model.loss.keys() else {}
    registry = models()
    if cfg.model.name in registry:
        error = ConfigError if trusted else CheckpointError
        return construct(registry[cfg.model.name][1], cfg.model.loss, f"{cfg.model.name} loss", error, **extra)
    if not trusted:
        raise CheckpointError(f"model {cfg.model.name!r} is not one of capsrun's models ({', '.join(models())})")
    return instantiate_node(cfg.model.loss, "loss", **extra)


def hidden_caps(cfg: DictConfig) -> list[int]:
    """Intermediate capsule layer sizes of a deep CapsNet: ``model.capsule_layers`` when given,
    else ``model.depth`` layers of ``model.width`` capsules."""
    layers = cfg.model.get("capsule_layers")
    if layers is not None:
        sizes = list(layers) if OmegaConf.is_list(layers) else [layers]
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in sizes):
            raise ConfigError(f"model.capsule_layers must be a list of positive integers, got {layers}; e.g. [32,32]")
        return sizes
    depth = positive_int(cfg, "model.depth", minimum=0, example="2")
    return [positive_int(cfg, "model.width", example="32")] * depth


SIZE_KEYS = ("in_channels", "image_size", "num_classes", "hidden_caps")
_CHECKPOINT_HINT = "point to a checkpoints/last.pt or best.pt written by capsrun train"


def _interpolations(value: Any) -> bool:
    if isinstance(value, dict):
        return any(_interpolations(k) or _interpolations(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_interpolations(v) for v in value)
    return isinstance(value, str) and "${" in value


def stored_config(ckpt: dict[str, Any], path: Path) -> DictConfig:
    """The run config a checkpoint carries, checked to be what capsrun writes: a resolved mapping
    (no interpolations) naming a registered model and a known dataset."""

    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: its stored config {why}; {_CHECKPOINT_HINT}")

    raw = ckpt.get("config")
    if not isinstance(raw, dict):
        raise bad("is not a mapping")
    if _interpolations(raw):
        raise bad("holds ${...} interpolations (capsrun stores resolved configs)")
    try:
        cfg = OmegaConf.create(raw)
    except Exception as e:  # omegaconf raises its own error types for odd keys and values
        raise bad(f"cannot be read ({type(e).__name__})") from None
    name = OmegaConf.select(cfg, "model.name")
    if name not in models():
        raise bad(f"names model {name!r}, not one of capsrun's models ({', '.join(models())})")
    for node in ("model.net", "model.loss", "dataset", "data", "trainer"):
        if not isinstance(OmegaConf.select(cfg, node), DictConfig):
            raise bad(f"has no {node} section")
    if cfg.dataset.get("name") not in datasets.DATASETS:
        raise bad(f"names dataset {cfg.dataset.get('name')!r}, not one of {', '.join(datasets.DATASETS)}")
    for key in SHAPE_KEYS[1:]:
        value = cfg.dataset.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise bad(f"has dataset.{key}={value!r}")
    options = set(cfg.dataset.keys()) - set(SHAPE_KEYS)
    unknown = options - datasets.options(cfg.dataset.name)
    if unknown:
        raise bad(f"has dataset settings {sorted(unknown)} that {cfg.dataset.name} does not take")
    net_class, loss_class = models()[name]
    try:
        _settings(net_class, cfg.model.net, f"{name} model", CheckpointError, SIZE_KEYS)
        _settings(loss_class, cfg.model.loss, f"{name} loss", CheckpointError, ("in_channels",))
    except CheckpointError as e:
        raise bad(f"is not capsrun's: {e}") from None
    except Exception as e:  # an interpolation to a missing key and the like
        raise bad(f"cannot be resolved ({type(e).__name__})") from None
    return cfg


def from_checkpoint(
    path: Path, dev: torch.device, dataset: DictConfig | None = None
) -> tuple[torch.nn.Module, DictConfig, dict[str, Any]]:
    """The one way back from a checkpoint to a model: ``(model, its run config, the checkpoint)``.
    The model comes from :func:`_registry` (never from an import path in the file), its settings
    checked against its class, its weights loaded strictly. ``dataset``: evaluate on another
    dataset config of the same shape."""
    ckpt = checkpoint.load(path, map_location=dev)
    cfg = stored_config(ckpt, path)
    if dataset is not None:
        cfg.dataset = dataset
    net = model(cfg, trusted=False).to(dev)
    state = ckpt["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: its model weights are not a mapping of tensors; {_CHECKPOINT_HINT}")
    mean = averaging.averaged_weights(ckpt)  # last.pt of a run that averages: the run's result is the mean
    if mean is not None:
        if not isinstance(mean, dict) or not all(isinstance(v, torch.Tensor) for v in mean.values()):
            raise CheckpointError(f"{path}: its averaged weights are not a mapping of tensors; {_CHECKPOINT_HINT}")
        if not set(mean) <= set(state):
            raise CheckpointError(f"{path}: its averaged weights name parameters its model lacks; {_CHECKPOINT_HINT}")
        state = {**state, **mean}
        log.info("%s: the weights averaged over its last %s steps (trainer.average)", path, ckpt["average"]["steps"])
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not match its own config ({str(e).splitlines()[0][:160]})") from None
    return net, cfg, ckpt


def classifier(path: Path, dev: torch.device) -> tuple[torch.nn.Module, DictConfig]:
    """A trained CapsNet for sample quality (:func:`from_checkpoint`) and the dataset config it
    was trained on. Its class capsules are the feature space."""
    if not path.is_file():
        raise ConfigError(
            f"eval_classifier={path}: no such file; give the best.pt of a CapsNet trained on this dataset"
        )
    net, cfg, _ = from_checkpoint(path, dev)
    if cfg.model.name != "capsnet":
        raise ConfigError(f"eval_classifier={path} is a {cfg.model.name}; sample quality needs a capsnet checkpoint")
    return net.eval(), cfg.dataset
