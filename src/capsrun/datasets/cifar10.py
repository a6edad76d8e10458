"""CIFAR10 (Krizhevsky, "Learning Multiple Layers of Features from Tiny Images", 2009) from its
"python version" pickle batches, and the CIFAR10 recipe of arXiv:1710.09829 Sec. 7 as batched
tensor functions.

The files live where torchvision keeps them: ``<root>/cifar-10-batches-py/data_batch_1..5`` and
``test_batch`` (``batches.meta`` is not read: :data:`CLASSES` holds its label names). The download
is the official ``cifar-10-python.tar.gz``, checked against its published MD5 by torchvision's
downloader and extracted into ``<root>``. Protocol: the standard 50,000 / 10,000 split, uint8 pixels
returned as stored (the loader scales to [0, 1]).

Recipe (paper Sec. 7 and the authors' code, ``input_data/cifar10/cifar10_input.py``): train on a
random 24x24 crop, random horizontal flip, random brightness then random contrast, then
per-image standardisation; test on the central 24x24 crop, then per-image standardisation. The
jitter ranges (brightness delta up to 63 of 255 grey levels, contrast factor in [0.2, 1.8]) are
from the authors' code (TensorFlow's cifar10 tutorial pipeline), not from the paper's text:
unconfirmed, hence arguments. Deliberate deviation: the draws come from an explicit
``torch.Generator`` and are made per image for a whole batch at once, so a run is reproducible.

The batches are pickles, and unpickling an arbitrary pickle can run code, so they are read with a
restricted unpickler (:class:`_BatchUnpickler`) that admits only what the official files hold: a dict
of a numpy uint8 array, lists, ints and strings. Anything else (a crafted file naming ``os.system``,
say) is refused by name before any of it is built.
"""

from __future__ import annotations

import math
import os
import pickle
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from capsrun.errors import DatasetError, brief, resolved_root, unreadable

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
MD5 = "c58f30108f718f92721af3b95e74349a"
ARCHIVE = "cifar-10-python.tar.gz"
FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCHES = ("test_batch",)
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_FIX = f"delete it, then extract {ARCHIVE} again or set data.download=true"


# --- files ------------------------------------------------------------------------------------


def _field(entry: dict, key: str):
    """The real files (Python 2 pickles) give str keys under ``encoding='latin1'``; Python 3
    re-pickles of them give bytes keys. Accept both."""
    for k in (key, key.encode()):
        if k in entry:
            return entry[k]
    raise KeyError(key)


class _BatchUnpickler(pickle.Unpickler):
    """Admits only the globals a CIFAR10 batch needs: numpy's array reconstruction (under numpy 1
    and 2 module names) and ``_codecs.encode``, which Python 3 protocol-2 pickles use for bytes."""

    ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),
        }
    )

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise _Refused(f"{module}.{name}")
        return super().find_class(module, name)


class _Refused(pickle.UnpicklingError):
    """A global that no CIFAR10 batch holds."""


