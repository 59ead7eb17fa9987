r"""``flower-supernode`` that never waits for ever on a failed ClientApp task, with settable fixed waits.

The SuperNode to run beside fedllm's warm SuperExec (:mod:`fedllm_app.ops.warm_superexec`): Flower's
``flower-supernode``, every argument its own, with four changes::

    fedllm-supernode --insecure --superlink 127.0.0.1:9190 --isolation process --port 9195 \
        --node-config "partition-id=0 num-partitions=2"

1. **A failed task's message gets an error reply** (:func:`patch_failed_task_replies`). After pulling a
   message Flower 1.42's SuperNode does nothing else until that message has a reply; when the ClientApp
   task ends failed (its own error, or 60 s without its heartbeat) Flower writes an error reply only if
   the task had already fetched the message. A task that failed between starting and fetching it (a
   stalled or crashed process, an overloaded machine) left the node stuck for good: it answered nothing
   more, in that run or any later one (seen once in CI after the kill-and-resume deployment test). Here
   the SuperNode replies to such a message with Flower's own "ClientApp stopped responding" error: the
   server counts the node as failed for that round and the node goes on.
2. **A message whose run stops while it is pulled is dropped with its task** (:func:`patch_stopped_run_messages`)
   instead of staying as a ghost task whose late reply could take the next run's only push.
3. **Fixed waits.** Flower's SuperNode sleeps 3 s after every pull that brought no message from the
   SuperLink and polls its own state every 0.5 s for the ClientApp's reply (``time.sleep(3)`` and
   ``time.sleep(0.5)`` in ``flwr/supernode/start_client_internal.py``; no option sets them).
   ``--idle-pull-interval`` (default Flower's 3 s; 0.5 makes an idle node ask the SuperLink twice a
   second, and measured no shorter round start) and ``--reply-poll-interval`` (default 0.05 s, a look
   at the node's own memory) set them. Only ``start_client_internal``'s view of :mod:`time` is changed,
   and only where it waits exactly those values; with a Flower that no longer has these waits, or whose
   node state or message pull no longer has the parts mended in 1. and 2., it refuses to start rather than guess.
4. **Object pulls retry after 0.1 s** (:mod:`fedllm_app.comm.object_pulls`), not Flower's 1 s then 2 s, 4 s:
   the SuperNode asks the SuperLink for a round's arrays while the ServerApp is still storing them.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import sys
import time
from typing import Any

from fedllm_app.comm.object_pulls import shorten_object_pull_backoff

FLOWER_IDLE_PULL = 3.0  # seconds flwr 1.42's SuperNode sleeps after a pull that brought nothing
FLOWER_REPLY_POLL = 0.5  # seconds between two looks for the ClientApp's reply (and for a reply's contents)
IDLE_PULL = FLOWER_IDLE_PULL
REPLY_POLL = 0.05

log = logging.getLogger("fedllm")


class _Waits:
    """The :mod:`time` module as ``start_client_internal`` sees it, with Flower's two fixed waits replaced."""

    def __init__(self, idle_pull: float, reply_poll: float) -> None:
        self._map = {FLOWER_IDLE_PULL: idle_pull, FLOWER_REPLY_POLL: reply_poll}

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        time.sleep(self._map.get(seconds, seconds))


def patch_waits(idle_pull: float = IDLE_PULL, reply_poll: float = REPLY_POLL) -> None:
    """Make the SuperNode of this process wait ``idle_pull`` s after an empty pull, ``reply_poll`` s for a reply."""
    import flwr
    import flwr.supernode.start_client_internal as supernode

    source = inspect.getsource(supernode)
    if "time.sleep(3)" not in source or "time.sleep(0.5)" not in source:
        raise RuntimeError(
            f"flwr {flwr.__version__}'s SuperNode no longer sleeps 3 s after an empty pull and 0.5 s for a reply, "
            "which fedllm-supernode shortens; run flower-supernode instead"
        )
    supernode.time = _Waits(idle_pull, reply_poll)


