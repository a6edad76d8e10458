"""Every dataset protocol and experiment config, end to end through the real CLI on fixtures
written in each dataset's real format (IDX, CIFAR pickle batches, affNIST .mat)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from tensorboard.backend.event_processing import event_accumulator

from capsrun import registry
from capsrun.cli import conf_dir
from capsrun.train import evaluate_ensemble
from helpers import TINY, learnable_digits, run_capsrun, write_cifar, write_mat, write_mnist

EXPERIMENTS = sorted(p.stem for p in (conf_dir() / "experiment").glob("*.yaml"))
MODELS = sorted(p.stem for p in (conf_dir() / "model").glob("*.yaml"))
DATASETS = sorted(p.stem for p in (conf_dir() / "dataset").glob("*.yaml"))


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def _build_model(cfg):
    return registry.model(cfg)  # the one place that sizes models from the dataset


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_as_overrides_only(experiment):
    cfg = _compose(f"experiment={experiment}")
    assert cfg.routing.iterations >= 1 and cfg.dataset.name in DATASETS
    text = (conf_dir() / "experiment" / f"{experiment}.yaml").read_text()
    assert text.startswith("# @package _global_") and "arXiv:" in text  # the paper it reproduces


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("dataset", ["mnist", "multimnist"])
def test_every_model_sizes_itself_from_the_dataset(model, dataset):
    size = 28 if dataset == "mnist" else 36
    out = _build_model(_compose(f"model={model}", f"dataset={dataset}")).eval()(torch.zeros(2, 1, size, size))
    if out.scores is None:  # the capsule RBM has no classes: it models the images
        assert out.reconstruction.shape == (2, 1, size, size)
    else:
        assert out.scores.shape == (2, 10)


@pytest.mark.parametrize(
    "experiment, primary_caps, params",
    [
        ("sabour_mnist", 1152, 8_215_728),  # 8,215,568 + the 160 digit-capsule biases
        ("sabour_multimnist", 3200, 11_361_968),  # 11,361,808 + 160 biases; the paper: 11.36M
        ("sabour_affnist", 32 * 12 * 12, None),  # 40 -> conv1 32 -> primary 12
        ("sabour_cifar10", 9216, None),  # 24x24 crops, SAME padding, 64 types: 12x12x64
    ],
)
def test_paper_model_sizes(experiment, primary_caps, params):
    model = _build_model(_compose(f"experiment={experiment}"))
    assert model.num_primary_caps == primary_caps
    if params is not None:
        assert sum(p.numel() for p in model.parameters()) == params
    if experiment == "sabour_cifar10":
        assert model.decoder is None and model.digit_caps.leaky


def test_baseline_cnn_parameter_count():
    model = _build_model(_compose("model=baseline_cnn"))
    assert sum(p.numel() for p in model.parameters()) == 35_445_522


# --- end to end on fixtures ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """MNIST (learnable), CIFAR10 and affNIST fixtures in their real formats, in one data root."""
    root = write_mnist(tmp_path_factory.mktemp("protocols"), n_train=320, n_test=100)
    write_mnist(root, n_train=32, n_test=50, folder="FashionMNIST")
    write_cifar(root, n=16)
    digits, labels = learnable_digits(64, seed=7)
    canvas = np.zeros((64, 40, 40), np.uint8)
    canvas[:, 6:34, 6:34] = digits
    write_mat(root / "affNIST" / "test_batches" / "1.mat", canvas, labels)
    return root


CNN_TINY = ["trainer.batch_size=32", "trainer.eval_batch_size=100", "trainer.log_every=5", "trainer.progress=false"]


def _train(data_root: Path, tmp_path: Path, *overrides: str, tiny: list[str] = TINY) -> dict:
    run = tmp_path / "run"
    result = run_capsrun("train", *tiny, f"hydra.run.dir={run}", *overrides, cwd=tmp_path, data_root=data_root)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads((run / "metrics.json").read_text())


@pytest.mark.slow
def test_sabour_affnist_reports_padded_mnist_and_affnist(data_root, tmp_path):
    metrics = _train(data_root, tmp_path, "experiment=sabour_affnist", "trainer.epochs=3")
    assert {"test/accuracy", "affnist/accuracy", "affnist/error", "affnist/loss/total"} <= set(metrics)
    assert metrics["test/accuracy"] > 40.0  # learnable fixture digits, shifted by up to 6 px on 40x40
    assert 0.0 <= metrics["affnist/accuracy"] <= 100.0
    ea = event_accumulator.EventAccumulator(str(tmp_path / "run"))
    ea.Reload()
    assert {"affnist/accuracy", "test/accuracy"} <= set(ea.Tags()["scalars"])


@pytest.mark.slow
def test_sabour_multimnist_learns_pairs(data_root, tmp_path):
    metrics = _train(
        data_root,
        tmp_path,
        "experiment=sabour_multimnist",
        "trainer.epochs=4",
        "dataset.test_size=200",
        "dataset.epoch_size=640",
        "scheduler.warmup_steps=10",  # the experiment's 1000 would outlast this 80-step run
    )
    # an image counts only if both classes are the two longest capsules: chance is 1/45 = 2.2 %
    assert metrics["test/accuracy"] > 15.0, metrics
    assert metrics["test/loss/reconstruction"] > 0
    ea = event_accumulator.EventAccumulator(str(tmp_path / "run"))
    ea.Reload()
    image = ea.Images("test/reconstructions")[-1]
    assert image.width > image.height  # inputs above the two-colour overlays


@pytest.mark.slow
def test_sabour_cifar10_one_epoch(data_root, tmp_path):
    metrics = _train(
        data_root, tmp_path, "experiment=sabour_cifar10", "trainer.epochs=1", "model.net.decoder_hidden=null"
    )
    assert "test/loss/reconstruction" not in metrics  # no decoder in the CIFAR10 model
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["config"]["routing"]["leaky"] is True and ckpt["config"]["dataset"]["name"] == "cifar10"
    assert ckpt["model"]["conv1.weight"].shape[1] == 3


@pytest.mark.slow
def test_baseline_cnn_learns_on_the_same_engine(data_root, tmp_path):
    metrics = _train(
        data_root,
        tmp_path,
        "model=baseline_cnn",
        "model.net.channels=[8,8,4]",
        "model.net.hidden=[32,16]",
        "model.net.dropout=0.1",
        "trainer.epochs=5",
        tiny=CNN_TINY,
    )
    assert "train/loss/cross_entropy" in metrics and metrics["test/accuracy"] > 50.0, metrics


@pytest.mark.slow
def test_eval_ensemble_and_other_datasets(data_root, tmp_path):
    """sabour_mnist on fixtures; then eval: the ensemble of a model with itself is the model; a
    dataset of the same shape (dataset=fashion_mnist) is evaluated; one of another shape is refused."""
    _train(data_root, tmp_path, "experiment=sabour_mnist", "trainer.epochs=1")
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"

    def evaluate(*args: str):
        out = tmp_path / f"eval{len(list(tmp_path.glob('eval*')))}"
        result = run_capsrun(
            "eval", *args, f"hydra.run.dir={out}", "trainer.progress=false", cwd=tmp_path, data_root=data_root
        )
        return result, out

    result, out = evaluate(f"checkpoint={ckpt},{ckpt}")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test/accuracy"] == pytest.approx(metrics["member/0/test/accuracy"])
    assert metrics["member/1/test/accuracy"] == metrics["member/0/test/accuracy"]

    result, out = evaluate(f"checkpoint={ckpt}", "dataset=fashion_mnist")
    assert result.returncode == 0, result.stderr
    assert "FashionMNIST" not in result.stderr and "test accuracy" in result.stdout.replace(
        "test accuracy", "test accuracy"
    )
    assert json.loads((out / "metrics.json").read_text())["test/loss/total"] > 0

    result, _ = evaluate(f"checkpoint={ckpt}", "dataset=cifar10")
    assert result.returncode == 2 and "the checkpoint was trained on mnist" in result.stderr


class _Fixed(torch.nn.Module):
    """A 'model' whose class scores are fixed, to check the ensemble rule by hand."""

    def __init__(self, scores):
        super().__init__()
        self.scores = torch.tensor(scores)

    def forward(self, x):
        return type("Out", (), {"scores": self.scores[: len(x)]})()


class _Batches:
    def __init__(self, n, labels):
        self.x, self.y = torch.zeros(n, 1), torch.tensor(labels)

    def epoch(self, e=0):
        yield self.x, self.y


def test_ensemble_sums_scores_before_the_argmax():
    # model a votes 0, 1; model b votes 1, 1; summed: [0.9, 0.7] -> 0 and [0.2, 1.2] -> 1
    a = _Fixed([[0.6, 0.1], [0.1, 0.3]])
    b = _Fixed([[0.3, 0.6], [0.1, 0.9]])
    metrics = evaluate_ensemble([a, b], _Batches(2, [0, 1]))
    assert metrics["test/accuracy"] == 100.0
    assert evaluate_ensemble([b], _Batches(2, [0, 1]))["test/accuracy"] == 50.0
