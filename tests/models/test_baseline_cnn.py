"""Baseline CNNs of arXiv:1710.09829 Secs. 5 and 6: exact parameter counts, shapes, the objective."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from capsrun.models.baseline_cnn import BaselineCNN, BaselineCNNMulti, CNNOutput, CrossEntropyObjective

SMALL = {"channels": (8, 8, 4), "hidden": (16, 8)}


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _images(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 1, size, size, generator=torch.Generator().manual_seed(seed))


def test_mnist_parameter_count():
    # meta tensors: the count without spending time initialising 35M weights
    with torch.device("meta"):
        model = BaselineCNN()
    assert _count(model) == 35_445_522
    convs = [m for m in model.features if isinstance(m, torch.nn.Conv2d)]
    assert [_count(m) for m in convs] == [6_656, 1_638_656, 819_328]
    fcs = [m for m in model.classifier if isinstance(m, torch.nn.Linear)]
    assert [_count(m) for m in fcs] == [32_915_784, 63_168, 1_930]


def test_multimnist_parameter_count():
    with torch.device("meta"):
        model = BaselineCNNMulti()
    assert _count(model) == 24_563_978  # the spec's 24.56M
    convs = [m for m in model.features if isinstance(m, torch.nn.Conv2d)]
    assert [_count(m) for m in convs] == [41_984, 3_277_056]
    fcs = [m for m in model.classifier if isinstance(m, torch.nn.Linear)]
    assert [_count(m) for m in fcs] == [21_234_688, 10_250]


def test_mnist_forward_shape():
    torch.manual_seed(0)
    model = BaselineCNN().eval()
    with torch.no_grad():
        out = model(_images(2, 28), torch.tensor([3, 4]))
    assert isinstance(out, CNNOutput)
    assert out.logits.shape == (2, 10) and out.scores is out.logits
    assert torch.isfinite(out.logits).all()


def test_multimnist_forward_shape_and_pooled_size():
    torch.manual_seed(0)
    model = BaselineCNNMulti().eval()
    with torch.no_grad():
        features = model.features(_images(2, 36))
        out = model(_images(2, 36))
    assert features.shape == (2, 256, 9, 9)  # 36 -> pool 18 -> pool 9, SAME convs keep the size
    assert out.logits.shape == (2, 10)


def test_same_padding_keeps_spatial_size():
    model = BaselineCNN(**SMALL)
    assert model.features(_images(3, 28)).shape == (3, 4, 28, 28)
    with pytest.raises(ValueError, match="odd kernel"):
        BaselineCNN(kernel=4)


def test_sizes_itself_from_the_input():
    model = BaselineCNN(in_channels=3, image_size=32, num_classes=7, **SMALL).eval()
    assert model(torch.rand(2, 3, 32, 32)).logits.shape == (2, 7)
    assert model.classifier[0].in_features == 4 * 32 * 32


def test_dropout_only_in_training():
    torch.manual_seed(0)
    model = BaselineCNN(**SMALL, dropout=0.5)
    x = _images(4, 28)
    model.eval()
    assert torch.equal(model(x).logits, model(x).logits)
    model.train()
    torch.manual_seed(1)
    a = model(x).logits
    torch.manual_seed(2)
    assert not torch.equal(a, model(x).logits)


def test_objective_softmax_cross_entropy():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 0.0, 3.0]])
    labels = torch.tensor([0, 1])
    losses = CrossEntropyObjective()(CNNOutput(logits), torch.zeros(2, 1, 28, 28), labels)
    # by hand: -log softmax at the label, mean over the batch
    by_hand = -(logits.log_softmax(-1)[[0, 1], labels]).mean()
    assert losses["cross_entropy"] == pytest.approx(by_hand.item())
    assert losses["cross_entropy"] == pytest.approx(F.cross_entropy(logits, labels).item())
    assert losses["total"] is losses["cross_entropy"]


def test_objective_sigmoid_cross_entropy_for_two_labels():
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0], [0.0, 1.0, -3.0, 4.0]])
    targets = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 1]])
    labels = torch.tensor([[0, 2], [3, 1]])  # the engine passes the two classes of each image
    losses = CrossEntropyObjective()(CNNOutput(logits), torch.zeros(2, 1, 36, 36), labels)
    p = torch.sigmoid(logits)
    t = targets.float()
    by_hand = -(t * p.log() + (1 - t) * (1 - p).log()).sum(1).mean()
    assert losses["total"] == pytest.approx(by_hand.item(), rel=1e-6)
    per_class = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
    assert losses["cross_entropy"] == pytest.approx(per_class.sum(1).mean().item())


@pytest.fixture
def one_thread():
    """Steps this small cost less than waking a second OpenMP thread; on a loaded 2-core machine
    two threads made each step ~100x slower (spinning), so run them on one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_objective_gradients_reach_every_layer(one_thread):
    """Every parameter gets a gradient, and a small step along it lowers the loss, for both label
    forms. (No torch.optim: the first optimizer imports torch._dynamo, over a second on its own.)"""
    torch.manual_seed(0)
    model = BaselineCNN(image_size=8, channels=(4, 4, 4), hidden=(32, 16), dropout=0.0)
    objective = CrossEntropyObjective()
    x = _images(8, 8)
    for labels in (torch.arange(8) % 10, torch.stack([torch.arange(8), 9 - torch.arange(8)], 1)):
        params = list(model.parameters())
        loss = objective(model(x, labels), x, labels)["total"]
        grads = torch.autograd.grad(loss, params)
        assert all(g.abs().sum() > 0 for g in grads)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p -= 0.05 * g
        assert objective(model(x, labels), x, labels)["total"] < loss
