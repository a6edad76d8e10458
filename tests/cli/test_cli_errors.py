"""Bad input: one line on stderr naming the problem and the fix, exit code 2, no traceback."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest
import torch

from helpers import TINY, run_capsrun, write_mnist

pytestmark = pytest.mark.slow


def _assert_clean_error(result, *needles: str) -> None:
    err = result.stderr.strip()
    assert result.returncode == 2, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr + result.stdout
    assert len(err.splitlines()) == 1, err
    assert err.startswith("capsrun: error: ")
    for needle in needles:
        assert needle in err, err


@pytest.mark.parametrize(
    "override, needle",
    [
        ("routing.iterations=0", "routing.iterations must be an integer >= 1"),
        ("routing.iterations=-1", "routing.iterations must be an integer >= 1"),
        ("routing.iterations=abc", "routing.iterations must be an integer >= 1, got 'abc'"),
        ("trainer.batch_size=0", "trainer.batch_size"),
        ("data.train_limit=-5", "data.train_limit"),
        ("model=nope", "unknown model 'nope'; choose one of: baseline_cnn, baseline_cnn_multi, capsnet"),
        ("dataset=nope", "unknown dataset 'nope'"),
        ("experiment=nope", "unknown experiment 'nope'"),
        ("trainer.epoch=3", "there is no key 'trainer.epoch' (did you mean trainer.epochs?)"),
        ("model=capsnett", "unknown model 'capsnett' (did you mean model=capsnet?)"),
        ("dataset=mnsit", "unknown dataset 'mnsit' (did you mean dataset=mnist?)"),
        ("+model.net.dgit_dim=4", "digit_dim"),
        ("trainer.precision=fp16", "trainer.precision must be one of fp32, tf32, bf16, got 'fp16'"),
        ("trainer.average=1", "trainer.average must be a number in [0, 1), got 1"),
        ("trainer.average=-0.1", "trainer.average must be a number in [0, 1)"),
        ("trainer.epochs=${oc.env:CAPSRUN_UNSET_VARIABLE}", "trainer.epochs cannot be resolved"),
        ("seed=${seed}", "seed cannot be resolved (Recursive interpolation detected)"),
        ("~model.net", "the config has no model.net"),
        ("trainer.num_images=-1", "trainer.num_images must be an integer >= 0, got -1"),
        ("routing.leaky=maybe", "routing.leaky must be true or false, got 'maybe'"),
        ("hydra.run.dir=", "hydra.run.dir is empty"),
    ],
)
def test_bad_config_values(override, needle, mnist_root, tmp_path, capsrun_here):
    run_dir = [] if override.startswith("hydra.run.dir") else [f"hydra.run.dir={tmp_path / 'run'}"]
    result = capsrun_here("train", *TINY, override, *run_dir, cwd=tmp_path, data_root=mnist_root)
    _assert_clean_error(result, needle)
    assert not list(tmp_path.rglob("*.pt")) and not (tmp_path / ".hydra").exists()


@pytest.mark.parametrize(
    "sweep, bad, needle",
    [(False, "optimizer.lr=-1", "optimizer.lr"), (True, "optimizer.lr=-1,-2", "optimizer.lr"),
     (False, "~model.net", "the config has no model.net")],
)  # fmt: skip
def test_a_run_refused_for_a_bad_setting_leaves_no_dir_in_outputs(sweep, bad, needle, mnist_root, tmp_path,
                                                                 capsrun_here):  # fmt: skip
    """In Hydra's own (dated) run dir, refused after Hydra wrote its records: they go, and so do
    the date and sweep dirs left empty; a run of the user's own hydra.run.dir is left as it is."""
    (tmp_path / "outputs" / "2026-12-01" / "earlier").mkdir(parents=True)
    args = ["-m", *TINY, bad] if sweep else [*TINY, bad]
    _assert_clean_error(capsrun_here("train", *args, cwd=tmp_path, data_root=mnist_root), needle)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "outputs").rglob("*")) == [
        "outputs/2026-12-01",
        "outputs/2026-12-01/earlier",
    ]
    mine = tmp_path / "mine"
    capsrun_here("train", *TINY, "optimizer.lr=-1", f"hydra.run.dir={mine}", cwd=tmp_path, data_root=mnist_root)
    assert (mine / ".hydra").is_dir()


def test_bad_value_in_a_sweep(mnist_root, tmp_path):
    result = run_capsrun(
        "train",
        "-m",
        *TINY,
        "model=capsnet,nope",
        f"hydra.sweep.dir={tmp_path / 's'}",
        cwd=tmp_path,
        data_root=mnist_root,
    )
    _assert_clean_error(result, "unknown model 'nope'")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda(mnist_root, tmp_path):
    result = run_capsrun(
        "train", *TINY, "trainer.device=cuda", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, data_root=mnist_root
    )
    _assert_clean_error(result, "no CUDA device", "trainer.device=cpu")


