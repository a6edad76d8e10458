"""CIFAR10: pickle batches written in the real format, the loader, its download, and the
batched augmentation recipe against hand-computed values."""

from __future__ import annotations

import hashlib
import http.server
import io
import pickle
import tarfile
import threading
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from capsrun.datasets.cifar10 import (
    ARCHIVE,
    FOLDER,
    brightness_contrast_jitter,
    center_crop,
    crop,
    eval_transform,
    load_cifar10_split,
    per_image_standardization,
    random_crop,
    random_flip,
    read_batch,
    train_transform,
)
from capsrun.errors import DatasetError
from helpers import CIFAR_N, batch_bytes, images_for, write_cifar


def assert_one_line_naming(err: pytest.ExceptionInfo, *needles: str) -> None:
    msg = str(err.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)


# --- files ------------------------------------------------------------------------------------


def test_train_split_round_trips_in_file_order(tmp_path):
    images, labels = load_cifar10_split(write_cifar(tmp_path), train=True, download=False)
    assert images.shape == (5 * CIFAR_N, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.shape == (5 * CIFAR_N,) and labels.dtype == torch.int64
    expected = np.concatenate([images_for(i) for i in range(5)])
    assert np.array_equal(images.numpy(), expected)
    assert labels.tolist() == [(i + j) % 10 for i in range(5) for j in range(CIFAR_N)]


def test_test_split(tmp_path):
    images, labels = load_cifar10_split(write_cifar(tmp_path), train=False, download=False)
    assert np.array_equal(images.numpy(), images_for(5)) and labels.tolist() == [5, 6, 7, 8]


def test_row_layout_is_channel_planes_row_major(tmp_path):
    """Byte k of a row is channel k // 1024, row (k % 1024) // 32, column k % 32."""
    row = (np.arange(3072) % 251).astype(np.uint8)
    path = tmp_path / "b"
    path.write_bytes(batch_bytes(row[None], [3]))
    images, _ = read_batch(path)
    for ch, r, c in ((0, 0, 0), (0, 0, 31), (0, 1, 0), (1, 0, 0), (2, 31, 31), (1, 5, 7)):
        assert images[0, ch, r, c].item() == row[ch * 1024 + r * 32 + c]


def test_str_keys_as_in_the_python2_originals(tmp_path):
    path = tmp_path / "b"
    path.write_bytes(batch_bytes(images_for(0, 2).reshape(2, -1), [1, 9], str_keys=True))
    images, labels = read_batch(path)
    assert np.array_equal(images.numpy(), images_for(0, 2)) and labels.tolist() == [1, 9]


def test_missing_batch_names_file_and_fix(tmp_path):
    root = write_cifar(tmp_path)
    (root / FOLDER / "data_batch_3").unlink()
    with pytest.raises(DatasetError) as err:
        load_cifar10_split(root, train=True, download=False)
    assert_one_line_naming(err, "data_batch_3", str(root / FOLDER), ARCHIVE, "data.download=true")


def test_missing_folder(tmp_path):
    with pytest.raises(DatasetError) as err:
        load_cifar10_split(tmp_path, train=False, download=False)
    assert_one_line_naming(err, "test_batch", FOLDER, "data.download=true")


@pytest.mark.parametrize("cut", [10, 0.5, -1])
def test_truncated_batch(tmp_path, cut):
    root = write_cifar(tmp_path)
    path = root / FOLDER / "data_batch_2"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * cut) if isinstance(cut, float) else cut])
    with pytest.raises(DatasetError, match="truncated or corrupt") as err:
        load_cifar10_split(root, train=True, download=False)
    assert_one_line_naming(err, str(path))


def test_garbage_batch(tmp_path):
    path = tmp_path / "test_batch"
    path.write_bytes(b"this is not a pickle at all\n" * 10)
    with pytest.raises(DatasetError, match="truncated or corrupt") as err:
        read_batch(path)
    assert_one_line_naming(err, str(path))


@pytest.mark.parametrize(
    "entry",
    [
        {b"data": np.zeros((2, 3000), np.uint8), b"labels": [0, 1]},  # wrong row length
        {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1, 2]},  # count mismatch
        {b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]},  # not bytes
        {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]},  # label out of range
        {b"data": np.zeros((2, 3072), np.uint8)},  # no labels
        [1, 2, 3],  # not a dict
    ],
)
def test_malformed_batch(tmp_path, entry):
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps(entry, protocol=2))
    with pytest.raises(DatasetError) as err:
        read_batch(path)
    assert_one_line_naming(err, str(path))


