"""The documents stay true to the code: the README's Config table lists every option of every
group in conf/ (and nothing else), every config key the README and the docs name exists in a
composed config, and the Results tables are what results/*.csv renders."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from capsrun import results
from capsrun.cli import conf_dir
from capsrun.settings import RENAMED
from helpers import compose_config

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PLUGIN_OPTIONS = {"submitit_slurm", "submitit_local"}  # the Hydra launcher plugin's own, named beside ours


def _groups() -> dict[str, set[str]]:
    """Every config group under conf/ (nested ones as ``hydra/launcher``) and its options."""
    root = conf_dir()
    groups = {}
    for folder in sorted(p for p in root.rglob("*") if p.is_dir()):
        options = {p.stem for p in folder.glob("*.yaml")}
        if options:
            groups[folder.relative_to(root).as_posix()] = options
    return groups


def _config_table() -> dict[str, set[str]]:
    """The README's Config table: group -> the options its row names."""
    text = README.read_text().split("### Config", 1)[1]
    rows = re.findall(r"^\| `([\w/]+)/` \| ([^|]+) \|", text, re.M)
    return {group: set(re.findall(r"`(\w+)`", options)) for group, options in rows}


def test_the_config_table_lists_every_option_of_every_group():
    table, groups = _config_table(), _groups()
    assert set(table) == set(groups), set(table) ^ set(groups)
    for group, options in groups.items():
        assert options <= table[group], (group, options - table[group])
        assert table[group] - options <= PLUGIN_OPTIONS, (group, table[group] - options)


def _composed() -> list:
    """The configs the documents' keys may belong to: train with every model, dataset, schedule
    and diagnostics level; sample; eval."""
    groups = _groups()
    choices = [f"{g}={o}" for g in ("model", "dataset", "scheduler", "diagnostics") for o in sorted(groups[g])]
    configs = [compose_config("train", choice) for choice in choices]
    configs += [compose_config("sample", "checkpoint=x"), compose_config("eval")]
    return [OmegaConf.to_container(c) for c in configs]


ROOTS = "|".join(
    ("trainer", "data", "model", "sampler", "sample_quality", "ais", "routing", "dataset", "diagnostics", "scheduler")
)
# keys of earlier releases, named where the documents say they are refused (capsrun.settings.RENAMED)
OLD = {key for renamed in RENAMED.values() for key in renamed} | {"model.samples"}


def _has(config: dict, key: str) -> bool:
    node = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


@pytest.mark.parametrize("document", ["README.md", "docs/capsrbm.md", "docs/performance.md"])
def test_every_config_key_a_document_names_exists(document):
    """A key in backticks (``sample_quality.every_epochs``, or as an override ``key=value``) is
    one of a composed config's: a renamed or misspelt key in the prose fails here."""
    text = (ROOT / document).read_text()
    named = {m.rstrip(".") for m in re.findall(rf"`((?:{ROOTS})\.[\w.]+)(?:=[^`]*)?`", text)}
    named |= set(re.findall(rf"(?<![\w.])((?:{ROOTS})\.[\w.]+)=", text))
    configs = _composed()
    old = OLD if document == "README.md" else set()  # the README names them where it says they are refused
    missing = sorted(k for k in named - old if "<" not in k and not any(_has(c, k) for c in configs))
    assert not missing, missing


@pytest.mark.parametrize("document", ["README.md", "docs/performance.md"])
def test_the_results_tables_are_the_results_data(document):
    text = (ROOT / document).read_text()
    assert "<!-- results:" in text
    assert results.render(text, ROOT / "results") == text, f"stale: run python -m capsrun.results {document}"


def test_a_new_row_changes_the_table(tmp_path):
    """The tables are rendered from the rows, not kept beside them."""
    for csv in (ROOT / "results").glob("*.csv"):
        (tmp_path / csv.name).write_text(csv.read_text())
    rows = (tmp_path / "capsnet.csv").read_text().splitlines()
    moved = rows[3].replace(",99.50,", ",99.71,")
    (tmp_path / "capsnet.csv").write_text("\n".join([*rows[:3], moved, *rows[4:]]) + "\n")
    text = README.read_text()
    assert "99.71 %" in results.render(text, tmp_path) and "99.71 %" not in text


def test_make_help_lists_every_target_with_its_comment():
    import subprocess

    documented = re.findall(r"^([a-z-]+):.*?## (.+)$", (ROOT / "Makefile").read_text(), flags=re.M)
    shown = subprocess.run(["make", "-s", "-C", str(ROOT), "help"], capture_output=True, text=True, check=True).stdout
    lines = [line.split(None, 2) for line in shown.splitlines()]
    assert [(name, text) for _, name, text in lines] == documented
    assert {"train", "test", "help"} <= {name for name, _ in documented}
