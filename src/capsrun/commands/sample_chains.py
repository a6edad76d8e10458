"""``capsrun sample`` for an energy model (the RBM, the capsule RBM): chains of the model's own
sampler (``sampler.*``) from noise, test images or the checkpoint's own chains (``init``), from
noise optionally after an annealing (``anneal``); grids, ``samples.pt`` and, with
``eval_classifier``, how a CapsNet sees them (``judge_every`` steps, and at the end)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from capsrun import build, checkpoint, sampling, settings
from capsrun.batch import first_images
from capsrun.commands import common
from capsrun.errors import ConfigError
from capsrun.judge import Judge
from capsrun.likelihood import base_of
from capsrun.mcmc import ais
from capsrun.mcmc.chains import Chains, ChainSpec, Watch, run_chains
from capsrun.mcmc.tempering import own_ladder, sampling_ladder

log = logging.getLogger("capsrun")

SOURCES = {"noise": "noise", "data": "test images", "chains": "the checkpoint's own chains"}


def own_chains(model, n: int, tempering: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``init=chains``: the first ``n`` of the checkpoint's persistent chains ``[n, C, H, W]`` and,
    when it was trained on a ladder of ``tempering`` levels with at least ``n`` chains a level,
    that ladder's levels below 1 ``[tempering - 1, n, C, H, W]`` (else None: those levels start
    from the base-rate model). What a frozen model's own chains do from where training left them
    tells whether its equilibrium is its training chains' (docs/capsrbm.md, "Sampling")."""
    chains = getattr(model, "chains", None)
    if chains is None or len(chains) == 0 or not bool(model.chains_started):
        raise ConfigError("init=chains needs a checkpoint trained with persistent chains (PCD); use init=noise")
    if n > len(chains):
        raise ConfigError(f"init=chains: the checkpoint holds {len(chains)} chains; e.g. sampler.chains={len(chains)}")
    own = getattr(model, "ladder_chains", None)  # narrower than n (ladder_width): from the base rate
    below = own[:, :n] if own is not None and len(own) == tempering - 1 and own.shape[1] >= n else None
    return chains[:n].clone(), below


def _start(cfg: DictConfig, model, spec: ChainSpec, chains: int, test) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Where the chains start (``init``) and, for ``init=chains``, the ladder's lower levels."""
    if cfg.init == "data":
        return model.visible_states(first_images(test, chains)), None
    if cfg.init == "chains":
        return own_chains(model, chains, spec.tempering)
    return model.noise(chains, torch.Generator().manual_seed(cfg.seed)).to(next(model.parameters()).device), None


def _annealed(cfg: DictConfig, model, noise, base, temperatures: int, ladder) -> ais.Annealed:
    """``anneal``: the states ``noise`` [N, C, H, W] annealed from the base-rate model ``base`` to
    the model through ``temperatures`` (:func:`capsrun.mcmc.ais.anneal`, AIS's path), keeping the
    states where it passed the inverse temperatures of ``ladder``'s levels below 1 (where they
    start). Why: chains from noise cross the model's condensation by falling into whichever digit
    they meet first; a slow annealing crosses it near equilibrium, and its importance weights
    correct what is left (docs/capsrbm.md, "Sampling")."""
    keep = [] if ladder is None else [float(b) for b in ladder][:-1]
    log.info("annealing %d chains from noise through %d temperatures ...", len(noise), temperatures)
    return ais.anneal(
        model, base, temperatures, seed=cfg.seed, start=noise.to(base.device), keep=keep, progress=cfg.trainer.progress
    )


