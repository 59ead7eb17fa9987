"""Checks on a client's reply before anything on the server reads it.

A reply is rejected (logged with its node and the reason; the round goes on with the
others) unless it is exactly what fedllm's client sends:

- records: one ArrayRecord ``arrays`` and one MetricRecord ``metrics``, plus the extra
  ArrayRecords the strategy expects (SCAFFOLD's ``c-delta``) and nothing else;
- every ArrayRecord: the names and shapes of the adapter sent to that node (the global adapter,
  or its slice of the node's own LoRA rank), numpy serialization, float32,
  a payload that decodes (never pickles) to the declared shape, finite values;
- metrics: the keys of :data:`REPLY_METRICS` only, each of its type (an int where an int is
  expected, never a list), finite; ``num-examples`` and ``data-size`` positive;
- ``lora-rank`` (HetLoRA's rank self-pruning: the client's rank after the round), when present: an int in
  ``1..`` the rank of the adapter it was sent;
- ``partition-id``: an int in ``[0, num_partitions)``, the same partition the node claimed
  before, claimed by no other node (:class:`PartitionBook`);
- the reply comes from a node the server sent this round's message to, once.

Any exception while reading a reply is a rejection too. Weights and update norms, which
need every sound reply of the round, are judged after this (:mod:`fedllm_app.server.guard`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from strategies.dp import WITHIN_CLIP_KEY
from strategies.fedavg import ARRAYS_KEY, DATA_SIZE_KEY, METRICS_KEY, NUM_EXAMPLES_KEY, PARTITION_KEY
from strategies.hetero import RANK_KEY
from strategies.hetero_rank import A_SUFFIX
from strategies.records import is_integer

Shapes = dict[str, tuple[int, ...]]

# Every metric a client's reply may carry, and its type (a float key accepts an int).
REPLY_METRICS: dict[str, type] = {
    NUM_EXAMPLES_KEY: int,
    DATA_SIZE_KEY: int,
    PARTITION_KEY: int,
    "train_loss": float,
    "train_seconds": float,
    "optimizer_seconds": float,
    "peak_rss_mb": float,
    "process_age_seconds": float,
    "model_load_seconds": float,
    "setup_seconds": float,
    WITHIN_CLIP_KEY: float,  # DP-FedAvg: whether the update was within the clip norm (strategies/dp.py)
    RANK_KEY: int,  # HetLoRA's self-pruning: the client's LoRA rank after the round (strategies/hetero.py)
}
REQUIRED_METRICS = (NUM_EXAMPLES_KEY, DATA_SIZE_KEY, PARTITION_KEY, "train_loss")
NUMPY_STYPE = "numpy.ndarray"
DTYPE = "float32"


def shapes_of(arrays: ArrayRecord) -> Shapes:
    """Names and shapes of an ArrayRecord (what a reply's adapter must match)."""
    return {name: tuple(array.shape) for name, array in arrays.items()}


@dataclass(frozen=True)
class ReplySpec:
    """What a sound reply holds this round.

    Attributes
    ----------
    shapes : Shapes
        Names and shapes of the global adapter sent this round.
    extra : tuple of str
        Extra ArrayRecords the strategy expects, shaped like the adapter (SCAFFOLD: ``("c-delta",)``).
    num_partitions : int or None
        Partition ids must lie in ``[0, num_partitions)``; None: any non-negative int.
    """

    shapes: Shapes
    extra: tuple[str, ...] = ()
    num_partitions: int | None = None


@dataclass
class PartitionBook:
    """Which node holds which partition: the first sound claim binds them for the rest of the run.

    A node that later claims another partition, or a partition another node holds, is rejected,
    so no client can overwrite another's baseline adapter or borrow its weight. Nodes racing for
    the same free partition in one round are all rejected (:meth:`contested`): the faster one does
    not win it.
    """

    by_node: dict[int, int] = field(default_factory=dict)

    def contested(self, claims: dict[int, int | None]) -> set[int]:
        """Free partitions that several nodes claim in this round (``claims``: node -> claimed partition)."""
        held = set(self.by_node.values())
        counts: dict[int, int] = {}
        for pid in claims.values():
            if pid is not None and pid not in held:
                counts[pid] = counts.get(pid, 0) + 1
        return {pid for pid, n in counts.items() if n > 1}

    def problem(self, node: int, pid: int, contested: set[int] = frozenset()) -> str | None:  # type: ignore[assignment]
        if pid in contested:
            return f"'{PARTITION_KEY}' {pid} is claimed by several nodes this round, and none holds it yet"
        held = self.by_node.get(node)
        if held is not None and held != pid:
            return f"'{PARTITION_KEY}' is {pid}, but this node trains partition {held}"
        owner = next((n for n, p in self.by_node.items() if p == pid and n != node), None)
        if owner is not None:
            return f"'{PARTITION_KEY}' {pid} belongs to node {owner}"
        return None

    def bind(self, node: int, pid: int) -> None:
        self.by_node[node] = pid

    def assign(self, planned: dict[int, int]) -> None:
        """Bind each node to the partition the server sent it this round (``planned``: node -> partition, from
        the strategy's partition query, the one source the round plan, weights and control variates use).

        A node bound before to another partition, or a partition bound before to another node (a claim made
        before its holder replied, or state from before a resume), follows the plan.
        """
        for node, pid in planned.items():
            for other in [n for n, p in self.by_node.items() if p == pid and n != node]:
                del self.by_node[other]
            self.by_node[node] = pid


def reply_problem(content: RecordDict, spec: ReplySpec | Shapes) -> str | None:
    """Why a reply's content must be rejected, or None when it is sound (never raises)."""
    spec = spec if isinstance(spec, ReplySpec) else ReplySpec(spec)
    try:
        return _content_problem(content, spec)
    except Exception as err:  # noqa: BLE001 - a reply that breaks a reader is a rejected reply
        return f"unreadable reply ({type(err).__name__}: {str(err)[:120]})"


def _content_problem(content: RecordDict, spec: ReplySpec) -> str | None:
    expected = {ARRAYS_KEY: ArrayRecord, METRICS_KEY: MetricRecord, **dict.fromkeys(spec.extra, ArrayRecord)}
    keys = set(content.keys())
    if keys != set(expected):
        missing, unexpected = sorted(set(expected) - keys), sorted(keys - set(expected))
        return f"records differ from {sorted(expected)}: missing {missing}, unexpected {unexpected[:3]}"
    for key, kind in expected.items():
        if not isinstance(content[key], kind):
            return f"'{key}' is a {type(content[key]).__name__}, not a {kind.__name__}"
    for key in (ARRAYS_KEY, *spec.extra):
        if problem := _arrays_problem(content[key], spec.shapes):
            return f"{problem} of '{key}'" if key != ARRAYS_KEY else problem
    return metrics_problem(content[METRICS_KEY], spec.num_partitions) or _rank_problem(
        content[METRICS_KEY], spec.shapes
    )


def _rank_problem(metrics: MetricRecord, shapes: Shapes) -> str | None:
    """A ``lora-rank`` outside ``1..`` the rank of the adapter sent (the rows of its ``A`` matrices), or None."""
    sent = max((shape[0] for name, shape in shapes.items() if name.endswith(A_SUFFIX)), default=None)
    rank = metrics.get(RANK_KEY)
    if rank is None or sent is None or 1 <= rank <= sent:
        return None
    return f"'{RANK_KEY}' is {rank}; a client can only keep or prune the ranks it was sent, 1..{sent}"


def _arrays_problem(record: ArrayRecord, expected: Shapes) -> str | None:
    got = {name: tuple(array.shape) for name, array in record.items()}
    missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    if missing or unexpected:
        return f"array names differ from the adapter it was sent: missing {missing[:3]}, unexpected {unexpected[:3]}"
    for name, shape in expected.items():
        if got[name] != shape:
            return f"array '{name}' has shape {got[name]}, the adapter it was sent has {shape}"
        if problem := _array_problem(record[name], shape):
            return f"array '{name}' {problem}"
    return None


def _array_problem(array: Array, shape: tuple[int, ...]) -> str | None:
    if array.stype != NUMPY_STYPE:
        return f"has serialization {array.stype!r}, not {NUMPY_STYPE!r}"
    if array.dtype != DTYPE:
        return f"has dtype {array.dtype}, not {DTYPE}"
    values = array.numpy()  # np.load(allow_pickle=False): pickles and garbage raise
    if values.dtype != np.float32 or tuple(values.shape) != shape:
        return f"holds {values.dtype} {tuple(values.shape)} data, not the declared {DTYPE} {shape}"
    if not np.isfinite(values).all():
        return "contains NaN or Inf"
    return None


def metrics_problem(metrics: MetricRecord, num_partitions: int | None) -> str | None:
    """Why a reply's metrics must be rejected (keys, types, finite, positive sizes), or None."""
    unexpected = sorted(set(metrics) - set(REPLY_METRICS))
    if unexpected:
        return f"unexpected metrics {unexpected[:3]}; a reply holds only {sorted(REPLY_METRICS)}"
    for key in REQUIRED_METRICS:
        if key not in metrics:
            return f"'{key}' is None; the reply must report it"
    for key, value in metrics.items():
        kind = REPLY_METRICS[key]
        ok = isinstance(value, int) if kind is int else isinstance(value, int | float)
        if not ok or isinstance(value, bool) or not math.isfinite(value):
            return f"'{key}' is {value!r}; it must be {'an integer' if kind is int else 'a finite number'}"
    for key in (NUM_EXAMPLES_KEY, DATA_SIZE_KEY):
        if metrics[key] <= 0:
            return f"'{key}' is {metrics[key]!r}; it must be a positive integer"
    pid = metrics[PARTITION_KEY]
    if pid < 0 or (num_partitions is not None and pid >= num_partitions):
        bound = f"in [0, {num_partitions})" if num_partitions is not None else ">= 0"
        return f"'{PARTITION_KEY}' is {pid}; it must be {bound}"
    return None


def sent_shapes(messages: list[Message]) -> dict[int, Shapes]:
    """The names and shapes of the adapter each node was sent, by node id."""
    return {m.metadata.dst_node_id: shapes_of(m.content[ARRAYS_KEY]) for m in messages if ARRAYS_KEY in m.content}


def claimed_partition(msg: Message) -> int | None:
    """The partition a reply claims, if it is a plain int (for logs; never trusted before validation)."""
    try:
        pid = msg.content[METRICS_KEY][PARTITION_KEY]
    except Exception:  # noqa: BLE001
        return None
    return pid if is_integer(pid) else None


def split_replies(
    replies: list[Message],
    spec: ReplySpec | Shapes,
    sent_to: set[int] | None = None,
    book: PartitionBook | None = None,
    by_node: dict[int, Shapes] | None = None,
) -> tuple[list[Message], list[dict[str, Any]]]:
    """Replies to aggregate (errors included, as Flower counts them as failures) and the rejected ones.

    ``sent_to`` (the nodes this round's messages went to) and ``book`` (node -> partition) add the
    checks on who sent the reply; ``by_node`` (node -> the shapes it was sent, :func:`sent_shapes`) replaces
    ``spec.shapes`` for that node's reply. Each rejection is ``{"node", "partition", "reason"}``, ``partition``
    being the node's known partition, else the one it claimed if that is an int, else None.
    """
    spec = spec if isinstance(spec, ReplySpec) else ReplySpec(spec)
    kept, rejected, seen = [], [], set()
    claims = {
        m.metadata.src_node_id: claimed_partition(m)
        for m in replies
        if not m.has_error() and (sent_to is None or m.metadata.src_node_id in sent_to)
    }
    contested = book.contested(claims) if book is not None else set()
    for msg in replies:
        node = msg.metadata.src_node_id
        own = replace(spec, shapes=by_node[node]) if by_node and node in by_node else spec
        problem = None if msg.has_error() else _sender_problem(msg, node, own, sent_to, seen, book, contested)
        seen.add(node)
        if problem is None:
            if book is not None and not msg.has_error():
                book.bind(node, msg.content[METRICS_KEY][PARTITION_KEY])
            kept.append(msg)
            continue
        known = book.by_node.get(node) if book is not None else None
        rejected.append({"node": node, "partition": known if known is not None else claimed_partition(msg),
                         "reason": problem})  # fmt: skip
    return kept, rejected


def _sender_problem(
    msg: Message,
    node: int,
    spec: ReplySpec,
    sent_to: set[int] | None,
    seen: set[int],
    book: PartitionBook | None,
    contested: set[int],
) -> str | None:
    if sent_to is not None and node not in sent_to:
        return "the server sent this node no message this round"
    if node in seen:
        return "a second reply from this node in the same round"
    if problem := reply_problem(msg.content, spec):
        return problem
    return book.problem(node, msg.content[METRICS_KEY][PARTITION_KEY], contested) if book is not None else None
