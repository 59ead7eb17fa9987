"""Shared fixtures: the tiny model (built once into the user cache), Flower runs in isolation."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from fedllm_app.ops.flower_run import FlowerRunner, kill_flower_processes

# Flower's SuperExec looks for a new run's task every second by default; a test waits for it each run.
SUPEREXEC_POLL = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"}


@pytest.fixture(autouse=True)
def fedllm_info_logs(caplog):
    """Tests read the ``fedllm`` logger's INFO lines through ``caplog`` (or, once code under test has set up
    the console, through ``capsys``); the logger, and the filters and level the console puts on Flower's, are
    put back as they were after each test.
    """
    fed, flower = logging.getLogger("fedllm"), logging.getLogger("flwr")
    saved = list(fed.handlers), fed.propagate, fed.level
    flower_saved = list(flower.filters), flower.level
    caplog.set_level(logging.INFO, logger="fedllm")
    yield
    fed.handlers[:], fed.propagate = saved[0], saved[1]
    fed.setLevel(saved[2])
    flower.filters[:] = flower_saved[0]
    flower.setLevel(flower_saved[1])


@pytest.fixture(autouse=True)
def task_identity():
    """Flower stamps messages with the current run and node; outside a run (a fake Grid, a ClientApp called
    in-process), every test has run, node and task 1."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield


@pytest.fixture(scope="session")
def tiny64_model(tmp_path_factory) -> Path:
    """A 64-wide tiny model, built once a session (bitsandbytes' CPU 4-bit kernels reject the default's 96)."""
    from fedllm_app.tiny_model import TinySpec, build_tiny_model

    path = tmp_path_factory.mktemp("tiny64")
    build_tiny_model(path, TinySpec(hidden_size=64, pretrain_steps=1))
    return path


@pytest.fixture
def flower(tmp_path: Path):
    home = tmp_path / "flwr-home"
    home.mkdir()
    runner = FlowerRunner(home)
    runner.env.update(SUPEREXEC_POLL)
    try:
        yield runner
    finally:
        end_flower_processes(str(home))


def end_flower_processes(home: str, grace: float = 10.0) -> None:
    """End what runs under ``home``: SIGTERM, waiting until it has exited (most take well under a second); what is
    left after ``grace`` seconds gets its SIGKILL."""
    kill_flower_processes(home, grace=grace)
