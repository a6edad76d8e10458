"""MNIST (LeCun et al.) and Fashion-MNIST (Xiao et al., arXiv:1708.07747) from their IDX files.

The files live where torchvision keeps them, ``<root>/MNIST/raw/`` and
``<root>/FashionMNIST/raw/``, plain or ``.gz``. Downloads go through torchvision's downloader,
which verifies the published MD5 of every file. Protocol: the standard 60,000 / 10,000 split,
pixels scaled to [0, 1] by the loader (no normalisation), as in arXiv:1710.09829 Sec. 5.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from capsrun.datasets.idx import read_idx
from capsrun.errors import DatasetError


@dataclass(frozen=True)
class IdxDataset:
    """A dataset stored as four IDX files, with the MD5 of each published ``.gz``."""

    name: str
    folder: str
    mirrors: tuple[str, ...]
    files: dict[str, tuple[str, str]]  # "train-images" -> (file name without .gz, md5 of .gz)
    classes: tuple[str, ...]


MNIST = IdxDataset(
    name="mnist",
    folder="MNIST",
    mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
    files={
        "train-images": ("train-images-idx3-ubyte", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
        "train-labels": ("train-labels-idx1-ubyte", "d53e105ee54ea40749a09fcbcd1e9432"),
        "test-images": ("t10k-images-idx3-ubyte", "9fb629c4189551a2d022fa330f9573f3"),
        "test-labels": ("t10k-labels-idx1-ubyte", "ec29112dd5afa0611ce80d1b7f02629c"),
    },
    classes=tuple(str(i) for i in range(10)),
)

FASHION_MNIST = IdxDataset(
    name="fashion_mnist",
    folder="FashionMNIST",
    mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
    files={
        "train-images": ("train-images-idx3-ubyte", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
        "train-labels": ("train-labels-idx1-ubyte", "25c81989df183df01b3e8a0aad5dffbe"),
        "test-images": ("t10k-images-idx3-ubyte", "bef4ecab320f06d8554ea6380940ec79"),
        "test-labels": ("t10k-labels-idx1-ubyte", "bb300cfdad3c16e7a12a480ee83cd310"),
    },
    classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
)


def _find(raw: Path, name: str) -> Path | None:
    for candidate in (raw / name, raw / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _download(ds: IdxDataset, raw: Path, name: str, md5: str) -> None:
    from torchvision.datasets.utils import download_url

    errors = []
    for mirror in ds.mirrors:
        try:
            download_url(mirror + name + ".gz", str(raw), filename=name + ".gz", md5=md5)
            return
        except Exception as e:  # network errors come in many types; report them all at once
            errors.append(f"{mirror}: {str(e) or type(e).__name__}"[:160])
            (raw / f"{name}.gz").unlink(missing_ok=True)  # never leave a file that failed its checksum
    raise DatasetError(
        f"could not download {name}.gz for {ds.name} ({'; '.join(errors)}); "
        f"with no network, put the four IDX files (.gz or not) in {raw}"
    )


def load_idx_split(ds: IdxDataset, root: str | Path, train: bool, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[N, 1, 28, 28]`` uint8 and labels ``[N]`` int64 of one split.

    Missing files are downloaded (MD5-checked) when ``download`` is true; otherwise, and when
    the download fails, a :class:`DatasetError` says where the files must go.
    """
    raw = Path(root).expanduser().resolve() / ds.folder / "raw"
    split = "train" if train else "test"
    paths = []
    for kind in ("images", "labels"):
        name, md5 = ds.files[f"{split}-{kind}"]
        path = _find(raw, name)
        if path is None:
            if not download:
                raise DatasetError(
                    f"{ds.name}: {name} not found in {raw}; put the four IDX files (.gz or not) there, "
                    "or set data.download=true"
                )
            raw.mkdir(parents=True, exist_ok=True)
            _download(ds, raw, name, md5)
            path = raw / f"{name}.gz"
        paths.append(path)
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.dim() != 3 or labels.dim() != 1 or images.shape[0] != labels.shape[0] or images.dtype != torch.uint8:
        raise DatasetError(
            f"{ds.name}: {paths[0].name} {tuple(images.shape)} and {paths[1].name} {tuple(labels.shape)} "
            "do not form an image/label pair; replace them with the original files"
        )
    labels = labels.long()
    if labels.numel() and (labels.min() < 0 or labels.max() >= len(ds.classes)):
        raise DatasetError(f"{ds.name}: {paths[1]} has labels outside 0..{len(ds.classes) - 1}")
    return images.unsqueeze(1), labels
