"""Routing-by-agreement between two capsule layers.

Sabour, Frosst, Hinton, "Dynamic Routing Between Capsules", arXiv:1710.09829, Procedure 1
(Eq. 2-3), plus the "leaky" none-of-the-above routing of the authors' code (used for CIFAR10).
Pure functions: no parameters, no logging. The couplings are returned so diagnostics can read them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from capsrun.layers.squash import squash


class RoutingResult(NamedTuple):
    """``v``: parent capsules ``[batch, out_caps, dim]``; ``coupling``: the coefficients c_ij of
    the last iteration ``[batch, in_caps, out_caps]``; ``logits``: b_ij that produced them;
    ``s``: the parents' total input before the squash (Eq. 2), ``[batch, out_caps, dim]``."""

    v: torch.Tensor
    coupling: torch.Tensor
    logits: torch.Tensor
    s: torch.Tensor


def coupling_coefficients(logits: torch.Tensor, leaky: bool = False) -> torch.Tensor:
    """Eq. 3: softmax of the routing logits over the PARENTS (last axis).

    ``logits``: ``[batch, in_caps, out_caps]``. Each child's couplings sum to 1. With ``leaky``
    a zero logit for an extra "none of the above" parent is appended before the softmax and its
    column dropped afterwards, so a child's couplings to the real parents sum to less than 1.
    """
    if not leaky:
        return torch.softmax(logits, dim=-1)
    leak = torch.zeros_like(logits[..., :1])
    return torch.softmax(torch.cat([logits, leak], dim=-1), dim=-1)[..., :-1]


def dynamic_routing(
    u_hat: torch.Tensor,
    iterations: int = 3,
    bias: torch.Tensor | None = None,
    leaky: bool = False,
    detach_inner: bool = False,
) -> RoutingResult:
    """Procedure 1 of arXiv:1710.09829.

    Args:
        u_hat: votes u_hat_{j|i} = W_ij u_i, ``[batch, in_caps, out_caps, dim]``.
        iterations: r >= 1. One iteration gives uniform couplings (all logits start at 0).
        bias: optional per-parent bias ``[out_caps, dim]`` added to s_j before the squash
            (the authors' code; not in the paper's text).
        leaky: none-of-the-above routing, see :func:`coupling_coefficients`.
        detach_inner: stop gradients through the votes in all but the last iteration (what many
            public ports do); the authors' code lets gradients flow through every iteration.

    The logits b_ij start at zero for every example on every call: they are not learned state.
    The agreement update after the last iteration is skipped since nothing would read it.
    """
    if iterations < 1:
        raise ValueError(f"routing iterations must be >= 1, got {iterations}")
    batch, in_caps, out_caps, _ = u_hat.shape
    logits = u_hat.new_zeros(batch, in_caps, out_caps)
    u_inner = u_hat.detach() if detach_inner else u_hat
    for it in range(iterations):
        last = it == iterations - 1
        votes = u_hat if last else u_inner
        coupling = coupling_coefficients(logits, leaky)
        # s_j = sum_i c_ij u_hat_{j|i}: one batched contraction over the children
        s = torch.einsum("bij,bijd->bjd", coupling, votes)
        if bias is not None:
            s = s + bias
        v = squash(s)
        if not last:
            # agreement a_ij = u_hat_{j|i} . v_j
            logits = logits + torch.einsum("bijd,bjd->bij", votes, v)
    return RoutingResult(v=v, coupling=coupling, logits=logits, s=s)
