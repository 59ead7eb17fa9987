"""The console scripts of pyproject.toml resolve, and the operator tools answer ``--help`` as scripts would."""

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
    ],
)
def test_operator_scripts_answer_help_without_running(name, expected, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [name, "--help"])
    try:
        entry_point(name).load()()  # as the generated console script calls it: no arguments, sys.argv parsed
    except SystemExit as done:
        assert done.code in (0, None)
    out = capsys.readouterr().out
    assert all(text in out for text in expected), out[-2000:]
