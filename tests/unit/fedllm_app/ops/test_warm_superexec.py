"""The warm SuperExec's inline mode: a task that Flower ends from inside, fails or hangs ends alone, is reported with
its task and run id, and the SuperExec serves the next.

Flower's HTTP client answers a 401 from the SuperNode (it dropped the task's token, e.g. after 60 s without
the task's heartbeat) with SIGINT to its own process, whose handler starts a force-exit timer. Inline, that
process is the SuperExec: before the fix it died about 5 s later, and every later task on that SuperNode
waited for ever (the inline-mode hang seen once after a kill-and-resume; the kill-and-resume deployment test,
tests/e2e/test_deployment.py, meets it for real). Each fake SuperNode below is a small HTTP server speaking
Flower's Runtime API.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[4]

SPEC = textwrap.dedent(
    """
    import http.server, threading, time
    from flwr.supercore.constant import FORCE_EXIT_TIMEOUT_SECONDS, TaskType
    from flwr.supercore.superexec.executor.types import ExecutionSpec
    from fedllm_app.ops.warm_superexec import _run_inline

    def serve(handler):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return ExecutionSpec(
            task_type=TaskType.CLIENT_APP, runtime_api_address=f"127.0.0.1:{server.server_address[1]}", token="t",
            insecure=True, root_certificates_path=None, runtime_dependency_install=False, parent_pid=None,
            suppress_output=True, task_id=1,
        )

    def reply(handler, code, body=b""):
        handler.send_response(code)
        handler.send_header("Content-Type", "application/x-protobuf")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)
    """
)

REFUSED = SPEC + textwrap.dedent(
    """
    class Unauthorized(http.server.BaseHTTPRequestHandler):  # a SuperNode that no longer knows the task's token
        def do_POST(self):
            reply(self, 401, b"{}")

        def log_message(self, *args):
            pass

    spec = serve(Unauthorized)
    for task in (1, 2):
        _run_inline(spec)
        print(f"task {task} done", flush=True)
    time.sleep(FORCE_EXIT_TIMEOUT_SECONDS + 2)
    print("superexec still serving", flush=True)
    """
)

HANGING = SPEC + textwrap.dedent(
    """
    from flwr.proto.run_pb2 import Run
    from flwr.proto.runtime_pb2 import PullTaskInputResponse, SendTaskHeartbeatResponse

    class Hanging(http.server.BaseHTTPRequestHandler):  # gives the task its run, then never its message
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.path.endswith("/pull-task-input"):
                reply(self, 200, PullTaskInputResponse(run=Run(run_id=7), task_id=1).SerializeToString())
            elif self.path.endswith("/send-task-heartbeat"):
                reply(self, 200, SendTaskHeartbeatResponse(success=True).SerializeToString())
            elif self.path.endswith("/pull-messages"):
                time.sleep(60)
            else:
                reply(self, 200)

        def log_message(self, *args):
            pass

    spec = serve(Hanging)
    for task, timeouts in ((1, (1.0, 0.0)), (2, (0.0, 1.0))):  # (--task-timeout, --input-timeout)
        start = time.monotonic()
        code = _run_inline(spec, *timeouts)
        late = time.monotonic() - start > 20  # the fake SuperNode would have answered after 60 s
        print(f"task {task} ended with {code}" + (" late" if late else ""), flush=True)
    print("superexec still serving", flush=True)
    """
)

LOCKED = SPEC + textwrap.dedent(
    """
    import signal
    import flwr.supernode.runtime.run_clientapp as runtime
    from flwr.supercore.exit import register_signal_handlers
    from flwr.supercore.telemetry import EventType

    lock = threading.Lock()  # as the HTTP client's connection pool holds its lock while a request unwinds

    def run_clientapp(**kwargs):  # Flower's registration of its exit handler, then a SIGINT inside a lock
        def on_exit():
            with lock:
                print("exit handler ran", flush=True)

        register_signal_handlers(
            event_type=EventType.FLWR_CLIENTAPP_RUN_LEAVE, exit_message="Task stopped.", exit_handlers=[on_exit]
        )
        with lock:
            signal.raise_signal(signal.SIGINT)  # a 401's SIGINT landing in the frame that holds the lock
            time.sleep(1)

    runtime.run_clientapp = run_clientapp
    spec = serve(http.server.BaseHTTPRequestHandler)
    print(f"task ended with {_run_inline(spec, 0.0, 0.0)}", flush=True)
    print("superexec still serving", flush=True)
    """
)


def run_script(script, timeout=120):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.slow
def test_an_inline_task_refused_by_its_supernode_ends_alone_is_reported_and_the_superexec_serves_the_next():
    done = run_script(REFUSED)
    assert done.stdout.splitlines() == ["task 1 done", "task 2 done", "superexec still serving"], (
        done.stdout + done.stderr[-2000:]
    )
    assert done.returncode == 0
    assert "task 1 of run ? ended with exit code 1 (GRACEFUL_EXIT_SIGINT)" in done.stderr  # before its input
    assert "Flower ended it from inside (SIGINT" in done.stderr


@pytest.mark.slow
def test_an_inline_task_that_hangs_or_never_gets_its_message_is_ended_at_its_timeout_and_reported_with_its_run_id():
    done = run_script(HANGING)
    assert done.stdout.splitlines() == [
        "task 1 ended with 800",  # Flower's TASK_PROC_EXCEPTION: the ClientApp's runtime saw it fail
        "task 2 ended with 800",
        "superexec still serving",
    ], done.stdout + done.stderr[-3000:]
    assert "task 1 of run 7 ran past --task-timeout=1 s: ending it with an error" in done.stderr
    assert "task 1 of run 7 ended with exit code 800 (TASK_PROC_EXCEPTION)" in done.stderr
    assert "task 1 of run 7 ran past --input-timeout=1 s without its message (a stopped run's task?)" in done.stderr


@pytest.mark.slow
def test_flowers_exit_handlers_run_after_the_task_unwinds_so_a_signal_inside_a_lock_cannot_deadlock_the_superexec():
    """Before the fix the SIGINT handler ran the exit handlers in the interrupted frame: this script hung."""
    try:
        done = run_script(LOCKED, timeout=60)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"the SuperExec deadlocked in the task's exit handlers:\n{err.stdout}")
    assert done.stdout.splitlines() == ["exit handler ran", "task ended with 1", "superexec still serving"], (
        done.stdout + done.stderr[-2000:]
    )
    assert "task 1 of run ? ended with exit code 1 (GRACEFUL_EXIT_SIGINT)" in done.stderr
