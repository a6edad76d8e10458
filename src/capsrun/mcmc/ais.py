"""Annealed importance sampling (AIS) of the partition function of an energy model.

Neal, "Annealed importance sampling", Statistics and Computing 2001; for RBMs Salakhutdinov &
Murray, "On the quantitative analysis of deep belief networks", ICML 2008, Sec. 4. From the
base-rate model p_0 (independent pixels with the data's means, hidden units uniform; its log Z_0
is exact) through p_beta ~ exp((1 - beta) base . v - beta E(v, h)) to the model at beta = 1:

    x_0 ~ p_0;  log w += log p*_{beta_k}(x_{k-1}) - log p*_{beta_{k-1}}(x_{k-1});  x_k ~ T_k(x_{k-1})
    log Z ~ log Z_0 + log mean exp(log w)

with T_k the model's own chain at beta_k (:meth:`~capsrun.mcmc.base.EnergyChain.transition`:
block Gibbs for the RBM; for the capsule RBM block Gibbs on the image and its routes, the states x
then being (v, r)), and p*_beta(x) with the hidden units summed out exactly. Test log-likelihood:
mean_v log p*(v) - log Z, in nats (:mod:`capsrun.likelihood`).

The spread of log w says whether to trust the estimate: log mean exp is dominated by a few runs
when std(log w) is large (above about 5 nats a handful of runs carry the estimate; docs/capsrbm.md,
"Likelihood"); too few temperatures show up there first. Nothing here reads a config or a file.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from capsrun.mcmc.base import EnergyChain
from capsrun.progress import Progress

log = logging.getLogger("capsrun")

UNRELIABLE_STD = 5.0  # nats: std(log w) above this, log Z is dominated by a few runs


@dataclass
class AISResult:
    """``log_z``: the estimate; ``log_z_base``: log Z_0, exact; ``log_w_std``: the standard
    deviation of the log importance weights; ``runs`` and ``temperatures``: what was used."""

    log_z: float
    log_z_base: float
    log_w_std: float
    runs: int
    temperatures: int

    @property
    def reliable(self) -> bool:
        return self.log_w_std <= UNRELIABLE_STD


def schedule(temperatures: int) -> torch.Tensor:
    """``temperatures`` inverse temperatures from 0 to 1, spaced as Salakhutdinov & Murray's
    14,500 (500 in [0, 0.5), 4,000 in [0.5, 0.9), 10,000 in [0.9, 1]): densest near 1. ``[K]``."""
    if temperatures < 2:
        raise ValueError(f"AIS needs at least 2 temperatures (0 and 1), got {temperatures}")
    n1 = max(1, round(temperatures * 500 / 14500))
    n2 = max(1, round(temperatures * 4000 / 14500))
    n3 = max(temperatures - n1 - n2, 2)  # the last piece holds 0.9 and 1 at least
    pieces = [
        torch.linspace(0, 0.5, n1 + 1, dtype=torch.float64)[:-1],
        torch.linspace(0.5, 0.9, n2 + 1, dtype=torch.float64)[:-1],
        torch.linspace(0.9, 1, n3, dtype=torch.float64),
    ]
    betas = torch.cat(pieces)
    if len(betas) > temperatures:  # very short schedules: keep both ends
        betas = torch.linspace(0, 1, temperatures, dtype=torch.float64)
    return betas


@dataclass
class Annealed:
    """The end of R annealing runs: ``v`` the final states [R, C, H, W] and ``log_w`` their log
    importance weights [R] (float64). Together they are properly weighted for the model: a mean
    of f(v) weighted by softmax(log_w) estimates E_p[f] (Neal 2001, Sec. 2), however unevenly the
    annealing itself spread the runs over the model's modes."""

    v: torch.Tensor
    log_w: torch.Tensor
    kept: torch.Tensor | None = None  # [len(keep), R, C, H, W]: the states where the path passed ``keep``

    @property
    def weights(self) -> torch.Tensor:
        """The normalised importance weights ``[R]``."""
        return torch.softmax(self.log_w, 0)

    @property
    def ess(self) -> float:
        """Kish's effective sample size 1 / sum w^2 of the normalised weights: R when they are
        even, 1 when one run takes all the weight."""
        return float(1.0 / self.weights.pow(2).sum())


