"""A sweep's job dirs named by what their jobs change (capsrun.rundir): the name, the paths into
them given back to Hydra, and the dir a refused run leaves behind."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from capsrun import rundir


@pytest.mark.parametrize(
    "overrides, constant, name",
    [
        (["debug=tiny", "routing.iterations=3", "seed=1"], ["debug"], "routing.iterations=3+seed=1"),
        (["seed=1", "routing.iterations=3"], [], "routing.iterations=3+seed=1"),  # sorted by key
        (["debug=tiny", "trainer.epochs=2"], ["debug", "trainer.epochs"], "7"),  # nothing swept: the job number
        (["trainer.resume=auto", "trainer.progress=false", "seed=2"], [], "seed=2"),  # how a run is watched: out
        (["+extra.key=a b", "model.net.channels=[64,128]"], [], "extra.key=a_b+model.net.channels=_64_128_"),
        (["eval_classifier=/runs/x/best.pt"], [], "eval_classifier=_runs_x_best.pt"),  # one path component
    ],
)
def test_a_job_dir_is_named_by_the_overrides_that_change_between_jobs(overrides, constant, name):
    assert rundir.job_dir_name(overrides, constant, 7) == name


def test_a_long_job_dir_name_is_cut_and_keeps_its_job_number():
    many = [f"model.net.key_{i}={i * 1000}" for i in range(20)]
    one, two = rundir.job_dir_name(many, [], 3), rundir.job_dir_name(many, [], 4)
    assert len(one) <= rundir.JOB_DIR_MAX and one.endswith("~3") and one != two


def test_a_sweep_leaves_out_the_keys_given_one_value():
    args = ["-m", "debug=tiny", "routing.iterations=1,2", "seed=range(0,3)", "hydra.sweep.dir=S", "+x=1"]
    added = rundir.sweep_overrides(args)
    assert added[:-1] == args and added[-1] == f"{rundir.EXCLUDE}=[debug,x]"
    mine = [*args, f"{rundir.EXCLUDE}=[seed]"]
    assert rundir.sweep_overrides(mine) == mine  # the user's own choice stands


def test_the_sweep_subdir_resolves_through_the_config():
    """conf/hydra/capsrun.yaml's subdir, composed as Hydra composes a job of a sweep."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf, open_dict

    from capsrun.cli import conf_dir

    overrides = ["routing.iterations=3", "debug=tiny", f"{rundir.EXCLUDE}=[debug]"]
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.job.num = 5
    assert OmegaConf.select(cfg, "hydra.sweep.subdir") == "routing.iterations=3"


def test_paths_into_job_dirs_are_quoted_for_hydra():
    path = "out/multirun/routing.iterations=3+seed=1/checkpoints/best.pt"
    quoted = rundir.quote_paths([f"checkpoint={path}", "seed=1", "-m", "x=[a=1]", "y='a=b'"])
    assert quoted == [f"checkpoint='{path}'", "seed=1", "-m", "x=[a=1]", "y='a=b'"]
    (override,) = OverridesParser.create().parse_overrides(quoted[:1])
    assert override.value() == path  # Hydra reads the path back whole
    pair = rundir.quote_paths([f"checkpoint={path},{path.replace('3', '2')}"])
    assert pair == [f"checkpoint='{path}','{path.replace('3', '2')}'"]  # each member of an ensemble
    assert rundir.quote_paths(["checkpoint=a\\b=c'd"]) == ["checkpoint='a\\\\b=c\\'d'"]


def test_a_refused_run_s_dir_goes_with_its_empty_parents(tmp_path: Path):
    outputs = tmp_path / "outputs"
    refused = outputs / "2026-12-07" / "10-00-00"
    (refused / ".hydra").mkdir(parents=True)
    (refused / ".hydra" / "config.yaml").write_text("a: 1\n")
    (refused / "train.log").write_text("capsrun: error: ...\n")
    kept = outputs / "2026-12-06" / "09-00-00" / "checkpoints"
    kept.mkdir(parents=True)
    assert rundir.discard_refused(tmp_path, refused)
    assert not (outputs / "2026-12-07").exists() and kept.is_dir()  # the other run and outputs/ stay
    busy = outputs / "2026-12-06" / "09-00-00"
    (busy / ".hydra").mkdir()
    (kept / "last.pt").write_bytes(b"")
    assert not rundir.discard_refused(tmp_path, busy)  # it holds a checkpoint: a run's
    (kept / "last.pt").unlink()
    (busy / rundir.LOCK).write_text("1\n")
    assert not rundir.discard_refused(tmp_path, busy)  # a lock this process does not hold: another run's
    rundir.lock(busy)  # refused after this process took the lock (a missing dataset, a removed node)
    assert rundir.discard_refused(tmp_path, busy) and not busy.exists() and busy not in rundir._held
    sweep = tmp_path / "multirun" / "S"
    (sweep / "routing.iterations=1" / ".hydra").mkdir(parents=True)
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    assert rundir.discard_refused(tmp_path, sweep / "routing.iterations=1")
    assert not (tmp_path / "multirun").exists() and tmp_path.is_dir()  # up to, not including, keep_below
