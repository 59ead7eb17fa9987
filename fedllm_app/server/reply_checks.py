"""Checks on a client's reply before it reaches the strategy's aggregation.

A reply is rejected (and the round goes on with the others) when its adapter has
other array names or shapes than the adapter sent to that node (the global adapter, or
its slice of the node's own LoRA rank), when any array holds NaN
or Inf, or when it claims zero, negative or non-finite examples. Flower's strategies
would otherwise average such a reply in, or fail the whole round.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, RecordDict

from strategies.fedavg import ARRAYS_KEY, METRICS_KEY, NUM_EXAMPLES_KEY

Shapes = dict[str, tuple[int, ...]]


def shapes_of(arrays: ArrayRecord) -> Shapes:
    """Names and shapes of an ArrayRecord (what a reply's adapter must match)."""
    return {name: tuple(array.shape) for name, array in arrays.items()}


def sent_shapes(messages: list[Message]) -> dict[int, Shapes]:
    """The names and shapes of the adapter each node was sent, by node id."""
    return {m.metadata.dst_node_id: shapes_of(m.content[ARRAYS_KEY]) for m in messages if ARRAYS_KEY in m.content}


def reply_problem(content: RecordDict, expected: Shapes) -> str | None:
    """Why a reply's content must be rejected, or None when it is sound.

    Parameters
    ----------
    content : RecordDict
        The reply's content: ``arrays`` (the trained adapter), ``metrics`` with
        ``num-examples``, and possibly extra ArrayRecords (SCAFFOLD's ``c-delta``).
    expected : Shapes
        Array names and shapes of the global adapter sent this round.
    """
    arrays = content.get(ARRAYS_KEY)
    if not isinstance(arrays, ArrayRecord):
        return f"no ArrayRecord '{ARRAYS_KEY}' in the reply"
    problem = _names_and_shapes(shapes_of(arrays), expected)
    if problem:
        return problem
    for key, record in content.items():
        if isinstance(record, ArrayRecord) and (bad := _non_finite(record)):
            return f"array '{bad}' of '{key}' contains NaN or Inf"
    metrics = content.get(METRICS_KEY)
    n = metrics.get(NUM_EXAMPLES_KEY) if metrics is not None else None
    if not isinstance(n, int | float) or not math.isfinite(n) or n <= 0:
        return f"'{NUM_EXAMPLES_KEY}' is {n!r}; it must be a positive number"
    return None


def _names_and_shapes(got: Shapes, expected: Shapes) -> str | None:
    missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    if missing or unexpected:
        return f"array names differ from the adapter it was sent: missing {missing[:3]}, unexpected {unexpected[:3]}"
    for name, shape in expected.items():
        if got[name] != shape:
            return f"array '{name}' has shape {got[name]}, the adapter it was sent has {shape}"
    return None


def _non_finite(record: ArrayRecord) -> str | None:
    for name, array in record.items():
        values = array.numpy()
        if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
            return name
    return None


def split_replies(
    replies: list[Message], expected: Shapes, by_node: dict[int, Shapes] | None = None
) -> tuple[list[Message], list[dict[str, Any]]]:
    """Replies to aggregate (errors included, as Flower counts them as failures) and the rejected ones.

    A reply must match ``by_node[<its node>]`` (what that node was sent) where given, else ``expected``.

    Each rejection is ``{"node": <node id>, "partition": <partition id or None>, "reason": ...}``.
    """
    kept, rejected = [], []
    for msg in replies:
        shapes = (by_node or {}).get(msg.metadata.src_node_id, expected)
        problem = None if msg.has_error() else reply_problem(msg.content, shapes)
        if problem is None:
            kept.append(msg)
            continue
        metrics = msg.content.get(METRICS_KEY)
        partition = metrics.get("partition-id") if metrics is not None else None
        rejected.append({"node": msg.metadata.src_node_id, "partition": partition, "reason": problem})
    return kept, rejected