def sample_chains(
    cfg: DictConfig, checked: settings.SampleSettings, model, run_cfg: DictConfig, path: Path, epoch: int
) -> dict[str, float]:
    """The chains of ``model`` (the checkpoint at ``path``, of epoch ``epoch``) as ``sampler.*``
    resolved against its training ladder says; returns the metrics (also in metrics.json)."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    sampler = settings.sampler_settings(cfg.sampler, run_cfg.model.net, cfg.seed)
    spec, dev = sampler.spec, next(model.parameters()).device
    classifier = common.load_classifier(cfg, dev, run_cfg.dataset)  # before the chains run: a wrong one fails fast
    model.eval()
    run_cfg.data = build.checkpoint_data(run_cfg.data, cfg.data)
    from_base = spec.tempering > 1 or checked.anneal > 0  # a ladder or an annealing from the base-rate model
    needs_train = from_base and not hasattr(model, "base_rate")
    loaders = build.loaders(run_cfg, dev, train=needs_train, eval_batch_size=cfg.trainer.batch_size)
    base = base_of(model, loaders) if from_base else None
    test = loaders.evals["test"]
    start, below = _start(cfg, model, spec, sampler.chains, test)
    ladder = None
    if spec.tempering > 1:
        ladder = sampling_ladder(getattr(model, "betas", None), spec.tempering, spec.ladder_from)
        ladder = own_ladder(model, spec.tempering) if ladder is None else ladder
    judge = None if classifier is None else build.make_judge(classifier, model, test, checked.judging)
    classes, confidence = run_cfg.dataset.num_classes, checked.judging.confidence
    by_step: list[dict] = []

    def judged(step: int, states: torch.Tensor) -> None:
        """``judge_every``: how the judge sees the chains after ``step`` steps (the log now;
        TensorBoard at that step and metrics.json's ``by_step`` at the end)."""
        seen = judge.quality(states, classes, confidence)
        by_step.append({"step": step, **seen})
        log.info("after %d steps: %s", step, quality_line(seen, classes, confidence, len(states)))

    annealed, source = None, SOURCES[cfg.init]
    if checked.anneal:
        annealed = _annealed(cfg, model, start, base, checked.anneal, ladder)
        start, below = annealed.v, annealed.kept
        source = f"the end of an annealing from noise through {checked.anneal} temperatures"
    log.info("%d chains from %s, %d steps%s ...", len(start), source, spec.steps, _ladder_words(spec, ladder))
    watch = Watch(8, checked.judge_every, judged if checked.judge_every else None, bool(cfg.trainer.progress))
    with logging_redirect_tqdm():  # judge_every's log lines above the progress bar, not through it
        run = run_chains(model, start, spec, base, below, watch)
    if spec.tune and spec.tempering > 1:
        log.info("the ladder as tuned in the first %d sweeps: %s", spec.tune, ", ".join(f"{b:.3g}" for b in run.betas))
    metrics = _measure(model, run, test, judge, classes, confidence)
    if annealed is not None:
        metrics.update(annealed_metrics(annealed, checked.anneal, judge, classes, confidence))
    extra: dict[str, Any] = {"by_step": by_step} if by_step else {}
    if run.betas and (spec.ladder_from > 0 or spec.tune):
        extra["ladder"] = run.betas
    _write(cfg, model, run, start, metrics, by_step, {**metrics, **extra, "checkpoint": str(path)}, judge)
    quality = "" if judge is None else "; " + quality_line(metrics, classes, confidence, len(run.v))
    log.info(
        "acceptance %.3f, free energy of samples %.2f vs test data %.2f%s; gibbs.png, gibbs_mean.png, chain.png, "
        "samples.pt from %s (epoch %d) in %s",
        run.acceptance,
        metrics["samples/free_energy"],
        metrics["test/free_energy/data"],
        quality,
        path,
        epoch,
        common.output_dir(),
    )
    return metrics


def _ladder_words(spec: ChainSpec, ladder) -> str:
    if spec.tempering < 2:
        return ""
    words = f", each a parallel-tempering sweep of {spec.tempering} levels"
    if spec.ladder_from > 0:
        words += f" (inverse temperatures {', '.join(f'{b:.3g}' for b in torch.as_tensor(ladder).tolist())})"
    return words


def _measure(model, run: Chains, test, judge: Judge | None, classes: int, confidence: float) -> dict[str, float]:
    """The chains' acceptance, their free energy against the first 1,000 test images', the
    ladder's lowest swap rate and with a judge the samples' quality."""
    dev = run.v.device
    real = model.visible_states(first_images(test, 1000))
    with torch.no_grad(), torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        metrics = {
            "samples/acceptance": run.acceptance,
            "samples/free_energy": model.free_energy(run.v).mean().item(),
            "test/free_energy/data": model.free_energy(real).mean().item(),
        }
        if run.swap_rates:
            metrics["samples/swap_rate"] = min(run.swap_rates)
    if judge is not None:
        metrics.update(judge.quality(run.v, classes, confidence))
    return metrics


def _write(cfg: DictConfig, model, run: Chains, start, metrics: dict, by_step: list, saved: dict, judge=None) -> None:
    """gibbs.png (the final states; with a ``judge``, its class and confidence under each),
    gibbs_mean.png (p(v = 1 | h) of one more up-down pass), chain.png (row i: chain i from its
    start through the snapshots), drawn large enough to read; TensorBoard's images and scalars,
    samples.pt (the final states, float [N, C, H, W] in [0, 1]) and metrics.json."""
    from capsrun.tblog import TBLogger

    v, snaps, dev = run.v, run.snapshots, run.v.device
    with torch.no_grad(), torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        mean = model.up_down(v)
    nrow, rows = max(int(len(v) ** 0.5), 1), min(len(v), 8)
    chain = torch.stack([start[:rows], *(s[:rows] for s in snaps)], 1).flatten(0, 1)  # row i: chain i
    out_dir = common.output_dir()
    tb = TBLogger(out_dir)
    try:
        for earlier in by_step:
            tb.scalars({k: x for k, x in earlier.items() if k != "step"}, earlier["step"])
        grids = (("gibbs", v, nrow), ("gibbs_mean", mean, nrow), ("chain", chain, len(snaps) + 1))
        for name, images, per_row in grids:
            image = sampling.judged_grid(
                images, per_row, judge if name == "gibbs" else None, cfg.sample_quality.confidence
            )
            common.save_png(out_dir / f"{name}.png", image)
            tb.image(f"samples/{name}", image, 0)
        tb.scalars(metrics, cfg.sampler.steps)  # at the step count: the end of judge_every's curve
    finally:
        tb.close()
    samples = v.detach().float().cpu().clamp(0, 1).contiguous()
    checkpoint.atomic_write(out_dir / "samples.pt", lambda f: torch.save(samples, f))
    checkpoint.save_json(out_dir / "metrics.json", saved)


def annealed_metrics(annealed: ais.Annealed, temperatures: int, judge, classes: int, confidence: float) -> dict:
    """``samples/anneal/*``: the annealing's temperatures, log-weight spread and effective sample
    size (Kish) and, with a judge, the model's own class mix and recognised share by its
    importance weights (of the states where the annealing ended, before the chains ran)."""
    n = len(annealed.log_w)
    metrics = {
        "samples/anneal/temperatures": float(temperatures),
        "samples/anneal/log_w_std": float(annealed.log_w.std()) if n > 1 else 0.0,
        "samples/anneal/ess": annealed.ess,
    }
    spread = metrics["samples/anneal/log_w_std"]
    line = f"annealing: effective sample size {annealed.ess:.0f} of {n} (std of log weights {spread:.2f})"
    if judge is not None:
        mix = judge.weighted_classes(annealed.v, annealed.weights, classes, confidence)
        metrics.update({f"samples/anneal/class_share/{k}": mix[str(k)] for k in range(classes)})
        metrics["samples/anneal/recognised"] = mix["recognised"]
        shares = [mix[str(k)] for k in range(classes)]
        line += (
            f"; the model's own mix by its importance weights: {mix['recognised']:.1f}% recognised, classes "
            f"{min(shares):.0f}-{max(shares):.0f}% ({', '.join(f'{k}: {x:.0f}' for k, x in enumerate(shares))})"
        )
        if annealed.ess < 30:
            line += f" - with an effective sample size of {annealed.ess:.0f}, only a rough guide: raise anneal"
    log.info(line)
    return metrics


def quality_line(metrics: dict, classes: int, confidence: float, n: int) -> str:
    """The judge's figures in words: recognised share, class range, Frechet distance and its floor."""
    shares = [metrics[f"samples/class_share/{k}"] for k in range(classes)]
    uncalibrated = metrics.get("samples/recognised_uncalibrated")
    line = (
        f"{metrics['samples/recognised']:.1f}% recognised with confidence > {confidence} "
        f"(binarised test images: {metrics['samples/recognised_real']:.1f}%"
        + ("" if uncalibrated is None else f"; uncalibrated {uncalibrated:.1f}%")
        + f"), classes {min(shares):.0f}-{max(shares):.0f}%, Frechet distance {metrics['samples/frechet_distance']:.3f}"
    )
    if "samples/frechet_distance_real" in metrics:
        line += (
            f" ({n} binarised test images: {metrics['samples/frechet_distance_real']:.3f}"
            f" +- {metrics['samples/frechet_distance_real_std']:.3f})"
        )
    return line
