"""End-to-end: ``capsrun train model=rbm|capsrbm``, ``capsrun eval`` (AIS) and ``capsrun sample``
on MNIST-format fixtures."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator

from capsrun.datasets import load_split
from capsrun.models.energy import RETUNE_EVERY
from helpers import TINY, ok, run_capsrun, train_until, write_idx, write_mnist

pytestmark = pytest.mark.slow

SMALL = {
    "rbm": ["model=rbm", "model.net.hidden=32"],
    "capsrbm": ["model=capsrbm", "model.net.hidden_caps=8", "model.net.groups=2", "model.net.hidden_dim=4"],
}
COMMON = [  # the experiments' recipe (SGD, linear decay to 0), sized for the fixtures
    "optimizer=sgd",
    "optimizer.lr=0.1",
    "optimizer.momentum=0",
    "scheduler=linear",
    "dataset.max_shift=0",
    "trainer.batch_size=32",
    "trainer.eval_batch_size=100",
    "trainer.log_every=5",
    "trainer.progress=false",
    "sampler.chains=16",
    "sampler.steps=20",
    "ais.runs=20",
    "ais.temperatures=300",
    "ais.base_images=320",
]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("energy")


@pytest.fixture(scope="module")
def classifier(work, mnist_root) -> Path:
    run = work / "classifier"
    ok(run_capsrun("train", *TINY, "trainer.epochs=3", f"hydra.run.dir={run}", cwd=work, data_root=mnist_root))
    return run / "checkpoints" / "best.pt"


@pytest.fixture(scope="module", params=["rbm", "capsrbm"])
def energy_run(request, work, mnist_root, classifier) -> tuple[str, Path]:
    name = request.param
    run = work / name
    args = [
        *SMALL[name],
        *COMMON,
        "trainer.epochs=30",
        f"eval_classifier={classifier}",
        "sample_quality.real_images=100",
        "sample_quality.every_epochs=10",
    ]
    ok(run_capsrun("train", *args, f"hydra.run.dir={run}", cwd=work, data_root=mnist_root))
    return name, run


def _scalars(run: Path, tag: str) -> list[float]:
    ea = event_accumulator.EventAccumulator(str(run), size_guidance={event_accumulator.SCALARS: 0})
    ea.Reload()
    return [e.value for e in ea.Scalars(tag)]


def _base_rate_log_likelihood(root: Path) -> float:
    """Mean test log p(v) of the independent-pixel model fitted to the training images: exact."""
    train, _ = load_split("mnist", root, train=True, download=False)
    test, _ = load_split("mnist", root, train=False, download=False)
    v_train = (train.float() / 255 > 0.5).float().flatten(1)
    v_test = (test.float() / 255 > 0.5).float().flatten(1)
    p = (v_train.sum(0) + 0.5) / (len(v_train) + 1)
    return float((v_test * p.log() + (1 - v_test) * (1 - p).log()).sum(1).mean())


def test_energy_models_learn_beyond_the_base_rate_model(energy_run, mnist_root):
    """The AIS test log-likelihood after training beats the exact one of independent pixels."""
    _, run = energy_run
    metrics = json.loads((run / "metrics.json").read_text())
    base = _base_rate_log_likelihood(mnist_root)
    assert metrics["test/log_likelihood"] > base + 20, (metrics["test/log_likelihood"], base)
    assert metrics["ais/log_w_std"] < 5 and metrics["ais/runs"] == 20 and metrics["ais/temperatures"] == 300
    assert metrics["test/log_likelihood"] < 0


def test_energy_models_log_their_monitors_and_sample_quality(energy_run):
    name, run = energy_run
    ea = event_accumulator.EventAccumulator(str(run))
    ea.Reload()
    tags = ea.Tags()
    for tag in (
        "train/loss/total",
        "train/free_energy/data",
        "train/free_energy/model",
        "train/chain/acceptance",
        "test/log_likelihood/pseudo",
        "test/log_likelihood",
        "samples/acceptance",
        "samples/recognised",
        "samples/frechet_distance",
        "samples/class_share/0",
    ):
        assert tag in tags["scalars"], tag
    assert not any(t.endswith("accuracy") for t in tags["scalars"])  # no labels, no accuracy
    assert "samples/gibbs" in tags["images"] and "samples/gibbs_mean" in tags["images"]
    shares = [_scalars(run, f"samples/class_share/{k}")[-1] for k in range(10)]
    assert sum(shares) == pytest.approx(100.0)
    assert len(_scalars(run, "samples/recognised")) == 3  # epochs 10, 20, 30 (sample_quality.every_epochs=10)
    assert len(_scalars(run, "samples/acceptance")) == 3  # the grid and its figures: with the judged ones
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert state["chains"].shape == (32, 1, 28, 28) and bool(state["chains_started"])
    assert set(state["chains"].unique().tolist()) <= {0.0, 1.0}
    if name == "rbm":
        assert _scalars(run, "train/chain/acceptance") == pytest.approx([1.0] * len(_scalars(run, "train/loss/total")))


def test_eval_estimates_the_log_likelihood_by_ais(energy_run, mnist_root, work):
    _, run = energy_run
    out = work / f"eval_{run.name}"
    args = [f"checkpoint={run}/checkpoints/last.pt", "ais.runs=20", "ais.temperatures=300", f"hydra.run.dir={out}"]
    result = ok(run_capsrun("eval", *args, "trainer.progress=false", cwd=work, data_root=mnist_root))
    metrics = json.loads((out / "metrics.json").read_text())
    trained = json.loads((run / "metrics.json").read_text())
    # the same checkpoint, the same AIS settings and seed: the same estimate as at the end of training
    assert metrics["test/log_likelihood"] == pytest.approx(trained["test/log_likelihood"], abs=1e-3)
    assert "test log-likelihood" in result.stdout + result.stderr
    if run.name == "capsrbm":  # log p(v) itself estimated: its kind, samples and spread beside it
        assert metrics["log_likelihood_kind"].startswith("estimate: log p(v) by importance sampling")
        assert metrics["test/log_likelihood_samples"] == 100 and metrics["test/log_likelihood_spread"] >= 0
    else:
        assert metrics["log_likelihood_kind"] == "exact free energy; log Z by AIS"
        assert "test/log_likelihood_samples" not in metrics


@pytest.mark.parametrize("energy_run", ["capsrbm"], indirect=True)
def test_analyze_reports_the_capsule_rbm_s_couplings_and_draws_its_parse(energy_run, mnist_root, work):
    _, run = energy_run
    out = work / "analyze_capsrbm"
    ok(
        run_capsrun(
            "analyze", f"checkpoint={run}", "examples=64", f"hydra.run.dir={out}", cwd=work, data_root=mnist_root
        )
    )
    report = json.loads((out / "health.json").read_text())
    health = next(iter(report["runs"].values()))["health"]
    assert 0 <= health["hidden_caps/coupling/entropy"] <= 1 and health["hidden_caps/routing/std"] >= 0
    with Image.open(out / "hidden_caps_parse.png") as picture:
        assert picture.size == (3 * 16 * 29, 3 * (2 * 29 - 1)) and picture.mode == "RGB"  # a row per group


@pytest.mark.parametrize("iterations", [1, 2])
def test_routing_iterations_drive_the_capsule_rbm(mnist_root, tmp_path, iterations):
    """``routing.iterations`` is the capsule RBM's number of mean-field passes (stored, and read
    back from the checkpoint), never ignored."""
    run = tmp_path / "run"
    args = [*SMALL["capsrbm"], *COMMON, "trainer.epochs=1", "data.train_limit=64", "ais.at_end=false"]
    ok(run_capsrun("train", *args, f"routing.iterations={iterations}", f"hydra.run.dir={run}", cwd=tmp_path,
                   data_root=mnist_root))  # fmt: skip
    from capsrun import registry

    model, cfg, _ = registry.from_checkpoint(run / "checkpoints" / "last.pt", torch.device("cpu"))
    assert model.hidden_caps.iterations == iterations == cfg.model.net.routing_iterations


def test_sample_writes_grids_samples_and_their_quality(energy_run, mnist_root, work, classifier):
    _, run = energy_run
    out = work / f"samples_{run.name}"
    args = [
        f"checkpoint={run}/checkpoints/best.pt",
        "sampler.chains=9",
        "sampler.steps=30",
        f"eval_classifier={classifier}",
        "sample_quality.real_images=100",
        f"hydra.run.dir={out}",
    ]
    result = ok(run_capsrun("sample", *args, cwd=work, data_root=mnist_root))
    for png in ("gibbs", "gibbs_mean", "chain"):
        image = np.asarray(Image.open(out / f"{png}.png"))
        assert image.ndim == 3 and image.shape[0] > 28
    samples = torch.load(out / "samples.pt", weights_only=True)
    assert samples.shape == (9, 1, 28, 28) and samples.dtype == torch.float32
    assert set(samples.unique().tolist()) <= {0.0, 1.0}
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 < metrics["samples/acceptance"] <= 1
    assert 0 <= metrics["samples/recognised"] <= 100 and metrics["samples/frechet_distance"] >= 0
    assert 0 <= metrics["samples/recognised_real"] <= 100
    assert sum(metrics[f"samples/class_share/{k}"] for k in range(10)) == pytest.approx(100.0)
    assert metrics["samples/judge_temperature"] > 0 and "samples/recognised_uncalibrated" in metrics
    # the 100 test images after the reference 100: real digits' distance at 9 images, beside the samples'
    assert metrics["samples/frechet_distance_real"] > 0 and metrics["samples/frechet_distance_real_std"] > 0
    assert f"(9 binarised test images: {metrics['samples/frechet_distance_real']:.3f}" in result.stdout + result.stderr
    assert "samples/swap_rate" not in metrics  # trained without tempering: its own sampler is the plain chain


def test_sample_judges_the_chains_along_the_way(energy_run, mnist_root, work, classifier):
    """judge_every=10 of 30 steps: the judge's figures after 10 and 20 steps in the log, in
    metrics.json's by_step and in TensorBoard at those steps (the final ones at 30); judging
    draws nothing from the chains: the samples equal a run without it."""
    _, run = energy_run
    args = [
        f"checkpoint={run}/checkpoints/best.pt",
        "sampler.chains=9",
        "sampler.steps=30",
        "sampler.tempering=3",
        f"eval_classifier={classifier}",
        "sample_quality.real_images=100",
    ]
    out, plain = work / f"judged_{run.name}", work / f"unjudged_{run.name}"
    result = ok(run_capsrun("sample", *args, "judge_every=10", f"hydra.run.dir={out}", cwd=work, data_root=mnist_root))
    ok(run_capsrun("sample", *args, f"hydra.run.dir={plain}", cwd=work, data_root=mnist_root))
    logged = result.stdout + result.stderr
    assert "after 10 steps: " in logged and "after 20 steps: " in logged and "after 30 steps" not in logged
    metrics = json.loads((out / "metrics.json").read_text())
    assert [m["step"] for m in metrics["by_step"]] == [10, 20]
    for m in metrics["by_step"]:
        assert sum(m[f"samples/class_share/{k}"] for k in range(10)) == pytest.approx(100.0)
        assert m["samples/frechet_distance"] >= 0 and 0 <= m["samples/recognised"] <= 100
    ea = event_accumulator.EventAccumulator(str(out))
    ea.Reload()
    events = ea.Scalars("samples/recognised")
    assert [e.step for e in events] == [10, 20, 30]
    assert [e.value for e in events] == pytest.approx(
        [*(m["samples/recognised"] for m in metrics["by_step"]), metrics["samples/recognised"]]
    )
    assert "by_step" not in json.loads((plain / "metrics.json").read_text())
    same = torch.load(out / "samples.pt", weights_only=True), torch.load(plain / "samples.pt", weights_only=True)
    assert torch.equal(*same)


def test_sample_with_a_tempering_ladder(energy_run, mnist_root, work):
    """sampler.tempering=4 on a model trained without: the base-rate model from the training images, each
    step a sweep of 4 levels; the swap rate in metrics.json."""
    _, run = energy_run
    out = work / f"tempered_{run.name}"
    args = [f"checkpoint={run}/checkpoints/last.pt", "sampler.chains=9", "sampler.steps=30", "sampler.tempering=4"]
    result = ok(run_capsrun("sample", *args, f"hydra.run.dir={out}", cwd=work, data_root=mnist_root))
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 < metrics["samples/swap_rate"] <= 1
    assert "parallel-tempering sweep of 4 levels" in result.stdout + result.stderr
    samples = torch.load(out / "samples.pt", weights_only=True)
    assert samples.shape == (9, 1, 28, 28) and set(samples.unique().tolist()) <= {0.0, 1.0}
    # by default the ladder re-spaces itself in the first half of the sweeps (ladder_tune: null)
    tuned = metrics["ladder"]
    assert tuned[0] == 0 and tuned[-1] == 1 and tuned != pytest.approx([0, 1 / 3, 2 / 3, 1]) and tuned == sorted(tuned)
    assert "the ladder as tuned in the first 15 sweeps: 0, " in result.stdout + result.stderr
    # ladder_from: the upper part of the ladder; no tuned one in this checkpoint, so evenly spaced
    short = work / f"short_{run.name}"
    args[-1:] = ["sampler.tempering=4", "sampler.ladder_from=0.4", "sampler.ladder_tune=0"]
    result = ok(run_capsrun("sample", *args, f"hydra.run.dir={short}", cwd=work, data_root=mnist_root))
    assert json.loads((short / "metrics.json").read_text())["ladder"] == pytest.approx([0.4, 0.6, 0.8, 1.0])
    assert "sweep of 4 levels (inverse temperatures 0.4, 0.6, 0.8, 1)" in result.stdout + result.stderr
    # tuned from the ladder given: its lowest level stays
    from_short = work / f"short_tuned_{run.name}"
    tune = [*args[:-1], "sampler.ladder_tune=10", f"hydra.run.dir={from_short}"]
    ok(run_capsrun("sample", *tune, cwd=work, data_root=mnist_root))
    tuned = json.loads((from_short / "metrics.json").read_text())["ladder"]
    assert tuned[0] == pytest.approx(0.4) and tuned[-1] == 1 and tuned != pytest.approx([0.4, 0.6, 0.8, 1.0])
    # the shift moves the ladder's path only: with the same seed, another draw, the same shapes
    shifted = work / f"shifted_{run.name}"
    ok(
        run_capsrun(
            "sample", *args, "sampler.ladder_shift=2", f"hydra.run.dir={shifted}", cwd=work, data_root=mnist_root
        )
    )
    a, b = (torch.load(d / "samples.pt", weights_only=True) for d in (short, shifted))
    assert a.shape == b.shape and not torch.equal(a, b)
    # the plain chain (tempering=1) has no ladder to shift or tune: one line, exit 2
    bad = run_capsrun(
        "sample", *args[:3], "sampler.tempering=1", "sampler.ladder_shift=1", cwd=work, data_root=mnist_root
    )
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1
    assert "sampler.ladder_shift and sampler.ladder_tune shape a tempering ladder" in lines[0]


def test_sample_after_an_annealing_reports_the_models_own_class_mix(energy_run, mnist_root, work, classifier):
    """anneal=60: the chains start where an annealing from noise ended (the ladder's lower levels
    where it passed them); its effective sample size and the class mix by its importance weights
    in metrics.json and the log."""
    _, run = energy_run
    out = work / f"annealed_{run.name}"
    args = [
        f"checkpoint={run}/checkpoints/best.pt",
        "sampler.chains=12",
        "sampler.steps=5",
        "sampler.tempering=3",
        "anneal=60",
        f"eval_classifier={classifier}",
        "sample_quality.real_images=100",
        f"hydra.run.dir={out}",
    ]
    result = ok(run_capsrun("sample", *args, cwd=work, data_root=mnist_root))
    logged = result.stdout + result.stderr
    assert "annealing 12 chains from noise through 60 temperatures" in logged
    assert "12 chains from the end of an annealing from noise through 60 temperatures, 5 steps" in logged
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["samples/anneal/temperatures"] == 60 and metrics["samples/anneal/log_w_std"] > 0
    assert 1 <= metrics["samples/anneal/ess"] < 12  # uneven weights: 60 temperatures are few
    shares = [metrics[f"samples/anneal/class_share/{k}"] for k in range(10)]
    assert sum(shares) == pytest.approx(100.0) and 0 <= metrics["samples/anneal/recognised"] <= 100
    assert f"effective sample size {metrics['samples/anneal/ess']:.0f} of 12" in logged
    samples = torch.load(out / "samples.pt", weights_only=True)
    assert samples.shape == (12, 1, 28, 28) and set(samples.unique().tolist()) <= {0.0, 1.0}
    # without the judge: the weights' figures only
    bare = work / f"annealed_bare_{run.name}"
    ok(run_capsrun("sample", *args[:5], f"hydra.run.dir={bare}", cwd=work, data_root=mnist_root))
    plain = json.loads((bare / "metrics.json").read_text())
    assert plain["samples/anneal/ess"] == pytest.approx(metrics["samples/anneal/ess"])  # the same seed, the same runs
    assert "samples/anneal/class_share/0" not in plain


def test_training_with_tempering_logs_the_ladder_and_samples_with_it(mnist_root, tmp_path):
    run = tmp_path / "pt"
    args = [*SMALL["rbm"], *COMMON, "model.net.tempering=3", "trainer.epochs=2", "ais.at_end=false"]
    ok(run_capsrun("train", *args, f"hydra.run.dir={run}", cwd=tmp_path, data_root=mnist_root))
    rates = _scalars(run, "train/chain/swap_rate")
    assert rates and all(0 <= r <= 1 for r in rates) and max(rates) > 0
    assert len(_scalars(run, "samples/swap_rate")) == 2  # the epoch grid samples with the same ladder
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert state["ladder_chains"].shape == (2, 32, 1, 28, 28) and int(state["sweeps"]) > 0
    # init=chains: the frozen model's own ladder, started where training left it
    out = tmp_path / "own"
    args = [f"checkpoint={run}/checkpoints/last.pt", "init=chains", "sampler.chains=32", "sampler.steps=2"]
    result = ok(run_capsrun("sample", *args, f"hydra.run.dir={out}", cwd=tmp_path, data_root=mnist_root))
    logged = result.stdout + result.stderr
    assert "32 chains from the checkpoint's own chains, 2 steps, each a parallel-tempering sweep of 3" in logged
    samples = torch.load(out / "samples.pt", weights_only=True)
    # two sweeps move some pixels of the training chains, not all: from noise half of them would differ
    changed = (samples != state["chains"]).float().mean().item()
    assert 0 < changed < 0.25, changed
    result = run_capsrun("sample", *args[:2], "sampler.chains=33", cwd=tmp_path, data_root=mnist_root)
    assert result.returncode == 2 and "the checkpoint holds 32 chains; e.g. sampler.chains=32" in result.stderr


@pytest.mark.parametrize(
    "command, args, message",
    [
        ("sample", ["init=prior"], "init must be noise, data or chains"),
        ("sample", ["sampler.steps=-5"], "sampler.steps must be an integer >= 1"),
        ("sample", ["sampler.temperature=0"], "sampler.temperature must be a number > 0"),
        (
            "sample",
            ["sampler.tempering=1", "sampler.temperature=inf"],
            "sampler.temperature must be a number > 0, got inf",
        ),
        ("sample", ["sampler.ladder_shift=nan"], "sampler.ladder_shift must be a number in [0, 10] or null, got nan"),
        ("sample", ["seed=abc"], "seed must be an integer, got 'abc'"),
        ("eval", ["ais.seed=abc"], "ais.seed must be an integer >= 0, got 'abc'"),
        ("sample", ["sampler.tempering=0"], "sampler.tempering must be an integer >= 1"),
        (
            "sample",
            ["sampler.tempering=3", "sampler.temperature=2"],
            "a tempering ladder samples the model at temperature 1",
        ),
        ("sample", ["sampler.tempering=3", "sampler.ladder_from=1"], "sampler.ladder_from must be a number in [0, 1)"),
        (
            "sample",
            ["sampler.tempering=1", "sampler.ladder_from=0.5"],
            "sampler.ladder_from needs a tempering ladder of 2 or more levels",
        ),
        ("sample", ["sample_quality.confidence=1.5"], "sample_quality.confidence must be a number in (0, 1)"),
        ("sample", ["sample_quality.held_out=-1"], "sample_quality.held_out must be an integer >= 0"),
        ("sample", ["judge_every=-1"], "judge_every must be an integer >= 0"),
        ("sample", ["judge_every=100"], "judge_every needs a judge: add eval_classifier="),
        ("sample", ["anneal=1"], "anneal is a number of temperatures from 0 to 1: 0 (none) or >= 2"),
        ("sample", ["anneal=-3"], "anneal must be an integer >= 0"),
        ("sample", ["anneal=100", "init=data"], "anneal starts the chains from noise, not init=data"),
        ("eval", ["ais.temperatures=1"], "ais.temperatures must be an integer >= 2"),
        ("eval", ["ais.runs=0"], "ais.runs must be an integer >= 1"),
        ("eval", ["ais.base_images=-1"], "ais.base_images must be an integer >= 1"),
    ],
)
def test_bad_sampling_and_ais_settings_are_one_line(energy_run, mnist_root, work, command, args, message, capsrun_here):
    _, run = energy_run
    result = capsrun_here(command, f"checkpoint={run}/checkpoints/best.pt", *args, cwd=work, data_root=mnist_root)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_bad_training_ais_settings_fail_before_training(mnist_root, tmp_path):
    result = run_capsrun("train", *SMALL["rbm"], *COMMON, "ais.temperatures=0", cwd=tmp_path, data_root=mnist_root)
    assert result.returncode == 2 and "ais.temperatures must be an integer >= 2" in result.stderr
    assert not list(tmp_path.rglob("last.pt"))


@pytest.mark.parametrize(
    "model, args, needle",
    [
        ("rbm", ["model.net.tempering=0"], "model.net.tempering must be an integer >= 1, got 0"),
        ("rbm", ["model.net.tempering=3", "model.net.persistent=false"],
         "tempering must be >= 1 (and 1 unless persistent)"),
        ("capsrbm", ["routing.iterations=0"], "routing.iterations must be an integer >= 1, got 0"),
        ("capsrbm", ["model.net.likelihood_samples=-1"], "likelihood_samples must be an integer >= 1, got -1"),
        ("capsrbm", ["model.net.groups=7"], "must be a multiple of groups 7"),
    ],
)  # fmt: skip
def test_energy_settings_that_cannot_work_are_one_line(mnist_root, tmp_path, model, args, needle):
    result = run_capsrun("train", *SMALL[model], *COMMON, *args, cwd=tmp_path, data_root=mnist_root)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and needle in lines[0], result.stderr
    assert not list(tmp_path.rglob("last.pt"))


def test_a_training_ladder_shift_without_a_ladder_is_one_line(mnist_root, tmp_path):
    result = run_capsrun(
        "train", *SMALL["rbm"], *COMMON, "model.net.ladder_shift=1", cwd=tmp_path, data_root=mnist_root
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "ladder_shift must be in [0, 10] and needs tempering >= 2" in lines[0]
    assert not list(tmp_path.rglob("last.pt"))


@pytest.mark.parametrize("model", ["rbm", "capsrbm"])
def test_more_pcd_chains_than_a_batch_has_images_is_one_line(mnist_root, tmp_path, model):
    """A step moves one persistent chain per image: 40 chains on batches of 32 would leave 8 idle."""
    result = run_capsrun("train", *SMALL[model], *COMMON, "model.net.chains=40", cwd=tmp_path, data_root=mnist_root)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "model.net.chains=40 is more than trainer.batch_size=32: a step moves one persistent chain" in lines[0]
    assert "8 chains would never move; e.g. model.net.chains=32" in lines[0]
    assert not list(tmp_path.rglob("last.pt"))


def test_an_epoch_grid_ladder_that_cannot_work_is_one_line(mnist_root, tmp_path):
    args = ["sampler.tempering=1", "sampler.ladder_from=0.5"]
    result = run_capsrun("train", *SMALL["rbm"], *COMMON, *args, cwd=tmp_path, data_root=mnist_root)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "sampler.ladder_from needs a tempering ladder of 2 or more levels" in lines[0]
    assert not list(tmp_path.rglob("last.pt"))


def test_training_on_a_ladder_from_a_lowest_level(mnist_root, tmp_path):
    """``model.ladder_from``: the checkpoint's ladder starts there and ``capsrun sample`` runs it;
    a sampling ladder below it is refused in one line, as one for a model without tempering."""
    run = tmp_path / "from"
    args = [*SMALL["capsrbm"], *COMMON, "model.net.tempering=3", "model.net.ladder_from=0.5", "trainer.epochs=1"]
    args += ["ais.at_end=false", "sampler.ladder_from=0.5"]
    ok(run_capsrun("train", *args, f"hydra.run.dir={run}", cwd=tmp_path, data_root=mnist_root))
    betas = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]["betas"]
    assert betas[0] == 0.5 and betas[-1] == 1.0 and len(betas) == 3
    ckpt = f"checkpoint={run}/checkpoints/last.pt"
    out = tmp_path / "own"
    result = ok(
        run_capsrun("sample", ckpt, "sampler.chains=4", "sampler.steps=2", f"hydra.run.dir={out}", cwd=tmp_path)
    )
    assert "sweep of 3 levels" in result.stdout + result.stderr
    result = run_capsrun("sample", ckpt, "sampler.chains=4", "sampler.steps=2", "sampler.ladder_from=0.3", cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "sampler.ladder_from=0.3 is below the training ladder's lowest level (0.5)" in lines[0]
    for bad, message in [
        (["model.net.tempering=3", "model.net.ladder_from=0.5", "sampler.ladder_from=0.3"], "is below the training"),
        (["model.net.tempering=1", "model.net.ladder_from=0.5"], "ladder_from must be in [0, 1) and needs"),
    ]:
        result = run_capsrun("train", *SMALL["capsrbm"], *COMMON, *bad, cwd=tmp_path, data_root=mnist_root)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr


def test_init_chains_needs_persistent_chains(mnist_root, tmp_path):
    run = tmp_path / "cd"
    args = [*SMALL["rbm"], *COMMON, "model.net.persistent=false", "trainer.epochs=1", "ais.at_end=false"]
    ok(run_capsrun("train", *args, f"hydra.run.dir={run}", cwd=tmp_path, data_root=mnist_root))
    args = [f"checkpoint={run}/checkpoints/last.pt", "init=chains"]
    result = run_capsrun("sample", *args, cwd=tmp_path, data_root=mnist_root)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "init=chains needs a checkpoint trained with persistent chains (PCD); use init=noise" in lines[0]


def test_capsule_rbm_never_reads_the_labels(tmp_path):
    """Two data roots that differ only in their labels train to the same weights."""
    roots = []
    for name, seed in (("a", None), ("b", 7)):
        root = write_mnist(tmp_path / name, n_train=96, n_test=50)
        if seed is not None:
            labels = np.random.default_rng(seed).integers(0, 10, 96).astype(np.uint8)
            write_idx(root / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz", labels)
        roots.append(root)
    weights = []
    for root in roots:
        run = root / "run"
        args = [*SMALL["capsrbm"], *COMMON, "trainer.epochs=1", "ais.at_end=false", f"hydra.run.dir={run}"]
        # one thread: two capsule-RBM processes on 2 threads differ in the last bits now and then (docs/capsrbm.md)
        ok(run_capsrun("train", *args, cwd=root, data_root=root, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1"))
        weights.append(torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"])
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_training_on_a_tapered_ladder(mnist_root, tmp_path):
    """``model.net.ladder_width=8``: 8 chains a level below the 32 at the top (what
    experiment=capsrbm_mnist runs, sized for the fixtures); the checkpoint keeps that ladder and
    ``init=chains`` samples all 32 top chains, the levels below from the base rate. A width above
    the chains: one line, exit 2."""
    run = tmp_path / "tapered"
    args = [*SMALL["capsrbm"], *COMMON, "model.net.tempering=3", "trainer.epochs=1", "ais.at_end=false"]
    taper = "model.net.ladder_width=8"
    ok(run_capsrun("train", *args, taper, f"hydra.run.dir={run}", cwd=tmp_path, data_root=mnist_root))
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert state["ladder_chains"].shape == (2, 8, 1, 28, 28) and state["chains"].shape == (32, 1, 28, 28)
    rates = _scalars(run, "train/chain/swap_rate")
    assert rates and all(0 <= r <= 1 for r in rates) and max(rates) > 0
    out = tmp_path / "own"
    args_s = [f"checkpoint={run}/checkpoints/last.pt", "init=chains", "sampler.chains=32", "sampler.steps=2"]
    ok(run_capsrun("sample", *args_s, f"hydra.run.dir={out}", cwd=tmp_path, data_root=mnist_root))
    samples = torch.load(out / "samples.pt", weights_only=True)
    assert samples.shape == (32, 1, 28, 28) and 0 < (samples != state["chains"]).float().mean().item() < 0.25
    bad = run_capsrun("train", *args, "model.net.ladder_width=33", cwd=tmp_path, data_root=mnist_root)
    err = bad.stderr.strip()
    assert bad.returncode == 2 and len(err.splitlines()) == 1 and "Traceback" not in bad.stderr, bad.stderr
    assert "ladder_width must be null or between 1 and chains (32), got 33" in err


def test_a_ladder_run_stopped_while_it_averages_resumes_to_the_uninterrupted_result(mnist_root, tmp_path):
    """The capsule RBM's recipe in small (a tapered ladder from 0.55 that re-spaces itself as it
    trains, persistent chains, the weights' mean): stopped by SIGINT inside its averaging epoch and
    resumed, it ends bit for bit where a run never stopped ends: its weights, its chains at every
    level, its ladder, its swap rates, its mean and its metrics. What a resume must restore beyond
    the weights is all in the model's buffers and the averaging state."""
    args = [
        *SMALL["capsrbm"],
        *COMMON,
        "model.net.tempering=3",
        "model.net.ladder_from=0.55",
        "model.net.ladder_width=8",
        "trainer.epochs=12",  # 120 sweeps: the ladder re-spaces itself once, after the stop
        "trainer.average=0.75",
        "ais.at_end=false",
    ]
    reference = tmp_path / "reference"
    ok(run_capsrun("train", *args, f"hydra.run.dir={reference}", cwd=tmp_path, data_root=mnist_root))
    run_dir = tmp_path / "run"
    stopped = train_until(args, run_dir, tmp_path, mnist_root, "averaging the weights from step")
    assert stopped["average"]["steps"] >= 1 and 0 < int(stopped["model"]["sweeps"]) < RETUNE_EVERY
    ok(run_capsrun("train", *args, f"hydra.run.dir={run_dir}", cwd=tmp_path, data_root=mnist_root))
    mine, theirs = (torch.load(d / "checkpoints" / "last.pt", weights_only=True) for d in (run_dir, reference))
    assert int(theirs["model"]["sweeps"]) >= RETUNE_EVERY
    assert not torch.equal(theirs["model"]["betas"], stopped["model"]["betas"])  # the ladder moved after the stop
    for name, value in theirs["model"].items():
        assert torch.equal(mine["model"][name], value), name
    assert mine["average"]["steps"] == theirs["average"]["steps"] > stopped["average"]["steps"]
    for name, value in theirs["average"]["params"].items():
        assert torch.equal(mine["average"]["params"][name], value), name
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (run_dir, reference))
    same = [k for k in mb if not k.startswith("time/")]
    assert same and {k: ma[k] for k in same} == {k: mb[k] for k in same}


