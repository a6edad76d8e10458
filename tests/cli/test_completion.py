"""Tab completion, queried as Hydra's own tests do (``COMP_LINE`` and ``-sc query=bash`` on the
installed entry point) and through the real bash script that ``-sc install=bash`` prints."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent  # where the capsrun entry point is installed


def _query(line: str) -> list[str]:
    env = {**os.environ, "COMP_LINE": line, "COMP_POINT": str(len(line)), "PATH": f"{BIN}:{os.environ['PATH']}"}
    done = subprocess.run(["capsrun", "-sc", "query=bash"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def _bash(line: str, tmp_path: Path) -> list[str]:
    """What bash offers at the end of ``line`` with the installed script."""
    script = f"""
eval "$(capsrun -sc install=bash)"
COMP_LINE='{line}'
COMP_POINT=${{#COMP_LINE}}
words=($COMP_LINE)
COMP_CWORD=$(( ${{#words[@]}} - 1 ))
[[ "$COMP_LINE" == *" " ]] && COMP_CWORD=${{#words[@]}}
_capsrun_completion
printf '%s\\n' "${{COMPREPLY[@]}}"
complete -p capsrun
"""
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    *replies, registered = done.stdout.splitlines()
    assert registered == "complete -o default -o nospace -F _capsrun_completion capsrun"  # one name, not two
    return [r for r in replies if r]


@pytest.mark.parametrize(
    "line, expected",
    [
        ("capsrun ", ["train", "eval", "sample", "analyze", "report", "bench"]),
        ("capsrun train model=caps", ["model=capsnet", "model=capsrbm"]),
        ("capsrun train routing.it", ["routing.iterations="]),
        (
            "capsrun train -m dataset=",
            ["dataset=affnist", "dataset=cifar10", "dataset=fashion_mnist", "dataset=mnist", "dataset=multimnist"],
        ),
        ("capsrun sample samp", ["sample_quality.", "sample_quality=", "sampler.", "sampler=", "samples_per_class="]),
        ("capsrun bench mod", ["model=", "models."]),
    ],
)
def test_query_completes_commands_groups_options_and_keys(line, expected):
    offered = _query(line)
    assert [o for o in offered if o.startswith(line.split()[-1]) or line.endswith(" ")] == expected


def test_the_installed_bash_script_completes_through_every_command(tmp_path):
    assert _bash("capsrun tr", tmp_path) == ["train"]
    assert _bash("capsrun train experiment=sabour_m", tmp_path) == [
        "experiment=sabour_mnist",
        "experiment=sabour_multimnist",
    ]
    assert _bash("capsrun eval checkp", tmp_path) == ["checkpoint="]
    (tmp_path / "outputs").mkdir()
    assert _bash("capsrun report out", tmp_path) == ["outputs"]  # a folder: the shell's own completion


def test_an_unknown_shell_is_one_line_and_exit_2():
    done = subprocess.run(
        [str(BIN / "capsrun"), "train", "-sc", "install=tcsh"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "install=bash" in done.stderr
