"""Chains of an energy model's own sampler: a plain chain at one temperature, or the top of a
parallel-tempering ladder (:mod:`capsrun.mcmc.tempering`), from a given start.

:class:`ChainSpec` is everything that decides the draws (one frozen object, checked once by
:mod:`capsrun.settings`); :class:`Watch` is how a caller looks at them while they run. The chains
run in segments of at most :data:`SEGMENT` steps; the states carry over exactly between segments,
so neither snapshots nor observers change a draw.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from capsrun.mcmc.base import EnergyChain, latent_of
from capsrun.mcmc.tempering import own_ladder, retune, run_ladder, sampling_ladder, swap_tries
from capsrun.progress import Progress

SEGMENT = 10  # chain steps between two looks at the chains (progress, snapshots, observe)
TUNE_EVERY = 50  # sweeps between two re-spacings of a sampling ladder while it tunes


@dataclass(frozen=True)
class ChainSpec:
    """How chains run. ``steps``: chain steps, or ladder sweeps with ``tempering`` > 1 levels
    (each sweep is a chain step at every level and the swaps between them). ``ladder_from``: the
    ladder's lowest inverse temperature, its levels spaced as the model's own tuned ladder
    (:func:`~capsrun.mcmc.tempering.sampling_ladder`); 0: the model's own ladder, or even from 0.
    ``shift``: logits added to the base-rate model for the levels below the top (a denser melt at
    the bottom; the top, the model, is unchanged). ``tune``: in the first this many sweeps the
    ladder is re-spaced every :data:`TUNE_EVERY` so that its pairs swap about equally often (an
    adaptive burn-in; afterwards the sweeps are an ordinary ladder's and the top samples the model
    exactly). ``temperature``: a plain chain samples p(v, h)^(1/T) (a ladder only T = 1).
    ``seed``: the draws' seed."""

    steps: int
    tempering: int = 1
    ladder_from: float = 0.0
    shift: float = 0.0
    tune: int = 0
    temperature: float = 1.0
    seed: int = 0


@dataclass(frozen=True)
class Watch:
    """What a caller sees of running chains: ``snapshots`` evenly spaced copies of the states (the
    last the final one), ``observe(step, v)`` after every ``every`` steps before the last (0:
    never; whatever it draws, the chains draw the same), a ``progress`` bar."""

    snapshots: int = 0
    every: int = 0
    observe: Callable[[int, torch.Tensor], None] | None = None
    progress: bool = False


class Chains(NamedTuple):
    """What :func:`run_chains` returns: the final states ``v`` [N, C, H, W], ``snapshots``
    (evenly spaced states, the last the final one), the mean ``acceptance`` of the chain steps and,
    with a ladder, the mean ``swap_rates`` of its neighbouring pairs and its inverse temperatures
    ``betas`` as it ended (re-spaced when it tuned; else both empty)."""

    v: torch.Tensor
    snapshots: list[torch.Tensor]
    acceptance: float
    swap_rates: list[float]
    betas: list[float] = []


@torch.no_grad()
def gibbs(
    model: EnergyChain, v: torch.Tensor, steps: int, beta: float = 1.0, latent: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``steps`` steps of the model's own chain at inverse temperature ``beta`` from ``v``
    [B, C, H, W] (and the latent state ``latent``, :func:`~capsrun.mcmc.base.latent_of`); returns
    the states, the mean acceptance (a 0-d tensor) and the final latent state (None if none)."""
    enc = model.chain_state(v, latent)
    acceptance = torch.zeros((), device=v.device)
    for t in range(steps):
        v, enc, acc = model.transition(v, enc, beta, encode=t < steps - 1)
        acceptance = acceptance + acc.mean()
    return v, acceptance / max(steps, 1), latent_of(enc) if steps else latent


class _Ladder:
    """A tempered run in progress: the levels, the ladder (re-spaced while it tunes) and the swaps
    counted so far. The levels below the top start at ``below`` [K - 1, N, C, H, W] or at draws
    from the (shifted) base-rate model."""

    def __init__(self, model: Any, start: torch.Tensor, spec: ChainSpec, base: torch.Tensor):
        betas = sampling_ladder(getattr(model, "betas", None), spec.tempering, spec.ladder_from)
        if spec.tune:  # re-spaced from the ladder given, else from the model's own
            own = own_ladder(model, spec.tempering) if betas is None else betas
            betas = torch.as_tensor(own, dtype=torch.float64).to(start.device)
        self.model, self.spec, self.betas, self.base, self.device = model, spec, betas, base + spec.shift, start.device
        self.swaps = torch.zeros(spec.tempering - 1, dtype=torch.float64)
        self.tried, self.window, self.window_tried = (torch.zeros_like(self.swaps) for _ in range(3))
        self.running: torch.Tensor | None = None
        self.interval = min(TUNE_EVERY, spec.tune) if spec.tune else TUNE_EVERY  # a short tune re-spaces once
        self.levels = start
        self.latent: torch.Tensor | None = None  # the levels' latent states, carried between segments

    def draw(self, start: torch.Tensor, below: torch.Tensor | None) -> None:
        """The levels' start (inside the run's seeded RNG)."""
        k = self.spec.tempering
        if below is not None:
            if below.shape != (k - 1, *start.shape):
                raise ValueError(f"below must be [{k - 1}, *{list(start.shape)}], got {list(below.shape)}")
            self.levels = torch.cat([below, start[None]])
        else:
            p = torch.sigmoid(self.base).expand(len(start), -1)
            self.levels = torch.stack([torch.bernoulli(p).view_as(start) for _ in range(k - 1)] + [start])

    def bound(self, done: int, stop: int) -> int:
        """Where a segment from ``done`` must end at the latest: at the next re-spacing."""
        return min(stop, (done // self.interval + 1) * self.interval) if done < self.spec.tune else stop

    def advance(self, done: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The sweeps ``done`` .. ``stop - 1``; returns the top's states and mean acceptance."""
        n = stop - done
        latent = None if self.latent is None else self.latent.flatten(0, 1)
        self.levels, acc, rates, latent = run_ladder(
            self.model, self.levels, n, self.base, done, self.betas, None, latent
        )
        self.latent = None if latent is None else latent.view(*self.levels.shape[:2], *latent.shape[1:])
        tries = swap_tries(done, n, self.spec.tempering - 1)  # the rates are per try: count them back
        self.swaps += rates.double().cpu() * tries
        self.tried += tries
        if done < self.spec.tune:
            self.window += rates.double().cpu() * tries
            self.window_tried += tries
            if stop % self.interval == 0 and stop <= self.spec.tune:
                seen = self.window / self.window_tried.clamp_min(1)
                self.running = seen if self.running is None else (self.running + seen) / 2  # damped, as training's
                self.betas = retune(self.betas.cpu(), self.running).to(self.device)
                self.window.zero_(), self.window_tried.zero_()
        return self.levels[-1], acc

    def ended(self) -> tuple[list[float], list[float]]:
        """The mean swap rate of each pair and the ladder as it ended."""
        betas = own_ladder(self.model, self.spec.tempering) if self.betas is None else self.betas
        return (self.swaps / self.tried.clamp_min(1)).tolist(), [float(b) for b in betas]


