r"""A SuperExec for a SuperNode that keeps the ClientApp warm across rounds.

With Flower 1.42 a SuperNode runs every message in a fresh ``flwr-clientapp``
process, which imports torch, transformers, peft and TRL, loads the base model and
tokenises the client's data again, every round. This entry point is Flower's
``flower-superexec`` with another executor: it imports those libraries and loads the
base model once, then runs each ClientApp task either

- ``--mode inline`` (default): inside this process, one task after the other, so the
  ClientApp's caches (base model, tokenised partition, trainer) persist across rounds as
  they do in simulation, on the CPU and on a GPU alike. A task that Flower ends from
  inside (e.g. on a 401 from its SuperNode) ends alone and the next is served (see
  :func:`_run_inline`; before that fix such a task force-exited this whole process 5 s
  later, and the SuperNode then waited for ever: the likely cause of the hang
  once seen after a kill-and-resume). A task that crashes the interpreter (segfault, out of memory)
  takes this SuperExec down with it; or
- ``--mode fork``: in an ``os.fork()`` of this process (imports and model shared
  copy-on-write; the tokenised data is rebuilt each round). A crashing task cannot take
  the SuperExec down. On a CUDA machine the model is not preloaded (a forked child
  cannot use CUDA initialised by its parent).

Every task's end is logged with its task and run id (an ERROR line when it failed), a
task still running is reported every :data:`REPORT_EVERY` seconds, one running past
``--task-timeout`` is ended with an error reply to the server, and one still without its
message after ``--input-timeout`` (a stopped run's task that Flower left behind, which
would block an inline SuperExec for up to 2 h) is ended too (see :func:`_watchdog`).

Run it beside a SuperNode started with ``--isolation process``::

    flower-supernode --insecure --superlink 127.0.0.1:9092 --isolation process --port 9094 \
        --node-config "partition-id=0 num-partitions=2"
    python -m fedllm_app.ops.warm_superexec --insecure --runtime-api-address 127.0.0.1:9094 \
        --preload "model=tiny seed=0"

``--preload`` takes the run's model overrides (the base model cached is the one for
``model`` and ``seed``; a run with another model loads its own, once). The ClientApp
code used is the fedllm installed beside this process, not the copy in the run's app
bundle: install the operator's version. All other arguments are ``flower-superexec``'s.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from flwr.supercore.constant import TaskType
from flwr.supercore.exit import ExitCode, flwr_exit
from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
from flwr.supercore.superexec.executor.types import ExecutionSpec, LaunchResult

from fedllm_app.comm.object_pulls import shorten_object_pull_backoff
from fedllm_app.console import setup_console

log = logging.getLogger("fedllm")

MODES = ("inline", "fork")
TASK_TIMEOUT = 3600.0  # seconds; --task-timeout's default: well above a round of a 7B model on one GPU
INPUT_TIMEOUT = 300.0  # seconds; --input-timeout's default: half the server's 600 s wait for a node's first
# answer, so a stopped run's ghost task cannot make a resumed run leave this node out; a message's contents
# reach the task well before (300 MB at 1 MB/s)
REPORT_EVERY = 300.0  # seconds between two "still running" lines of one task
KILL_GRACE = 60.0  # fork: seconds after the timeout before a child that ignored it is killed


class TaskTimeout(Exception):
    """A ClientApp task ran past ``--task-timeout``; raised inside the task, which then replies with an error."""


class ForkExecutor(SubprocessExecutor):
    """Flower's subprocess executor, but ClientApp tasks run in a fork of this process."""

    def __init__(self, task_timeout: float = TASK_TIMEOUT, input_timeout: float = INPUT_TIMEOUT) -> None:
        self.task_timeout, self.input_timeout = task_timeout, input_timeout
        self.children: dict[int, tuple[int, float]] = {}  # pid -> (task id, start)

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        if spec.task_type != TaskType.CLIENT_APP:
            return super().launch(spec)
        pid = os.fork()
        if pid == 0:  # the child: run the one task, then leave without the parent's exit handlers
            os._exit(_run_task(spec, self.task_timeout, self.input_timeout))
        self.children[pid] = (spec.task_id, time.monotonic())
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Reap finished children; kill one still running ``KILL_GRACE`` s past the task timeout."""
        for pid, (task_id, start) in list(self.children.items()):
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                del self.children[pid]
            elif self.task_timeout and time.monotonic() - start > self.task_timeout + KILL_GRACE:
                log.error("task %d (pid %d) ignored --task-timeout=%g s: killed", task_id, pid, self.task_timeout)
                os.kill(pid, signal.SIGKILL)

    def close(self) -> None:
        for pid in self.children:
            try:
                os.kill(pid, 15)
            except ProcessLookupError:
                pass


class InlineExecutor(SubprocessExecutor):
    """Flower's subprocess executor, but ClientApp tasks run inside this process, one after the other.

    The ClientApp's module-level caches (the base model, the tokenised partition and
    its trainer) then persist across rounds, as in simulation. A task that crashes the
    interpreter (segfault, out of memory) takes this SuperExec down with it.
    """

    def __init__(self, task_timeout: float = TASK_TIMEOUT, input_timeout: float = INPUT_TIMEOUT) -> None:
        self.task_timeout, self.input_timeout = task_timeout, input_timeout

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        if spec.task_type != TaskType.CLIENT_APP:
            return super().launch(spec)
        _run_inline(spec, self.task_timeout, self.input_timeout)
        return LaunchResult.accepted()


_EXITING = threading.Event()  # set while a task's exit handlers run: a signal then must not end them half-way


def _task_exit(code: int, message: str | None = None, *args: object, **kwargs: object) -> None:
    """Flower's ``flwr_exit`` for a task run inline (swapped in by :func:`_run_inline`): SystemExit, no timer.

    Flower's exit handlers (push the task's status, stop its heartbeat, close its HTTP client) run later, in
    :func:`_run_exit_handlers`, once the task's stack has unwound: this is also the SIGINT handler, which lands
    between any two bytecodes, and a frame it interrupts may hold a lock the handlers need. With the handlers run
    here, a 401's SIGINT arriving as the input timeout ended the task deadlocked the SuperExec in the HTTP
    client's close (seen in the kill-and-resume deployment test).
    """
    if code == ExitCode.GRACEFUL_EXIT_SIGINT:
        log.warning("task %s: Flower ended it from inside (SIGINT; on a 401 its SuperNode no longer knows it)", _ids())
    if not _EXITING.is_set():
        raise SystemExit(code)


def _run_exit_handlers() -> None:
    """The task's registered Flower exit handlers, both phases, with signals unable to interrupt them half-way."""
    import flwr.supercore.exit.exit_handler as handlers

    _EXITING.set()
    try:
        handlers.trigger_exit_handlers(run_before_force_exit=True)
        handlers.trigger_exit_handlers(run_before_force_exit=False)
    except BaseException:  # noqa: BLE001 - e.g. a TaskTimeout: the task is over, the SuperExec goes on
        log.exception("task %s: its exit handlers raised", _ids())
    finally:
        _EXITING.clear()


