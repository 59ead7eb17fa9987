"""The console scripts of pyproject.toml resolve, and the operator tools answer ``--help`` as scripts would."""

import subprocess
import sys
import tomllib
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

SCRIPTS = tomllib.loads((Path(__file__).resolve().parents[4] / "pyproject.toml").read_text())["project"]["scripts"]


def entry_point(name: str) -> EntryPoint:
    return EntryPoint(name=name, value=SCRIPTS[name], group="console_scripts")


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_every_console_script_resolves_to_a_function(name):
    assert callable(entry_point(name).load())


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("fedllm-sweep", ["strategy: central", "num_clients:"]),  # Hydra's help: the groups and config of conf/
        ("fedllm-warm-superexec", ["--preload", "flower-superexec", "--runtime-api-address"]),
        ("fedllm-supernode", ["--idle-pull-interval", "flower-supernode", "--superlink"]),
    ],
)
def test_operator_scripts_answer_help_without_running(name, expected):
    # A separate interpreter, as the generated console script runs: Hydra's --help reconfigures Python logging,
    # which inside pytest's captured streams crashes the whole session once absl.logging (dp-accounting) is loaded.
    code = (
        f"import sys; from {SCRIPTS[name].split(':')[0]} import {SCRIPTS[name].split(':')[1]} as main; sys.exit(main())"
    )
    done = subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert all(text in done.stdout for text in expected), done.stdout[-2000:]
