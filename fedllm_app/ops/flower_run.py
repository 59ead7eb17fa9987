"""The one Flower-run helper: ``flwr run`` as a subprocess with its own FLWR_HOME, and its real final status.

``flwr run --stream`` exits 0 even when the run failed, so :func:`run_status` reads the
status with ``flwr ls``. :func:`flower_env` gives a runner its own FLWR_HOME (and, for the
local simulation connection, free ports), so concurrent or stale SuperLinks do not
interfere; :func:`kill_flower_processes` ends everything started under that FLWR_HOME.
:class:`FlowerRunner` runs simulations (tests, benchmarks, sweeps);
:class:`fedllm_app.ops.deploy.Deployment` uses the same pieces for a real deployment.
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

# The source checkout this package lives in, when it does (an editable install or a clone).
REPO = Path(__file__).resolve().parents[2]


def flower_env(home: Path, **extra: str) -> dict[str, str]:
    """The current environment with its own ``FLWR_HOME``, no runtime dependency installs, and this
    Python's ``bin`` first on PATH (so ``flwr`` and ``flower-*`` come from the same environment).
    """
    bindir = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
        **extra,
    }


def run_id_from(output: str) -> str | None:
    """The run id in ``flwr run``'s output ("Successfully started run <id>"), or None if none started."""
    match = re.search(r"Successfully started run (\d+)", output or "")
    return match.group(1) if match else None


def run_status(env: dict[str, str], cwd: Path, run_id: str, connection: str | None = None) -> str:
    """A run's status from ``flwr ls`` (e.g. ``finished:completed``, ``finished:failed``, ``running``)."""
    cmd = ["flwr", "ls", *([connection] if connection else []), "--run-id", run_id, "--format", "json"]
    out = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=60)
    text = out.stdout + out.stderr
    if "{" not in text:
        raise RuntimeError(f"flwr ls --run-id {run_id} failed ({out.returncode}):\n{text[-3000:]}")
    return json.loads(text[text.index("{") :])["runs"][0]["status"]


def is_fedllm_app(folder: Path) -> bool:
    """Whether ``folder`` holds fedllm's Flower app (a pyproject.toml of project ``fedllm`` with [tool.flwr.app])."""
    import tomllib

    try:
        conf = tomllib.loads((folder / "pyproject.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return False
    return conf.get("project", {}).get("name") == "fedllm" and "app" in conf.get("tool", {}).get("flwr", {})


def app_dir(cwd: Path | None = None) -> Path:
    """The folder ``flwr run`` bundles: the checkout this package lives in, else the current folder.

    A non-editable install has no app folder of its own (``flwr run`` builds the app from a source folder),
    so the sweep and the harnesses then need to be started from a fedllm checkout.
    """
    cwd = Path.cwd() if cwd is None else cwd
    for candidate in (REPO, cwd):
        if is_fedllm_app(candidate):
            return candidate
    raise RuntimeError(
        f"no fedllm app to run: {REPO} is an installed package, not a checkout, and the current folder {cwd} "
        f"has no fedllm pyproject.toml; run from the fedllm source folder (the one with pyproject.toml)"
    )


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pids_with_env(marker: str) -> list[int]:
    """Processes (other than this one) whose environment contains ``marker``, e.g. ``FLWR_HOME=<dir>``."""
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


def kill_flower_processes(flwr_home: str, grace: float = 5.0) -> None:
    """End the SuperLink, SuperExec, simulation and Ray processes started under ``flwr_home``.

    They get SIGTERM and are waited for (most exit well within a second); those still running after ``grace``
    seconds get SIGKILL, and are waited for up to a second more.
    """
    marker = f"FLWR_HOME={flwr_home}"
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 1.0)):
        for pid in pids_with_env(marker):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not pids_with_env(marker):
                return
            time.sleep(0.05)


# What `flwr run` says when the local SuperLink it started did not answer within Flower's fixed 15 s.
SUPERLINK_TOO_SLOW = "Failed to start local SuperLink"


class FlowerRunner:
    """Runs ``flwr run .`` on the local simulation connection with its own FLWR_HOME and ports."""

    def __init__(self, home: Path) -> None:
        self.home = home
        # When the last `flwr run` exited (wall clock), before :meth:`run` read its status with `flwr ls`.
        self.exited_at: float | None = None
        self.env = flower_env(
            home,
            FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()),
            FLWR_LOCAL_CONTROL_API_PORT=str(free_port()),
        )

    @staticmethod
    def command(
        overrides: str,
        num_supernodes: int = 2,
        federation_extra: str = "client-resources-num-cpus=1",
        run_config: str = "",
    ) -> list[str]:
        """The ``flwr run . --stream`` command line of :meth:`run` (run it with :attr:`env`, in :attr:`home`)."""
        return [
            "flwr",
            "run",
            str(app_dir()),
            "--stream",
            "--federation-config",
            f"num-supernodes={num_supernodes} {federation_extra}",
            "--run-config",
            f"overrides='{overrides}' {run_config}".strip(),
        ]

    def run(
        self,
        overrides: str,
        num_supernodes: int = 2,
        timeout: int = 600,
        federation_extra: str = "client-resources-num-cpus=1",
        run_config: str = "",
    ) -> tuple[str, str]:
        """Run to completion; return (final status, output). Status comes from ``flwr ls``, not the exit code.

        ``run_config`` adds declared run-config keys, e.g. ``"num-server-rounds=2 strategy='fedprox'"``.
        """
        cmd = self.command(overrides, num_supernodes, federation_extra, run_config)
        out = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout, cwd=self.home)
        if SUPERLINK_TOO_SLOW in out.stdout + out.stderr:  # a loaded machine: start it without Flower's 15 s limit
            self.start_superlink()
            out = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout, cwd=self.home)
        self.exited_at = time.time()
        text = out.stdout + out.stderr
        run_id = run_id_from(text)
        if run_id is None:
            raise RuntimeError(f"flwr run did not start a run:\n{text[-3000:]}")
        return run_status(self.env, self.home, run_id), text

    def start_superlink(self, limit: float = 300.0) -> None:
        """Start the local SuperLink as ``flwr run`` does (its arguments, this runner's FLWR_HOME and ports) and
        wait up to ``limit`` seconds for it to answer; ``flwr run`` then uses it. On a loaded machine the
        SuperLink that ``flwr run`` starts itself can miss Flower's fixed 15 s and be killed.
        """
        folder = self.home / "local-superlink"
        folder.mkdir(parents=True, exist_ok=True)
        port = self.env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"]
        cmd = [
            "flower-superlink", "--insecure", "--simulation", "--isolation", "subprocess", "--control-api-address",
            f"127.0.0.1:{self.env['FLWR_LOCAL_CONTROL_API_PORT']}", "--host", "127.0.0.1", "--port", port,
            "--log-file", str(folder / "superlink.log"), "--database", str(folder / "state.db"),
        ]  # fmt: skip
        proc = subprocess.Popen(cmd, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline and proc.poll() is None:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", int(port))) == 0:
                    time.sleep(2.0)  # its other APIs come up just after the first
                    return
            time.sleep(0.5)
        raise RuntimeError(
            f"the local SuperLink did not answer on port {port} within {limit:.0f} s (exit code {proc.poll()}); "
            f"see {folder / 'superlink.log'}"
        )
