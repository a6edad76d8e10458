"""End-to-end: the real ``capsrun`` CLI on MNIST-format fixtures (tiny model, CPU)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing import event_accumulator

from helpers import TINY, ok, run_capsrun, train_until

pytestmark = pytest.mark.slow


def _events(run_dir: Path) -> event_accumulator.EventAccumulator:
    ea = event_accumulator.EventAccumulator(str(run_dir), size_guidance={event_accumulator.SCALARS: 0})
    ea.Reload()
    return ea


@pytest.fixture(scope="module")
def trained_run(mnist_root, tmp_path_factory) -> Path:
    """One tiny run of 4 epochs on the learnable fixture."""
    work = tmp_path_factory.mktemp("work")
    run_dir = work / "run"
    ok(run_capsrun("train", *TINY, "trainer.epochs=4", f"hydra.run.dir={run_dir}", cwd=work, data_root=mnist_root))
    return run_dir


def test_train_learns_beyond_chance(trained_run):
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert metrics["epoch"] == 4
    # 10 balanced classes: chance is 10 %; the tiny model reaches ~90 % on this fixture
    assert metrics["test/accuracy"] > 80.0, metrics
    assert metrics["test/error"] == pytest.approx(100.0 - metrics["test/accuracy"])
    assert metrics["train/loss/total"] > 0 and metrics["best/test/accuracy"] >= metrics["test/accuracy"]


def test_run_dir_layout(trained_run):
    assert (trained_run / ".hydra" / "config.yaml").is_file()
    assert (trained_run / "train.log").read_text().count("epoch 4/4") == 1
    for name in ("last.pt", "best.pt"):
        ckpt = torch.load(trained_run / "checkpoints" / name, weights_only=True)
        assert ckpt["config"]["routing"]["iterations"] == 3
        assert ckpt["config"]["model"]["net"]["conv1_channels"] == 16
    assert not list((trained_run / "checkpoints").glob("*.tmp")), "temporary checkpoint files left behind"
    # best.pt holds what eval and sample need, last.pt also what a resume needs
    best = torch.load(trained_run / "checkpoints" / "best.pt", weights_only=True)
    last = torch.load(trained_run / "checkpoints" / "last.pt", weights_only=True)
    assert {"optimizer", "scheduler", "rng", "meters"}.isdisjoint(best) and {"optimizer", "rng"} <= set(last)
    assert best["metrics"]["test/accuracy"] == best["metrics"]["best/test/accuracy"]
    sizes = {n: (trained_run / "checkpoints" / n).stat().st_size for n in ("best.pt", "last.pt")}
    assert sizes["best.pt"] < 0.4 * sizes["last.pt"], sizes  # Adam keeps two moments per weight


def test_resume_from_a_best_pt_says_to_use_last_pt(trained_run, mnist_root, tmp_path):
    best = trained_run / "checkpoints" / "best.pt"
    result = run_capsrun(
        "train",
        *TINY,
        "trainer.epochs=4",
        f"trainer.resume={best}",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
        data_root=mnist_root,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .endswith("holds the weights only (a best.pt, for eval and sample); resume from the run's checkpoints/last.pt")
    )


def test_tensorboard_has_scalars_images_histograms_hparams(trained_run):
    ea = _events(trained_run)
    tags = ea.Tags()
    expected = {
        "train/loss/margin",
        "train/loss/reconstruction",
        "train/loss/total",
        "train/accuracy",
        "zz_bookkeeping/lr",
        "test/loss/margin",
        "test/loss/reconstruction",
        "test/loss/total",
        "test/accuracy",
        "test/error",
    }
    assert expected <= set(tags["scalars"])
    assert "test/reconstructions" in tags["images"]
    assert {"test/digit_caps/length", "routing/digit_caps/coupling"} <= set(tags["histograms"])
    assert len(ea.Scalars("test/accuracy")) == 4  # one per epoch
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert ea.Scalars("test/accuracy")[-1].value == pytest.approx(metrics["test/accuracy"], rel=1e-6)
    lrs = [e.value for e in ea.Scalars("zz_bookkeeping/lr")]
    assert lrs[0] > lrs[-1] > 0  # exponential decay, per step
    image = ea.Images("test/reconstructions")[-1]
    assert image.width > image.height  # inputs row above reconstructions row, 8 wide
    hp = ea.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(hp)
    from tensorboard.plugins.hparams import plugin_data_pb2

    start = plugin_data_pb2.HParamsPluginData.FromString(hp["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["routing.iterations"].number_value == 3
    assert start.hparams["trainer.epochs"].number_value == 4
    assert "config" in ea.PluginTagToContent("text") or "config/text_summary" in ea.PluginTagToContent("text")


def test_eval_recomputes_checkpoint_metrics(trained_run, mnist_root, tmp_path):
    out = tmp_path / "eval"
    ok(
        run_capsrun(
            "eval",
            f"checkpoint={trained_run / 'checkpoints' / 'best.pt'}",
            f"hydra.run.dir={out}",
            cwd=tmp_path,
            data_root=mnist_root,
        )
    )
    evaluated = json.loads((out / "metrics.json").read_text())
    trained = json.loads((trained_run / "metrics.json").read_text())
    assert evaluated["test/accuracy"] == pytest.approx(trained["best/test/accuracy"])


def test_eval_and_sample_find_the_runs_own_data_root_from_elsewhere(trained_run, mnist_root, tmp_path):
    """Trained with CAPSRUN_DATA; evaluated from another directory without it: the checkpoint's
    (absolute) data root is used."""
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("CAPSRUN_DATA", "HYDRA_FULL_ERROR")}
    best = trained_run / "checkpoints" / "best.pt"
    assert torch.load(best, weights_only=True)["config"]["data"]["root"] == str(mnist_root.absolute())
    for command in ("eval", "analyze"):
        done = subprocess.run(
            [sys.executable, "-m", "capsrun", command, f"checkpoint={best}", f"hydra.run.dir={tmp_path / command}"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        assert f"data from the run's own data root, {mnist_root}" in done.stdout + done.stderr
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert evaluated["test/accuracy"] == pytest.approx(
        json.loads((trained_run / "metrics.json").read_text())["best/test/accuracy"]
    )


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


def _assert_same_run(a: Path, b: Path) -> None:
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    for key in ("test/accuracy", "test/loss/total", "train/loss/total", "train/accuracy"):
        assert ma[key] == pytest.approx(mb[key], rel=1e-6, abs=1e-9), key
    wa, wb = _weights(a), _weights(b)
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-6, atol=1e-7, msg=name)


@pytest.fixture(scope="module")
def reference_run(mnist_root, tmp_path_factory) -> Path:
    """Two uninterrupted epochs: the result every resumed run must reproduce."""
    work = tmp_path_factory.mktemp("ref")
    ok(run_capsrun("train", *TINY, "trainer.epochs=2", f"hydra.run.dir={work / 'run'}", cwd=work, data_root=mnist_root))
    return work / "run"


def test_resume_after_an_epoch_equals_uninterrupted(reference_run, mnist_root, tmp_path):
    run_dir = tmp_path / "run"
    ok(run_capsrun("train", *TINY, "trainer.epochs=1", f"hydra.run.dir={run_dir}", cwd=tmp_path, data_root=mnist_root))
    resumed = ok(
        run_capsrun(
            "train",
            *TINY,
            "trainer.epochs=2",
            "trainer.resume=auto",
            f"hydra.run.dir={run_dir}",
            cwd=tmp_path,
            data_root=mnist_root,
        )
    )
    assert "resumed from" in resumed.stdout
    _assert_same_run(reference_run, run_dir)


def test_sigint_saves_last_and_resume_mid_epoch_equals_uninterrupted(reference_run, mnist_root, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "capsrun", "train", *TINY, "trainer.epochs=2", f"hydra.run.dir={run_dir}"]
    env = {**__import__("os").environ, "CAPSRUN_DATA": str(mnist_root), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    deadline = time.monotonic() + 120
    for line in proc.stdout:  # the signal handler is installed before this line is logged
        lines.append(line)
        if "parameters, device" in line:
            proc.send_signal(signal.SIGINT)
            break
        assert time.monotonic() < deadline
    rest, _ = proc.communicate(timeout=120)
    output = "".join(lines) + rest
    assert proc.returncode == 128 + signal.SIGINT, output
    assert "stopped at epoch 1, batch" in output
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["state"]
    assert state["epoch"] == 0 and state["batch"] >= 1  # stopped inside the first epoch
    ok(
        run_capsrun("train", *TINY, "trainer.epochs=2", f"hydra.run.dir={run_dir}", cwd=tmp_path, data_root=mnist_root)
    )  # trainer.resume=auto is the default
    _assert_same_run(reference_run, run_dir)


def test_multirun_makes_one_dir_per_job(mnist_root, tmp_path):
    sweep = tmp_path / "sweep"
    ok(
        run_capsrun(
            "train",
            "-m",
            *TINY,
            "trainer.epochs=1",
            "routing.iterations=1,2",
            f"hydra.sweep.dir={sweep}",
            cwd=tmp_path,
            data_root=mnist_root,
        )
    )
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [p.name for p in jobs] == ["routing.iterations=1", "routing.iterations=2"]  # trainer.epochs=1: constant
    for job, iterations in zip(jobs, (1, 2)):
        assert f"routing.iterations={iterations}" in (job / ".hydra" / "overrides.yaml").read_text()
        assert "test/accuracy" in json.loads((job / "metrics.json").read_text())
        ckpt = torch.load(job / "checkpoints" / "last.pt", weights_only=True)
        assert ckpt["config"]["model"]["net"]["routing_iterations"] == iterations
        # HParams: of the many overrides, the swept one is listed first and marked as differing
        from tensorboard.plugins.hparams import plugin_data_pb2

        ea = _events(job)
        records = {
            t: plugin_data_pb2.HParamsPluginData.FromString(c) for t, c in ea.PluginTagToContent("hparams").items()
        }
        infos = records["_hparams_/experiment"].experiment.hparam_infos
        assert [(h.name, h.differs) for h in infos][:2] == [
            ("routing.iterations", True),
            ("debug", False),
        ]
        start = records["_hparams_/session_start_info"].session_start_info
        assert start.group_name == f"iterations={iterations} (sweep)"
        assert records["_hparams_/session_end_info"].session_end_info.status == 1  # STATUS_SUCCESS


def test_sigint_after_the_weight_average_began_then_resume_equals_uninterrupted(mnist_root, tmp_path):
    """``trainer.average``: a run stopped while it averages resumes to the same weights, the same
    mean and the same metrics (those of the mean) as one never stopped."""
    args = [*TINY, "trainer.epochs=2", "trainer.average=0.75"]
    reference = tmp_path / "reference"
    ok(run_capsrun("train", *args, f"hydra.run.dir={reference}", cwd=tmp_path, data_root=mnist_root))
    run_dir = tmp_path / "run"
    stopped = train_until(args, run_dir, tmp_path, mnist_root, "averaging the weights from step")
    assert stopped["state"]["epoch"] == 0 and stopped["average"]["steps"] >= 1  # inside epoch 1, averaging
    ok(run_capsrun("train", *args, f"hydra.run.dir={run_dir}", cwd=tmp_path, data_root=mnist_root))
    _assert_same_run(reference, run_dir)
    mine, theirs = (torch.load(d / "checkpoints/last.pt", weights_only=True)["average"] for d in (run_dir, reference))
    assert mine["steps"] == theirs["steps"] > stopped["average"]["steps"]
    for name, value in theirs["params"].items():
        torch.testing.assert_close(mine["params"][name], value, rtol=1e-6, atol=1e-7, msg=name)
