"""The one place where a config becomes objects. Nothing below this module sees a config."""

from __future__ import annotations

import inspect
import logging
import math
import warnings
from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from capsrun import averaging, checkpoint, datasets, distributed, speed
from capsrun.batch import unpack
from capsrun.errors import CheckpointError, ConfigError
from capsrun.tblog import Trial
from capsrun.train import Loop, Run

log = logging.getLogger("capsrun")


def integer(value: Any, key: str, minimum: int = 1, example: Any = 3) -> int:
    """``value`` of setting ``key`` if it is an integer >= ``minimum`` (a bool is not), else a
    :class:`ConfigError` naming the key, the value and an example."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key} must be an integer >= {minimum}, got {value!r}; e.g. {key}={example}")
    return value


def number(value: Any, key: str, ok: Any, what: str, example: Any) -> float:
    """``value`` of setting ``key`` as a float if it is a number (not a bool) for which ``ok``
    holds, else a :class:`ConfigError` saying it must be ``what`` (``"a number > 0"``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
        raise ConfigError(f"{key} must be {what}, got {value!r}; e.g. {key}={example}")
    return float(value)


def seed(cfg: DictConfig) -> None:
    """Every command's ``seed`` (where its config has one) must be an integer: checked before
    anything is read or run, so that ``seed=abc`` is one line, not a traceback from the RNG."""
    value = cfg.get("seed", 0)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"seed must be an integer, got {value!r}; e.g. seed=0")


def _positive_int(cfg: DictConfig, key: str, minimum: int = 1, example: str = "3") -> int:
    return integer(OmegaConf.select(cfg, key), key, minimum, example)


def _optional_limit(cfg: DictConfig, key: str) -> int | None:
    value = OmegaConf.select(cfg, key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key} must be null (all) or a positive integer, got {value!r}; e.g. {key}=1000")
    return value


MAX_ROUTING_ITERATIONS = 100  # beyond this a run only burns time: the couplings have long converged


def validate_train(cfg: DictConfig) -> None:
    """Check the values a user types most, with a one-line fix for each."""
    iterations = _positive_int(cfg, "routing.iterations")
    if iterations > MAX_ROUTING_ITERATIONS:
        raise ConfigError(
            f"routing.iterations={iterations} is more than {MAX_ROUTING_ITERATIONS}: each iteration is a full pass "
            "over the votes and the couplings settle within a few (arXiv:1710.09829 uses 3); e.g. routing.iterations=3"
        )
    _positive_int(cfg, "trainer.epochs", example="10")
    _positive_int(cfg, "trainer.batch_size", example="128")
    _positive_int(cfg, "trainer.eval_batch_size", example="512")
    _positive_int(cfg, "trainer.log_every", example="50")
    average_fraction(cfg)
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
    seed(cfg)
    for key in ("max_shift", "crop", "canvas", "test_size", "epoch_size", "affnist_limit", "test_seed"):
        value = cfg.dataset.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise ConfigError(f"dataset.{key} must be an integer >= 0, got {value!r}; e.g. dataset.{key}=4")
    if cfg.dataset.name not in datasets.DATASETS:
        raise ConfigError(f"dataset.name {cfg.dataset.name!r} is not one of {', '.join(datasets.DATASETS)}")
    _pcd_chains(cfg)


def _pcd_chains(cfg: DictConfig) -> None:
    """PCD takes a batch's model term from one persistent chain per image (the first min(batch,
    chains); :meth:`EnergyModel.model_samples`), so chains beyond the batch would never move: refused
    rather than kept idle in every checkpoint."""
    net = cfg.model.get("net") or {}
    chains, batch = net.get("chains"), cfg.trainer.batch_size
    if not cfg.model.get("persistent", False) or not isinstance(chains, int) or isinstance(chains, bool):
        return
    if chains > batch:
        raise ConfigError(
            f"model.net.chains={chains} is more than trainer.batch_size={batch}: a step moves one persistent chain per "
            f"image, so {chains - batch} chains would never move; e.g. model.net.chains={batch} "
            f"(or trainer.batch_size={chains})"
        )


def average_fraction(cfg: DictConfig) -> float:
    """``trainer.average``: the last fraction of the optimizer steps whose weights are averaged
    (:mod:`capsrun.averaging`), 0 for none."""
    return number(cfg.trainer.get("average", 0.0), "trainer.average", lambda v: 0 <= v < 1, "a number in [0, 1)", 0.2)


def precision(cfg: DictConfig) -> str:
    """``trainer.precision``, checked, with the process-wide TF32 switches set to match it.
    (The ``.get`` defaults here and below serve stored configs of checkpoints written before the
    speed settings existed; a config composed from ``conf/`` always has them.)"""
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
    unknown = sorted(set(options) - datasets.options(ds.name)) if ds.name in datasets.DATASETS else []
    if unknown:
        known = ", ".join(sorted(datasets.options(ds.name)))
        raise ConfigError(f"dataset.{unknown[0]} is not a setting of {ds.name}; its settings: {known}")
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


def _registry() -> dict[str, tuple[type, type]]:
    """The models capsrun builds, ``model.name`` -> (network class, loss class): the only way from
    a checkpoint back to a model. A checkpoint's stored config names a model; the class comes from
    here, never from an import path (``_target_``) read from the file."""
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


