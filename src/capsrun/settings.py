"""Every check of a setting, in one place: each command calls its ``check_*`` once, at its top.

A wrong value is a :class:`~capsrun.errors.ConfigError` naming the key, the value and a fix
(``routing.iterations must be an integer >= 1, got 'abc'; e.g. routing.iterations=3``), printed by
the CLI as one line, exit 2. What later code needs of the settings it gets from here typed and
resolved (:class:`SamplerSettings`, :class:`Judging`, :class:`AISSettings`). A model's constructor
still guards its own arguments for the Python API (:mod:`capsrun.registry` makes that one line too).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from capsrun import datasets, speed
from capsrun.errors import ConfigError
from capsrun.mcmc.chains import ChainSpec

MAX_ROUTING_ITERATIONS = 100  # beyond this a run only burns time: the couplings have long converged

# What a sampling ladder (sampler.tempering >= 2) does by default when sampler.ladder_shift and
# sampler.ladder_tune are null: its levels below the model sit above the base-rate model with its
# logits raised by LADDER_SHIFT (a denser melt at the bottom, whose replicas cross the model's
# condensation more often), and it re-spaces itself during the first LADDER_TUNE sweeps (at most
# half of them). docs/capsrbm.md, "Sampling", says why these values.
LADDER_SHIFT = 0.8
LADDER_TUNE = 500

# Keys of earlier releases and where they live now: typed on the command line, each is refused in
# one line that names its new key (capsrun.cli). The energy models' settings moved from model.* and
# model.samples.* into model.net.* and the sampler group.
_LADDER = ("tempering", "ladder_from", "ladder_shift", "ladder_tune")
RENAMED = {
    "train": {f"model.{k}": f"model.net.{k}" for k in ("cd_steps", "persistent", *_LADDER[:3])}
    | {"model.samples.chains": "sampler.chains", "model.samples.gibbs_steps": "sampler.steps"}
    | {f"model.samples.{k}": f"sampler.{k}" for k in _LADDER},
    "sample": {"num_samples": "sampler.chains", "gibbs_steps": "sampler.steps"}
    | {k: f"sampler.{k}" for k in (*_LADDER, "temperature")},
}


# --- values ---------------------------------------------------------------------------------


def integer(value: Any, key: str, minimum: int = 1, example: Any = 3) -> int:
    """``value`` of setting ``key`` if it is an integer >= ``minimum`` (a bool is not), else a
    :class:`ConfigError` naming the key, the value and an example."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key} must be an integer >= {minimum}, got {value!r}; e.g. {key}={example}")
    return value


