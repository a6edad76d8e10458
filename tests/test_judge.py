"""The judge of unconditional samples: the class posterior of capsule lengths and what it reports."""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch

from capsrun.judge import (
    Judge,
    class_posterior,
    classifier_outputs,
    frechet_floor,
    judge_temperature,
    unconditional_quality,
)


def test_class_posterior_is_the_odds_given_exactly_one_class():
    lengths = torch.tensor([[0.85, 0.05, 0.05], [0.5, 0.5, 0.0]])
    post = class_posterior(lengths)
    odds = torch.tensor([0.85 / 0.15, 0.05 / 0.95, 0.05 / 0.95])
    torch.testing.assert_close(post[0], odds / odds.sum())
    torch.testing.assert_close(post[1], torch.tensor([0.5, 0.5, 0.0]))
    torch.testing.assert_close(post.sum(-1), torch.ones(2))
    assert float(class_posterior(torch.tensor([[1.0, 0.0]]))[0, 0]) == pytest.approx(1.0)


class _Out(NamedTuple):
    scores: torch.Tensor
    digit_caps: torch.Tensor


class _Judge(torch.nn.Module):
    """Class k = the brightest of k fixed pixels; its length says how bright the image is."""

    def forward(self, x):
        flat = x.flatten(1)
        lengths = torch.full((len(x), 3), 0.05)
        k = flat[:, :3].argmax(1)
        lengths[torch.arange(len(x)), k] = flat[:, :3].max(1).values * 0.99
        return _Out(lengths, lengths.unsqueeze(-1).repeat(1, 1, 2))


def test_unconditional_quality_counts_confident_samples_and_the_class_histogram():
    judge = _Judge()
    samples = torch.zeros(4, 1, 2, 2)
    samples[0, 0, 0, 0] = 1.0  # class 0, length 0.99: confident
    samples[1, 0, 0, 1] = 1.0  # class 1, confident
    samples[2, 0, 0, 1] = 1.0  # class 1, confident
    samples[3, 0, 1, 0] = 0.3  # class 2, length 0.297: not
    real = torch.zeros(2, 1, 2, 2)
    real[0, 0, 0, 0] = 1.0
    real[1, 0, 1, 0] = 0.2
    _, real_features, real_conf = classifier_outputs(judge, real)
    m = unconditional_quality(judge, samples, (real_features, real_conf), 3, confidence=0.9)
    assert m["samples/recognised"] == 75.0 and m["samples/recognised_real"] == 50.0
    assert [m[f"samples/class_share/{k}"] for k in range(3)] == [25.0, 50.0, 25.0]
    same = unconditional_quality(judge, real.repeat(2, 1, 1, 1), (real_features, real_conf), 3)
    assert same["samples/frechet_distance"] < m["samples/frechet_distance"]


def test_temperature_scaling_divides_the_log_odds():
    lengths = torch.tensor([[0.9, 0.1, 0.1]])
    post = class_posterior(lengths, temperature=0.5)
    logits = torch.logit(lengths) / 0.5
    torch.testing.assert_close(post, torch.softmax(logits, -1))
    assert float(post[0, 0]) > float(class_posterior(lengths)[0, 0])  # T < 1 sharpens


def test_judge_temperature_recovers_the_temperature_that_made_the_labels():
    """Labels drawn from softmax(log-odds / 0.4): the fitted temperature is about 0.4, and the
    calibrated posterior's mean confidence matches its accuracy."""
    gen = torch.Generator().manual_seed(0)
    lengths = torch.rand(20000, 5, generator=gen) * 0.98 + 0.01
    true_t = 0.4
    labels = torch.multinomial(class_posterior(lengths, true_t), 1, generator=gen).squeeze(1)
    t = judge_temperature(lengths, labels)
    assert t == pytest.approx(true_t, rel=0.05)
    conf, pred = class_posterior(lengths, t).max(-1)
    assert float(conf.mean()) == pytest.approx(float((pred == labels).float().mean()), abs=0.01)