@pytest.mark.parametrize(
    "dataset, folder",
    [
        ("mnist", "MNIST/raw"),
        ("fashion_mnist", "FashionMNIST/raw"),
        ("cifar10", "cifar-10-batches-py"),
        ("multimnist", "MNIST/raw"),
    ],
)
def test_missing_dataset_without_download_says_where_to_put_files(dataset, folder, tmp_path, capsrun_here):
    result = capsrun_here(
        "train",
        *TINY,
        f"dataset={dataset}",
        "data.download=false",
        f"data.root={tmp_path / 'e'}",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    _assert_clean_error(result, str(tmp_path / "e" / folder), "data.download=true")
    logged = (tmp_path / "run" / "train.log").read_text().splitlines()  # the failed run's own log says why
    assert logged[-1].endswith(result.stderr.strip()) and "[ERROR]" in logged[-1]


def test_missing_affnist_test_set(mnist_root, tmp_path):
    result = run_capsrun(
        "train",
        *TINY,
        "dataset=affnist",
        "data.download=false",
        f"hydra.run.dir={tmp_path / 'r'}",
        cwd=tmp_path,
        data_root=mnist_root,
    )
    _assert_clean_error(result, str(mnist_root / "affNIST"), "test.mat", "data.download=true")


def test_truncated_idx_file(tmp_path):
    root = write_mnist(tmp_path / "data")
    path = root / "MNIST" / "raw" / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    result = run_capsrun("train", *TINY, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, data_root=root)
    _assert_clean_error(result, "train-images-idx3-ubyte.gz is truncated")


def test_corrupt_gzip(tmp_path):
    root = write_mnist(tmp_path / "data")
    path = root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:20])
    result = run_capsrun("train", *TINY, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, data_root=root)
    _assert_clean_error(result, "t10k-labels-idx1-ubyte.gz", "download it again")


@pytest.mark.parametrize("kind", ["text", "torch-dict", "missing", "truncated"])
def test_eval_rejects_what_is_not_a_checkpoint(kind, mnist_root, tmp_path):
    path = tmp_path / "model.pt"
    if kind == "text":
        path.write_text("not a checkpoint\n")
    elif kind == "torch-dict":
        torch.save({"weights": torch.zeros(3)}, path)
    elif kind == "truncated":
        from capsrun import checkpoint

        checkpoint.save(path, {"model": {"w": torch.zeros(1000)}, "config": {}, "epoch": 1})
        path.write_bytes(path.read_bytes()[:300])
    result = run_capsrun(
        "eval", f"checkpoint={path}", f"hydra.run.dir={tmp_path / 'eval'}", cwd=tmp_path, data_root=mnist_root
    )
    _assert_clean_error(result, str(path))


def test_eval_without_checkpoint(tmp_path):
    result = run_capsrun("eval", f"hydra.run.dir={tmp_path / 'eval'}", cwd=tmp_path)
    _assert_clean_error(result, "checkpoint=")


def test_resume_from_a_checkpoint_of_another_model(mnist_root, tmp_path):
    first = tmp_path / "first"
    ok = run_capsrun("train", *TINY, "trainer.epochs=1", f"hydra.run.dir={first}", cwd=tmp_path, data_root=mnist_root)
    assert ok.returncode == 0, ok.stderr
    result = run_capsrun(
        "train",
        *TINY,
        "model.net.primary_types=2",
        f"trainer.resume={first}/checkpoints/last.pt",
        f"hydra.run.dir={tmp_path / 'second'}",
        cwd=tmp_path,
        data_root=mnist_root,
    )
    expected = "was trained with model.net.primary_types=4, this run has model.net.primary_types=2"
    _assert_clean_error(result, expected, "another hydra.run.dir")


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["frobnicate"], "unknown command 'frobnicate'"),
        (["trian"], "unknown command 'trian' (did you mean train?)"),
        ([], "usage"),
    ],
)
def test_unknown_command(argv, needle, tmp_path):
    result = run_capsrun(*argv, cwd=tmp_path)
    assert result.returncode == 2
    assert needle in result.stderr + result.stdout


def test_help_lists_commands(tmp_path):
    result = run_capsrun("--help", cwd=tmp_path)
    assert result.returncode == 0
    assert "train" in result.stdout and "eval" in result.stdout


