"""What a researcher reaches for after the CLI, tested through what they type: a sweep's runs named
by their values in TensorBoard, the Python API from a plain process, per-class results, the
report's learning curves, paths into sweep job dirs given back to the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

from capsrun.commands import report
from helpers import TINY, learnable_digits, ok, run_capsrun

pytestmark = pytest.mark.slow

SWEEP = [*TINY, "trainer.epochs=2", "routing.iterations=1,2", "seed=0,1"]
JOBS = ["routing.iterations=1+seed=0", "routing.iterations=1+seed=1", "routing.iterations=2+seed=0",
        "routing.iterations=2+seed=1"]  # fmt: skip


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, mnist_root) -> Path:
    work = tmp_path_factory.mktemp("api")
    ok(run_capsrun("train", "-m", *SWEEP, f"hydra.sweep.dir={work / 'sweep'}", cwd=work, data_root=mnist_root))
    return work / "sweep"


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def test_tensorboard_names_the_runs_of_a_sweep_by_their_values(sweep):
    """The job dirs are named by the swept keys only (trainer.epochs and debug, the same for every
    job, are left out); TensorBoard's own reader lists the runs under those names; its tag groups
    put the bookkeeping last."""
    multiplexer = EventMultiplexer().AddRunsFromDirectory(str(sweep))
    multiplexer.Reload()
    runs = multiplexer.Runs()
    assert sorted(runs) == JOBS
    tags = runs[JOBS[0]]["scalars"]
    groups = sorted({t.split("/")[0] for t in tags})
    assert groups[-1] == "zz_bookkeeping" and {"zz_bookkeeping/epoch", "zz_bookkeeping/lr"} <= set(tags)
    assert "epoch" not in tags and "lr" not in tags  # no bookkeeping chart at the top
    assert "epoch" in _metrics(sweep / JOBS[0])  # metrics.json keeps the plain names


def test_the_python_api_from_a_plain_process(sweep, mnist_root, tmp_path):
    """``capsrun.load``, ``capsrun.runs`` and ``capsrun.scalars`` in a fresh interpreter, as a
    notebook would call them; what they return is checked against the files the runs wrote."""
    script = textwrap.dedent(
        f"""
        import json, torch, capsrun
        from capsrun.datasets import load_split
        run = capsrun.load({str(sweep / JOBS[2])!r}, device="cpu")
        images, labels = load_split("mnist", {str(mnist_root)!r}, train=False, download=False)
        with torch.no_grad():
            scores = run.model(images.float().div(255)).scores
        table = capsrun.runs({str(sweep)!r})
        curves = capsrun.scalars({str(sweep)!r}, "test/accuracy")
        print(json.dumps({{
            "training": run.model.training, "iterations": run.config.routing.iterations, "epoch": run.epoch,
            "metrics": run.metrics, "accuracy": 100.0 * (scores.argmax(-1) == labels).float().mean().item(),
            "device": str(next(run.model.parameters()).device), "file": str(run.checkpoint),
            "table": table.to_dict("records"),
            "curves": curves.to_dict("records"),
        }}))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    job = sweep / JOBS[2]
    assert got["training"] is False and got["iterations"] == 2 and got["epoch"] == 2 and got["device"] == "cpu"
    assert got["file"] == str(job / "checkpoints" / "best.pt") and got["metrics"] == _metrics(job)
    # the loaded model gives the run's own test accuracy on the test files (best.pt is the last epoch's here)
    assert got["accuracy"] == pytest.approx(_metrics(job)["best/test/accuracy"], abs=1e-6)
    rows = {r["run"]: r for r in got["table"]}
    assert sorted(rows) == JOBS
    for name, row in rows.items():
        assert (row["routing.iterations"], row["seed"]) == ((1 if "=1+" in name else 2), int(name[-1]))
        assert row["test/accuracy"] == pytest.approx(_metrics(sweep / name)["test/accuracy"])
        assert row["trainer.epochs"] == 2 and row["epoch"] == 2
    points = [p for p in got["curves"] if p["run"] == JOBS[2]]
    assert [p["tag"] for p in points] == ["test/accuracy"] * 2 and points[0]["step"] < points[1]["step"]
    assert points[1]["value"] == pytest.approx(_metrics(job)["test/accuracy"])


def test_per_class_accuracy_and_the_confusion_matrix_match_hand_counts(sweep, mnist_root):
    """metrics.json's confusion matrix: its rows hold the test labels' counts (learnable_digits,
    200 test images, seed 2), its diagonal the accuracy; the per-class accuracies are the diagonal
    over the rows; TensorBoard has the picture."""
    _, labels = learnable_digits(200, 2)
    for name in JOBS:
        metrics = _metrics(sweep / name)
        confusion = np.array(metrics["test/confusion"])
        assert confusion.shape == (10, 10)
        assert confusion.sum(axis=1).tolist() == np.bincount(labels, minlength=10).tolist()
        assert 100.0 * np.trace(confusion) / 200 == pytest.approx(metrics["test/accuracy"])
        by_hand = [100.0 * confusion[k, k] / confusion[k].sum() for k in range(10)]
        assert metrics["test/class_accuracy"] == pytest.approx(by_hand)
    multiplexer = EventMultiplexer().AddRunsFromDirectory(str(sweep))
    multiplexer.Reload()
    assert "test/confusion" in multiplexer.Runs()[JOBS[0]]["images"]
    curve = multiplexer.Scalars(JOBS[0], "test_per_class/accuracy/3")
    assert curve[-1].value == pytest.approx(_metrics(sweep / JOBS[0])["test/class_accuracy"][3])


