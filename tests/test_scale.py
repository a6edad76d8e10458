"""Validation split, sweep reports, sharded loading and the launcher/sweeper configs (fast)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir

from capsrun import datasets, distributed, settings
from capsrun.cli import conf_dir
from capsrun.commands import report
from capsrun.datasets.loader import BatchLoader
from capsrun.errors import ConfigError
from helpers import write_mnist


def test_holdout_is_fixed_sized_and_seeded():
    a = datasets.holdout(1000, 100)
    assert len(a) == 100 and len(set(a.tolist())) == 100 and torch.equal(a, datasets.holdout(1000, 100))
    assert len(datasets.holdout(1000, 0.25)) == 250
    assert len(datasets.holdout(1000, None)) == 0
    with pytest.raises(ConfigError, match="val_split"):
        datasets.holdout(100, 100)


def test_val_split_is_held_out_of_training_and_evaluated_like_the_test_set(tmp_path):
    root = write_mnist(tmp_path, n_train=300, n_test=50)
    batching = datasets.Batching(batch_size=32, eval_batch_size=64, seed=0)
    common = dict(download=False, max_shift=2)
    loaders = datasets.make_loaders("mnist", root, batching, val_split=60, **common)
    assert list(loaders.evals) == ["test", "val"]
    assert loaders.train.num_examples == 240 and loaders.evals["val"].num_examples == 60
    assert loaders.evals["test"].num_examples == 50
    val = loaders.evals["val"].images
    train = loaders.train.images
    # no validation image is a training image; together they are the whole training split
    full = datasets.make_loaders("mnist", root, batching, **common).train.images
    assert not (val.flatten(1)[:, None] == train.flatten(1)[None]).all(-1).any()
    assert len(val) + len(train) == len(full)
    assert loaders.evals["val"].max_shift == 0  # no augmentation at evaluation


def test_val_split_config_errors():

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        for bad in ("-1", "1.5", "abc"):
            cfg = compose(config_name="train", overrides=[f"data.val_split={bad}"])
            with pytest.raises(ConfigError, match="data.val_split"):
                settings.check_model_run(cfg)
        settings.check_model_run(compose(config_name="train", overrides=["data.val_split=0.1"]))


def test_sharded_loader_partitions_every_global_batch():
    x = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 2, 2).contiguous()
    y = torch.arange(10)
    loader = BatchLoader(x, y, batch_size=4, shuffle=True, seed=3)
    shards = [distributed.ShardedLoader(loader, distributed.World(r, 2, r)) for r in range(2)]
    for whole, a, b in zip(loader.epoch(1), shards[0].epoch(1), shards[1].epoch(1)):
        assert sorted(a[1].tolist() + b[1].tolist()) == sorted(whole[1].tolist())
        assert len(a[1]) == len(b[1])
    three = distributed.ShardedLoader(BatchLoader(x, y, batch_size=4), distributed.World(0, 3, 0))
    assert [len(b[1]) for b in three.epoch(0)] == [2, 2]  # batches 4, 4, 2: the last (2 < 3 ranks) is skipped


def _fake_run(root: Path, name: str, overrides: list[str], metrics: dict) -> None:
    """A finished run as capsrun train leaves it: overrides, config and metrics of its last epoch."""
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"trainer": {"epochs": 5}}))
    (run / "metrics.json").write_text(json.dumps({"epoch": 5, **metrics}))


def test_report_groups_seeds_and_gives_mean_and_spread(tmp_path, capsys):
    acc = {(1, 0): 98.0, (1, 1): 99.0, (3, 0): 99.5, (3, 1): 99.1}
    for i, ((it, seed), a) in enumerate(acc.items()):
        overrides = [f"routing.iterations={it}", f"seed={seed}", "trainer.epochs=5", "hydra.run.dir=x"]
        _fake_run(tmp_path, str(i), overrides, {"test/accuracy": a, "time/epoch_seconds": 1.0 + it})
    assert report.main([str(tmp_path), "--metrics", "test/accuracy,time/epoch_seconds"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["routing.iterations", "runs", "test/accuracy", "time/epoch_seconds"]
    assert out[1].split()[:5] == ["1", "2", "98.5", "±", "0.71"]  # sample std of 98, 99: 0.5 * sqrt(2)
    spread = statistics.stdev([99.5, 99.1])
    assert out[2].split()[:5] == ["3", "2", "99.3", "±", f"{spread:.2g}"]
    csv_rows = (tmp_path / "report.csv").read_text().splitlines()
    assert (
        csv_rows[0] == "routing.iterations,runs,test/accuracy,test/accuracy sample std,time/epoch_seconds,"
        "time/epoch_seconds sample std"
    )
    assert csv_rows[1].startswith("1,2,98.5,0.7071067811865476,2.0,0.0")
    assert "sample standard deviation" in out[3]
    assert (tmp_path / "report.md").read_text().startswith("| routing.iterations | runs | test/accuracy |")
    png = (tmp_path / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_report_csv_leaves_the_spread_of_a_one_run_group_empty(tmp_path, capsys):
    _fake_run(tmp_path, "0", ["routing.iterations=1", "seed=0"], {"test/accuracy": 97.0})
    _fake_run(tmp_path, "1", ["routing.iterations=1", "seed=1"], {"test/accuracy": 99.0})
    _fake_run(tmp_path, "2", ["routing.iterations=3", "seed=0"], {"test/accuracy": 98.0})
    assert report.main([str(tmp_path), "--metrics", "test/accuracy"]) == 0
    rows = (tmp_path / "report.csv").read_text().splitlines()
    assert rows[1:] == [f"1,2,98.0,{2**0.5}", "3,1,98.0,"]  # one run: no spread, not 0.0


def test_report_help_reads_as_plain_text(capsys):
    with pytest.raises(SystemExit):
        report.main(["--help"])
    text = capsys.readouterr().out
    assert "capsrun report DIR" in text and "``" not in text


@pytest.mark.parametrize(
    "args, message",
    [
        (["--metrics", "nope"], "no run has the metric 'nope'"),
        (["--x", "seed"], "--x seed was not swept here"),
    ],
)
def test_report_errors(tmp_path, capsys, args, message):
    _fake_run(tmp_path, "0", ["seed=0"], {"test/accuracy": 1.0})
    _fake_run(tmp_path, "1", ["seed=1"], {"test/accuracy": 2.0})
    assert report.main([str(tmp_path), *args]) == 2
    assert message in capsys.readouterr().err
    assert report.main([str(tmp_path / "missing")]) == 2


def test_slurm_launcher_and_optuna_search_compose():
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["hydra/launcher=capsrun_slurm"], return_hydra_config=True)
        launcher = cfg.hydra.launcher
        assert launcher._target_.endswith("SlurmLauncher") and launcher.gpus_per_node == 1
        assert launcher.timeout_min == 240
        cfg = compose(config_name="train", overrides=["hparams_search=capsnet_optuna"], return_hydra_config=True)
        assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
        assert cfg.optimized_metric == "best/val/accuracy" and cfg.data.val_split == 5000
        assert set(cfg.hydra.sweeper.params) >= {"optimizer.lr", "routing.iterations"}


def test_report_plot_has_integer_ticks_a_title_and_sample_std_error_bars(tmp_path):
    acc = {(1, 0): 98.0, (1, 1): 99.0, (2, 0): 99.2, (2, 1): 99.4, (3, 0): 99.5, (3, 1): 99.1}
    for i, ((it, seed), a) in enumerate(acc.items()):
        _fake_run(tmp_path, str(i), [f"routing.iterations={it}", f"seed={seed}"], {"test/accuracy": a})
    keys, rows = report.summarise(report.load_runs(tmp_path), ["test/accuracy"])
    fig = report.figure(keys, rows, "routing.iterations", "test/accuracy", "multirun/2026-12-01/10-00-00")
    ax = fig.axes[0]
    assert list(ax.get_xticks()) == [1, 2, 3]  # the values run, no 1.5 or 2.5
    assert ax.get_title().startswith("test/accuracy against routing.iterations\nmultirun/2026-12-01/10-00-00")
    assert "mean ± sample std over 2 runs a point" in ax.get_title()
    (bars,) = [c for c in ax.containers]  # one errorbar line: means and sample-std bars
    assert list(bars.lines[0].get_ydata()) == pytest.approx([98.5, 99.3, 99.3])
    segments = bars.lines[2][0].get_segments()
    assert [s[1][1] - s[0][1] for s in segments] == pytest.approx(
        [2 * statistics.stdev(v) for v in ([98, 99], [99.2, 99.4], [99.5, 99.1])]
    )
