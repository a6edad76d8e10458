"""What the samplers need of an energy model, and the base-rate model they start from.

Inverse temperatures follow Salakhutdinov & Murray, "On the quantitative analysis of deep belief
networks", ICML 2008, Sec. 4.1: with visible biases ``base`` of the base-rate model,

    p_beta(v, h) ~ exp((1 - beta) base . v - beta E(v, h)),

so beta = 0 is the base-rate model with the hidden units uniform and beta = 1 the model; with
``base`` = 0, p_beta is the joint at temperature T = 1 / beta.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

Beta = float | torch.Tensor  # one inverse temperature, or one per row of the batch [B]


class EnergyChain(Protocol):
    """A binary-visible energy model whose hidden units are summed out in closed form (all but the
    latent variables its chains carry, if any).

    ``encode(v)``: what the free energy and the chain need of ``v`` [B, C, H, W] (its hidden
    inputs; a tensor or a tuple of tensors, one row per image). ``free_energy_at(v, enc, beta,
    base)``: -log sum_h p*_beta(v, h) [B]. ``transition(v, enc, beta, base, encode)``: one step of
    a chain that leaves p_beta invariant, ``(v', encode(v') or None, acceptance [B])``.
    ``log_base_partition(base)``: log Z of p_0, exact. ``beta`` is a float or one per row [B].
    ``chain_state(v, latent)``: what a chain starts from at ``v``; a model whose chains carry
    latent variables besides v (:func:`latent_of`) takes them as ``latent`` [B, ...] (None:
    drawn as at beta = 0), and its ``transition`` keeps them in the state it returns, even with
    ``encode`` False."""

    image_shape: tuple[int, ...]

    def encode(self, v: torch.Tensor) -> Any: ...

    def chain_state(self, v: torch.Tensor, latent: torch.Tensor | None = None) -> Any: ...

    def free_energy_at(
        self, v: torch.Tensor, enc: Any, beta: Beta = 1.0, base: torch.Tensor | None = None
    ) -> torch.Tensor: ...

    def transition(
        self, v: torch.Tensor, enc: Any, beta: Beta = 1.0, base: torch.Tensor | None = None, encode: bool = True
    ) -> tuple[torch.Tensor, Any, torch.Tensor]: ...

    def log_base_partition(self, base: torch.Tensor) -> torch.Tensor: ...


def base_rate(v: torch.Tensor) -> torch.Tensor:
    """The base-rate model's visible biases ``[C*H*W]``: logit of each pixel's mean over the binary
    images ``v`` [N, C, H, W], smoothed as (sum + 1/2) / (N + 1) (a pixel never on stays finite)."""
    p = (v.flatten(1).double().sum(0) + 0.5) / (len(v) + 1)
    return torch.logit(p).float()


def take(enc: Any, rows: torch.Tensor) -> Any:
    """The rows ``rows`` of an :meth:`EnergyChain.encode` output: a tensor [B, ...] or a tuple of
    them (None entries stay None); a tensor expanded along its rows (stride 0: every row the same)
    stays expanded."""
    if enc is None:
        return None
    if isinstance(enc, torch.Tensor):
        return enc[: len(rows)] if enc.stride(0) == 0 else enc.index_select(0, rows)
    return type(enc)(*(take(x, rows) for x in enc))


def latent_of(enc: Any) -> torch.Tensor | None:
    """The latent part of a chain's state (``enc.latent``: e.g. the capsule RBM's routes
    [B, P * G]); None for a model whose chain state is v alone."""
    return getattr(enc, "latent", None)
