"""Execute untrusted generated code: in a throw-away directory, isolated by the kernel, under a hard deadline.

Three backends; ``backend="auto"`` takes the first that works here:

``bwrap``
    `bubblewrap <https://github.com/containers/bubblewrap>`_ (Debian package ``bubblewrap``): new user, mount,
    PID, network, IPC, UTS and cgroup namespaces. The program sees ``/usr`` and the Python installation
    (read-only) and its own directory ``/sandbox`` (a small tmpfs), nothing else: no ``/proc``, ``/dev``,
    ``/sys`` or ``/tmp``. It runs as uid 65534 of its user namespace with no capabilities, cannot create
    another user namespace, and dies with its parent. (Started by root, that uid is root's outside the
    namespace, powerless there: every file it can reach outside ``/sandbox`` is on a read-only mount.)
``unshare``
    The same without bubblewrap, done by :mod:`evaluation.sandbox_child` with Linux system calls
    (``unshare``, ``mount``, ``pivot_root``). Started by root it runs the program as the real unprivileged
    uid/gid 65534; otherwise it uses a user namespace.
``weak``
    No namespaces: resource limits, Landlock where the kernel has it and a Python audit hook. It does not
    hold against a program that means harm, so it runs only with ``allow_weak=True``
    (``fedllm-eval --allow-weak-sandbox``).

In every backend the parent (this module) enforces what the program cannot touch: a wall-clock deadline
after which the whole process tree is killed (in the strong backends the PID namespace dies with it, so a
program that forks into a new session does not outlive it), an output cap (reading stops and the tree is
killed past ``output_kb``), and the verdict: the program passed only if it exited 0 *and* printed the run's
random sentinel, which it is given only on standard input and which the tests print only after they ran.
Nothing the program writes into its directory is read back. The directory is deleted afterwards.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from fedllm_app.config import ConfigError

CHILD = Path(__file__).with_name("sandbox_child.py")
BACKENDS = ("bwrap", "unshare", "weak")
STRONG = ("bwrap", "unshare")
NOBODY = 65534
INSIDE = "/sandbox"
_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": INSIDE, "TMPDIR": INSIDE}


class SandboxUnavailable(ConfigError):
    """No backend here isolates generated code well enough, and weak isolation was not allowed."""


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one program: ``passed`` (exit status 0 and the sentinel, within the limits), ``timed_out``,
    ``output_capped``, output tails (the sentinel removed) and the ``backend`` that isolated it.
    """

    passed: bool
    timed_out: bool
    output_capped: bool
    returncode: int | None
    stdout: str
    stderr: str
    backend: str


@dataclass(frozen=True)
class _Job:
    answer: str
    tests: str
    timeout: float
    memory_mb: int
    file_mb: int
    disk_mb: int
    output_kb: int
    audit_hook: bool
    files: tuple[tuple[str, str], ...] = ()
    steps: tuple[tuple[str, ...], ...] = ()


def run_program(
    answer: str,
    tests: str = "",
    timeout: float = 10.0,
    memory_mb: int = 1024,
    file_mb: int = 16,
    disk_mb: int = 64,
    output_kb: int = 1024,
    backend: str = "auto",
    allow_weak: bool = False,
    audit_hook: bool = True,
) -> SandboxResult:
    """Run Python ``answer`` then ``tests`` (in one namespace, not as ``__main__``) in the sandbox.

    Passes if both finish without an exception (``SystemExit`` counts as one) within ``timeout`` wall-clock
    seconds and ``output_kb`` KiB of output per stream. Its directory (``/sandbox``) is a fresh ``disk_mb``
    MiB tmpfs in the strong backends (nothing reaches the host's disk). ``backend``: ``auto`` (the
    strongest that works here), ``bwrap``, ``unshare`` or ``weak`` (refused unless ``allow_weak``).
    ``audit_hook`` switches off the interpreter-level layer, for tests showing that the kernel holds alone.
    """
    name = resolve_backend(backend, allow_weak)
    job = _Job(answer, tests, timeout, memory_mb, file_mb, disk_mb, output_kb, audit_hook)
    with tempfile.TemporaryDirectory(prefix="fedllm-sandbox-") as tmp:
        return _execute(name, job, _prepare(Path(tmp)))


