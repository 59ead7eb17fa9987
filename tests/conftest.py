"""Shared fixtures: the tiny model (built once into the user cache), Flower runs in isolation."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedllm_app.flower_cli import FlowerRunner, kill_flower_processes


@pytest.fixture
def flower(tmp_path: Path):
    home = tmp_path / "flwr-home"
    home.mkdir()
    runner = FlowerRunner(home)
    try:
        yield runner
    finally:
        kill_flower_processes(str(home))