# --- the end of a run: its epoch saved before the sample grid and AIS ---------------------------------

END_OF_RUN = [*SMALL["capsrbm"], *COMMON, "trainer.epochs=1", "sampler.steps=600", "ais.temperatures=2000"]


def _events(run_dir: Path) -> dict[str, list]:
    """Every TensorBoard scalar (but the wall-clock ``time/*``) and image of a run dir, by tag."""
    acc = event_accumulator.EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    found = {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"] if not t.startswith("time/")}
    found.update({t: [(e.step, e.encoded_image_string) for e in acc.Images(t)] for t in acc.Tags()["images"]})
    return found


def test_kills_in_the_sample_grid_and_in_ais_resume_to_the_uninterrupted_result(mnist_root, tmp_path):
    """The epoch's last.pt is on disk before the end-of-run work: a kill in the sample grid, then
    one in AIS, each resumed, reach the files of a run never killed (metrics, weights, TensorBoard
    scalars and images)."""
    reference = tmp_path / "reference"
    ok(run_capsrun("train", *END_OF_RUN, f"hydra.run.dir={reference}", cwd=tmp_path, data_root=mnist_root))
    run_dir = tmp_path / "run"
    in_grid = train_until(END_OF_RUN, run_dir, tmp_path, mnist_root, "epoch 1/1", signal.SIGKILL)
    assert in_grid["epoch"] == 1 and in_grid["state"]["extras"] == [0, 1]
    in_ais = train_until(END_OF_RUN, run_dir, tmp_path, mnist_root, "AIS: ", signal.SIGKILL)
    assert in_ais["state"]["extras"] == [1] and "samples/free_energy" in in_ais["state"]["last_metrics"]
    ok(run_capsrun("train", *END_OF_RUN, f"hydra.run.dir={run_dir}", cwd=tmp_path, data_root=mnist_root))
    mine, theirs = (json.loads((d / "metrics.json").read_text()) for d in (run_dir, reference))
    assert {k: v for k, v in mine.items() if not k.startswith("time/")} == {
        k: v for k, v in theirs.items() if not k.startswith("time/")
    }
    assert "test/log_likelihood" in mine and "samples/free_energy" in mine
    for name in ("best.pt", "last.pt"):
        a, b = (torch.load(d / "checkpoints" / name, weights_only=True) for d in (run_dir, reference))
        assert all(torch.equal(a["model"][k], v) for k, v in b["model"].items()), name
    assert (
        torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)["metrics"]["test/log_likelihood"]
        == (theirs["test/log_likelihood"])
    )  # best.pt was written again with the end-of-run figures
    assert _events(run_dir) == _events(reference)


