"""What the tests share: fixtures written in the real file formats (IDX, CIFAR10 pickle batches,
affNIST .mat), the real CLI run in a subprocess, a toy training run, and energy models small
enough to enumerate. Test files import from here; conftest.py holds only pytest fixtures."""

from __future__ import annotations

import gzip
import itertools
import math
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import scipy.io
import torch

from capsrun.datasets.cifar10 import CLASSES, FOLDER, TEST_BATCHES, TRAIN_BATCHES
from capsrun.models.capsrbm import CapsuleRBM
from capsrun.models.rbm import RBM

# A model small enough to train in seconds on 2 CPU cores, small batches, no progress bar
# (conf/debug/tiny.yaml); every CLI test uses it.
TINY = ["debug=tiny"]


# --- files in the real formats -----------------------------------------------------------------


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


CIFAR_N = 4  # images per CIFAR10 fixture batch


def batch_bytes(data: np.ndarray, labels: list[int], name: str = "training batch 1 of 5", str_keys=False) -> bytes:
    """A batch as the real files hold it: a dict with data [n, 3072] uint8 (R, G, B planes,
    each row-major), labels as a list of ints, batch_label and filenames; pickle protocol 2.
    The originals are Python 2 pickles whose keys load as str; Python 3 re-pickles give bytes."""
    entry = {"batch_label": name, "labels": labels, "data": data, "filenames": [f"img_{i}.png" for i in labels]}
    if not str_keys:
        entry = {k.encode(): (v.encode() if isinstance(v, str) else v) for k, v in entry.items()}
    return pickle.dumps(entry, protocol=2)


def images_for(seed: int, n: int = CIFAR_N) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)