def _swap_exit(old: object, new: object) -> None:
    """Point every loaded module's ``flwr_exit`` that is ``old`` at ``new``."""
    for module in list(sys.modules.values()):
        if getattr(module, "flwr_exit", None) is old:
            module.flwr_exit = new


def _run_inline(spec: ExecutionSpec, task_timeout: float = TASK_TIMEOUT, input_timeout: float = INPUT_TIMEOUT) -> int:
    """One task in this process, with Flower's exit path confined to the task; its exit code.

    Flower ends a task with ``flwr_exit``, which starts a timer that ``os._exit``s the process
    5 s later. It is reached from the task's end, and from the signal handlers the task installs:
    Flower's HTTP client sends SIGINT to its own process when the SuperNode answers 401 (it
    dropped the task's token: after 60 s without the task's heartbeat, e.g. a stalled process,
    or when a heartbeat comes after the task pushed its output). Inline, that process is this
    SuperExec: every module's ``flwr_exit`` (the signal handler's too) is swapped for
    :func:`_task_exit` while the task runs, so such a task ends alone and the SuperExec serves
    the next one (tests/unit/fedllm_app/ops/test_warm_superexec.py, and a real stall in the
    kill-and-resume deployment test, tests/e2e/test_deployment.py).
    """
    import flwr.supercore.exit.exit_handler as handlers

    saved_handlers = list(handlers.registered_exit_handlers)
    handlers.registered_exit_handlers.clear()
    saved_signals = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT)}
    _swap_exit(flwr_exit, _task_exit)
    try:
        return _run_task(spec, task_timeout, input_timeout)
    finally:
        _swap_exit(_task_exit, flwr_exit)  # also in modules the task imported while swapped
        handlers.registered_exit_handlers[:] = saved_handlers
        for sig, handler in saved_signals.items():
            signal.signal(sig, handler)