# --- download ---------------------------------------------------------------------------------


@pytest.fixture
def mirror(tmp_path):
    """An HTTP server on 127.0.0.1 serving a cifar-10-python.tar.gz built from fixture batches;
    yields (url of the archive, its md5)."""
    src = write_cifar(tmp_path / "src", n=2)
    served = tmp_path / "served"
    served.mkdir()
    with tarfile.open(served / ARCHIVE, "w:gz") as tar:
        tar.add(src / FOLDER, arcname=FOLDER)
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True).start()
    yield (
        f"http://127.0.0.1:{server.server_address[1]}/{ARCHIVE}",
        hashlib.md5((served / ARCHIVE).read_bytes()).hexdigest(),
    )
    server.shutdown()
    server.server_close()


def test_download_verifies_extracts_and_loads(mirror, tmp_path):
    url, md5 = mirror
    root = tmp_path / "root"
    images, labels = load_cifar10_split(root, train=True, download=True, url=url, md5=md5)
    assert images.shape == (10, 3, 32, 32) and labels.dtype == torch.int64
    assert np.array_equal(images[:2].numpy(), images_for(0, 2))
    assert sorted(p.name for p in root.iterdir()) == sorted([ARCHIVE, FOLDER])  # no scratch folder left
    assert (root / FOLDER / "batches.meta").is_file()
    # a second call finds the batches and does not need the server
    again, _ = load_cifar10_split(root, train=False, download=True, url="http://127.0.0.1:9/x", md5=md5)
    assert again.shape == (2, 3, 32, 32)


def test_md5_mismatch_deletes_the_download(mirror, tmp_path):
    url, _ = mirror
    root = tmp_path / "root"
    with pytest.raises(DatasetError, match="MD5") as err:
        load_cifar10_split(root, train=True, download=True, url=url, md5="0" * 32)
    assert_one_line_naming(err, ARCHIVE, str(root))
    assert list(root.iterdir()) == []


def test_unreachable_mirror_says_where_to_put_files(tmp_path):
    root = tmp_path / "root"
    with pytest.raises(DatasetError) as err:  # port 9 (discard) on loopback: refused at once
        load_cifar10_split(root, train=False, download=True, url=f"http://127.0.0.1:9/{ARCHIVE}")
    assert_one_line_naming(err, "could not download", str(root / FOLDER), "data_batch_1")
    assert list(root.iterdir()) == []


def test_archive_without_the_batch_folder(tmp_path, mirror):
    url, _ = mirror
    served = Path(tmp_path / "served")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("README")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"hello"))
    (served / ARCHIVE).write_bytes(buf.getvalue())
    root = tmp_path / "root"
    with pytest.raises(DatasetError, match=FOLDER):
        load_cifar10_split(root, train=True, download=True, url=url, md5=hashlib.md5(buf.getvalue()).hexdigest())
    assert list(root.iterdir()) == []


# --- augmentation -----------------------------------------------------------------------------


