"""Images from trained capsule models, and how good class-conditional samples are.

- :func:`class_conditional`: z ~ N(0, I) in the chosen class capsule of a variational capsule model
  (arXiv:1807.04099), decoded.
- :func:`posterior_variations`: one input, its posterior sample drawn again and again.
- :func:`capsule_perturbations`: the CapsNet figure (arXiv:1710.09829 Sec. 5.1, Fig. 4): each of the
  16 dimensions of the predicted digit capsule moved by -0.25..0.25 in steps of 0.05, decoded.
- :func:`frechet_distance` and :class:`SampleQuality`: sample quality as ../shared/spec/generative.md
  asks: the accuracy with which a CapsNet trained on real data recognises the class of
  class-conditional samples, and a Frechet distance between real and generated images in that
  classifier's feature space (its flattened class capsules; a stand-in for FID on digits).

Nothing here reads a config or a file; :mod:`capsrun.commands` wires it up.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import scipy.linalg
import torch
from torch import nn

from capsrun.batch import unpack
from capsrun.images import tile
from capsrun.losses import gaussian_kl
from capsrun.models.energy import swap_tries


def can_generate(model: nn.Module) -> bool:
    """Whether ``model`` has a prior to sample class-conditional images from."""
    return callable(getattr(model, "generate", None))


@torch.no_grad()
def class_conditional(
    model: nn.Module, num_classes: int, per_class: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` samples of every class: images ``[num_classes * per_class, C, H, W]`` (class
    by class) and their classes ``[num_classes * per_class]``."""
    model.eval()
    device = next(model.parameters()).device
    classes = torch.arange(num_classes, device=device).repeat_interleave(per_class)
    noise_gen = generator
    if generator is not None and device.type != "cpu":
        # a CPU generator cannot draw on the GPU: derive a device generator from it
        noise_gen = torch.Generator(device).manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
    return model.generate(classes, generator=noise_gen), classes


@torch.no_grad()
def posterior_variations(model: nn.Module, x: torch.Tensor, num: int, scale: float = 1.0) -> torch.Tensor:
    """For each input ``x`` [n, C, H, W]: its smallest-KL class capsule's posterior mean (column 0)
    then ``num - 1`` samples z = mu + scale * sigma * eps, decoded -> ``[n, num, C, H, W]``."""
    model.eval()
    mu, logvar, _ = model.encode(x)
    cls = gaussian_kl(mu, logvar).argmin(dim=-1)
    eps = torch.randn(len(x), num, *mu.shape[1:], device=x.device, dtype=mu.dtype)
    eps[:, 0] = 0
    z = mu.unsqueeze(1) + scale * eps * (0.5 * logvar).exp().unsqueeze(1)  # [n, num, classes, dim]
    images = model.reconstruct(z.flatten(0, 1), cls.repeat_interleave(num))
    return images.view(len(x), num, *images.shape[1:])


@torch.no_grad()
def capsule_perturbations(model: nn.Module, x: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """Fig. 4 of arXiv:1710.09829 for each input ``x`` [n, C, H, W]: dimension d of the predicted
    class capsule plus each of ``deltas`` [m], decoded -> ``[n, dim, m, C, H, W]``."""
    model.eval()
    out = model(x)
    caps = out.digit_caps  # [n, classes, dim]
    cls = out.scores.argmax(dim=-1)
    n, _, dim = caps.shape
    m = len(deltas)
    shift = torch.zeros(dim, m, dim, device=x.device, dtype=caps.dtype)
    shift[torch.arange(dim), :, torch.arange(dim)] = deltas.to(caps)
    moved = caps[:, None, None].clone().expand(n, dim, m, *caps.shape[1:]).clone()
    moved[torch.arange(n), :, :, cls] += shift  # only the predicted capsule moves
    images = model.reconstruct(moved.flatten(0, 2), cls.repeat_interleave(dim * m))
    return images.view(n, dim, m, *images.shape[1:])


def grid(images: torch.Tensor, nrow: int) -> torch.Tensor:
    """``[N, C, H, W]`` -> one image ``[C', H', W']`` with ``nrow`` images per row."""
    return tile(images.float().cpu().clamp(0, 1), nrow)


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
    against real images' at the same n, not against 0. Measured on binarised MNIST test digits with
    a 98.10 % CapsNet judge: 0.048 +- 0.008 at n = 100, 0.022 +- 0.0025 at 300, 0.0135 +- 0.0011
    at 1,000."""
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
    and the others just over m- = 0.1, so its raw posterior sits at about 0.9 for real digits
    whatever its accuracy (measured: median 0.91 on binarised MNIST test digits for a 99.1 %
    CapsNet, 55 % of them above 0.9); calibrated, a confidence of 0.9 means 90 % right."""
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
        1; e.g. :attr:`capsrun.ais.Annealed.weights`): ``<k>`` the weight (%) of the samples the
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