def patch_failed_task_replies(cls: type | None = None) -> None:
    """Make the SuperNode (``cls``: Flower's InMemoryNodeState) answer with an error a message whose ClientApp task
    ended failed before it fetched it, when no other task of that run can still fetch it (see the module's doc).
    """
    from flwr.common.constant import Status, SubStatus
    from flwr.supercore.constant import TaskType
    from flwr.supernode.nodestate import in_memory_nodestate

    cls = cls or in_memory_nodestate.InMemoryNodeState
    if getattr(cls, "_fedllm_replies_failed_tasks", False):
        return
    needed = ("finish_task", "_on_task_tokens_expired", "_store_error_replies", "record_message_processing_start")
    missing = [name for name in needed if not hasattr(cls, name)]
    if missing or not hasattr(in_memory_nodestate, "CLIENT_APP_CRASHED_ERROR"):
        import flwr

        raise RuntimeError(
            f"flwr {flwr.__version__}'s SuperNode state lacks {missing or 'CLIENT_APP_CRASHED_ERROR'}, which "
            "fedllm-supernode mends; run flower-supernode instead"
        )
    finish_task, on_expired = cls.finish_task, cls._on_task_tokens_expired
    crashed = in_memory_nodestate.CLIENT_APP_CRASHED_ERROR

    def live_runs(state: Any) -> set[int]:
        """Runs with a ClientApp task that may still fetch a message (the caller holds ``lock_task_store``)."""
        waiting = (Status.PENDING, Status.STARTING, Status.RUNNING)
        return {
            t.run_id for t in state.task_store.values() if t.type == TaskType.CLIENT_APP and t.status.status in waiting
        }

    def mark_fetched(state: Any, runs: set[int]) -> None:
        """Mark fetched the unanswered messages of ``runs`` no task fetched, so Flower writes their error reply."""
        with state.lock_msg_store:
            replied = {e.message.metadata.reply_to_message_id for e in state.msg_store.values()}
            for entry in state.msg_store.values():
                meta = entry.message.metadata
                if meta.run_id in runs and not entry.is_retrieved and not meta.reply_to_message_id:
                    if meta.message_id not in replied:
                        log.warning(
                            "the ClientApp task of run %s ended before it fetched message %s: replying with an "
                            "error so this SuperNode goes on", meta.run_id, meta.message_id,
                        )  # fmt: skip
                        entry.is_retrieved = True
                        state.record_message_processing_start(meta.message_id)

    def patched_finish(self: Any, task_id: int, sub_status: str, details: str) -> bool:
        finished = finish_task(self, task_id, sub_status, details)
        if finished and sub_status == SubStatus.FAILED:
            with self.lock_task_store:
                task = self.task_store.get(task_id)
                runs = {task.run_id} - live_runs(self) if task and task.type == TaskType.CLIENT_APP else set()
            if runs:
                mark_fetched(self, runs)
                self._store_error_replies(runs, crashed)
        return finished

    def patched_expired(self: Any, tasks: list) -> None:  # called with lock_task_store held
        mark_fetched(self, {t.run_id for t in tasks if t.type == TaskType.CLIENT_APP} - live_runs(self))
        on_expired(self, tasks)

    cls.finish_task, cls._on_task_tokens_expired = patched_finish, patched_expired
    cls._fedllm_replies_failed_tasks = True


class RunStopped(RuntimeError):
    """The run stopped while this SuperNode pulled one of its messages from the SuperLink."""


def _run_stop_as_error(fn: Any) -> Any:
    """``fn`` raising :class:`RunStopped` where Flower raises ``RunNotRunningException`` (a BaseException)."""
    from flwr.supercore.run import RunNotRunningException

    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except RunNotRunningException as err:
            raise RunStopped(
                "its run stopped while this SuperNode pulled it; the message and its task are dropped"
            ) from err

    return call


