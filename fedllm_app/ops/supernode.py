r"""``flower-supernode`` with shorter fixed waits, so a round's message reaches the ClientApp sooner.

Flower 1.42's SuperNode sleeps 3 s after every pull that brought no message from the SuperLink, and
polls its own state every 0.5 s for the ClientApp's reply (``time.sleep(3)`` and ``time.sleep(0.5)``
in ``flwr/supernode/start_client_internal.py``; no option or environment variable sets them). Between
two rounds every node is idle, so each round's message waits up to 3 s (1.5 s on average) before a
node sees it, and each reply up to 0.5 s before the node sends it. This entry point is Flower's
``flower-supernode`` with those two waits set by ``--idle-pull-interval`` (default 0.5 s) and
``--reply-poll-interval`` (default 0.05 s); every other argument is ``flower-supernode``'s::

    fedllm-supernode --insecure --superlink 127.0.0.1:9190 --isolation process --port 9195 \
        --node-config "partition-id=0 num-partitions=2" --idle-pull-interval 0.5

The cost: an idle node asks the SuperLink twice a second instead of once every 3 s (keep Flower's 3 s,
``--idle-pull-interval 3``, for thousands of nodes on one SuperLink). Only ``start_client_internal``'s
view of :mod:`time` is changed, and only where it waits exactly Flower's 3 s or 0.5 s; with a Flower
that no longer has these waits it refuses to start rather than guess.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time
from typing import Any

FLOWER_IDLE_PULL = 3.0  # seconds flwr 1.42's SuperNode sleeps after a pull that brought nothing
FLOWER_REPLY_POLL = 0.5  # seconds between two looks for the ClientApp's reply (and for a reply's contents)
IDLE_PULL = 0.5
REPLY_POLL = 0.05


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

    if {"-h", "--help"} & set(rest):
        parser.print_help()
        print("\nAll other arguments are flower-supernode's:\n", flush=True)
    patch_waits(args.idle_pull_interval, args.reply_poll_interval)
    sys.argv = ["flower-supernode", *rest]
    flower_supernode()


if __name__ == "__main__":
    main()
