"""Execute untrusted generated code: a child process in a throw-away directory, under kernel-enforced limits.

Each program runs as ``python -I -S evaluation/sandbox_child.py`` in a fresh temporary directory (its cwd and
``HOME``), with an empty environment apart from ``PATH``/``LANG``, in its own session so that the whole process
group is killed at the wall-clock limit. The child sets resource limits, restricts itself with Landlock
(writes only inside the temporary directory, reads only there and in the system Python, no TCP, no signals
to outside processes) and installs an audit hook refusing sockets, subprocesses and outside writes before the
program's first line runs (see :mod:`evaluation.sandbox_child`). No root, container or network namespace is
needed. The directory is deleted afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

CHILD = Path(__file__).with_name("sandbox_child.py")


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one program: ``passed`` (exit status 0 within the limit), ``timed_out``, output tails
    and the isolation layers that were active (``landlock_abi`` 0 means the kernel offered none).
    """

    passed: bool
    timed_out: bool
    returncode: int | None
    stdout: str
    stderr: str
    landlock_abi: int


def run_program(
    source: str,
    timeout: float = 10.0,
    memory_mb: int = 1024,
    file_mb: int = 16,
    landlock: bool = True,
    audit_hook: bool = True,
) -> SandboxResult:
    """Run Python ``source`` in the sandbox; it passes if it exits with status 0 within ``timeout`` s.

    ``landlock`` and ``audit_hook`` switch the two isolation layers (both on by default; switching one off is
    for testing the other alone).
    """
    with tempfile.TemporaryDirectory(prefix="fedllm-sandbox-") as tmp:
        work = Path(tmp).resolve()
        (work / "program.py").write_text(source)
        spec = {
            "workdir": str(work),
            "program": "program.py",
            "report": ".sandbox.json",
            "cpu_seconds": max(1, int(timeout) + 1),
            "memory_bytes": memory_mb * 2**20,
            "file_bytes": file_mb * 2**20,
            "landlock": landlock,
            "audit_hook": audit_hook,
        }
        (work / ".spec.json").write_text(json.dumps(spec))
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(work), "TMPDIR": str(work)}
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", str(CHILD), str(work / ".spec.json")],
            cwd=work,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            text=True,
            errors="replace",
        )
        timed_out = False
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc.pid)
            out, err = proc.communicate()
        _kill_group(proc.pid)  # anything the program left behind in its session
        report = work / ".sandbox.json"
        abi = json.loads(report.read_text()).get("landlock_abi", 0) if report.is_file() else 0
    code = proc.returncode
    return SandboxResult(code == 0 and not timed_out, timed_out, code, out[-2000:], err[-2000:], abi)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
