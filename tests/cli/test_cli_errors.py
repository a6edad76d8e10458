"""Bad input: one line on stderr naming the problem and the fix, exit code 2, no traceback."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest
import torch

from helpers import TINY, run_capsrun, write_mnist

pytestmark = pytest.mark.slow


def _assert_clean_error(result, *needles: str) -> None:
    err = result.stderr.strip()
    assert result.returncode == 2, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr + result.stdout
    assert len(err.splitlines()) == 1, err
    assert err.startswith("capsrun: error: ")
    for needle in needles:
        assert needle in err, err


@pytest.mark.parametrize(
    "override, needle",
    [
        ("routing.iterations=0", "routing.iterations must be an integer >= 1"),
        ("routing.iterations=-1", "routing.iterations must be an integer >= 1"),
        ("routing.iterations=abc", "routing.iterations must be an integer >= 1, got 'abc'"),
        ("trainer.batch_size=0", "trainer.batch_size"),
        ("data.train_limit=-5", "data.train_limit"),
        ("model=nope", "unknown model 'nope'; choose one of: baseline_cnn, baseline_cnn_multi, capsnet"),
        ("dataset=nope", "unknown dataset 'nope'"),
        ("experiment=nope", "unknown experiment 'nope'"),
        ("trainer.epoch=3", "there is no key 'trainer.epoch' (did you mean trainer.epochs?)"),
        ("model=capsnett", "unknown model 'capsnett' (did you mean model=capsnet?)"),
        ("dataset=mnsit", "unknown dataset 'mnsit' (did you mean dataset=mnist?)"),
        ("+model.net.dgit_dim=4", "digit_dim"),
        ("trainer.precision=fp16", "trainer.precision must be one of fp32, tf32, bf16, got 'fp16'"),
        ("trainer.average=1", "trainer.average must be a number in [0, 1), got 1"),
        ("trainer.average=-0.1", "trainer.average must be a number in [0, 1)"),
    ],
)
def test_bad_config_values(override, needle, mnist_root, tmp_path, capsrun_here):
    result = capsrun_here(
        "train", *TINY, override, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, data_root=mnist_root
    )
    _assert_clean_error(result, needle)


def test_bad_value_in_a_sweep(mnist_root, tmp_path):
    result = run_capsrun(
        "train",
        "-m",
        *TINY,
        "model=capsnet,nope",
        f"hydra.sweep.dir={tmp_path / 's'}",
        cwd=tmp_path,
        data_root=mnist_root,
    )
    _assert_clean_error(result, "unknown model 'nope'")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda(mnist_root, tmp_path):
    result = run_capsrun(
        "train", *TINY, "trainer.device=cuda", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, data_root=mnist_root
    )
    _assert_clean_error(result, "no CUDA device", "trainer.device=cpu")


@pytest.mark.parametrize(
    "dataset, folder",
    [
        ("mnist", "MNIST/raw"),
        ("fashion_mnist", "FashionMNIST/raw"),
        ("cifar10", "cifar-10-batches-py"),
        ("multimnist", "MNIST/raw"),
    ],
)
def test_missing_dataset_without_download_says_where_to_put_files(dataset, folder, tmp_path, capsrun_here):
    result = capsrun_here(
        "train",
        *TINY,
        f"dataset={dataset}",
        "data.download=false",
        f"data.root={tmp_path / 'e'}",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    _assert_clean_error(result, str(tmp_path / "e" / folder), "data.download=true")
    logged = (tmp_path / "run" / "train.log").read_text().splitlines()  # the failed run's own log says why
    assert logged[-1].endswith(result.stderr.strip()) and "[ERROR]" in logged[-1]


def test_missing_affnist_test_set(mnist_root, tmp_path):
    result = run_capsrun(
        "train",
        *TINY,
        "dataset=affnist",
        "data.download=false",
        f"hydra.run.dir={tmp_path / 'r'}",
        cwd=tmp_path,
        data_root=mnist_root,
    )
    _assert_clean_error(result, str(mnist_root / "affNIST"), "test.mat", "data.download=true")


def test_truncated_idx_file(tmp_path):
    root = write_mnist(tmp_path / "data")
    path = root / "MNIST" / "raw" / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    result = run_capsrun("train", *TINY, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, data_root=root)
    _assert_clean_error(result, "train-images-idx3-ubyte.gz is truncated")


def test_corrupt_gzip(tmp_path):
    root = write_mnist(tmp_path / "data")
    path = root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:20])
    result = run_capsrun("train", *TINY, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, data_root=root)
    _assert_clean_error(result, "t10k-labels-idx1-ubyte.gz", "download it again")


@pytest.mark.parametrize("kind", ["text", "torch-dict", "missing", "truncated"])
def test_eval_rejects_what_is_not_a_checkpoint(kind, mnist_root, tmp_path):
    path = tmp_path / "model.pt"
    if kind == "text":
        path.write_text("not a checkpoint\n")
    elif kind == "torch-dict":
        torch.save({"weights": torch.zeros(3)}, path)
    elif kind == "truncated":
        from capsrun import checkpoint

        checkpoint.save(path, {"model": {"w": torch.zeros(1000)}, "config": {}, "epoch": 1})
        path.write_bytes(path.read_bytes()[:300])
    result = run_capsrun(
        "eval", f"checkpoint={path}", f"hydra.run.dir={tmp_path / 'eval'}", cwd=tmp_path, data_root=mnist_root
    )
    _assert_clean_error(result, str(path))


def test_eval_without_checkpoint(tmp_path):
    result = run_capsrun("eval", f"hydra.run.dir={tmp_path / 'eval'}", cwd=tmp_path)
    _assert_clean_error(result, "checkpoint=")


def test_resume_from_a_checkpoint_of_another_model(mnist_root, tmp_path):
    first = tmp_path / "first"
    ok = run_capsrun("train", *TINY, "trainer.epochs=1", f"hydra.run.dir={first}", cwd=tmp_path, data_root=mnist_root)
    assert ok.returncode == 0, ok.stderr
    result = run_capsrun(
        "train",
        *TINY,
        "model.net.primary_types=2",
        f"trainer.resume={first}/checkpoints/last.pt",
        f"hydra.run.dir={tmp_path / 'second'}",
        cwd=tmp_path,
        data_root=mnist_root,
    )
    expected = "was trained with model.net.primary_types=4, this run has model.net.primary_types=2"
    _assert_clean_error(result, expected, "another hydra.run.dir")


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["frobnicate"], "unknown command 'frobnicate'"),
        (["trian"], "unknown command 'trian' (did you mean train?)"),
        ([], "usage"),
    ],
)
def test_unknown_command(argv, needle, tmp_path):
    result = run_capsrun(*argv, cwd=tmp_path)
    assert result.returncode == 2
    assert needle in result.stderr + result.stdout


def test_help_lists_commands(tmp_path):
    result = run_capsrun("--help", cwd=tmp_path)
    assert result.returncode == 0
    assert "train" in result.stdout and "eval" in result.stdout


def test_hydra_flags_still_work(tmp_path):
    result = run_capsrun("train", "routing.iterations=2", "--cfg", "job", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "iterations: 2" in result.stdout and "routing_iterations: ${routing.iterations}" in result.stdout
    helped = run_capsrun("train", "--help", cwd=tmp_path)
    assert helped.returncode == 0 and "model: baseline_cnn, baseline_cnn_multi, capsnet" in helped.stdout
    assert not (Path(tmp_path) / "outputs").exists()  # --cfg / --help start no run
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_version(tmp_path):
    from capsrun import __version__

    result = run_capsrun("--version", cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == f"capsrun {__version__}", result.stderr
