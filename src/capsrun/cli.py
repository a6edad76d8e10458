"""``capsrun <command> [hydra overrides]``: dispatch to a Hydra app per command.

Every mistake a user can fix ends as one line on stderr and exit code 2; set
``HYDRA_FULL_ERROR=1`` for the traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

USAGE = """\
usage: capsrun <command> [overrides...] [hydra flags]    (capsrun --version)

commands:
  train    build, train, evaluate and log one run; -m sweeps (one run dir per job)
  eval     recompute the test metrics of a checkpoint: capsrun eval checkpoint=PATH
  sample   sample grids (PNG + TensorBoard) from a checkpoint (VCaps, CapsNet, capsule RBM chains)
  analyze  capsule health of a checkpoint, a run dir or a multirun dir: capsrun analyze checkpoint=PATH
  report   a sweep's metrics by swept value and its learning curves: capsrun report DIR [--help]
  bench    train/eval images/s and peak memory per model, precision and compile setting

examples:
  capsrun train model=capsnet routing.iterations=1 trainer.epochs=5
  capsrun train -m routing.iterations=1,2,3 seed=0,1
  capsrun train experiment=sabour_mnist
  capsrun eval checkpoint=outputs/2026-11-23/10-00-00/checkpoints/best.pt
  capsrun train model=vcaps dataset=fashion_mnist
  capsrun sample checkpoint=outputs/.../checkpoints/best.pt samples_per_class=16
  capsrun train -m model=deep_capsnet model.depth=1,2,4 diagnostics=full
  capsrun analyze checkpoint=outputs/multirun/2026-11-23/10-00-00
  capsrun train -m hparams_search=capsnet_optuna               Optuna (pip install 'capsrun[sweep]')
  capsrun train -m hydra/launcher=capsrun_slurm seed=0,1,2     SLURM (pip install 'capsrun[slurm]')
  torchrun --nproc_per_node=2 -m capsrun train                 data-parallel (torch.distributed)
  capsrun report outputs/multirun/2026-11-23/10-00-00
  capsrun train trainer.precision=bf16 trainer.compile=true   the fast path (docs/performance.md)
  capsrun bench models=[capsnet] batch_sizes=[128]
  capsrun train --help       config groups and the composed config (Hydra's help)
  capsrun train --cfg job    print the composed config and exit

runs go to outputs/<date>/<time>/ (sweeps: outputs/multirun/...); see them with
  tensorboard --logdir outputs
"""

# config groups a command's overrides select from (conf/<group>/<option>.yaml); the others take
# only `dataset=` (eval: evaluate on another dataset of the same shape)
GROUPS = {
    "train": ("dataset", "model", "trainer", "optimizer", "scheduler", "diagnostics", "sampler", "sample_quality",
              "ais", "experiment", "hparams_search", "debug"),
    "sample": ("sampler", "sample_quality"),
    "eval": ("dataset", "ais"),
}  # fmt: skip
COMMANDS = ("train", "eval", "sample", "analyze", "report", "bench")
# option prefix -> (Hydra plugin module, the extra that installs it)
PLUGINS = {
    "hparams_search=": ("hydra_plugins.hydra_optuna_sweeper", "sweep"),
    "hydra/sweeper=optuna": ("hydra_plugins.hydra_optuna_sweeper", "sweep"),
    "hydra/launcher=submitit": ("hydra_plugins.hydra_submitit_launcher", "slurm"),
    "hydra/launcher=capsrun_slurm": ("hydra_plugins.hydra_submitit_launcher", "slurm"),
}
EXIT_USAGE = 2


def conf_dir() -> Path:
    """``conf/`` of the checkout (editable install) or the copy packed into the wheel."""
    packed = Path(__file__).parent / "conf"
    return packed if packed.is_dir() else Path(__file__).resolve().parents[2] / "conf"


# command -> (its module in capsrun.commands, the Hydra task function there)
TASKS = {
    "train": ("train", "train"),
    "eval": ("eval", "evaluate_checkpoint"),
    "sample": ("sample", "sample"),
    "analyze": ("analyze", "analyze"),
    "bench": ("bench", "bench"),
}


def _task(command: str) -> Callable:
    import importlib

    module, function = TASKS[command]
    return getattr(importlib.import_module(f"capsrun.commands.{module}"), function)


def fail(message: str) -> None:
    print(f"capsrun: error: {message}", file=sys.stderr)
    sys.exit(EXIT_USAGE)


def _check_overrides(command: str, args: list[str]):
    """Catch unknown group options and bad override syntax before Hydra does, in one line;
    for a single run, also compose the config once so a typo in a key is reported the same way.
    Returns that config (with its ``hydra`` node), or None for sweeps and Hydra's own flags."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    kv = [a for a in args if not a.startswith("-") and "=" in a]
    try:
        overrides = OverridesParser.create().parse_overrides(kv)
    except HydraException as e:
        fail(f"cannot parse the overrides: {str(e).splitlines()[0]}")
    root = conf_dir()
    _check_renamed(command, overrides)
    for o in overrides:
        group = o.key_or_group
        if group not in GROUPS.get(command, ()) or o.is_delete():
            continue
        options = sorted(p.stem for p in (root / group).glob("*.yaml"))
        values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
        for value in values:
            if value not in options and not (group in ("experiment", "debug") and value == "null"):
                hint = _did_you_mean(value, options, f"{group}=")
                fail(f"unknown {group} {value!r}{hint}; choose one of: {', '.join(options)}")
    if any(a in ("-m", "--multirun") for a in args) or any(a.startswith("-") for a in args):
        return None  # sweeps are checked per job; flags like --help/--cfg are Hydra's to handle
    try:
        with initialize_config_dir(config_dir=str(root), version_base="1.3", job_name=command):
            composed = compose(config_name=command, overrides=kv, return_hydra_config=True)
        _check_resolves(composed)
        return composed
    except (HydraException, OmegaConfBaseException) as e:
        text = f"{e}\n{e.__cause__ or ''}"
        first = text.strip().splitlines()[0].rstrip(".")
        if first.startswith("Could not override") and "not in struct" in text:
            key = first.split("'")[1]
            try:  # the keys there are, for a suggestion: the config without this override
                with initialize_config_dir(config_dir=str(root), version_base="1.3", job_name=command):
                    rest = [a for a in kv if a.partition("=")[0].lstrip("+~") != key]
                    known = _keys(compose(config_name=command, overrides=rest))
            except (HydraException, OmegaConfBaseException):
                known = []
            fail(
                f"{first}: there is no key {key!r}{_did_you_mean(key, known)}; check its spelling against "
                f"`capsrun {command} --cfg job`, or add a new key with +{key}=..."
            )
        fail("; ".join(line.strip() for line in text.splitlines()[:3] if line.strip()))


def _check_renamed(command: str, overrides) -> None:
    """A key of an earlier release (:data:`capsrun.settings.RENAMED`): one line naming the key it
    is now, with the value given."""
    from capsrun.settings import RENAMED

    renamed = RENAMED.get(command, {})
    for o in overrides:
        key = o.key_or_group
        if key in renamed:
            value = o.get_value_element_as_str() if not o.is_sweep_override() else "..."
            fail(f"{key} is now {renamed[key]}; e.g. {renamed[key]}={value}")
        if key == "model.samples":
            fail(f"{key} is now the sampler group: sampler.chains, sampler.steps, sampler.tempering, ...")


def _did_you_mean(word: str, choices, prefix: str = "") -> str:
    """`` (did you mean X?)`` for the closest of ``choices`` to a mistyped ``word``, or ``""``."""
    import difflib

    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def _keys(cfg, prefix: str = "") -> list[str]:
    """Every dotted key of ``cfg`` (``routing.iterations``, ...)."""
    from omegaconf import DictConfig

    keys = []
    for key in cfg.keys():
        path = f"{prefix}{key}"
        keys.append(path)
        node = cfg._get_node(key)
        if isinstance(node, DictConfig):
            keys += _keys(node, path + ".")
    return keys


def _check_resolves(cfg) -> None:
    """Every interpolation of the run's settings (``${oc.env:VAR}``, ``${seed}``) resolves; a
    missing environment variable or a loop is one line naming the key, before anything runs."""
    from omegaconf import OmegaConf
    from omegaconf.errors import InterpolationResolutionError, InterpolationToMissingValueError, MissingMandatoryValue

    try:
        OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)
    except (MissingMandatoryValue, InterpolationToMissingValueError):
        return  # ??? values (the dataset's shape) are filled in later
    except InterpolationResolutionError as e:
        key = getattr(e, "full_key", "") or "a setting"
        first = str(e).strip().splitlines()[0].rstrip(".")
        fail(f"{key} cannot be resolved ({first}); give it a value, e.g. {key}=..., or set what it refers to")