def batch(b: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def twin(gen: torch.Generator) -> torch.Generator:
    """A generator in the same state, to redraw what a function is about to draw."""
    return torch.Generator().set_state(gen.get_state())


def test_center_crop_is_the_middle_slice():
    x = batch(2)
    assert torch.equal(center_crop(x, 24), x[:, :, 4:28, 4:28])
    assert torch.equal(center_crop(x, 31), x[:, :, 0:31, 0:31])  # odd margin: offset (32 - 31) // 2 = 0
    with pytest.raises(ValueError):
        center_crop(x, 33)


def test_crop_at_given_offsets():
    x = batch(2)
    out = crop(x, torch.tensor([[0, 8], [3, 1]]), 24)
    assert torch.equal(out[0], x[0, :, 0:24, 8:32]) and torch.equal(out[1], x[1, :, 3:27, 1:25])


def test_random_crop_takes_the_drawn_window_of_each_image():
    x, gen = batch(16), torch.Generator().manual_seed(3)
    ref = twin(gen)
    top, left = torch.randint(0, 9, (16,), generator=ref), torch.randint(0, 9, (16,), generator=ref)
    out = random_crop(x, 24, gen)
    assert out.shape == (16, 3, 24, 24)
    for i in range(16):
        t, c = int(top[i]), int(left[i])
        assert torch.equal(out[i], x[i, :, t : t + 24, c : c + 24])
    assert len(set(zip(top.tolist(), left.tolist()))) > 1  # offsets differ between images
    assert torch.equal(gen.get_state(), ref.get_state())  # and nothing else was drawn


def test_random_flip_mirrors_the_drawn_images():
    x, gen = batch(32), torch.Generator().manual_seed(5)
    flip = torch.rand(32, generator=twin(gen)) < 0.5
    out = random_flip(x, gen)
    assert 0 < int(flip.sum()) < 32
    for i in range(32):
        assert torch.equal(out[i], x[i, :, :, torch.arange(31, -1, -1)] if flip[i] else x[i])


def test_brightness_alone_adds_one_delta_per_image():
    x, gen = batch(16), torch.Generator().manual_seed(7)
    out = brightness_contrast_jitter(x, gen, max_brightness=0.25, contrast=(1.0, 1.0))
    delta = (out - x).flatten(1)
    assert torch.allclose(delta, delta[:, :1].expand_as(delta), atol=1e-6)  # same shift for every pixel
    assert delta.abs().max() <= 0.25 and delta[:, 0].unique().numel() == 16  # in range, per image


def test_contrast_alone_scales_deviations_from_each_channel_mean():
    x = batch(4)
    out = brightness_contrast_jitter(x, torch.Generator().manual_seed(0), max_brightness=0.0, contrast=(2.0, 2.0))
    mean = x.mean(dim=(2, 3), keepdim=True)
    assert torch.allclose(out, 2 * x - mean, atol=1e-6)  # (x - m) * 2 + m
    assert torch.allclose(out.mean(dim=(2, 3)), mean[..., 0, 0], atol=1e-6)


def test_jitter_is_seeded_and_in_range():
    x = batch(64)
    a = brightness_contrast_jitter(x, torch.Generator().manual_seed(1))
    b = brightness_contrast_jitter(x, torch.Generator().manual_seed(1))
    c = brightness_contrast_jitter(x, torch.Generator().manual_seed(2))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    # contrast factor = ratio of the per-channel spreads; the brightness delta does not change it
    ratio = (a - a.mean(dim=(2, 3), keepdim=True)).std(dim=(2, 3)) / (x - x.mean(dim=(2, 3), keepdim=True)).std(
        dim=(2, 3)
    )
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), atol=1e-4)  # one factor per image
    assert 0.2 <= ratio.min() and ratio.max() < 1.8 and ratio[:, 0].max() - ratio[:, 0].min() > 0.8
    with pytest.raises(ValueError):
        brightness_contrast_jitter(x, torch.Generator(), contrast=(1.5, 0.5))


def test_per_image_standardization_hand_values():
    x = torch.tensor([0.0, 0.0, 1.0, 1.0]).view(1, 1, 2, 2)  # mean 0.5, std 0.5
    assert torch.equal(per_image_standardization(x), torch.tensor([-1.0, -1.0, 1.0, 1.0]).view(1, 1, 2, 2))
    # std below 1 / sqrt(4) = 0.5 is floored at 0.5
    tiny = torch.tensor([0.0, 0.0, 0.0, 0.004]).view(1, 1, 2, 2)
    assert torch.allclose(per_image_standardization(tiny), (tiny - 0.001) / 0.5)


def test_per_image_standardization_statistics_and_constant_image():
    x = torch.cat([batch(3) * 5 + 2, torch.full((1, 3, 32, 32), 0.7)])
    out = per_image_standardization(x)
    assert torch.isfinite(out).all()
    assert torch.allclose(out[:3].mean(dim=(1, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(out[:3].std(dim=(1, 2, 3), correction=0), torch.ones(3), atol=1e-5)
    assert out[3].abs().max() < 1e-4  # zero up to the rounding of the float32 mean


def test_recipes_shapes_and_reproducibility():
    x = batch(4)
    a, b = (train_transform(x, torch.Generator().manual_seed(9)) for _ in range(2))
    assert a.shape == (4, 3, 24, 24) and torch.equal(a, b)
    assert torch.equal(eval_transform(x), per_image_standardization(x[:, :, 4:28, 4:28]))
