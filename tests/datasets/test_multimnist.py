"""MultiMNIST of arXiv:1710.09829 Sec. 6: partners, placement and shifts, seeding, resume, top-2 accuracy."""

from __future__ import annotations

import pytest
import torch

from capsrun.datasets.multimnist import MultiMNISTLoader, overlay, partners, place, plan, sample
from capsrun.losses import multi_hot
from capsrun.metrics import correct


def _split(n: int = 60, classes: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random uint8 ``[n, 1, 28, 28]`` digits and labels cycling through ``classes``."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 28, 28), generator=gen, dtype=torch.uint8)
    return images, torch.arange(n) % classes


def _dot(r: int, c: int, value: int = 255) -> torch.Tensor:
    """A 28x28 uint8 digit with one bright pixel at (r, c)."""
    x = torch.zeros(1, 1, 28, 28, dtype=torch.uint8)
    x[0, 0, r, c] = value
    return x


def _where(img: torch.Tensor) -> list[tuple[int, int]]:
    return [tuple(p) for p in torch.nonzero(img[0, 0]).tolist()]


# --- partners ---------------------------------------------------------------------------------


def test_partner_labels_always_differ():
    labels = torch.randint(0, 10, (2000,), generator=torch.Generator().manual_seed(0))
    j = partners(labels, torch.Generator().manual_seed(1))
    assert j.shape == (2000,) and j.dtype == torch.int64
    assert j.min() >= 0 and j.max() < 2000
    assert torch.all(labels[j] != labels)


def test_partners_when_one_class_dominates():
    """999 of 1000 labels are 0: every 0 must get the single 1, and it still takes one draw."""
    labels = torch.zeros(1000, dtype=torch.int64)
    labels[417] = 1
    j = partners(labels, torch.Generator().manual_seed(0))
    assert torch.all(j[labels == 0] == 417)
    assert labels[j[417]] == 0


def test_partners_are_uniform_among_other_classes():
    """Labels [0, 0, 1, 1, 2]: base 4 (class 2) picks each of the four others ~1/4 of the time."""
    labels = torch.tensor([0, 0, 1, 1, 2])
    drawn = plan(labels, 20_000, torch.Generator().manual_seed(0))  # every index is a base 4000 times
    picks = drawn.partner[drawn.base == 4]
    assert len(picks) == 4000
    freq = torch.bincount(picks, minlength=5).float() / 4000
    assert freq[4] == 0
    assert torch.allclose(freq[:4], torch.full((4,), 0.25), atol=0.03)
    assert torch.all(labels[drawn.partner] != labels[drawn.base])


def test_partners_need_two_classes():
    with pytest.raises(ValueError, match="2 classes"):
        partners(torch.full((10,), 3), torch.Generator().manual_seed(0))


# --- placement and overlay --------------------------------------------------------------------


def test_centred_without_shift():
    """Pad (36 - 28) / 2 = 4: pixel (r, c) lands at (r + 4, c + 4)."""
    out = place(_dot(0, 27), torch.tensor([[0, 0]]))
    assert out.shape == (1, 1, 36, 36)
    assert _where(out) == [(4, 31)]


@pytest.mark.parametrize("shift", [(3, -2), (-4, 4), (1, 0), (0, -1)])
def test_shift_moves_by_exactly_the_offset(shift):
    """Positive dy moves down, positive dx right, as in random_shift."""
    base, partner = _dot(10, 12), _dot(20, 5, value=128)
    image, base_alone, partner_alone = overlay(base, partner, torch.tensor([shift]), torch.tensor([[-1, 2]]))
    assert _where(base_alone) == [(10 + 4 + shift[0], 12 + 4 + shift[1])]
    assert _where(partner_alone) == [(20 + 4 - 1, 5 + 4 + 2)]
    assert partner_alone.max() == pytest.approx(128 / 255)
    assert sorted(_where(image)) == sorted(_where(base_alone) + _where(partner_alone))


def test_shift_bigger_than_padding_cuts_and_never_wraps():
    """With shift 6 > pad 4, a pixel in the last column leaves the canvas; one inside just moves."""
    x = _dot(27, 27) + _dot(5, 5)
    out = place(x, torch.tensor([[6, 6]]))
    assert _where(out) == [(5 + 4 + 6, 5 + 4 + 6)]  # (27 + 10) would be row 37: cut
    # large negative shift: everything but the bottom-right corner leaves; nothing reappears
    out = place(x, torch.tensor([[-30, -30]]))
    assert _where(out) == [(27 + 4 - 30, 27 + 4 - 30)]
    assert place(x, torch.tensor([[40, 0]])).sum() == 0


def test_overlay_is_clipped_sum_in_unit_range():
    images, _ = _split(16)
    gen = torch.Generator().manual_seed(3)
    shifts = torch.randint(-6, 7, (2, 16, 2), generator=gen)
    image, a, b = overlay(images[:8].repeat(2, 1, 1, 1), images[8:].repeat(2, 1, 1, 1), shifts[0], shifts[1])
    for t in (image, a, b):
        assert t.dtype == torch.float32 and t.shape == (16, 1, 36, 36)
        assert t.min() >= 0 and t.max() <= 1
    assert torch.equal(image, (a + b).clamp(0, 1))
    assert image.max() == 1  # random digits overlap: the clip is exercised
    # uint8 input is scaled by 1/255; float input is taken as it is
    _, a_float, _ = overlay(images[:8].float() / 255, images[8:], shifts[0, :8], shifts[1, :8])
    assert torch.equal(a_float, a[:8])


# --- seeded sets and epochs --------------------------------------------------------------------


def test_sample_shapes_labels_and_targets():
    images, labels = _split()
    batch = sample(images, labels, 25, seed=0)
    assert batch.image.shape == (25, 1, 36, 36) and batch.labels.shape == (25, 2)
    assert batch.labels.dtype == torch.int64
    assert torch.all(batch.labels[:, 0] != batch.labels[:, 1])
    assert torch.equal(batch.image, (batch.base_alone + batch.partner_alone).clamp(0, 1))


def test_sample_matches_its_plan():
    """The alone images are the planned digits at the planned shifts, with the planned labels."""
    images, labels = _split()
    batch = sample(images, labels, 12, seed=5, max_shift=6)
    drawn = plan(labels, 12, torch.Generator().manual_seed(5 * 1_000_003), max_shift=6)
    assert torch.equal(batch.labels, torch.stack([labels[drawn.base], labels[drawn.partner]], 1))
    assert torch.equal(batch.base_alone, place(images[drawn.base], drawn.base_shift).float() / 255)
    assert torch.equal(batch.partner_alone, place(images[drawn.partner], drawn.partner_shift).float() / 255)


@pytest.mark.parametrize("max_shift", [0, 2, 4, 6])
def test_shifts_are_bounded_and_cover_the_range(max_shift):
    labels = torch.arange(2000) % 10
    drawn = plan(labels, 2000, torch.Generator().manual_seed(0), max_shift)
    for s in (drawn.base_shift, drawn.partner_shift):
        assert s.abs().max() == max_shift  # bounded, and the bound is reached
        assert set(s.unique().tolist()) == set(range(-max_shift, max_shift + 1))


def test_single_pixel_digits_stay_within_max_shift():
    """Rendered, not just drawn: a centre pixel ends up within max_shift of its unshifted place."""
    images = torch.cat([_dot(14, 14)] * 20)
    batch = sample(images, torch.arange(20) % 2, 500, seed=1, max_shift=4)
    for alone in (batch.base_alone, batch.partner_alone):
        pos = torch.nonzero(alone[:, 0])[:, 1:] - 18  # (r, c) minus the unshifted place 14 + 4
        assert len(pos) == 500 and pos.abs().max() == 4


def test_plan_covers_every_base_before_repeating():
    labels = torch.arange(30) % 3
    drawn = plan(labels, 75, torch.Generator().manual_seed(0))
    assert sorted(drawn.base[:30].tolist()) == list(range(30))
    assert sorted(drawn.base[30:60].tolist()) == list(range(30))


def test_same_seed_same_set_different_seed_different():
    images, labels = _split()
    a, b, c = (sample(images, labels, 20, seed=s) for s in (7, 7, 8))
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a.image, c.image)