def run_native(
    files: dict[str, str],
    steps: list[list[str]],
    timeout: float = 10.0,
    memory_mb: int = 4096,
    backend: str = "auto",
    allow_weak: bool = False,
) -> SandboxResult:
    """Write ``files`` into the sandbox directory and run ``steps`` there (argvs such as ``["g++", "p.cpp",
    "-o", "p"]`` then ``["./p"]``) under the same isolation and limits as :func:`run_program`; passes only if
    every step exits 0 within ``timeout`` seconds in all. Programs are found on ``/usr/bin:/bin``.
    """
    name = resolve_backend(backend, allow_weak)
    job = _Job("", "", timeout, memory_mb, 16, 256, 1024, False, tuple(files.items()), tuple(map(tuple, steps)))
    with tempfile.TemporaryDirectory(prefix="fedllm-sandbox-") as tmp:
        return _execute(name, job, _prepare(Path(tmp)))


def resolve_backend(backend: str = "auto", allow_weak: bool = False) -> str:
    """The backend ``backend`` names (``auto``: the strongest that works here); weak only if ``allow_weak``."""
    if backend not in ("auto", *BACKENDS):
        raise ConfigError(f"sandbox backend {backend!r} is unknown; choose auto, {', '.join(BACKENDS)}")
    name = backend if backend != "auto" else next((b for b in STRONG if backend_works(b)), "weak")
    if name in STRONG and not backend_works(name):
        raise SandboxUnavailable(f"sandbox backend {name!r} does not work on this machine ({backend_problem(name)})")
    if name == "weak" and not allow_weak:
        problems = f"bubblewrap: {backend_problem('bwrap')}; Linux namespaces: {backend_problem('unshare')}"
        why = "the weak sandbox was asked for" if backend == "weak" else f"no strong sandbox works here ({problems})"
        raise SandboxUnavailable(
            f"{why}, so generated code could read, "
            "change or send anything this user can. Install bubblewrap (apt-get install bubblewrap) or allow "
            "user namespaces, or accept the risk with --allow-weak-sandbox (fedllm-eval) or "
            "eval.allow_weak_sandbox=true (benchmarks during training)"
        )
    return name


@functools.cache
def backend_works(name: str) -> bool:
    """Whether ``name`` runs a trivial program here (checked once per process)."""
    return backend_problem(name) == ""


@functools.cache
def backend_problem(name: str) -> str:
    """Why backend ``name`` does not work here ("" if it does): it runs a trivial program once per process."""
    if name == "bwrap" and shutil.which("bwrap") is None:
        return "not installed"
    if not sys.platform.startswith("linux"):
        return "not Linux"
    job = _Job("print('ok')", "", 20.0, 1024, 1, 1, 64, True)
    with tempfile.TemporaryDirectory(prefix="fedllm-sandbox-probe-") as tmp:
        result = _execute(name, job, _prepare(Path(tmp)))
    return "" if result.passed else f"a test program failed: {(result.stderr or result.stdout).strip()[-300:]}"


def _prepare(tmp: Path) -> Path:
    """``tmp/work`` (the weak backend's program directory) and ``tmp/root`` (where ``unshare`` builds its root)."""
    (tmp / "work").mkdir()
    (tmp / "root").mkdir()
    return tmp


def _python() -> str:
    return os.path.realpath(sys.executable)


def _read_only_paths() -> list[str]:
    """``/usr``, the ``/lib``-style entries beside it (usually links into it) and the Python installation."""
    paths = ["/usr", "/bin", "/lib", "/lib32", "/lib64", "/libx32"]
    for extra in (sys.base_prefix, os.path.dirname(os.path.dirname(_python()))):
        if not any(extra == p or extra.startswith(p + "/") for p in paths):
            paths.append(os.path.realpath(extra))
    return [p for p in dict.fromkeys(paths) if os.path.lexists(p)]


