"""capsrun from Python (a notebook, a script): a trained model back, a sweep as a table.

    import capsrun
    run = capsrun.load("outputs/2026-12-07/10-00-00")      # a run dir or a .pt file
    run.model(images).scores                                # eval mode, on run.device
    table = capsrun.runs("outputs/multirun/2026-12-07/10-00-00")
    curves = capsrun.scalars("outputs/multirun/2026-12-07/10-00-00", "test/accuracy")

:func:`load` goes through the same checks as ``capsrun eval``: the checkpoint's digest, its
stored config against the registered model classes, the weights loaded strictly; nothing named in
the file is imported or run. :func:`runs` and :func:`scalars` share the ``run`` column (the run
dir relative to the directory given), so their tables merge on it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:  # torch loads with load(): capsrun report reads runs without it
    import torch
    from omegaconf import DictConfig

from capsrun import rundir
from capsrun.errors import ConfigError


@dataclass
class Run:
    """A trained run, loaded: ``model`` (eval mode, on ``device``), ``config`` (the resolved run
    config the checkpoint carries), ``metrics`` (the run dir's ``metrics.json``: the final epoch's
    figures; else the checkpoint's own), ``epoch`` and ``checkpoint`` (the file read)."""

    model: torch.nn.Module
    config: DictConfig
    metrics: dict[str, Any]
    epoch: int
    checkpoint: Path
    device: torch.device | None = None

    def __repr__(self) -> str:
        shown = {k: v for k, v in self.metrics.items() if k in ("test/accuracy", "test/log_likelihood/ais")}
        return (
            f"Run({self.config.model.name} on {self.config.dataset.name}, epoch {self.epoch}, "
            f"{shown or 'no test metric'}, {self.checkpoint})"
        )


def _checkpoint_file(path: Path) -> Path:
    if path.is_file():
        return path
    if not path.is_dir():
        raise ConfigError(f"{path}: no such file or directory; give a run dir or its checkpoints/best.pt")
    for name in ("best.pt", "last.pt"):
        if (path / "checkpoints" / name).is_file():
            return path / "checkpoints" / name
    raise ConfigError(f"{path} holds no checkpoints/best.pt or last.pt; give the run dir of a capsrun train")


def load(path: str | Path, device: str | torch.device | None = None) -> Run:
    """A run dir (its ``checkpoints/best.pt``, else ``last.pt``) or a checkpoint file -> a
    :class:`Run`. ``device``: ``"cpu"``, ``"cuda"``, ...; default the GPU when there is one.
    Raises :class:`capsrun.errors.CapsrunError` (one line naming the problem) for a missing,
    damaged or foreign file."""
    import torch

    from capsrun import registry

    file = _checkpoint_file(Path(path).expanduser())
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, config, ckpt = registry.from_checkpoint(file, dev)
    run_dir = file.parent.parent if file.parent.name == "checkpoints" else file.parent
    metrics = ckpt.get("metrics") if isinstance(ckpt.get("metrics"), dict) else {}
    stored = run_dir / "metrics.json"
    if stored.is_file():
        try:
            metrics = json.loads(stored.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            pass  # a half-written file: the checkpoint's own figures
    return Run(model.eval(), config, dict(metrics), int(ckpt["epoch"]), file, dev)


def _finished(run_dir: Path, metrics_path: Path) -> tuple[dict | None, str]:
    """A finished run's ``(metrics, "")``, or ``(None, why it is skipped)``: a half-written or
    foreign ``metrics.json``, unreadable overrides, or a run still short of its epochs."""
    try:
        metrics = json.loads(metrics_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"its metrics.json is not readable JSON ({type(e).__name__})"
    if not isinstance(metrics, dict) or not isinstance(metrics.get("epoch"), int):
        return None, "its metrics.json is not one capsrun train writes (no epoch count)"
    # the figures: numbers (or null, a non-finite one) under string tags; anything else is foreign
    metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    config_path = run_dir / ".hydra" / "config.yaml"
    try:
        config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else None
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None, "its .hydra/config.yaml is not readable"
    trainer = config.get("trainer") if isinstance(config, dict) else None
    epochs = trainer.get("epochs") if isinstance(trainer, dict) else None
    if isinstance(epochs, int) and metrics["epoch"] < epochs:
        return None, f"unfinished (epoch {metrics['epoch']} of {epochs})"
    return metrics, ""


def load_runs(root: Path, skipped: list[tuple[Path, str]] | None = None) -> list[dict]:
    """``[{"params": {key: value}, "metrics": {...}, "dir": Path}]`` of every finished run below
    ``root``; the others are appended to ``skipped`` as ``(run dir, why)``."""
    runs = []
    for metrics_path in sorted(root.rglob("metrics.json")):
        run_dir = metrics_path.parent
        overrides_path = run_dir / ".hydra" / "overrides.yaml"
        if not overrides_path.is_file():
            continue
        metrics, why = _finished(run_dir, metrics_path)
        try:
            overrides = yaml.safe_load(overrides_path.read_text()) or []
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            metrics, why = None, "its .hydra/overrides.yaml is not readable"
        if metrics is not None and not (isinstance(overrides, list) and all(isinstance(o, str) for o in overrides)):
            metrics, why = None, "its .hydra/overrides.yaml is not a list of overrides"
        if metrics is None:
            if skipped is not None:
                skipped.append((run_dir, why))
            continue
        params = {key: rundir.yaml_value(text) for key, text in rundir.run_overrides(overrides)}
        runs.append({"params": params, "metrics": metrics, "dir": run_dir})
    return runs


def runs(directory: str | Path):
    """Every finished run below ``directory`` (a sweep, or any folder of runs) -> a
    ``pandas.DataFrame``, one row per run: ``run`` (its dir relative to ``directory``), a column per
    command-line override (``routing.iterations``, ``seed``; values as YAML reads them) and one per
    final metric of ``metrics.json`` (``test/accuracy``, ``best/test/accuracy``, ...). Runs still
    short of their epochs, or with unreadable files, are left out (``capsrun report`` names them)."""
    import pandas as pd

    root = Path(directory).expanduser()
    if not root.is_dir():
        raise ConfigError(f"{root}: no such directory; give a sweep dir such as outputs/multirun/<date>/<time>")
    rows = []
    for r in load_runs(root):
        rows.append({"run": run_name(r["dir"], root), **r["params"], **r["metrics"]})
    return pd.DataFrame(rows)


def run_name(run_dir: Path, root: Path) -> str:
    """A run's name as TensorBoard shows it under ``--logdir root``: its dir relative to ``root``."""
    return run_dir.relative_to(root).as_posix() if run_dir != root else "."


def scalars(directory: str | Path, tags: str | list[str] | None = None):
    """The TensorBoard scalars of every run below ``directory`` -> a long ``pandas.DataFrame``
    with columns ``run``, ``tag``, ``step``, ``value``, ``wall_time``, one row per logged point,
    read with TensorBoard's own event reader (every point: no reservoir sampling). ``tags``: a tag
    (``"test/accuracy"``), a list of them, or None for all. A run resumed after a kill has each
    step once (what TensorBoard shows)."""
    import pandas as pd
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root = Path(directory).expanduser()
    if not root.is_dir():
        raise ConfigError(f"{root}: no such directory; give a run dir or a sweep dir")
    wanted = [tags] if isinstance(tags, str) else None if tags is None else list(tags)
    rows = []
    for run_dir in sorted({p.parent for p in root.rglob("events.out.tfevents.*")}):
        events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
        events.Reload()
        available = events.Tags().get("scalars", [])
        for tag in available if wanted is None else [t for t in wanted if t in available]:
            for point in events.Scalars(tag):
                rows.append((run_name(run_dir, root), tag, point.step, point.value, point.wall_time))
    frame = pd.DataFrame(rows, columns=["run", "tag", "step", "value", "wall_time"])
    return frame.sort_values(["run", "tag", "step"], kind="stable").reset_index(drop=True)
