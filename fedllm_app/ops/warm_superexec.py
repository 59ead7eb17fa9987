r"""A SuperExec for a SuperNode that keeps the ClientApp warm across rounds.

With Flower 1.42 a SuperNode runs every message in a fresh ``flwr-clientapp``
process, which imports torch, transformers, peft and TRL, loads the base model and
tokenises the client's data again, every round. This entry point is Flower's
``flower-superexec`` with another executor: it imports those libraries and loads the
base model once, then runs each ClientApp task either

- ``--mode fork`` (default): in an ``os.fork()`` of this process (imports and model
  shared copy-on-write; the tokenised data is rebuilt each round). A crashing task
  cannot take the SuperExec down. On a CUDA machine the model is not preloaded (a
  forked child cannot use CUDA initialised by its parent); or
- ``--mode inline`` (experimental): inside this process, one task after the other, so
  the ClientApp's caches (base model, tokenised partition, trainer) persist across
  rounds as they do in simulation. Once, after a run's ServerApp was killed and the
  run resumed on the same SuperNodes, the next task hung; a likely cause is fixed (a
  task ended by Flower from inside, e.g. on a 401 from its SuperNode, force-exited this
  whole process 5 s later: see :func:`_run_inline`).

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
import time

from flwr.supercore.constant import TaskType
from flwr.supercore.exit import flwr_exit
from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
from flwr.supercore.superexec.executor.types import ExecutionSpec, LaunchResult

from fedllm_app.console import setup_console

log = logging.getLogger("fedllm")


class ForkExecutor(SubprocessExecutor):
    """Flower's subprocess executor, but ClientApp tasks run in a fork of this process."""

    def __init__(self) -> None:
        self.children: set[int] = set()

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        if spec.task_type != TaskType.CLIENT_APP:
            return super().launch(spec)
        pid = os.fork()
        if pid == 0:  # the child: run the one task, then leave without the parent's exit handlers
            os._exit(_run_task(spec))
        self.children.add(pid)
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Reap finished children."""
        for pid in list(self.children):
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                self.children.discard(pid)

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

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        if spec.task_type != TaskType.CLIENT_APP:
            return super().launch(spec)
        _run_inline(spec)
        return LaunchResult.accepted()


def _task_exit(code: int, *args: object, **kwargs: object) -> None:
    """Flower's ``flwr_exit`` for a task run inline: its exit handlers, then SystemExit; no force-exit timer."""
    import flwr.supercore.exit.exit_handler as handlers

    handlers.trigger_exit_handlers(run_before_force_exit=True)
    handlers.trigger_exit_handlers(run_before_force_exit=False)
    raise SystemExit(code)


def _swap_exit(old: object, new: object) -> None:
    """Point every loaded module's ``flwr_exit`` that is ``old`` at ``new``."""
    for module in list(sys.modules.values()):
        if getattr(module, "flwr_exit", None) is old:
            module.flwr_exit = new


def _run_inline(spec: ExecutionSpec) -> None:
    """One task in this process, with Flower's exit path confined to the task.

    Flower ends a task with ``flwr_exit``, which starts a timer that ``os._exit``s the process
    5 s later. It is reached from the task's end, and from the signal handlers the task installs:
    Flower's HTTP client sends SIGINT to its own process when the SuperNode answers 401 (it
    dropped the task's token, e.g. after 60 s without the task's heartbeat). Inline, that process is this
    SuperExec: every module's ``flwr_exit`` (the signal handler's too) is swapped for
    :func:`_task_exit` while the task runs, so such a task ends alone and the SuperExec serves
    the next one (tests/unit/fedllm_app/ops/test_warm_superexec.py).
    """
    import flwr.supercore.exit.exit_handler as handlers

    saved_handlers = list(handlers.registered_exit_handlers)
    handlers.registered_exit_handlers.clear()
    saved_signals = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT)}
    _swap_exit(flwr_exit, _task_exit)
    try:
        _run_task(spec)
    finally:
        _swap_exit(_task_exit, flwr_exit)  # also in modules the task imported while swapped
        handlers.registered_exit_handlers[:] = saved_handlers
        for sig, handler in saved_signals.items():
            signal.signal(sig, handler)


def _run_task(spec: ExecutionSpec) -> int:
    import flwr.supercore.exit.exit_handler as handlers
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    handlers.registered_exit_handlers.clear()  # the SuperExec's own handlers must not run in a forked task
    certificates = None
    if not spec.insecure and spec.root_certificates_path:
        with open(spec.root_certificates_path, "rb") as f:
            certificates = f.read()
    try:
        run_clientapp(
            runtime_api_address=spec.runtime_api_address,
            token=spec.token,
            insecure=spec.insecure,
            certificates=certificates,
            parent_pid=None,
            runtime_dependency_install=False,
        )
    except SystemExit as done:
        return int(done.code or 0)
    except BaseException:  # noqa: BLE001 - a task must never fall back into the SuperExec's loop
        return 1
    return 0


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
    """Preload, then run ``flower-superexec`` with the fork executor; ``argv`` defaults to ``sys.argv[1:]``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False)
    parser.add_argument("--preload", default="", help="Hydra overrides naming the model to preload")
    parser.add_argument(
        "--mode",
        choices=("inline", "fork"),
        default="fork",
        help="fork: run each task in a fork of this process; inline (experimental): in this process",
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
    import torch

    seconds = preload(args.preload, load_model=args.mode == "inline" or not torch.cuda.is_available())
    log.info("warm SuperExec (%s): libraries and base model loaded in %.1f s", args.mode, seconds)

    import flwr.supercore.superexec.run_superexec as superexec

    executor = InlineExecutor() if args.mode == "inline" else ForkExecutor()
    superexec.get_executor = lambda *a, **k: executor
    sys.argv = ["flower-superexec", *rest]
    flower_superexec()


if __name__ == "__main__":
    main()