def test_eval_takes_a_path_into_a_sweep_job_and_writes_per_class_results(sweep, mnist_root, tmp_path):
    """A job dir's path holds "=": the CLI quotes it for Hydra; eval prints a percentage and the
    metrics' path, and writes the confusion matrix (metrics.json and a PNG)."""
    best = sweep / JOBS[1] / "checkpoints" / "best.pt"
    out = tmp_path / "eval"
    result = ok(run_capsrun("eval", f"checkpoint={best}", f"hydra.run.dir={out}", cwd=tmp_path, data_root=mnist_root))
    metrics, said = json.loads((out / "metrics.json").read_text()), result.stdout + result.stderr
    assert f"test accuracy {metrics['test/accuracy']:.2f}% on 200 images" in said
    assert f"metrics in {out / 'metrics.json'}" in said and (out / "test_confusion.png").is_file()
    assert metrics["test/confusion"] == _metrics(sweep / JOBS[1])["test/confusion"]
    assert metrics["test/accuracy"] == pytest.approx(_metrics(sweep / JOBS[1])["test/accuracy"])


def test_the_report_draws_learning_curves_per_group_with_the_mean_over_seeds(sweep, tmp_path):
    out = tmp_path / "report"
    result = ok(run_capsrun("report", str(sweep), "--metrics", "test/accuracy,test/loss/total", "--out", str(out),
                            cwd=tmp_path))  # fmt: skip
    assert "curves.png" in result.stdout and (out / "curves.png").is_file() and (out / "report.png").is_file()
    runs = report.load_runs(sweep)
    keys, _ = report.summarise(runs, ["test/accuracy"])
    points = report.curves(sweep, runs, keys, ["test/accuracy", "test/loss/total"])
    fig = report.curves_figure(points, ["test/accuracy", "test/loss/total"], "sweep")
    accuracy_axes, loss_axes = fig.axes[:2]
    lines = {line.get_label(): line for line in accuracy_axes.get_lines()}
    assert sorted(lines) == ["routing.iterations=1 (2 runs)", "routing.iterations=2 (2 runs)"]
    for iterations in (1, 2):
        line = lines[f"routing.iterations={iterations} (2 runs)"]
        assert list(line.get_xdata()) == [1, 2]
        finals = [_metrics(sweep / f"routing.iterations={iterations}+seed={s}")["test/accuracy"] for s in (0, 1)]
        assert line.get_ydata()[-1] == pytest.approx(np.mean(finals))  # the mean over the two seeds
    assert len(accuracy_axes.collections) == 2  # a band a group
    assert loss_axes.get_ylabel() == "test/loss/total" and len(loss_axes.get_lines()) == 2
    both = ["test/accuracy", "test/loss/total"]
    assert len(report.figure(keys, report.summarise(runs, both)[1], "routing.iterations", both, "s").axes) == 2


def test_a_longer_sweep_continues_in_the_same_named_dirs(sweep, mnist_root, tmp_path):
    """Resume: the same sweep with more epochs continues each job in its named dir."""
    longer = tmp_path / "longer"
    ok(run_capsrun("train", "-m", *TINY, "trainer.epochs=1", "routing.iterations=1,2", f"hydra.sweep.dir={longer}",
                   cwd=tmp_path, data_root=mnist_root))  # fmt: skip
    ok(run_capsrun("train", "-m", *TINY, "trainer.epochs=2", "routing.iterations=1,2", f"hydra.sweep.dir={longer}",
                   cwd=tmp_path, data_root=mnist_root))  # fmt: skip
    assert sorted(p.name for p in longer.iterdir() if p.is_dir()) == ["routing.iterations=1", "routing.iterations=2"]
    for name in ("routing.iterations=1", "routing.iterations=2"):
        assert _metrics(longer / name)["epoch"] == 2
        assert "resumed from" in (longer / name / "train.log").read_text()


def test_multimnist_logs_the_accuracy_per_pair_of_digits(mnist_root, tmp_path):
    run = tmp_path / "multi"
    ok(run_capsrun("train", *TINY, "dataset=multimnist", "trainer.epochs=1", "data.train_limit=64",
                   "data.test_limit=100", f"hydra.run.dir={run}", cwd=tmp_path, data_root=mnist_root))  # fmt: skip
    metrics = _metrics(run)
    pairs = metrics["test/pair_accuracy"]
    assert len(pairs) == 10 and all(pairs[k][k] is None for k in range(10))  # two different digits an image
    assert all(pairs[a][b] == pairs[b][a] for a in range(10) for b in range(10))
    assert sum(v is not None for row in pairs for v in row) > 20  # 100 images fill most of the 45 pairs
    assert len(metrics["test/class_accuracy"]) == 10 and "test/confusion" not in metrics
    multiplexer = EventMultiplexer().AddRunsFromDirectory(str(run))
    multiplexer.Reload()
    assert "test/confusion" in multiplexer.Runs()["."]["images"]
