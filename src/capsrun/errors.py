"""Errors a user can fix (the CLI prints them as one line and exits with code 2), and how a
command leaves at once on a second Ctrl-C (:func:`abort`)."""

import os
import sys
from pathlib import Path


def permission_denied(e: BaseException) -> bool:
    """Whether ``e`` is the OS refusing access (not a missing or damaged file)."""
    import errno

    return isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM)


def unreadable(path, e: OSError, fix: str) -> str:
    """One line for a file the OS would not read: permission denied says so (and not "download it
    again"); anything else names the OS's reason and ``fix``."""
    if permission_denied(e):
        return f"cannot read {path}: permission denied; make it readable (chmod a+r {path})"
    return f"cannot read {path} ({e.strerror or brief(e)}); {fix}"


def brief(e: BaseException) -> str:
    """An exception as a short single line, to embed in a one-line error message."""
    return " ".join(str(e).split())[:160] or type(e).__name__


class CapsrunError(Exception):
    """A problem with the user's input (config, files, checkpoint); the message says the fix."""


class ConfigError(CapsrunError):
    """A config value is out of range or of the wrong type."""


class DatasetError(CapsrunError):
    """A dataset file is missing, truncated or not in the expected format."""


class CheckpointError(CapsrunError):
    """A checkpoint is missing, unreadable or not a capsrun checkpoint."""


class OutputError(CapsrunError):
    """A result could not be written (a full disk, permissions); the previous file is intact."""


def abort(signum: int = 2) -> None:
    """Leave now, in one line, with exit code 128 + ``signum``: what Ctrl-C does outside the
    training loop (start-up, ``capsrun eval``) and a second Ctrl-C inside it. Immediate, because a
    KeyboardInterrupt raised inside Hydra or OmegaConf surfaces as unrelated errors; nothing is
    lost by it: every file capsrun writes is written to a temporary file and renamed."""
    try:
        sys.stdout.flush()
        print("capsrun: interrupted; files already written are complete (checkpoints are atomic)", file=sys.stderr)
        sys.stderr.flush()
    finally:
        os._exit(128 + signum)


def resolved_root(root: str | Path) -> Path:
    """The data root ``root`` absolute, its links followed; a symlink loop or a path that cannot
    be followed is a :class:`DatasetError` naming it."""
    try:
        return Path(root).expanduser().resolve()
    except (OSError, RuntimeError) as e:  # Python 3.11 reports a symlink loop as RuntimeError
        why = brief(e)
        raise DatasetError(f"data.root {root} cannot be followed ({why}); point data.root at a directory") from None
