"""Routing-by-agreement (Procedure 1 of arXiv:1710.09829) and leaky routing."""

from __future__ import annotations

import math

import pytest
import torch

from capsrun.layers.routing import RoutingResult, coupling_coefficients, dynamic_routing
from capsrun.layers.squash import squash


def _u_hat(batch=2, in_caps=5, out_caps=3, dim=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, in_caps, out_caps, dim, generator=g, dtype=dtype)


def _manual_routing(u_hat: torch.Tensor, iterations: int) -> tuple[list, list]:
    """Procedure 1 written out with explicit Python loops on floats (no eps, no vectorisation).

    Returns (v[b][j][d], c[b][i][j]) of the last iteration.
    """
    batch, n_in, n_out, dim = u_hat.shape
    u = u_hat.tolist()
    v_all, c_all = [], []
    for b in range(batch):
        logits = [[0.0] * n_out for _ in range(n_in)]
        for r in range(iterations):
            # c_i = softmax_j(b_i)
            c = []
            for i in range(n_in):
                exps = [math.exp(logits[i][j]) for j in range(n_out)]
                total = sum(exps)
                c.append([e / total for e in exps])
            # s_j = sum_i c_ij u_hat_{j|i};  v_j = squash(s_j)
            v = []
            for j in range(n_out):
                s = [sum(c[i][j] * u[b][i][j][d] for i in range(n_in)) for d in range(dim)]
                sq = sum(x * x for x in s)
                norm = math.sqrt(sq)
                v.append([sq / (1 + sq) * x / norm for x in s])
            # b_ij += u_hat_{j|i} . v_j, except after the last iteration
            if r < iterations - 1:
                for i in range(n_in):
                    for j in range(n_out):
                        logits[i][j] += sum(u[b][i][j][d] * v[j][d] for d in range(dim))
        v_all.append(v)
        c_all.append(c)
    return v_all, c_all


def test_result_shapes():
    u_hat = _u_hat(batch=2, in_caps=5, out_caps=3, dim=4)
    res = dynamic_routing(u_hat, iterations=3)
    assert isinstance(res, RoutingResult)
    assert res.v.shape == (2, 3, 4)
    assert res.coupling.shape == (2, 5, 3)
    assert res.logits.shape == (2, 5, 3)


@pytest.mark.parametrize("iterations", [1, 2, 3, 5])
def test_couplings_of_each_child_sum_to_one_over_parents(iterations):
    """The softmax is over the parents (last axis), not over the children."""
    u_hat = _u_hat(batch=3, in_caps=6, out_caps=4, dim=5, seed=iterations)
    res = dynamic_routing(u_hat, iterations=iterations)
    torch.testing.assert_close(res.coupling.sum(-1), torch.ones(3, 6, dtype=u_hat.dtype))
    # the returned logits are the ones that produced the returned couplings
    torch.testing.assert_close(res.coupling, torch.softmax(res.logits, dim=-1))
    if iterations > 1:
        # over the children they do not sum to 1 (catches a softmax over the wrong axis)
        assert not torch.allclose(res.coupling.sum(1), torch.ones(3, 4, dtype=u_hat.dtype))


def test_one_iteration_uniform_couplings():
    u_hat = _u_hat(batch=2, in_caps=5, out_caps=3, dim=4)
    res = dynamic_routing(u_hat, iterations=1)
    torch.testing.assert_close(res.coupling, torch.full((2, 5, 3), 1 / 3, dtype=u_hat.dtype))
    torch.testing.assert_close(res.logits, torch.zeros(2, 5, 3, dtype=u_hat.dtype))
    # s_j = sum_i (1/J) u_hat_{j|i}
    torch.testing.assert_close(res.s, u_hat.sum(1) / 3)
    torch.testing.assert_close(res.v, squash(u_hat.sum(1) / 3))


