"""Annealed importance sampling (AIS) of the partition function of an energy model.

Neal, "Annealed importance sampling", Statistics and Computing 2001; for RBMs Salakhutdinov &
Murray, "On the quantitative analysis of deep belief networks", ICML 2008, Sec. 4. From the
base-rate model p_0 (independent pixels with the data's means, hidden units uniform; its log Z_0
is exact) through p_beta ~ exp((1 - beta) base . v - beta E(v, h)) to the model at beta = 1:

    x_0 ~ p_0;  log w += log p*_{beta_k}(x_{k-1}) - log p*_{beta_{k-1}}(x_{k-1});  x_k ~ T_k(x_{k-1})
    log Z ~ log Z_0 + log mean exp(log w)

with T_k the model's own chain at beta_k (:meth:`~capsrun.models.energy.EnergyModel.transition`:
block Gibbs for the RBM, the MH-corrected block step for the capsule RBM), and p*_beta(v) with the
hidden units summed out exactly. Test log-likelihood: mean_v -F(v) - log Z, in nats.

The spread of log w says whether to trust the estimate: log mean exp is dominated by a few runs
when std(log w) is large (above ~5 nats it is not reliable, ../shared/spec/capsrbm-research.md);
too few temperatures show up there first. Nothing here reads a config or a file.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from tqdm import tqdm

from capsrun.models.energy import base_rate  # noqa: F401  (the base-rate model's biases; AIS starts there)

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
    n3 = max(temperatures - n1 - n2, 1)
    pieces = [
        torch.linspace(0, 0.5, n1 + 1, dtype=torch.float64)[:-1],
        torch.linspace(0.5, 0.9, n2 + 1, dtype=torch.float64)[:-1],
        torch.linspace(0.9, 1, n3, dtype=torch.float64),
    ]
    betas = torch.cat(pieces)
    if len(betas) > temperatures:  # very short schedules: keep both ends
        betas = torch.linspace(0, 1, temperatures, dtype=torch.float64)
    return betas


@torch.no_grad()
def log_partition(
    model,
    base: torch.Tensor,
    temperatures: int = 10_000,
    runs: int = 100,
    seed: int = 0,
    progress: bool = False,
) -> AISResult:
    """AIS estimate of log Z of ``model`` (an :class:`~capsrun.models.energy.EnergyModel`) from
    the base-rate model with visible biases ``base`` [C*H*W]. The global RNG is left as it was."""
    if runs < 1:
        raise ValueError(f"AIS needs at least 1 run, got {runs}")
    betas = schedule(temperatures).tolist()
    was_training = model.training
    model.eval()
    device = base.device
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            v = torch.bernoulli(torch.sigmoid(base).expand(runs, -1)).view(runs, *model.image_shape)
            enc = model.encode(v)
            log_w = torch.zeros(runs, dtype=torch.float64, device=device)
            steps = tqdm(range(1, len(betas)), desc="AIS", disable=None if progress else True, leave=False)
            for k in steps:
                prev, beta = betas[k - 1], betas[k]
                gain = model.free_energy_at(v, enc, prev, base) - model.free_energy_at(v, enc, beta, base)
                log_w += gain.double()
                if k < len(betas) - 1:
                    v, enc, _ = model.transition(v, enc, beta, base)
    finally:
        model.train(was_training)
    log_z0 = float(model.log_base_partition(base))
    log_z = log_z0 + float(torch.logsumexp(log_w, 0)) - math.log(runs)
    std = float(log_w.std()) if runs > 1 else 0.0
    return AISResult(log_z, log_z0, std, runs, len(betas))


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
