"""A real Flower deployment on one machine: SuperLink, SuperNodes, ``flwr run``, clean-up.

:class:`Deployment` starts ``flower-superlink`` and any number of ``flower-supernode``
processes on free loopback ports, with its own ``FLWR_HOME`` (its ``config.toml``
holds the connection :attr:`Deployment.connection`), optionally with TLS
(certificates made with ``openssl``) and SuperNode authentication (ECDSA keys
registered with ``flwr supernode register``). :meth:`Deployment.run` runs
``flwr run <app> <connection>`` and returns the run's real final status (``flwr run``
exits 0 even when the run failed). :meth:`Deployment.close` ends every process it
started, including the children of a SuperNode killed with SIGKILL::

    with Deployment(tmp_path, tls=True, auth=True) as dep:
        dep.start_superlink()
        for pid in range(2):
            dep.start_node(f"node{pid}", {"partition-id": pid, "num-partitions": 2})
        result = dep.run("num_rounds=2 num_clients=2 sample_clients=2")
        assert result.status == "finished:completed", result.output

Used by the deployment tests, ``benchmarks/deploy_model_loading.py`` and the README's
recipe, which runs the same commands by hand.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedllm_app.ops.flower_run import (
    app_dir,
    flower_env,
    free_port,
    kill_flower_processes,
    pids_with_env,
    run_id_from,
    run_status,
)

CONNECTION = "fedllm-deploy"
ISOLATIONS = ("subprocess", "inline", "fork")


@dataclass
class RunResult:
    """What ``flwr run`` left: its final status (``finished:completed`` on success), run id and output."""

    status: str
    run_id: str | None
    output: str


@dataclass
class Node:
    """One started SuperNode: its process, log file, node config and (with auth) key pair."""

    name: str
    process: subprocess.Popen
    log: Path
    node_config: dict[str, Any]
    key: Path | None = None
    extra: list[subprocess.Popen] = field(default_factory=list)


def node_config_arg(config: dict[str, Any]) -> str:
    """``{"partition-id": 0, "data-path": "/x.jsonl"}`` -> ``partition-id=0 data-path="/x.jsonl"``."""
    parts = []
    for key, value in config.items():
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif not isinstance(value, int | float):
            value = json.dumps(str(value))  # a TOML basic string, as Flower parses it
        parts.append(f"{key}={value}")
    return " ".join(parts)


class Deployment:
    """SuperLink + SuperNodes as real processes on loopback, in their own FLWR_HOME under ``root``.

    Parameters
    ----------
    root : Path
        Working folder: ``flwr-home/``, ``certs/``, ``keys/``, ``logs/`` and the
        SuperLink's state live here, and the ServerApp runs here (relative
        ``output_dir`` resolve against it).
    tls : bool
        Serve the SuperLink over TLS with a fresh CA and a server certificate for 127.0.0.1.
    auth : bool
        Enable SuperNode authentication (needs ``tls``): only nodes whose public key was
        registered with ``flwr supernode register`` may join.
    isolation : str
        How the SuperNodes run the ClientApp: ``inline`` (default) / ``fork`` (``--isolation
        process`` plus fedllm's warm SuperExec, which imported the libraries and loaded the
        base model once and runs each message inside itself, model and tokenised data kept
        warm, or in a fork of itself; see :mod:`fedllm_app.ops.warm_superexec`), or
        ``subprocess`` (Flower's default: the SuperNode starts ``flower-superexec``, which
        starts one ``flwr-clientapp`` process per message).
    app : Path | None
        The Flower app to run; by default this checkout, or the current folder (:func:`app_dir`).
    input_timeout : float | None
        The warm SuperExec's ``--input-timeout`` (seconds a task may wait for its message); None: its default.
    idle_pull_interval : float | None
        Seconds between two empty pulls of the SuperNodes (``fedllm-supernode --idle-pull-interval``, see
        :mod:`fedllm_app.ops.supernode`) instead of Flower's fixed 3 s. None: Flower's 3 s. The SuperNodes are
        always ``fedllm-supernode``, which also answers a message whose ClientApp task failed before fetching it.
    flower_log_level : str | None
        ``FLWR_LOG_LEVEL`` of the SuperLink, SuperNodes and SuperExecs (``DEBUG``: every request, timestamped, in
        ``logs/``); the ``flwr`` commands keep Flower's default, as their output is read here.
    """

    def __init__(
        self,
        root: Path,
        *,
        tls: bool = False,
        auth: bool = False,
        isolation: str = "inline",
        app: Path | None = None,
        idle_pull_interval: float | None = None,
        input_timeout: float | None = None,
        flower_log_level: str | None = None,
    ) -> None:
        if auth and not tls:
            raise ValueError("SuperNode authentication needs TLS: use Deployment(root, tls=True, auth=True)")
        if isolation not in ISOLATIONS:
            raise ValueError(f"isolation={isolation!r} must be one of {', '.join(ISOLATIONS)}")
        self.root, self.tls, self.auth, self.isolation = Path(root).resolve(), tls, auth, isolation
        self.idle_pull_interval, self.input_timeout = idle_pull_interval, input_timeout
        self.app = app or app_dir()
        self.home = self.root / "flwr-home"
        for sub in ("flwr-home", "logs", "certs", "keys"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = flower_env(self.home, PYTHONUNBUFFERED="1")
        self.log_level = flower_log_level
        self.processes: list[subprocess.Popen] = []
        self.nodes: dict[str, Node] = {}
        self.ca = self.root / "certs" / "ca.crt"
        if tls:
            make_certificates(self.root / "certs")
        self._write_connection()

    # -- life cycle ---------------------------------------------------------------------------

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """End every process started here (SuperLink, SuperNodes, their SuperExecs and ClientApps)."""
        for proc in self.processes:
            _kill_group(proc, signal.SIGTERM)
        deadline = time.time() + 5
        for proc in self.processes:
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                _kill_group(proc, signal.SIGKILL)
        kill_flower_processes(str(self.home))  # anything that escaped its group but carries our FLWR_HOME
        for proc in self.processes:
            if proc.poll() is None:
                proc.wait(timeout=5)

    def _start(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.Popen, Path]:
        log = self.root / "logs" / f"{name}.log"
        env = dict(env or self.env)
        if self.log_level:
            env["FLWR_LOG_LEVEL"] = self.log_level
        with log.open("ab") as out:
            proc = subprocess.Popen(
                cmd,
                cwd=self.root,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: close() ends its children too
            )
        self.processes.append(proc)
        return proc, log

    # -- SuperLink ----------------------------------------------------------------------------

    def superlink_command(self) -> list[str]:
        cmd = ["flower-superlink", "--port", str(self.port), "--database", str(self.root / "state.db")]
        cmd += ["--disable-runtime-dependency-installation"]
        if self.tls:
            certs = self.root / "certs"
            cmd += ["--ssl-ca-certfile", str(self.ca), "--ssl-certfile", str(certs / "server.pem")]
            cmd += ["--ssl-keyfile", str(certs / "server.key")]
        else:
            cmd += ["--insecure"]
        if self.auth:
            cmd += ["--enable-supernode-auth"]
        return cmd

    def start_superlink(self, timeout: float = 60) -> None:
        """Start the SuperLink and wait until its port answers."""
        proc, log = self._start("superlink", self.superlink_command())
        deadline = time.time() + timeout
        while not _port_open(self.port):
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"flower-superlink did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)

    def _write_connection(self) -> None:
        lines = ["[superlink]", 'default = "local"', "", "[superlink.local]", 'address = ":local:"', ""]
        lines += [f"[superlink.{CONNECTION}]", f'address = "{self.address}"']
        lines += [f'root-certificates = "{self.ca}"'] if self.tls else ["insecure = true"]
        (self.home / "config.toml").write_text("\n".join(lines) + "\n")

    # -- SuperNodes ---------------------------------------------------------------------------

    def make_node_key(self, name: str, register: bool = True) -> Path:
        """An ECDSA key pair for a SuperNode (``keys/<name>``, ``keys/<name>.pub``), registered if asked."""
        key = self.root / "keys" / name
        if not key.exists():
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", str(key)], check=True, env=self.env
            )
        if register:
            self.flwr("supernode", "register", str(key.with_suffix(".pub")), CONNECTION)
        return key

    def supernode_command(self, node_config: dict[str, Any], key: Path | None, tls: bool | None = None) -> list[str]:
        tls = self.tls if tls is None else tls
        cmd = [sys.executable, "-m", "fedllm_app.ops.supernode"]  # fedllm-supernode: never stuck on a failed task
        if self.idle_pull_interval is not None:
            cmd += ["--idle-pull-interval", str(self.idle_pull_interval)]
        cmd += ["--superlink", self.address, "--port", str(free_port())]
        cmd += ["--root-certificates", str(self.ca)] if tls else ["--insecure"]
        if key is not None:
            cmd += ["--auth-supernode-private-key", str(key)]
        cmd += ["--node-config", node_config_arg(node_config)]
        if self.isolation != "subprocess":
            cmd += ["--isolation", "process"]
        return cmd

    def start_node(
        self,
        name: str,
        node_config: dict[str, Any],
        *,
        key: Path | None | bool = True,
        tls: bool | None = None,
        env: dict[str, str] | None = None,
    ) -> Node:
        """Start a SuperNode with this node config (any keys: ``partition-id``, ``data-path``...).

        With ``auth``, ``key=True`` makes and registers a key for it; pass a Path to use an
        existing key (e.g. an unregistered one) or ``None`` for none. ``tls=False`` against a
        TLS SuperLink starts a plaintext node. ``env`` adds environment variables.
        """
        if key is True:
            key = self.make_node_key(name) if self.auth else None
        node_env = {**self.env, **(env or {})}
        cmd = self.supernode_command(node_config, key or None, tls)
        proc, log = self._start(name, cmd, node_env)
        node = Node(name, proc, log, dict(node_config), key or None)
        if self.isolation != "subprocess":
            runtime = cmd[cmd.index("--port") + 1]
            exec_cmd = [sys.executable, "-m", "fedllm_app.ops.warm_superexec", "--mode", self.isolation]
            exec_cmd += ["--insecure"]
            if self.input_timeout is not None:
                exec_cmd += ["--input-timeout", str(self.input_timeout)]
            exec_cmd += ["--runtime-api-address", f"127.0.0.1:{runtime}"]
            node.extra.append(self._start(f"{name}-superexec", exec_cmd, node_env)[0])
        self.nodes[name] = node
        return node

    def kill_node(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Kill one SuperNode process only (as a crash would); its children are reaped by :meth:`close`."""
        node = self.nodes[name]
        node.process.send_signal(sig)
        node.process.wait(timeout=30)
        for proc in node.extra:
            proc.send_signal(sig)

    def wait_for_log(self, name: str, pattern: str, timeout: float = 60) -> str:
        """Wait until ``logs/<name>.log`` matches ``pattern`` (regex); return the log."""
        log = self.root / "logs" / f"{name}.log"
        deadline = time.time() + timeout
        while time.time() < deadline:
            text = log.read_text(errors="replace") if log.exists() else ""
            if re.search(pattern, text):
                return text
            time.sleep(0.2)
        raise TimeoutError(f"{pattern!r} not in {log} after {timeout} s:\n{text[-3000:]}")

    def connected_nodes(self) -> list[dict[str, Any]]:
        """The SuperLink's view of the SuperNodes (``flwr supernode list --format json``)."""
        out = self.flwr("supernode", "list", CONNECTION, "--format", "json")
        return json.loads(out[out.index("{") :]).get("nodes", [])

    def wait_for_nodes(self, count: int, timeout: float = 60) -> None:
        """Wait until ``count`` SuperNodes are online."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            online = [n for n in self.connected_nodes() if n.get("status") == "online"]
            if len(online) >= count:
                return
            time.sleep(0.5)
        raise TimeoutError(f"{count} SuperNodes did not come online in {timeout} s: {self.connected_nodes()}")

    # -- runs -----------------------------------------------------------------------------------

    def flwr(self, *args: str, timeout: float = 120) -> str:
        """Run a ``flwr`` CLI command against this deployment; return its output (raise on failure)."""
        out = subprocess.run(
            ["flwr", *args], env=self.env, cwd=self.root, capture_output=True, text=True, timeout=timeout
        )
        if out.returncode != 0:
            raise RuntimeError(f"flwr {' '.join(args)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
        return out.stdout + out.stderr

    def run_command(self, overrides: str) -> list[str]:
        return ["flwr", "run", str(self.app), CONNECTION, "--stream", "--run-config", f"overrides='{overrides}'"]

    def run(self, overrides: str, timeout: float = 600) -> RunResult:
        """``flwr run <app> <connection> --stream`` with these Hydra overrides; the real final status."""
        return self.finish_run(self.start_run(overrides), timeout)

    def start_run(self, overrides: str) -> subprocess.Popen:
        """Start ``flwr run`` without waiting (e.g. to kill something mid-run); see :meth:`finish_run`."""
        proc = subprocess.Popen(
            self.run_command(overrides),
            env=self.env,
            cwd=self.root,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.processes.append(proc)
        return proc

    def finish_run(self, proc: subprocess.Popen, timeout: float = 600) -> RunResult:
        """Wait for a started ``flwr run``; return the run's final status as the SuperLink reports it."""
        try:
            text, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc, signal.SIGKILL)
            text = _text(proc.communicate()[0]) + f"\n[deploy] flwr run timed out after {timeout} s\n{self.report()}"
        run_id = run_id_from(text)
        if run_id is None:
            return RunResult("not-started", None, text or "")
        return RunResult(self.status(run_id), run_id, text)

    def report(self, lines: int = 8) -> str:
        """What a run that timed out was waiting on: each SuperNode's and SuperExec's state (running, or its exit
        code), the SuperNode's last messages in and out (and errors), and the last ``lines`` lines of each
        SuperExec's log that are not a traceback's.
        """
        out = []
        for name, node in self.nodes.items():
            state = [_state(node.process)] + [_state(proc) for proc in node.extra]
            out.append(f"[deploy] {name}: SuperNode {state[0]}" + (f", SuperExec {state[1]}" if node.extra else ""))
            moves = re.compile(r"Receiving:|Sending:|Ignoring|ERROR")
            out += [f"  {x[:200]}" for x in _log_lines(node.log, moves)[-4:]]
            out += [f"  {x[:200]}" for x in _log_lines(self.root / "logs" / f"{name}-superexec.log")[-lines:]]
        return "\n".join(out)

    def serverapp_pids(self) -> list[int]:
        """The running ``flwr-serverapp`` processes of this deployment (to kill the server mid-run)."""
        pids = []
        for pid in pids_with_env(f"FLWR_HOME={self.home}"):
            try:
                if b"flwr-serverapp" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    pids.append(pid)
            except OSError:
                continue
        return pids

    def status(self, run_id: str) -> str:
        """A run's status from ``flwr ls`` (e.g. ``finished:completed``, ``finished:failed``, ``running``)."""
        return run_status(self.env, self.root, run_id, CONNECTION)

    def serverapp_log(self, run_id: str) -> str:
        """The ServerApp's log of a run (``flwr log``), e.g. after a run that timed out."""
        return self.flwr("log", run_id, CONNECTION, "--show", timeout=60)


