"""affNIST: .mat files written in the real layout (struct ``affNISTdata``, 1600 x N uint8 images),
the loader's orientation, files, errors and download, and the translated-MNIST training helpers."""

from __future__ import annotations

import http.server
import io
import os
import threading
import zipfile
from functools import partial

import numpy as np
import pytest
import scipy.io
import torch

from capsrun.datasets.affnist import (
    FOLDER,
    load_affnist_test,
    pad_to_canvas,
    read_affnist_mat,
)
from capsrun.datasets.loader import random_shift
from capsrun.errors import DatasetError
from helpers import write_mat


def seven() -> np.ndarray:
    """An upright 40x40 '7': a bar along the top, a stroke down to the bottom left. Neither
    transposing nor mirroring maps it onto itself."""
    img = np.zeros((40, 40), np.uint8)
    img[6:9, 10:31] = 255  # the bar, rows 6..8
    for r in range(9, 34):  # the stroke from the bar's right end down and left
        c = 30 - (r - 9) * 12 // 25
        img[r, c - 1 : c + 2] = 200
    return img


def ell() -> np.ndarray:
    """An upright 'L': a left vertical bar and a bottom bar."""
    img = np.zeros((40, 40), np.uint8)
    img[8:32, 12:15] = 255
    img[29:32, 12:28] = 128
    return img


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def random_images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 40, 40), dtype=np.uint8)


def assert_one_line_naming(err: pytest.ExceptionInfo, *needles: str) -> None:
    msg = str(err.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)


# --- orientation ------------------------------------------------------------------------------


def test_glyphs_are_asymmetric():
    for img in (seven(), ell()):
        assert not np.array_equal(img, img.T) and not np.array_equal(img, img[:, ::-1])


def test_loader_returns_upright_images(tmp_path):
    write_mat(tmp_path / FOLDER / "test.mat", [seven(), ell()], [7, 1])
    images, labels = load_affnist_test(tmp_path, download=False)
    assert images.shape == (2, 1, 40, 40) and images.dtype == torch.uint8
    assert np.array_equal(images[0, 0].numpy(), seven()) and np.array_equal(images[1, 0].numpy(), ell())
    assert images[0, 0, 7, 20] == 255 and images[0, 0, 20, 7] == 0  # the bar is a row, not a column
    assert labels.tolist() == [7, 1] and labels.dtype == torch.int64


def test_column_major_files_with_pixel_order_column(tmp_path):
    """What MATLAB's ``img(:)`` stores (``img.flatten(order='F')``) comes back upright with
    ``pixel_order="column"``, and transposed with the default."""
    path = write_mat(tmp_path / "f.mat", [seven(), ell()], [7, 1], order="F")
    images, _ = read_affnist_mat(path, pixel_order="column")
    assert np.array_equal(images[0, 0].numpy(), seven()) and np.array_equal(images[1, 0].numpy(), ell())
    default, _ = read_affnist_mat(path)
    assert np.array_equal(default[0, 0].numpy(), seven().T)
    with pytest.raises(ValueError):
        read_affnist_mat(path, pixel_order="diagonal")


# --- files ------------------------------------------------------------------------------------


def test_zip_is_read_without_extracting(tmp_path):
    mat = write_mat(tmp_path / "test.mat", random_images(3, 0), [0, 5, 9])
    folder = tmp_path / "root" / FOLDER
    folder.mkdir(parents=True)
    (folder / "test.mat.zip").write_bytes(zip_bytes({"test.mat": mat.read_bytes()}))
    images, labels = load_affnist_test(tmp_path / "root", download=False)
    assert np.array_equal(images[:, 0].numpy(), random_images(3, 0)) and labels.tolist() == [0, 5, 9]
    assert sorted(p.name for p in folder.iterdir()) == ["test.mat.zip"]


def test_batches_in_numeric_order_and_limit(tmp_path):
    folder = tmp_path / FOLDER / "test_batches"
    for k in (1, 2, 10):  # "10" sorts before "2" as text
        write_mat(folder / f"{k}.mat", random_images(2, k), [k % 10, k % 10])
    (folder / "notes.mat").write_bytes(b"not a batch")  # not numbered: ignored
    images, labels = load_affnist_test(tmp_path, download=False)
    assert labels.tolist() == [1, 1, 2, 2, 0, 0]
    assert np.array_equal(images[4:, 0].numpy(), random_images(2, 10))
    # limit reads only the batches it needs: a broken 10.mat is not touched
    (folder / "10.mat").write_bytes(b"broken")
    images, labels = load_affnist_test(tmp_path, download=False, limit=3)
    assert images.shape == (3, 1, 40, 40) and labels.tolist() == [1, 1, 2]
    with pytest.raises(DatasetError) as err:
        load_affnist_test(tmp_path, download=False)
    assert_one_line_naming(err, str(folder / "10.mat"))