def test_ctrl_c_in_the_sample_grid_stops_at_once_and_a_resume_runs_what_is_missing(mnist_root, tmp_path):
    """A grid of 200,000 sweeps would take minutes: a SIGINT in it ends the run with exit 130,
    the epoch saved and the grid still to do; the resume (a short grid) finishes it and AIS."""
    run_dir = tmp_path / "run"
    grid = [*END_OF_RUN, "sampler.steps=200000"]
    stopped = train_until(grid, run_dir, tmp_path, mnist_root, "epoch 1/1", after=1.0)
    assert stopped["epoch"] == 1 and stopped["state"]["extras"] == [0, 1]
    log = (run_dir / "train.log").read_text()
    assert "stopping the end-of-epoch work now" in log and "holds the epoch and the work finished after it" in log
    saved = json.loads((run_dir / "metrics.json").read_text())  # the epoch's evaluation, not the grid
    assert "test/log_likelihood/pseudo" in saved and "samples/free_energy" not in saved
    ok(run_capsrun("train", *END_OF_RUN, f"hydra.run.dir={run_dir}", cwd=tmp_path, data_root=mnist_root))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert "samples/free_energy" in metrics and "test/log_likelihood" in metrics
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["state"]["extras"] == []
    assert "running what is missing" in (run_dir / "train.log").read_text()