def test_hydra_flags_still_work(tmp_path):
    result = run_capsrun("train", "routing.iterations=2", "--cfg", "job", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "iterations: 2" in result.stdout and "routing_iterations: ${routing.iterations}" in result.stdout
    helped = run_capsrun("train", "--help", cwd=tmp_path)
    assert helped.returncode == 0 and "model: baseline_cnn, baseline_cnn_multi, capsnet" in helped.stdout
    assert not (Path(tmp_path) / "outputs").exists()  # --cfg / --help start no run
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_version(tmp_path):
    from capsrun import __version__

    result = run_capsrun("--version", cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == f"capsrun {__version__}", result.stderr


def test_eval_with_an_empty_checkpoint_list(tmp_path, capsrun_here):
    result = capsrun_here("eval", "checkpoint=[]", f"hydra.run.dir={tmp_path / 'eval'}", cwd=tmp_path)
    _assert_clean_error(result, "checkpoint=[] names no checkpoint file")


def test_a_data_root_in_a_symlink_loop(tmp_path, capsrun_here):
    loop = tmp_path / "a"
    loop.symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(loop)
    result = capsrun_here("train", *TINY, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, data_root=loop)
    _assert_clean_error(result, f"data.root {loop} cannot be followed", "point data.root at a directory")


@pytest.mark.parametrize("damage", ["a zip that is not torch's", "a truncated last.pt"])
def test_resuming_from_a_damaged_checkpoint_is_one_line(damage, mnist_root, tmp_path):
    """Both ways of naming what to resume: trainer.resume=PATH, and resume=auto finding a last.pt."""
    import zipfile

    run_dir = tmp_path / "run"
    if damage == "a zip that is not torch's":
        path = tmp_path / "other.zip"
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("notes.txt", "hello")
        extra = [f"trainer.resume={path}"]
    else:
        ok = run_capsrun(
            "train", *TINY, "trainer.epochs=1", f"hydra.run.dir={run_dir}", cwd=tmp_path, data_root=mnist_root
        )
        assert ok.returncode == 0, ok.stderr
        path = run_dir / "checkpoints" / "last.pt"
        path.write_bytes(path.read_bytes()[:2000])
        extra = ["trainer.epochs=2"]
    result = run_capsrun("train", *TINY, *extra, f"hydra.run.dir={run_dir}", cwd=tmp_path, data_root=mnist_root)
    _assert_clean_error(result, str(path))


def test_a_checkpoint_whose_epoch_is_not_a_count_is_refused(mnist_root, tmp_path):
    from capsrun import checkpoint

    run_dir = tmp_path / "run"
    ok = run_capsrun("train", *TINY, "trainer.epochs=1", f"hydra.run.dir={run_dir}", cwd=tmp_path, data_root=mnist_root)
    assert ok.returncode == 0, ok.stderr
    state = checkpoint.load(run_dir / "checkpoints" / "best.pt")
    state.pop("format")
    crafted = tmp_path / "crafted.pt"
    checkpoint.save(crafted, {**state, "epoch": "x"})  # with a digest that matches: only the type is wrong
    result = run_capsrun("eval", f"checkpoint={crafted}", cwd=tmp_path, data_root=mnist_root)
    _assert_clean_error(result, "says its epoch is 'x', not a count of epochs")


# --- capsrun report: every file it reads is hostile input --------------------------------------------


@pytest.mark.parametrize(
    "argv, needle",
    [
        ([], "the following arguments are required: dir"),
        (["a-dir", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    ],
)
def test_report_usage_errors_are_one_line(argv, needle, tmp_path):
    result = run_capsrun("report", *argv, cwd=tmp_path)
    _assert_clean_error(result, needle, "usage: capsrun report DIR")


def _fake_run(root: Path, name: str, metrics, overrides, config=None) -> Path:
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / "metrics.json").write_text(metrics if isinstance(metrics, str) else __import__("json").dumps(metrics))
    (run / ".hydra" / "overrides.yaml").write_text(overrides)
    if config is not None:
        (run / ".hydra" / "config.yaml").write_text(config)
    return run


def test_report_skips_runs_whose_files_have_the_wrong_shape(tmp_path):
    sweep = tmp_path / "sweep"
    _fake_run(sweep, "0", {"epoch": 2, "test/accuracy": 91.0}, "- seed=0\n- routing.iterations=1\n")
    _fake_run(sweep, "1", {"epoch": 2, "test/accuracy": 93.0}, "- seed=0\n- routing.iterations=3\n")
    _fake_run(sweep, "2", {"epoch": 2, "test/accuracy": {"nested": 1}}, "- seed=1\n- routing.iterations=3\n")
    _fake_run(sweep, "3", {"epoch": 2, "test/accuracy": 90.0}, "- seed=2\n- routing.iterations=3\n", "trainer: 5\n")
    _fake_run(sweep, "4", [1, 2], "- seed=3\n")
    _fake_run(sweep, "5", {"epoch": 2}, "{a: 1}\n")
    result = run_capsrun("report", str(sweep), "--metrics", "test/accuracy", cwd=tmp_path)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "skipped" in result.stderr and (sweep / "report.csv").is_file()
    rows = (sweep / "report.csv").read_text().splitlines()
    assert rows[1].startswith("1,1,91.0") and rows[2].startswith("3,3,91.5"), rows  # run 2's nested figure left out


def test_report_into_a_folder_it_cannot_write_is_one_line(tmp_path):
    sweep = tmp_path / "sweep"
    _fake_run(sweep, "0", {"epoch": 2, "test/accuracy": 91.0}, "- routing.iterations=1\n")
    _fake_run(sweep, "1", {"epoch": 2, "test/accuracy": 93.0}, "- routing.iterations=3\n")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = run_capsrun("report", str(sweep), "--out", str(blocker / "out"), cwd=tmp_path)
    _assert_clean_error(result, "cannot write the report into", "choose another --out")
