"""Flower's object pulls retry after 0.1 s instead of 1 s: a round's message reaches its ClientApp seconds sooner.

Flower 1.42 moves a message in two steps: the message (its object tree) first, then each object (each array of
the adapter) on its own, and a receiver that asks for an object its sender has not finished storing gets
"unavailable" and waits before asking again: 1 s, then 2, 4, ... up to 10 s (``PULL_INITIAL_BACKOFF`` and
``PULL_BACKOFF_CAP`` in ``flwr/supercore/constant.py``, the defaults of ``pull_objects``; no option sets them).
In a deployment every round's message is pulled twice this way, SuperLink -> SuperNode and SuperNode ->
ClientApp, and the reply once, SuperLink -> ServerApp; the receiver nearly always asks while the sender is
still storing, so each hop waits 1-3 s for objects that arrive within a fraction of a second (SuperNode DEBUG
logs of the tiny default: 2.5-5.2 s from "Receiving" to "Received successfully", then 2.4-3.9 s more before
the ClientApp had the message; docs/benchmarks.md).

:func:`shorten_object_pull_backoff` starts the retries at 0.1 s and caps them at 1 s in the process that calls
it: ``fedllm-supernode``, the warm SuperExec (its inline and forked ClientApps) and the ServerApp. Each retry is
one small request, so a slow real network costs a few more of them, nothing else.
"""

from __future__ import annotations

INITIAL_BACKOFF = 0.1  # seconds before the first retry of an object that is not there yet (Flower: 1)
BACKOFF_CAP = 1.0  # the longest wait between two retries (Flower: 10)


def shorten_object_pull_backoff(initial: float = INITIAL_BACKOFF, cap: float = BACKOFF_CAP) -> None:
    """Make every object pull of this process retry after ``initial`` s, doubling up to ``cap`` s.

    Changes the keyword defaults of Flower's two pull functions in place, so callers that imported them by
    name see the change too. Refuses (RuntimeError) a Flower whose pull functions no longer take these.
    """
    import flwr
    from flwr.supercore.inflatable import inflatable_utils

    for fn in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        defaults = fn.__kwdefaults__ or {}
        if not {"initial_backoff", "backoff_cap"} <= set(defaults):
            raise RuntimeError(
                f"flwr {flwr.__version__}'s {fn.__name__} has no initial_backoff/backoff_cap to shorten; "
                "fedllm's object-pull change needs a Flower of the 1.42 line"
            )
        fn.__kwdefaults__ = {**defaults, "initial_backoff": float(initial), "backoff_cap": float(cap)}
