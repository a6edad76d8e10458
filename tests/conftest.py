"""pytest fixtures: a data root of MNIST-format files, the CLI run in this process. What tests
share beyond fixtures is in helpers.py, imported from there."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import write_mnist

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs the suite on one pytest-xdist worker per core: one thread each, in this
    # process and in the capsrun processes it starts, or two workers' thread pools fight over the
    # cores (an in-process sampler test took 9x longer so)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    torch.set_num_threads(1)

__all__ = ["write_mnist"]  # test_golden.py, frozen since its record was made, imports it from here


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory) -> Path:
    """A data root with MNIST-format files: 320 train and 200 test learnable images."""
    return write_mnist(tmp_path_factory.mktemp("data"))


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
