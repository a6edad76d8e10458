"""Image grids and PNG files: what TensorBoard and ``capsrun sample`` show.

Our own small versions of torchvision's ``make_grid`` and ``save_image`` with the same layout
(2-pixel borders, one-channel images shown as grey RGB): importing ``torchvision.utils`` pulls in
``torch._dynamo`` and costs each ``capsrun`` process about 1.5 s on a 2-core CPU, more than the
rest of the imports together.
"""

from __future__ import annotations

import math
from typing import BinaryIO

import numpy as np
import torch


def tile(images: torch.Tensor, nrow: int, padding: int = 2, pad_value: float = 0.5) -> torch.Tensor:
    """``[N, C, H, W]`` -> one image ``[3, H', W']`` (C of 1 or 3) with ``nrow`` images per row,
    ``padding`` pixels of ``pad_value`` around each, H' = rows * (H + padding) + padding."""
    if images.dim() != 4 or images.shape[1] not in (1, 3) or len(images) == 0:
        raise ValueError(f"tile needs images [N, 1 or 3, H, W], got {list(images.shape)}")
    images = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
    n, _, h, w = images.shape
    cols = max(1, min(nrow, n))
    rows = math.ceil(n / cols)
    out = images.new_full((3, rows * (h + padding) + padding, cols * (w + padding) + padding), pad_value)
    for k in range(n):
        y, x = divmod(k, cols)
        top, left = y * (h + padding) + padding, x * (w + padding) + padding
        out[:, top : top + h, left : left + w] = images[k]
    return out


def write_png(image: torch.Tensor, f: BinaryIO) -> None:
    """An image ``[C, H, W]`` in [0, 1] (C of 1 or 3) as an 8-bit PNG to the binary file ``f``."""
    from PIL import Image  # Pillow comes with torchvision

    pixels = image.detach().float().cpu().clamp(0, 1).mul(255).add(0.5).to(torch.uint8)
    array = np.ascontiguousarray(pixels.permute(1, 2, 0).numpy())
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(f, format="png")


READABLE = 84  # pixels a sample is drawn at, at least (28-pixel digits: 3x)
CAPTION = 16  # pixels of the text strip under each captioned sample (13-pixel text)


def _caption(text: str, width: int, bright: bool) -> torch.Tensor:
    """``text`` centred on a dark strip ``[3, CAPTION, width]``: white when ``bright``, else orange."""
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=CAPTION - 3)
    except TypeError:  # Pillow before 10.1: its one bitmap font
        font = ImageFont.load_default()
    strip = Image.new("RGB", (width, CAPTION), (30, 30, 30))
    draw = ImageDraw.Draw(strip)
    left = max((width - draw.textlength(text, font=font)) / 2, 0)
    draw.text((left, 1), text, fill=(255, 255, 255) if bright else (255, 150, 40), font=font)
    return torch.from_numpy(np.asarray(strip).copy()).permute(2, 0, 1).float() / 255


def readable_grid(
    images: torch.Tensor, nrow: int, captions: list[str] | None = None, bright: list[bool] | None = None
) -> torch.Tensor:
    """:func:`tile` of ``images`` [N, C, H, W] in [0, 1], each scaled up (nearest pixel) to at
    least :data:`READABLE` pixels high, so that a grid of digits can be read in TensorBoard at its
    own size; with ``captions`` (one short text per image, e.g. a judge's class and confidence)
    written under each image, white where ``bright`` says (e.g. recognised), else orange."""
    images = images.detach().float().cpu().clamp(0, 1)
    images = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
    scale = max(1, math.ceil(READABLE / images.shape[-2]))
    big = images.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
    if captions is not None:
        flags = bright if bright is not None else [True] * len(captions)
        strips = torch.stack([_caption(t, big.shape[-1], b) for t, b in zip(captions, flags)])
        big = torch.cat([big, strips], dim=-2)
    return tile(big, nrow)