@torch.no_grad()
def run_chains(
    model: Any,
    start: torch.Tensor,
    spec: ChainSpec,
    base: torch.Tensor | None = None,
    below: torch.Tensor | None = None,
    watch: Watch = Watch(),
) -> Chains:
    """``len(start)`` chains of the model's own sampler (an :class:`~capsrun.mcmc.base.EnergyChain`
    that is an ``nn.Module``) for ``spec.steps`` steps from ``start`` (visible states [N, C, H, W]).
    With ``spec.tempering`` > 1 each step is a sweep of a ladder above the base-rate model
    ``base`` [C*H*W] whose top starts at ``start`` and whose lower levels start at ``below``
    (:class:`_Ladder`). The model is in eval mode while they run; the global RNG is left as it was."""
    if spec.tempering > 1 and (base is None or spec.temperature != 1):
        raise ValueError("tempering needs the base-rate model (base) and temperature 1")
    if watch.every < 0 or spec.tune < 0:
        raise ValueError(f"watch.every and spec.tune must be >= 0, got {watch.every} and {spec.tune}")
    ladder = _Ladder(model, start, spec, base) if spec.tempering > 1 else None
    devices = [start.device] if start.device.type == "cuda" else []
    every = max(spec.steps // watch.snapshots, 1) if watch.snapshots else spec.steps + 1
    taken, acceptance, v, latent = [], 0.0, start, None
    was_training = model.training
    model.eval()
    bar = Progress(spec.steps, "chains", "sweeps" if ladder else "steps", bar=watch.progress)
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(spec.seed)
            if ladder is not None:
                ladder.draw(start, below)
            done = 0
            while done < spec.steps:
                stop = min(spec.steps, done + SEGMENT, (done // every + 1) * every)
                if watch.every:
                    stop = min(stop, (done // watch.every + 1) * watch.every)
                if ladder is not None:
                    stop = ladder.bound(done, stop)
                    v, acc = ladder.advance(done, stop)
                else:
                    v, acc, latent = gibbs(model, v, stop - done, 1.0 / spec.temperature, latent)
                acceptance += float(acc) * (stop - done)
                bar.update(stop - done)
                done = stop
                if watch.snapshots and done % every == 0 and len(taken) < watch.snapshots:
                    taken.append(v.clone())
                if watch.observe is not None and watch.every and done % watch.every == 0 and done < spec.steps:
                    with torch.random.fork_rng(devices=devices):  # whatever it draws, the chains draw the same
                        watch.observe(done, v)
    finally:
        bar.close()
        model.train(was_training)
    if watch.snapshots and (not taken or not torch.equal(taken[-1], v)):
        taken = [*taken[: watch.snapshots - 1], v.clone()]
    swap_rates, betas = ladder.ended() if ladder is not None else ([], [])
    return Chains(v, taken, acceptance / max(spec.steps, 1), swap_rates, betas)


@torch.no_grad()
def step_seconds(model, n: int, repeats: int = 2) -> float:
    """Seconds of one step of the model's chain on ``n`` states from noise (the best of
    ``repeats`` after one untimed): what a sample grid or an AIS run costs a step. The global RNG
    and the model's mode are left as they were."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            v = model.noise(n).to(device)
            enc = model.chain_state(v)
            v, enc, _ = model.transition(v, enc)
            best = float("inf")
            for _ in range(repeats):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                v, enc, _ = model.transition(v, enc)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                best = min(best, time.perf_counter() - t0)
    finally:
        model.train(was_training)
    return best