def read_batch(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """One pickle batch as ``(images uint8 [n, 3, 32, 32], labels int64 [n])``.

    A row of ``data`` is 3072 bytes: the red, green and blue 32x32 planes, each row-major.
    Raises :class:`DatasetError` naming the file when it is unreadable, truncated or malformed.
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            entry = _BatchUnpickler(f, encoding="latin1").load()
    except _Refused as e:
        raise DatasetError(
            f"cifar10: {path} names {e}, which no CIFAR10 batch holds; refused without loading it "
            f"(a crafted pickle can run code); {_FIX}"
        ) from None
    except OSError as e:
        raise DatasetError("cifar10: " + unreadable(path, e, _FIX)) from None
    except Exception as e:  # a cut or damaged pickle fails in many ways: EOFError, UnpicklingError, ...
        raise DatasetError(f"cifar10: {path} is truncated or corrupt ({type(e).__name__}); {_FIX}") from None
    if not isinstance(entry, dict):
        raise DatasetError(f"cifar10: {path} is not a CIFAR10 batch (it holds a {type(entry).__name__}); {_FIX}")
    try:
        data, labels = np.asarray(_field(entry, "data")), np.asarray(_field(entry, "labels"))
    except KeyError as e:
        raise DatasetError(f"cifar10: {path} is not a CIFAR10 batch (no {e} entry); {_FIX}") from None
    except (TypeError, ValueError) as e:  # ragged or non-numeric entries
        raise DatasetError(f"cifar10: {path} is not a CIFAR10 batch ({brief(e)}); {_FIX}") from None
    if (
        data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != 3 * 32 * 32
        or labels.ndim != 1
        or len(labels) != len(data)
        or not np.issubdtype(labels.dtype, np.integer)
    ):
        raise DatasetError(
            f"cifar10: {path} is not a CIFAR10 batch: data {data.shape} {data.dtype}, labels {labels.shape} "
            f"{labels.dtype}, expected data [N, 3072] uint8 and N integer labels; {_FIX}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= len(CLASSES)):
        raise DatasetError(f"cifar10: {path} has labels outside 0..{len(CLASSES) - 1}; {_FIX}")
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return images, torch.from_numpy(labels.astype(np.int64))


def _download(root: Path, url: str, md5: str | None) -> None:
    """Fetch and MD5-check the archive into ``root``, extract it beside, move the batches into
    place. Whatever fails is removed: no half-written archive or folder is left behind."""
    from torchvision.datasets.utils import check_md5, download_url, extract_archive

    archive = root / ARCHIVE
    folder = root / FOLDER
    try:
        download_url(url, str(root), filename=ARCHIVE, md5=md5)
    except Exception as e:  # network errors come in many types
        reason = brief(e)
        if md5 and archive.is_file() and not check_md5(str(archive), md5):
            reason = f"MD5 of the file is not {md5}"
        archive.unlink(missing_ok=True)  # never leave a file that failed its checksum
        raise DatasetError(
            f"could not download {ARCHIVE} for cifar10 from {url} ({reason}); with no network, "
            f"extract {ARCHIVE} into {root} so that {folder} holds {', '.join(TRAIN_BATCHES + TEST_BATCHES)}"
        ) from None
    # extract into a scratch folder inside root, then rename: an interrupted extraction leaves nothing
    scratch = Path(tempfile.mkdtemp(prefix=".cifar10-extract-", dir=root))
    try:
        extract_archive(str(archive), str(scratch))
        if not (scratch / FOLDER).is_dir():
            archive.unlink(missing_ok=True)
            raise DatasetError(
                f"cifar10: {url} holds no {FOLDER}/ folder; check the URL, or extract the batches by hand"
            )
        folder.mkdir(exist_ok=True)
        for f in (scratch / FOLDER).iterdir():
            os.replace(f, folder / f.name)
    except DatasetError:
        raise
    except Exception as e:
        archive.unlink(missing_ok=True)
        raise DatasetError(
            f"cifar10: cannot extract {archive} ({brief(e)}); deleted it, set data.download=true to retry"
        ) from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def load_cifar10_split(
    root: str | Path, train: bool, download: bool, *, url: str = URL, md5: str | None = MD5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[N, 3, 32, 32]`` uint8 and labels ``[N]`` int64 of one split (N = 50,000 / 10,000).

    Batches are read from ``<root>/cifar-10-batches-py/`` in file order. Missing batches are
    downloaded (``url``, MD5-checked against ``md5``) when ``download`` is true; otherwise, and
    when the download fails, a :class:`DatasetError` says where the files must go.
    """
    root = resolved_root(root)
    folder = root / FOLDER
    names = TRAIN_BATCHES if train else TEST_BATCHES
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        if not download:
            raise DatasetError(
                f"cifar10: {', '.join(missing)} not found in {folder}; extract {ARCHIVE} ({URL}) into {root}, "
                "or set data.download=true"
            )
        root.mkdir(parents=True, exist_ok=True)
        _download(root, url, md5)
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise DatasetError(f"cifar10: {url} did not provide {', '.join(missing)}; extract the batches by hand")
    batches = [read_batch(folder / n) for n in names]
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


# --- the paper's recipe, batched --------------------------------------------------------------


def _draw(gen: torch.Generator, like: torch.Tensor, fn, *args, **kwargs) -> torch.Tensor:
    """Random numbers from ``gen`` on the generator's device, then moved to ``like``'s."""
    return fn(*args, generator=gen, device=gen.device, **kwargs).to(like.device)


def crop(x: torch.Tensor, offsets: torch.Tensor, size: int) -> torch.Tensor:
    """Per-image square crop. ``x``: ``[B, C, H, W]``; ``offsets``: ``[B, 2]`` integers (top, left)
    with ``0 <= top <= H - size`` and ``0 <= left <= W - size``; returns ``[B, C, size, size]``."""
    b, c = x.shape[:2]
    span = torch.arange(size, device=x.device)
    rows = offsets[:, 0:1].to(x.device) + span  # [B, size]
    cols = offsets[:, 1:2].to(x.device) + span
    batch_idx = torch.arange(b, device=x.device)[:, None, None, None]
    chan_idx = torch.arange(c, device=x.device)[None, :, None, None]
    return x[batch_idx, chan_idx, rows[:, None, :, None], cols[:, None, None, :]]


def random_crop(x: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """A uniformly placed ``size`` x ``size`` crop of each image (``tf.random_crop``).

    ``x``: ``[B, C, H, W]``; returns ``[B, C, size, size]``. Draws, in this order,
    ``top = torch.randint(0, H - size + 1, (B,), generator=gen)`` and the same for ``left``
    over ``W``, on ``gen``'s device.
    """
    b, _, h, w = x.shape
    if size > h or size > w:
        raise ValueError(f"crop size {size} exceeds the image size {h}x{w}")
    top = _draw(gen, x, torch.randint, 0, h - size + 1, (b,))
    left = _draw(gen, x, torch.randint, 0, w - size + 1, (b,))
    return crop(x, torch.stack([top, left], dim=1), size)


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """The central ``size`` x ``size`` window (``tf.image.resize_image_with_crop_or_pad`` when
    cropping: offset ``(H - size) // 2``). ``x``: ``[B, C, H, W]``; returns ``[B, C, size, size]``."""
    h, w = x.shape[-2:]
    if size > h or size > w:
        raise ValueError(f"crop size {size} exceeds the image size {h}x{w}")
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top : top + size, left : left + size]


def random_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mirror each image left-right with probability 0.5 (``tf.image.random_flip_left_right``).

    ``x``: ``[B, C, H, W]``; returns ``[B, C, H, W]``. Image ``i`` is flipped where
    ``torch.rand(B, generator=gen)[i] < 0.5``.
    """
    flip = _draw(gen, x, torch.rand, x.shape[0]) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def brightness_contrast_jitter(
    x: torch.Tensor,
    gen: torch.Generator,
    max_brightness: float = 63 / 255,
    contrast: tuple[float, float] = (0.2, 1.8),
) -> torch.Tensor:
    """Random brightness, then random contrast, per image (``tf.image.random_brightness`` with
    ``max_delta=63`` on 0..255 pixels, then ``tf.image.random_contrast(lower=0.2, upper=1.8)``).

    ``x``: ``[B, C, H, W]`` float in [0, 1]; returns ``[B, C, H, W]``, not clipped (as TF's float
    path; per-image standardisation follows). Per image, ``delta ~ U[-max_brightness,
    max_brightness)`` is added to every pixel, then each channel's deviations from its spatial
    mean are scaled by ``factor ~ U[contrast[0], contrast[1])``. Both are drawn as
    ``u = torch.rand(2, B, generator=gen)``: ``delta = (2 u[0] - 1) max_brightness``,
    ``factor = lo + u[1] (hi - lo)``. Default ranges: the authors' code, unconfirmed.
    """
    lo, hi = contrast
    if max_brightness < 0 or lo < 0 or hi < lo:
        raise ValueError(
            f"need max_brightness >= 0 and 0 <= contrast[0] <= contrast[1], got {max_brightness}, {contrast}"
        )
    u = _draw(gen, x, torch.rand, 2, x.shape[0]).to(x.dtype)
    delta = ((2 * u[0] - 1) * max_brightness)[:, None, None, None]
    factor = (lo + u[1] * (hi - lo))[:, None, None, None]
    x = x + delta
    mean = x.mean(dim=(-2, -1), keepdim=True)
    return (x - mean) * factor + mean


def per_image_standardization(x: torch.Tensor) -> torch.Tensor:
    """``tf.image.per_image_standardization``: ``(x - mean) / max(std, 1 / sqrt(C H W))`` with the
    mean and (population) std over each whole image. The floor keeps a constant image finite (it
    maps to zeros). ``x``: ``[B, C, H, W]`` float; returns ``[B, C, H, W]``."""
    dims = tuple(range(1, x.dim()))
    mean = x.mean(dim=dims, keepdim=True)
    std = x.std(dim=dims, keepdim=True, correction=0)
    return (x - mean) / std.clamp_min(1 / math.sqrt(x[0].numel() if len(x) else 1))


def train_transform(x: torch.Tensor, gen: torch.Generator, size: int = 24) -> torch.Tensor:
    """The training recipe in the authors' order: random crop, flip, brightness/contrast jitter,
    per-image standardisation. ``x``: ``[B, 3, 32, 32]`` float in [0, 1]; returns ``[B, 3, size, size]``."""
    x = random_flip(random_crop(x, size, gen), gen)
    return per_image_standardization(brightness_contrast_jitter(x, gen))


def eval_transform(x: torch.Tensor, size: int = 24) -> torch.Tensor:
    """The test recipe: central crop, per-image standardisation. ``x``: ``[B, 3, 32, 32]`` float in
    [0, 1]; returns ``[B, 3, size, size]``."""
    return per_image_standardization(center_crop(x, size))
