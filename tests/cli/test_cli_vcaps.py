"""End-to-end: ``capsrun train model=vcaps`` and ``capsrun sample`` on MNIST-format fixtures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator

from helpers import TINY, ok, run_capsrun

pytestmark = pytest.mark.slow

VTINY = [
    "model=vcaps",
    "model.net.conv1_channels=16",
    "model.net.primary_types=4",
    "model.net.latent_dim=8",
    "model.net.decoder_hidden=[32,64]",
    "trainer.batch_size=32",
    "trainer.eval_batch_size=100",
    "trainer.log_every=5",
    "trainer.progress=false",
]


@pytest.fixture(scope="module")
def runs(mnist_root, tmp_path_factory) -> dict[str, Path]:
    """A tiny CapsNet classifier, then a tiny VCaps with the adversary, measured by it."""
    work = tmp_path_factory.mktemp("work")
    cls, vc = work / "classifier", work / "vcaps"
    ok(run_capsrun("train", *TINY, "trainer.epochs=4", f"hydra.run.dir={cls}", cwd=work, data_root=mnist_root))
    ok(
        run_capsrun(
            "train",
            *VTINY,
            "model.adversarial_weight=0.01",
            "trainer.epochs=12",
            f"eval_classifier={cls}/checkpoints/best.pt",
            "sample_quality.per_class=10",
            "sample_quality.real_images=200",
            f"hydra.run.dir={vc}",
            cwd=work,
            data_root=mnist_root,
        )
    )
    return {"work": work, "classifier": cls, "vcaps": vc, "data": mnist_root}


def _scalars(run_dir: Path, tag: str) -> list[float]:
    ea = event_accumulator.EventAccumulator(str(run_dir), size_guidance={event_accumulator.SCALARS: 0})
    ea.Reload()
    return [e.value for e in ea.Scalars(tag)]


def test_vcaps_classifies_and_its_reconstruction_improves(runs):
    metrics = json.loads((runs["vcaps"] / "metrics.json").read_text())
    assert metrics["test/accuracy"] > 60.0, metrics  # chance: 10 %; ~100 % on this fixture
    recon = _scalars(runs["vcaps"], "test/loss/reconstruction")
    assert len(recon) == 12 and recon[-1] < 0.8 * recon[0], recon
    # present capsules end closer to the prior than absent ones
    assert metrics["test/kl/present"] < metrics["test/kl/absent"]
    assert {"train/loss/adversarial", "train/loss/discriminator", "train/loss/kl_margin"} <= set(metrics)


def test_sample_quality_logged_every_epoch(runs):
    metrics = json.loads((runs["vcaps"] / "metrics.json").read_text())
    assert 0.0 <= metrics["samples/classifier_accuracy"] <= 100.0
    assert metrics["samples/frechet_distance"] >= 0.0
    assert len(_scalars(runs["vcaps"], "samples/frechet_distance")) == 12
    ea = event_accumulator.EventAccumulator(str(runs["vcaps"]))
    ea.Reload()
    assert "samples/class_conditional" in ea.Tags()["images"]


def test_vcaps_resumes_with_its_discriminator(runs):
    result = ok(
        run_capsrun(
            "train",
            *VTINY,
            "model.adversarial_weight=0.01",
            "trainer.epochs=13",
            f"eval_classifier={runs['classifier']}/checkpoints/best.pt",
            "sample_quality.per_class=10",
            "sample_quality.real_images=200",
            f"hydra.run.dir={runs['vcaps']}",
            cwd=runs["work"],
            data_root=runs["data"],
        )
    )
    assert "resumed from" in result.stderr + result.stdout
    assert json.loads((runs["vcaps"] / "metrics.json").read_text())["epoch"] == 13


def test_sample_writes_grids_and_quality(runs, tmp_path):
    out = tmp_path / "s"
    ok(
        run_capsrun(
            "sample",
            f"checkpoint={runs['vcaps']}/checkpoints/best.pt",
            f"eval_classifier={runs['classifier']}/checkpoints/best.pt",
            "samples_per_class=3",
            "inputs=2",
            "variations=4",
            "sample_quality.per_class=10",
            "sample_quality.real_images=200",
            "trainer.progress=false",
            f"hydra.run.dir={out}",
            cwd=runs["work"],
            data_root=runs["data"],
        )
    )
    # samples drawn 3x (84 px) with 2 px padding -> 2 + n * 86 px; under each judged one a 16 px caption
    assert Image.open(out / "class_conditional.png").size == (2 + 3 * 86, 2 + 10 * 102)  # 3 per class, 10 rows
    assert Image.open(out / "variations.png").size == (2 + 5 * 86, 2 + 2 * 86)  # input + mean + 3 samples
    # make_grid's layout for Fig. 4: 2 px padding around 28 px images -> 2 + n * 30 px
    # Fig. 4: 8 capsule dimensions x 11 perturbations (-0.25..0.25 by 0.05)
    assert Image.open(out / "perturbations_0.png").size == (2 + 11 * 30, 2 + 8 * 30)
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"samples/classifier_accuracy", "samples/frechet_distance"} <= set(metrics)


def test_sample_from_capsnet_draws_the_perturbation_grid_only(runs, tmp_path):
    out = tmp_path / "s"
    ok(
        run_capsrun(
            "sample",
            f"checkpoint={runs['classifier']}/checkpoints/best.pt",
            "inputs=1",
            "trainer.progress=false",
            f"hydra.run.dir={out}",
            cwd=runs["work"],
            data_root=runs["data"],
        )
    )
    assert sorted(p.name for p in out.glob("*.png")) == ["perturbations_0.png"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "no checkpoint given"),
        (["checkpoint=nowhere.pt"], "nowhere.pt"),
        (["checkpoint={vcaps}/checkpoints/best.pt", "eval_classifier={vcaps}/checkpoints/best.pt"], "needs a capsnet"),
        (["checkpoint={vcaps}/checkpoints/best.pt", "inputs=0"], "inputs must be an integer >= 1"),
    ],
)
def test_sample_errors_are_one_line(runs, tmp_path, args, message):
    args = [a.format(vcaps=runs["vcaps"]) for a in args]
    result = run_capsrun("sample", *args, f"hydra.run.dir={tmp_path / 's'}", cwd=runs["work"], data_root=runs["data"])
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("capsrun: error")]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_eval_classifier_for_another_dataset_is_refused(runs, tmp_path):
    result = run_capsrun(
        "train",
        *VTINY,
        "dataset=fashion_mnist",
        f"eval_classifier={runs['classifier']}/checkpoints/best.pt",
        f"hydra.run.dir={tmp_path / 'r'}",
        cwd=runs["work"],
        data_root=runs["data"],
    )
    assert result.returncode == 2
    assert "trained on mnist" in result.stderr and "Traceback" not in result.stderr
