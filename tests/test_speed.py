"""The speed settings change speed, not results: precision, compile, channels-last, placement.

The compiled path is checked against the eager one on the same seeded steps; bf16 against fp32
within a stated tolerance (bfloat16 keeps 8 significant bits, ~0.4 % per rounding).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from capsrun import registry, settings, speed
from capsrun.datasets import BatchLoader
from capsrun.datasets.loader import storage_device
from capsrun.errors import ConfigError
from capsrun.losses import CapsNetLoss
from capsrun.metrics import Meter
from capsrun.models.capsnet import CapsNet
from capsrun.resume import TrainState
from capsrun.run import Run
from capsrun.tblog import Trial
from capsrun.train import train_one_epoch
from helpers import compose_config, learnable_digits


def test_autocast_runs_matmuls_in_bf16_only_for_bf16():
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    for precision in ("fp32", "tf32"):
        with speed.autocast(torch.device("cpu"), precision):
            assert (a @ b).dtype == torch.float32
    with speed.autocast(torch.device("cpu"), "bf16"):
        assert (a @ b).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="precision must be one of"):
        speed.autocast(torch.device("cpu"), "fp16")


def test_fp32_switches_tf32_off_and_tf32_on():
    try:
        speed.set_matmul_precision("tf32")
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        speed.set_matmul_precision("fp32")  # cuDNN's own default is TF32 on: fp32 must turn it off
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        speed.set_matmul_precision("fp32")


def test_channels_last_rule_and_compile_modes():
    assert speed.use_channels_last("auto", "bf16") and not speed.use_channels_last("auto", "fp32")
    assert speed.use_channels_last(True, "fp32") and not speed.use_channels_last(False, "bf16")
    assert speed.compile_mode(False) is None and speed.compile_mode("off") is None
    assert speed.compile_mode(True) == "default" and speed.compile_mode("max-autotune") == "max-autotune"
    with pytest.raises(ValueError, match="compile must be"):
        speed.compile_mode("fast")


def test_compiled_runs_only_the_listed_batch_sizes_compiled():
    module = nn.Linear(3, 2)
    wrapped = speed.Compiled(module, {4})
    calls = []
    wrapped.compiled = lambda x: calls.append(len(x)) or module(x)  # torch.compile is lazy: never ran
    wrapped(torch.zeros(4, 3))
    wrapped(torch.zeros(3, 3))  # the last, smaller batch: eager
    assert calls == [4]
    assert wrapped.weight is module.weight  # everything else is the module's own
    wrapped.eval()
    assert not module.training


def test_storage_device_rule(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert storage_device("host", cpu, 10) == cpu and storage_device("auto", cpu, 10) == cpu
    assert storage_device("device", cuda, 10**12) == cuda and storage_device("host", cuda, 10) == cpu
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (8 * 2**30, 80 * 2**30))
    assert storage_device("auto", cuda, 47 * 2**20) == cuda  # MNIST on a GPU with 8 GiB free
    assert storage_device("auto", cuda, 3 * 2**30) == torch.device("cpu")  # over a quarter of it
    with pytest.raises(ValueError, match="placement must be one of"):
        storage_device("gpu", cuda, 10)


def _loss_curve(precision: str = "fp32", compiled: bool = False, channels_last: bool = False, steps: int = 8):
    """Per-step total loss of a small CapsNet trained by the engine's own loop."""
    torch.manual_seed(0)
    images, labels = learnable_digits(8 * steps + 5, seed=3)  # a last, partial batch of 5
    loader = BatchLoader(torch.from_numpy(images)[:, None], torch.from_numpy(labels).long(), 8, shuffle=True)
    model = CapsNet(conv1_channels=16, primary_types=4, digit_dim=8, decoder_hidden=(32, 64))
    if channels_last:
        model = speed.to_channels_last(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    meter, curve = Meter(), []

    def on_step() -> bool:
        curve.append(meter.compute("train")["train/loss/total"])
        meter.reset()
        return False

    step_model = speed.Compiled(model, {8}) if compiled else model
    run = Run(
        model, CapsNetLoss(), loader, {}, [optimizer], scheduler, {}, Trial("", {}), step_model, precision=precision
    )
    train_one_epoch(run, TrainState(), [meter], on_step)
    return torch.tensor(curve), model


def test_channels_last_gives_the_same_loss_curve():
    reference, _ = _loss_curve()
    fast, model = _loss_curve(channels_last=True)
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-5)


