"""Images from trained capsule models, and how good class-conditional samples are.

- :func:`class_conditional`: z ~ N(0, I) in the chosen class capsule of a variational capsule model
  (arXiv:1807.04099), decoded.
- :func:`posterior_variations`: one input, its posterior sample drawn again and again.
- :func:`capsule_perturbations`: the CapsNet figure (arXiv:1710.09829 Sec. 5.1, Fig. 4): each of the
  16 dimensions of the predicted digit capsule moved by -0.25..0.25 in steps of 0.05, decoded.
- :class:`SampleQuality`: an epoch hook that judges class-conditional samples (:mod:`capsrun.judge`).
- :class:`ChainSamples`: an epoch hook that runs an energy model's chains from noise
  (:mod:`capsrun.mcmc.chains`) and judges what they draw.

Nothing here reads a config or a file; :mod:`capsrun.build` wires the hooks up.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from capsrun.images import readable_grid, tile
from capsrun.judge import Judge, classifier_outputs, frechet_distance
from capsrun.losses import gaussian_kl
from capsrun.mcmc.chains import ChainSpec, run_chains, step_seconds


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


def captions(judge, images: torch.Tensor, confidence: float = 0.9) -> tuple[list[str], list[bool]]:
    """What goes under each of ``images`` [N, C, H, W]: ``"7 0.98"``, the judge's class and
    confidence (:func:`~capsrun.judge.class_posterior` of its capsule lengths: a
    :class:`~capsrun.judge.Judge` at its calibrated temperature, a bare CapsNet at 1), and whether it
    recognises the image (confidence > ``confidence``)."""
    calibrated = isinstance(judge, Judge)
    classifier, temperature = (judge.classifier, judge.temperature) if calibrated else (judge, 1.0)
    preds, _, conf = classifier_outputs(classifier, images, temperature=temperature)
    return [f"{int(p)} {float(c):.2f}" for p, c in zip(preds, conf)], [float(c) > confidence for c in conf]


def judged_grid(images: torch.Tensor, nrow: int, judge=None, confidence: float = 0.9) -> torch.Tensor:
    """Samples ``[N, C, H, W]`` as a grid drawn large enough to read
    (:func:`~capsrun.images.readable_grid`); with a ``judge`` its :func:`captions` under each
    sample, white when it recognises the sample, orange when not."""
    if judge is None:
        return readable_grid(images, nrow)
    return readable_grid(images, nrow, *captions(judge, images, confidence))


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
        shown = judged_grid(images, self.grid_per_class, self.classifier)
        result: dict = {"images": {"samples/class_conditional": shown}}
        if self.classifier is not None and _due(epoch, last, self.every_epochs):
            result.update(self.measure(model))
        model.train(was_training)
        return result


def can_sample_chains(model: nn.Module) -> bool:
    """Whether ``model`` is an energy model sampled by Gibbs chains (the capsule RBM)."""
    return callable(getattr(model, "transition", None)) and hasattr(model, "free_energy")


def _due(epoch: int, last: bool, every: int) -> bool:
    """Whether a measurement every ``every`` epochs (0: the last only) is due after ``epoch``."""
    return last or (every > 0 and epoch % every == 0)


class ChainSamples:
    """An epoch hook for an energy model, every ``every_epochs`` epochs and after the last:
    ``chains`` chains from uniform noise (the same start every epoch, seeded by ``spec.seed``) run
    the model's own sampler as ``spec`` says (:func:`~capsrun.mcmc.chains.run_chains`, seeded by
    ``spec.seed`` + the epoch); logged as the grid ``samples/gibbs`` (the states) and
    ``samples/gibbs_mean`` (p(v = 1 | h) of one more up-down pass), ``samples/acceptance``,
    ``samples/free_energy`` and with a ladder ``samples/swap_rate`` (its lowest pair's); ``base``
    [C*H*W]: the base-rate model below the ladder. With a ``judge`` (a CapsNet trained on the real
    data, with binarised real images as the model sees them), :meth:`Judge.quality` of the samples
    at ``confidence``."""

    def __init__(
        self,
        spec: ChainSpec,
        chains: int,
        judge: Judge | None = None,
        num_classes: int = 10,
        every_epochs: int = 1,
        confidence: float = 0.9,
        base: torch.Tensor | None = None,
    ):
        self.spec, self.chains, self.judge, self.num_classes = spec, chains, judge, num_classes
        self.every_epochs, self.confidence, self.base = every_epochs, confidence, base

    what = "the sample grid"

    def seconds(self, model: nn.Module, epochs: range) -> float:
        """About how long this hook takes after the epochs ``epochs`` (the last of them the run's
        last), from one timed step of the model's chain."""
        due = sum(_due(e, e == epochs[-1], self.every_epochs) for e in epochs) if epochs else 0
        if not due:
            return 0.0
        return due * self.spec.steps * step_seconds(model, self.chains * max(self.spec.tempering, 1))

    def __call__(self, model: nn.Module, epoch: int, last: bool) -> dict:
        if not _due(epoch, last, self.every_epochs):
            return {}
        dev = next(model.parameters()).device
        gen = torch.Generator().manual_seed(self.spec.seed)  # the same start every epoch: comparable
        start = model.noise(self.chains, gen).to(dev)
        run = run_chains(model, start, replace(self.spec, seed=self.spec.seed + epoch), self.base)
        v = run.v
        nrow = int(len(v) ** 0.5) or 1
        with torch.no_grad(), torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            result: dict = {
                "samples/acceptance": run.acceptance,
                "samples/free_energy": model.free_energy(v).mean().item(),
                "images": {
                    "samples/gibbs": judged_grid(v, nrow, self.judge, self.confidence),
                    "samples/gibbs_mean": judged_grid(model.up_down(v), nrow),
                },
            }
        if run.swap_rates:
            result["samples/swap_rate"] = min(run.swap_rates)
        if self.judge is not None:
            result.update(self.judge.quality(v, self.num_classes, self.confidence))
        return result
