import socket
import threading
import time
from pathlib import Path

import pytest

from evaluation.sandbox import run_program


def test_a_passing_program_and_a_failing_one():
    ok = run_program("import collections, math, re\nprint(sum(range(4)))\n")
    assert ok.passed and ok.stdout.strip() == "6" and not ok.timed_out
    bad = run_program("assert 1 + 1 == 3\n")
    assert not bad.passed and "AssertionError" in bad.stderr


def test_an_infinite_loop_is_killed_at_the_time_limit():
    start = time.perf_counter()
    r = run_program("while True:\n    pass\n", timeout=1.5)
    assert r.timed_out and not r.passed
    assert time.perf_counter() - start < 10


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in state  # a zombie waiting to be reaped is dead


def test_fork_is_refused_and_a_forked_child_dies_with_the_group():
    r = run_program("import os, time\nos.fork()\ntime.sleep(60)\n", timeout=1.0)
    assert not r.passed and "os.fork is not allowed" in r.stderr
    # Without the audit hook fork works, but the child is in the sandbox's session and is killed with it.
    code = "import os, time\npid = os.fork()\nif pid:\n    print(pid, flush=True)\ntime.sleep(60)\n"
    r = run_program(code, timeout=1.0, audit_hook=False)
    assert r.timed_out
    child = int(r.stdout.split()[0])
    deadline = time.time() + 5
    while _alive(child) and time.time() < deadline:
        time.sleep(0.05)
    assert not _alive(child)


@pytest.mark.parametrize(("landlock", "audit_hook"), [(True, True), (True, False), (False, True)])
def test_cannot_write_outside_its_temp_dir(tmp_path, landlock, audit_hook):
    target = tmp_path / "pwned.txt"
    victim = tmp_path / "keep.txt"
    victim.write_text("user data")
    code = (
        "import os\n"
        "errors = []\n"
        f"for action in (lambda: open({str(target)!r}, 'w').write('x'),\n"
        f"               lambda: os.remove({str(victim)!r}),\n"
        f"               lambda: os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)):\n"
        "    try:\n"
        "        action()\n"
        "    except PermissionError as err:\n"
        "        errors.append(err)\n"
        "open('inside.txt', 'w').write('fine')\n"
        "assert len(errors) == 3, errors\n"
    )
    r = run_program(code, landlock=landlock, audit_hook=audit_hook)
    if landlock and not audit_hook and r.landlock_abi == 0:
        pytest.skip("this kernel offers no Landlock")
    assert r.passed, r.stderr
    assert not target.exists() and victim.read_text() == "user data"


def test_cannot_read_user_files_or_see_the_environment(tmp_path, monkeypatch):
    secret = tmp_path / "secret.txt"
    secret.write_text("token")
    monkeypatch.setenv("FEDLLM_TEST_SECRET", "hunter2")
    r = run_program(
        "import os\n"
        "assert 'FEDLLM_TEST_SECRET' not in os.environ\n"
        "assert os.getcwd() == os.environ['HOME']\n"
        f"open({str(secret)!r}).read()\n"
    )
    if r.landlock_abi == 0:
        pytest.skip("this kernel offers no Landlock")
    assert not r.passed and "PermissionError" in r.stderr and "AssertionError" not in r.stderr


def test_no_network_and_no_subprocess():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    accepted = []
    threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True).start()
    try:
        r = run_program(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n")
        assert not r.passed and "PermissionError" in r.stderr
        r = run_program("import subprocess\nsubprocess.run(['true'])\n")
        assert not r.passed and "subprocess.Popen is not allowed" in r.stderr
        time.sleep(0.2)
        assert not accepted
    finally:
        server.close()


def test_network_is_refused_by_the_kernel_without_the_audit_hook():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    try:
        port = server.getsockname()[1]
        r = run_program(
            f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n", audit_hook=False
        )
        if r.landlock_abi < 4:
            pytest.skip("Landlock TCP rules need ABI 4")
        assert not r.passed and "PermissionError" in r.stderr
    finally:
        server.close()
