"""How fast a step runs, never what it computes: numeric precision, ``torch.compile``, memory format.

Three settings (``trainer.precision``, ``trainer.compile``, ``trainer.channels_last``), applied
the same way by ``capsrun train`` and ``capsrun bench``; docs/performance.md has what each one
buys, measured on CPUs and GPUs, and why.

- ``fp32``: IEEE single precision everywhere; TF32 is switched OFF for matmuls and cuDNN
  convolutions (PyTorch leaves it on for cuDNN by default), so fp32 means fp32.
- ``tf32``: fp32 tensors, TF32 tensor cores for matmuls and convolutions (CUDA, Ampere and
  later; on CPU the same as fp32).
- ``bf16``: autocast: convolutions and matrix products run in bfloat16; weights, optimizer
  state and the losses stay fp32 (no loss scaling needed: bf16 has fp32's exponent range).
"""

from __future__ import annotations

import contextlib
import ctypes
import platform
from collections.abc import Callable, Iterable

import torch
from torch import nn

PRECISIONS = ("fp32", "tf32", "bf16")


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt(3) parameters (glibc's malloc.h)


def keep_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 512 << 20) -> bool:
    """Keep freed tensor memory in the process for the next step (Linux with glibc; elsewhere
    nothing). By default glibc hands the top of its heap back to the kernel once more than twice
    its (dynamic) mmap threshold is free, so a step that allocates and frees the same
    multi-megabyte tensors every time touches fresh pages the kernel must fault in and zero: a
    training step of the capsule RBM's tapered ladder (670 x 784 states) took ~3,600 page faults,
    ~900 with these thresholds, and ran 10-15 % faster on a 2-core CPU (docs/performance.md).
    PyTorch's CPU tuning guide recommends jemalloc or tcmalloc for the same reason; this needs
    neither. Up to ``trim_threshold`` bytes of freed memory stay mapped. Returns whether set."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # the mmap threshold first: setting it also stops glibc from moving the trim threshold
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def set_matmul_precision(precision: str) -> None:
    """Process-wide TF32 switches for ``precision`` (they are global in PyTorch)."""
    tf32 = check_precision(precision) == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context of one forward pass and its losses: bfloat16 for ``bf16``, else none."""
    if check_precision(precision) != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def use_channels_last(setting: bool | str, precision: str) -> bool:
    """``auto``: channels-last with bf16 only: it speeds bf16 convolutions up and slows fp32 ones
    down on a CPU (oneDNN; docs/performance.md), and cuDNN recommends it for bf16."""
    if setting == "auto":
        return precision == "bf16"
    return bool(setting)


def to_channels_last(model: nn.Module) -> nn.Module:
    """4-d weights (convolutions) in NHWC order; inputs need no change (a convolution with
    channels-last weights returns channels-last activations, and a 1-channel image is the same
    in both orders)."""
    return model.to(memory_format=torch.channels_last)


class Compiled:
    """``torch.compile`` of ``module`` for the batch sizes in ``sizes``; any other size (the
    last, smaller batch of an epoch) runs eagerly rather than paying a second compilation
    (tens of seconds on a CPU) for one step per epoch. Everything else (``train()``,
    ``eval()``, ``reconstruct``, ``parameters()``) is the module's own.

    Compilation is static-shaped (``dynamic=False``): one graph per size and mode, each
    specialised, which is what the throughput figures in docs/performance.md were measured with.
    """

    def __init__(self, module: nn.Module, sizes: Iterable[int], mode: str | None = None):
        self.module = module
        self.sizes = frozenset(sizes)
        self.compiled = torch.compile(module, dynamic=False, mode=mode)

    def __call__(self, x: torch.Tensor, *args, **kwargs):
        fn: Callable = self.compiled if x.shape[0] in self.sizes else self.module
        return fn(x, *args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.module, name)


def compile_mode(setting: bool | str) -> str | None:
    """``trainer.compile``: false/off -> None (eager); true/on/default -> ``"default"``; or a
    ``torch.compile`` mode by name (``reduce-overhead`` for CUDA graphs, ``max-autotune``)."""
    if setting in (False, None, "off", "false"):
        return None
    if setting in (True, "on", "true", "default"):
        return "default"
    modes = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
    if setting not in modes:
        raise ValueError(f"compile must be false, true or one of {', '.join(modes)}, got {setting!r}")
    return str(setting)
