"""``capsrun sample checkpoint=PATH``: sample grids from a checkpoint (VCaps classes, CapsNet
perturbations, energy-model chains from noise), as PNG and TensorBoard, with their quality."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from capsrun import build, checkpoint, sampling
from capsrun.batch import unpack
from capsrun.commands import common
from capsrun.errors import ConfigError

log = logging.getLogger("capsrun")


def sample(cfg: DictConfig) -> dict[str, float]:
    """``capsrun sample checkpoint=PATH``: class-conditional samples and posterior variations
    (variational capsules) and the capsule-perturbation grid (every capsule model), as PNG grids
    and TensorBoard images in the run dir; sample quality with ``eval_classifier``."""
    from hydra.utils import to_absolute_path

    from capsrun.tblog import TBLogger

    if OmegaConf.is_missing(cfg, "checkpoint"):
        raise ConfigError("no checkpoint given; use capsrun sample checkpoint=<run dir>/checkpoints/best.pt")
    for key in ("samples_per_class", "inputs", "variations", "num_samples", "gibbs_steps"):
        build.integer(cfg[key], key, example=8)  # every setting checked, also those this model does not use
    if not cfg.perturb.step > 0 or not cfg.perturb.range >= 0:
        raise ConfigError("perturb.step must be > 0 and perturb.range >= 0; e.g. perturb.range=0.25 perturb.step=0.05")
    path = Path(to_absolute_path(str(cfg.checkpoint)))
    dev = build.device(cfg.trainer.device)
    model, run_cfg, ckpt = common.trained_model(path, dev)
    if sampling.can_sample_chains(model):
        return _sample_chains(cfg, model, run_cfg, dev, path, ckpt["epoch"])
    if not hasattr(model, "decoder") or model.decoder is None:
        raise ConfigError(f"{path} is a {run_cfg.model.name} without a decoder: it cannot draw images")
    model.eval()
    torch.manual_seed(cfg.seed)
    run_cfg.data = build.checkpoint_data(run_cfg.data, cfg.data)
    loaders = build.loaders(run_cfg, dev, train=False, eval_batch_size=cfg.trainer.batch_size)
    x = unpack(next(iter(loaders.evals["test"].epoch(0))))[0][: cfg.inputs]
    out_dir, tb, metrics = common.output_dir(), TBLogger(common.output_dir()), {}
    written: list[Path] = []

    def emit(name: str, image: torch.Tensor) -> None:
        common.save_png(out_dir / f"{name}.png", image)
        tb.image(f"samples/{name}", image, 0)
        written.append(out_dir / f"{name}.png")

    try:
        classes = run_cfg.dataset.num_classes
        if sampling.can_generate(model):
            gen = torch.Generator().manual_seed(cfg.seed)
            images, _ = sampling.class_conditional(model, classes, cfg.samples_per_class, gen)
            emit("class_conditional", sampling.grid(images, cfg.samples_per_class))
            var = sampling.posterior_variations(model, x, cfg.variations, cfg.variation_scale)
            rows = torch.cat([x.unsqueeze(1).to(var.dtype), var], dim=1)  # the input first
            emit("variations", sampling.grid(rows.flatten(0, 1), cfg.variations + 1))
            classifier = common.load_classifier(cfg, dev, run_cfg.dataset)
            if classifier is None:
                log.info(
                    "sample quality skipped: set eval_classifier=<best.pt of a capsnet trained on %s>",
                    run_cfg.dataset.name,
                )
            else:
                real = sampling.first_images(loaders.evals["test"], cfg.sample_quality.real_images)
                quality = sampling.SampleQuality(
                    classes, classifier, real, per_class=cfg.sample_quality.per_class, seed=cfg.seed
                )
                metrics.update(quality.measure(model))
                tb.scalars(metrics, 0)
                log.info(
                    "samples: %.2f%% recognised by the classifier, Frechet distance %.3f",
                    metrics["samples/classifier_accuracy"],
                    metrics["samples/frechet_distance"],
                )
        steps = round(cfg.perturb.range / cfg.perturb.step)
        deltas = torch.arange(-steps, steps + 1, dtype=torch.float32) * cfg.perturb.step
        grids = sampling.capsule_perturbations(model, x, deltas)  # [n, dim, m, C, H, W]
        for i, g in enumerate(grids):
            emit(f"perturbations_{i}", sampling.grid(g.flatten(0, 1), len(deltas)))
    finally:
        tb.close()
    checkpoint.save_json(out_dir / "metrics.json", {**metrics, "checkpoint": str(path)})
    log.info("%d grids from %s (%s, epoch %d) in %s", len(written), path, run_cfg.model.name, ckpt["epoch"], out_dir)
    return metrics


def _own_chains(model, n: int, tempering: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``init=chains``: the first ``n`` of the checkpoint's persistent chains ``[n, C, H, W]`` and,
    when it was trained on a ladder of ``tempering`` levels with at least ``n`` chains a level,
    that ladder's levels below 1 ``[tempering - 1, n, C, H, W]`` (else None: those levels start
    from the base-rate model).
    Why: a frozen model whose own chains, started where training left them, drift to another
    class mix has an equilibrium that is not its training chains' (docs/capsrbm.md, "The frozen
    model is not its training chains")."""
    chains = getattr(model, "chains", None)
    if chains is None or len(chains) == 0 or not bool(model.chains_started):
        raise ConfigError("init=chains needs a checkpoint trained with persistent chains (PCD); use init=noise")
    if n > len(chains):
        raise ConfigError(f"init=chains: the checkpoint holds {len(chains)} chains; e.g. num_samples={len(chains)}")
    own = getattr(model, "ladder_chains", None)  # narrower than n (ladder_width): from the base rate
    below = own[:, :n] if own is not None and len(own) == tempering - 1 and own.shape[1] >= n else None
    return chains[:n].clone(), below


