"""Learning-rate schedules, per optimizer step: the authors' exponential decay for
arXiv:1710.09829 and a linear decay to zero for persistent CD (Tieleman 2008). Classes, not
lambdas, so that a scheduler's state pickles into a checkpoint."""

from __future__ import annotations

import torch


class ExponentialDecay:
    """``lr = lr0 * decay_rate ** (step / decay_steps)``, floored at ``min_lr`` (the authors' code
    for arXiv:1710.09829: 0.96 every 2000 steps, smooth). A class, not a lambda, so it pickles.

    ``warmup_steps`` > 0 (ours, not the paper's) ramps the factor linearly from
    ``1 / warmup_steps`` to 1 first. Why: Adam's first steps move every weight of the primary-capsule
    conv (20,736 inputs per output) by about lr in a coherent direction; on dense 36x36 MultiMNIST
    inputs at lr 1e-3 that saturates every capsule at length ~1 within two steps, where the squash
    has no gradient left, and training never recovers (measured: 2 % MultiMNIST accuracy).
    """

    def __init__(self, decay_rate: float, decay_steps: int, floor: float, warmup_steps: int = 0):
        self.decay_rate, self.decay_steps, self.floor = decay_rate, decay_steps, floor
        self.warmup_steps = warmup_steps

    def __call__(self, step: int) -> float:
        factor = max(self.decay_rate ** (step / self.decay_steps), self.floor)
        if step < self.warmup_steps:
            factor *= (step + 1) / self.warmup_steps
        return factor


_EXPONENTIAL_RANGES = {
    "decay_rate": "a number in (0, 1]",
    "decay_steps": "a number > 0",
    "min_lr": "a number >= 0",
    "warmup_steps": "an integer >= 0",
}


def exponential_decay(
    optimizer: torch.optim.Optimizer,
    decay_rate: float = 0.96,
    decay_steps: int = 2000,
    min_lr: float = 1e-6,
    warmup_steps: int = 0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step scheduler for :class:`ExponentialDecay`; call ``step()`` after every batch."""
    for name, value, ok in (
        ("decay_rate", decay_rate, isinstance(decay_rate, (int, float)) and 0 < decay_rate <= 1),
        ("decay_steps", decay_steps, isinstance(decay_steps, (int, float)) and decay_steps > 0),
        ("min_lr", min_lr, isinstance(min_lr, (int, float)) and min_lr >= 0),
        ("warmup_steps", warmup_steps, isinstance(warmup_steps, int) and warmup_steps >= 0),
    ):
        if isinstance(value, bool) or not ok:
            raise ValueError(f"{name} must be {_EXPONENTIAL_RANGES[name]}, got {value!r}")
    lr0 = optimizer.param_groups[0]["lr"]
    decay = ExponentialDecay(decay_rate, decay_steps, min_lr / lr0, warmup_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, decay)


class LinearDecay:
    """``lr = lr0 * (1 - (1 - final) * step / total_steps)``, then ``final * lr0``: the decay to
    (near) zero that persistent contrastive divergence needs, since its chains must keep up with
    a model that moves ever less (Tieleman, ICML 2008, Sec. 4)."""

    def __init__(self, total_steps: int, final: float = 0.0):
        self.total_steps, self.final = total_steps, final

    def __call__(self, step: int) -> float:
        return 1 - (1 - self.final) * min(step, self.total_steps) / self.total_steps


def linear_decay(
    optimizer: torch.optim.Optimizer, total_steps: int, final: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step scheduler for :class:`LinearDecay`; ``total_steps`` is filled in from
    ``trainer.epochs`` and the training split when the config leaves it ``???``."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= final <= 1:
        raise ValueError(f"final must be in [0, 1], got {final}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, LinearDecay(total_steps, final))