def test_sample_equals_epoch_zero_of_a_loader():
    images, labels = _split()
    loader = MultiMNISTLoader(images, labels, batch_size=8, seed=4, epoch_size=30)
    batches = list(loader.epoch(0))
    assert len(loader) == len(batches) == 4 and loader.num_examples == 30
    assert [len(b.labels) for b in batches] == [8, 8, 8, 6]
    fixed = sample(images, labels, 30, seed=4)
    for field, got in zip(fixed, zip(*batches)):
        assert torch.equal(field, torch.cat(got))


def test_loader_epochs_differ_and_replay():
    images, labels = _split()
    loader = MultiMNISTLoader(images, labels, batch_size=16, max_shift=6, seed=0)
    assert len(loader) == 4  # epoch_size defaults to the split size
    e0, e0_again, e1 = (torch.cat([b.image for b in loader.epoch(e)]) for e in (0, 0, 1))
    assert torch.equal(e0, e0_again)
    assert not torch.equal(e0, e1)
    first = torch.cat([b.image for b in loader])  # iter() is epoch 0
    assert torch.equal(first, e0)


def test_loader_resume_from_batch():
    """epoch(e, start=k) replays batches k.. of epoch e exactly: partners, shifts and all."""
    images, labels = _split()
    loader = MultiMNISTLoader(images, labels, batch_size=7, seed=3)
    full = list(loader.epoch(2))
    for k in (1, 5, len(full) - 1):
        tail = list(loader.epoch(2, start=k))
        assert len(tail) == len(full) - k
        for got, want in zip(tail, full[k:]):
            for x, y in zip(got, want):
                assert torch.equal(x, y)
    assert list(loader.epoch(2, start=len(loader))) == []


