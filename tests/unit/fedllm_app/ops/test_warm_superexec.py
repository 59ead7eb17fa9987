"""The warm SuperExec's inline mode: a task that Flower ends from inside must not end the SuperExec.

Flower's HTTP client answers a 401 from the SuperNode (it dropped the task's token, e.g. after 60 s without
the task's heartbeat) with SIGINT to its own process, whose handler starts a force-exit timer. Inline, that
process is the SuperExec: before the fix it died about 5 s later, and every later task on that SuperNode
waited until the round timeout (a likely cause of the inline-mode hang seen once after a kill-and-resume).
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[4]

SUPEREXEC = textwrap.dedent(
    """
    import http.server, threading, time
    from flwr.supercore.constant import FORCE_EXIT_TIMEOUT_SECONDS, TaskType
    from flwr.supercore.superexec.executor.types import ExecutionSpec
    from fedllm_app.ops.warm_superexec import _run_inline

    class Unauthorized(http.server.BaseHTTPRequestHandler):  # a SuperNode that no longer knows the task's token
        def do_POST(self):
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Unauthorized)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    spec = ExecutionSpec(
        task_type=TaskType.CLIENT_APP, runtime_api_address=f"127.0.0.1:{server.server_address[1]}", token="t",
        insecure=True, root_certificates_path=None, runtime_dependency_install=False, parent_pid=None,
        suppress_output=True, task_id=1,
    )
    for task in (1, 2):
        _run_inline(spec)
        print(f"task {task} done", flush=True)
    time.sleep(FORCE_EXIT_TIMEOUT_SECONDS + 2)
    print("superexec still serving", flush=True)
    """
)


@pytest.mark.slow
def test_an_inline_task_refused_by_its_supernode_ends_alone_and_the_superexec_serves_the_next():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", SUPEREXEC], capture_output=True, text=True, timeout=120, env=env)
    assert done.stdout.splitlines() == ["task 1 done", "task 2 done", "superexec still serving"], (
        done.stdout + done.stderr[-2000:]
    )
    assert done.returncode == 0
