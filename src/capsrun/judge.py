"""The judge of generated images: a CapsNet trained on the real data, as sample quality asks.

How a classifier trained on real images sees generated ones: the share it recognises with
confidence (its class posterior from the capsule lengths, temperature-calibrated on labelled real
images), their class histogram, and a Frechet distance between real and generated images in the
classifier's feature space (its flattened class capsules; a stand-in for FID on digits), read
against what real images score at the same number (:func:`frechet_floor`).

Nothing here reads a config or a file; :mod:`capsrun.commands` wires it up.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.linalg
import torch
from torch import nn


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to feature sets ``a`` [N, D] and ``b`` [M, D]:
    ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` (Dowson & Landau 1982; as in FID,
    Heusel et al. arXiv:1706.08500), in float64."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError("the Frechet distance needs at least two feature vectors per set")
    a64, b64 = a.double().cpu().numpy(), b.double().cpu().numpy()
    mu_a, mu_b = a64.mean(0), b64.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(a64, rowvar=False)), np.atleast_2d(np.cov(b64, rowvar=False))
    root = scipy.linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(root).all():  # singular product: the usual FID remedy, a small ridge
        ridge = np.eye(len(cov_a)) * 1e-6
        root = scipy.linalg.sqrtm((cov_a + ridge) @ (cov_b + ridge))
    root = np.real(root)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(root))


def frechet_floor(
    reference: torch.Tensor, held_out: torch.Tensor, n: int, draws: int = 10, seed: int = 0
) -> tuple[float, float]:
    """What real images score: the mean and standard deviation of :func:`frechet_distance` between
    ``reference`` features [R, F] and ``draws`` random sets of ``n`` rows of ``held_out`` [M, F]
    (real images not in the reference, M >= n; the sets are drawn without replacement, each on its
    own). Why: the distance of n samples is biased upwards by their sample covariance (its bias
    falls about as 1/n, Chong & Forsyth, arXiv:1911.07023), so a sample set's distance is read
    against real images' at the same n, not against 0."""
    if not 2 <= n <= len(held_out):
        raise ValueError(f"the floor at n = {n} needs 2 <= n <= {len(held_out)} held-out feature vectors")
    gen = torch.Generator().manual_seed(seed)
    scores = [
        frechet_distance(reference, held_out[torch.randperm(len(held_out), generator=gen)[:n]]) for _ in range(draws)
    ]
    mean = sum(scores) / len(scores)
    std = (sum((x - mean) ** 2 for x in scores) / max(len(scores) - 1, 1)) ** 0.5
    return mean, std


