"""A fake Flower Grid for strategy and round-loop tests: Flower's own Messages, no SuperLink.

Node ``k`` answers the server's partition query with partition ``k - 1``, or the partition that a
``{node: partition}`` mapping or ``partition_of`` gives it (None: it never answers). Train messages pushed
through ``push_messages`` are answered on ``pull_messages`` by ``reply(msg)``, which returns the reply's
content (None: the node stays silent this round). :func:`trained_reply` is an honest node's reply: the global
arrays plus the node id, float32, with a data size, as clients send them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import numpy as np
from flwr.app import Message, MetricRecord, RecordDict

from strategies.fedavg import (
    ARRAYS_KEY,
    CONFIG_KEY,
    DATA_SIZE_KEY,
    METRICS_KEY,
    NUM_EXAMPLES_KEY,
    PARTITION_KEY,
    QUERY_KEY,
)
from strategies.records import from_record, to_record


class FakeGrid:
    """Nodes ``1..nodes``, the ids given or a mapping's keys; ``queries`` keeps every query it was sent."""

    def __init__(
        self,
        nodes: int | Iterable[int] | Mapping[int, int | None] = 2,
        reply: Callable[[Message], RecordDict | None] | None = None,
        partition_of: Callable[[int], int | None] | None = None,
    ) -> None:
        self.node_ids = list(range(1, nodes + 1)) if isinstance(nodes, int) else list(nodes)
        self.reply = reply or trained_reply
        if isinstance(nodes, Mapping):
            partition_of = nodes.get
        self.partition = partition_of or (lambda node: node - 1)
        self.sent: dict[str, Message] = {}
        self.queries: list[Message] = []

    @property
    def n(self) -> int:
        return len(self.node_ids)

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        """Each node's answer to a query (the partition query unless :meth:`answer_query` is overridden)."""
        out = []
        for m in messages:
            self.queries.append(m)
            answer = self.answer_query(m)
            if answer is not None:
                out.append(Message(RecordDict({METRICS_KEY: MetricRecord(answer)}), reply_to=m))
        return out

    def answer_query(self, query: Message) -> dict | None:
        """The partition query, exactly as the strategies send it: the node's partition."""
        assert query.metadata.message_type == "query", query.metadata.message_type
        assert dict(query.content[CONFIG_KEY]) == {QUERY_KEY: PARTITION_KEY}
        pid = self.partition(query.metadata.dst_node_id)
        return None if pid is None else {PARTITION_KEY: pid}

    def push_messages(self, messages) -> list[str]:
        for m in messages:
            m.metadata.__dict__["_message_id"] = m.object_id
            self.sent[m.object_id] = m
            if m.metadata.message_type == "query":
                self.queries.append(m)
        return [m.object_id for m in messages]

    def pull_messages(self, ids) -> list[Message]:
        """Replies to the messages ``ids``: a query stays unanswered (kept) while its node answers nothing."""
        out = []
        for i in ids:
            msg = self.sent.get(i)
            if msg is None:
                continue
            if msg.metadata.message_type == "query":
                answer = self.answer_query(msg)
                if answer is None:
                    continue
                content = RecordDict({METRICS_KEY: MetricRecord(answer)})
            else:
                content = self.reply(msg)
            del self.sent[i]
            if content is not None:
                out.append(Message(content, reply_to=msg))
        return out


def trained_reply(msg: Message, data_size: int = 10) -> RecordDict:
    """Node ``k``'s honest reply: the global arrays + ``k`` (float32), 10 examples, partition ``k - 1``."""
    node = msg.metadata.dst_node_id
    arrays = {k: (v + node).astype(np.float32) for k, v in from_record(msg.content[ARRAYS_KEY]).items()}
    metrics = {NUM_EXAMPLES_KEY: 10, DATA_SIZE_KEY: data_size, "train_loss": 1.0, PARTITION_KEY: node - 1}
    return RecordDict({ARRAYS_KEY: to_record(arrays), METRICS_KEY: MetricRecord(metrics)})


class Writer:
    """The round loop's run writer, keeping each round's record in ``rows`` instead of writing metrics.jsonl."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def log_round(self, record: dict, path: str = "metrics.jsonl") -> None:
        self.rows.append(record)


def logged(caplog, logger: str = "fedllm", level: str | None = None) -> list[str]:
    """The messages ``logger`` logged in this test (only those of ``level``, e.g. ``"ERROR"``, if given)."""
    return [r.getMessage() for r in caplog.records if r.name == logger and level in (None, r.levelname)]


def changed_metrics(content, changes):
    """``content`` with its metrics record changed by ``changes`` (a value of None removes the key)."""
    metrics = dict(content[METRICS_KEY])
    for key, value in changes.items():
        if value is None:
            metrics.pop(key)
        else:
            metrics[key] = value
    content[METRICS_KEY] = MetricRecord(metrics)
    return content
