"""Shared fixtures: MNIST-format data written in the real IDX format, and a CLI runner."""

from __future__ import annotations

import gzip
import math
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs the suite on one pytest-xdist worker per core: one thread each, in this
    # process and in the capsrun processes it starts, or two workers' thread pools fight over the
    # cores (an in-process sampler test took 9x longer so)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    torch.set_num_threads(1)

# A model small enough to train in seconds on 2 CPU cores, small batches, no progress bar
# (conf/debug/tiny.yaml); every CLI test uses it.
TINY = ["debug=tiny"]


def write_idx(path: Path, array: np.ndarray) -> None:
    """The IDX format: 0, 0, type 0x08 (uint8), ndim, big-endian uint32 dims, data."""
    assert array.dtype == np.uint8
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.tobytes()
    if path.suffix == ".gz":
        data = gzip.compress(data)
    path.write_bytes(data)


def learnable_digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """28x28 uint8 images whose class sets where a bright 6x6 block sits (a 3x3 grid of places,
    class 9 a horizontal bar), jittered by up to 2 px and noisy: easy to learn, not trivial."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = rng.integers(0, 40, (n, 28, 28)).astype(np.uint8)
    for i, k in enumerate(labels):
        dy, dx = rng.integers(-2, 3, 2)
        if k == 9:
            images[i, 13 + dy : 16 + dy, 4 + dx : 24 + dx] = 255
        else:
            r, c = 3 + 8 * (k // 3) + dy, 3 + 8 * (k % 3) + dx
            images[i, r : r + 6, c : c + 6] = 255
    return images, labels


def write_mnist(root: Path, n_train: int = 320, n_test: int = 200, folder: str = "MNIST") -> Path:
    raw = root / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n, seed in (("train", n_train, 1), ("t10k", n_test, 2)):
        images, labels = learnable_digits(n, seed)
        write_idx(raw / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory) -> Path:
    """A data root with MNIST-format files: 320 train and 200 test learnable images."""
    return write_mnist(tmp_path_factory.mktemp("data"))


def run_capsrun(*args: str, cwd: Path, data_root: Path | None = None, timeout: float = 300, **env_extra):
    """Run the real ``capsrun`` console entry point in a subprocess."""
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(PYTHONUNBUFFERED="1", **env_extra)
    if data_root is not None:
        env["CAPSRUN_DATA"] = str(data_root)
    return subprocess.run(
        [sys.executable, "-m", "capsrun", *args],
        check=False,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def train_until(args: list[str], run_dir: Path, cwd: Path, data_root: Path, line: str) -> dict:
    """``capsrun train *args`` into ``run_dir``, stopped by SIGINT as soon as its log prints a line
    holding ``line``: asserts the run stopped as a SIGINT stops it (exit 130) and returns the
    ``last.pt`` it saved."""
    import signal

    cmd = [sys.executable, "-m", "capsrun", "train", *args, f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "CAPSRUN_DATA": str(data_root), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for out in proc.stdout:
        seen.append(out)
        if line in out:
            proc.send_signal(signal.SIGINT)
            break
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, "".join(seen) + rest
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)


@pytest.fixture
def capsrun_here(monkeypatch, capfd):
    """The same ``capsrun`` entry point as :func:`run_capsrun`, run in this process and returning
    the same kind of result: for the many bad-value checks, each of which a subprocess would make
    pay about 3 s of interpreter, torch and Hydra start-up for a one-line answer. What needs a
    process of its own (signals, kills, a crafted file that must run nothing) keeps
    :func:`run_capsrun`."""
    import logging

    from hydra.core.global_hydra import GlobalHydra

    from capsrun import cli, rundir

    def run(*args: str, cwd: Path, data_root: Path | None = None) -> subprocess.CompletedProcess:
        monkeypatch.chdir(cwd)
        monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
        if data_root is not None:
            monkeypatch.setenv("CAPSRUN_DATA", str(data_root))
        monkeypatch.setattr(sys, "argv", ["capsrun", *args])
        root, loggers = logging.getLogger(), dict(logging.Logger.manager.loggerDict)
        handlers, level = root.handlers[:], root.level
        disabled = {name: lg.disabled for name, lg in loggers.items() if isinstance(lg, logging.Logger)}
        locks, rng = dict(rundir._held), torch.random.get_rng_state()
        capfd.readouterr()
        GlobalHydra.instance().clear()
        try:
            cli._main(list(args))
            code = 0
        except SystemExit as e:
            code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1  # as the interpreter does
        finally:
            GlobalHydra.instance().clear()
            for handler in root.handlers:
                if handler not in handlers:
                    handler.close()
            root.handlers[:], root.level = handlers, level
            for name, was in disabled.items():
                logging.getLogger(name).disabled = was
            for path in set(rundir._held) - set(locks):  # what the process would let go of at exit
                os.close(rundir._held.pop(path))
            torch.random.set_rng_state(rng)
        out, err = capfd.readouterr()
        return subprocess.CompletedProcess(["capsrun", *args], code, out, err)

    return run


def compose_config(config_name: str, *overrides: str):
    """The config ``capsrun <config_name> <overrides>`` would run with, composed in-process."""
    from hydra import compose, initialize_config_dir

    from capsrun.cli import conf_dir

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """``result`` of a capsrun command that must have succeeded; its output otherwise."""
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


class ToyOut(NamedTuple):
    scores: torch.Tensor


class Toy(torch.nn.Module):
    """A linear classifier of 2x2 images into 3 classes, for tests of the training loop."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, x, y=None):
        return ToyOut(self.linear(x.flatten(1)).softmax(-1))


class PoisonedLoss(torch.nn.Module):
    """Cross-entropy; NaN from training call ``poison_at`` on (None: never), a run that diverges."""

    def __init__(self, poison_at: int | None = None):
        super().__init__()
        self.calls, self.poison_at = 0, poison_at

    def forward(self, out, target, y):
        loss = torch.nn.functional.nll_loss(out.scores.clamp_min(1e-6).log(), y)
        if torch.is_grad_enabled():
            self.calls += 1
            if self.poison_at is not None and self.calls >= self.poison_at:
                loss = loss * math.nan
        return {"total": loss}


def toy_run(lr: float = 0.1, loss: torch.nn.Module | None = None, average: float | None = None, **run_kw):
    """A :class:`capsrun.train.Run` of :class:`Toy` on 32 random 2x2 images (4 steps of 8 an epoch,
    the same weights and data in every call); ``average``: ``trainer.average`` over 3 epochs."""
    from capsrun.averaging import WeightAverage, start_step
    from capsrun.datasets import BatchLoader
    from capsrun.tblog import Trial
    from capsrun.train import Run

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(32, 1, 2, 2, generator=gen), torch.randint(0, 3, (32,), generator=gen)
    model = Toy()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    run_kw.setdefault("config", {})
    run_kw.setdefault("trial", Trial("toy", {}))
    if average is not None:
        run_kw["average"] = WeightAverage(model, start_step(average, 12))
    train, test = BatchLoader(x, y, 8, shuffle=True), BatchLoader(x, y, 16)
    return Run(model, loss or PoisonedLoss(), train, {"test": test}, [opt], sched, **run_kw)