def test_agreement_raises_coupling_of_agreeing_parent():
    """All children vote the same vector for parent 0; for parents 1 and 2 the votes come in
    opposite pairs (r, -r), so those parents see no agreement and parent 0 wins every child."""
    torch.manual_seed(0)
    n_in, n_out, dim = 6, 3, 4
    u_hat = torch.zeros(1, n_in, n_out, dim, dtype=torch.float64)
    u_hat[0, :, 0] = torch.tensor([1.5, 0.0, 0.5, 0.0], dtype=torch.float64)
    r = torch.randn(n_in // 2, n_out - 1, dim, dtype=torch.float64) * 2
    u_hat[0, 0::2, 1:] = r
    u_hat[0, 1::2, 1:] = -r
    res = dynamic_routing(u_hat, iterations=3)
    assert (res.coupling[0, :, 0] > 1 / n_out + 0.05).all()
    assert (res.coupling[0, :, 1:] < 1 / n_out).all()
    # the agreeing parent is long, the conflicting ones have zero length
    lengths = res.v.norm(dim=-1)[0]
    assert lengths[0] > 0.5
    assert lengths[1:].max() < 1e-6


def test_agreement_with_random_conflicting_votes():
    """Same idea with independent random votes for the other parents: on average parent 0 wins."""
    g = torch.Generator().manual_seed(3)
    n_in, n_out, dim = 32, 4, 8
    u_hat = torch.randn(2, n_in, n_out, dim, generator=g, dtype=torch.float64) * 0.5
    u_hat[:, :, 0] = torch.linspace(-1, 1, dim, dtype=torch.float64)  # unanimous vote
    one = dynamic_routing(u_hat, iterations=1)
    three = dynamic_routing(u_hat, iterations=3)
    assert (three.coupling[..., 0] > 1 / n_out).all()
    assert three.coupling[..., 0].mean() > 1.5 / n_out
    # routing makes the agreeing parent longer than uniform couplings do
    assert (three.v[:, 0].norm(dim=-1) > one.v[:, 0].norm(dim=-1)).all()


@pytest.mark.parametrize("iterations", [1, 2, 3])
def test_matches_hand_written_procedure(iterations):
    u_hat = _u_hat(batch=2, in_caps=3, out_caps=2, dim=2, seed=7)
    res = dynamic_routing(u_hat, iterations=iterations)
    v, c = _manual_routing(u_hat, iterations)
    torch.testing.assert_close(res.v, torch.tensor(v, dtype=torch.float64), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(res.coupling, torch.tensor(c, dtype=torch.float64), rtol=1e-6, atol=1e-7)


def test_two_iterations_tiny_numbers():
    """A 1-example, 2-child, 2-parent, 1-D case small enough to check on paper.

    Iteration 1: c = 1/2 everywhere; s_0 = (1 + 1)/2 = 1 -> v_0 = 1/2; s_1 = (2 - 2)/2 = 0 -> v_1 = 0.
    Agreement: b_i0 = u_i0 * v_0 = 0.5 for both children; b_i1 = 0.
    Iteration 2: c_i0 = e^0.5/(e^0.5 + 1), s_0 = 2 c_i0, v_0 = s_0^2/(1+s_0^2) (s_0 > 0); s_1 = 0.
    """
    u_hat = torch.tensor([[[[1.0], [2.0]], [[1.0], [-2.0]]]], dtype=torch.float64)
    res = dynamic_routing(u_hat, iterations=2)
    c0 = math.exp(0.5) / (math.exp(0.5) + 1)
    s0 = 2 * c0
    assert res.coupling[0, :, 0].tolist() == pytest.approx([c0, c0])
    assert res.coupling[0, :, 1].tolist() == pytest.approx([1 - c0, 1 - c0])
    assert res.logits[0].flatten().tolist() == pytest.approx([0.5, 0.0, 0.5, 0.0])
    assert res.v[0, 0, 0].item() == pytest.approx(s0**2 / (1 + s0**2), rel=1e-7)
    assert res.v[0, 1, 0].item() == pytest.approx(0.0, abs=1e-12)


def test_leaky_couplings():
    logits = _u_hat(batch=2, in_caps=5, out_caps=3, dim=1, seed=4)[..., 0]
    c = coupling_coefficients(logits, leaky=True)
    assert c.shape == logits.shape
    assert (c.sum(-1) < 1).all()
    full = torch.softmax(torch.cat([logits, torch.zeros(2, 5, 1, dtype=logits.dtype)], dim=-1), dim=-1)
    torch.testing.assert_close(c, full[..., :-1])
    torch.testing.assert_close(c.sum(-1), 1 - full[..., -1])
    # the not-leaky variant is the plain softmax
    torch.testing.assert_close(coupling_coefficients(logits), torch.softmax(logits, dim=-1))


def test_leaky_routing():
    u_hat = _u_hat(batch=2, in_caps=5, out_caps=3, dim=4, seed=5)
    one = dynamic_routing(u_hat, iterations=1, leaky=True)
    torch.testing.assert_close(one.coupling, torch.full((2, 5, 3), 1 / 4, dtype=u_hat.dtype))
    torch.testing.assert_close(one.v, squash(u_hat.sum(1) / 4))
    res = dynamic_routing(u_hat, iterations=3, leaky=True)
    assert (res.coupling.sum(-1) < 1).all()
    expected = torch.softmax(torch.cat([res.logits, torch.zeros_like(res.logits[..., :1])], -1), -1)[..., :-1]
    torch.testing.assert_close(res.coupling, expected)


def test_detach_inner_same_forward_different_gradients():
    u_hat = _u_hat(batch=2, in_caps=5, out_caps=3, dim=4, seed=6)
    a = u_hat.clone().requires_grad_(True)
    b = u_hat.clone().requires_grad_(True)
    ra = dynamic_routing(a, iterations=3, detach_inner=False)
    rb = dynamic_routing(b, iterations=3, detach_inner=True)
    torch.testing.assert_close(ra.v, rb.v)
    torch.testing.assert_close(ra.coupling, rb.coupling)
    weights = torch.linspace(-1, 1, 4, dtype=u_hat.dtype)
    (ra.v * weights).sum().backward()
    (rb.v * weights).sum().backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
    assert (a.grad - b.grad).abs().max() > 1e-4


def test_detach_inner_irrelevant_for_one_iteration():
    u_hat = _u_hat(seed=8)
    a = u_hat.clone().requires_grad_(True)
    b = u_hat.clone().requires_grad_(True)
    dynamic_routing(a, iterations=1, detach_inner=False).v.sum().backward()
    dynamic_routing(b, iterations=1, detach_inner=True).v.sum().backward()
    torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("iterations", [0, -1])
def test_iterations_below_one_raise(iterations):
    with pytest.raises(ValueError, match="iterations"):
        dynamic_routing(_u_hat(), iterations=iterations)


def test_bias_added_before_squash():
    u_hat = _u_hat(batch=2, in_caps=5, out_caps=3, dim=4, seed=9)
    bias = torch.linspace(-0.5, 0.5, 12, dtype=u_hat.dtype).view(3, 4)
    res = dynamic_routing(u_hat, iterations=1, bias=bias)
    torch.testing.assert_close(res.v, squash(u_hat.sum(1) / 3 + bias))
    # not squash(...) + bias
    assert not torch.allclose(res.v, squash(u_hat.sum(1) / 3) + bias)


def test_logits_start_at_zero_every_call():
    """b_ij is not state: two calls on the same votes give the same result."""
    u_hat = _u_hat(seed=10)
    r1 = dynamic_routing(u_hat, iterations=3)
    r2 = dynamic_routing(u_hat, iterations=3)
    assert torch.equal(r1.v, r2.v) and torch.equal(r1.coupling, r2.coupling)
    # and each example is routed independently of the others in the batch
    r_single = dynamic_routing(u_hat[1:2], iterations=3)
    torch.testing.assert_close(r_single.v, r1.v[1:2])
