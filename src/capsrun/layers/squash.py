"""Squash non-linearity and a safe vector norm.

Sabour, Frosst, Hinton, "Dynamic Routing Between Capsules", arXiv:1710.09829, Eq. 1.
"""

from __future__ import annotations

import torch


def safe_norm(s: torch.Tensor, dim: int = -1, eps: float = 1e-8, keepdim: bool = False) -> torch.Tensor:
    """Euclidean norm with ``eps`` inside the square root.

    ``torch.linalg.norm`` has an infinite gradient at the zero vector; the eps keeps the
    gradient finite (the zero-norm NaN is the most reported bug in public CapsNet ports).
    """
    return torch.sqrt(s.pow(2).sum(dim=dim, keepdim=keepdim) + eps)


def squash(s: torch.Tensor, dim: int = -1, eps: float = 1e-8) -> torch.Tensor:
    """Eq. 1: ``v = |s|^2 / (1 + |s|^2) * s / |s|``.

    Shrinks short vectors to almost zero and long ones to just below unit length, keeping
    the direction. ``s``: any shape, capsule dimension at ``dim``; returns the same shape.
    A zero vector maps to zero with finite gradients.
    """
    sq = s.pow(2).sum(dim=dim, keepdim=True)
    norm = torch.sqrt(sq + eps)
    return (sq / (1.0 + sq)) * (s / norm)
