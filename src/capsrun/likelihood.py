"""The test log-likelihood of an energy model, in nats, by AIS over a run's loaders.

log p(v) = -F(v) - log Z: log Z is estimated by annealed importance sampling from the base-rate
model of the training images (:mod:`capsrun.mcmc.ais`); F(v) is exact where the hidden units are
summed out (the RBM), estimated by importance sampling where they are not (the capsule RBM's
routes: :meth:`~capsrun.models.capsrbm.CapsuleRBM.marginal_free_energy`), and then the figure
comes with the number of samples and the spread of their log weights. ``capsrun train`` logs it
after the last epoch (``ais.at_end``), ``capsrun eval`` on a checkpoint; both through
:func:`ais_log_likelihood`.
"""

from __future__ import annotations

import logging
import time

import torch

from capsrun.batch import first_images, unpack
from capsrun.errors import ConfigError
from capsrun.mcmc import ais
from capsrun.mcmc.base import base_rate
from capsrun.mcmc.chains import step_seconds
from capsrun.progress import Progress
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
    samples = int(getattr(model, "samples", 0)) if has_estimate(model) else 0
    for name, loader in loaders.evals.items():
        with torch.random.fork_rng(devices=_cuda(model)):  # the importance samples: seeded, the global RNG untouched
            torch.manual_seed(settings.seed)
            what = f"{name} log p(v) by importance sampling" if samples else f"{name} free energy"
            with Progress(loader.num_examples, what, "images", bar=progress) as shown:
                mean_f, spread, n = marginal_free_energy(model, _chunks(unpack(b)[0] for b in loader.epoch(0)), shown)
        metrics.update(ais.log_likelihood_metrics(result, mean_f, prefix=name))
        if samples:  # F(v) itself estimated: by how many importance samples, and their spread
            metrics[f"{name}/log_likelihood_samples"] = samples
            metrics[f"{name}/log_likelihood_spread"] = spread
        log.info(
            "%s log-likelihood %.2f nats per image (%s) on %d images (AIS log Z %.2f, std of log weights %.2f, "
            "%d runs x %d temperatures)",
            name,
            metrics[f"{name}/log_likelihood"],
            kind(model),
            n,
            result.log_z,
            result.log_w_std,
            result.runs,
            result.temperatures,
        )
    return metrics


CHUNK = 100  # images per importance-sampling pass: the estimate does not depend on the loader's batch size


def _chunks(batches):
    """The images of ``batches`` regrouped into chunks of :data:`CHUNK` (the last may be shorter)."""
    held: list[torch.Tensor] = []
    count = 0
    for x in batches:
        held.append(x)
        count += len(x)
        while count >= CHUNK:
            both = torch.cat(held)
            yield both[:CHUNK]
            held, count = [both[CHUNK:]], count - CHUNK
    if count:
        yield torch.cat(held)


def _cuda(model) -> list[torch.device]:
    device = next(model.parameters()).device
    return [device] if device.type == "cuda" else []


def has_estimate(model) -> bool:
    """Whether the model estimates F(v) (:meth:`~capsrun.models.energy.EnergyModel.marginal_free_energy`
    overridden) rather than computing it exactly."""
    from capsrun.models.energy import EnergyModel

    own = getattr(type(model), "marginal_free_energy", None)
    return own is not None and own is not EnergyModel.marginal_free_energy


def kind(model) -> str:
    """What ``test/log_likelihood`` is for this model, in words (``metrics.json`` keeps it)."""
    if has_estimate(model):
        return (
            f"estimate: log p(v) by importance sampling ({getattr(model, 'samples', '?')} samples a test image), "
            "a lower bound in expectation; log Z by AIS"
        )
    return "exact free energy; log Z by AIS"


@torch.no_grad()
def marginal_free_energy(model, batches, shown: Progress | None = None) -> tuple[float, float, int]:
    """The mean F(v) over binary images from ``batches`` (tensors [B, C, H, W] in [0, 1]), the
    mean spread of its estimate (0 where it is exact) and how many images that was; ``shown``
    counts the images done."""
    total, spread, n = 0.0, 0.0, 0
    for x in batches:
        f, s = model.marginal_free_energy(model.visible_states(x))
        total += float(f.double().sum())
        spread += 0.0 if s is None else float(s.double().sum())
        n += len(f)
        if shown is not None:
            shown.update(len(f))
    return total / max(n, 1), spread / max(n, 1), n


class LogLikelihoodHook:
    """An epoch hook: :func:`ais_log_likelihood` after the last epoch (nothing before it)."""

    def __init__(self, loaders, settings: AISSettings, progress: bool):
        self.loaders, self.settings, self.progress = loaders, settings, progress

    what = "AIS"

    def seconds(self, model, epochs: range) -> float:
        """About how long the estimate after the last of ``epochs`` takes: AIS from one timed step
        of the chain, F(v) of the evaluation images from one timed chunk."""
        if not epochs:
            return 0.0
        runs = step_seconds(model, self.settings.runs) * self.settings.temperatures
        x = model.visible_states(first_images(self.loaders.evals["test"], CHUNK))
        with torch.random.fork_rng(devices=_cuda(model)):
            t0 = time.perf_counter()
            marginal_free_energy(model, [x])
            chunk = time.perf_counter() - t0
        images = sum(loader.num_examples for loader in self.loaders.evals.values())
        return runs + chunk * images / len(x)

    def __call__(self, model, epoch: int, last: bool) -> dict:
        return ais_log_likelihood(model, self.loaders, self.settings, self.progress) if last else {}
