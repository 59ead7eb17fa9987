"""Shared fixtures: the tiny model (built once into the user cache), Flower runs in isolation."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from fedllm_app.ops.flower_run import FlowerRunner, kill_flower_processes


@pytest.fixture(autouse=True)
def fedllm_info_logs(caplog):
    """Tests read the ``fedllm`` logger's INFO lines through ``caplog`` (or, once code under test has set up
    the console, through ``capsys``); the logger is put back as it was after each test.
    """
    fed = logging.getLogger("fedllm")
    saved = list(fed.handlers), fed.propagate, fed.level
    caplog.set_level(logging.INFO, logger="fedllm")
    yield
    fed.handlers[:], fed.propagate = saved[0], saved[1]
    fed.setLevel(saved[2])


@pytest.fixture
def flower(tmp_path: Path):
    home = tmp_path / "flwr-home"
    home.mkdir()
    runner = FlowerRunner(home)
    try:
        yield runner
    finally:
        kill_flower_processes(str(home))
