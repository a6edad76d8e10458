"""Refactors change no result: tiny seeded runs of every model, trained through the real CLI on
generated files, give the same weights (SHA-256 of every tensor of last.pt) and the same final
metrics as recorded in tests/golden/runs.json. Exact equality needs the same arithmetic, so the
comparison runs on one thread and only where the record was made (the same torch version, CPU
kernel set and CPU model); elsewhere it is skipped, saying why. After a change that is meant to
change results, rewrite the record: ``python tests/test_golden.py`` (and say so in the commit)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import write_mnist

RECORD = Path(__file__).parent / "golden" / "runs.json"
COMMON = ["trainer.batch_size=32", "trainer.eval_batch_size=100", "trainer.log_every=2", "trainer.progress=false"]
AIS = ["ais.runs=4", "ais.temperatures=50", "ais.base_images=50"]
RUNS = {
    "capsnet": ["debug=tiny", "trainer.epochs=2"],
    "vcaps": ["model=vcaps", "model.net.conv1_channels=16", "model.net.primary_types=4", "model.net.latent_dim=8",
              "model.net.decoder_hidden=[32,64]", "trainer.epochs=2", *COMMON],
    "baseline_cnn": ["model=baseline_cnn", "trainer.epochs=2", *COMMON],
    "deep_capsnet": ["model=deep_capsnet", "model.net.conv1_channels=16", "model.net.primary_types=4", "model.depth=1",
                     "model.width=8", "trainer.epochs=2", *COMMON],
    "rbm": ["model=rbm", "model.net.hidden=32", "optimizer=sgd", "optimizer.lr=0.1", "scheduler=linear",
            "trainer.epochs=2", *AIS, *COMMON],
    "capsrbm": ["model=capsrbm", "optimizer=sgd", "optimizer.lr=0.1", "scheduler=linear", "trainer.epochs=2", *AIS,
                *COMMON],
    "capsnet_health": ["debug=tiny", "trainer.epochs=1", "diagnostics=light"],
}  # fmt: skip


def cpu_model() -> str:
    """The CPU's vendor, family, model and model name (Linux /proc/cpuinfo): two CPUs with the same kernel
    set (AVX-512) still round differently (measured: an AMD EPYC of family 25 gave other weights
    than the record's AVX-512 host, at the record's own commit), so the record names its CPU."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown"
    info = dict(line.split(":", 1) for line in lines if ":" in line)
    info = {k.strip(): v.strip() for k, v in info.items()}
    return " / ".join(info.get(k, "?") for k in ("vendor_id", "cpu family", "model", "model name"))


def machine() -> dict[str, str]:
    return {
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu": cpu_model(),
    }


def digest(run_dir: Path) -> dict:
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]
    h = hashlib.sha256()
    for key, value in sorted(state.items()):
        h.update(key.encode())
        h.update(value.cpu().contiguous().numpy().tobytes())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {
        "weights": h.hexdigest(),
        "metrics": {k: v for k, v in sorted(metrics.items()) if not k.startswith("time/")},
    }


def train(name: str, work: Path, data: Path) -> dict:
    env = {**os.environ, "CAPSRUN_DATA": str(data), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    run_dir = work / name
    done = subprocess.run(
        [sys.executable, "-m", "capsrun", "train", *RUNS[name], f"hydra.run.dir={run_dir}"],
        cwd=work, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return digest(run_dir)


@pytest.fixture(scope="module")
def record():
    saved = json.loads(RECORD.read_text())
    if saved["machine"] != machine():
        pytest.skip(f"the record was made with {saved['machine']}, this is {machine()}: results may differ in bits")
    return saved["runs"]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_a_seeded_run_gives_the_recorded_weights_and_metrics(name, record, tmp_path_factory):
    work = tmp_path_factory.mktemp(name)
    data = write_mnist(work / "data", n_train=96, n_test=64)
    assert train(name, work, data) == record[name]


if __name__ == "__main__":  # rewrite the record on this machine
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        data = write_mnist(Path(tmp) / "data", n_train=96, n_test=64)
        runs = {name: train(name, Path(tmp), data) for name in RUNS}
    RECORD.write_text(json.dumps({"machine": machine(), "runs": runs}, indent=1, sort_keys=True) + "\n")
    print(f"wrote {RECORD}")