def class_posterior(lengths: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """p(class k | exactly one class present) ``[N, K]`` from capsule lengths ``[N, K]``: each
    length is the probability that its entity is present (arXiv:1710.09829 Sec. 3), independently,
    so given exactly one, p(k) = odds_k / sum_j odds_j with odds = L / (1 - L). A clean digit with
    L = 0.85 and the others at 0.05 gets 0.92; the longest length alone rarely passes 0.9 (the
    margin loss stops pushing at m+ = 0.9). ``temperature`` T: the log-odds divided by T
    (temperature scaling, Guo et al., arXiv:1706.04599; :func:`judge_temperature` fits it)."""
    log_odds = torch.logit(lengths.clamp(1e-6, 1 - 1e-6))
    return torch.softmax(log_odds / temperature, dim=-1)


def judge_temperature(lengths: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature T that calibrates :func:`class_posterior` on labelled real images: the
    minimiser of their mean negative log posterior of the true class (Guo et al., "On calibration
    of modern neural networks", arXiv:1706.04599, Sec. 4.2), searched over log T in [-3, 3]
    (golden section; the loss is convex in 1/T). ``lengths`` [N, K], ``labels`` [N].

    Why: a CapsNet trained with the margin loss leaves a clean digit's length just under m+ = 0.9
    and the others just over m- = 0.1, so its raw posterior sits near 0.9 for real digits whatever
    its accuracy; calibrated, a confidence of 0.9 means 90 % right."""
    log_odds = torch.logit(lengths.double().clamp(1e-6, 1 - 1e-6))

    def nll(log_t: float) -> float:
        return float(torch.nn.functional.cross_entropy(log_odds / math.exp(log_t), labels.long()))

    lo, hi, ratio = -3.0, 3.0, (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = nll(a), nll(b)
    for _ in range(60):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = nll(b)
    return math.exp((lo + hi) / 2)


@torch.no_grad()
def classifier_outputs(classifier: nn.Module, images: torch.Tensor, batch_size: int = 500, temperature: float = 1.0):
    """The classifier's predicted classes [N], features (flattened class capsules) [N, F] and
    confidence [N]: :func:`class_posterior` of its capsule lengths at ``temperature``, at the
    predicted class."""
    classifier.eval()
    preds, feats, confidence = [], [], []
    for chunk in images.split(batch_size):
        out = classifier(chunk)
        top = class_posterior(out.scores.float(), temperature).max(dim=-1)
        preds.append(top.indices)
        confidence.append(top.values)
        feats.append(out.digit_caps.flatten(1).float())
    return torch.cat(preds), torch.cat(feats), torch.cat(confidence)


@torch.no_grad()
def classifier_lengths(classifier: nn.Module, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """The classifier's capsule lengths ``[N, K]`` (what :func:`judge_temperature` fits)."""
    classifier.eval()
    return torch.cat([classifier(chunk).scores.float() for chunk in images.split(batch_size)])


class Judge:
    """A CapsNet that judges unconditional samples against labelled real images ``real`` [N, C, H,
    W] (as the samples are: binarised for energy models) and ``labels`` [N]: its temperature,
    fitted on them when ``calibrate`` (:func:`judge_temperature`; else 1: the raw posterior), and
    the real images' features and confidence at that temperature. ``held_out`` [M, C, H, W]: more
    real images, not in ``real``, whose distance to them at the samples' number is the floor of the
    Frechet distance (:func:`frechet_floor`); None: no floor."""

    def __init__(
        self,
        classifier: nn.Module,
        real: torch.Tensor,
        labels: torch.Tensor,
        calibrate: bool = True,
        held_out: torch.Tensor | None = None,
    ):
        self.classifier = classifier
        self.temperature = judge_temperature(classifier_lengths(classifier, real), labels) if calibrate else 1.0
        _, self.features, self.confidence = classifier_outputs(classifier, real, temperature=self.temperature)
        self.held_out_features = None  # [M, F]: what frechet_floor draws from
        if held_out is not None and len(held_out) >= 2:
            self.held_out_features = classifier_outputs(classifier, held_out)[1]

    def quality(self, samples: torch.Tensor, num_classes: int, confidence: float = 0.9) -> dict[str, float]:
        """:func:`unconditional_quality` of ``samples`` at this judge's temperature, with
        ``samples/judge_temperature``, when calibrated ``samples/recognised_uncalibrated``, and
        with enough held-out images ``samples/frechet_distance_real`` (``_std``): the distance of
        as many real images as there are samples (:func:`frechet_floor`, 10 draws)."""
        real = (self.features, self.confidence)
        metrics = unconditional_quality(self.classifier, samples, real, num_classes, confidence, self.temperature)
        metrics["samples/judge_temperature"] = self.temperature
        if self.held_out_features is not None and 2 <= len(samples) <= len(self.held_out_features):
            floor, spread = frechet_floor(self.features, self.held_out_features, len(samples))
            metrics["samples/frechet_distance_real"], metrics["samples/frechet_distance_real_std"] = floor, spread
        if self.temperature != 1.0:
            _, _, raw = classifier_outputs(self.classifier, samples)
            metrics["samples/recognised_uncalibrated"] = 100.0 * (raw > confidence).float().mean().item()
        return metrics

    def weighted_classes(
        self, samples: torch.Tensor, weights: torch.Tensor, num_classes: int, confidence: float = 0.9
    ) -> dict[str, float]:
        """The class mix of importance-weighted ``samples`` [N, C, H, W] (``weights`` [N], summing to
        1; e.g. :attr:`capsrun.mcmc.ais.Annealed.weights`): ``<k>`` the weight (%) of the samples the
        judge predicts as class k, ``recognised`` the weight (%) of those it recognises with
        confidence > ``confidence``. Properly weighted samples make these the model's own class mix
        and recognised share, not the sampler's."""
        preds, _, conf = classifier_outputs(self.classifier, samples, temperature=self.temperature)
        w = weights.to(torch.float64).cpu()
        shares = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, preds.cpu(), w) * 100
        out = {str(k): float(x) for k, x in enumerate(shares)}
        out["recognised"] = 100.0 * float(w[(conf > confidence).cpu()].sum())
        return out


def unconditional_quality(
    classifier: nn.Module,
    samples: torch.Tensor,
    real: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    confidence: float = 0.9,
    temperature: float = 1.0,
) -> dict[str, float]:
    """How a classifier trained on real data sees unconditional ``samples`` [N, C, H, W] in [0, 1]:
    ``samples/recognised`` (% with confidence > ``confidence``), ``samples/class_share/<k>`` (% of
    the samples predicted as class k: the class histogram), ``samples/frechet_distance`` to the
    real images' features in the classifier's capsule space (:func:`frechet_distance`), and
    ``samples/recognised_real``: the share of the real images themselves that pass, what a weak
    classifier's ``recognised`` should be read against. ``real``: (features [M, F], confidence [M])
    of the real images, from :func:`classifier_outputs` at the same ``temperature``."""
    real_features, real_confidence = real
    preds, feats, conf = classifier_outputs(classifier, samples, temperature=temperature)
    counts = torch.bincount(preds.cpu(), minlength=num_classes).float()
    metrics = {
        "samples/recognised": 100.0 * (conf > confidence).float().mean().item(),
        "samples/recognised_real": 100.0 * (real_confidence > confidence).float().mean().item(),
    }
    metrics.update({f"samples/class_share/{k}": 100.0 * float(c) / len(samples) for k, c in enumerate(counts)})
    metrics["samples/frechet_distance"] = frechet_distance(real_features, feats)
    return metrics