def _claim_run_dir(cfg, args: list[str]) -> None:
    """Before Hydra writes its own files (``.hydra/``, ``train.log``) into the run dir: check that
    it can be written, and, when the user named it (``hydra.run.dir=``), hold its lock
    (:func:`capsrun.rundir.lock`) so that a second run there is refused before it touches anything."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from capsrun import rundir
    from capsrun.errors import CapsrunError

    try:
        named = str(OmegaConf.select(cfg, "hydra.run.dir"))
    except OmegaConfBaseException:
        return
    if not named.strip():
        fail("hydra.run.dir is empty: the run would write into the current directory; name a directory")
    path = Path(named).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK) or not existing.is_dir():
        why = "permission denied" if existing.is_dir() else "not a directory"
        fail(f"cannot create the run dir {path} ({why} at {existing}); choose another hydra.run.dir")
    if any(a.lstrip("+").startswith("hydra.run.dir=") for a in args):  # also +hydra.run.dir=, ++hydra.run.dir=
        from capsrun.resume import check_resume, resume_path

        try:
            rundir.lock(path)
            # a refused resume must not leave this run's config in the other run's .hydra/
            check_resume(cfg, path, resume_path(cfg.trainer.resume, path))
        except CapsrunError as e:
            fail(str(e))


def _claim_sweep_dir(args: list[str]) -> None:
    """A sweep into a ``hydra.sweep.dir`` that holds another sweep is refused before Hydra
    rewrites its jobs' ``.hydra/`` (:func:`capsrun.rundir.check_sweep`)."""
    from capsrun import rundir
    from capsrun.errors import ConfigError

    named = [a.split("=", 1)[1] for a in args if a.lstrip("+").startswith("hydra.sweep.dir=")]
    try:
        if named:
            rundir.check_sweep(Path(named[-1]).absolute(), [a for a in args if "=" in a and not a.startswith("-")])
    except ConfigError as e:
        fail(str(e))


