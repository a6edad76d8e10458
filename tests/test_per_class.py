"""Per-class results (capsrun.metrics.Confusion, capsrun.plots) and sample grids drawn to be read
(capsrun.images.readable_grid, the judge's captions), against counts made by hand."""

from __future__ import annotations

import pytest
import torch

from capsrun import plots, sampling
from capsrun.images import CAPTION, READABLE, readable_grid
from capsrun.metrics import Confusion


def _scores(predicted: list[int], k: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(predicted), k).float()


def test_the_confusion_matrix_of_one_label_an_image_by_hand():
    meter = Confusion(3, torch.device("cpu"))
    # true 0 0 0 1 1 2 | predicted 0 1 0 1 2 2 (in two batches)
    meter.update(_scores([0, 1, 0], 3), torch.tensor([0, 0, 0]))
    meter.update(_scores([1, 2, 2], 3), torch.tensor([1, 1, 2]))
    out = meter.compute("test")
    assert out["test/confusion"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert out["test/class_accuracy"] == pytest.approx([200 / 3, 50.0, 100.0])


def test_a_class_with_no_image_has_no_accuracy():
    meter = Confusion(3, torch.device("cpu"))
    meter.update(_scores([0, 2], 3), torch.tensor([0, 0]))
    assert meter.compute("val")["val/class_accuracy"] == [50.0, None, None]


def test_two_labels_an_image_count_per_pair_and_per_class_by_hand():
    """MultiMNIST: an image is right when its two digits are the top two scores."""
    meter = Confusion(4, torch.device("cpu"))
    scores = torch.tensor(
        [
            [0.9, 0.8, 0.1, 0.0],  # digits 0, 1: top two 0, 1 -> right
            [0.9, 0.1, 0.8, 0.0],  # digits 1, 0: top two 0, 2 -> wrong; 0 found, 1 missed
            [0.0, 0.1, 0.9, 0.8],  # digits 3, 2: right
            [0.1, 0.0, 0.9, 0.8],  # digits 0, 2: top two 2, 3 -> wrong; 2 found, 0 missed
        ]
    )
    meter.update(scores, torch.tensor([[0, 1], [1, 0], [3, 2], [0, 2]]))
    out = meter.compute("test")
    pairs = out["test/pair_accuracy"]
    assert pairs[0][1] == pairs[1][0] == 50.0  # the pair {0, 1}: two images, one right
    assert pairs[2][3] == pairs[3][2] == 100.0 and pairs[0][2] == 0.0 and pairs[1][3] is None
    # class 0: in 3 images, found in 2; 1: in 2, found in 1; 2: in 2, found in 2; 3: in 1, found in 1
    assert out["test/class_accuracy"] == pytest.approx([200 / 3, 50.0, 100.0, 100.0])
    assert "test/confusion" not in out


def test_the_per_class_picture_is_drawn_for_both_kinds():
    one = Confusion(10, torch.device("cpu"))
    one.update(_scores(list(range(10)), 10), torch.arange(10))
    image = plots.per_class_image(one.compute("test"), "test", "epoch 1")
    assert image.shape[0] == 3 and image.shape[1] > 300 and 0 <= image.min() and image.max() <= 1
    wrong = Confusion(10, torch.device("cpu"))
    wrong.update(_scores([1, *range(1, 10)], 10), torch.arange(10))  # a 0 taken for a 1
    moved = plots.per_class_image(wrong.compute("test"), "test", "epoch 1")
    assert torch.equal(image, plots.per_class_image(one.compute("test"), "test", "epoch 1"))  # the counts decide it
    assert moved.shape == image.shape and (moved != image).any()
    two = Confusion(10, torch.device("cpu"))
    two.update(torch.rand(8, 10), torch.tensor([[0, 1], [2, 3]] * 4))
    assert plots.per_class_image(two.compute("test"), "test") is not None
    assert plots.per_class_image({}, "test") is None


def test_a_readable_grid_scales_samples_up_and_writes_a_caption_under_each():
    images = torch.rand(6, 1, 28, 28)
    plain = readable_grid(images, 3)
    scale = READABLE // 28  # 3: 84 pixels a digit
    assert plain.shape == (3, 2 * (28 * scale + 2) + 2, 3 * (28 * scale + 2) + 2)
    assert torch.equal(plain[:, 2 : 2 + scale, 2 : 2 + scale], images[0, :, :1, :1].expand(3, scale, scale))
    captioned = readable_grid(images, 3, [f"{k} 0.9{k}" for k in range(6)], [True, False] * 3)
    assert captioned.shape == (3, 2 * (28 * scale + CAPTION + 2) + 2, plain.shape[2])
    strip = captioned[:, 2 + 28 * scale : 2 + 28 * scale + CAPTION, 2 : 2 + 28 * scale]
    white = (strip > 0.9).all(dim=0).sum()
    second = captioned[:, 2 + 28 * scale : 2 + 28 * scale + CAPTION, 4 + 28 * scale : 4 + 56 * scale]
    orange = ((second[0] > 0.9) & (second[2] < 0.3)).sum()
    assert white > 10 and orange > 10  # recognised in white, the other in orange


class _Votes(torch.nn.Module):
    """A stand-in classifier with CapsNet's output: class k for an image whose mean is k / 10."""

    def forward(self, x):
        k = (x.flatten(1).mean(1) * 10).round().long().clamp(0, 9)
        scores = torch.nn.functional.one_hot(k, 10).float() * 0.8 + 0.1
        return type("Out", (), {"scores": scores, "digit_caps": scores[:, :, None]})()


def test_the_judge_s_class_and_confidence_go_under_each_sample():
    """The class posterior of the capsule lengths (0.9 against nine of 0.1: odds 9 against 1/9, so
    9 / 10): a bare CapsNet's at temperature 1, a judge's at its calibrated temperature."""
    images = torch.stack([torch.full((1, 28, 28), k / 10) for k in (3, 7)])
    assert sampling.captions(_Votes(), images, 0.85) == (["3 0.90", "7 0.90"], [True, True])
    assert sampling.captions(_Votes(), images, 0.95)[1] == [False, False]
    shown = sampling.judged_grid(images, 2, _Votes())
    assert shown.shape[1] == 28 * 3 + CAPTION + 4  # one captioned row
    assert sampling.judged_grid(images, 2).shape[1] == 28 * 3 + 4  # no judge: no captions
    from capsrun.judge import Judge

    judge = Judge(_Votes(), images, torch.tensor([3, 7]), calibrate=False)
    judge.temperature = 0.5  # log-odds doubled: 81 against 8 x 1/81 -> 81 / (81 + 9 / 81)
    text, bright = sampling.captions(judge, images, 0.95)
    assert text == [f"3 {81 / (81 + 9 / 81):.2f}", f"7 {81 / (81 + 9 / 81):.2f}"] and bright == [True, True]
