"""One run per run dir: an exclusive lock, stale temporary files, the settings a resume must keep.

Two ``capsrun train`` processes in one ``hydra.run.dir`` would interleave their checkpoints and
event files; the first takes an exclusive ``flock`` on ``<run dir>/.capsrun.lock`` for its
lifetime (the kernel drops it when the process dies, however it dies), the second is refused. A
resumed run must be the run it continues: :func:`resume_conflicts` names what differs between the
checkpoint's config and this one among the settings that decide the result.
"""

from __future__ import annotations

import errno
import logging
import os
import re
from pathlib import Path
from typing import Any

from capsrun.errors import ConfigError

log = logging.getLogger("capsrun")

LOCK = ".capsrun.lock"
_held: dict[Path, int] = {}  # run dir -> the open lock file of this process

# What decides a run's result and cannot change between a checkpoint and its resume. The number
# of epochs can (a longer run continues the same schedule), and so can logging and speed settings.
FIXED = (
    "seed",
    "model",
    "dataset",
    "optimizer",
    "scheduler",
    "routing",
    "trainer.batch_size",
    "data.train_limit",
    "data.val_split",
    "trainer.average",
)

# FIXED settings added since: a checkpoint written before one existed was trained with this value
ADDED = {"trainer.average": 0.0}


def writable(path: Path, what: str) -> None:
    """Create ``path`` (a directory) if needed and check that a file can be written in it, before
    any work is done: one line naming the problem otherwise."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".capsrun-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        reason = "permission denied" if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else e.strerror or str(e)
        raise ConfigError(f"cannot write to the {what} {path} ({reason}); choose another hydra.run.dir") from None


def lock(run_dir: Path) -> None:
    """Hold ``run_dir`` for this process; :class:`ConfigError` if another process holds it."""
    import fcntl

    run_dir = run_dir.resolve()
    if run_dir in _held:
        return
    writable(run_dir, "run dir")
    fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise ConfigError(
            f"run dir {run_dir} is in use by another capsrun process (pid {holder}); wait for it to finish, "
            "or give this run its own hydra.run.dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[run_dir] = fd


def clean_stale(run_dir: Path) -> int:
    """Remove the temporary files of writes a killed process left half done (``.<name>.*.tmp``
    from :func:`capsrun.checkpoint.atomic_write`) in ``run_dir`` and its ``checkpoints/``; only
    while holding the lock, when no other process can be writing them. Returns how many."""
    removed = 0
    for folder in (run_dir, run_dir / "checkpoints"):
        for stale in folder.glob(".*.tmp") if folder.is_dir() else ():
            stale.unlink(missing_ok=True)
            removed += 1
    if removed:
        log.info("removed %d temporary file(s) a killed run left in %s", removed, run_dir)
    return removed


# command-line overrides that change how a run is watched or where it continues from, not what it
# is: left out wherever runs are told apart (report, analyze, TensorBoard's HParams)
NOT_SETTINGS = ("hydra.", "trainer.progress", "trainer.resume")


def run_overrides(overrides: list[str]) -> list[tuple[str, str]]:
    """``(key, value text)`` of each of a run's command-line ``overrides``
    (``.hydra/overrides.yaml``) that is a setting: not one of :data:`NOT_SETTINGS`."""
    pairs = [override.lstrip("+~").partition("=")[::2] for override in overrides]
    return [(key, text) for key, text in pairs if not key.startswith(NOT_SETTINGS)]


def yaml_value(text: str) -> Any:
    """An override's value as YAML reads it (``3`` an int, ``[1,2]`` a list), else the text."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def select(config: dict[str, Any], key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _differences(a: Any, b: Any, key: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _differences(a.get(k), b.get(k), f"{key}.{k}")]
    return [] if a == b else [key]


# import paths capsrun has moved: a checkpoint that names the old one continues the same run
MOVED = {
    "capsrun.train.exponential_decay": "capsrun.schedules.exponential_decay",
    "capsrun.train.linear_decay": "capsrun.schedules.linear_decay",
}