# --- targets and accuracy ----------------------------------------------------------------------


def test_multi_hot_targets_two_ones_per_row():
    """T_k of Eq. 4 with both digits present: what the margin loss trains MultiMNIST on."""
    labels2 = torch.tensor([[3, 7], [0, 9], [5, 1]])
    t = multi_hot(labels2, 10)
    assert t.shape == (3, 10)
    assert t.sum(dim=1).tolist() == [2, 2, 2]
    assert torch.nonzero(t).tolist() == [[0, 3], [0, 7], [1, 0], [1, 9], [2, 1], [2, 5]]
    batch = sample(*_split(), 50, seed=0)
    assert torch.all(multi_hot(batch.labels, 10).sum(1) == 2)


def test_top2_accuracy_on_hand_made_scores():
    scores = torch.tensor(
        [
            [0.1, 0.9, 0.0, 0.8, 0, 0, 0, 0, 0, 0],  # top-2 {1, 3}
            [0.1, 0.9, 0.0, 0.8, 0, 0, 0, 0, 0, 0],  # same scores, labels in the other order
            [0.1, 0.9, 0.0, 0.8, 0, 0, 0, 0, 0, 0],  # one of the two right
            [0.0, 0.0, 0.7, 0.0, 0, 0, 0, 0, 0.2, 0.6],  # top-2 {2, 9}; 8 is third
            [0.0, 0.0, 0.7, 0.0, 0, 0, 0, 0, 0.2, 0.6],  # labels {2, 8}: the third is not enough
        ]
    )
    labels2 = torch.tensor([[1, 3], [3, 1], [1, 2], [9, 2], [2, 8]])
    # the training loop's own count (metrics.correct), one image at a time: [True, True, False, True, False]
    assert [int(correct(scores[i : i + 1], labels2[i : i + 1])) for i in range(5)] == [1, 1, 0, 1, 0]
