"""The test log-likelihood of an energy model, in nats, by AIS over a run's loaders.

log p(v) = -F(v) - log Z: F(v) is exact (the hidden units are summed out), log Z is estimated by
annealed importance sampling from the base-rate model of the training images
(:mod:`capsrun.mcmc.ais`). ``capsrun train`` logs it after the last epoch (``ais.at_end``),
``capsrun eval`` on a checkpoint; both through :func:`ais_log_likelihood`.
"""

from __future__ import annotations

import logging

import torch

from capsrun.batch import first_images, unpack
from capsrun.errors import ConfigError
from capsrun.mcmc import ais
from capsrun.mcmc.base import base_rate
from capsrun.settings import AISSettings

log = logging.getLogger("capsrun")


def base_of(model, loaders, images: int = 10_000) -> torch.Tensor:
    """The base-rate model at the bottom of a sampling ladder or an annealing ``[C*H*W]``: the
    model's own when it was trained with tempering, else the base rate of the first ``images``
    training images, binarised as the model sees them, on the model's device."""
    own = getattr(model, "base_rate", None)
    if own is not None:
        return own
    if loaders.train is None:
        raise ConfigError("a ladder or an annealing needs the training images for its base-rate model")
    base = base_rate(model.visible_states(first_images(loaders.train, images)))
    return base.to(next(model.parameters()).device)


def ais_log_likelihood(model, loaders, settings: AISSettings, progress: bool) -> dict[str, float]:
    """``<split>/log_likelihood`` of every evaluation split and the estimate's own ``ais/*``
    figures; the base-rate model from the first ``settings.base_images`` training images."""
    if loaders.train is None:
        raise ConfigError("AIS needs the training images for its base-rate model")
    base = base_rate(model.visible_states(first_images(loaders.train, settings.base_images)))
    base = base.to(next(model.parameters()).device)
    log.info("AIS: %d runs x %d temperatures ...", settings.runs, settings.temperatures)
    result = ais.log_partition(model, base, settings.temperatures, settings.runs, seed=settings.seed, progress=progress)
    metrics: dict[str, float] = {}
    for name, loader in loaders.evals.items():
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


class LogLikelihoodHook:
    """An epoch hook: :func:`ais_log_likelihood` after the last epoch (nothing before it)."""

    def __init__(self, loaders, settings: AISSettings, progress: bool):
        self.loaders, self.settings, self.progress = loaders, settings, progress

    def __call__(self, model, epoch: int, last: bool) -> dict:
        return ais_log_likelihood(model, self.loaders, self.settings, self.progress) if last else {}
