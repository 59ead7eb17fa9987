"""Run ``flwr run`` as a subprocess and read the run's real final status.

``flwr run --stream`` exits 0 even when the run failed, so :meth:`FlowerRunner.run`
reads the status with ``flwr ls``. Each runner can have its own FLWR_HOME and free
ports for the local SuperLink, so concurrent or stale SuperLinks do not interfere;
:func:`kill_flower_processes` ends everything started under that FLWR_HOME.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pids_with_env(marker: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if marker.encode() in (proc / "environ").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def kill_flower_processes(flwr_home: str) -> None:
    """End the SuperLink, SuperExec, simulation and Ray processes started under ``flwr_home``."""
    marker = f"FLWR_HOME={flwr_home}"
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids_with_env(marker):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(1.0)


class FlowerRunner:
    """Runs ``flwr run .`` on the local simulation connection with its own FLWR_HOME and ports."""

    def __init__(self, home: Path) -> None:
        self.home = home
        bindir = str(Path(sys.executable).parent)
        self.env = {
            **os.environ,
            "FLWR_HOME": str(home),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
            "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
            "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
        }

    def run(
        self,
        overrides: str,
        num_supernodes: int = 2,
        timeout: int = 600,
        federation_extra: str = "client-resources-num-cpus=1",
    ) -> tuple[str, str]:
        """Run to completion; return (final status, output). Status comes from ``flwr ls``, not the exit code."""
        cmd = [
            "flwr",
            "run",
            str(REPO),
            "--stream",
            "--federation-config",
            f"num-supernodes={num_supernodes} {federation_extra}",
            "--run-config",
            f"overrides='{overrides}'",
        ]
        out = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout, cwd=self.home)
        text = out.stdout + out.stderr
        match = re.search(r"Successfully started run (\d+)", text)
        assert match, f"flwr run did not start a run:\n{text[-3000:]}"
        ls = subprocess.run(
            ["flwr", "ls", "--run-id", match.group(1), "--format", "json"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=self.home,
        )
        payload = json.loads(ls.stdout[ls.stdout.index("{") :])
        status = payload["runs"][0]["status"]
        return status, text
