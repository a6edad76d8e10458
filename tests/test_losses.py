"""Margin loss (Eq. 4 of arXiv:1710.09829), reconstruction loss and their combination."""

from __future__ import annotations

import pytest
import torch

from capsrun.losses import CapsNetLoss, margin_loss, reconstruction_loss
from capsrun.models.capsnet import CapsNetOutput

LENGTHS = torch.tensor([[0.95, 0.2, 0.05], [0.5, 0.6, 0.1]])
LABELS = torch.tensor([0, 1])
# By hand, m+ = 0.9, m- = 0.1, lambda = 0.5:
# example 0 (label 0): present  max(0, 0.9 - 0.95)^2           = 0
#                      absent   0.5 * max(0, 0.2 - 0.1)^2        = 0.5 * 0.01 = 0.005
#                      absent   0.5 * max(0, 0.05 - 0.1)^2       = 0
#                      sum                                       = 0.005
# example 1 (label 1): absent   0.5 * max(0, 0.5 - 0.1)^2        = 0.5 * 0.16 = 0.08
#                      present  max(0, 0.9 - 0.6)^2              = 0.09
#                      absent   0.5 * max(0, 0.1 - 0.1)^2        = 0
#                      sum                                       = 0.17
# mean over the batch: (0.005 + 0.17) / 2 = 0.0875
MARGIN = 0.0875

RECON = torch.tensor([[0.1, 0.2, 0.3, 0.4], [1.0, 1.0, 0.0, 0.0]]).view(2, 1, 2, 2)
IMAGES = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 1.0, 0.0]]).view(2, 1, 2, 2)
# per image: 0.01 + 0.04 + 0.09 + 0.16 = 0.30 and 0 + 1 + 1 + 0 = 2; mean = 1.15
RECON_LOSS = 1.15


def test_margin_loss_hand_computed():
    assert margin_loss(LENGTHS, LABELS).item() == pytest.approx(MARGIN, rel=1e-6)
    assert margin_loss(LENGTHS, LABELS, m_plus=0.9, m_minus=0.1, down_weight=0.5).item() == pytest.approx(MARGIN)


def test_margin_loss_parameters():
    # lambda = 1 doubles the absent terms: (0.01) and (0.16 + 0.09) -> (0.01 + 0.25) / 2 = 0.13
    assert margin_loss(LENGTHS, LABELS, down_weight=1.0).item() == pytest.approx(0.13, rel=1e-6)
    # m+ = 1.0: present terms (0.05^2 = 0.0025) and (0.4^2 = 0.16) -> (0.0075 + 0.24) / 2 = 0.12375
    assert margin_loss(LENGTHS, LABELS, m_plus=1.0).item() == pytest.approx(0.12375, rel=1e-6)


def test_one_hot_and_index_targets_agree():
    one_hot = torch.tensor([[1, 0, 0], [0, 1, 0]])
    assert margin_loss(LENGTHS, one_hot).item() == pytest.approx(MARGIN, rel=1e-6)
    assert margin_loss(LENGTHS, one_hot.float()).item() == pytest.approx(MARGIN, rel=1e-6)
    torch.manual_seed(0)
    lengths = torch.rand(6, 10)
    labels = torch.randint(0, 10, (6,))
    torch.testing.assert_close(
        margin_loss(lengths, labels), margin_loss(lengths, torch.nn.functional.one_hot(labels, 10))
    )


def test_multi_label_targets():
    """MultiMNIST: two classes present. Present: 0 and (0.9 - 0.85)^2 = 0.0025; absent: 0.5 * 0.2^2 = 0.02."""
    lengths = torch.tensor([[0.95, 0.85, 0.3]])
    targets = torch.tensor([[1, 1, 0]])
    assert margin_loss(lengths, targets).item() == pytest.approx(0.0225, rel=1e-6)


def test_perfect_predictions_give_zero():
    lengths = torch.tensor([[0.99, 0.05, 0.1], [0.0, 0.92, 0.02]])
    assert margin_loss(lengths, torch.tensor([0, 1])).item() == 0.0


def test_margin_loss_is_summed_over_classes_not_averaged():
    """One absent class at length 1 costs 0.5 * 0.81 whatever the number of classes."""
    for classes in (3, 10):
        lengths = torch.zeros(1, classes)
        lengths[0, 0] = 0.9
        lengths[0, 1] = 1.0
        assert margin_loss(lengths, torch.tensor([0])).item() == pytest.approx(0.405, rel=1e-6)


def test_reconstruction_loss_hand_computed():
    assert reconstruction_loss(RECON, IMAGES).item() == pytest.approx(RECON_LOSS, rel=1e-6)
    assert reconstruction_loss(IMAGES, IMAGES).item() == 0.0
    # the layout of the pixels does not matter, only the per-image sum
    assert reconstruction_loss(RECON.flatten(1), IMAGES.view(2, 4)).item() == pytest.approx(RECON_LOSS, rel=1e-6)


def _output(reconstruction):
    return CapsNetOutput(
        lengths=LENGTHS, digit_caps=torch.zeros(2, 3, 4), coupling=torch.zeros(2, 5, 3), reconstruction=reconstruction
    )


def test_capsnet_loss_total():
    losses = CapsNetLoss()(_output(RECON), IMAGES, LABELS)
    assert set(losses) == {"margin", "reconstruction", "total"}
    assert losses["margin"].item() == pytest.approx(MARGIN, rel=1e-6)
    assert losses["reconstruction"].item() == pytest.approx(RECON_LOSS, rel=1e-6)
    # 0.0875 + 0.0005 * 1.15 = 0.088075
    assert losses["total"].item() == pytest.approx(0.088075, rel=1e-6)


def test_capsnet_loss_without_reconstruction():
    losses = CapsNetLoss()(_output(None), IMAGES, LABELS)
    assert set(losses) == {"margin", "total"}
    assert losses["total"].item() == pytest.approx(MARGIN, rel=1e-6)


def test_capsnet_loss_weights():
    losses = CapsNetLoss(reconstruction_weight=0.0)(_output(RECON), IMAGES, LABELS)
    assert losses["reconstruction"].item() == pytest.approx(RECON_LOSS, rel=1e-6)  # still reported
    assert losses["total"].item() == pytest.approx(MARGIN, rel=1e-6)
    losses = CapsNetLoss(down_weight=1.0, reconstruction_weight=0.1)(_output(RECON), IMAGES, LABELS)
    assert losses["total"].item() == pytest.approx(0.13 + 0.1 * RECON_LOSS, rel=1e-6)


def test_capsnet_loss_gradient_flows_to_both_terms():
    lengths = LENGTHS.clone().requires_grad_(True)
    recon = RECON.clone().requires_grad_(True)
    out = CapsNetOutput(lengths, torch.zeros(2, 3, 4), torch.zeros(2, 5, 3), recon)
    CapsNetLoss()(out, IMAGES, LABELS)["total"].backward()
    # d/d recon of 0.0005 * mean_b sum (r - x)^2 = 0.0005 * 2 (r - x) / B
    torch.testing.assert_close(recon.grad, 0.0005 * (RECON - IMAGES))
    # d/d length of example 1, class 1 (present, 0.6): -2 (0.9 - 0.6) / 2 = -0.3
    assert lengths.grad[1, 1].item() == pytest.approx(-0.3, rel=1e-5)
