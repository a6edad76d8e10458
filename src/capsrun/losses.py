"""Losses of arXiv:1710.09829 (Sabour, Frosst, Hinton 2017) and the objective that combines them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def margin_loss(
    lengths: torch.Tensor,
    targets: torch.Tensor,
    m_plus: float = 0.9,
    m_minus: float = 0.1,
    down_weight: float = 0.5,
) -> torch.Tensor:
    """Eq. 4: ``L_k = T_k max(0, m+ - |v_k|)^2 + lambda (1 - T_k) max(0, |v_k| - m-)^2``.

    ``lengths``: capsule lengths ``[batch, classes]``; ``targets``: T_k, ``[batch, classes]`` in
    {0, 1} (two ones for MultiMNIST) or class indices ``[batch]``. Summed over classes,
    mean over the batch. (The authors' code halves it and averages over classes instead.)
    Computed in fp32 whatever the input dtype (bf16 autocast).
    """
    lengths = lengths.float()
    if targets.dim() == 1:
        targets = F.one_hot(targets, lengths.shape[-1])
    t = targets.to(lengths.dtype)
    present = t * F.relu(m_plus - lengths).pow(2)
    absent = down_weight * (1.0 - t) * F.relu(lengths - m_minus).pow(2)
    return (present + absent).sum(dim=-1).mean()


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag(exp(logvar))) || N(0, I)) in closed form, summed over the last axis.

    ``0.5 * sum_d (mu^2 + sigma^2 - log sigma^2 - 1)``: the presence measure of a variational
    capsule (Huang et al., arXiv:1807.04099; see :mod:`capsrun.models.vcaps`). ``mu``, ``logvar``:
    ``[..., dim]`` -> ``[...]`` in nats, >= 0, zero exactly at the prior.
    """
    return 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1.0).sum(dim=-1)


def kl_margin_loss(
    kl: torch.Tensor,
    targets: torch.Tensor,
    m_present: float = 0.5,
    m_absent: float = 4.0,
    down_weight: float = 0.5,
) -> torch.Tensor:
    """``L_k = T_k max(0, KL_k - m_present)^2 + lambda (1 - T_k) max(0, m_absent - KL_k)^2``.

    Eq. 4 of arXiv:1710.09829 turned around for KL (capsrun design for arXiv:1807.04099, whose
    text we could not read): a present entity's capsule must stay within ``m_present`` nats of
    the prior, an absent one at least ``m_absent`` nats away. ``kl``: ``[batch, classes]``;
    ``targets``: ``[batch, classes]`` in {0, 1} or class indices ``[batch]``. Summed over classes,
    mean over the batch, like :func:`margin_loss`.
    """
    if targets.dim() == 1:
        targets = F.one_hot(targets, kl.shape[-1])
    t = targets.to(kl.dtype)
    present = t * F.relu(kl - m_present).pow(2)
    absent = down_weight * (1.0 - t) * F.relu(m_absent - kl).pow(2)
    return (present + absent).sum(dim=-1).mean()


def multi_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class indices ``[batch, k]`` -> 0/1 targets ``[batch, classes]`` with k ones (MultiMNIST)."""
    return F.one_hot(labels, num_classes).amax(dim=1)


def reconstruction_loss(reconstruction: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Sum of squared pixel errors per image, mean over the batch (Sec. 4.1; unweighted here).

    ``reconstruction``, ``images``: ``[batch, ...]`` of equal size, pixels in [0, 1]. For k
    reconstructions per image (``[batch, k, C, H, W]``, MultiMNIST) the k sums are added, which
    weights each by the same factor as in Sec. 6. Computed in fp32 whatever the input dtype.
    """
    diff = reconstruction.flatten(1).float() - images.flatten(1).float()
    return diff.pow(2).sum(dim=1).mean()


class CapsNetLoss(nn.Module):
    """Margin loss plus ``reconstruction_weight`` x reconstruction loss (0.0005 in the paper).

    Returns a dict of scalar tensors: ``margin``, ``reconstruction`` (when the model decodes)
    and ``total``, the names used for the TensorBoard tags ``train/loss/<name>``. ``labels``:
    ``[B]`` class indices, or ``[B, k]`` for k objects per image (both positive in the margin
    loss); ``images``: the reconstruction target, ``[B, k, C, H, W]`` for k labels.
    """

    def __init__(
        self,
        m_plus: float = 0.9,
        m_minus: float = 0.1,
        down_weight: float = 0.5,
        reconstruction_weight: float = 0.0005,
    ):
        super().__init__()
        self.m_plus, self.m_minus, self.down_weight = m_plus, m_minus, down_weight
        self.reconstruction_weight = reconstruction_weight

    def forward(self, output, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        targets = labels if labels.dim() == 1 else multi_hot(labels, output.lengths.shape[-1])
        losses = {"margin": margin_loss(output.lengths, targets, self.m_plus, self.m_minus, self.down_weight)}
        total = losses["margin"]
        if output.reconstruction is not None:
            losses["reconstruction"] = reconstruction_loss(output.reconstruction, images)
            if self.reconstruction_weight:
                total = total + self.reconstruction_weight * losses["reconstruction"]
        losses["total"] = total
        return losses
