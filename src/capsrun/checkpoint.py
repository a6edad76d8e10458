"""Checkpoints that carry their own config and a digest of their contents, written atomically,
loaded with ``weights_only`` and checked against the digest."""

from __future__ import annotations

import hashlib
import io
import json
import logging
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
_UNVERIFIED: set[Path] = set()  # checkpoints without a digest already named in the log

log = logging.getLogger("capsrun")


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


def digest(state: Any) -> str:
    """SHA-256 of a checkpoint's contents: every tensor's name, dtype, shape and bytes and every
    other value's repr, in sorted key order (the same whatever device the tensors are on)."""
    h = hashlib.sha256()

    def walk(obj: Any, name: str) -> None:
        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(obj, dict):
            for key in sorted(obj, key=str):
                walk(obj[key], f"{name}/{key}")
        elif isinstance(obj, (list, tuple)):
            h.update(f"{name}:{type(obj).__name__}{len(obj)};".encode())
            for i, value in enumerate(obj):
                walk(value, f"{name}/{i}")
        else:
            h.update(f"{name}={obj!r};".encode())

    walk(state, "")
    return h.hexdigest()


def save(path: str | Path, state: dict[str, Any]) -> None:
    """Save a checkpoint dict (model/optimizer/scheduler state, epoch, RNG, resolved config) with
    the :func:`digest` of its contents, which :func:`load` checks."""
    state = {"format": FORMAT, **{k: v for k, v in state.items() if k != "digest"}}  # a re-saved file: its own
    state["digest"] = digest(state)
    # serialised in memory first: torch's zip writer turns a failed file write (a full disk) into
    # an opaque RuntimeError, a plain write of the bytes raises the OSError that says why
    buffer = io.BytesIO()
    torch.save(state, buffer)
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
    epoch = state["epoch"]
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
        raise CheckpointError(f"{path} says its epoch is {epoch!r}, not a count of epochs; {hint}")
    for key in ("model", "config"):
        if not isinstance(state[key], dict):
            raise CheckpointError(f"{path} holds a {type(state[key]).__name__} as its {key}, not a mapping; {hint}")
    stored = state.pop("digest", None)
    if stored is None:
        if path.resolve() not in _UNVERIFIED:
            _UNVERIFIED.add(path.resolve())
            log.warning("%s was written before checkpoints carried a digest: it loads, unverified", path)
    elif stored != digest(state):
        raise CheckpointError(
            f"{path} is damaged: its contents no longer match the SHA-256 digest written with it (changed "
            "bytes, a bad copy or disk); use the run's other checkpoint (last.pt or best.pt) or train again"
        )
    return state
