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
    has no gradient left, and training never recovers (it stays at chance).
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
    a model that moves ever less (Tieleman, ICML 2008, Sec. 4).

    ``tail`` > 0 (ours): the last ``tail`` of the steps decay from ``tail_lr * lr0`` to
    ``final * lr0`` and the steps before them from lr0 to ``tail_lr * lr0``: a long, slow end.
    Why: at a large lr the model moves so fast that the PCD chains mix by its moving ("fast
    weights", Tieleman & Hinton, ICML 2009), not by their own; a model frozen there has another
    equilibrium: on the capsule RBM its training chains drew every digit while the frozen model's
    own chains drifted to a few of them (docs/capsrbm.md, "Training")."""

    def __init__(self, total_steps: int, final: float = 0.0, tail: float = 0.0, tail_lr: float = 0.03):
        self.total_steps, self.final = total_steps, final
        self.tail, self.tail_lr = tail, tail_lr

    def __call__(self, step: int) -> float:
        tail_steps = round(self.tail * self.total_steps)
        if tail_steps == 0:
            return 1 - (1 - self.final) * min(step, self.total_steps) / self.total_steps
        main = self.total_steps - tail_steps
        if step < main:
            return 1 - (1 - self.tail_lr) * step / main
        return self.tail_lr - (self.tail_lr - self.final) * min(step - main, tail_steps) / tail_steps


def linear_decay(
    optimizer: torch.optim.Optimizer, total_steps: int, final: float = 0.0, tail: float = 0.0, tail_lr: float = 0.03
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step scheduler for :class:`LinearDecay`; ``total_steps`` is filled in from
    ``trainer.epochs`` and the training split when the config leaves it ``???``."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= final <= 1:
        raise ValueError(f"final must be in [0, 1], got {final}")
    if not 0 <= tail < 1:
        raise ValueError(f"tail must be in [0, 1), got {tail}")
    if not final <= tail_lr <= 1:
        raise ValueError(f"tail_lr must be in [final, 1], got {tail_lr}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, LinearDecay(total_steps, final, tail, tail_lr))
