"""affNIST (Tieleman, https://www.cs.toronto.edu/~tijmen/affNIST/): the test set of the
affine-generalisation experiment of arXiv:1710.09829 Sec. 5.2, and the helpers for its training set.

Protocol: train on MNIST placed on a 40x40 black canvas at a random integer shift of -6..6 pixels
in each direction (the authors' code; here :func:`pad_to_canvas`, then the training
``BatchLoader(max_shift=6)`` shifts each padded image anew every epoch), test on the 320,000
affNIST test images (32 random small affine transforms of each MNIST test digit). Published:
CapsNet 79% accuracy, CNN 66%.

Files, under ``<root>/affNIST/`` (the first found is used): ``test.mat``, or ``test.mat.zip``
(``32x/transformed/test.mat.zip``, read without extracting), or ``test_batches/1.mat .. 32.mat``
(every numbered batch present, in numeric order). Each is a MATLAB v5 file holding a struct
``affNISTdata`` with ``image`` (uint8, 1600 x N), ``label_int`` (1 x N) and ``label_one_of_n``
(10 x N, not read). The download is ``test.mat.zip``; no MD5 of it is published (none is
known to us), so it is verified by structure instead: the zip's CRC, an ``affNISTdata`` struct,
1600-pixel images, labels in 0..9. A download that fails any check is deleted.

Orientation: each column of ``image`` is one 40x40 image. Deliberate deviation from our spec, which
assumed MATLAB's column-major order: we read the 1600 values row by row (``column.reshape(40, 40)``
is upright), because that is what public loaders do, and one of them trained on upright MNIST and
scored 70.4% on ``test.mat`` read this way (ruslangrimov/capsnet-with-capsulewise-convolution,
affNIST_test_capsnet.ipynb), which a transposed test set would not allow. Not checked against the
real file here; ``pixel_order="column"`` reads column-major, and a real-data test checks that the
ones come out upright.
"""

from __future__ import annotations

import io
import re
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from capsrun.errors import DatasetError, brief, resolved_root, unreadable

URL = "https://www.cs.toronto.edu/~tijmen/affNIST/32x/transformed/test.mat.zip"
FOLDER = "affNIST"
SIZE = 40
TRAIN_MAX_SHIFT = 6  # the authors' code: every integer shift in -6..6 of MNIST on the 40x40 canvas
_EXPECTED = "test.mat, test.mat.zip or test_batches/1.mat..32.mat"


def _loadmat(source, name: str) -> dict:
    try:
        from scipy.io import loadmat
    except ImportError:
        raise DatasetError("affnist: reading .mat files needs scipy; pip install scipy") from None
    try:
        return loadmat(source)
    except OSError as e:
        raise DatasetError("affnist: " + unreadable(name, e, "check the file and the disk")) from None
    except Exception as e:  # a cut or damaged .mat fails in many ways (ValueError, TypeError, zlib.error ...)
        raise DatasetError(
            f"affnist: cannot read {name} ({brief(e)}); it is truncated or not a MATLAB file: "
            f"delete it and download it again ({URL})"
        ) from None