def test_bf16_follows_the_fp32_loss_curve_within_two_percent():
    reference, _ = _loss_curve()
    fast, model = _loss_curve("bf16")
    assert model.conv1.weight.dtype == torch.float32  # weights stay fp32 under autocast
    assert not torch.equal(fast, reference)  # it did run in bf16
    assert reference[-1] < reference[0] * 0.9  # both learn
    torch.testing.assert_close(fast, reference, rtol=0.02, atol=0.0)


@pytest.mark.slow
def test_compiled_gives_the_same_loss_curve():
    torch._dynamo.reset()
    reference, _ = _loss_curve()
    fast, _ = _loss_curve(compiled=True)
    torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.precision=fp16", "trainer.precision must be one of fp32, tf32, bf16, got 'fp16'"),
        ("trainer.compile=fast", "trainer.compile must be false, true or one of"),
        ("trainer.channels_last=maybe", "trainer.channels_last must be auto, true or false"),
        ("data.placement=gpu", "data.placement must be one of auto, device, host"),
    ],
)
def test_bad_speed_settings_are_config_errors(override, message):
    """The same checks as the CLI's one-line errors (tests/test_cli_errors.py runs one of them)."""
    cfg = compose_config("train", override)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        settings.check_model_run(cfg)


@pytest.mark.parametrize("name", ["capsnet", "deep_capsnet"])
def test_capsule_lengths_are_fp32_when_the_capsules_are_bf16(name):
    """The class scores (capsule lengths) are computed in fp32 even when the capsules are bf16 (as
    CUDA autocast makes them): the margin loss compares them with m+ = 0.9, and bf16 (8 bits of
    mantissa) cannot resolve 0.9 from 0.9035."""
    from helpers import compose_config

    cfg = compose_config("train", f"model={name}", "model.net.conv1_channels=16", "model.net.primary_types=4")
    net = registry.model(cfg).eval().to(torch.bfloat16)
    with torch.no_grad():
        out = net(torch.rand(2, 1, 28, 28, dtype=torch.bfloat16))
    assert out.digit_caps.dtype == torch.bfloat16
    assert out.lengths.dtype == torch.float32
    expected = out.digit_caps.float().pow(2).sum(-1).add(1e-8).sqrt()
    assert torch.equal(out.lengths, expected)


RETURNED = """
import sys, torch
from capsrun.speed import keep_freed_memory
kept = sys.argv[1] == "1" and keep_freed_memory()
def resident_mib():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
t = torch.ones(6 << 20)  # 24 MiB, every page written
before = resident_mib()
del t
print(kept, before - resident_mib())
"""


def _returned_on_free(keep: bool) -> tuple[bool, float]:
    """In a fresh process: (keep_freed_memory took effect, MiB handed back to the kernel when a
    24 MiB tensor is freed)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", RETURNED, "1" if keep else "0"], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    kept, mib = done.stdout.split()
    return kept == "True", float(mib)


def test_freed_tensor_memory_is_kept_for_the_next_step():
    """glibc hands a freed 24 MiB tensor straight back to the kernel, so the next step's tensor
    of that size is faulted in and zeroed page by page again (a tapered ladder step: ~3,600 page
    faults); with keep_freed_memory the memory stays in the process for the next step (~900)."""
    kept, returned = _returned_on_free(keep=True)
    if not kept:
        pytest.skip("not Linux with glibc: keep_freed_memory does nothing here")
    assert returned < 1
    assert _returned_on_free(keep=False)[1] > 20  # without it: all 24 MiB go back