def number(value: Any, key: str, ok: Any, what: str, example: Any) -> float:
    """``value`` of setting ``key`` as a float if it is a finite number (not a bool) for which
    ``ok`` holds, else a :class:`ConfigError` saying it must be ``what`` (``"a number > 0"``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
        raise ConfigError(f"{key} must be {what}, got {value!r}; e.g. {key}={example}")
    return float(value)


def positive_int(cfg: DictConfig, key: str, minimum: int = 1, example: str = "3") -> int:
    """The integer at dotted ``key`` of ``cfg``, >= ``minimum`` (:func:`integer`)."""
    return integer(OmegaConf.select(cfg, key), key, minimum, example)


def optional_limit(cfg: DictConfig, key: str) -> int | None:
    """A size limit at ``key``: null (all) or a positive integer."""
    value = OmegaConf.select(cfg, key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key} must be null (all) or a positive integer, got {value!r}; e.g. {key}=1000")
    return value


def seed(cfg: DictConfig) -> None:
    """Every command's ``seed`` (where its config has one) must be an integer: checked before
    anything is read or run, so that ``seed=abc`` is one line, not a traceback from the RNG."""
    value = cfg.get("seed", 0)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"seed must be an integer, got {value!r}; e.g. seed=0")


def device(spec: str) -> torch.device:
    """``trainer.device``: ``auto`` picks CUDA when there is one; ``cuda`` without one is an
    error, not a fallback."""
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


# --- capsrun train ----------------------------------------------------------------------------


def average_fraction(cfg: DictConfig) -> float:
    """``trainer.average``: the last fraction of the optimizer steps whose weights are averaged
    (:mod:`capsrun.averaging`), 0 for none."""
    return number(cfg.trainer.get("average", 0.0), "trainer.average", lambda v: 0 <= v < 1, "a number in [0, 1)", 0.2)


def precision(cfg: DictConfig) -> str:
    """``trainer.precision``, checked. (The ``.get`` defaults here and below serve stored configs
    of checkpoints written before the speed settings existed; a config composed from ``conf/``
    always has them.)"""
    value = cfg.trainer.get("precision", "fp32")
    if value not in speed.PRECISIONS:
        choices = ", ".join(speed.PRECISIONS)
        raise ConfigError(f"trainer.precision must be one of {choices}, got {value!r}; e.g. trainer.precision=bf16")
    return value


def compile_mode(cfg: DictConfig) -> str | None:
    """``trainer.compile`` as a ``torch.compile`` mode, or None for eager."""
    try:
        return speed.compile_mode(cfg.trainer.get("compile", False))
    except ValueError as e:
        raise ConfigError(f"trainer.{e}; e.g. trainer.compile=true") from None


def diagnostics_level(cfg: DictConfig) -> str:
    """``off``, ``light`` or ``full``; YAML reads a bare ``off`` as false, which means off too."""
    node = cfg.get("diagnostics")
    level = "off" if node is None or node.get("level") in (None, False) else str(node.level)
    if level not in ("off", "light", "full"):
        raise ConfigError(f"diagnostics level {level!r} is not one of off, light, full; e.g. diagnostics=full")
    return level


@dataclass(frozen=True)
class Diagnostics:
    """``diagnostics.*`` checked (conf/diagnostics/): ``level`` off, light or full; the health is
    measured every ``every_steps`` steps on the first ``examples`` test images; a capsule is dead
    below length ``dead_threshold`` for every one of them."""

    level: str
    every_steps: int = 0
    examples: int = 0
    dead_threshold: float = 0.01


def diagnostics(cfg: DictConfig) -> Diagnostics:
    level = diagnostics_level(cfg)
    if level == "off":
        return Diagnostics(level)
    key = "diagnostics.dead_threshold"
    threshold = number(cfg.diagnostics.get("dead_threshold", 0.01), key, lambda v: v >= 0, "a number >= 0", 0.01)
    every = positive_int(cfg, "diagnostics.every_steps", example="200")
    return Diagnostics(level, every, positive_int(cfg, "diagnostics.examples", example="256"), threshold)


def _data(cfg: DictConfig) -> None:
    """``data.*`` and the dataset's protocol integers."""
    optional_limit(cfg, "data.train_limit")
    optional_limit(cfg, "data.test_limit")
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
    for key in ("max_shift", "crop", "canvas", "test_size", "epoch_size", "affnist_limit", "test_seed"):
        value = cfg.dataset.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise ConfigError(f"dataset.{key} must be an integer >= 0, got {value!r}; e.g. dataset.{key}=4")
    if cfg.dataset.name not in datasets.DATASETS:
        raise ConfigError(f"dataset.name {cfg.dataset.name!r} is not one of {', '.join(datasets.DATASETS)}")


def _pcd_chains(cfg: DictConfig) -> None:
    """PCD takes a batch's model term from one persistent chain per image (the first min(batch,
    chains); :meth:`~capsrun.models.energy.EnergyModel.model_samples`), so chains beyond the batch
    would never move: refused rather than kept idle in every checkpoint."""
    net = cfg.model.get("net") or {}
    chains, batch = net.get("chains"), cfg.trainer.batch_size
    if not net.get("persistent", False) or not isinstance(chains, int) or isinstance(chains, bool):
        return
    if chains > batch:
        raise ConfigError(
            f"model.net.chains={chains} is more than trainer.batch_size={batch}: a step moves one persistent chain per "
            f"image, so {chains - batch} chains would never move; e.g. model.net.chains={batch} "
            f"(or trainer.batch_size={chains})"
        )


