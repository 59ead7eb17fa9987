"""The code sandbox: verdicts, limits, and every measured escape, each shown blocked by each strong backend.

The ``unshare`` backend needs only Python and Linux, so its attack tests run everywhere CI runs (they are
skipped on a developer machine that cannot create namespaces, never when ``CI`` is set); the ``bwrap`` ones
run where bubblewrap is installed.
"""

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

import pytest

from evaluation.sandbox import SandboxUnavailable, backend_problem, resolve_backend, run_program


def _backend(name: str, missing: str):
    reason = backend_problem(name)
    skip = bool(reason) and not (name == "unshare" and os.environ.get("CI"))
    return pytest.param(name, marks=pytest.mark.skipif(skip, reason=f"{name}: {reason}; {missing}"))


STRONG = [
    _backend("bwrap", "install bubblewrap (apt-get install bubblewrap) to test it"),
    _backend("unshare", "this machine allows no Linux namespaces"),
]


@pytest.fixture
def usr1():
    """SIGUSR1s this (the parent) process receives during the test."""
    got: list[int] = []
    old = signal.signal(signal.SIGUSR1, lambda signum, frame: got.append(signum))
    yield got
    signal.signal(signal.SIGUSR1, old)


@pytest.fixture
def listener():
    """A TCP, a UDP and a Unix socket of this process, and what reached them."""
    tcp, udp, unix = socket.socket(), socket.socket(type=socket.SOCK_DGRAM), socket.socket(socket.AF_UNIX)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(1)
    udp.bind(("127.0.0.1", 0))
    path = f"/tmp/fedllm-test-{secrets.token_hex(4)}.sock"
    unix.bind(path)
    unix.listen(1)
    for s in (tcp, udp, unix):
        s.settimeout(0.1)  # everything the program sent has long arrived when this is asked
    yield {"tcp": tcp.getsockname()[1], "udp": udp.getsockname()[1], "unix": path, "sockets": (tcp, udp, unix)}
    for s in (tcp, udp, unix):
        s.close()
    os.unlink(path)


def _reached(sockets) -> list[str]:
    tcp, udp, unix = sockets
    got = []
    for name, receive in (("tcp", tcp.accept), ("udp", lambda: udp.recv(10)), ("unix", unix.accept)):
        try:
            receive()
            got.append(name)
        except OSError:
            pass
    return got


_ATTEMPT = (
    "errors, done = [], []\n"
    "def attempt(name, action):\n"
    "    try:\n"
    "        action()\n"
    "        done.append(name)\n"
    "    except Exception as err:\n"
    "        errors.append((name, repr(err)))\n"
)


# ---------------------------------------------------------------- verdicts


@pytest.mark.parametrize("backend", STRONG)
def test_an_answer_passes_only_when_its_tests_ran_to_the_end(backend):
    ok = run_program("import collections, math\ndef f(x):\n    return x + 1\n", "assert f(1) == 2\n", backend=backend)
    assert ok.passed and not ok.timed_out and ok.backend == backend
    bad = run_program("def f(x):\n    return x\n", "assert f(1) == 2\n", backend=backend)
    assert not bad.passed and "AssertionError" in bad.stderr


@pytest.mark.parametrize("backend", STRONG)
def test_a_caller_with_umask_077_still_gives_the_program_its_interpreter_and_stdlib(backend):
    # The ServerApp and ClientApp set umask 077 (private run files); the sandbox's own mount points must not
    # inherit it, or the program's uid cannot reach the interpreter under them.
    old = os.umask(0o077)
    try:
        r = run_program(
            "import collections, math\ndef f(x):\n    return x + 1\n", "assert f(1) == 2\n", backend=backend
        )
    finally:
        os.umask(old)
    assert r.passed, r.stderr[-500:]


@pytest.mark.parametrize("backend", STRONG)
def test_a_syntax_error_fails_with_its_traceback(backend):
    r = run_program("def f(x) return x\n", "assert f(1) == 1\n", backend=backend)
    assert not r.passed and "SyntaxError" in r.stderr


