"""Where training stands, what a checkpoint keeps of it, and the rules of a resume.

``last.pt`` (:func:`snapshot`) holds everything a resume needs to continue exactly: weights,
optimizer and scheduler state, the meters' partial sums, the RNG states, the :class:`TrainState`
and the resolved config; ``best.pt`` (:func:`weights`) the weights, the config and the metrics
only. A resume continues the same run (:func:`check_resume`): the settings that decide its result
must match the checkpoint's.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from capsrun import checkpoint, rundir
from capsrun.averaging import WeightAverage
from capsrun.errors import CheckpointError, ConfigError
from capsrun.metrics import Meter
from capsrun.run import Run

log = logging.getLogger("capsrun")


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint."""

    epoch: int = 0  # completed epochs
    batch: int = 0  # batches done in the current epoch (non-zero only after an interrupt)
    step: int = 0  # optimizer steps so far
    best_score: float = -1.0  # the best selection score so far (higher is better: an accuracy, or minus a loss)
    last_metrics: dict[str, float] = field(default_factory=dict)
    extras: list[int] = field(default_factory=list)  # the epoch hooks still to run after epoch `epoch`
    best_extras: bool = False  # best.pt is due again once they have run (the epoch was the best)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def restore(
    path: Path, model, objective, optimizers, scheduler, meters: list[Meter], device, average: WeightAverage | None
) -> TrainState:
    """Load a checkpoint into the objects and return the state to continue from."""
    ckpt = checkpoint.load(path, map_location=device)
    if "optimizer" not in ckpt:
        raise CheckpointError(
            f"{path} holds the weights only (a best.pt, for eval and sample); resume from the run's checkpoints/last.pt"
        )
    try:
        model.load_state_dict(ckpt["model"])
        objective.load_state_dict(ckpt.get("objective", {}))
        optimizers[0].load_state_dict(ckpt["optimizer"])
        extra = ckpt.get("objective_optimizers", [])
        if len(extra) != len(optimizers) - 1:
            raise ValueError(f"the checkpoint has {len(extra)} objective optimizers, the config {len(optimizers) - 1}")
        for optimizer, saved in zip(optimizers[1:], extra):
            optimizer.load_state_dict(saved)
        scheduler.load_state_dict(ckpt["scheduler"])
        if average is not None and "average" in ckpt:
            average.load_state_dict(ckpt["average"])
    except (RuntimeError, KeyError, ValueError) as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(
            f"{path} does not fit the configured model ({first[:200]}); resume with the config it was "
            "trained with, or start over with trainer.resume=never"
        ) from None
    for meter, s in zip(meters, ckpt["meters"]):
        meter.load_state_dict(s, device)
    _set_rng_state(ckpt["rng"])
    saved = dict(ckpt["state"])
    if "best_accuracy" in saved:  # what checkpoints written before the rename call the best score
        saved["best_score"] = saved.pop("best_accuracy")
    return TrainState(**saved)


def snapshot(run: Run, state: TrainState, meters: Sequence[Meter]) -> dict[str, Any]:
    """last.pt: everything a resume needs to continue exactly (weights, optimizer and scheduler
    state, the meters' partial sums, the RNG states, where training stands, the config)."""
    return {
        "model": run.model.state_dict(),
        "objective": run.objective.state_dict(),
        "optimizer": run.optimizers[0].state_dict(),
        "objective_optimizers": [o.state_dict() for o in run.optimizers[1:]],
        "scheduler": run.scheduler.state_dict(),
        "meters": [m.state_dict() for m in meters],
        "rng": _rng_state(),
        "state": asdict(state),
        "epoch": state.epoch,
        "config": run.config,
        **({"average": run.average.state_dict()} if run.average is not None else {}),
    }


def weights(run: Run, state: TrainState) -> dict[str, Any]:
    """best.pt: what eval, sample and analyze read (no optimizer state, a third of last.pt's size);
    written while the weight average, once begun, is in the model."""
    return {
        "model": run.model.state_dict(),
        "averaged_steps": 0 if run.average is None else run.average.steps,
        "objective": run.objective.state_dict(),
        "epoch": state.epoch,
        "config": run.config,
        "metrics": dict(state.last_metrics),
    }


def resume_path(spec: Any, run_dir: Path) -> Path | None:
    """The checkpoint ``trainer.resume`` names: ``auto`` this run dir's ``last.pt`` if there is
    one, ``never`` (or null) none, else the path given, which must exist."""
    if spec in (None, "never", False):
        return None
    if spec == "auto":
        last = run_dir / "checkpoints" / "last.pt"
        return last if last.is_file() else None
    path = Path(str(spec)).expanduser()
    if not path.is_file():
        raise ConfigError(f"trainer.resume={spec}: no such checkpoint; use auto, never or a path to a .pt file")
    return path


def check_resume(cfg: DictConfig, run_dir: Path, resume_from: Path | None) -> None:
    """A resume continues the same run: the settings that decide its result (:data:`rundir.FIXED`)
    must match the checkpoint's; a longer or shorter ``trainer.epochs`` is applied with a warning.
    ``trainer.resume=never`` does not overwrite a run dir that already holds a run."""
    last = run_dir / "checkpoints" / "last.pt"
    if resume_from is None:
        if last.is_file():
            raise ConfigError(
                f"{run_dir} already holds a run (checkpoints/last.pt) and trainer.resume={cfg.trainer.resume}: "
                "continue it with trainer.resume=auto, or start over in another hydra.run.dir (nothing was overwritten)"
            )
        return
    saved = checkpoint.load(resume_from)
    current = OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)
    conflicts = rundir.resume_conflicts(saved["config"], current)
    if conflicts:
        key, old, new = conflicts[0]
        more = f" (and {len(conflicts) - 1} more settings)" if len(conflicts) > 1 else ""
        raise ConfigError(
            f"{resume_from} was trained with {key}={old}, this run has {key}={new}{more}; resume with the "
            "checkpoint's settings, or start a new run in another hydra.run.dir"
        )
    trained = rundir.select(saved["config"], "trainer.epochs")
    if trained != cfg.trainer.epochs:
        log.warning(
            "resuming a run configured for %s epochs (at epoch %d) as one of %d epochs",
            trained,
            saved["epoch"],
            cfg.trainer.epochs,
        )
