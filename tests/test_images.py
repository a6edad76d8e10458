"""Image grids and PNG files (capsrun.images) against hand-placed pixels, and the chains' fast
element-wise helpers against torch's own: the Bernoulli draw against torch.bernoulli, softplus
against float64."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from capsrun.images import tile, write_png
from capsrun.models.energy import bernoulli, softplus


def test_tile_places_each_image_in_its_cell_with_two_pixel_borders():
    images = torch.arange(1, 4, dtype=torch.float32).view(3, 1, 1, 1).expand(3, 1, 2, 3) / 10  # 0.1, 0.2, 0.3
    out = tile(images, nrow=2)
    assert out.shape == (3, 2 * (2 + 2) + 2, 2 * (3 + 2) + 2)  # 2 rows of 2 cells, 2 px around each
    assert torch.equal(out[:, 2:4, 2:5], torch.full((3, 2, 3), 0.1))  # first cell, grey as RGB
    assert torch.equal(out[:, 2:4, 7:10], torch.full((3, 2, 3), 0.2))
    assert torch.equal(out[:, 6:8, 2:5], torch.full((3, 2, 3), 0.3))  # second row
    assert torch.equal(out[:, 6:8, 7:10], torch.full((3, 2, 3), 0.5))  # the empty cell: padding
    assert float(out[:, :2].sum()) == pytest.approx(0.5 * 3 * 2 * 12)  # top border all padding


def test_tile_keeps_colour_and_refuses_what_is_not_a_batch_of_images():
    rgb = torch.rand(2, 3, 4, 4)
    out = tile(rgb, nrow=5)  # fewer images than a row: one row of 2
    assert out.shape == (3, 8, 14) and torch.equal(out[:, 2:6, 8:12], rgb[1])
    with pytest.raises(ValueError, match="tile needs"):
        tile(torch.rand(2, 2, 4, 4), nrow=2)


def test_png_holds_the_8_bit_pixels():
    image = torch.tensor([0.0, 0.5, 1.0, 2.0]).view(1, 1, 4).expand(3, 2, 4)  # 2.0 is clipped
    f = io.BytesIO()
    write_png(image, f)
    f.seek(0)
    pixels = np.array(Image.open(f))
    assert pixels.shape == (2, 4, 3) and pixels[0, :, 0].tolist() == [0, 128, 255, 255]
    grey = io.BytesIO()
    write_png(image[:1], grey)
    grey.seek(0)
    assert np.array(Image.open(grey)).tolist() == [[0, 128, 255, 255]] * 2


def test_fast_bernoulli_draws_what_torch_bernoulli_draws():
    p = torch.rand(300, 50, dtype=torch.float64)
    torch.manual_seed(5)
    expected = torch.bernoulli(p)
    torch.manual_seed(5)
    drawn = bernoulli(p)
    assert drawn.dtype == p.dtype and torch.equal(drawn, expected)
    assert float(bernoulli(torch.full((20000,), 0.3)).mean()) == pytest.approx(0.3, abs=0.015)


def test_fast_softplus_is_log_1_plus_e_to_the_x_to_float32_accuracy():
    assert float(softplus(torch.zeros(()))) == pytest.approx(math.log(2), abs=1e-7)
    assert softplus(torch.tensor([100.0, -100.0])).tolist() == [100.0, 0.0]  # no overflow to inf
    x = torch.linspace(-30, 30, 20001)
    exact = torch.log1p(torch.exp(x.double()))
    error = (softplus(x).double() - exact).abs()
    # the same absolute error as torch's own float32 softplus (about one ulp of values near 1)
    assert float(error.max()) < 1.5e-6
    assert float(error.max()) < 3 * float((torch.nn.functional.softplus(x).double() - exact).abs().max())


def test_softplus_where_a_gradient_flows_is_torch_s_with_its_derivative():
    x = torch.tensor([-2.0, 0.0, 3.0], requires_grad=True)
    softplus(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.sigmoid(x.detach()))  # 1/2 at 0, where max(x, 0) has a kink
    assert x.grad[1] == 0.5