def _parse(mat: dict, name: str, pixel_order: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``affNISTdata`` struct of a loaded .mat as ``(images uint8 [N, 1, 40, 40], labels int64 [N])``."""
    fix = f"replace it with the original affNIST file ({URL})"
    s = mat.get("affNISTdata")
    if not isinstance(s, np.ndarray) or s.dtype.names is None or s.size != 1:
        found = ", ".join(k for k in mat if not k.startswith("__")) or "nothing"
        raise DatasetError(f"affnist: {name} holds no affNISTdata struct (it holds {found}); {fix}")
    s = s.reshape(-1)[0]
    missing = [f for f in ("image", "label_int") if f not in s.dtype.names]
    if missing:
        raise DatasetError(f"affnist: {name}: affNISTdata has no {' or '.join(missing)} field; {fix}")
    image, labels = np.asarray(s["image"]), np.asarray(s["label_int"]).reshape(-1)
    if image.ndim != 2 or image.shape[0] != SIZE * SIZE or image.dtype != np.uint8:
        raise DatasetError(
            f"affnist: {name}: affNISTdata.image is {image.shape} {image.dtype}, expected uint8 "
            f"{SIZE * SIZE} x N (one 40x40 image per column); {fix}"
        )
    if len(labels) != image.shape[1] or not np.issubdtype(labels.dtype, np.number):
        raise DatasetError(f"affnist: {name}: {len(labels)} labels ({labels.dtype}) for {image.shape[1]} images; {fix}")
    if labels.size and (labels.min() < 0 or labels.max() > 9 or np.any(labels != np.round(labels))):
        raise DatasetError(f"affnist: {name}: label_int has values outside the digits 0..9; {fix}")
    # image.T is [N, 1600]; row by row, an image's value at (r, c) is at r * 40 + c
    images = torch.from_numpy(np.ascontiguousarray(image.T)).view(-1, 1, SIZE, SIZE)
    if pixel_order == "column":  # column-major: (r, c) at c * 40 + r
        images = images.transpose(-2, -1).contiguous()
    return images, torch.from_numpy(labels.astype(np.int64))


def read_affnist_mat(path: str | Path, pixel_order: str = "row") -> tuple[torch.Tensor, torch.Tensor]:
    """One affNIST ``.mat`` (or a ``.zip`` holding one) as ``(images uint8 [N, 1, 40, 40], labels int64 [N])``.

    ``pixel_order``: how the 1600 values of a column map to a 40x40 image, ``"row"`` (row by
    row, the default; see the module docstring) or ``"column"`` (MATLAB's column-major order).
    Raises :class:`DatasetError` naming the file when it is unreadable, truncated or malformed.
    """
    if pixel_order not in ("row", "column"):
        raise ValueError(f"pixel_order must be 'row' or 'column', got {pixel_order!r}")
    path = Path(path)
    if path.name.endswith((".zip", ".zip.part")):
        try:
            with zipfile.ZipFile(path) as zf:
                members = [m for m in zf.namelist() if m.endswith(".mat")]
                if len(members) != 1:
                    raise DatasetError(
                        f"affnist: {path} should hold one .mat file (test.mat), it holds {len(members)}; "
                        f"delete it and download it again ({URL})"
                    )
                data = zf.read(members[0])  # reading to the end checks the CRC
        except OSError as e:
            raise DatasetError("affnist: " + unreadable(path, e, "check the file and the disk")) from None
        except (zipfile.BadZipFile, EOFError, zlib.error) as e:
            raise DatasetError(
                f"affnist: {path} is truncated or corrupt ({brief(e)}); delete it and download it again ({URL})"
            ) from None
        name = f"{path} ({members[0]})"
        mat = _loadmat(io.BytesIO(data), name)
        del data
    else:
        name = str(path)
        mat = _loadmat(str(path), name)
    return _parse(mat, name, pixel_order)


def _batches(folder: Path) -> list[Path]:
    """``test_batches/<k>.mat`` in numeric order of k."""
    found = [p for p in (folder / "test_batches").glob("*.mat") if re.fullmatch(r"[0-9]+", p.stem)]
    return sorted(found, key=lambda p: int(p.stem))


def _download(folder: Path, url: str, pixel_order: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Fetch ``test.mat.zip`` under a temporary name, verify it by reading it whole, then rename."""
    from torchvision.datasets.utils import download_url

    part, final = folder / "test.mat.zip.part", folder / "test.mat.zip"
    part.unlink(missing_ok=True)  # download_url would take a stale partial file as already done
    try:
        download_url(url, str(folder), filename=part.name, md5=None)  # no published MD5: checked below
        result = read_affnist_mat(part, pixel_order)
    except Exception as e:  # network errors come in many types; a bad file raises DatasetError
        part.unlink(missing_ok=True)
        raise DatasetError(
            f"could not download test.mat.zip for affnist from {url} ({brief(e)}); with no network, "
            f"put {_EXPECTED} in {folder}"
        ) from None
    part.replace(final)
    return result


def load_affnist_test(
    root: str | Path, download: bool, limit: int | None = None, *, url: str = URL, pixel_order: str = "row"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The affNIST test set: images ``[N, 1, 40, 40]`` uint8 and labels ``[N]`` int64 (N = 320,000).

    Reads ``<root>/affNIST/test.mat``, else ``test.mat.zip``, else every ``test_batches/<k>.mat``
    in numeric order; downloads ``test.mat.zip`` from ``url`` when none is there and ``download``
    is true. ``limit`` keeps the first ``limit`` images in file order (only the batches needed
    are read; a single file is read whole). ``pixel_order``: see :func:`read_affnist_mat`.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    folder = resolved_root(root) / FOLDER
    single = next((folder / n for n in ("test.mat", "test.mat.zip") if (folder / n).is_file()), None)
    batches = _batches(folder)
    if single is not None:
        images, labels = read_affnist_mat(single, pixel_order)
    elif batches:
        parts, n = [], 0
        for path in batches:
            if limit is not None and n >= limit and parts:
                break
            parts.append(read_affnist_mat(path, pixel_order))
            n += len(parts[-1][1])
        images, labels = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    elif download:
        folder.mkdir(parents=True, exist_ok=True)
        images, labels = _download(folder, url, pixel_order)
    else:
        raise DatasetError(
            f"affnist: no test set in {folder}; put {_EXPECTED} there (from {URL.rsplit('/', 1)[0]}/), "
            "or set data.download=true"
        )
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return images, labels


# --- training-set helpers ---------------------------------------------------------------------


def pad_to_canvas(images: torch.Tensor, canvas: int = SIZE) -> torch.Tensor:
    """Centre each image on a black ``canvas`` x ``canvas`` square (MNIST 28x28 -> 40x40: a
    6-pixel border). ``images``: ``[N, C, H, W]`` of any dtype; returns ``[N, C, canvas, canvas]``
    of the same dtype (an odd margin puts the extra pixel below and right)."""
    n, c, h, w = images.shape
    if h > canvas or w > canvas:
        raise ValueError(f"images of {h}x{w} do not fit a {canvas}x{canvas} canvas")
    top, left = (canvas - h) // 2, (canvas - w) // 2
    out = images.new_zeros((n, c, canvas, canvas))
    out[..., top : top + h, left : left + w] = images
    return out