# model.* keys of earlier releases: mirrors of model.net.* (the energy models' chain settings) and
# model.samples (the sample grid, now sampler.*, which decides no weight). A checkpoint whose
# config has them continues the same run.
OLD_MODEL_KEYS = ("cd_steps", "persistent", "tempering", "ladder_from", "ladder_shift", "samples")


def _current_layout(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    """``saved`` without the :data:`OLD_MODEL_KEYS` that ``current`` no longer has."""
    model, now = saved.get("model"), current.get("model")
    if not isinstance(model, dict) or not isinstance(now, dict):
        return saved
    return {**saved, "model": {k: v for k, v in model.items() if k not in OLD_MODEL_KEYS or k in now}}


def _current_targets(config: Any) -> Any:
    """``config`` with every ``_target_`` of :data:`MOVED` under its current name."""
    if isinstance(config, dict):
        return {k: MOVED.get(v, v) if k == "_target_" else _current_targets(v) for k, v in config.items()}
    return config


def resume_conflicts(saved: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(key, checkpoint's value, this run's value)`` for each :data:`FIXED` setting that differs
    between two resolved configs (a ``_target_`` capsrun has since moved counts as the same, and so
    do the :data:`OLD_MODEL_KEYS` it has since dropped; a setting of :data:`ADDED` that the
    checkpoint's config lacks counts as its value there)."""
    saved = _current_layout(_current_targets(saved), current)
    for key, value in ADDED.items():
        if select(saved, key) is None and select(current, key) is not None:
            *parents, last = key.split(".")
            node = saved
            for part in parents:
                node = node.setdefault(part, {})
            node[last] = value
    found = []
    for root in FIXED:
        for key in _differences(select(saved, root), select(current, root), root):
            found.append((key, select(saved, key), select(current, key)))
    return found


def check_sweep(sweep_dir: Path, overrides: list[str]) -> None:
    """A sweep into ``sweep_dir``, which may hold an earlier one (its ``multirun.yaml``), continues
    it only with the same settings: the ``overrides`` of the keys that decide a run's result
    (:data:`FIXED`) and ``experiment`` must be the earlier sweep's; else a :class:`ConfigError`
    before anything is written."""
    from omegaconf import OmegaConf

    stored = sweep_dir / "multirun.yaml"
    if not stored.is_file():
        return
    try:
        before = [str(o) for o in OmegaConf.load(stored).hydra.overrides.task]
    except Exception:  # any unreadable or foreign file: say so, run nothing
        raise ConfigError(f"{stored} is not a sweep record capsrun can read; choose another hydra.sweep.dir") from None

    def deciding(given: list[str]) -> list[str]:
        return sorted(o for o in given if o.lstrip("+~").partition("=")[0].startswith((*FIXED, "experiment")))

    if deciding(before) != deciding(overrides):
        raise ConfigError(
            f"{sweep_dir} holds a sweep of {' '.join(deciding(before)) or 'the defaults'}, this one is of "
            f"{' '.join(deciding(overrides)) or 'the defaults'}; continue that sweep with its overrides, or choose "
            "another hydra.sweep.dir (nothing was written)"
        )


# --- a sweep's job dirs, named by what their jobs change ---------------------------------------

# characters a job dir keeps: a name that is one path component, safe in a shell and in
# TensorBoard's run selector; anything else (/, spaces, quotes, brackets) becomes "_"
_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]")
JOB_DIR_MAX = 200  # characters of a job dir name (255 at most): a longer one is cut and ends in its job number
EXCLUDE = "hydra.job.config.override_dirname.exclude_keys"


def job_dir_name(overrides: list[str], constant: list[str], num: int) -> str:
    """A sweep job's dir: its ``overrides`` (``hydra.overrides.task``) but the ``constant`` keys
    (the same for every job) and :data:`NOT_SETTINGS`, sorted by key, as ``key=value`` joined by
    ``+``: ``routing.iterations=3+seed=1``. Hydra's ``override_dirname`` with two changes: ``+``
    joins the items (``,`` would make a path given back as an override a sweep list), and
    characters outside ``[A-Za-z0-9._=+-]`` become ``_``. A job that changes nothing is ``num``."""
    items = sorted(
        f"{key}={_UNSAFE.sub('_', text)}"
        for key, text in run_overrides([str(o) for o in overrides])
        if key not in {str(k) for k in constant}
    )
    name = "+".join(items)
    if len(name) > JOB_DIR_MAX:
        name = f"{name[: JOB_DIR_MAX - 8]}~{num}"
    return name or str(num)


def register_resolvers() -> None:
    """``${capsrun.job_dir:...}``, which ``conf/hydra/capsrun.yaml`` names sweep job dirs by."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("capsrun.job_dir"):
        OmegaConf.register_new_resolver("capsrun.job_dir", lambda o, c, n: job_dir_name(list(o), list(c), int(n)))


def sweep_overrides(args: list[str]) -> list[str]:
    """A sweep's command line with ``hydra.job.config.override_dirname.exclude_keys`` set to the
    keys given one value (they tell no job apart), unless the user set it; the swept keys (a
    list of values, ``range(...)``, a sweeper's search space) stay in the job dir names."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if any(a.lstrip("+").startswith(EXCLUDE + "=") for a in args):
        return args
    given = [a for a in args if "=" in a and not a.startswith("-")]
    try:
        parsed = OverridesParser.create().parse_overrides(given)
    except Exception:  # Hydra reports a bad override itself
        return args
    constant = sorted({o.key_or_group for o in parsed if not o.is_sweep_override() and not o.is_hydra_override()})
    return [*args, f"{EXCLUDE}=[{','.join(constant)}]"]


register_resolvers()  # wherever a job is resolved: this process, or a launcher's worker importing capsrun


def quote_paths(args: list[str]) -> list[str]:
    """``key=value`` arguments whose value holds ``=`` (a path into a sweep's job dir,
    ``checkpoint=outputs/.../routing.iterations=3/checkpoints/best.pt``) with the value quoted
    for Hydra's override parser, which reads an unquoted ``=`` as a syntax error; each item of
    ``a,b`` separately (an ensemble, or a sweep over paths). Already quoted or bracketed values,
    and flags, pass unchanged."""

    def quoted(text: str) -> str:
        return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'" if "=" in text else text

    out = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if arg.startswith("-") or not sep or "=" not in value or value[:1] in ("'", '"', "["):
            out.append(arg)
        else:
            out.append(f"{key}=" + ",".join(quoted(part) for part in value.split(",")))
    return out


def discard_refused(keep_below: Path, run_dir: Path | None = None) -> bool:
    """Remove the dir of a run refused before it did anything (a bad setting; default: this
    Hydra job's, its log file closed first): one that holds nothing but Hydra's records
    (``.hydra/``, the command's ``.log``) and, when this process holds it, its lock and an empty
    ``checkpoints/``; then each parent up to ``keep_below`` (not included) left empty, or holding
    only a sweep's ``multirun.yaml``. A dir holding anything else (another process's lock, a
    checkpoint, events) is kept. Returns whether ``run_dir`` was removed."""
    import shutil

    if run_dir is None:
        from hydra.core.hydra_config import HydraConfig

        root = logging.getLogger()
        for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
            handler.close()
            root.removeHandler(handler)
        run_dir = Path(HydraConfig.get().runtime.output_dir)
    run_dir, keep_below = run_dir.absolute(), keep_below.absolute()
    if not run_dir.is_dir() or keep_below not in run_dir.parents:
        return False
    mine = run_dir.resolve() in _held

    def records(e: Path) -> bool:
        if e.name == ".hydra" or (e.suffix == ".log" and e.is_file()):
            return True
        return mine and (e.name == LOCK or (e.name == "checkpoints" and e.is_dir() and not any(e.iterdir())))

    if not all(records(e) for e in run_dir.iterdir()):
        return False
    if mine:
        os.close(_held.pop(run_dir.resolve()))
    shutil.rmtree(run_dir, ignore_errors=True)
    for parent in run_dir.parents:
        if parent == keep_below or keep_below not in parent.parents:
            break
        left = list(parent.iterdir())
        if any(e.name != "multirun.yaml" for e in left):
            break
        shutil.rmtree(parent, ignore_errors=True)
    return True
