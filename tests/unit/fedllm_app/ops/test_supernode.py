"""fedllm-supernode: Flower's SuperNode with its two fixed waits shortened, every other wait Flower's own."""

import subprocess
import sys
import time

import flwr.supernode.start_client_internal as supernode

from fedllm_app.ops.supernode import patch_waits


def test_the_supernode_waits_the_intervals_asked_after_an_empty_pull_and_for_a_reply(monkeypatch):
    monkeypatch.setattr(supernode, "time", supernode.time)  # Flower's module gets its own time back afterwards
    patch_waits(idle_pull=0.01, reply_poll=0.01)
    start = time.monotonic()
    supernode.time.sleep(3)  # Flower's wait after a pull that brought nothing
    supernode.time.sleep(0.5)  # and between two looks for the ClientApp's reply
    assert time.monotonic() - start < 1
    start = time.monotonic()
    supernode.time.sleep(0.2)  # any other wait is left as Flower wrote it
    assert time.monotonic() - start >= 0.2
    assert abs(supernode.time.time() - time.time()) < 1


def test_an_interval_that_is_not_a_number_of_seconds_is_refused_by_name():
    code = "import sys; from fedllm_app.ops.supernode import main; main(sys.argv[1:])"
    done = subprocess.run(
        [sys.executable, "-c", code, "--idle-pull-interval", "0"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert "'0' is not a number of seconds between 0.01 and 60" in done.stderr