def patch_stopped_run_messages() -> None:
    """Drop a message, and its task, whose run stops while the SuperNode pulls its contents.

    Flower 1.42 creates the task and stores the message before it pulls the contents; when the run stops
    meanwhile the pull raises ``RunNotRunningException``, which its clean-up (``except Exception``) does
    not catch, so the task and the content-less message stay: a ghost that a SuperExec claims and whose
    ClientApp waits for contents that never come (up to 2 h; fedllm's warm SuperExec ends it at
    ``--input-timeout``). Its late error reply then took the SuperNode's one push of the next run's first
    message, whose own reply was never sent: the resumed run waited on this node for ever. Here that
    exception becomes :class:`RunStopped`, so Flower's own clean-up deletes the message and fails the task.
    The pull also notes which message it brought, for :func:`patch_push_until_answered`.
    """
    import flwr.supernode.start_client_internal as supernode

    original = supernode._pull_and_store_message
    if getattr(original, "_fedllm_drops_stopped_runs", False):
        return
    signature = inspect.signature(original)
    if not {"pull_object", "confirm_message_received", "receive"} <= set(signature.parameters):
        raise RuntimeError(
            "flwr's SuperNode no longer pulls a message as fedllm-supernode expects; run flower-supernode"
        )

    def pull_and_store(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        for name in ("pull_object", "confirm_message_received"):
            bound.arguments[name] = _run_stop_as_error(bound.arguments[name])
        bound.arguments["receive"] = _recording(bound.arguments["receive"])
        return original(*bound.args, **bound.kwargs)

    pull_and_store._fedllm_drops_stopped_runs = True  # type: ignore[attr-defined]
    supernode._pull_and_store_message = pull_and_store


_PULLED: dict[str, str | None] = {"message": None}  # the id of the message this SuperNode pulled last


def _recording(receive: Any) -> Any:
    """``receive`` that notes the id of the message it brings (see :func:`patch_push_until_answered`)."""

    def call() -> Any:
        got = receive()
        _PULLED["message"] = None if got is None else got[0].metadata.message_id
        return got

    return call


def patch_push_until_answered() -> None:
    """Push replies until the message pulled last is answered, not only until the first reply.

    A flwr 1.42 SuperNode pushes after a pull that brought a message, and only the replies present at the
    first look: a late reply of an earlier message (a stopped run's task, ended at ``--input-timeout``) took
    that push, the new message's own reply stayed unsent, and the server waited on the node for ever (seen in
    the kill-and-resume deployment test even with the ghost fix above). Needs
    :func:`patch_stopped_run_messages`, whose pull notes the message pulled last.
    """
    import flwr.supernode.start_client_internal as supernode

    original = supernode._push_messages
    if getattr(original, "_fedllm_until_answered", False):
        return
    signature = inspect.signature(original)
    if "state" not in signature.parameters:
        raise RuntimeError(
            "flwr's SuperNode no longer pushes replies as fedllm-supernode expects; run flower-supernode"
        )

    def push_until_answered(*args: Any, **kwargs: Any) -> None:
        bound = signature.bind(*args, **kwargs)
        state = bound.arguments["state"]
        while True:
            original(*bound.args, **bound.kwargs)
            pulled = _PULLED["message"]
            with state.lock_msg_store:
                answered = pulled is None or pulled not in state.msg_store  # sent: Flower deletes it with its reply
            if answered:
                return

    push_until_answered._fedllm_until_answered = True  # type: ignore[attr-defined]
    supernode._push_messages = push_until_answered


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.01 <= value <= 60:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds between 0.01 and 60, e.g. 0.5")
    return value


def main(argv: list[str] | None = None) -> None:
    """Run ``flower-supernode`` with the waits set here (``argv`` defaults to ``sys.argv[1:]``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False)
    parser.add_argument(
        "--idle-pull-interval",
        type=_seconds,
        default=IDLE_PULL,
        help=f"seconds between two pulls that bring nothing (default {IDLE_PULL}; Flower's: {FLOWER_IDLE_PULL:g})",
    )
    parser.add_argument(
        "--reply-poll-interval",
        type=_seconds,
        default=REPLY_POLL,
        help=f"seconds between two looks for the ClientApp's reply (default {REPLY_POLL}; Flower's: "
        f"{FLOWER_REPLY_POLL:g})",
    )
    args, rest = parser.parse_known_args(argv)
    from flwr.supernode.cli.flower_supernode import flower_supernode

    from fedllm_app.console import setup_console

    setup_console()

    if {"-h", "--help"} & set(rest):
        parser.print_help()
        print("\nAll other arguments are flower-supernode's:\n", flush=True)
    patch_waits(args.idle_pull_interval, args.reply_poll_interval)
    shorten_object_pull_backoff()
    patch_failed_task_replies()
    patch_stopped_run_messages()
    patch_push_until_answered()
    sys.argv = ["flower-supernode", *rest]
    flower_supernode()


if __name__ == "__main__":
    main()