def _command(name: str, tmp: Path, disk_mb: int) -> tuple[list[str], dict[str, str] | None, Path]:
    """argv, environment and cwd that start ``sandbox_child`` in ``run`` mode under backend ``name``."""
    work, size = tmp / "work", str(disk_mb * 2**20)
    source = CHILD.read_text()
    run = [_python(), "-I", "-S", "-c", source, "run"]
    if name == "weak":
        return run, {**_ENV, "HOME": str(work), "TMPDIR": str(work)}, work
    if name == "unshare":
        root = os.geteuid() == 0
        cfg = {"newroot": str(tmp / "root"), "ro": _read_only_paths(), "size": size, "python": _python()}
        cfg |= {"uid": NOBODY if root else os.getuid(), "gid": NOBODY if root else os.getgid(), "source": source}
        return [_python(), "-I", "-S", "-c", source, "isolate", json.dumps(cfg)], {}, tmp
    argv = ["bwrap", "--unshare-all", "--unshare-user", "--disable-userns", "--uid", str(NOBODY), "--gid", str(NOBODY)]
    argv += ["--die-with-parent", "--new-session", "--clearenv"]
    for path in _read_only_paths():
        if os.path.islink(path):
            argv += ["--symlink", os.readlink(path), path]
        else:
            argv += ["--ro-bind", path, path]
    argv += ["--size", size, "--perms", "0700", "--tmpfs", INSIDE, "--remount-ro", "/", "--chdir", INSIDE]
    for key, value in _ENV.items():
        argv += ["--setenv", key, value]
    return argv + ["--", *run], {}, tmp


def _execute(name: str, job: _Job, tmp: Path) -> SandboxResult:
    sentinel = secrets.token_hex(16)
    argv, env, cwd = _command(name, tmp, job.disk_mb)
    payload = {"answer": job.answer, "tests": job.tests, "sentinel": sentinel, "audit_hook": job.audit_hook}
    payload |= {"cpu_seconds": max(1, int(job.timeout) + 1), "memory_bytes": job.memory_mb * 2**20}
    payload |= {"file_bytes": job.file_mb * 2**20, "processes": 256, "landlock": name == "weak"}
    payload |= {"files": dict(job.files), "steps": [list(s) for s in job.steps]}
    proc = subprocess.Popen(
        argv,
        cwd=cwd,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    threading.Thread(target=_feed, args=(proc, json.dumps(payload).encode()), daemon=True).start()
    out, err, timed_out, capped = _collect(proc, job.timeout, job.output_kb * 1024)
    code = proc.returncode
    line = f"\n{sentinel}\n".encode()
    finished = line in out
    passed = code == 0 and finished and not timed_out and not capped
    text = [b.replace(line, b"").decode(errors="replace")[-2000:] for b in (out, err)]
    return SandboxResult(passed, timed_out, capped, code, text[0], text[1], name)


def _feed(proc: subprocess.Popen, payload: bytes) -> None:
    try:
        proc.stdin.write(payload)
        proc.stdin.close()
    except (BrokenPipeError, OSError, ValueError):
        pass


def _collect(proc: subprocess.Popen, timeout: float, cap: int) -> tuple[bytes, bytes, bool, bool]:
    """Read both pipes until EOF, the deadline or ``cap`` bytes in one of them; kill the tree in the last two
    cases. A process the program left holding the pipes after the deadline is not waited for.
    """
    buffers = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    sel = selectors.DefaultSelector()
    for pipe in buffers:
        sel.register(pipe, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    timed_out = capped = killed = False
    while sel.get_map():
        left = deadline - time.monotonic()
        if left <= 0:
            if killed:
                break  # something outlived the kill and holds the pipes: stop reading
            timed_out = not capped
            _kill(proc)
            killed, deadline = True, time.monotonic() + 2.0
            continue
        for key, _ in sel.select(left):
            chunk = os.read(key.fd, 65536)
            buf = buffers[key.fileobj]
            if not chunk:
                sel.unregister(key.fileobj)
            elif len(buf) + len(chunk) > cap:
                buf += chunk[: cap - len(buf)]
                if not killed:
                    capped, killed = True, True
                    _kill(proc)
                    deadline = time.monotonic() + 2.0
            else:
                buf += chunk
    sel.close()
    for pipe in buffers:
        pipe.close()
    _kill(proc)  # whatever the program left in its session (the strong backends: its whole PID namespace)
    proc.wait()
    return bytes(buffers[proc.stdout]), bytes(buffers[proc.stderr]), timed_out, capped


def _kill(proc: subprocess.Popen) -> None:
    for kill in (lambda: os.killpg(proc.pid, signal.SIGKILL), proc.kill):
        try:
            kill()
        except (ProcessLookupError, PermissionError):
            pass
