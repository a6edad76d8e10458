"""End-to-end: ``capsrun train ... diagnostics=...`` and ``capsrun analyze`` on MNIST-format fixtures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing import event_accumulator

from helpers import TINY, ok, run_capsrun

pytestmark = pytest.mark.slow

DEEP = [*TINY, "model=deep_capsnet", "model.width=6", "model.capsule_dim=4", "trainer.epochs=1"]


def _table(stdout: str) -> list[list[str]]:
    """The rows of the printed health table (the log lines around it start with '[')."""
    return [line.split() for line in stdout.splitlines() if line.strip() and not line.startswith("[")]


@pytest.fixture(scope="module")
def deep_run(mnist_root, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("deep") / "run"
    args = [*DEEP, "model.depth=2", "diagnostics=full", "diagnostics.every_steps=4", "diagnostics.examples=50"]
    ok(run_capsrun("train", *args, f"hydra.run.dir={run}", cwd=run.parent, data_root=mnist_root))
    return run


def test_deep_model_logs_one_health_series_per_layer(deep_run):
    ea = event_accumulator.EventAccumulator(str(deep_run), size_guidance={event_accumulator.SCALARS: 0})
    ea.Reload()
    tags = ea.Tags()
    layers = ["primary_caps", "hidden_caps_0", "hidden_caps_1", "digit_caps"]
    for layer in layers:
        for metric in ("dead_share", "length/mean", "grad_norm", "affine_change"):
            events = ea.Scalars(f"health/{layer}/{metric}")
            assert [e.step for e in events] == [4, 8]  # 10 steps of 32 images, every 4th
        assert f"health/{layer}/length" in tags["histograms"]
    for layer in layers[1:]:
        for metric in ("coupling/max", "coupling/entropy", "routing/std", "routing/deviation"):
            assert len(ea.Scalars(f"health/{layer}/{metric}")) == 2
        assert f"health/{layer}/mean_coupling" in tags["images"]
        assert f"health/{layer}/coupling" in tags["histograms"]
    assert not any(t.startswith("health/hidden_caps_2") for t in tags["scalars"])
    assert [e.value >= 0 for e in ea.Scalars("health/conv1/grad_norm")] == [True, True]
    entropy = ea.Scalars("health/digit_caps/coupling/entropy")[-1].value
    assert 0 < entropy <= 1.0 + 1e-6


def test_diagnostics_change_nothing_in_training(deep_run, mnist_root, tmp_path):
    """The same run with diagnostics off ends with the same weights, bit for bit."""
    off = tmp_path / "off"
    args = [*DEEP, "model.depth=2", "diagnostics=off", f"hydra.run.dir={off}"]
    ok(run_capsrun("train", *args, cwd=tmp_path, data_root=mnist_root))
    a = torch.load(deep_run / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(off / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ea = event_accumulator.EventAccumulator(str(off))
    ea.Reload()
    assert not any(t.startswith("health/") for t in ea.Tags()["scalars"])


def test_analyze_a_checkpoint_prints_a_table_and_writes_health_json(deep_run, mnist_root, tmp_path):
    out = tmp_path / "analysis"
    ckpt = deep_run / "checkpoints" / "best.pt"
    result = ok(
        run_capsrun(
            "analyze", f"checkpoint={ckpt}", "examples=64", f"hydra.run.dir={out}", cwd=tmp_path, data_root=mnist_root
        )
    )
    rows = _table(result.stdout)
    assert rows[0][:3] == ["run", "layer", "dead"]
    assert [r[1] if i == 0 else r[0] for i, r in enumerate(rows[1:7])] == [
        "conv1",
        "primary_caps",
        "hidden_caps_0",
        "hidden_caps_1",
        "digit_caps",
        "decoder",
    ]
    report = json.loads((out / "health.json").read_text())
    assert report["examples"] == 64 and report["split"] == "test"
    (entry,) = report["runs"].values()
    assert entry["model"] == "deep_capsnet" and entry["epoch"] == 1
    health = entry["health"]
    assert 0 <= health["hidden_caps_1/dead_share"] <= 1
    assert health["decoder/grad_norm"] > 0 and health["digit_caps/grad_norm"] > 0


def test_analyze_a_multirun_dir_compares_the_runs(mnist_root, tmp_path):
    sweep = tmp_path / "sweep"
    ok(
        run_capsrun(
            "train",
            "-m",
            *DEEP,
            "model.depth=0,1",
            "data.train_limit=64",
            f"hydra.sweep.dir={sweep}",
            cwd=tmp_path,
            data_root=mnist_root,
        )
    )
    out = tmp_path / "analysis"
    result = ok(
        run_capsrun(
            "analyze", f"checkpoint={sweep}", "examples=32", f"hydra.run.dir={out}", cwd=tmp_path, data_root=mnist_root
        )
    )
    runs = {v["run"]: v["health"] for v in json.loads((out / "health.json").read_text())["runs"].values()}
    assert set(runs) == {"model.depth=0", "model.depth=1"}  # named by what the sweep changed
    assert "hidden_caps_0/dead_share" in runs["model.depth=1"]
    assert not any(k.startswith("hidden_caps") for k in runs["model.depth=0"])
    firsts = [row[0] for row in _table(result.stdout) if row[0].startswith("model.depth")]
    assert firsts == ["model.depth=0", "model.depth=1"]


@pytest.mark.parametrize(
    "command, args, message",
    [
        ("train", ["diagnostics=loud"], "unknown diagnostics 'loud'"),
        ("train", ["diagnostics=full", "diagnostics.every_steps=0"], "diagnostics.every_steps must be an integer >= 1"),
        ("train", ["model=deep_capsnet", "model.depth=-1"], "model.depth must be an integer >= 0"),
        ("analyze", [], "no checkpoint given"),
        ("analyze", ["checkpoint=nowhere"], "no such file or directory"),
        ("analyze", ["checkpoint=.", "split=val"], "split must be test or train"),
    ],
)
def test_bad_diagnostics_input_is_one_line(mnist_root, tmp_path, command, args, message, capsrun_here):
    result = capsrun_here(command, *TINY[:4] if command == "train" else (), *args, cwd=tmp_path, data_root=mnist_root)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