def _check_plugins(args: list[str]) -> None:
    """An optional Hydra plugin that is not installed: say which extra installs it."""
    import importlib.util

    for arg in args:
        for prefix, (module, extra) in PLUGINS.items():
            if arg.startswith(prefix) and importlib.util.find_spec(module) is None:
                fail(f"{arg} needs the Hydra plugin {module.split('.')[-1]}; pip install 'capsrun[{extra}]'")


def _distributed_overrides(command: str, args: list[str]) -> list[str]:
    """Under torchrun, rank 0 owns the run dir; the other ranks get a scratch dir for Hydra's own
    files (they write nothing else) and no sweeps."""
    import tempfile

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return args
    if command != "train" or any(a in ("-m", "--multirun") for a in args):
        fail("torchrun runs one capsrun train; sweep with -m outside torchrun (e.g. a launcher per run)")
    rank = os.environ.get("RANK", "0")
    if rank == "0":
        return args
    scratch = Path(tempfile.gettempdir()) / f"capsrun-rank{rank}-{os.getpid()}"
    kept = [a for a in args if not a.startswith(("hydra.run.dir=", "hydra.output_subdir="))]
    return [*kept, f"hydra.run.dir={scratch}", "hydra.output_subdir=null", "hydra/job_logging=stdout"]


def _optimized(cfg, result):
    """What a sweeper (Optuna) optimises: the final metric ``optimized_metric`` names, or None."""
    from capsrun.errors import ConfigError

    key = cfg.get("optimized_metric")
    if not key or not isinstance(result, dict):
        return None
    if key not in result:
        raise ConfigError(f"optimized_metric={key} is not a final metric; choose one of {', '.join(sorted(result))}")
    return float(result[key])


BASH_COMPLETION = """\
# capsrun's tab completion for bash (zsh: autoload -U bashcompinit && bashcompinit first).
# Install for this shell: eval "$(capsrun -sc install=bash)"
_capsrun_completion()
{
    local words=($COMP_LINE)
    local word=${words[$COMP_CWORD]}
    local choices
    choices=$(COMP_POINT=$COMP_POINT COMP_LINE=$COMP_LINE capsrun -sc query=bash 2>/dev/null)
    COMPREPLY=($(compgen -o nospace -o default -W "$choices" -- "$word"))
}
COMP_WORDBREAKS=${COMP_WORDBREAKS//=}
complete -o nospace -o default -F _capsrun_completion capsrun
"""


def _completion(argv: list[str]) -> None:
    """``capsrun [command] -sc install=bash|uninstall=bash|query=bash``. One script completes
    every command (Hydra's own registers ``capsrun train`` as two names and then queries
    ``capsrun -sc``); a query completes the command name, then hands the rest of the line to
    that command's Hydra app, which completes groups, options and keys from ``conf/``."""
    i = next(i for i, a in enumerate(argv) if a in ("-sc", "--shell-completion", "--shell_completion"))
    action, _, shell = (argv[i + 1] if i + 1 < len(argv) else "").partition("=")
    if shell != "bash" or action not in ("install", "uninstall", "query"):
        fail(
            "shell completion: use capsrun -sc install=bash (zsh: run bashcompinit first), uninstall=bash or query=bash"
        )
    if action == "install":
        print(BASH_COMPLETION, end="")
        sys.exit(0)
    if action == "uninstall":
        print("complete -r capsrun 2>/dev/null; unset -f _capsrun_completion")
        sys.exit(0)
    words = os.environ.get("COMP_LINE", "").split()[1:]  # the words after `capsrun`
    line = os.environ.get("COMP_LINE", "")
    if not words or (len(words) == 1 and not line.endswith(" ")):
        print(" ".join(COMMANDS))
        sys.exit(0)
    command = words[0]
    if command not in COMMANDS or command == "report":  # report takes a folder: the shell completes it
        sys.exit(0)
    import hydra

    os.environ["COMP_LINE"] = "capsrun " + line.split(command, 1)[1].lstrip()  # Hydra strips one app name
    sys.argv = ["capsrun", "-sc", "query=bash"]
    hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name=command)(lambda cfg: None)()
    sys.exit(0)