class SampleQuality:
    """An epoch hook (see :func:`capsrun.train.fit`) that measures class-conditional samples.

    ``classifier``: a CapsNet trained on the real data (``None``: only the sample grid is logged);
    ``real_images`` [N, C, H, W]: held-out real images whose classifier features are the reference;
    ``per_class``: samples per class for the metrics; ``grid_per_class``: for the TensorBoard grid;
    ``every_epochs``: measure after every N-th epoch and the last; 0: after the last only (the
    grid is logged every epoch).
    Returns ``samples/classifier_accuracy`` (%), ``samples/frechet_distance`` and the grid under
    ``images`` -> ``samples/class_conditional``.
    """

    def __init__(
        self,
        num_classes: int,
        classifier: nn.Module | None = None,
        real_images: torch.Tensor | None = None,
        per_class: int = 100,
        grid_per_class: int = 8,
        every_epochs: int = 1,
        seed: int = 0,
    ):
        self.num_classes, self.classifier, self.per_class = num_classes, classifier, per_class
        self.grid_per_class, self.every_epochs, self.seed = grid_per_class, every_epochs, seed
        self.real_features = None
        if classifier is not None:
            if real_images is None:
                raise ValueError("SampleQuality needs real_images with a classifier")
            _, self.real_features, _ = classifier_outputs(classifier, real_images)

    def measure(self, model: nn.Module) -> dict[str, float]:
        """Classifier accuracy on, and Frechet distance of, ``per_class`` samples of each class."""
        gen = torch.Generator().manual_seed(self.seed)  # the same noise every epoch: comparable
        images, classes = class_conditional(model, self.num_classes, self.per_class, gen)
        preds, feats, _ = classifier_outputs(self.classifier, images)
        return {
            "samples/classifier_accuracy": 100.0 * (preds == classes).float().mean().item(),
            "samples/frechet_distance": frechet_distance(self.real_features, feats),
        }

    def __call__(self, model: nn.Module, epoch: int, last: bool) -> dict:
        was_training = model.training
        gen = torch.Generator().manual_seed(self.seed + 1)
        images, _ = class_conditional(model, self.num_classes, self.grid_per_class, gen)
        result: dict = {"images": {"samples/class_conditional": grid(images, self.grid_per_class)}}
        if self.classifier is not None and _due(epoch, last, self.every_epochs):
            result.update(self.measure(model))
        model.train(was_training)
        return result


def first_images(loader, limit: int) -> torch.Tensor:
    """The first ``limit`` images of a loader's epoch 0, [N, C, H, W] (the reference images for
    sample quality, the base-rate model of AIS)."""
    return first_labelled(loader, limit)[0]


