"""IDX reader, MNIST split loading, subset, random shift and the in-memory batch loader."""

from __future__ import annotations

import gzip
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from capsrun.datasets import BatchLoader, load_split, random_shift, subset
from capsrun.datasets.idx import read_idx
from capsrun.datasets.mnist import MNIST, load_idx_split
from capsrun.errors import DatasetError


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    """Our own IDX writer: 0x00 0x00, type code, ndim, big-endian uint32 dims, then the data."""
    header = bytes([0, 0, type_code, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.tobytes()


def write(path: Path, array: np.ndarray, type_code: int = 0x08) -> Path:
    data = idx_bytes(array, type_code)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 28, 28), dtype=np.uint8)


# --- read_idx ---------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_round_trip(tmp_path, suffix):
    images = _images(3)
    labels = np.array([7, 0, 9], dtype=np.uint8)
    got_images = read_idx(write(tmp_path / f"img{suffix}", images))
    got_labels = read_idx(write(tmp_path / f"lab{suffix}", labels))
    assert got_images.dtype == torch.uint8 and got_images.shape == (3, 28, 28)
    assert np.array_equal(got_images.numpy(), images)
    assert got_labels.shape == (3,) and got_labels.tolist() == [7, 0, 9]


def test_read_idx_big_endian_types(tmp_path):
    """Multi-byte types are stored big-endian and come back in native order."""
    ints = np.array([[1, -2, 70000], [3, 4, -5]], dtype=">i4")
    floats = np.array([1.5, -0.25], dtype=">f4")
    got = read_idx(write(tmp_path / "ints", ints, type_code=0x0C))
    assert got.shape == (2, 3) and got.tolist() == [[1, -2, 70000], [3, 4, -5]]
    assert read_idx(write(tmp_path / "floats", floats, type_code=0x0D)).tolist() == [1.5, -0.25]


def test_read_idx_handcrafted_bytes(tmp_path):
    """Bytes written out one by one, independent of any writer."""
    path = tmp_path / "tiny"
    path.write_bytes(b"\x00\x00\x08\x02" + b"\x00\x00\x00\x02" + b"\x00\x00\x00\x03" + bytes([1, 2, 3, 4, 5, 6]))
    assert read_idx(path).tolist() == [[1, 2, 3], [4, 5, 6]]


def test_read_idx_truncated(tmp_path):
    data = idx_bytes(_images(2))
    for name, payload in (("short-data", data[:-100]), ("short-header", data[:9])):
        path = tmp_path / name
        path.write_bytes(payload)
        with pytest.raises(DatasetError, match="truncated") as err:
            read_idx(path)
        assert name in str(err.value)


def test_read_idx_extra_bytes_rejected(tmp_path):
    path = tmp_path / "long"
    path.write_bytes(idx_bytes(_images(1)) + b"\x00")
    with pytest.raises(DatasetError, match="long"):
        read_idx(path)


def test_read_idx_refuses_what_its_header_cannot_hold(tmp_path):
    """A header of 2^31 x 2^31 x 4 bytes and no body (its size product wraps to 0 in 64 bits), and
    a valid file of 0 images: each one line naming the file, nothing allocated for the promise."""
    huge = tmp_path / "huge-idx"
    huge.write_bytes(b"\x00\x00\x08\x03" + (2**31).to_bytes(4, "big") * 2 + (4).to_bytes(4, "big"))
    promise = "huge-idx is truncated or corrupt: its header promises 18446744073709551616 bytes"
    with pytest.raises(DatasetError, match=promise):
        read_idx(huge)
    empty = tmp_path / "empty-idx"
    empty.write_bytes(idx_bytes(np.zeros((0, 28, 28), dtype=np.uint8)))
    with pytest.raises(DatasetError, match=r"empty-idx holds no examples \(its header says \(0, 28, 28\)\)"):
        read_idx(empty)


def test_read_idx_stops_at_the_published_size_before_decompressing(tmp_path):
    """A 0.8 MB .gz that expands to 784 MB of valid IDX (a million blank digits): refused by its
    header against the published file's size, after reading 16 bytes of it."""
    bomb = tmp_path / "train-images-idx3-ubyte.gz"
    with gzip.open(bomb, "wb", compresslevel=9) as f:
        f.write(b"\x00\x00\x08\x03" + (1_000_000).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2)
        zeros = bytes(1 << 20)
        for _ in range(748):
            f.write(zeros)
    assert bomb.stat().st_size < 1_000_000
    with pytest.raises(DatasetError, match="declares .1000000, 28, 28.: 784,000,000 bytes of data, more than the"):
        read_idx(bomb, limit=60_000 * 28 * 28)


def test_read_idx_truncated_gzip(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    blob = gzip.compress(idx_bytes(_images(2)))
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DatasetError) as err:
        read_idx(path)
    assert path.name in str(err.value)