def check_model_run(cfg: DictConfig) -> None:
    """What a run of ``cfg`` needs to be built, whatever command builds it (train, and eval on a
    checkpoint's stored config): routing, trainer, data and the speed settings."""
    iterations = positive_int(cfg, "routing.iterations")
    if iterations > MAX_ROUTING_ITERATIONS:
        raise ConfigError(
            f"routing.iterations={iterations} is more than {MAX_ROUTING_ITERATIONS}: each iteration is a full pass "
            "over the votes and the couplings settle within a few (arXiv:1710.09829 uses 3); e.g. routing.iterations=3"
        )
    positive_int(cfg, "trainer.epochs", example="10")
    positive_int(cfg, "trainer.batch_size", example="128")
    positive_int(cfg, "trainer.eval_batch_size", example="512")
    positive_int(cfg, "trainer.log_every", example="50")
    number(OmegaConf.select(cfg, "optimizer.lr", default=1e-3), "optimizer.lr", lambda v: v > 0, "a number > 0", 1e-3)
    integer(cfg.trainer.get("num_images", 8), "trainer.num_images", minimum=0, example=8)
    for key in ("routing.leaky", "routing.detach_inner"):
        if not isinstance(OmegaConf.select(cfg, key, default=False), bool):
            raise ConfigError(f"{key} must be true or false, got {OmegaConf.select(cfg, key)!r}; e.g. {key}=false")
    average_fraction(cfg)
    precision(cfg)
    compile_mode(cfg)
    channels_last = cfg.trainer.get("channels_last", "auto")
    if channels_last not in ("auto", True, False):
        raise ConfigError(f"trainer.channels_last must be auto, true or false, got {channels_last!r}")
    _data(cfg)
    seed(cfg)
    _pcd_chains(cfg)


@dataclass(frozen=True)
class TrainSettings:
    """What ``capsrun train`` decides from its config beyond the run's objects: capsule health,
    how samples are judged, the energy models' sampler (None for other models) and AIS."""

    diagnostics: Diagnostics
    judging: Judging
    sampler: SamplerSettings | None
    ais: AISSettings


def _energy_training(net: DictConfig) -> None:
    """An energy model's training settings (conf/_energy_model.yaml), by their keys; what they
    must be together (a ladder needs PCD, ladder_from needs a ladder) its constructor says."""
    key = "model.net."
    integer(net.get("cd_steps", 1), key + "cd_steps", example=1)
    integer(net.get("tempering", 1), key + "tempering", example=8)
    if net.get("persistent", True):
        integer(net.get("chains", 1), key + "chains", example=100)
    if net.get("ladder_width") is not None:
        integer(net.get("ladder_width"), key + "ladder_width", example="null")
    number(net.get("ladder_from", 0), key + "ladder_from", lambda v: 0 <= v < 1, "a number in [0, 1)", 0.55)
    number(net.get("ladder_shift", 0), key + "ladder_shift", lambda v: 0 <= v <= 10, "a number in [0, 10]", 0.8)


def check_train(cfg: DictConfig, energy: bool) -> TrainSettings:
    """Every setting of ``capsrun train``; ``energy``: the model is an energy model, whose sample
    grid (``sampler.*``) is resolved against its training ladder (``model.net``)."""
    check_model_run(cfg)
    health = diagnostics(cfg)
    if energy:
        _energy_training(cfg.model.net)
    sampler = sampler_settings(cfg.sampler, cfg.model.net, cfg.seed) if energy else None
    return TrainSettings(health, judging(cfg.sample_quality), sampler, ais_settings(cfg.ais))


# --- samples and their judge ------------------------------------------------------------------


@dataclass(frozen=True)
class Judging:
    """``sample_quality.*`` checked (see conf/sample_quality/default.yaml)."""

    every_epochs: int
    confidence: float
    real_images: int
    held_out: int
    calibrate: bool
    per_class: int
    grid_per_class: int


