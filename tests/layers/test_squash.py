"""Squash (Eq. 1 of arXiv:1710.09829) and the safe norm."""

from __future__ import annotations

import pytest
import torch

from capsrun.layers.squash import safe_norm, squash


def test_unit_vector_squashes_to_half():
    s = torch.tensor([0.6, 0.8, 0.0])
    v = squash(s)
    assert torch.linalg.norm(v).item() == pytest.approx(0.5, abs=1e-6)


@pytest.mark.parametrize("length", [0.01, 0.3, 1.0, 2.0, 5.0, 30.0])
def test_length_formula(length):
    """|squash(s)| = |s|^2 / (1 + |s|^2); the eps in the norm shifts very short vectors by ~eps/(2|s|^2)."""
    direction = torch.tensor([1.0, -2.0, 2.0], dtype=torch.float64) / 3.0  # unit vector
    s = length * direction
    expected = length**2 / (1.0 + length**2)
    assert torch.linalg.norm(squash(s)).item() == pytest.approx(expected, rel=1e-4)
    # with eps=0 the formula is exact
    assert torch.linalg.norm(squash(s, eps=0.0)).item() == pytest.approx(expected, rel=1e-12)


def test_direction_preserved_and_length_below_one():
    torch.manual_seed(0)
    s = torch.randn(5, 7, 4) * 3
    v = squash(s)
    cos = torch.nn.functional.cosine_similarity(v, s, dim=-1)
    torch.testing.assert_close(cos, torch.ones_like(cos))
    assert (torch.linalg.norm(v, dim=-1) < 1).all()
    assert v.shape == s.shape


def test_zero_vector_gives_zero_and_finite_grad():
    s = torch.zeros(2, 8, requires_grad=True)
    v = squash(s)
    assert torch.equal(v, torch.zeros(2, 8))
    v.sum().backward()
    assert torch.isfinite(s.grad).all()
    # the class-score path of CapsNet (length of a squashed zero capsule) also has finite grads
    s2 = torch.zeros(3, requires_grad=True)
    safe_norm(squash(s2)).backward()
    assert torch.isfinite(s2.grad).all()


def test_dim_argument_on_non_last_axis():
    """Squashing over axis 1 equals moving that axis last, squashing, and moving it back."""
    torch.manual_seed(1)
    s = torch.randn(3, 5, 4)
    v = squash(s, dim=1)
    expected = squash(s.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(v, expected)
    # and each column over dim 1 obeys the length formula
    n = torch.linalg.norm(s, dim=1)
    torch.testing.assert_close(torch.linalg.norm(v, dim=1), n**2 / (1 + n**2), rtol=1e-5, atol=1e-6)


def test_safe_norm_matches_linalg_norm():
    torch.manual_seed(2)
    s = torch.randn(4, 6, 8)
    torch.testing.assert_close(safe_norm(s), torch.linalg.norm(s, dim=-1))
    torch.testing.assert_close(safe_norm(s, dim=1), torch.linalg.norm(s, dim=1))
    torch.testing.assert_close(safe_norm(s, keepdim=True), torch.linalg.norm(s, dim=-1, keepdim=True))


def test_safe_norm_finite_grad_at_zero():
    s = torch.zeros(5, requires_grad=True)
    n = safe_norm(s)
    assert n.item() == pytest.approx(1e-4, rel=1e-3)  # sqrt(eps)
    n.backward()
    assert torch.isfinite(s.grad).all()
    assert torch.equal(s.grad, torch.zeros(5))
    # the hand-written sqrt(sum(s^2)) without eps is the NaN the eps prevents
    s0 = torch.zeros(5, requires_grad=True)
    torch.sqrt(s0.pow(2).sum()).backward()
    assert torch.isnan(s0.grad).all()