@pytest.mark.parametrize(
    "payload", [b"\x1f\x8b\x08\x00garbage", b"\x00\x01\x08\x01\x00\x00\x00\x01\x05", b"\x00\x00\x07\x01", b"ab"]
)
def test_read_idx_bad_magic(tmp_path, payload):
    path = tmp_path / "weird-file"
    path.write_bytes(payload)
    with pytest.raises(DatasetError, match="not an IDX") as err:
        read_idx(path)
    assert "weird-file" in str(err.value)


# --- load_idx_split ---------------------------------------------------------------------------


def _write_split(root: Path, n_train: int, n_test: int, gz: bool, labels=None) -> Path:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    ext = ".gz" if gz else ""
    for prefix, n, seed in (("train", n_train, 1), ("t10k", n_test, 2)):
        write(raw / f"{prefix}-images-idx3-ubyte{ext}", _images(n, seed))
        lab = np.arange(n, dtype=np.uint8) % 10 if labels is None else labels
        write(raw / f"{prefix}-labels-idx1-ubyte{ext}", lab)
    return raw


@pytest.mark.parametrize("gz", [True, False])
def test_load_idx_split(tmp_path, gz):
    _write_split(tmp_path, 12, 5, gz)
    images, labels = load_idx_split(MNIST, tmp_path, train=True, download=False)
    assert images.shape == (12, 1, 28, 28) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and labels.tolist() == [i % 10 for i in range(12)]
    assert np.array_equal(images[:, 0].numpy(), _images(12, 1))
    test_images, test_labels = load_split("mnist", tmp_path, train=False, download=False)
    assert test_images.shape == (5, 1, 28, 28) and test_labels.shape == (5,)
    assert np.array_equal(test_images[:, 0].numpy(), _images(5, 2))