def judging(node: DictConfig) -> Judging:
    key = "sample_quality."
    return Judging(
        every_epochs=integer(node.get("every_epochs", 1), key + "every_epochs", 0, 1),
        confidence=number(
            node.get("confidence", 0.9), key + "confidence", lambda v: 0 < v < 1, "a number in (0, 1)", 0.9
        ),
        real_images=integer(node.get("real_images"), key + "real_images", 2, 5000),
        held_out=integer(node.get("held_out", 0), key + "held_out", 0, 5000),
        calibrate=bool(node.get("calibrate", True)),
        per_class=integer(node.get("per_class", 100), key + "per_class", 1, 100),
        grid_per_class=integer(node.get("grid_per_class", 8), key + "grid_per_class", 1, 8),
    )


@dataclass(frozen=True)
class SamplerSettings:
    """``sampler.*`` resolved against the model it samples: ``chains`` chains run as ``spec``."""

    chains: int
    spec: ChainSpec


def sampler_settings(node: DictConfig, trained: Mapping, seed_value: int) -> SamplerSettings:
    """``sampler.*`` (conf/sampler/default.yaml) for a model whose ``model.net`` is ``trained``:
    ``tempering`` null is its training ladder's levels (1 without one), ``ladder_shift`` and
    ``ladder_tune`` null are :data:`LADDER_SHIFT` and :data:`LADDER_TUNE` with a ladder, 0 without;
    a sampling ladder may not start below the training ladder's lowest level (it is spaced as the
    model's tuned ladder, which has no levels there)."""
    chains = integer(node.get("chains"), "sampler.chains", example=100)
    steps = integer(node.get("steps"), "sampler.steps", example=2000)
    temperature = number(node.get("temperature", 1.0), "sampler.temperature", lambda v: v > 0, "a number > 0", 1.0)
    tempering = node.get("tempering")
    if tempering is None:  # the training ladder's levels: a wrong value there is that key's
        tempering = integer(trained.get("tempering", 1), "model.net.tempering", 1, 8)
    tempering = integer(tempering, "sampler.tempering", 1, 8)
    if tempering > 1 and temperature != 1:
        raise ConfigError("a tempering ladder samples the model at temperature 1; e.g. sampler.tempering=1")
    lowest = number(node.get("ladder_from", 0), "sampler.ladder_from", lambda v: 0 <= v < 1, "a number in [0, 1)", 0.55)
    if lowest > 0 and tempering < 2:
        raise ConfigError("sampler.ladder_from needs a tempering ladder of 2 or more levels; e.g. sampler.tempering=8")
    levels, start = trained.get("tempering", 1), trained.get("ladder_from", 0) or 0  # checked where they are set
    trained_from = float(start) if isinstance(levels, int) and levels > 1 and isinstance(start, (int, float)) else 0.0
    if 0 < lowest < trained_from:
        raise ConfigError(
            f"sampler.ladder_from={lowest} is below the training ladder's lowest level ({trained_from:g}): the "
            f"sampling ladder is spaced as the trained one; e.g. sampler.ladder_from={trained_from:g} (or 0: its own)"
        )
    shift, tune = node.get("ladder_shift"), node.get("ladder_tune")
    ladder = tempering > 1
    shift = (LADDER_SHIFT if ladder else 0.0) if shift is None else shift
    tune = (min(LADDER_TUNE, steps // 2) if ladder else 0) if tune is None else tune
    shift = number(shift, "sampler.ladder_shift", lambda v: 0 <= v <= 10, "a number in [0, 10] or null", 1.0)
    tune = integer(tune, "sampler.ladder_tune", 0, 500)
    if (shift or tune) and not ladder:
        raise ConfigError(
            "sampler.ladder_shift and sampler.ladder_tune shape a tempering ladder; give one or leave them null"
        )
    spec = ChainSpec(steps, tempering, lowest, shift, tune, temperature, seed_value)
    return SamplerSettings(chains, spec)


@dataclass(frozen=True)
class AISSettings:
    """``ais.*`` checked: runs >= 1, temperatures >= 2 (0 and 1), base_images >= 1, a seed."""

    runs: int
    temperatures: int
    base_images: int
    seed: int
    at_end: bool = True


def ais_settings(node: DictConfig) -> AISSettings:
    return AISSettings(
        runs=integer(node.get("runs"), "ais.runs", example=100),
        temperatures=integer(node.get("temperatures"), "ais.temperatures", 2, 10000),
        base_images=integer(node.get("base_images"), "ais.base_images", example=10000),
        seed=integer(node.get("seed"), "ais.seed", 0, 0),
        at_end=bool(node.get("at_end", True)),
    )


# --- the commands on a checkpoint ----------------------------------------------------------------


def checkpoint_given(cfg: DictConfig, command: str, what: str = "<run dir>/checkpoints/best.pt") -> None:
    if OmegaConf.is_missing(cfg, "checkpoint"):
        raise ConfigError(f"no checkpoint given; use capsrun {command} checkpoint={what}")
    given = cfg.checkpoint
    specs = list(given) if OmegaConf.is_list(given) else [given]
    if not specs or any(s is None or not str(s).strip() or OmegaConf.is_config(s) for s in specs):
        raise ConfigError(f"checkpoint={given} names no checkpoint file; use capsrun {command} checkpoint={what}")


@dataclass(frozen=True)
class SampleSettings:
    """``capsrun sample``'s own settings beyond the sampler (resolved later against the
    checkpoint's model: :func:`sampler_settings`)."""

    judging: Judging
    init: str
    anneal: int
    judge_every: int


def check_sample(cfg: DictConfig) -> SampleSettings:
    """``capsrun sample``'s settings that need no model (``sampler.*``: :func:`sampler_settings`)."""
    checkpoint_given(cfg, "sample")
    for key in ("samples_per_class", "inputs", "variations"):
        integer(cfg[key], key, example=8)
    if not cfg.perturb.step > 0 or not cfg.perturb.range >= 0:
        raise ConfigError("perturb.step must be > 0 and perturb.range >= 0; e.g. perturb.range=0.25 perturb.step=0.05")
    integer(cfg.sampler.get("chains"), "sampler.chains", example=100)
    integer(cfg.sampler.get("steps"), "sampler.steps", example=2000)
    judge_every = integer(cfg.get("judge_every", 0), "judge_every", 0, 500)
    if cfg.init not in ("noise", "data", "chains"):
        raise ConfigError(f"init must be noise, data or chains, got {cfg.init!r}; e.g. init=noise")
    anneal = integer(cfg.get("anneal", 0), "anneal", 0, 100000)
    if anneal == 1:
        raise ConfigError("anneal is a number of temperatures from 0 to 1: 0 (none) or >= 2; e.g. anneal=100000")
    if anneal and cfg.init != "noise":
        raise ConfigError(f"anneal starts the chains from noise, not init={cfg.init}; give init=noise or anneal=0")
    if judge_every and cfg.get("eval_classifier") in (None, ""):
        raise ConfigError("judge_every needs a judge: add eval_classifier=<best.pt of a capsnet>, or judge_every=0")
    return SampleSettings(judging(cfg.sample_quality), cfg.init, anneal, judge_every)


def check_eval(cfg: DictConfig) -> AISSettings:
    checkpoint_given(cfg, "eval")
    return ais_settings(cfg.ais)


def check_analyze(cfg: DictConfig) -> None:
    checkpoint_given(cfg, "analyze", "<best.pt, run dir or multirun dir>")
    if cfg.split not in ("test", "train"):
        raise ConfigError(f"split must be test or train, got {cfg.split!r}; e.g. split=test")
    integer(cfg.examples, "examples", minimum=2, example=1000)


def check_bench(cfg: DictConfig, cpu: bool) -> tuple[int, int, int]:
    """``(warmup, steps, repeats)`` with ``auto`` resolved for a CPU or a GPU, and the lists of
    models, iterations, batch sizes, precisions and compile settings checked."""
    warmup = cfg.warmup if cfg.warmup != "auto" else (2 if cpu else 10)
    steps = cfg.steps if cfg.steps != "auto" else (3 if cpu else 30)
    repeats = cfg.repeats if cfg.repeats != "auto" else (3 if cpu else 5)
    for key, value in (("warmup", warmup), ("steps", steps), ("repeats", repeats)):
        integer(value, key, minimum=0 if key == "warmup" else 1, example=5)
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
    return warmup, steps, repeats
