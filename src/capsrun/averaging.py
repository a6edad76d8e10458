"""Weight averaging: the running mean of a model's parameters over the last steps of training.

Polyak & Juditsky, "Acceleration of stochastic approximation by averaging", SIAM J. Control Optim.
30(4), 1992; Ruppert 1988. The mean of the iterates of a stochastic-gradient method with a small
step size reaches the fixed point's neighbourhood with the smallest asymptotic variance; the
iterates themselves wander around it with the gradient's noise. (torch.optim.swa_utils keeps the
same mean in a copy of the model; here it is swapped into the model itself, so that everything
that holds the model, a compiled wrapper or an epoch hook, sees it.)

Why capsrun has it (``trainer.average``): the last weights of a PCD run carry the gradient noise
of its persistent chains, and a frozen energy model's sampler then over-draws some classes and
under-draws others; the mean of the last weights carries less of that noise (our reading of the
capsule RBM's measurements, not a proof: docs/capsrbm.md, "Training").
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


class WeightAverage:
    """The equal-weight mean of ``model``'s parameters over the optimizer steps after
    ``start_step`` (steps counted from 1). :meth:`update` after each step (no host sync);
    :meth:`applied` swaps the mean into the model for a while (in place: the same tensors)."""

    def __init__(self, model: nn.Module, start_step: int):
        self.start_step, self.steps = start_step, 0
        self.params = {name: torch.zeros_like(p, requires_grad=False) for name, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Add the parameters after optimizer step ``step`` to the mean, if it is past the start."""
        if step <= self.start_step:
            return
        self.steps += 1
        for name, p in model.named_parameters():
            self.params[name].lerp_(p.detach(), 1.0 / self.steps)  # mean += (p - mean) / n

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[bool]:
        """Within the block the model's parameters are the mean (when any step was averaged; yields
        whether they are); afterwards the model's own again, bit for bit."""
        if self.steps == 0:
            yield False
            return
        own = {name: p.detach().clone() for name, p in model.named_parameters()}
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(self.params[name])
        try:
            yield True
        finally:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p.copy_(own[name])

    def state_dict(self) -> dict[str, Any]:
        return {"start_step": self.start_step, "steps": self.steps, "params": dict(self.params)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the mean a checkpoint holds; a ValueError naming what does not fit otherwise."""
        params = state.get("params") if isinstance(state, dict) else None
        if not isinstance(params, dict) or set(params) != set(self.params):
            raise ValueError("its weight average does not name the model's parameters")
        for name, value in params.items():
            if not isinstance(value, torch.Tensor) or value.shape != self.params[name].shape:
                raise ValueError(f"its weight average of {name} is not a tensor of the parameter's shape")
        counts = state.get("start_step"), state.get("steps")
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
            raise ValueError("its weight average's step counts are not whole numbers")
        if counts[1] > 0:  # begun: continue that mean (a longer run does not move its start)
            self.start_step, self.steps = counts
        for name, value in params.items():
            self.params[name].copy_(value)


def start_step(fraction: float, total_steps: int) -> int | None:
    """The step after which a run of ``total_steps`` averages its last ``fraction`` of steps (at
    least one); None when ``fraction`` is 0 (no averaging)."""
    if fraction == 0:
        return None
    return total_steps - max(1, round(fraction * total_steps))


def averaged_weights(ckpt: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """The averaged parameters a training checkpoint (last.pt) holds, or None when it holds none
    (no averaging, or none begun). best.pt holds them as its model weights already."""
    average = ckpt.get("average")
    if not isinstance(average, dict) or not average.get("steps"):
        return None
    return average.get("params")
