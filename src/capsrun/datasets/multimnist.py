"""MultiMNIST: two overlapping digits of different classes, generated on the fly from MNIST tensors.

Sabour, Frosst, Hinton, "Dynamic Routing Between Capsules", NIPS 2017, arXiv:1710.09829, Sec. 6:
each image overlays a base digit and a partner digit of a different class from the same split,
each placed on a 36x36 canvas (28x28 padded by 4) with its own random shift of up to 4 pixels in
x and y, pixel values added and clipped at 1. The two digits alone on the canvas are the two
reconstruction targets; an image is classified correctly only when the two highest-scoring
classes are its two labels.

Shapes: split ``images`` uint8 ``[N, 1, 28, 28]``, ``labels`` int64 ``[N]`` -> ``image`` float
``[B, 1, 36, 36]`` in [0, 1], ``labels`` int64 ``[B, 2]`` (base, partner), ``base_alone`` and
``partner_alone`` float ``[B, 1, 36, 36]``.

Deliberate deviations:
- The paper generates 1000 partners per base digit and stores the result (60M training and 10M
  test images). capsrun draws the partners and shifts on the fly instead, from a generator seeded
  by ``(seed, epoch)``: a test set is the fixed draw of epoch 0 and is reproducible without
  storing it, and each training epoch pairs every base digit (once, in a shuffled order) with a
  fresh partner and fresh shifts.
- ``max_shift`` defaults to 4 as in the paper; the authors' README uses 6. Any shift works: content
  moved past the canvas edge is cut, never wrapped.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch

from capsrun.datasets.loader import epoch_generator  # (seed, epoch): the same draw as BatchLoader


class MultiMNISTPlan(NamedTuple):
    """What to draw, before any pixel is touched: ``base``, ``partner`` ``[B]`` indices into the
    split; ``base_shift``, ``partner_shift`` ``[B, 2]`` integer (dy, dx) offsets."""

    base: torch.Tensor
    partner: torch.Tensor
    base_shift: torch.Tensor
    partner_shift: torch.Tensor


class MultiMNISTBatch(NamedTuple):
    """``image`` ``[B, 1, S, S]`` in [0, 1]; ``labels`` ``[B, 2]`` (base, partner);
    ``base_alone``, ``partner_alone`` ``[B, 1, S, S]``: each digit alone, the reconstruction targets."""

    image: torch.Tensor
    labels: torch.Tensor
    base_alone: torch.Tensor
    partner_alone: torch.Tensor


def _draw_partners(split_labels: torch.Tensor, base_labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """For each entry of ``base_labels`` ``[B]``, an index into ``split_labels`` ``[N]`` whose label
    differs, uniform among those. Returns int64 ``[B]`` on the CPU."""
    split_labels, base_labels = split_labels.cpu().long(), base_labels.cpu().long()
    if split_labels.numel() and int(split_labels.min()) < 0:
        raise ValueError("labels must be non-negative class indices")
    counts = torch.bincount(split_labels, minlength=int(base_labels.max()) + 1 if base_labels.numel() else 0)
    if int((counts > 0).sum()) < 2:
        raise ValueError(f"MultiMNIST needs at least 2 classes in the split, got {int((counts > 0).sum())}")
    # Rather than redraw collisions (unbounded when one class dominates), draw directly among the
    # N - n_c indices of the other classes: with the split sorted by class, skip the block of class c.
    order = torch.argsort(split_labels, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    n_c, start_c = counts[base_labels], starts[base_labels]
    n_valid = len(split_labels) - n_c
    # float64 uniforms: the bias of floor(u * n) is ~n / 2^53, nothing for any split that fits in memory
    r = (torch.rand(len(base_labels), generator=gen, dtype=torch.float64) * n_valid).long()
    r = torch.minimum(r, n_valid - 1)
    return order[r + n_c * (r >= start_c)]


def partners(labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """For each base index i, a partner index j of the same split with ``labels[j] != labels[i]``,
    uniform among those. ``labels``: int64 ``[N]``; returns int64 ``[N]`` on ``labels.device``.
    One vectorised draw, no rejection loop; raises ValueError when the split has fewer than 2 classes."""
    return _draw_partners(labels, labels, gen).to(labels.device)


def plan(labels: torch.Tensor, n: int, gen: torch.Generator, max_shift: int = 4) -> MultiMNISTPlan:
    """Draw ``n`` (base, partner, shifts) from a split with ``labels`` ``[N]``, on the CPU.

    Bases run through seeded permutations of the split, one after another, so every digit is a
    base once before any is a base twice. Shifts are uniform integers in ``[-max_shift, max_shift]``.
    """
    if max_shift < 0:
        raise ValueError(f"max_shift must be >= 0, got {max_shift}")
    if len(labels) == 0:
        raise ValueError("MultiMNIST needs a non-empty split")
    labels = labels.cpu()
    cycles = max(1, -(-n // len(labels)))
    base = torch.cat([torch.randperm(len(labels), generator=gen) for _ in range(cycles)])[:n]
    partner = _draw_partners(labels, labels[base], gen)
    shifts = torch.randint(-max_shift, max_shift + 1, (n, 2, 2), generator=gen)
    return MultiMNISTPlan(base, partner, shifts[:, 0], shifts[:, 1])


def _to_unit(x: torch.Tensor) -> torch.Tensor:
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


def place(images: torch.Tensor, shift: torch.Tensor, canvas: int = 36) -> torch.Tensor:
    """Each image centred on a ``canvas`` x ``canvas`` zero canvas and moved by its own (dy, dx).

    ``images``: ``[B, C, H, W]``; ``shift``: integer ``[B, 2]``, any size; returns ``[B, C, canvas,
    canvas]`` with ``out[r, c] = in[r - top - dy, c - left - dx]`` where that lies inside the image,
    else 0 (top = (canvas - H) // 2). Content moved off the canvas is cut, never wrapped.
    """
    b, ch, h, w = images.shape
    dev = images.device
    shift = shift.to(dev)
    # Gather with clamped indices and zero what fell outside: no padding wide enough for the
    # largest shift needed, so no host sync to find that width.
    rows = torch.arange(canvas, device=dev) - (canvas - h) // 2 - shift[:, 0:1]  # [B, canvas]
    cols = torch.arange(canvas, device=dev) - (canvas - w) // 2 - shift[:, 1:2]
    inside = ((rows >= 0) & (rows < h))[:, None, :, None] & ((cols >= 0) & (cols < w))[:, None, None, :]
    batch_idx = torch.arange(b, device=dev)[:, None, None, None]
    chan_idx = torch.arange(ch, device=dev)[None, :, None, None]
    out = images[batch_idx, chan_idx, rows.clamp(0, h - 1)[:, None, :, None], cols.clamp(0, w - 1)[:, None, None, :]]
    return out * inside.to(out.dtype)


def overlay(
    base: torch.Tensor,
    partner: torch.Tensor,
    base_shift: torch.Tensor,
    partner_shift: torch.Tensor,
    canvas: int = 36,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sec. 6: the two digits placed and shifted independently, added, clipped at 1.

    ``base``, ``partner``: uint8 ``[B, 1, 28, 28]`` (0..255) or float in [0, 1]; shifts: integer
    ``[B, 2]`` (dy, dx). Returns float ``(image, base_alone, partner_alone)``, each
    ``[B, 1, canvas, canvas]`` in [0, 1], with ``image == (base_alone + partner_alone).clamp(max=1)``.
    """
    base_alone = _to_unit(place(base, base_shift, canvas))
    partner_alone = _to_unit(place(partner, partner_shift, canvas))
    return (base_alone + partner_alone).clamp_(max=1.0), base_alone, partner_alone


def render(images: torch.Tensor, labels: torch.Tensor, drawn: MultiMNISTPlan, canvas: int = 36) -> MultiMNISTBatch:
    """The batch a :class:`MultiMNISTPlan` describes, on ``images.device``."""
    dev = images.device
    base, partner = drawn.base.to(dev), drawn.partner.to(dev)
    image, base_alone, partner_alone = overlay(
        images[base], images[partner], drawn.base_shift, drawn.partner_shift, canvas
    )
    labels = labels.to(dev)
    return MultiMNISTBatch(image, torch.stack([labels[base], labels[partner]], dim=1).long(), base_alone, partner_alone)


def sample(
    images: torch.Tensor, labels: torch.Tensor, n: int, seed: int, max_shift: int = 4, canvas: int = 36
) -> MultiMNISTBatch:
    """A fixed set of ``n`` MultiMNIST images (e.g. the test set), the same for the same seed.

    Equal to the batches of ``MultiMNISTLoader(images, labels, ..., seed=seed, epoch_size=n).epoch(0)``
    concatenated. ``images``: uint8 ``[N, 1, 28, 28]``; ``labels``: int64 ``[N]``.
    """
    return render(images, labels, plan(labels, n, epoch_generator(seed, 0), max_shift), canvas)


class MultiMNISTLoader:
    """Iterates :class:`MultiMNISTBatch` es over a split held in memory, like
    :class:`capsrun.datasets.BatchLoader`.

    ``epoch(e, start=k)`` draws the whole epoch's plan (base order, partners, shifts) from a
    generator seeded by ``(seed, e)`` and then renders batches ``k..``, so a resumed epoch is
    exactly the tail of the uninterrupted one. ``epoch_size`` (default: the split size) images per
    epoch. For a fixed test set, iterate ``epoch(0)`` every time.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        max_shift: int = 4,
        canvas: int = 36,
        seed: int = 0,
        epoch_size: int | None = None,
        device: torch.device | str = "cpu",
    ):
        self.images = images.to(device)
        self.labels = labels.to(device)
        self._cpu_labels = labels.cpu()
        self.batch_size, self.max_shift, self.canvas, self.seed = batch_size, max_shift, canvas, seed
        self.epoch_size = len(labels) if epoch_size is None else epoch_size
        self.device = torch.device(device)

    def __len__(self) -> int:
        return (self.epoch_size + self.batch_size - 1) // self.batch_size

    @property
    def num_examples(self) -> int:
        return self.epoch_size

    def epoch(self, epoch: int = 0, start: int = 0) -> Iterator[MultiMNISTBatch]:
        drawn = plan(self._cpu_labels, self.epoch_size, epoch_generator(self.seed, epoch), self.max_shift)
        drawn = MultiMNISTPlan(*(t.to(self.device) for t in drawn))
        for i in range(start, len(self)):
            sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
            yield render(self.images, self.labels, MultiMNISTPlan(*(t[sl] for t in drawn)), self.canvas)

    def __iter__(self) -> Iterator[MultiMNISTBatch]:
        return self.epoch(0)


__all__ = [
    "MultiMNISTBatch",
    "MultiMNISTLoader",
    "MultiMNISTPlan",
    "overlay",
    "partners",
    "place",
    "plan",
    "render",
    "sample",
]
