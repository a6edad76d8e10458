"""CapsNet architecture of arXiv:1710.09829 Sec. 4: parameter counts, shapes, masking, votes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from capsrun.layers import PrimaryCaps, RoutedCaps
from capsrun.layers.routing import RoutingResult
from capsrun.layers.squash import squash
from capsrun.models.capsnet import CapsNet

TINY = {"conv1_channels": 16, "primary_types": 4, "digit_dim": 8, "decoder_hidden": (32, 64)}


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def paper_model() -> CapsNet:
    torch.manual_seed(0)
    return CapsNet(capsule_bias=False)


@pytest.fixture
def tiny() -> CapsNet:
    torch.manual_seed(0)
    return CapsNet(**TINY).eval()


def _images(batch: int = 3, size: int = 28, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 1, size, size, generator=torch.Generator().manual_seed(seed))


def test_paper_parameter_count_without_capsule_bias(paper_model):
    assert _count(paper_model) == 8_215_568


def test_paper_parameter_count_with_capsule_bias():
    model = CapsNet(capsule_bias=True)
    assert _count(model) == 8_215_728
    assert model.digit_caps.bias.shape == (10, 16)
    assert torch.all(model.digit_caps.bias == 0.1)


def test_paper_sub_counts(paper_model):
    assert _count(paper_model.conv1) == 20_992
    assert _count(paper_model.primary_caps) == 5_308_672
    assert paper_model.digit_caps.weight.numel() == 1_474_560
    assert paper_model.digit_caps.weight.shape == (1152, 8, 160)
    assert paper_model.digit_caps.bias is None
    assert _count(paper_model.decoder) == 1_411_344
    assert paper_model.num_primary_caps == 1152
    # "6.8M without the decoder"
    assert _count(paper_model) - _count(paper_model.decoder) == 6_804_224


def test_no_decoder():
    model = CapsNet(capsule_bias=False, decoder_hidden=None)
    assert model.decoder is None
    assert _count(model) == 8_215_568 - 1_411_344
    tiny = CapsNet(**{**TINY, "decoder_hidden": None})
    assert tiny(_images(2)).reconstruction is None


def test_multimnist_shapes():
    """36x36 input: 10x10x32 = 3200 primary capsules, 1296-pixel decoder output, 11.36M parameters."""
    model = CapsNet(image_size=36, capsule_bias=False)
    assert model.num_primary_caps == 3200
    assert model.digit_caps.weight.shape == (3200, 8, 160)
    assert model.decoder.net[-1].out_features == 1296
    # 20,992 + 5,308,672 + 3200*8*160 + (160*512+512 + 512*1024+1024 + 1024*1296+1296)
    assert _count(model) == 11_361_808
    small = CapsNet(image_size=36, **TINY)
    assert small.num_primary_caps == 4 * 10 * 10
    out = small(_images(2, size=36))
    assert out.reconstruction.shape == (2, 1, 36, 36)
    assert out.coupling.shape == (2, 400, 10)


def test_forward_shapes(tiny):
    x = _images(3)
    assert tiny.num_primary_caps == 4 * 6 * 6
    out = tiny(x, torch.tensor([1, 2, 3]))
    assert out.lengths.shape == (3, 10)
    assert out.digit_caps.shape == (3, 10, 8)
    assert out.coupling.shape == (3, tiny.num_primary_caps, 10)
    assert out.reconstruction.shape == (3, 1, 28, 28)
    assert ((out.reconstruction > 0) & (out.reconstruction < 1)).all()
    # lengths are the norms of the digit capsules, all below 1; couplings sum to 1 over the classes
    torch.testing.assert_close(out.lengths, out.digit_caps.norm(dim=-1))
    assert (out.lengths < 1).all()
    torch.testing.assert_close(out.coupling.sum(-1), torch.ones(3, tiny.num_primary_caps))


def test_decoder_uses_only_the_masked_capsule(tiny):
    torch.manual_seed(1)
    caps = torch.randn(2, 10, 8)
    mask = F.one_hot(torch.tensor([3, 7]), 10)
    base = tiny.decoder(caps, mask)
    other = caps.clone()
    other[0, :3] += 5.0
    other[0, 4:] -= 3.0
    other[1, :7] = torch.randn(7, 8)
    torch.testing.assert_close(tiny.decoder(other, mask), base)
    changed = caps.clone()
    changed[0, 3] += 1.0
    assert not torch.allclose(tiny.decoder(changed, mask)[0], base[0])
    torch.testing.assert_close(tiny.decoder(changed, mask)[1], base[1])


def test_reconstruction_with_labels_uses_label_capsule(tiny):
    """Perturb every digit capsule except the label's (forward hook on digit_caps): the
    reconstruction does not move, while the class lengths do."""
    x = _images(2, seed=1)
    labels = torch.tensor([4, 9])
    ref = tiny(x, labels)
    keep = F.one_hot(labels, 10).unsqueeze(-1).float()

    def perturb(module, inputs, result: RoutingResult) -> RoutingResult:
        return result._replace(v=result.v * keep + (1 - keep) * (result.v + 0.3))

    handle = tiny.digit_caps.register_forward_hook(perturb)
    try:
        out = tiny(x, labels)
    finally:
        handle.remove()
    torch.testing.assert_close(out.reconstruction, ref.reconstruction)
    assert not torch.allclose(out.lengths, ref.lengths)
    torch.testing.assert_close(ref.reconstruction, tiny.decoder(ref.digit_caps, F.one_hot(labels, 10)))


def test_two_labels_give_two_reconstructions(tiny):
    """MultiMNIST (Sec. 6): labels [B, 2] decode once per label, each masked to its own capsule."""
    x = _images(2, seed=2)
    labels = torch.tensor([[0, 5], [3, 1]])
    out = tiny(x, labels)
    assert out.reconstruction.shape == (2, 2, 1, 28, 28)
    torch.testing.assert_close(out.reconstruction[:, 0], tiny(x, labels[:, 0]).reconstruction)
    torch.testing.assert_close(out.reconstruction[:, 1], tiny(x, labels[:, 1]).reconstruction)
    assert not torch.allclose(out.reconstruction[:, 0], out.reconstruction[:, 1])


def test_without_labels_masks_longest_capsule(tiny):
    x = _images(4, seed=3)
    out = tiny(x)
    predicted = out.lengths.argmax(-1)
    torch.testing.assert_close(out.reconstruction, tiny(x, predicted).reconstruction)
    wrong = (predicted + 1) % 10
    assert not torch.allclose(out.reconstruction, tiny(x, wrong).reconstruction)


def test_backward_gives_finite_grads_for_all_parameters(tiny):
    tiny.train()
    out = tiny(_images(2, seed=4), torch.tensor([2, 8]))
    (out.lengths.sum() + out.reconstruction.pow(2).sum()).backward()
    for name, p in tiny.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_zero_image_gives_finite_grads():
    """An all-black image with zeroed conv biases gives zero primary capsules: the safe norm matters."""
    torch.manual_seed(0)
    model = CapsNet(**TINY, capsule_bias=False)
    with torch.no_grad():
        model.conv1.bias.zero_()
        model.primary_caps.conv.bias.zero_()
    out = model(torch.zeros(1, 1, 28, 28), torch.tensor([0]))
    assert torch.all(out.digit_caps == 0)
    (out.lengths.sum() + out.reconstruction.sum()).backward()
    for name, p in model.named_parameters():  # every parameter, the decoder's too
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_routed_caps_votes_match_einsum():
    torch.manual_seed(2)
    layer = RoutedCaps(in_caps=5, in_dim=3, out_caps=4, out_dim=2)
    u = torch.randn(6, 5, 3)
    votes = layer.votes(u)
    assert votes.shape == (6, 5, 4, 2)
    w = layer.weight.view(5, 3, 4, 2)  # [in_caps, in_dim, out_caps, out_dim]
    torch.testing.assert_close(votes, torch.einsum("bid,idjk->bijk", u, w))
    # explicit loop: u_hat_{j|i} = W_ij u_i with W_ij = weight[i, :, j*D:(j+1)*D]
    for b in (0, 5):
        for i in range(5):
            for j in range(4):
                w_ij = layer.weight[i, :, j * 2 : (j + 1) * 2]
                torch.testing.assert_close(votes[b, i, j], u[b, i] @ w_ij)


def test_routed_caps_forward_is_routing_of_votes():
    torch.manual_seed(3)
    layer = RoutedCaps(in_caps=5, in_dim=3, out_caps=4, out_dim=2, iterations=1)
    u = torch.randn(2, 5, 3)
    res = layer(u)
    torch.testing.assert_close(res.v, squash(layer.votes(u).sum(1) / 4 + layer.bias))
    assert layer.bias.shape == (4, 2)


def test_primary_caps_layout():
    """Capsule (type t, row r, column c) is channels t*dim..(t+1)*dim-1 at (r, c), squashed."""
    torch.manual_seed(4)
    layer = PrimaryCaps(in_channels=2, num_types=3, dim=4, kernel_size=3, stride=2)
    x = torch.randn(2, 2, 9, 9)
    u = layer(x)
    raw = layer.conv(x)  # [2, 12, 4, 4]
    assert u.shape == (2, 3 * 4 * 4, 4)
    for t, r, c in [(0, 0, 0), (1, 2, 3), (2, 3, 1)]:
        idx = t * 16 + r * 4 + c
        torch.testing.assert_close(u[:, idx], squash(raw[:, t * 4 : (t + 1) * 4, r, c]))


@pytest.mark.parametrize("size", [16, 10, 5])
def test_image_too_small_raises(size):
    with pytest.raises(ValueError, match="too small"):
        CapsNet(image_size=size, **TINY)


def test_smallest_valid_image():
    """17 -> conv1 9x9 -> 9 -> primary 9x9 stride 2 -> 1x1."""
    model = CapsNet(image_size=17, **TINY)
    assert model.num_primary_caps == 4
    assert model(_images(1, size=17)).reconstruction.shape == (1, 1, 17, 17)


def test_cifar10_geometry():
    """24x24 RGB crops, SAME padding (4 for a 9x9 kernel), 64 types: 12x12x64 = 9216 primary capsules."""
    torch.manual_seed(5)
    model = CapsNet(
        in_channels=3,
        image_size=24,
        conv1_channels=8,
        primary_types=64,
        padding=4,
        digit_dim=4,
        routing_leaky=True,
        decoder_hidden=None,
    )
    assert model.num_primary_caps == 9216
    with torch.no_grad():
        out = model(torch.rand(2, 3, 24, 24))
    assert out.coupling.shape == (2, 9216, 10)
    assert (out.coupling.sum(-1) < 1).all()  # leaky routing
    assert out.reconstruction is None
