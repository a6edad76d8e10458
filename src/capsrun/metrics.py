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


class Confusion:
    """Per-class results of a classifier over an evaluation pass, counted on the device without a
    sync per batch.

    One label an image (``labels`` [B]): the confusion matrix ``counts[true, predicted]`` [K, K];
    a class's accuracy is its diagonal over its row. Two labels an image (MultiMNIST, ``labels``
    [B, 2], two different digits): per unordered pair of classes, how many images hold it and on
    how many both are the top two scores (:func:`correct`'s rule), and per class, on how many of
    the images holding it the class is among the top two."""

    def __init__(self, num_classes: int, device: torch.device):
        k = num_classes
        self.k = k
        self.counts = torch.zeros(k * k, dtype=torch.int64, device=device)  # [true * K + predicted], or pairs
        self.pair_right = torch.zeros(k * k, dtype=torch.int64, device=device)
        self.class_total = torch.zeros(k, dtype=torch.int64, device=device)
        self.class_right = torch.zeros(k, dtype=torch.int64, device=device)
        self.two = False

    def update(self, scores: torch.Tensor, labels: torch.Tensor) -> None:
        """``scores`` [B, K]; ``labels`` [B] or [B, 2]."""
        labels = labels.to(self.counts.device)
        if labels.dim() == 1:
            predicted = predictions(scores).to(labels.device)
            self.counts.index_add_(0, labels * self.k + predicted, torch.ones_like(labels))
            right = (predicted == labels).long()
            self.class_total.index_add_(0, labels, torch.ones_like(labels))
            self.class_right.index_add_(0, labels, right)
            return
        self.two = True
        top = predictions(scores, labels.shape[1]).to(labels.device)  # [B, 2]
        lo, hi = labels.min(dim=1).values, labels.max(dim=1).values
        both = (top.sort(dim=-1).values == labels.sort(dim=-1).values).all(dim=-1).long()
        self.counts.index_add_(0, lo * self.k + hi, torch.ones_like(lo))
        self.pair_right.index_add_(0, lo * self.k + hi, both)
        found = (top[:, :, None] == labels[:, None, :]).any(dim=1).long()  # [B, 2]: each label in the top two
        flat = labels.flatten()
        self.class_total.index_add_(0, flat, torch.ones_like(flat))
        self.class_right.index_add_(0, flat, found.flatten())

    def compute(self, prefix: str) -> dict[str, list]:
        """``{prefix}/class_accuracy`` [K] (%, None for a class with no image) and, for one label,
        ``{prefix}/confusion`` [K][K] (counts, rows the true class, columns the predicted one);
        for two, ``{prefix}/pair_accuracy`` [K][K] (%, at [a][b] and [b][a]; None for a pair
        with no image). Summed over ranks."""
        k = self.k
        summed = distributed.all_reduce_sum(
            torch.cat([self.counts, self.pair_right, self.class_total, self.class_right])
        )
        counts, pair_right, total, right = summed.cpu().split([k * k, k * k, k, k])

        def percent(num: torch.Tensor, den: torch.Tensor) -> list:
            return [None if int(d) == 0 else 100.0 * int(n) / int(d) for n, d in zip(num.tolist(), den.tolist())]

        out: dict[str, list] = {f"{prefix}/class_accuracy": percent(right, total)}
        if not self.two:
            out[f"{prefix}/confusion"] = counts.view(k, k).tolist()
            return out
        pairs = counts.view(k, k) + counts.view(k, k).T  # each pair is counted at [low, high]
        hits = pair_right.view(k, k) + pair_right.view(k, k).T
        out[f"{prefix}/pair_accuracy"] = [percent(h, p) for h, p in zip(hits, pairs)]
        return out