def write_cifar(root: Path, n: int = CIFAR_N) -> Path:
    """``<root>/cifar-10-batches-py/`` with five train batches, the test batch and batches.meta."""
    folder = root / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(TRAIN_BATCHES + TEST_BATCHES):
        labels = [(i + j) % 10 for j in range(n)]
        (folder / name).write_bytes(batch_bytes(images_for(i, n).reshape(n, -1), labels, name))
    meta = {b"label_names": [c.encode() for c in CLASSES], b"num_cases_per_batch": n, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return root


def mat_struct(images: np.ndarray, labels, order: str = "C") -> dict:
    """``affNISTdata`` as in the real files: one image per column of a 1600 x N uint8 matrix,
    labels as 1 x N ``label_int`` and 10 x N ``label_one_of_n``. The real struct has further
    fields before ``image`` (public loaders index it as field 2): one placeholder stands for them.
    ``order="C"``: a column holds its image row by row (what the loader assumes); ``"F"``:
    column-major, as MATLAB's ``img(:)`` would store it."""
    n = len(images)
    labels = np.asarray(labels, dtype=np.uint8).reshape(1, n)
    onehot = np.zeros((10, n), np.uint8)
    onehot[labels[0] % 10, np.arange(n)] = 1
    columns = np.stack([img.flatten(order=order) for img in images], axis=1) if n else np.zeros((1600, 0), np.uint8)
    return {"other_fields": np.zeros((1, n)), "image": columns, "label_one_of_n": onehot, "label_int": labels}


def write_mat(path: Path, images, labels, order: str = "C", **override) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    struct = mat_struct(np.asarray(images), labels, order) | override
    scipy.io.savemat(path, {"affNISTdata": struct})
    return path


# --- the CLI -----------------------------------------------------------------------------------


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


def train_until(
    args: list[str], run_dir: Path, cwd: Path, data_root: Path, line: str, signum: int | None = None, after: float = 0.0
) -> dict:
    """``capsrun train *args`` into ``run_dir``, sent ``signum`` (SIGINT by default) ``after``
    seconds after its log prints a line holding ``line``: asserts the run ended as that signal ends
    it (SIGKILL: killed; any other: exit 128 + the signal, as a stop) and returns the ``last.pt`` it
    left."""
    import signal
    import time

    signum = signal.SIGINT if signum is None else signum
    cmd = [sys.executable, "-m", "capsrun", "train", *args, f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "CAPSRUN_DATA": str(data_root), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for out in proc.stdout:
        seen.append(out)
        if line in out:
            time.sleep(after)
            proc.send_signal(signum)
            break
    rest, _ = proc.communicate(timeout=120)
    expected = -signal.SIGKILL if signum == signal.SIGKILL else 128 + signum
    assert proc.returncode == expected, "".join(seen) + rest
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)


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
    from capsrun.run import Run
    from capsrun.tblog import Trial

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


# --- energy models small enough to enumerate (9 pixels: 512 visible states) ------------------------


def all_states(n: int = 9) -> torch.Tensor:
    return torch.tensor(list(itertools.product([0.0, 1.0], repeat=n)), dtype=torch.float64)


def all_images(n: int = 9) -> torch.Tensor:
    side = int(math.isqrt(n))
    return all_states(n).view(-1, 1, side, side)


def small_capsrbm(iterations: int = 2, std: float = 0.7, seed: int = 0) -> CapsuleRBM:
    """A 9-pixel capsule RBM (one pixel a patch, 2 capsules of 2 pose units), prior logits that
    differ between patches: small enough to sum every route and hidden state by hand."""
    torch.manual_seed(seed)
    model = CapsuleRBM(
        image_size=3, patch=1, hidden_caps=2, hidden_dim=2, routing_iterations=iterations, weight_std=std,
        persistent=False,
    )  # fmt: skip
    with torch.no_grad():
        model.visible_bias.copy_(torch.linspace(-1, 1, 9))
        model.pose_bias.copy_(torch.tensor([[0.3, -0.2], [0.1, 0.4]]))
        model.prior.copy_(torch.linspace(-0.8, 0.8, 18).view(9, 2))
    return model.double()


def small_grouped_capsrbm(seed: int = 0) -> CapsuleRBM:
    """A 4-pixel capsule RBM: one-pixel patches, 4 capsules of 2 pose units in 2 groups of 2
    (each patch one parent per group: 256 routes), 625 hidden states."""
    torch.manual_seed(seed)
    model = CapsuleRBM(image_size=2, patch=1, hidden_caps=4, hidden_dim=2, groups=2, routing_iterations=3,
                       weight_std=1.2, persistent=False)  # fmt: skip
    with torch.no_grad():
        model.visible_bias.copy_(torch.tensor([-0.5, 0.3, 0.1, -0.2]))
        model.pose_bias.copy_(torch.linspace(-0.4, 0.4, 8).view(4, 2))
        model.prior.copy_(torch.linspace(-0.6, 0.6, 16).view(4, 4))
    return model.double()


def all_routes(model: CapsuleRBM) -> torch.Tensor:
    """Every assignment of the model's patches to their parents ``[K^(P G), P G]``."""
    grids = torch.meshgrid(*[torch.arange(model.choices)] * (model.in_caps * model.groups), indexing="ij")
    return torch.stack([g.flatten() for g in grids], 1)


def exact_free_energy_at(model, v: torch.Tensor, beta: float = 1.0, base: torch.Tensor | None = None) -> torch.Tensor:
    """F_beta(v) ``[B]`` exactly: the model's own where its hidden units are summed out in closed
    form; for the capsule RBM -log sum_r e^{-F_beta(v, r)}, every route summed by hand."""
    with torch.no_grad():
        if not isinstance(model, CapsuleRBM):
            return model.free_energy_at(v, model.encode(v), beta, base)
        per_route = [
            -model.free_energy_at(v, model.chain_state(v, r.expand(len(v), -1)), beta, base) for r in all_routes(model)
        ]
        return -torch.logsumexp(torch.stack(per_route), 0)


def small_rbm(seed: int = 0) -> RBM:
    torch.manual_seed(seed)
    model = RBM(image_size=3, hidden=3, weight_std=1.0, persistent=False)
    with torch.no_grad():
        model.visible_bias.copy_(torch.linspace(-1, 1, 9))
        model.hidden_bias.copy_(torch.tensor([0.5, -0.5, 0.2]))
    return model.double()


def histogram(v: torch.Tensor) -> torch.Tensor:
    idx = (v.flatten(1) * 2 ** torch.arange(8, -1, -1, dtype=v.dtype)).sum(1).long()
    return torch.bincount(idx, minlength=512).double() / len(v)


def sampling_floor(p: torch.Tensor, n: int) -> float:
    """The total variation of ``n`` exact draws from ``p`` to ``p``: what sampling alone gives."""
    gen = torch.Generator().manual_seed(0)
    draws = torch.multinomial(p.float(), n, replacement=True, generator=gen)
    return float(0.5 * (torch.bincount(draws, minlength=len(p)).double() / n - p).abs().sum())


def exact_distribution(model) -> torch.Tensor:
    return torch.softmax(-exact_free_energy_at(model, all_images()), 0)


LADDER_BASE = torch.linspace(-1.5, 0.5, 9, dtype=torch.float64)  # the base-rate model of the 9-pixel ladders


def tempering_capsrbm() -> CapsuleRBM:
    """A 9-pixel capsule RBM with large weights (routes that depend on the pose): the ladder tests' own."""
    torch.manual_seed(0)
    model = CapsuleRBM(image_size=3, patch=1, hidden_caps=2, hidden_dim=2, routing_iterations=3, weight_std=1.5,
                       persistent=False)  # fmt: skip
    with torch.no_grad():
        model.visible_bias.copy_(torch.linspace(-1, 1, 9))
        model.prior.copy_(torch.linspace(0.6, -0.6, 18).view(9, 2))
    return model.double()


def two_wells() -> RBM:
    """One hidden unit with large weights: a well at 'all pixels on' and one at 'all off' with
    about equal mass, and a barrier between them that block Gibbs does not cross."""
    model = RBM(image_size=3, hidden=1, persistent=False).double()
    with torch.no_grad():
        model.weight.fill_(8.0)
        model.hidden_bias.fill_(-36.0)
        model.visible_bias.fill_(-4.0)
    return model


def exact_at(model, beta: float = 1.0, base: torch.Tensor = LADDER_BASE) -> torch.Tensor:
    """p_beta over the 512 states of a 9-pixel model above the base-rate model ``base`` [512]."""
    states = all_images()
    with torch.no_grad():
        return torch.softmax(-exact_free_energy_at(model, states, beta, base), 0)


def tv(v: torch.Tensor, p: torch.Tensor) -> float:
    """Total variation between the histogram of 9-pixel states ``v`` and ``p`` [512]."""
    return float(0.5 * (histogram(v) - p).abs().sum())


def share_on(v: torch.Tensor) -> float:
    """The share of 9-pixel states in the two-wells model's 'on' well (5 or more pixels on)."""
    return float((v.flatten(1).sum(1) >= 5).double().mean())