def _ids() -> str:
    """``<task id> of run <run id>`` for the task running in this process (``run ?`` before it pulled its input)."""
    from flwr.supercore.task_identity import TaskIdentity

    try:
        run = str(TaskIdentity.run_id)
    except RuntimeError:
        run = "?"
    try:
        task = str(TaskIdentity.task_id)
    except RuntimeError:
        task = "?"
    return f"{task} of run {run}"


@contextmanager
def _watchdog(
    task_timeout: float, input_timeout: float = 0.0, received: threading.Event | None = None
) -> Iterator[None]:
    """Report the task running in this (main) thread every :data:`REPORT_EVERY` s; raise :class:`TaskTimeout` in it
    past ``task_timeout``, or past ``input_timeout`` while ``received`` is not set (0: no limit).

    The ClientApp's runtime turns a TaskTimeout after the message arrived into an error reply to the server.
    One before it is the ghost of a stopped run: flwr 1.42's SuperNode creates a task, then pulls the message's
    contents from the SuperLink; when the run stops meanwhile it drops the pull but neither the task nor the
    message, and the task, claimed here, waits for contents that never come (Flower gives up after up to 2 h).
    """
    done, start, main = threading.Event(), time.monotonic(), threading.main_thread().ident
    limits = [("--task-timeout", task_timeout, None), ("--input-timeout", input_timeout, received)]
    limits = [(name, limit, event) for name, limit, event in limits if limit]

    def alarm(signum: int, frame: object) -> None:
        raise TaskTimeout(f"the task ran past {fired[0]}")

    def watch() -> None:
        next_report = REPORT_EVERY
        while not fired:
            due = min([next_report] + [limit for _, limit, _ in limits])
            if done.wait(max(0.0, due - (time.monotonic() - start))):
                return
            elapsed = time.monotonic() - start
            for name, limit, event in limits:
                if elapsed >= limit and (event is None or not event.is_set()):
                    fired.append(f"{name}={limit:g} s")
                    what = " without its message (a stopped run's task?)" if event is not None else ""
                    log.error("task %s ran past %s%s: ending it with an error", _ids(), fired[0], what)
                    signal.pthread_kill(main, signal.SIGALRM)
                    return
            limits[:] = [(n, limit, e) for n, limit, e in limits if elapsed < limit]
            if elapsed >= next_report:
                log.warning("task %s still running after %.0f s", _ids(), elapsed)
                next_report += REPORT_EVERY

    fired: list[str] = []
    previous = signal.signal(signal.SIGALRM, alarm)
    thread = threading.Thread(target=watch, name="fedllm-task-watchdog", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()  # no SIGALRM is sent after this; one still pending must not end the process (default action)
        signal.signal(signal.SIGALRM, signal.SIG_IGN if previous in (signal.SIG_DFL, None) else previous)


@contextmanager
def _input_received() -> Iterator[threading.Event]:
    """An event set once the task has pulled its message from the SuperNode (Flower's ``pull_task_input``)."""
    import flwr.supernode.runtime.run_clientapp as runtime

    received, original = threading.Event(), runtime.pull_task_input

    def pull_task_input(*args: object, **kwargs: object) -> object:
        out = original(*args, **kwargs)
        received.set()
        return out

    runtime.pull_task_input = pull_task_input
    try:
        yield received
    finally:
        runtime.pull_task_input = original


def _run_task(spec: ExecutionSpec, task_timeout: float = TASK_TIMEOUT, input_timeout: float = INPUT_TIMEOUT) -> int:
    """Run one ClientApp task in this process's main thread; log how it ended, with its task and run id."""
    import flwr.supercore.exit.exit_handler as handlers
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    handlers.registered_exit_handlers.clear()  # the SuperExec's own handlers must not run in a forked task
    TaskIdentity.task_id, TaskIdentity.run_id = spec.task_id, None  # the run is known once the task pulled its input
    certificates = None
    if not spec.insecure and spec.root_certificates_path:
        with open(spec.root_certificates_path, "rb") as f:
            certificates = f.read()
    start, code = time.monotonic(), 0
    log.info("task %d started", spec.task_id)
    try:
        with _input_received() as received, _watchdog(task_timeout, input_timeout, received):
            run_clientapp(
                runtime_api_address=spec.runtime_api_address,
                token=spec.token,
                insecure=spec.insecure,
                certificates=certificates,
                parent_pid=None,
                runtime_dependency_install=False,
            )
    except SystemExit as done:
        code = int(done.code or 0)
    except BaseException:  # noqa: BLE001 - a task must never fall back into the SuperExec's loop
        log.exception("task %s raised outside the ClientApp", _ids())
        code = 1
    _run_exit_handlers()
    _report(code, time.monotonic() - start)
    return code


def _report(code: int, seconds: float) -> None:
    """One line per task: done, or failed with Flower's exit code and its name."""
    if code == 0:
        log.info("task %s done in %.1f s", _ids(), seconds)
        return
    name = next((k for k, v in vars(ExitCode).items() if k.isupper() and v == code), "unknown")
    log.error("task %s ended with exit code %d (%s) after %.1f s", _ids(), code, name, seconds)


def preload(overrides: str, load_model: bool = True) -> float:
    """Import the ClientApp and its libraries and load the base model; return the seconds taken."""
    start = time.perf_counter()
    import fedllm_app.client.trainer  # noqa: F401
    import fedllm_app.client_app  # noqa: F401 - the ClientApp the tasks will find in sys.modules
    from fedllm_app.config import load_config
    from fedllm_app.model import get_model

    for lib in ("transformers", "peft", "trl", "datasets"):
        __import__(lib)
    cfg = load_config({"overrides": overrides})
    if load_model:
        get_model(cfg.model, cfg.seed)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    """Preload, then run ``flower-superexec`` with the inline or fork executor (``argv``: ``sys.argv[1:]``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False)
    parser.add_argument("--preload", default="", help="Hydra overrides naming the model to preload")
    parser.add_argument(
        "--mode",
        choices=MODES,
        default="inline",
        help="inline (default): run each task in this process, model and data kept warm; fork: in a fork of it",
    )
    parser.add_argument(
        "--task-timeout",
        type=_seconds,
        default=TASK_TIMEOUT,
        help=f"seconds a task may run before it is ended with an error reply (default {TASK_TIMEOUT:g}; 0: never)",
    )
    parser.add_argument(
        "--input-timeout",
        type=_seconds,
        default=INPUT_TIMEOUT,
        help=f"seconds a task may wait for its message from the SuperNode (default {INPUT_TIMEOUT:g}; 0: never)",
    )
    args, rest = parser.parse_known_args(argv)
    from flwr.supercore.cli.flower_superexec import flower_superexec

    if {"-h", "--help"} & set(rest):  # ours, then flower-superexec's (which exits), before anything is loaded
        parser.print_help()
        print("\nAll other arguments are flower-superexec's:\n", flush=True)
        sys.argv = ["flower-superexec", "--help"]
        flower_superexec()
    setup_console()
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # asking about CUDA must not initialise it
    os.environ.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.1")  # Flower's 1 s adds idle time to a round
    shorten_object_pull_backoff()  # each task's ClientApp pulls its message's arrays from the SuperNode
    import torch

    seconds = preload(args.preload, load_model=args.mode == "inline" or not torch.cuda.is_available())
    log.info("warm SuperExec (%s): libraries and base model loaded in %.1f s", args.mode, seconds)

    import flwr.supercore.superexec.run_superexec as superexec

    executor = (InlineExecutor if args.mode == "inline" else ForkExecutor)(args.task_timeout, args.input_timeout)
    superexec.get_executor = lambda *a, **k: executor
    sys.argv = ["flower-superexec", *rest]
    flower_superexec()


def _seconds(text: str) -> float:
    """``--task-timeout``'s value: a number of seconds, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds; give e.g. 3600, or 0 for no limit")
    return value


if __name__ == "__main__":
    main()