def _construct(cls: type, node: DictConfig, what: str, error: type[Exception], **fill: Any) -> Any:
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
    (:func:`_registry`) is built from capsrun's own class with its settings checked; any other name
    only from a ``trusted`` config (the user's own ``conf/``, through Hydra's ``instantiate``),
    never from a checkpoint's (``trusted=False``)."""
    ds = cfg.dataset
    fill = "hidden_caps" in cfg.model.net.keys() and OmegaConf.is_missing(cfg.model.net, "hidden_caps")
    extra = {"hidden_caps": hidden_caps(cfg)} if fill else {}
    sizes = dict(in_channels=ds.channels, image_size=ds.image_size, num_classes=ds.num_classes, **extra)
    registry = _registry()
    error = ConfigError if trusted else CheckpointError
    if cfg.model.name in registry:
        return _construct(registry[cfg.model.name][0], cfg.model.net, f"{cfg.model.name} model", error, **sizes)
    if not trusted:
        raise error(f"model {cfg.model.name!r} is not one of capsrun's models ({', '.join(_registry())})")
    return _instantiate(cfg.model.net, "model", **sizes)


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
        net["hidden_caps"] = hidden_caps(cfg)
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


def objective(cfg: DictConfig, trusted: bool = True) -> torch.nn.Module:
    """The loss of ``cfg.model.loss``, from the registry as :func:`model`; a loss with its own
    network (a discriminator) declares ``in_channels: ???`` and gets it from the dataset."""
    extra = {"in_channels": cfg.dataset.channels} if "in_channels" in cfg.model.loss.keys() else {}
    registry = _registry()
    if cfg.model.name in registry:
        error = ConfigError if trusted else CheckpointError
        return _construct(registry[cfg.model.name][1], cfg.model.loss, f"{cfg.model.name} loss", error, **extra)
    if not trusted:
        raise CheckpointError(f"model {cfg.model.name!r} is not one of capsrun's models ({', '.join(_registry())})")
    return _instantiate(cfg.model.loss, "loss", **extra)


_SIZE_KEYS = ("in_channels", "image_size", "num_classes", "hidden_caps")
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
    if name not in _registry():
        raise bad(f"names model {name!r}, not one of capsrun's models ({', '.join(_registry())})")
    for node in ("model.net", "model.loss", "dataset", "data", "trainer"):
        if not isinstance(OmegaConf.select(cfg, node), DictConfig):
            raise bad(f"has no {node} section")
    if cfg.dataset.get("name") not in datasets.DATASETS:
        raise bad(f"names dataset {cfg.dataset.get('name')!r}, not one of {', '.join(datasets.DATASETS)}")
    for key in _SHAPE_KEYS[1:]:
        value = cfg.dataset.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise bad(f"has dataset.{key}={value!r}")
    options = set(cfg.dataset.keys()) - set(_SHAPE_KEYS)
    unknown = options - datasets.options(cfg.dataset.name)
    if unknown:
        raise bad(f"has dataset settings {sorted(unknown)} that {cfg.dataset.name} does not take")
    net_class, loss_class = _registry()[name]
    try:
        _settings(net_class, cfg.model.net, f"{name} model", CheckpointError, _SIZE_KEYS)
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
        return _instantiate(node, what)(params)
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
        return _instantiate(node, "lr schedule", **extra)(opt)
    except (ValueError, TypeError, ZeroDivisionError, OverflowError) as e:
        raise _settings_error("scheduler", e) from None


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

    level = diagnostics_level(cfg)
    if level == "off":
        return None
    every = _positive_int(cfg, "diagnostics.every_steps", example="200")
    examples = _positive_int(cfg, "diagnostics.examples", example="256")
    key = "diagnostics.dead_threshold"
    threshold = number(cfg.diagnostics.get("dead_threshold", 0.01), key, lambda v: v >= 0, "a number >= 0", 0.01)
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


def run(cfg: DictConfig, dev: torch.device, world: distributed.World, epoch_hooks=None) -> Run:
    """Assemble one training run from ``cfg``, each setting decided once: the data (checked
    against the model's input), the model (channels-last when the precision wants it), its loss,
    optimizers and lr schedule, the capsule-health hook, and for ``world`` the
    DistributedDataParallel wrapper, this rank's shards and seed, and the compiled wrappers.
    ``epoch_hooks(model, loaders)``: the epoch hooks of the command (sample quality), built at
    this point of the seeded sequence. The global batch must divide by the processes."""
    if world.distributed and cfg.trainer.batch_size % world.size:
        fix = cfg.trainer.batch_size // world.size * world.size or world.size
        raise ConfigError(
            f"trainer.batch_size={cfg.trainer.batch_size} (the global batch) must divide by the "
            f"{world.size} processes; e.g. trainer.batch_size={fix}"
        )
    torch.manual_seed(cfg.seed)
    data = loaders(cfg, dev)
    check_images(cfg, data)
    net = model(cfg).to(dev)
    check_input(net, cfg)
    prec = precision(cfg)
    channels_last = speed.use_channels_last(cfg.trainer.channels_last, prec)
    if channels_last:
        net = speed.to_channels_last(net)
    loss = objective(cfg).to(dev)
    opts = optimizers(cfg, net, loss)
    total_steps = cfg.trainer.epochs * len(data.train)
    sched = scheduler(cfg, opts[0], total_steps=total_steps)
    start = averaging.start_step(average_fraction(cfg), total_steps)
    average = None if start is None else averaging.WeightAverage(net, start)
    hooks = epoch_hooks(net, data) if epoch_hooks is not None else []
    health = health_monitor(cfg, data.evals["test"])
    train_model, train_loader, eval_loaders = net, data.train, data.evals
    if world.distributed:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(net, device_ids=[dev.index] if dev.type == "cuda" else None)
        train_loader = distributed.ShardedLoader(data.train, world)
        eval_loaders = {k: distributed.ShardedLoader(v, world) for k, v in data.evals.items()}
        # different training-time noise (VCaps samples) on each rank, the same on every launch
        torch.manual_seed(cfg.seed * 1_000_003 + world.rank)
    eval_model = None
    mode = compile_mode(cfg)
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