@torch.no_grad()
def anneal(
    model: EnergyChain,
    base: torch.Tensor,
    temperatures: int = 10_000,
    runs: int = 100,
    seed: int = 0,
    start: torch.Tensor | None = None,
    keep: Sequence[float] = (),
    progress: bool = False,
) -> Annealed:
    """R runs of AIS from the base-rate model with visible biases ``base`` [C*H*W] to ``model``
    through :func:`schedule`'s ``temperatures``, one step of the model's own chain at each. The
    runs start at draws from the base-rate model, or with ``start`` [R, C, H, W] (e.g. uniform
    noise; ``runs`` is then len(start)) at one step of the chain at beta = 0 from there, which is
    such a draw (the model's terms vanish at beta = 0). ``keep``: inverse temperatures in [0, 1)
    (increasing) at which to keep a copy of the states, those after the step at the first
    temperature at or above each (where a tempering ladder's lower levels can start). The global
    RNG is left as it was; the model is left in eval mode."""
    if runs < 1:
        raise ValueError(f"AIS needs at least 1 run, got {runs}")
    if any(not 0 <= b < 1 for b in keep) or list(keep) != sorted(keep):
        raise ValueError(f"keep must be increasing inverse temperatures in [0, 1), got {list(keep)}")
    betas = schedule(temperatures).tolist()
    pending, kept = list(keep), []
    model.eval()
    device = base.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        if start is None:
            v = torch.bernoulli(torch.sigmoid(base).expand(runs, -1)).view(runs, *model.image_shape)
            enc = model.chain_state(v)
        else:
            start = start.to(device)
            v, enc, _ = model.transition(start, model.chain_state(start), 0.0, base)
        log_w = torch.zeros(len(v), dtype=torch.float64, device=device)
        steps = Progress(len(betas) - 1, "AIS", "temperatures", bar=progress)
        for k in range(1, len(betas)):
            prev, beta = betas[k - 1], betas[k]
            gain = model.free_energy_at(v, enc, prev, base) - model.free_energy_at(v, enc, beta, base)
            log_w += gain.double()
            if k < len(betas) - 1:
                v, enc, _ = model.transition(v, enc, beta, base)
            while pending and beta >= pending[0]:
                kept.append(v.clone())
                pending.pop(0)
            steps.update()
        steps.close()
    if pending:  # above the last temperature below 1: the final states
        kept += [v.clone() for _ in pending]
    return Annealed(v, log_w, torch.stack(kept) if kept else None)


@torch.no_grad()
def log_partition(
    model: EnergyChain,
    base: torch.Tensor,
    temperatures: int = 10_000,
    runs: int = 100,
    seed: int = 0,
    progress: bool = False,
) -> AISResult:
    """AIS estimate of log Z of ``model`` (an :class:`~capsrun.mcmc.base.EnergyChain`) from
    the base-rate model with visible biases ``base`` [C*H*W]. The global RNG is left as it was."""
    was_training = model.training
    try:
        log_w = anneal(model, base, temperatures, runs, seed, progress=progress).log_w
    finally:
        model.train(was_training)
    log_z0 = float(model.log_base_partition(base))
    log_z = log_z0 + float(torch.logsumexp(log_w, 0)) - math.log(runs)
    std = float(log_w.std()) if runs > 1 else 0.0
    return AISResult(log_z, log_z0, std, runs, len(schedule(temperatures)))


@torch.no_grad()
def mean_free_energy(model, batches) -> tuple[float, int]:
    """The mean F(v) over binary images from ``batches`` (tensors [B, C, H, W] in [0, 1]) and
    how many images that was."""
    total, n = 0.0, 0
    for x in batches:
        v = model.visible_states(x)
        total += float(model.free_energy(v).double().sum())
        n += len(v)
    return total / max(n, 1), n


def log_likelihood_metrics(result: AISResult, mean_f: float, prefix: str = "test") -> dict[str, float]:
    """TensorBoard-keyed figures of one AIS estimate: ``<prefix>/log_likelihood`` (nats, mean
    over the images) and the estimate's own figures under ``ais/``."""
    if not result.reliable:
        log.warning(
            "AIS: std of the log importance weights %.1f > %.0f nats: log Z is not reliable; "
            "use more temperatures (ais.temperatures) or runs (ais.runs)",
            result.log_w_std,
            UNRELIABLE_STD,
        )
    return {
        f"{prefix}/log_likelihood": -mean_f - result.log_z,
        "ais/log_z": result.log_z,
        "ais/log_z_base": result.log_z_base,
        "ais/log_w_std": result.log_w_std,
        "ais/runs": result.runs,
        "ais/temperatures": result.temperatures,
    }