@pytest.mark.parametrize(
    "exit_call",
    ["import sys\nsys.exit(0)", "raise SystemExit", "import os\nos._exit(0)", "import unittest\nunittest.main()"],
)
def test_a_wrong_answer_that_exits_with_status_0_fails(exit_call):
    r = run_program(f"def f(x):\n    return x\n{exit_call}\n", "assert f(1) == 2\n", allow_weak=True)
    assert not r.passed


def test_tests_that_exit_early_fail():
    tests = "import sys\nsys.exit(0)\nassert f(1) == 2\n"
    assert not run_program("def f(x):\n    return x\n", tests, allow_weak=True).passed


def test_an_answer_that_replaces_exec_or_exit_does_not_skip_the_tests():
    answer = (
        "import builtins, os, sys, traceback\n"
        "builtins.exec = lambda *args, **kwargs: None\n"
        "os._exit = sys.exit = lambda *args: None\n"
        "traceback.print_exc = lambda *args: None\n"
        "def f(x):\n    return x\n"
    )
    assert not run_program(answer, "assert f(1) == 2\n", allow_weak=True).passed


def test_the_answer_is_not_main_and_reads_an_empty_stdin():
    answer = (
        "def f(x):\n    return x + 1\n"
        "if __name__ == '__main__':\n    print(f(int(input())))\n"
        "import sys\nassert sys.stdin.read() == ''\n"
    )
    r = run_program(answer, "assert f(1) == 2\n", allow_weak=True)
    assert r.passed, r.stderr


def test_nothing_the_program_writes_is_trusted(tmp_path):
    """The old sandbox read ``.sandbox.json`` back: a program could fake the isolation level or crash it."""
    answer = (
        "import os\n"
        "for name in ('.sandbox.json', '.spec.json', 'result.json'):\n"
        "    open(name, 'w').write('{not json')\n"
        "open('fake.json', 'w').write('{\"landlock_abi\": 7, \"passed\": true}')\n"
        "print('PASSED')\n"
    )
    r = run_program(answer, "assert False\n", allow_weak=True)
    assert not r.passed and r.backend == resolve_backend(allow_weak=True) and not r.timed_out
    assert "AssertionError" in r.stderr


def test_the_sentinel_is_not_in_the_program_argv_or_environment():
    r = run_program("import os, sys\nprint(sys.argv, dict(os.environ), os.listdir('.'))\n", allow_weak=True)
    assert r.passed
    assert len(r.stdout.strip().splitlines()) == 1  # the sentinel line was there and has been removed


# ---------------------------------------------------------------- limits


@pytest.mark.parametrize("backend", STRONG)
def test_an_infinite_loop_is_killed_at_the_deadline(backend):
    start = time.perf_counter()
    r = run_program("while True:\n    pass\n", timeout=1.0, backend=backend)
    assert r.timed_out and not r.passed
    assert time.perf_counter() - start < 4


def _alive(marker: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if marker in (proc / "cmdline").read_bytes().decode() and "State:\tZ" not in (proc / "status").read_text():
                found.append(int(proc.name))
        except (OSError, ValueError):
            pass
    return found


@pytest.mark.parametrize("backend", STRONG)
@pytest.mark.parametrize("main_waits", [False, True])
def test_a_grandchild_in_its_own_session_neither_outlives_the_run_nor_holds_it(backend, main_waits):
    """Measured before: a 2 s timeout took 6 s (or forever) while a setsid() grandchild held the pipes."""
    marker = f"{secrets.randbelow(10**6)}.5"
    answer = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        f"        os.execv('/bin/sleep', ['sleep', '{marker}'])\n"
        "    os._exit(0)\n"
        "time.sleep(0.3)\n" + ("time.sleep(60)\n" if main_waits else "")
    )
    start = time.perf_counter()
    r = run_program(answer, timeout=1.0 if main_waits else 5.0, backend=backend, audit_hook=False)
    assert time.perf_counter() - start < 3.0  # the old sandbox: the timeout + the grandchild's whole life
    assert r.timed_out == main_waits and r.passed != main_waits
    time.sleep(0.2)
    assert _alive(marker) == []