def test_single_file_is_preferred_and_limit_applies(tmp_path):
    write_mat(tmp_path / FOLDER / "test_batches" / "1.mat", random_images(2, 1), [1, 1])
    write_mat(tmp_path / FOLDER / "test.mat", random_images(4, 2), [2, 3, 4, 5])
    images, labels = load_affnist_test(tmp_path, download=False, limit=2)
    assert labels.tolist() == [2, 3] and np.array_equal(images[:, 0].numpy(), random_images(4, 2)[:2])


def test_missing_names_folder_and_files(tmp_path):
    with pytest.raises(DatasetError) as err:
        load_affnist_test(tmp_path, download=False)
    assert_one_line_naming(
        err, str(tmp_path.resolve() / FOLDER), "test.mat", "test.mat.zip", "test_batches/1.mat", "data.download=true"
    )


@pytest.mark.parametrize(
    "struct, match",
    [
        ({"image": np.zeros((784, 2), np.uint8)}, "expected uint8 1600 x N"),  # 28x28 images
        ({"image": np.zeros((1600, 2), np.float64)}, "expected uint8 1600 x N"),
        ({"label_int": np.array([[3, 10]], np.uint8)}, "outside the digits 0..9"),
        ({"label_int": np.array([[3, 4, 5]], np.uint8)}, "3 labels"),
    ],
)
def test_malformed_struct(tmp_path, struct, match):
    path = write_mat(tmp_path / "test.mat", random_images(2, 0), [3, 4], **struct)
    with pytest.raises(DatasetError, match=match) as err:
        read_affnist_mat(path)
    assert_one_line_naming(err, str(path))


def test_mat_without_affnistdata(tmp_path):
    path = tmp_path / "test.mat"
    scipy.io.savemat(path, {"images": np.zeros((1600, 2), np.uint8)})
    with pytest.raises(DatasetError, match="no affNISTdata struct .*images") as err:
        read_affnist_mat(path)
    assert_one_line_naming(err, str(path))


def test_struct_without_label_int(tmp_path):
    path = tmp_path / "test.mat"
    scipy.io.savemat(path, {"affNISTdata": {"image": np.zeros((1600, 2), np.uint8)}})
    with pytest.raises(DatasetError, match="no label_int field"):
        read_affnist_mat(path)


