"""Nothing lost, nothing executed: crafted files, kills at any moment, resumes, non-finite training,
one run per run dir and one line for every error a user can cause. Real CLI, real files, real kills."""

from __future__ import annotations

import gzip
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import capsrun
from capsrun import checkpoint
from helpers import TINY, ok, run_capsrun, write_mnist

pytestmark = pytest.mark.slow

ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False


def one_line_error(result, *needles: str, code: int = 2) -> str:
    err = result.stderr.strip()
    assert result.returncode == code, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


def train(run_dir: Path, data: Path, *extra: str, epochs: int = 2, **kw):
    return run_capsrun(
        "train",
        *TINY,
        f"trainer.epochs={epochs}",
        f"hydra.run.dir={run_dir}",
        *extra,
        cwd=run_dir.parent,
        data_root=data,
        **kw,
    )


@pytest.fixture(scope="module")
def finished(mnist_root, tmp_path_factory) -> Path:
    """A finished tiny run of 2 epochs."""
    run_dir = tmp_path_factory.mktemp("safety") / "run"
    ok(train(run_dir, mnist_root))
    return run_dir


def comparable(metrics: dict) -> dict:
    """metrics.json without the wall-clock figures."""
    return {k: v for k, v in metrics.items() if not k.startswith("time/")}


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every TensorBoard scalar of a run dir as ``capsrun.scalars`` reads it, which says that a
    run resumed after a kill has each step once (the events a resume purges dropped)."""
    frame = capsrun.scalars(run_dir)
    frame = frame[~frame["tag"].str.startswith("time/")]
    return {tag: [(int(s), round(v, 6)) for s, v in zip(g["step"], g["value"])] for tag, g in frame.groupby("tag")}


# --- 1. a checkpoint never runs code -------------------------------------------------------------


def _open_node(marker: Path) -> dict:
    """What Hydra's instantiate would turn into open(marker, "w"): a file written by a checkpoint."""
    return {"_target_": "builtins.open", "file": str(marker), "mode": "w"}


CRAFTS = {
    "nested target in a model setting": lambda c, m: c["model"]["net"].__setitem__("weight_std", _open_node(m)),
    "target as the loss": lambda c, m: c["model"].__setitem__("loss", _open_node(m)),
    "another class as the model": lambda c, m: c["model"]["net"].__setitem__("_target_", "capsrun.models.rbm.RBM"),
    "an unknown setting": lambda c, m: c["model"]["net"].__setitem__("_recursive_", True),
    "an unknown model": lambda c, m: c["model"].__setitem__("name", "os"),
    "an interpolation": lambda c, m: c["model"]["net"].__setitem__("weight_std", "${oc.env:HOME}"),
    "an unknown dataset setting": lambda c, m: c["dataset"].__setitem__("root", "/etc"),
}
EXPECTED = {
    "nested target in a model setting": "must be a number, string, boolean or list",
    "target as the loss": "names 'builtins.open'",
    "another class as the model": "names 'capsrun.models.rbm.RBM'",
    "an unknown setting": "has no setting '_recursive_'",
    "an unknown model": "names model 'os'",
    "an interpolation": "interpolations",
    "an unknown dataset setting": "dataset settings ['root']",
}


def _craft(finished: Path, tmp_path: Path, craft: str) -> tuple[Path, Path]:
    marker = tmp_path / "written-by-the-checkpoint"
    ckpt = torch.load(finished / "checkpoints" / "best.pt", weights_only=True)
    CRAFTS[craft](ckpt["config"], marker)
    ckpt.pop("digest")
    ckpt["digest"] = checkpoint.digest(ckpt)  # the digest guards against damage, not against a crafter
    path = tmp_path / "crafted.pt"
    torch.save(ckpt, path)
    return path, marker


EXPLOITS = ("nested target in a model setting", "target as the loss")  # what ran code before