def test_a_calibrated_judge_passes_confidently_right_real_images():
    """A judge whose raw posterior stays at about 0.5 but is always right: calibrated, it
    recognises the real images (and samples like them); raw, it recognises none; both are logged."""

    class Timid(torch.nn.Module):
        def forward(self, x):
            k = x.flatten(1)[:, :3].argmax(1)
            lengths = torch.full((len(x), 3), 0.3)
            lengths[torch.arange(len(x)), k] = 0.7
            return _Out(lengths, lengths.unsqueeze(-1).repeat(1, 1, 2))

    real = torch.zeros(30, 1, 2, 2)
    labels = torch.arange(30) % 3
    real.view(30, 4)[torch.arange(30), labels] = 1.0
    calibrated = Judge(Timid(), real, labels)
    raw = Judge(Timid(), real, labels, calibrate=False)
    assert calibrated.temperature < 0.2 and raw.temperature == 1.0
    m = calibrated.quality(real[:9], 3)
    assert m["samples/recognised"] == 100.0 and m["samples/recognised_real"] == 100.0
    assert m["samples/recognised_uncalibrated"] == 0.0
    assert raw.quality(real[:9], 3)["samples/recognised"] == 0.0


def test_the_frechet_floor_of_a_held_out_set_as_large_as_the_samples_is_hand_computed():
    """1-D features: the distance is (mu_a - mu_b)^2 + (sd_a - sd_b)^2. Reference {0, 2}: mean 1,
    variance 2; held out {0, 2, 0, 2} drawn whole (n = M): mean 1, variance 4/3, every draw alike."""
    reference = torch.tensor([[0.0], [2.0]])
    held_out = torch.tensor([[0.0], [2.0], [0.0], [2.0]])
    mean, std = frechet_floor(reference, held_out, n=4)
    assert mean == pytest.approx((2**0.5 - (4 / 3) ** 0.5) ** 2, abs=1e-9)
    assert std == pytest.approx(0.0, abs=1e-9)


def test_the_frechet_floor_falls_with_the_number_of_images():
    """Reference and held-out features from the same Gaussian: the distance is pure small-sample
    bias, larger for 30 images than for 300 (about 1/n: Chong & Forsyth, arXiv:1911.07023)."""
    gen = torch.Generator().manual_seed(0)
    reference, held_out = torch.randn(4000, 8, generator=gen), torch.randn(2000, 8, generator=gen)
    small, small_std = frechet_floor(reference, held_out, n=30)
    large, large_std = frechet_floor(reference, held_out, n=300)
    assert large < small / 4 and small_std > 0 and large_std > 0
    with pytest.raises(ValueError, match="needs 2 <= n <= 2000"):
        frechet_floor(reference, held_out, n=2001)


def test_the_judge_reports_real_images_frechet_distance_at_the_samples_number():
    judge = _Judge()
    gen = torch.Generator().manual_seed(1)
    real = torch.rand(40, 1, 2, 2, generator=gen)
    labels = real.flatten(1)[:, :3].argmax(1)
    held_out = torch.rand(12, 1, 2, 2, generator=gen)
    found = Judge(judge, real, labels, held_out=held_out)
    m = found.quality(held_out[:5], 3)
    floor, spread = frechet_floor(found.features, found.held_out_features, 5)
    assert m["samples/frechet_distance_real"] == pytest.approx(floor)
    assert m["samples/frechet_distance_real_std"] == pytest.approx(spread)
    assert "samples/frechet_distance_real" not in found.quality(torch.rand(13, 1, 2, 2, generator=gen), 3)
    assert "samples/frechet_distance_real" not in Judge(judge, real, labels).quality(held_out[:5], 3)


def test_weighted_classes_sum_the_weights_of_each_predicted_class():
    """Four samples as in the histogram test, weighted 0.1, 0.2, 0.3, 0.4: class 0 holds 10 %,
    class 1 50 %, class 2 40 %; the confident three hold 60 % of the weight."""
    samples = torch.zeros(4, 1, 2, 2)
    samples[0, 0, 0, 0] = 1.0
    samples[1, 0, 0, 1] = 1.0
    samples[2, 0, 0, 1] = 1.0
    samples[3, 0, 1, 0] = 0.3
    real = torch.eye(3).repeat(4, 1).view(-1, 3)
    real = torch.cat([real, torch.zeros(len(real), 1)], 1).view(-1, 1, 2, 2)
    judge = Judge(_Judge(), real, real.flatten(1)[:, :3].argmax(1), calibrate=False)
    mix = judge.weighted_classes(samples, torch.tensor([0.1, 0.2, 0.3, 0.4]), 3)
    assert [mix[str(k)] for k in range(3)] == pytest.approx([10.0, 50.0, 40.0])
    assert mix["recognised"] == pytest.approx(60.0)
    even = judge.weighted_classes(samples, torch.full((4,), 0.25), 3)
    assert [even[str(k)] for k in range(3)] == pytest.approx([25.0, 50.0, 25.0])  # the plain histogram