def make_certificates(folder: Path) -> None:
    """A CA and a server certificate for 127.0.0.1/localhost, with openssl (the README's commands)."""
    folder.mkdir(parents=True, exist_ok=True)
    ext = folder / "server.ext"
    ext.write_text("subjectAltName = IP:127.0.0.1, DNS:localhost\n")
    steps = [
        "openssl ecparam -genkey -name prime256v1 -out ca.key",
        "openssl req -x509 -new -key ca.key -sha256 -days 30 -subj /CN=fedllm-ca -out ca.crt",
        "openssl ecparam -genkey -name prime256v1 -out server.key",
        "openssl req -new -key server.key -subj /CN=127.0.0.1 -out server.csr",
        "openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 30 -sha256 "
        "-extfile server.ext -out server.pem",
    ]
    for step in steps:
        subprocess.run(step.split(), cwd=folder, check=True, capture_output=True)


def _kill_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _log_lines(log: Path, keep: re.Pattern | None = None) -> list[str]:
    """A log's lines that are not a traceback's (and match ``keep``, when given); none for a missing log."""
    if not log.exists():
        return []
    lines = [x for x in log.read_text(errors="replace").splitlines() if x and not x.startswith((" ", "\t"))]
    return [x for x in lines if keep is None or keep.search(x)]


def _state(proc: subprocess.Popen) -> str:
    """``running (pid N)`` or ``exited with code C (pid N)``."""
    code = proc.poll()
    return f"running (pid {proc.pid})" if code is None else f"exited with code {code} (pid {proc.pid})"


def _port_open(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _text(data: bytes | str | None) -> str:
    if isinstance(data, bytes):
        return data.decode(errors="replace")
    return data or ""
