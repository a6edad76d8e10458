"""End-to-end on fixtures: 2-process gloo DDP against one process, Optuna, submitit, report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from helpers import TINY, ok, run_capsrun

pytestmark = pytest.mark.slow

RUN = [*TINY, "trainer.device=cpu", "trainer.batch_size=64", "trainer.log_every=2"]


def torchrun(*args: str, cwd: Path, data_root: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=N -m capsrun train ...`` on the CPU (gloo)."""
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(CAPSRUN_DATA=str(data_root), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return subprocess.run(
        [*cmd, "-m", "capsrun", "train", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def _weights(run: Path, name: str = "last.pt") -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / name, weights_only=True)["model"]


def _close(a: dict, b: dict, atol: float) -> float:
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < atol, worst
    return worst


@pytest.fixture(scope="module")
def single(mnist_root, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("single") / "run"
    ok(run_capsrun("train", *RUN, "trainer.epochs=2", f"hydra.run.dir={run}", cwd=run.parent, data_root=mnist_root))
    return run


def test_two_process_ddp_matches_one_process_with_the_same_global_batch(single, mnist_root, tmp_path):
    run = tmp_path / "ddp"
    result = ok(torchrun(*RUN, "trainer.epochs=2", f"hydra.run.dir={run}", cwd=tmp_path, data_root=mnist_root))
    assert "x 2 processes (gloo)" in result.stdout + result.stderr
    _close(_weights(single), _weights(run), atol=1e-4)
    a = json.loads((single / "metrics.json").read_text())
    b = json.loads((run / "metrics.json").read_text())
    for key in ("train/accuracy", "test/accuracy"):  # counts summed over both ranks
        assert a[key] == pytest.approx(b[key], abs=1e-9)
    for key in ("train/loss/total", "test/loss/total"):
        assert a[key] == pytest.approx(b[key], rel=1e-4)
    # only rank 0 wrote: one event file, one log
    assert len(list(run.glob("events.out.tfevents.*"))) == 1


def test_ddp_resumes_from_its_last_checkpoint(single, mnist_root, tmp_path):
    run = tmp_path / "ddp"
    ok(torchrun(*RUN, "trainer.epochs=1", f"hydra.run.dir={run}", cwd=tmp_path, data_root=mnist_root))
    result = ok(torchrun(*RUN, "trainer.epochs=2", f"hydra.run.dir={run}", cwd=tmp_path, data_root=mnist_root))
    assert "resumed from" in result.stdout + result.stderr
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 2
    _close(_weights(single), _weights(run), atol=1e-4)


def test_ddp_refuses_a_batch_that_does_not_split(mnist_root, tmp_path):
    result = torchrun(*RUN, "trainer.batch_size=33", "trainer.epochs=1", cwd=tmp_path, data_root=mnist_root)
    assert result.returncode != 0
    assert "must divide by the 2 processes" in result.stderr


def test_optuna_search_runs_two_trials_on_the_validation_metric(mnist_root, tmp_path):
    sweep = tmp_path / "optuna"
    ok(
        run_capsrun(
            "train",
            "-m",
            "hparams_search=capsnet_optuna",
            *TINY,
            "hydra.sweeper.n_trials=2",
            "data.val_split=64",
            "trainer.epochs=1",
            f"hydra.sweep.dir={sweep}",
            cwd=tmp_path,
            data_root=mnist_root,
        )
    )
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    jobs = sorted(p for p in sweep.iterdir() if (p / "metrics.json").is_file())
    assert len(jobs) == 2 and all("optimizer.lr=" in p.name for p in jobs)  # named by the sampled values
    trials = [json.loads((job / "metrics.json").read_text()) for job in jobs]
    assert result["best_value"] == max(t["best/val/accuracy"] for t in trials)
    assert all("val/accuracy" in t and "test/accuracy" in t for t in trials)
    assert set(result["best_params"]) == {
        "optimizer.lr",
        "scheduler.decay_rate",
        "model.loss.reconstruction_weight",
        "routing.iterations",
    }


def test_submitit_local_launcher_and_report_on_a_finished_sweep(mnist_root, tmp_path):
    sweep = tmp_path / "sweep"
    ok(
        run_capsrun(
            "train",
            "-m",
            "hydra/launcher=submitit_local",
            *TINY,
            "trainer.epochs=1",
            "routing.iterations=1,3",
            "seed=0,1",
            f"hydra.sweep.dir={sweep}",
            cwd=tmp_path,
            data_root=mnist_root,
        )
    )
    accs = {}
    jobs = sorted(p for p in sweep.iterdir() if (p / ".hydra").is_dir())
    assert [p.name for p in jobs] == [f"routing.iterations={i}+seed={s}" for i in (1, 3) for s in (0, 1)]
    for job in jobs:
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        it = next(int(o.split("=")[1]) for o in overrides if o.startswith("routing.iterations="))
        accs.setdefault(it, []).append(json.loads((job / "metrics.json").read_text())["test/accuracy"])
    assert {k: len(v) for k, v in accs.items()} == {1: 2, 3: 2}
    result = ok(run_capsrun("report", str(sweep), "--metrics", "test/accuracy", cwd=tmp_path))
    rows = [line.split() for line in result.stdout.splitlines()]
    assert rows[0] == ["routing.iterations", "runs", "test/accuracy"]
    for row in rows[1:3]:
        mean = sum(accs[int(row[0])]) / 2
        assert row[1] == "2" and float(row[2]) == pytest.approx(mean, abs=0.01)
    assert (sweep / "report.png").stat().st_size > 5000 and (sweep / "report.csv").is_file()