@pytest.mark.parametrize("backend", STRONG)
def test_300_mb_of_output_is_cut_at_the_cap_without_filling_the_parent_memory(backend):
    tracemalloc.start()
    try:
        r = run_program(
            "import sys\nchunk = 'x' * 2**20\nfor _ in range(300):\n    sys.stdout.write(chunk)\n", backend=backend
        )
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert r.output_capped and not r.passed
    assert peak < 16 * 2**20


# ---------------------------------------------------------------- the measured attacks


@pytest.mark.parametrize("backend", STRONG)
def test_never_runs_with_root_powers(backend):
    marker = f"{secrets.randbelow(10**6)}.25"
    seen: dict[str, str] = {}

    def watch():
        deadline = time.time() + 8
        while time.time() < deadline and not seen:
            for pid in _alive(marker):
                status = Path(f"/proc/{pid}/status").read_text()
                seen.update(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
                seen["userns"] = os.readlink(f"/proc/{pid}/ns/user")
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    answer = _ATTEMPT + (
        "import os\n"
        "assert os.getuid() != 0 and os.geteuid() != 0, os.getuid()\n"
        "attempt('setuid 0', lambda: os.setuid(0))\n"
        "attempt('chroot', lambda: os.chroot('.'))\n"
        "assert not done, done\n"
        f"os.execv('/bin/sleep', ['sleep', '{marker}'])\n"
    )
    r = run_program(answer, timeout=1.5, backend=backend, audit_hook=False)
    watcher.join()
    assert r.timed_out and "AssertionError" not in r.stderr, r.stderr
    assert int(seen["CapEff"], 16) == 0 and int(seen["CapPrm"], 16) == 0
    real_uid = seen["Uid"].split()[0]
    assert real_uid != "0" or seen["userns"] != os.readlink("/proc/self/ns/user")


@pytest.mark.parametrize("backend", STRONG)
def test_metadata_outside_cannot_change_through_dir_fd_or_xattr(backend, tmp_path):
    """Measured before: chmod/chown/utime with dir_fd and setxattr set setuid and file capabilities outside."""
    victim = tmp_path / "tool"
    victim.write_text("#!/bin/sh\n")
    victim.chmod(0o755)
    before = victim.stat()
    answer = _ATTEMPT + (
        "import os, sys\n"
        "exe = os.path.realpath(sys.executable)\n"
        "st = os.stat(exe)\n"
        f"targets = [({str(tmp_path)!r}, 'tool', 0o4755, 0, (0, 0))]  # setuid root, as measured\n"
        "same = (st.st_mode, st.st_uid, (st.st_atime, st.st_mtime))  # harmless if it went through\n"
        "targets.append((os.path.dirname(exe), os.path.basename(exe), *same))\n"
        "for folder, name, mode, uid, times in targets:\n"
        "    try:\n"
        "        fd = os.open(folder, os.O_RDONLY)\n"
        "    except OSError as err:\n"
        "        errors.append(('open', repr(err)))\n"
        "        continue\n"
        "    attempt('chmod', lambda: os.chmod(name, mode, dir_fd=fd))\n"
        "    attempt('chown', lambda: os.chown(name, uid, st.st_gid, dir_fd=fd))\n"
        "    attempt('utime', lambda: os.utime(name, times, dir_fd=fd))\n"
        "    attempt('setxattr', lambda: os.setxattr(os.path.join(folder, name), 'user.fedllm', b'x'))\n"
        "    attempt('setxattr fd', lambda: os.setxattr(f'/proc/self/fd/{fd}', 'user.fedllm', b'x'))\n"
        "assert not done, done\n"
    )
    for hook in (True, False):
        r = run_program(answer, backend=backend, audit_hook=hook)
        assert r.passed, r.stderr
    after = victim.stat()
    assert (after.st_mode, after.st_uid, after.st_mtime) == (before.st_mode, before.st_uid, before.st_mtime)
    assert os.listxattr(victim) == [] and "user.fedllm" not in os.listxattr(os.path.realpath(sys.executable))


@pytest.mark.parametrize("backend", STRONG)
def test_cannot_write_outside_its_directory(backend, tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("user data")
    targets = [str(tmp_path / "pwned.txt"), f"/tmp/fedllm-pwned-{secrets.token_hex(4)}", "/usr/fedllm-pwned"]
    answer = _ATTEMPT + (
        "import os\n"
        f"for path in {targets!r}:\n"
        "    attempt(path, lambda: open(path, 'w').write('x'))\n"
        "    attempt(path, lambda: os.open(path, os.O_WRONLY | os.O_CREAT))\n"
        f"attempt('remove', lambda: os.remove({str(victim)!r}))\n"
        "attempt('mkdir', lambda: os.mkdir('/fedllm-pwned'))\n"
        "open('inside.txt', 'w').write('fine')\n"
        "assert not done, done\n"
    )
    r = run_program(answer, backend=backend, audit_hook=False)
    assert r.passed, r.stderr
    assert victim.read_text() == "user data" and not any(os.path.exists(t) for t in targets)


@pytest.mark.parametrize("backend", STRONG)
def test_its_directory_is_a_small_tmpfs_of_its_own(backend):
    answer = (
        "import os\n"
        "assert os.getcwd() == os.environ['HOME'] == '/sandbox' and os.listdir('.') == []\n"
        "open('a', 'wb').write(b'x' * 2**20)\n"
        "try:\n"
        "    open('b', 'wb').write(b'x' * 2**20)\n"
        "except OSError as err:\n"
        "    print('full:', err.strerror)\n"
    )
    r = run_program(answer, disk_mb=1, backend=backend)
    assert r.passed and "full: No space left on device" in r.stdout, r.stderr


@pytest.mark.parametrize("backend", STRONG)
def test_cannot_read_secrets_of_other_processes_or_user_files(backend, tmp_path):
    """Measured before: the program read ``/proc/<ppid>/environ``, where a judge API key lives."""
    secret = f"sk-{secrets.token_hex(8)}"
    (tmp_path / "key.txt").write_text(secret)
    holder = subprocess.Popen(["sleep", "30"], env={"JUDGE_KEY": secret})
    try:
        deadline = time.time() + 5  # readable from outside, once the holder has exec'd
        while secret.encode() not in Path(f"/proc/{holder.pid}/environ").read_bytes() and time.time() < deadline:
            time.sleep(0.02)
        assert secret.encode() in Path(f"/proc/{holder.pid}/environ").read_bytes()
        answer = (
            "import glob, os\n"
            f"paths = ['/proc/{holder.pid}/environ', '/proc/{os.getpid()}/environ', {str(tmp_path / 'key.txt')!r}]\n"
            "paths += [f'/proc/{os.getppid()}/environ'] + glob.glob('/proc/*/environ')\n"
            "for path in paths:\n"
            "    try:\n"
            "        print(open(path, 'rb').read())\n"
            "    except OSError as err:\n"
            "        print(path, err)\n"
            "print(dict(os.environ))\n"
        )
        r = run_program(answer, backend=backend, audit_hook=False)
    finally:
        holder.kill()
        holder.wait()
    assert r.passed, r.stderr
    own = Path("/proc/self/environ").read_bytes().split(b"\0")[0].decode()  # this process's first variable
    assert secret not in r.stdout + r.stderr and own not in r.stdout


@pytest.mark.parametrize("backend", STRONG)
def test_no_network_and_no_socket_reaches_out(backend, listener):
    answer = _ATTEMPT + (
        "import socket\n"
        f"attempt('tcp', lambda: socket.create_connection(('127.0.0.1', {listener['tcp']}), timeout=1))\n"
        "udp = socket.socket(type=socket.SOCK_DGRAM)\n"
        f"attempt('udp', lambda: udp.sendto(b'x', ('127.0.0.1', {listener['udp']})))\n"
        f"attempt('unix', lambda: socket.socket(socket.AF_UNIX).connect({listener['unix']!r}))\n"
        "attempt('dns', lambda: socket.create_connection(('1.1.1.1', 53), timeout=1))\n"
        "assert 'tcp' not in done and 'unix' not in done and 'dns' not in done, done\n"
    )
    r = run_program(answer, backend=backend, audit_hook=False)
    assert r.passed, r.stderr
    assert _reached(listener["sockets"]) == []


@pytest.mark.parametrize("backend", STRONG)
def test_switching_the_audit_hook_off_from_main_reaches_nothing(backend, listener):
    """Measured before: ``__main__._BLOCKED_EVENTS = ()`` turned the audit hook off."""
    answer = (
        "import __main__, sys\n"
        "__main__._BLOCKED_EVENTS = ()\n"
        "import socket\n"
        f"socket.create_connection(('127.0.0.1', {listener['tcp']}), timeout=1)\n"
    )
    r = run_program(answer, backend=backend)
    assert not r.passed and "socket" in r.stderr
    assert _reached(listener["sockets"]) == []


_FORK_EXEC = (
    "import _posixsubprocess, os\n"
    "def spawn(argv):\n"
    "    args = [[a.encode() for a in argv], [argv[0].encode()], True, (), None, None,\n"
    "            -1, -1, -1, -1, -1, -1, *os.pipe(), False, False, -1, None, None, None, -1, None, False]\n"
    "    args[2] = False  # close_fds\n"
    "    pid = _posixsubprocess.fork_exec(*args)\n"
    "    os.waitpid(pid, 0)\n"
)


@pytest.mark.parametrize("backend", STRONG)
def test_posixsubprocess_fork_exec_escapes_nothing(backend, tmp_path, usr1):
    """Measured before: ``_posixsubprocess.fork_exec`` needed no audit-hook bypass at all."""
    outside = tmp_path / "pwned"
    script = f"echo pwned > {outside}; echo pwned > /tmp/fedllm-fork-exec; kill -USR1 {os.getpid()}; echo ran"
    answer = _FORK_EXEC + f"spawn(['/bin/sh', '-c', {script!r}])\n"
    r = run_program(answer, backend=backend)
    if "TypeError" in r.stderr:
        pytest.skip(f"_posixsubprocess.fork_exec has another signature in Python {sys.version_info[:2]}")
    time.sleep(0.2)
    assert r.passed and "ran" in r.stdout, r.stderr  # the shell did run, inside
    assert not outside.exists() and not os.path.exists("/tmp/fedllm-fork-exec") and usr1 == []


@pytest.mark.parametrize("backend", STRONG)
def test_cannot_signal_the_parent(backend, usr1):
    answer = _ATTEMPT + (
        "import os, signal\n"
        f"attempt('parent', lambda: os.kill({os.getpid()}, signal.SIGUSR1))\n"
        "attempt('ppid', lambda: os.kill(os.getppid(), signal.SIGUSR1) if os.getppid() > 1 else None)\n"
        f"attempt('group', lambda: os.killpg({os.getpgid(0)}, signal.SIGUSR1))\n"
        "attempt('all', lambda: os.kill(-1, signal.SIGUSR1))\n"
    )
    r = run_program(answer, backend=backend, audit_hook=False)
    time.sleep(0.2)
    assert r.returncode is not None and usr1 == []


# ---------------------------------------------------------------- choosing a backend


def test_weak_isolation_is_refused_unless_allowed():
    with pytest.raises(SandboxUnavailable, match="--allow-weak-sandbox"):
        run_program("pass\n", backend="weak")
    r = run_program("print(1 + 1)\n", "assert True\n", backend="weak", allow_weak=True)
    assert r.passed and r.stdout.strip() == "2" and r.backend == "weak"


def test_the_weak_backend_still_refuses_what_its_audit_hook_covers(tmp_path):
    target = tmp_path / "pwned"
    answer = "import __main__\n__main__._BLOCKED_EVENTS = ()\n"
    for attack in (f"open({str(target)!r}, 'w')", "import os\nos.fork()", "import socket\nsocket.socket()"):
        r = run_program(answer + attack + "\n", backend="weak", allow_weak=True)
        assert not r.passed and "sandbox:" in r.stderr
    assert not target.exists()


def test_an_unknown_backend_is_named_in_the_error():
    with pytest.raises(Exception, match="'docker' is unknown"):
        resolve_backend("docker")


def test_auto_prefers_bubblewrap_then_namespaces():
    expected = "bwrap" if not backend_problem("bwrap") else "unshare" if not backend_problem("unshare") else None
    if expected is None:
        with pytest.raises(SandboxUnavailable, match="apt-get install bubblewrap"):
            resolve_backend()
    else:
        assert resolve_backend() == expected


@pytest.mark.skipif(
    os.geteuid() != 0 or not os.access("/usr/bin/python3", os.X_OK),
    reason="needs root (to start an ordinary user) and a system Python that user can run",
)
def test_the_unshare_backend_started_by_an_ordinary_user_isolates_through_a_user_namespace():
    """The ``isolate`` stage as a non-root user would start it: uid 65534 runs the system Python."""
    from evaluation.sandbox import CHILD

    source = CHILD.read_text()
    with tempfile.TemporaryDirectory(prefix="fedllm-test-") as tmp:  # pytest's tmp_path is root's alone
        tmp_path = Path(tmp)
        tmp_path.chmod(0o755)
        (tmp_path / "root").mkdir()
        _isolate_as_nobody(source, tmp_path)


def _isolate_as_nobody(source: str, tmp_path: Path) -> None:
    python = os.path.realpath("/usr/bin/python3")
    ro = [p for p in ("/usr", "/bin", "/lib", "/lib64") if os.path.lexists(p)]
    cfg = {"newroot": str(tmp_path / "root"), "ro": ro, "size": str(2**20), "python": python}
    cfg |= {"uid": 65534, "gid": 65534, "source": source}
    answer = _ATTEMPT + (
        "import os, socket\n"
        f"attempt('write', lambda: open({str(tmp_path / 'pwned')!r}, 'w'))\n"
        "attempt('net', lambda: socket.create_connection(('1.1.1.1', 53), timeout=1))\n"
        "attempt('root', lambda: os.setuid(0))\n"
        "open('inside', 'w').write('fine')\n"
        "assert not done and os.getuid() == 65534, (done, os.getuid())\n"
    )
    job = {"answer": answer, "tests": "", "sentinel": "SENTINEL-1234", "audit_hook": False, "landlock": False}
    job |= {"cpu_seconds": 5, "memory_bytes": 2**30, "file_bytes": 2**20, "processes": 256}
    r = subprocess.run(
        [python, "-I", "-S", "-c", source, "isolate", json.dumps(cfg)],
        input=json.dumps(job).encode(),
        capture_output=True,
        user=65534,
        group=65534,
        extra_groups=[],
        cwd=tmp_path,
        env={},
        timeout=30,
    )
    if r.returncode != 0 and b"sandbox: unshare:" in r.stderr:
        pytest.skip(f"this machine allows no user namespace to an ordinary user: {r.stderr.decode()[-200:]}")
    assert r.returncode == 0 and b"SENTINEL-1234" in r.stdout, r.stderr.decode()
    assert not (tmp_path / "pwned").exists()
