"""What a training or evaluation pass counts: the losses, summed on the device so that the
loop never syncs per step, and how many predictions were right (one label, or two for
MultiMNIST: both classes in the top two)."""

from __future__ import annotations

from typing import Any

import torch

from capsrun import distributed


class Meter:
    """Sums of per-batch losses (weighted by batch size) and correct predictions, on the device."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def update(self, losses: dict[str, torch.Tensor], correct: torch.Tensor | None, n: int) -> None:
        """``correct``: right predictions in the batch, or None for a model without labels."""
        for k, v in losses.items():
            v = v.detach().float() * n
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        if correct is not None:
            c = correct.detach().float()
            self.sums["_correct"] = self.sums["_correct"] + c if "_correct" in self.sums else c
        self.count += n

    def compute(self, prefix: str) -> dict[str, float]:
        """``{prefix/loss/<name>: mean, prefix/accuracy: %}``; one device-to-host copy. A name
        with a slash is a statistic, not a loss: ``kl/present`` -> ``prefix/kl/present``."""
        if not self.count:
            return {}
        keys = list(self.sums)
        count_t = self.sums[keys[0]].new_tensor(float(self.count))
        stacked = torch.stack([*(self.sums[k] for k in keys), count_t])
        *values, count = distributed.all_reduce_sum(stacked).cpu().tolist()  # summed over ranks
        out = {}
        for k, v in zip(keys, values):
            if k == "_correct":
                out[f"{prefix}/accuracy"] = 100.0 * v / count
            else:
                out[f"{prefix}/{k}" if "/" in k else f"{prefix}/loss/{k}"] = v / count
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"sums": {k: v.cpu() for k, v in self.sums.items()}, "count": self.count}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        self.sums = {k: v.to(device) for k, v in state["sums"].items()}
        self.count = state["count"]


def predictions(scores: torch.Tensor, k: int = 1) -> torch.Tensor:
    """The class of the highest score ``[B]``, or the k highest ``[B, k]``: for capsule models the
    longest capsules (arXiv:1710.09829 Sec. 3: a capsule's length is the probability that its
    entity exists)."""
    return scores.argmax(dim=-1) if k == 1 else scores.topk(k, dim=-1).indices


def correct(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """How many predictions are right. ``labels`` ``[B]``: the top class; ``[B, k]``: the k top
    classes must be exactly the k labels, in any order (MultiMNIST, Sec. 6)."""
    if labels.dim() == 1:
        return (predictions(scores) == labels).sum()
    top = predictions(scores, labels.shape[1]).sort(dim=-1).values
    return (top == labels.sort(dim=-1).values).all(dim=-1).sum()