def first_labelled(loader, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``limit`` images [N, C, H, W] of a loader's epoch 0 and their labels [N] (what a
    :class:`Judge` is calibrated on)."""
    images, labels, n = [], [], 0
    for batch in loader.epoch(0):
        x, y = unpack(batch)[:2]
        images.append(x)
        labels.append(y)
        n += len(x)
        if n >= limit:
            break
    return torch.cat(images)[:limit], torch.cat(labels)[:limit]


def can_sample_chains(model: nn.Module) -> bool:
    """Whether ``model`` is an energy model sampled by Gibbs chains (the capsule RBM)."""
    return callable(getattr(model, "gibbs", None)) and hasattr(model, "free_energy")


class Chains(NamedTuple):
    """What :func:`gibbs_chains` returns: the final states ``v`` [N, C, H, W], ``snapshots``
    (evenly spaced states, the last the final one), the mean ``acceptance`` of the chain steps and,
    with tempering, the mean ``swap_rates`` of the ladder's neighbouring pairs and the ladder's
    inverse temperatures ``betas`` as it ended (re-spaced when ``tune``; else both empty)."""

    v: torch.Tensor
    snapshots: list[torch.Tensor]
    acceptance: float
    swap_rates: list[float]
    betas: list[float] = []


TUNE_EVERY = 50  # sweeps between two re-spacings of a sampling ladder while it tunes
# A sampling ladder's defaults (`capsrun sample`, the judged grid): the levels below the model run
# above the base-rate model with its logits raised by LADDER_SHIFT, and the ladder re-spaces
# itself in the first LADDER_TUNE sweeps. On capsrbm_mnist (8 levels from 0.55) the melt at 0.55
# above the data's base rate is far sparser than a digit (1 % of the pixels on, against 13 %) and
# condenses into 1s; raised by 1 it is denser (21 %), condenses into 8s, and its replicas make
# about 6x the round trips (docs/capsrbm.md, "A ladder that crosses"). 0.8 rather than 1: in four
# paired looks of 1,000 chains after 1,000 sweeps (seeds 0, 4, 5) its melt (15.5 % on) makes more 1s,
# the class the chains from noise reach last: 5.5-6.9 % against 4.5-5.5 %, and a lower Frechet
# distance in every pair (docs/capsrbm.md, "Two starts", "A smaller shift, paired").
LADDER_SHIFT = 0.8
LADDER_TUNE = 500


SEGMENT = 10  # chain steps between two looks at the chains (progress, snapshots, observe)


@torch.no_grad()
def gibbs_chains(
    model: nn.Module,
    start: torch.Tensor,
    steps: int,
    snapshots: int = 0,
    mh: bool = True,
    temperature: float = 1.0,
    seed: int = 0,
    tempering: int = 1,
    base: torch.Tensor | None = None,
    below: torch.Tensor | None = None,
    betas: torch.Tensor | None = None,
    observe: Callable[[int, torch.Tensor], None] | None = None,
    observe_every: int = 0,
    progress: bool = False,
    tune: int = 0,
) -> Chains:
    """Run ``len(start)`` chains of the model's own sampler for ``steps`` steps from ``start``
    (visible states [N, C, H, W]). ``tempering`` > 1: each step is a sweep of parallel tempering
    (:meth:`~capsrun.models.energy.EnergyModel.tempered`) over that many inverse temperatures
    from the base-rate model ``base`` [C*H*W] to the model, whose level starts at ``start``:
    ``tempering`` chain steps and the swaps per step. The levels below 1 start at ``below``
    [tempering - 1, N, C, H, W] (a checkpoint's own ladder) or, when None, at draws from ``base``.
    ``betas`` [tempering]: the ladder's inverse temperatures, increasing to 1 (None: the model's
    own tuned ladder when it has ``tempering`` levels, else even from 0; see
    :func:`~capsrun.models.energy.upper_ladder` for one that starts above 0). ``tune`` > 0: during
    the first ``tune`` sweeps the ladder is re-spaced every :data:`TUNE_EVERY` sweeps (or once, after
    ``tune`` when that is fewer) so that its
    neighbouring pairs swap about equally often (:func:`~capsrun.models.energy.retune`, from the
    running swap rates; its ends stay), then kept: an adaptive burn-in, after which the sweeps are
    an ordinary ladder's, so the top still samples the model exactly.
    ``observe(step, v)`` is called after every ``observe_every`` steps before the last (0: never);
    ``progress``: a progress bar. The chains run in segments of at most :data:`SEGMENT` steps;
    the states carry over exactly (a segment re-encodes what the last one's final step did not),
    so neither changes a draw. The global RNG is left as it was."""
    if tempering > 1 and (base is None or temperature != 1):
        raise ValueError("tempering needs the base-rate model (base) and temperature 1")
    if betas is not None and len(betas) != tempering:
        raise ValueError(f"betas has {len(betas)} levels, tempering {tempering}")
    if observe_every < 0:
        raise ValueError(f"observe_every must be >= 0, got {observe_every}")
    if tune < 0:
        raise ValueError(f"tune must be >= 0 sweeps, got {tune}")
    from tqdm import tqdm

    from capsrun.models.energy import own_ladder, retune

    was_training = model.training
    model.eval()
    devices = [start.device] if start.device.type == "cuda" else []
    every = max(steps // snapshots, 1) if snapshots else steps + 1
    taken, acceptance, v = [], 0.0, start
    swaps = torch.zeros(max(tempering - 1, 0), dtype=torch.float64)
    tried = torch.zeros_like(swaps)
    tune = tune if tempering > 1 else 0
    if tempering > 1 and tune:  # re-spaced from the ladder given, else from the model's own
        betas = torch.as_tensor(own_ladder(model, tempering) if betas is None else betas, dtype=torch.float64)
        betas = betas.to(start.device)
    window, window_tried, running = torch.zeros_like(swaps), torch.zeros_like(swaps), None
    interval = min(TUNE_EVERY, tune) if tune else TUNE_EVERY  # a short tune re-spaces once, at its end
    desc = "sweeps" if tempering > 1 else "steps"
    bar = tqdm(total=steps, desc=desc, unit="", leave=False, disable=None if progress else True)
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            if tempering > 1 and below is not None:
                if below.shape != (tempering - 1, *start.shape):
                    raise ValueError(f"below must be [{tempering - 1}, *{list(start.shape)}], got {list(below.shape)}")
                levels = torch.cat([below, start[None]])
            elif tempering > 1:
                p = torch.sigmoid(base).expand(len(start), -1)
                levels = torch.stack([torch.bernoulli(p).view_as(start) for _ in range(tempering - 1)] + [start])
            done = 0
            while done < steps:
                stop = min(steps, done + SEGMENT, (done // every + 1) * every)
                if observe_every:
                    stop = min(stop, (done // observe_every + 1) * observe_every)
                if done < tune:
                    stop = min(stop, (done // interval + 1) * interval)
                n = stop - done
                if tempering > 1:
                    levels, acc, rates = model.tempered(levels, n, base, first_sweep=done, betas=betas)
                    tries = swap_tries(done, n, tempering - 1)  # the rates are per try: count them back
                    swaps += rates.double().cpu() * tries
                    tried += tries
                    if done < tune:
                        window += rates.double().cpu() * tries
                        window_tried += tries
                        if stop % interval == 0 and stop <= tune:
                            seen = window / window_tried.clamp_min(1)
                            running = seen if running is None else (running + seen) / 2  # damped, as training's
                            betas = retune(betas.cpu(), running).to(start.device)
                            window.zero_(), window_tried.zero_()
                    v = levels[-1]
                else:
                    v, acc = model.gibbs(v, n, mh=mh, temperature=temperature)
                acceptance += float(acc) * n
                done = stop
                bar.update(n)
                if snapshots and done % every == 0 and len(taken) < snapshots:
                    taken.append(v.clone())
                if observe is not None and observe_every and done % observe_every == 0 and done < steps:
                    with torch.random.fork_rng(devices=devices):  # whatever it draws, the chains draw the same
                        observe(done, v)
    finally:
        bar.close()
        model.train(was_training)
    if snapshots and (not taken or not torch.equal(taken[-1], v)):
        taken = [*taken[: snapshots - 1], v.clone()]
    ladder = [] if tempering < 2 else [float(b) for b in (own_ladder(model, tempering) if betas is None else betas)]
    return Chains(v, taken, acceptance / max(steps, 1), (swaps / tried.clamp_min(1)).tolist(), ladder)


def _due(epoch: int, last: bool, every: int) -> bool:
    """Whether a measurement every ``every`` epochs (0: the last only) is due after ``epoch``."""
    return last or (every > 0 and epoch % every == 0)


def short_ladder(model: nn.Module, levels: int, lowest: float) -> torch.Tensor | None:
    """The inverse temperatures ``[levels]`` of a sampling ladder from ``lowest`` to 1, spaced as
    the model's own tuned ladder (evenly when it has none; :func:`~capsrun.models.energy.upper_ladder`),
    on the model's device; None when ``lowest`` is 0 (the ladder the model's sampler runs anyway)."""
    if lowest == 0:
        return None
    from capsrun.models.energy import ladder, upper_ladder

    own = getattr(model, "betas", None)
    if own is not None and lowest < float(own[0]):
        raise ValueError(
            f"the model's ladder starts at {float(own[0]):.3g}; ladder_from must be 0 (that ladder) or above"
        )
    spacing = own if own is not None else ladder(levels)
    return upper_ladder(spacing, levels, lowest).to(next(model.parameters()).device)


class ChainSamples:
    """An epoch hook for an energy model, every ``every_epochs`` epochs and after the last:
    ``chains`` chains from uniform noise run ``steps`` steps of the model's own sampler; logged as
    the grid ``samples/gibbs`` (the states) and
    ``samples/gibbs_mean`` (p(v = 1 | h) of one more up-down pass), ``samples/acceptance`` and
    ``samples/free_energy``; with a ``judge`` (:class:`Judge`: a CapsNet trained on the real data,
    with binarised real images as the model sees them), :meth:`Judge.quality` of the samples.
    ``tempering`` > 1: the steps are parallel-tempering sweeps above the base-rate model ``base``
    [C*H*W], logged with ``samples/swap_rate`` (the lowest pair's); ``ladder_from`` > 0: the
    ladder runs from that inverse temperature to 1 (:func:`short_ladder`); ``ladder_shift``: logits
    added to ``base`` for the levels below 1, ``ladder_tune``: sweeps of re-spacing
    (:func:`gibbs_chains`' ``tune``)."""

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        chains: int = 100,
        steps: int = 1000,
        seed: int = 0,
        judge: Judge | None = None,
        num_classes: int = 10,
        every_epochs: int = 1,
        confidence: float = 0.9,
        tempering: int = 1,
        base: torch.Tensor | None = None,
        ladder_from: float = 0.0,
        ladder_shift: float = 0.0,
        ladder_tune: int = 0,
    ):
        if ladder_from and tempering < 2:
            raise ValueError("ladder_from needs a tempering ladder of 2 or more levels")
        self.ladder_from, self.ladder_shift, self.ladder_tune = ladder_from, ladder_shift, ladder_tune
        self.image_shape, self.chains, self.steps, self.seed = image_shape, chains, steps, seed
        self.judge, self.num_classes, self.every_epochs, self.confidence = judge, num_classes, every_epochs, confidence
        self.tempering, self.base = tempering, base

    def __call__(self, model: nn.Module, epoch: int, last: bool) -> dict:
        if not _due(epoch, last, self.every_epochs):
            return {}
        dev = next(model.parameters()).device
        gen = torch.Generator().manual_seed(self.seed)  # the same start every epoch: comparable
        start = model.noise(self.chains, gen).to(dev)
        betas = short_ladder(model, self.tempering, self.ladder_from)  # from the ladder as tuned so far
        base = None if self.base is None else self.base + self.ladder_shift
        run = gibbs_chains(
            model,
            start,
            self.steps,
            seed=self.seed + epoch,
            tempering=self.tempering,
            base=base,
            betas=betas,
            tune=self.ladder_tune,
        )
        v = run.v
        nrow = int(len(v) ** 0.5) or 1
        with torch.no_grad(), torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            result: dict = {
                "samples/acceptance": run.acceptance,
                "samples/free_energy": model.free_energy(v).mean().item(),
                "images": {"samples/gibbs": grid(v, nrow), "samples/gibbs_mean": grid(model.reconstruct(v), nrow)},
            }
        if run.swap_rates:
            result["samples/swap_rate"] = min(run.swap_rates)
        if self.judge is not None:
            result.update(self.judge.quality(v, self.num_classes, self.confidence))
        return result
