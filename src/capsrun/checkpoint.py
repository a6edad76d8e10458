"""Checkpoints that carry their own config, written atomically, loaded with ``weights_only``."""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from capsrun.errors import CheckpointError, OutputError, brief, unreadable

FORMAT = "capsrun-checkpoint-v1"
_REQUIRED = ("format", "model", "config", "epoch")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write) -> None:
    """Call ``write(file_object)`` on a temporary file beside ``path``, fsync, then rename it
    over ``path``: a reader sees the old file or the new one, never half of one. A failed write
    (a full disk, a file-size limit, permissions) raises :class:`OutputError`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise OutputError(f"cannot write {path} ({e.strerror or brief(e)}); choose another hydra.run.dir") from None
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise OutputError(
                f"cannot write {path} ({e.strerror or brief(e)}); the previous version is intact; "
                "free disk space or choose another hydra.run.dir, then resume"
            ) from None
        raise


def save(path: str | Path, state: dict[str, Any]) -> None:
    """Save a checkpoint dict (model/optimizer/scheduler state, epoch, RNG, resolved config)."""
    # serialised in memory first: torch's zip writer turns a failed file write (a full disk) into
    # an opaque RuntimeError, a plain write of the bytes raises the OSError that says why
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buffer)
    atomic_write(path, lambda f: f.write(buffer.getbuffer()))


def _finite(obj: Any) -> Any:
    """``obj`` with NaN and infinities as null: JSON has no such numbers."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def save_json(path: str | Path, obj: Any) -> None:
    """Valid JSON (non-finite numbers written as null), atomically."""
    text = json.dumps(_finite(obj), indent=2, sort_keys=True, allow_nan=False) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a capsrun checkpoint; anything else raises :class:`CheckpointError` with the fix."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise CheckpointError(f"checkpoint {path} {what}; pass checkpoint=<run dir>/checkpoints/best.pt")
    hint = "point to a checkpoints/last.pt or best.pt written by capsrun train"
    try:
        path.open("rb").close()
    except OSError as e:
        raise CheckpointError(unreadable(path, e, hint)) from None
    if not zipfile.is_zipfile(path):  # torch.save has written zip archives since torch 1.6
        raise CheckpointError(f"{path} is not a capsrun checkpoint (not a torch zip archive, or truncated); {hint}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path} holds objects that safe loading (weights_only=True) refuses, so capsrun did not write it; {hint}"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} is not a readable capsrun checkpoint ({first[:200]}); {hint}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or any(k not in state for k in _REQUIRED):
        raise CheckpointError(
            f"{path} is a torch file but not a capsrun checkpoint; "
            "point to a checkpoints/last.pt or best.pt written by capsrun train"
        )
    return state
