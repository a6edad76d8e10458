"""Downloads through the real code path, served from a local HTTP server (loopback only)."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import threading
from functools import partial
from pathlib import Path

import pytest
import torch

from capsrun.datasets.mnist import MNIST, load_idx_split
from capsrun.errors import DatasetError
from conftest import write_mnist


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
    return dataclasses.replace(MNIST, mirrors=(url,), files=files)


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
    ds = dataclasses.replace(MNIST, mirrors=("http://127.0.0.1:9/",))
    with pytest.raises(DatasetError, match=r"put the four IDX files .* in .*MNIST/raw"):
        load_idx_split(ds, tmp_path / "root", train=False, download=True)