@pytest.mark.parametrize("kind", ["truncated mat", "garbage mat", "truncated zip", "zip without mat"])
def test_unreadable_files(tmp_path, kind):
    data = write_mat(tmp_path / "src.mat", random_images(4, 0), [1, 2, 3, 4]).read_bytes()
    name, content = {
        "truncated mat": ("test.mat", data[: len(data) // 2]),
        "garbage mat": ("test.mat", b"\x00" * 300),
        "truncated zip": ("test.mat.zip", zip_bytes({"test.mat": data})[:-200]),
        "zip without mat": ("test.mat.zip", zip_bytes({"README": b"hi"})),
    }[kind]
    path = tmp_path / "root" / FOLDER / name
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    with pytest.raises(DatasetError) as err:
        load_affnist_test(tmp_path / "root", download=False)
    assert_one_line_naming(err, str(path))


# --- download ---------------------------------------------------------------------------------


@pytest.fixture
def mirror(tmp_path):
    """An HTTP server on 127.0.0.1 serving files from a folder; yields (base url, folder)."""
    served = tmp_path / "served"
    served.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", served
    server.shutdown()
    server.server_close()


def test_download_verifies_structure_and_keeps_the_zip(mirror, tmp_path):
    base, served = mirror
    mat = write_mat(tmp_path / "test.mat", [seven(), ell()], [7, 1]).read_bytes()
    (served / "test.mat.zip").write_bytes(zip_bytes({"test.mat": mat}))
    root = tmp_path / "root"
    images, labels = load_affnist_test(root, download=True, url=base + "test.mat.zip")
    assert np.array_equal(images[0, 0].numpy(), seven()) and labels.tolist() == [7, 1]
    assert sorted(p.name for p in (root / FOLDER).iterdir()) == ["test.mat.zip"]
    # the next call reads the kept zip and needs no server
    again, _ = load_affnist_test(root, download=True, url="http://127.0.0.1:9/test.mat.zip")
    assert torch.equal(again, images)


@pytest.mark.parametrize("payload", ["no struct", "not a zip"])
def test_download_failing_verification_is_deleted(mirror, tmp_path, payload):
    base, served = mirror
    bad = io.BytesIO()
    scipy.io.savemat(bad, {"something_else": np.zeros((3, 3))})
    content = zip_bytes({"test.mat": bad.getvalue()}) if payload == "no struct" else b"<html>moved</html>"
    (served / "test.mat.zip").write_bytes(content)
    root = tmp_path / "root"
    with pytest.raises(DatasetError) as err:
        load_affnist_test(root, download=True, url=base + "test.mat.zip")
    assert_one_line_naming(err, "could not download test.mat.zip", str(root.resolve() / FOLDER))
    assert list((root / FOLDER).iterdir()) == []


def test_unreachable_mirror_says_where_to_put_files(tmp_path):
    with pytest.raises(DatasetError) as err:  # port 9 (discard) on loopback: refused at once
        load_affnist_test(tmp_path, download=True, url="http://127.0.0.1:9/test.mat.zip")
    assert_one_line_naming(err, "could not download", "test_batches/1.mat", str(tmp_path.resolve() / FOLDER))
    assert list((tmp_path / FOLDER).iterdir()) == []


# --- training helpers -------------------------------------------------------------------------


def test_pad_to_canvas_centres_mnist():
    mnist = torch.randint(1, 256, (3, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = pad_to_canvas(mnist)
    assert out.shape == (3, 1, 40, 40) and out.dtype == torch.uint8
    assert torch.equal(out[..., 6:34, 6:34], mnist)
    out[..., 6:34, 6:34] = 0
    assert out.sum() == 0  # a black border of 6 on every side
    assert torch.equal(pad_to_canvas(torch.ones(1, 1, 3, 3), canvas=6)[0, 0, 1:4, 1:4], torch.ones(3, 3))
    with pytest.raises(ValueError):
        pad_to_canvas(torch.zeros(1, 1, 41, 41))


def test_shifts_of_6_keep_a_padded_digit_whole():
    """The training path of the protocol: a 28x28 digit padded to 40x40, shifted by up to 6 px
    (what ``BatchLoader(max_shift=6)`` draws), never loses a pixel."""
    mnist = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(1)) + 0.1  # no zero pixel
    x = pad_to_canvas(mnist)
    offsets = torch.randint(-6, 7, (64, 2), generator=torch.Generator().manual_seed(2))
    out = random_shift(x, offsets, 6)
    # image i holds its digit at rows 6 + dy .. 34 + dy, columns 6 + dx .. 34 + dx, whole
    for i in (0, 1, 2):
        dy, dx = offsets[i].tolist()
        assert torch.equal(out[i, :, 6 + dy : 34 + dy, 6 + dx : 34 + dx], mnist[i])
    assert torch.allclose(out.sum(dim=(1, 2, 3)), mnist.sum(dim=(1, 2, 3)))  # nothing shifted off the canvas
    assert offsets.min() == -6 and offsets.max() == 6


# --- real data --------------------------------------------------------------------------------

REAL = os.environ.get("CAPSRUN_REAL_AFFNIST")


@pytest.mark.realdata
@pytest.mark.skipif(not REAL, reason="set CAPSRUN_REAL_AFFNIST to a data root holding affNIST/ test files")
def test_real_ones_are_upright():
    """The orientation check on the real file: affNIST's ones (small rotations, shears) stay
    taller than wide, so their ink spreads more along rows than columns. Transposed, it would not."""
    images, labels = load_affnist_test(REAL, download=False, limit=10_000)
    ones = images[labels == 1, 0].double()
    assert len(ones) > 100
    rows, cols = torch.arange(40.0, dtype=torch.float64)[:, None], torch.arange(40.0, dtype=torch.float64)[None, :]
    mass = ones.sum(dim=(1, 2))
    mean_r, mean_c = (ones * rows).sum(dim=(1, 2)) / mass, (ones * cols).sum(dim=(1, 2)) / mass
    var_r = (ones * (rows - mean_r[:, None, None]) ** 2).sum(dim=(1, 2)) / mass
    var_c = (ones * (cols - mean_c[:, None, None]) ** 2).sum(dim=(1, 2)) / mass
    assert (var_r > var_c).float().mean() > 0.8
