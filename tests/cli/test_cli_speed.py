"""`capsrun train` on the fast path and `capsrun bench`, end to end on generated files."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import TINY, compose_config, ok, run_capsrun

pytestmark = pytest.mark.slow

# the tiny CapsNet of conf/debug/tiny.yaml, as bench overrides
TINY_NET = [
    "model.net.conv1_channels=16",
    "model.net.primary_types=4",
    "model.net.digit_dim=8",
    "model.net.decoder_hidden=[32,64]",
]


def test_train_bf16_channels_last_learns(mnist_root, tmp_path):
    run = tmp_path / "run"
    result = ok(
        run_capsrun(
            "train", *TINY, "trainer.epochs=3", "trainer.precision=bf16", f"hydra.run.dir={run}",
            cwd=tmp_path, data_root=mnist_root,
        )
    )  # fmt: skip
    assert "device cpu (bf16, channels-last)" in result.stdout + result.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test/accuracy"] > 50.0  # chance is 10 %
    assert metrics["time/eval_seconds"] > 0.0


def test_bench_table_and_ratios(tmp_path):
    out = tmp_path / "bench"
    overrides = "[" + ",".join(f'"{o}"' for o in TINY_NET) + "]"
    result = ok(
        run_capsrun(
            "bench", "models=[capsnet]", "iterations=[1,3]", "batch_sizes=[8]", "precisions=[fp32,tf32,bf16]",
            "compile=[false]", "warmup=1", "steps=2", "repeats=3", f"overrides={overrides}", "trainer.progress=false",
            f"hydra.run.dir={out}", cwd=tmp_path,
        )
    )  # fmt: skip
    rows = json.loads((out / "bench.json").read_text())["results"]
    # per routing setting: the reference and bf16 (tf32 is skipped on a CPU: it is fp32 there)
    assert [(r["iterations"], r["precision"], r["channels_last"]) for r in rows] == [
        (1, "fp32", False),
        (1, "bf16", True),
        (3, "fp32", False),
        (3, "bf16", True),
    ]
    for ref, fast in (rows[0:2], rows[2:4]):
        assert ref["train_ratio"] == 1.0 and ref["eval_ratio"] == 1.0
        assert fast["train_ratio"] == pytest.approx(fast["train_images_per_second"] / ref["train_images_per_second"])
        assert fast["eval_ratio"] == pytest.approx(fast["eval_images_per_second"] / ref["eval_images_per_second"])
        assert all(r["train_images_per_second"] > 0 and r["eval_images_per_second"] > 0 for r in (ref, fast))
        assert ref["peak_memory_mib"] is None  # CUDA only
    table = (out / "bench.md").read_text()
    assert "device: CPU" in table and "torch " in table and "command: `capsrun bench" in table
    assert table.count("| capsnet (reference) |") == 2 and table.count("| capsnet |") == 2
    assert "| capsnet (reference) | 1 | 8 | fp32 | off | off |" in result.stdout
    assert all(r["train_spread"] >= 0 and r["eval_spread"] >= 0 for r in rows)
    assert "3 blocks of 2 timed steps" in table and "| spread |" in table
    log = result.stdout + result.stderr
    assert "capsnet, 1 routing iterations, batch 8, bf16, channels-last: train " in log and "Setting(" not in log


def test_time_steps_runs_warmup_then_repeated_blocks():
    from capsrun.bench import time_steps

    calls = []
    timing = time_steps(lambda: calls.append(1), warmup=2, steps=4, repeats=5)
    assert len(calls) >= 2 + 4 * 5  # and torch.utils.benchmark's own warm-up before each block
    assert len(timing.times) == 5  # one per-step time per block
    assert timing.median > 0 and timing.iqr >= 0


def test_bench_warns_when_the_blocks_disagree(monkeypatch, caplog):
    import logging

    from capsrun import bench
    from capsrun.commands import bench as commands

    def noisy(setting, *args, **kwargs):
        return bench.Measurement(setting, 100.0, 200.0, None, train_spread=0.4, eval_spread=0.02)

    monkeypatch.setattr(bench, "measure", noisy)
    cfg = compose_config(
        "bench",
        "models=[capsnet]",
        "iterations=[1]",
        "batch_sizes=[2]",
        "precisions=[fp32]",
        "compile=[false]",
        "overrides=[" + ",".join(f'"{o}"' for o in TINY_NET) + "]",
    )
    from hydra import initialize_config_dir
    from tqdm import tqdm

    from capsrun.cli import conf_dir

    with caplog.at_level(logging.WARNING, logger="capsrun"), initialize_config_dir(str(conf_dir()), version_base="1.3"):
        settings = commands._bench_settings(cfg, torch.device("cpu"))
        commands._bench_all(cfg, torch.device("cpu"), settings, 0, 1, 3, tqdm)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.startswith("capsnet, 1 routing iterations, batch 2, fp32: the timed blocks differ by 40%")


def test_bench_bad_input_is_one_line(tmp_path):
    result = run_capsrun("bench", "models=[nope]", f"hydra.run.dir={tmp_path / 'b'}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "bench: cannot compose model=nope" in result.stderr


@pytest.mark.parametrize(
    "override, needle",
    [
        ("precisions=[fp16]", "precisions: 'fp16' is not one of fp32, tf32, bf16"),
        ("batch_sizes=[]", "bench.batch_sizes must be a non-empty list"),
        ("batch_sizes=[0]", "bench.batch_sizes must hold integers >= 1, got 0"),
    ],
)
def test_bench_settings_are_checked(override, needle):
    from capsrun.errors import ConfigError
    from capsrun.settings import check_bench

    with pytest.raises(ConfigError, match=needle.replace("[", r"\[")):
        check_bench(compose_config("bench", override), cpu=True)
