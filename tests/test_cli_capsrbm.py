"""End-to-end: ``capsrun train model=capsrbm`` and ``capsrun sample`` on MNIST-format fixtures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator

from capsrun import build
from conftest import ok, run_capsrun, write_idx, write_mnist

pytestmark = pytest.mark.slow

RBM = [
    "model=capsrbm",
    "model.net.hidden_caps=16",
    "model.net.hidden_dim=4",
    "model.net.patch=7",
    "model.net.weight_std=0.1",
    "trainer.batch_size=32",
    "trainer.eval_batch_size=100",
    "trainer.log_every=5",
    "trainer.progress=false",
    "model.samples.chains=4",
    "model.samples.gibbs_steps=5",
    "optimizer.lr=0.01",
    "model.net.data_init=false",  # the learning checks below then measure what the gradient learned
]


@pytest.fixture(scope="module")
def rbm_run(mnist_root, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("rbm") / "run"
    args = [*RBM, "model.persistent=true", "trainer.epochs=6", f"hydra.run.dir={run}"]
    ok(run_capsrun("train", *args, cwd=run.parent, data_root=mnist_root))
    return run


def _scalars(run: Path, tag: str) -> list[float]:
    ea = event_accumulator.EventAccumulator(str(run), size_guidance={event_accumulator.SCALARS: 0})
    ea.Reload()
    return [e.value for e in ea.Scalars(tag)]


def _model(path: Path, trained: bool):
    ckpt = torch.load(path, weights_only=True)
    from omegaconf import OmegaConf

    torch.manual_seed(0)
    model = build.model(OmegaConf.create(ckpt["config"]))
    if trained:
        model.load_state_dict(ckpt["model"])
    return model.eval()


def test_rbm_learns_the_data_against_an_untrained_model(rbm_run, mnist_root):
    """Held-out images get a lower free energy than random bits, by far more after training."""
    from capsrun.datasets import load_split

    images, _ = load_split("mnist", mnist_root, train=False, download=False)
    test = (images[:100].float() / 255 > 0.5).float()
    noise = torch.bernoulli(torch.full_like(test, 0.5), generator=torch.Generator().manual_seed(0))
    gaps = {}
    with torch.no_grad():
        for trained in (False, True):
            model = _model(rbm_run / "checkpoints" / "last.pt", trained)
            gaps[trained] = (model.free_energy(noise).mean() - model.free_energy(test).mean()).item()
    assert gaps[True] > gaps[False] + 10.0, gaps
    recon = _scalars(rbm_run, "test/loss/reconstruction")
    assert recon[-1] < 0.8 * recon[0], recon


def test_rbm_logs_its_monitors_and_keeps_its_persistent_chains(rbm_run):
    ea = event_accumulator.EventAccumulator(str(rbm_run))
    ea.Reload()
    tags = ea.Tags()
    for tag in (
        "train/loss/total",
        "train/free_energy/data",
        "test/free_energy/data",
        "train/free_energy/model",
        "train/hidden/on",
        "train/chain/acceptance",
        "samples/acceptance",
        "best/test/loss/reconstruction",
    ):
        assert tag in tags["scalars"], tag
    assert not any(t.endswith("accuracy") for t in tags["scalars"])  # no labels, no accuracy
    assert "samples/gibbs" in tags["images"] and "test/reconstructions" in tags["images"]
    acceptance = _scalars(rbm_run, "train/chain/acceptance")
    assert all(0 < a <= 1 for a in acceptance)
    state = torch.load(rbm_run / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert state["chains"].shape == (32, 1, 28, 28) and bool(state["chains_started"])
    assert set(state["chains"].unique().tolist()) <= {0.0, 1.0}
    metrics = json.loads((rbm_run / "metrics.json").read_text())
    assert metrics["best/test/loss/reconstruction"] == pytest.approx(min(_scalars(rbm_run, "test/loss/reconstruction")))


def test_rbm_never_reads_the_labels(tmp_path):
    """Two data roots that differ only in their labels train to the same weights."""
    roots = []
    for name, seed in (("a", None), ("b", 7)):
        root = write_mnist(tmp_path / name, n_train=96, n_test=50)
        if seed is not None:
            labels = np.random.default_rng(seed).integers(0, 10, 96).astype(np.uint8)
            write_idx(root / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz", labels)
        roots.append(root)
    weights = []
    for root in roots:
        run = root / "run"
        ok(run_capsrun("train", *RBM, "trainer.epochs=1", f"hydra.run.dir={run}", cwd=root, data_root=root))
        weights.append(torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"])
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_sample_runs_chains_and_writes_grids(rbm_run, mnist_root, tmp_path):
    out = tmp_path / "samples"
    ckpt = rbm_run / "checkpoints" / "best.pt"
    args = [f"checkpoint={ckpt}", "num_samples=9", "gibbs_steps=16", "init=data", f"hydra.run.dir={out}"]
    ok(run_capsrun("sample", *args, cwd=tmp_path, data_root=mnist_root))
    for name in ("gibbs", "gibbs_mean", "chain"):
        image = np.asarray(Image.open(out / f"{name}.png"))
        assert image.ndim == 3 and image.shape[0] > 28
    gibbs = np.asarray(Image.open(out / "gibbs.png"))[2:30, 2:30, 0]  # the first sample, inside the padding
    assert set(np.unique(gibbs).tolist()) <= {0, 255}  # binary visible states
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 < metrics["samples/acceptance"] <= 1
    assert metrics["test/free_energy/data"] < metrics["samples/free_energy"] + 1e6  # finite numbers
    chain = np.asarray(Image.open(out / "chain.png"))
    assert chain.shape[1] == 9 * 28 + 10 * 2  # start + 8 snapshots per row


@pytest.mark.parametrize(
    "args, message",
    [
        (["init=prior"], "init must be noise or data"),
        (["gibbs_steps=0"], "gibbs_steps must be an integer >= 1"),
        (["flips=0"], "flips must be null or a number > 0"),
        (["step_size=-1"], "step_size must be null or a number > 0"),
    ],
)
def test_sample_errors_are_one_line(rbm_run, mnist_root, tmp_path, args, message):
    ckpt = rbm_run / "checkpoints" / "best.pt"
    result = run_capsrun("sample", f"checkpoint={ckpt}", *args, cwd=tmp_path, data_root=mnist_root)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_continuous_visible_units_train_and_sample_grey_images(mnist_root, tmp_path):
    """``model.net.visible=continuous``: grey levels in, Langevin chains, grey levels out."""
    run, out = tmp_path / "run", tmp_path / "samples"
    cont = [*RBM, "model.net.visible=continuous", "model.net.step_size=2", "model.persistent=true"]
    ok(
        run_capsrun(
            "train",
            *cont,
            "trainer.epochs=1",
            "trainer.log_every=1",
            "data.train_limit=96",
            f"hydra.run.dir={run}",
            cwd=tmp_path,
            data_root=mnist_root,
        )
    )
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert len(state["chains"].unique()) > 1000 and 0 < state["chains"].min() and state["chains"].max() < 1
    acceptance = _scalars(run, "train/chain/acceptance")
    assert 0 < min(acceptance) and sum(acceptance) < len(acceptance)  # the MH test rejects some proposals
    ckpt = run / "checkpoints" / "last.pt"
    args = [f"checkpoint={ckpt}", "num_samples=4", "gibbs_steps=8", "step_size=1.5", f"hydra.run.dir={out}"]
    ok(run_capsrun("sample", *args, cwd=tmp_path, data_root=mnist_root))
    sample = np.asarray(Image.open(out / "gibbs.png"))[2:30, 2:30, 0]
    assert len(np.unique(sample)) > 10  # grey levels, not bits
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 < metrics["samples/acceptance"] < 1
    bad = run_capsrun("train", *RBM, "model.net.visible=gaussian", cwd=tmp_path, data_root=mnist_root)
    assert bad.returncode == 2 and "visible must be binary or continuous" in bad.stderr.strip().splitlines()[-1]