def test_load_split_unknown_name(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset"):
        load_split("cifar100", tmp_path, train=True, download=False)


def test_missing_file_without_download(tmp_path):
    with pytest.raises(DatasetError) as err:
        load_idx_split(MNIST, tmp_path, train=True, download=False)
    msg = str(err.value)
    assert str((tmp_path / "MNIST" / "raw").resolve()) in msg
    assert "data.download" in msg
    assert "train-images-idx3-ubyte" in msg


def test_missing_labels_file(tmp_path):
    raw = _write_split(tmp_path, 4, 4, gz=False)
    (raw / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DatasetError, match="t10k-labels-idx1-ubyte"):
        load_idx_split(MNIST, tmp_path, train=False, download=False)
    load_idx_split(MNIST, tmp_path, train=True, download=False)  # the train split is complete


def test_mismatched_counts(tmp_path):
    raw = _write_split(tmp_path, 6, 4, gz=True)
    write(raw / "train-labels-idx1-ubyte.gz", np.zeros(5, dtype=np.uint8))
    with pytest.raises(DatasetError, match="image/label pair"):
        load_idx_split(MNIST, tmp_path, train=True, download=False)


def test_labels_out_of_range(tmp_path):
    _write_split(tmp_path, 3, 3, gz=False, labels=np.array([0, 10, 3], dtype=np.uint8))
    with pytest.raises(DatasetError, match="outside 0..9"):
        load_idx_split(MNIST, tmp_path, train=True, download=False)


# --- subset -----------------------------------------------------------------------------------


def test_subset():
    images = torch.arange(50).view(50, 1, 1, 1)
    labels = torch.arange(50)
    all_images, all_labels = subset(images, labels, None)
    assert torch.equal(all_labels, labels) and torch.equal(all_images, images)
    assert torch.equal(subset(images, labels, 80)[1], labels)
    i1, l1 = subset(images, labels, 7, seed=3)
    i2, l2 = subset(images, labels, 7, seed=3)
    assert torch.equal(l1, l2) and torch.equal(i1, i2)
    assert len(l1) == 7 and len(set(l1.tolist())) == 7
    assert torch.equal(l1, l1.sort().values)  # file order
    assert torch.equal(i1.flatten(), l1)  # images and labels stay paired
    assert not torch.equal(subset(images, labels, 7, seed=4)[1], l1)


# --- random_shift -----------------------------------------------------------------------------

IMG = torch.arange(1, 17, dtype=torch.float32).view(1, 1, 4, 4)


def test_shift_zero_offset_is_identity():
    assert torch.equal(random_shift(IMG, torch.tensor([[0, 0]]), 2), IMG)


def test_shift_down_one_row():
    out = random_shift(IMG, torch.tensor([[1, 0]]), 2)
    expected = torch.tensor([[0, 0, 0, 0], [1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]], dtype=torch.float32)
    assert torch.equal(out[0, 0], expected)


def test_shift_left_two_columns():
    out = random_shift(IMG, torch.tensor([[0, -2]]), 2)
    expected = torch.tensor([[3, 4, 0, 0], [7, 8, 0, 0], [11, 12, 0, 0], [15, 16, 0, 0]], dtype=torch.float32)
    assert torch.equal(out[0, 0], expected)


def test_shift_per_image_and_channel():
    """Each image gets its own offset; all channels of an image move together."""
    imgs = torch.cat([IMG, IMG * 10]).expand(2, 2, 4, 4).clone()
    imgs[:, 1] += 100
    out = random_shift(imgs, torch.tensor([[-1, 1], [2, -2]]), 2)
    # image 0: up one row, right one column
    assert torch.equal(out[0, 0, :3, 1:], imgs[0, 0, 1:, :3])
    assert torch.equal(out[0, 1, :3, 1:], imgs[0, 1, 1:, :3])
    assert out[0, :, 3].abs().sum() == 0 and out[0, :, :, 0].abs().sum() == 0
    # image 1: down two rows, left two columns
    assert torch.equal(out[1, :, 2:, :2], imgs[1, :, :2, 2:])
    assert out[1, :, :2].abs().sum() == 0 and out[1, :, :, 2:].abs().sum() == 0


def test_shift_max_zero_is_identity():
    assert torch.equal(random_shift(IMG, torch.tensor([[0, 0]]), 0), IMG)


# --- BatchLoader ------------------------------------------------------------------------------


def _loader(n=23, batch=5, **kw) -> BatchLoader:
    images = torch.randint(0, 256, (n, 1, 6, 6), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    return BatchLoader(images, torch.arange(n), batch, **kw)


def test_loader_len_and_values():
    loader = _loader(23, 5)
    assert len(loader) == math.ceil(23 / 5) == 5
    assert len(_loader(20, 5)) == 4
    assert loader.num_examples == 23
    batches = list(loader.epoch(0))
    assert len(batches) == 5
    assert [len(y) for _, y in batches] == [5, 5, 5, 5, 3]
    x = torch.cat([b[0] for b in batches])
    assert x.dtype == torch.float32 and x.min() >= 0 and x.max() <= 1
    # no shuffle, no shift: the images in file order, scaled by 1/255
    torch.testing.assert_close(x, loader.images.float() / 255)
    assert torch.cat([b[1] for b in batches]).tolist() == list(range(23))


def test_loader_shuffle_covers_every_example_once():
    loader = _loader(23, 5, shuffle=True, max_shift=2, seed=1)
    labels = torch.cat([y for _, y in loader.epoch(0)])
    assert sorted(labels.tolist()) == list(range(23))
    assert labels.tolist() != list(range(23))
    for x, y in loader.epoch(1):
        assert x.min() >= 0 and x.max() <= 1


def test_loader_shuffle_without_shift_pairs_images_and_labels():
    loader = _loader(23, 5, shuffle=True, seed=1)
    for x, y in loader.epoch(2):
        torch.testing.assert_close(x, loader.images[y].float() / 255)


def test_loader_order_is_seeded_by_seed_and_epoch():
    a = _loader(23, 5, shuffle=True, seed=7)
    b = _loader(23, 5, shuffle=True, seed=7)

    def order(loader: BatchLoader, e: int) -> list[int]:
        return torch.cat([y for _, y in loader.epoch(e)]).tolist()

    assert order(a, 0) == order(b, 0)
    assert order(a, 3) == order(b, 3)
    assert order(a, 0) != order(a, 1)
    assert order(a, 0) != order(_loader(23, 5, shuffle=True, seed=8), 0)
    assert order(a, 0) == torch.cat([y for _, y in a]).tolist()  # iter() is epoch 0


def test_loader_resume_from_batch():
    """epoch(e, start=k) replays batches k.. of epoch e exactly, shifts included."""
    loader = _loader(23, 5, shuffle=True, max_shift=2, seed=3)
    full = list(loader.epoch(4))
    for k in (0, 2, 4):
        tail = list(loader.epoch(4, start=k))
        assert len(tail) == len(full) - k
        for (x1, y1), (x2, y2) in zip(tail, full[k:]):
            assert torch.equal(y1, y2)
            assert torch.equal(x1, x2)
    assert list(loader.epoch(4, start=len(loader))) == []


def test_loader_shift_is_applied():
    """With max_shift the pixel sums can only drop (content leaves the frame), never grow."""
    loader = _loader(23, 23, shuffle=False, max_shift=2, seed=5)
    x, y = next(iter(loader.epoch(0)))
    plain = loader.images[y].float() / 255
    assert not torch.equal(x, plain)
    assert (x.flatten(1).sum(1) <= plain.flatten(1).sum(1) + 1e-5).all()


def test_epoch_generator_derives_every_epoch_and_batch_from_the_seed():
    from capsrun.datasets.loader import epoch_generator

    def draw(gen):
        return torch.randint(0, 10**6, (4,), generator=gen).tolist()

    assert draw(epoch_generator(2, 3)) == draw(torch.Generator().manual_seed(2 * 1_000_003 + 3))
    assert draw(epoch_generator(2, 3, batch=5)) == draw(
        torch.Generator().manual_seed((2 * 1_000_003 + 3) * 100_003 + 5)
    )
    assert draw(epoch_generator(2, 3)) != draw(epoch_generator(2, 4))
