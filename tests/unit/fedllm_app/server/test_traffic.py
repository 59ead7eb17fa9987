"""Bytes per node: what the server sent to each node and what it received back, counted apart."""

import numpy as np
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fedllm_app.server.rounds import content_bytes, traffic
from strategies.fedavg import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY
from strategies.records import to_record


def test_sent_and_received_bytes_are_each_directions_own_payload():
    down = RecordDict({ARRAYS_KEY: to_record({"w": np.zeros(4, np.float32)}), CONFIG_KEY: ConfigRecord({"lr": 0.1})})
    messages = [Message(down, dst_node_id=node, message_type="train") for node in (7, 9)]
    up = [
        RecordDict(
            {ARRAYS_KEY: to_record({"w": np.zeros(n, np.float32)}), METRICS_KEY: MetricRecord({"partition-id": p})}
        )
        for n, p in ((100, 0), (1000, 1))
    ]
    replies = [Message(content, reply_to=msg) for content, msg in zip(up, messages, strict=True)]
    totals = {"bytes_sent_total": 5, "bytes_received_total": 6}

    out = traffic(messages, replies, totals)

    assert out["bytes_by_node"] == {
        "7": {"partition": 0, "sent": content_bytes(down), "received": content_bytes(up[0])},
        "9": {"partition": 1, "sent": content_bytes(down), "received": content_bytes(up[1])},
    }
    assert content_bytes(up[1]) >= 4000 > content_bytes(down)  # the two directions differ
    assert out["bytes_sent"] == 2 * content_bytes(down)
    assert out["bytes_received"] == content_bytes(up[0]) + content_bytes(up[1])
    assert totals == {"bytes_sent_total": 5 + out["bytes_sent"], "bytes_received_total": 6 + out["bytes_received"]}