def _sample_chains(cfg: DictConfig, model, run_cfg: DictConfig, dev: torch.device, path: Path, epoch: int) -> dict:
    """``capsrun sample`` for an energy model (the RBM, the capsule RBM): chains of the model's own
    sampler from noise, data or the checkpoint's own chains (``init``), from noise optionally
    after an annealing (``anneal``); grids, ``samples.pt`` (the final states, float [N, C, H, W]
    in [0, 1]) and, with ``eval_classifier``, how a CapsNet sees them."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    from capsrun.tblog import TBLogger

    for key in ("num_samples", "gibbs_steps"):
        build.integer(cfg[key], key, example=100)
    judge_every = build.integer(cfg.get("judge_every", 0), "judge_every", 0, 500)
    if cfg.init not in ("noise", "data", "chains"):
        raise ConfigError(f"init must be noise, data or chains, got {cfg.init!r}; e.g. init=noise")
    anneal = build.integer(cfg.get("anneal", 0), "anneal", 0, 100000)
    if anneal == 1:
        raise ConfigError("anneal is a number of temperatures from 0 to 1: 0 (none) or >= 2; e.g. anneal=100000")
    if anneal and cfg.init != "noise":
        raise ConfigError(f"anneal starts the chains from noise, not init={cfg.init}; give init=noise or anneal=0")
    temperature = build.number(cfg.temperature, "temperature", lambda v: v > 0, "a number > 0", 1.0)
    tempering = cfg.get("tempering")
    if tempering is None:  # the model's own sampler: the ladder it was trained with (1: its plain chain)
        tempering = int(run_cfg.model.get("tempering", 1))
    tempering = build.integer(tempering, "tempering", example=10)
    if tempering > 1 and temperature != 1:
        raise ConfigError("tempering samples the model at temperature 1; give one of them, e.g. tempering=1")
    ladder_from = common.ladder_from_setting(cfg.get("ladder_from", 0), "ladder_from", tempering, "tempering")
    shift, tune = common.ladder_start_settings(
        cfg.get("ladder_shift"), cfg.get("ladder_tune"), "ladder_", tempering, cfg.gibbs_steps
    )
    confidence = common.confidence_setting(cfg.sample_quality.confidence, "sample_quality.confidence")
    common.reference_settings(cfg.sample_quality)
    classifier = common.load_classifier(cfg, dev, run_cfg.dataset)  # before the chains run: a wrong one fails fast
    if judge_every and classifier is None:
        raise ConfigError("judge_every needs a judge: add eval_classifier=<best.pt of a capsnet>, or judge_every=0")
    model.eval()
    run_cfg.data = build.checkpoint_data(run_cfg.data, cfg.data)
    from_base = tempering > 1 or anneal > 0  # a ladder or an annealing from the base-rate model
    needs_train = from_base and not hasattr(model, "base_rate")
    loaders = build.loaders(run_cfg, dev, train=needs_train, eval_batch_size=cfg.trainer.batch_size)
    base = common.sampler_base(model, loaders) if from_base else None
    test = loaders.evals["test"]
    gen = torch.Generator().manual_seed(cfg.seed)
    below = None
    if cfg.init == "data":
        start = model.visible_states(sampling.first_images(test, cfg.num_samples))
    elif cfg.init == "chains":
        start, below = _own_chains(model, cfg.num_samples, tempering)
    else:
        start = model.noise(cfg.num_samples, gen).to(dev)
    try:
        betas = sampling.short_ladder(model, tempering, ladder_from)
    except ValueError as err:
        raise ConfigError(f"{err}; e.g. ladder_from=0") from None
    ladder = f", each a parallel-tempering sweep of {tempering} levels" if tempering > 1 else ""
    if betas is not None:
        ladder += f" (inverse temperatures {', '.join(f'{b:.3g}' for b in betas.tolist())})"
    source = {"noise": "noise", "data": "test images", "chains": "the checkpoint's own chains"}[cfg.init]
    judge = None if classifier is None else common.judge(classifier, model, test, cfg.sample_quality)
    classes = run_cfg.dataset.num_classes
    by_step: list[dict] = []

    def judged(step: int, states: torch.Tensor) -> None:
        """``judge_every``: how the judge sees the chains after ``step`` steps (the log now;
        TensorBoard at that step and metrics.json's ``by_step`` at the end)."""
        seen = judge.quality(states, classes, confidence)
        by_step.append({"step": step, **seen})
        log.info("after %d steps: %s", step, _quality_line(seen, classes, confidence, len(states)))

    annealed = None
    if anneal:
        start, below, annealed = _annealed_start(model, start, base, anneal, tempering, betas, cfg)
        source = f"the end of an annealing from noise through {anneal} temperatures"
    log.info("%d chains from %s, %d steps%s ...", len(start), source, cfg.gibbs_steps, ladder)
    with logging_redirect_tqdm():  # judge_every's log lines above the progress bar, not through it
        run = sampling.gibbs_chains(
            model,
            start,
            cfg.gibbs_steps,
            snapshots=8,
            mh=cfg.mh,
            temperature=float(temperature),
            seed=cfg.seed,
            tempering=tempering,
            base=base + shift if tempering > 1 else base,  # the ladder's path; the annealing keeps AIS's
            below=below,
            betas=betas,
            observe=judged if judge_every else None,
            observe_every=judge_every,
            progress=bool(cfg.trainer.progress),
            tune=tune,
        )
    if tune and tempering > 1:
        log.info("the ladder as tuned in the first %d sweeps: %s", tune, ", ".join(f"{b:.3g}" for b in run.betas))
    v, snaps, acceptance = run.v, run.snapshots, run.acceptance
    real = model.visible_states(sampling.first_images(test, 1000))
    with torch.no_grad(), torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        metrics = {
            "samples/acceptance": acceptance,
            "samples/free_energy": model.free_energy(v).mean().item(),
            "test/free_energy/data": model.free_energy(real).mean().item(),
        }
        if run.swap_rates:
            metrics["samples/swap_rate"] = min(run.swap_rates)
        mean = model.reconstruct(v)
    if judge is not None:
        metrics.update(judge.quality(v, classes, confidence))
    if annealed is not None:
        metrics.update(_annealed_metrics(annealed, anneal, judge, classes, confidence))
    nrow = max(int(len(v) ** 0.5), 1)
    rows = min(len(v), 8)
    chain = torch.stack([start[:rows], *(s[:rows] for s in snaps)], 1).flatten(0, 1)  # row i: chain i
    out_dir, tb = common.output_dir(), TBLogger(common.output_dir())
    try:
        for earlier in by_step:
            tb.scalars({k: x for k, x in earlier.items() if k != "step"}, earlier["step"])
        for name, image in (
            ("gibbs", sampling.grid(v, nrow)),
            ("gibbs_mean", sampling.grid(mean, nrow)),
            ("chain", sampling.grid(chain, len(snaps) + 1)),
        ):
            common.save_png(out_dir / f"{name}.png", image)
            tb.image(f"samples/{name}", image, 0)
        tb.scalars(metrics, cfg.gibbs_steps)  # at the step count: the end of judge_every's curve
    finally:
        tb.close()
    samples = v.detach().float().cpu().clamp(0, 1).contiguous()
    checkpoint.atomic_write(out_dir / "samples.pt", lambda f: torch.save(samples, f))
    extra = {"by_step": by_step} if by_step else {}
    if run.betas and (betas is not None or tune):
        extra["ladder"] = run.betas
    checkpoint.save_json(out_dir / "metrics.json", {**metrics, **extra, "checkpoint": str(path)})
    quality = "" if classifier is None else "; " + _quality_line(metrics, classes, confidence, len(v))
    log.info(
        "acceptance %.3f, free energy of samples %.2f vs test data %.2f%s; gibbs.png, gibbs_mean.png, chain.png, "
        "samples.pt from %s (epoch %d) in %s",
        acceptance,
        metrics["samples/free_energy"],
        metrics["test/free_energy/data"],
        quality,
        path,
        epoch,
        out_dir,
    )
    return metrics


def _annealed_start(model, noise, base, temperatures: int, tempering: int, betas, cfg: DictConfig):
    """``anneal``: the chains' start, the states ``noise`` [N, C, H, W] annealed from the base-rate
    model ``base`` to the model through ``temperatures`` (:func:`capsrun.ais.anneal`, AIS's path);
    with a ladder its levels below 1 start where the annealing passed their inverse temperatures.
    Returns (start, below or None, the :class:`~capsrun.ais.Annealed` runs).
    Why: chains from noise cross the model's first-order-like transition (beta 0.7-0.9) by
    condensing, and which digit they condense into depends on how they arrive; slow annealing
    crosses it near equilibrium, and its importance weights correct what is left
    (docs/capsrbm.md, "The model's own class mix")."""
    from capsrun import ais
    from capsrun.models.energy import own_ladder

    keep = []
    if tempering > 1:
        ladder = betas if betas is not None else own_ladder(model, tempering)
        keep = [float(b) for b in ladder][:-1]
    log.info("annealing %d chains from noise through %d temperatures ...", len(noise), temperatures)
    out = ais.anneal(
        model, base, temperatures, seed=cfg.seed, start=noise.to(base.device), keep=keep, progress=cfg.trainer.progress
    )
    return out.v, out.kept, out


def _annealed_metrics(annealed, temperatures: int, judge, classes: int, confidence: float) -> dict[str, float]:
    """``samples/anneal/*``: the annealing's temperatures, log-weight spread and effective sample
    size (Kish) and, with a judge, the model's own class mix and recognised share by its
    importance weights (of the states where the annealing ended, before ``gibbs_steps``)."""
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


def _quality_line(metrics: dict, classes: int, confidence: float, n: int) -> str:
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