def test_a_damaged_checkpoint_is_one_line_not_a_wrong_figure(finished, mnist_root, tmp_path):
    """64 flipped bytes in the middle of best.pt (its weights): eval refuses it by its digest."""
    damaged = tmp_path / "best.pt"
    data = bytearray((finished / "checkpoints" / "best.pt").read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    damaged.write_bytes(bytes(data))
    result = run_capsrun("eval", f"checkpoint={damaged}", cwd=tmp_path, data_root=mnist_root)
    one_line_error(result, "is damaged", "SHA-256 digest")


@pytest.mark.parametrize(
    "command, craft",
    [("eval", c) for c in CRAFTS] + [(cmd, c) for cmd in ("sample", "analyze", "eval_classifier") for c in EXPLOITS],
)
def test_a_crafted_checkpoint_config_is_refused_and_runs_nothing(craft, command, finished, mnist_root, tmp_path):
    path, marker = _craft(finished, tmp_path, craft)
    if command == "eval_classifier":
        args = ["train", *TINY, "trainer.epochs=1", f"eval_classifier={path}"]
    else:
        args = [command, f"checkpoint={path}"]
    result = run_capsrun(*args, f"hydra.run.dir={tmp_path / 'out'}", cwd=tmp_path, data_root=mnist_root)
    one_line_error(result, str(path), EXPECTED[craft])
    assert not marker.exists(), "the checkpoint's config ran code"


def test_a_crafted_cifar10_pickle_is_refused_before_it_runs(tmp_path):
    from helpers import write_cifar

    root = write_cifar(tmp_path / "data")
    marker = tmp_path / "written-by-the-pickle"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    batch = root / "cifar-10-batches-py" / "data_batch_1"
    batch.write_bytes(pickle.dumps({"data": Exploit(), "labels": [0]}, protocol=2))
    result = run_capsrun(
        "train",
        *TINY,
        "dataset=cifar10",
        "data.download=false",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
        data_root=root,
    )
    one_line_error(result, "data_batch_1", "refused without loading it")
    assert not marker.exists(), "the pickle ran code"


# --- 2. the last epoch's window; 3. TensorBoard after a resume -----------------------------------


def test_a_kill_before_the_final_metrics_json_is_repaired_by_resume(finished, mnist_root, tmp_path):
    """The state a kill leaves after the final last.pt: resume=auto writes metrics.json."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    (run_dir / "metrics.json").unlink()
    ok(train(run_dir, mnist_root))
    assert comparable(json.loads((run_dir / "metrics.json").read_text())) == comparable(
        json.loads((finished / "metrics.json").read_text())
    )


def test_resume_from_a_finished_checkpoint_writes_its_metrics(finished, mnist_root, tmp_path):
    run_dir = tmp_path / "run"
    ok(train(run_dir, mnist_root, f"trainer.resume={finished / 'checkpoints' / 'last.pt'}"))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epoch"] == 2
    assert comparable(metrics) == comparable(json.loads((finished / "metrics.json").read_text()))


def test_resume_keeps_the_events_of_the_checkpoints_own_step(mnist_root, tmp_path):
    run_dir = tmp_path / "run"
    ok(train(run_dir, mnist_root, epochs=1))
    ok(train(run_dir, mnist_root, epochs=2))
    accuracy = scalars(run_dir)["test/accuracy"]
    assert [step for step, _ in accuracy] == [10, 20], accuracy  # 10 steps an epoch: both epochs' figures


def _wait_for_training(proc: subprocess.Popen, log: Path, starts: int, timeout: float = 120) -> bool:
    """Until this launch has logged its start line (after which it trains); False if it ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if log.is_file() and log.read_text().count("parameters, device") > starts:
            return True
        time.sleep(0.02)
    raise AssertionError("the run did not start")


@pytest.fixture(scope="module")
def reference(mnist_root, tmp_path_factory) -> Path:
    """Six uninterrupted epochs: what every killed-and-resumed run must reach."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    ok(train(run_dir, mnist_root, epochs=6))
    return run_dir


def test_kills_at_any_moment_then_resume_reach_the_uninterrupted_result(reference, mnist_root, tmp_path):
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(PYTHONUNBUFFERED="1", CAPSRUN_DATA=str(mnist_root))
    argv = [sys.executable, "-m", "capsrun", "train", *TINY, "trainer.epochs=6", f"hydra.run.dir={run_dir}"]
    killed, log = 0, run_dir / "train.log"
    for i, delay in enumerate((0.0, 0.05, 0.15, 0.3, 0.45, 0.6, 0.8, 1.0)):
        proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if _wait_for_training(proc, log, i):
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
        killed += proc.returncode == -signal.SIGKILL
        assert proc.returncode in (0, -signal.SIGKILL), err.decode()
    assert killed >= 4, f"only {killed} kills hit a running training"
    ok(train(run_dir, mnist_root, epochs=6))
    assert comparable(json.loads((run_dir / "metrics.json").read_text())) == comparable(
        json.loads((reference / "metrics.json").read_text())
    )
    for name in ("best.pt", "last.pt"):
        mine = torch.load(run_dir / "checkpoints" / name, weights_only=True)
        theirs = torch.load(reference / "checkpoints" / name, weights_only=True)
        assert mine["epoch"] == theirs["epoch"]
        for key, value in theirs["model"].items():
            assert torch.equal(mine["model"][key], value), (name, key)
    assert scalars(run_dir) == scalars(reference)
    assert not list(run_dir.rglob(".*.tmp")), "a killed write left a temporary file behind"


# --- 4. non-finite training ------------------------------------------------------------------------


def test_a_loss_that_becomes_nan_stops_the_run_in_one_line(mnist_root, tmp_path):
    run_dir = tmp_path / "run"
    result = train(run_dir, mnist_root, "optimizer.lr=1e12")
    one_line_error(result, "the training loss became nan at step", "lower optimizer.lr")
    for path in (run_dir / "checkpoints").glob("*.pt"):
        ckpt = torch.load(path, weights_only=True)
        assert all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point()), path
    if (run_dir / "metrics.json").exists():
        json.loads((run_dir / "metrics.json").read_text())


# --- 5. one run per run dir -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prefix, needle", [("", "in use by another capsrun process"), ("++", "in use by another capsrun process"),
                       ("+", "Could not append to config. An item is already at 'hydra.run.dir'")],
)  # fmt: skip
def test_a_second_process_in_a_busy_run_dir_is_refused(prefix, needle, mnist_root, tmp_path):
    """However the second names the run dir (hydra.run.dir=, ++hydra.run.dir=; +hydra.run.dir=,
    which Hydra itself refuses), it is refused before Hydra rewrites the first's .hydra/ files."""
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(CAPSRUN_DATA=str(mnist_root))
    argv = [sys.executable, "-m", "capsrun", "train", *TINY, "trainer.epochs=500", f"hydra.run.dir={run_dir}"]
    first = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert _wait_for_training(first, run_dir / "train.log", 0)
        before = {p: p.read_bytes() for p in (run_dir / ".hydra").iterdir()}
        second = run_capsrun(
            "train", *TINY, "seed=7", f"{prefix}hydra.run.dir={run_dir}", cwd=tmp_path, data_root=mnist_root
        )
        one_line_error(second, needle)
        assert {p: p.read_bytes() for p in (run_dir / ".hydra").iterdir()} == before
    finally:
        first.kill()
        first.wait()


def test_a_sweep_into_a_sweep_dir_of_other_settings_is_refused_and_touches_nothing(mnist_root, tmp_path):
    sweep = tmp_path / "sweep"
    ok(run_capsrun("train", "-m", *TINY, "trainer.epochs=1", "seed=0", f"hydra.sweep.dir={sweep}", cwd=tmp_path,
                   data_root=mnist_root))  # fmt: skip
    before = {p: p.read_bytes() for p in sweep.rglob("*") if p.is_file() and p.name != ".capsrun.lock"}
    other = run_capsrun(
        "train", "-m", *TINY, "trainer.epochs=1", "seed=5", f"hydra.sweep.dir={sweep}", cwd=tmp_path,
        data_root=mnist_root,
    )  # fmt: skip
    one_line_error(other, f"{sweep} holds a sweep of", "seed=0", "this one is of", "seed=5")
    assert {p: p.read_bytes() for p in sweep.rglob("*") if p.is_file() and p.name != ".capsrun.lock"} == before
    again = run_capsrun(  # the same sweep, longer: continued
        "train", "-m", *TINY, "trainer.epochs=2", "seed=0", f"hydra.sweep.dir={sweep}", cwd=tmp_path,
        data_root=mnist_root,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert json.loads((sweep / "0" / "metrics.json").read_text())["epoch"] == 2


def test_resume_with_other_settings_is_refused_and_touches_nothing(finished, mnist_root, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != ".capsrun.lock"}
    result = train(run_dir, mnist_root, "seed=1")
    one_line_error(result, "was trained with seed=0, this run has seed=1")
    result = train(run_dir, mnist_root, "optimizer.lr=0.01")
    one_line_error(result, "was trained with optimizer.lr=0.001, this run has optimizer.lr=0.01")
    after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != ".capsrun.lock"}
    assert after == before


def test_resume_never_in_a_finished_run_dir_keeps_its_best_pt(finished, mnist_root, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    best = (run_dir / "checkpoints" / "best.pt").read_bytes()
    result = train(run_dir, mnist_root, "trainer.resume=never")
    one_line_error(result, "already holds a run", "trainer.resume=auto")
    assert (run_dir / "checkpoints" / "best.pt").read_bytes() == best


def test_stale_temporary_files_are_cleaned_on_the_next_start(finished, mnist_root, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    stale = [run_dir / "checkpoints" / ".last.pt.x1y2.tmp", run_dir / ".metrics.json.x3y4.tmp"]
    for path in stale:
        path.write_bytes(b"half a file")
    ok(train(run_dir, mnist_root))
    assert not any(p.exists() for p in stale)


# --- 6. one line for every error a user can cause ----------------------------------------------


@pytest.mark.parametrize(
    "override, needle",
    [
        ("optimizer.lr=-0.1", "optimizer.lr must be a number > 0, got -0.1"),
        ("optimizer.lr=fast", "optimizer.lr must be a number > 0, got 'fast'"),
        ("optimizer.betas=[2,3]", "optimizer: Invalid beta parameter"),
        ("scheduler.decay_steps=0", "scheduler: decay_steps must be a number > 0"),
        ("model.net.digit_dim=0", "empty layer"),
        ("model.net.conv1_channels=0", "empty layer"),
        ("model.net.primary_types=0", "empty layer (primary_caps.conv.weight"),
        ("routing.iterations=100000000", "routing.iterations=100000000 is more than 100"),
        ("model.net.decoder_hidden=[32,-4]", "capsnet model"),
    ],
)
def test_bad_values_are_one_line(override, needle, mnist_root, tmp_path, capsrun_here):
    run_dir = tmp_path / "run"
    args = [*TINY, "trainer.epochs=1", f"hydra.run.dir={run_dir}", override]
    one_line_error(capsrun_here("train", *args, cwd=tmp_path, data_root=mnist_root), needle)


def test_a_linear_tail_that_cannot_work_is_one_line(mnist_root, tmp_path):
    result = train(tmp_path / "run", mnist_root, "scheduler=linear", "scheduler.tail=1.0", epochs=1)
    one_line_error(result, "scheduler: tail must be in [0, 1), got 1.0")


def test_images_of_a_size_the_model_cannot_take_are_one_line(mnist_root, tmp_path):
    """dataset.canvas makes 40x40 MultiMNIST images; the model is sized by dataset.image_size."""
    result = train(
        tmp_path / "run",
        mnist_root,
        "dataset=multimnist",
        "dataset.canvas=40",
        "dataset.test_size=64",
        "dataset.epoch_size=64",
        epochs=1,
    )
    one_line_error(result, "multimnist's test images are 1x40x40, but dataset.image_size=36", "dataset.image_size=40")


def test_a_cifar10_crop_the_model_was_not_sized_for_is_one_line(tmp_path):
    from helpers import write_cifar

    root = write_cifar(tmp_path / "data")
    result = train(tmp_path / "run", root, "dataset=cifar10", "dataset.crop=20", "data.download=false", epochs=1)
    one_line_error(result, "cifar10's test images are 3x20x20", "set dataset.image_size=20")


def test_a_corrupt_deflate_stream_is_one_line(tmp_path):
    root = write_mnist(tmp_path / "data")
    path = root / "MNIST" / "raw" / "train-images-idx3-ubyte.gz"
    data = bytearray(path.read_bytes())
    for i in range(40, len(data) - 20, 97):  # the header is intact, the compressed blocks are not
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(Exception):  # noqa: B017 - zlib.error or BadGzipFile: the fixture is what it claims
        gzip.decompress(path.read_bytes())
    result = train(tmp_path / "run", root, epochs=1)
    one_line_error(result, "train-images-idx3-ubyte.gz is not a readable gzip file", "download it again")


def test_an_unreadable_file_says_permission_denied(tmp_path):
    if ROOT:
        pytest.skip("root reads every file")
    root = write_mnist(tmp_path / "data")
    path = root / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz"
    path.chmod(0)
    result = train(tmp_path / "run", root, epochs=1)
    err = one_line_error(result, "permission denied")
    assert "download" not in err


def test_a_run_dir_that_cannot_be_created_is_one_line(mnist_root, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = run_capsrun("train", *TINY, f"hydra.run.dir={blocker / 'run'}", cwd=tmp_path, data_root=mnist_root)
    one_line_error(result, "cannot create the run dir", "not a directory")


def test_an_unwritable_checkpoints_folder_fails_before_training(mnist_root, tmp_path):
    if ROOT:
        pytest.skip("root writes everywhere")
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints").chmod(0o500)
    result = train(run_dir, mnist_root, epochs=1)
    one_line_error(result, "checkpoints", "permission denied")
    assert "epoch 1/1" not in (run_dir / "train.log").read_text()


def test_a_full_disk_while_saving_is_one_line_and_leaves_no_half_file(mnist_root, tmp_path):
    import resource

    def small_files():  # writes beyond 500 kB fail with EFBIG, as a full disk fails with ENOSPC
        resource.setrlimit(resource.RLIMIT_FSIZE, (500_000, 500_000))  # best.pt is 0.8 MB here

    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(CAPSRUN_DATA=str(mnist_root))
    result = subprocess.run(
        [sys.executable, "-m", "capsrun", "train", *TINY, "trainer.epochs=1", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=small_files,
    )
    one_line_error(result, "cannot write", "checkpoints/best.pt (File too large)", "the previous version is intact")
    assert not list(run_dir.rglob("*.tmp")) and not list((run_dir / "checkpoints").glob("*.pt"))


def _default_sigint() -> None:
    # as a terminal's foreground job gets it: pytest started from a background job (`make test &`)
    # inherits SIGINT ignored, and the CLI rightly keeps ignoring it then
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt(argv: list[str], cwd: Path, env: dict, after: float) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(
        argv,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint,
    )
    time.sleep(after)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def test_ctrl_c_during_start_up_is_exit_130_without_a_traceback(mnist_root, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(CAPSRUN_DATA=str(mnist_root))
    argv = [sys.executable, "-m", "capsrun", "train", *TINY, f"hydra.run.dir={tmp_path / 'run'}"]
    one_line_error(_interrupt(argv, tmp_path, env, 0.8), "interrupted", code=130)


def test_ctrl_c_during_eval_is_exit_130_without_a_traceback(finished, mnist_root, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(CAPSRUN_DATA=str(mnist_root))
    argv = [
        sys.executable,
        "-m",
        "capsrun",
        "eval",
        f"checkpoint=[{','.join([str(finished / 'checkpoints' / 'best.pt')] * 4)}]",  # an ensemble: a longer eval
        "trainer.batch_size=1",
        "trainer.progress=false",
        f"hydra.run.dir={tmp_path / 'eval'}",
    ]
    codes = []
    for after in (1.5, 2.5, 3.5, 5.0):  # start-up took 1-2 s on 2 cores; one eval of the fixture under 1 s
        result = _interrupt(argv, tmp_path, env, after)
        codes.append(result.returncode)
        if result.returncode == 130:
            one_line_error(result, "interrupted", code=130)
        else:  # done before the signal, or it came while Python was shutting down (a shell says 130)
            assert result.returncode in (0, -signal.SIGINT) and "Traceback" not in result.stderr, result.stderr
    assert 130 in codes, codes


def test_report_skips_half_written_foreign_and_unfinished_runs(finished, tmp_path):
    sweep = tmp_path / "sweep"
    for name, text in (("0", None), ("1", '{"test/accuracy": 9'), ("2", '["not", "a", "run"]'), ("3", "unfinished")):
        run = sweep / name
        shutil.copytree(finished / ".hydra", run / ".hydra")
        if text is None:
            shutil.copy(finished / "metrics.json", run / "metrics.json")
        elif text == "unfinished":
            metrics = json.loads((finished / "metrics.json").read_text())
            (run / "metrics.json").write_text(json.dumps({**metrics, "epoch": 1}))
        else:
            (run / "metrics.json").write_text(text)
    result = run_capsrun("report", str(sweep), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "1 finished runs" in result.stdout and "3 skipped" in result.stdout, result.stdout
    warnings = result.stderr.strip().splitlines()
    assert len(warnings) == 3 and all(w.startswith("capsrun report: warning: skipped") for w in warnings), warnings
    assert any("unfinished (epoch 1 of 2)" in w for w in warnings)