def _to_log_files(message: str, exc_info=None) -> None:
    """``message`` into the run's log file (``train.log``) only: the console gets it once, from
    :func:`fail` or from Hydra."""
    import logging

    record = logging.LogRecord("capsrun", logging.ERROR, __file__, 0, message, None, exc_info)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
            handler.flush()


def main(argv: list[str] | None = None) -> None:
    """``capsrun``: Ctrl-C at any moment (start-up, ``eval``, a second one during training) ends
    in one line and exit 130; the files written so far are whole (atomic writes)."""
    import signal

    from capsrun.errors import abort

    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # a background job keeps ignoring it
        signal.signal(signal.SIGINT, lambda signum, frame: abort(signum))
    try:
        _main(argv)
    except KeyboardInterrupt:
        abort(signal.SIGINT)


def _ensemble(arg: str) -> str:
    """``checkpoint=a.pt,b.pt`` of ``capsrun eval`` is an ensemble, not a sweep: a list for Hydra."""
    if arg.startswith("checkpoint=") and "," in arg and not arg.startswith("checkpoint=["):
        return f"checkpoint=[{arg.split('=', 1)[1]}]"
    return arg


def _main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["--version"], ["-V"]):
        from capsrun import __version__

        print(f"capsrun {__version__}")
        sys.exit(0)
    if any(a in ("-sc", "--shell-completion", "--shell_completion") for a in argv):
        _completion(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        sys.exit(0 if argv else EXIT_USAGE)
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        hint = _did_you_mean(command, COMMANDS)
        fail(f"unknown command {command!r}{hint}; commands: {', '.join(COMMANDS)} (capsrun --help)")
    if command == "report":
        from capsrun.commands import report

        sys.exit(report.main(rest))
    _check_plugins(rest)
    from capsrun import rundir  # registers ${capsrun.job_dir:...}, which names sweep job dirs

    rest = rundir.quote_paths(rest)  # paths into sweep job dirs hold "="
    if command == "eval" and not any(a in ("-m", "--multirun") for a in rest):
        rest = [_ensemble(a) for a in rest]
    composed = _check_overrides(command, rest)
    if command == "train" and composed is not None and int(os.environ.get("RANK", "0")) == 0:
        _claim_run_dir(composed, rest)
    if any(a in ("-m", "--multirun") for a in rest):
        if command == "train":
            _claim_sweep_dir(rest)
        rest = rundir.sweep_overrides(rest)
    rest = _distributed_overrides(command, rest)

    import hydra
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    from capsrun.errors import CapsrunError
    from capsrun.speed import keep_freed_memory

    keep_freed_memory()  # a process setting: fewer page faults a step (capsrun.speed)
    task = _task(command)

    def refuse(message: str, exc_info=None) -> None:
        """One line and exit 2 (the traceback with HYDRA_FULL_ERROR=1); the run's log keeps it, and
        a Hydra-named run dir holding only Hydra's records goes (:func:`capsrun.rundir.discard_refused`)."""
        _to_log_files(f"capsrun: error: {message}", exc_info=exc_info)
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise  # the exception being handled
        if not any(a.lstrip("+").startswith(("hydra.run.dir=", "hydra.sweep.dir=")) for a in rest):
            rundir.discard_refused(Path.cwd())
        fail(message)

    def run(cfg):
        try:
            from capsrun.settings import seed

            seed(cfg)
            result = task(cfg)
            return _optimized(cfg, result)
        except CapsrunError as e:
            refuse(str(e))
        except (ConfigAttributeError, ConfigKeyError) as e:  # a node the command reads was removed (~model.net)
            refuse(
                f"the config has no {e.full_key or 'such key'} ({str(e).splitlines()[0]}); an override removed it or "
                f"a config file lacks it: check `capsrun {command} --cfg job`",
                exc_info=sys.exc_info(),
            )
        except Exception:  # a bug: Hydra prints the traceback; the run's log keeps it too
            _to_log_files("capsrun: unexpected error", exc_info=sys.exc_info())
            raise

    sys.argv = [f"capsrun {command}", *rest]
    try:
        hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name=command)(run)()
    except BrokenPipeError:  # `capsrun train --cfg job | head`: the reader left, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)


if __name__ == "__main__":
    main()
