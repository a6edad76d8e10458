"""The judge of unconditional samples: the class posterior of capsule lengths and what it reports."""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch

from capsrun import sampling


def test_class_posterior_is_the_odds_given_exactly_one_class():
    lengths = torch.tensor([[0.85, 0.05, 0.05], [0.5, 0.5, 0.0]])
    post = sampling.class_posterior(lengths)
    odds = torch.tensor([0.85 / 0.15, 0.05 / 0.95, 0.05 / 0.95])
    torch.testing.assert_close(post[0], odds / odds.sum())
    torch.testing.assert_close(post[1], torch.tensor([0.5, 0.5, 0.0]))
    torch.testing.assert_close(post.sum(-1), torch.ones(2))
    assert float(sampling.class_posterior(torch.tensor([[1.0, 0.0]]))[0, 0]) == pytest.approx(1.0)


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
    _, real_features, real_conf = sampling.classifier_outputs(judge, real)
    m = sampling.unconditional_quality(judge, samples, (real_features, real_conf), 3, confidence=0.9)
    assert m["samples/recognised"] == 75.0 and m["samples/recognised_real"] == 50.0
    assert [m[f"samples/class_share/{k}"] for k in range(3)] == [25.0, 50.0, 25.0]
    same = sampling.unconditional_quality(judge, real.repeat(2, 1, 1, 1), (real_features, real_conf), 3)
    assert same["samples/frechet_distance"] < m["samples/frechet_distance"]
