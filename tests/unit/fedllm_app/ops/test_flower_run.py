"""fedllm_app.ops.flower_run: ending a run's processes waits for them to exit, not for a fixed time; a SuperLink
too slow for Flower's 15 s is started without that limit."""

import os
import socket
import subprocess
import sys
import time

import pytest

from fedllm_app.ops.flower_run import FlowerRunner, kill_flower_processes, pids_with_env

SLEEPER = "import time; print('ready', flush=True); time.sleep(60)"
STUBBORN = "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN); " + SLEEPER


def start(code: str, home: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", code], env={**os.environ, "FLWR_HOME": home}, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_ending_processes_that_exit_on_sigterm_returns_as_soon_as_they_are_gone(tmp_path):
    procs = [start(SLEEPER, str(tmp_path)) for _ in range(2)]
    began = time.monotonic()
    kill_flower_processes(str(tmp_path))
    took = time.monotonic() - began
    assert [p.wait(timeout=5) for p in procs] == [-15, -15]
    assert took < 1.5  # it used to sleep 1 s after SIGTERM and 1 s after SIGKILL, whatever happened


def test_a_process_that_ignores_sigterm_gets_sigkill_after_the_grace_period(tmp_path):
    proc = start(STUBBORN, str(tmp_path))
    kill_flower_processes(str(tmp_path), grace=0.3)
    assert proc.wait(timeout=5) == -9
    assert not pids_with_env(f"FLWR_HOME={tmp_path}")


@pytest.mark.slow
def test_start_superlink_leaves_a_superlink_answering_on_the_runners_port(tmp_path):
    runner = FlowerRunner(tmp_path)
    try:
        runner.start_superlink(limit=120)
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", int(runner.env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"]))) == 0
        assert (tmp_path / "local-superlink" / "superlink.log").is_file()
    finally:
        kill_flower_processes(str(tmp_path))
    assert not pids_with_env(f"FLWR_HOME={tmp_path}")
