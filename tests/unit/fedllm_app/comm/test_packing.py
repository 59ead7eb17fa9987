"""A message's arrays travel as one Flower array per record (a few objects instead of one or two per array), come
back exactly, and a packed record that does not add up is refused by name, never loaded."""

import re

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_object_tree, iterate_object_tree

from fedllm_app.comm.codecs import CodecError, CommParams
from fedllm_app.comm.packing import PACK_KEY, PACKED, pack_content, unpack_content
from fedllm_app.comm.wire import to_wire
from fedllm_app.server.rounds import decode_replies
from strategies.fedavg import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY
from strategies.records import to_record


def adapter(n=28, seed=0):
    rng = np.random.default_rng(seed)
    return {f"layer{i}.lora_{'AB'[i % 2]}": rng.normal(size=(8, 16)).astype(np.float32) for i in range(n)}


def objects(content: RecordDict) -> int:
    msg = Message(content, dst_node_id=1, message_type="train")
    return sum(1 for _ in iterate_object_tree(get_object_tree(msg)))


def test_a_train_message_of_28_arrays_travels_as_a_handful_of_objects_not_dozens():
    content = RecordDict({ARRAYS_KEY: to_record(adapter()), CONFIG_KEY: ConfigRecord({"server-round": 1})})
    [wire] = to_wire([Message(content, dst_node_id=1, message_type="train")], CommParams())
    assert objects(content) > 56  # each array and its chunk: what Flower 1.42 moves request by request
    assert objects(wire.content) <= 8


def test_the_global_every_sampled_node_is_sent_is_packed_once_and_each_node_reads_it_whole(monkeypatch):
    import fedllm_app.comm.packing as packing

    calls = []
    real = packing._packed
    monkeypatch.setattr(packing, "_packed", lambda record: calls.append(record) or real(record))
    shared = RecordDict({ARRAYS_KEY: to_record(adapter()), CONFIG_KEY: ConfigRecord({"server-round": 1})})
    other = RecordDict({ARRAYS_KEY: to_record(adapter(seed=1)), CONFIG_KEY: ConfigRecord({"server-round": 1})})
    sent = [Message(c, dst_node_id=n, message_type="train") for n, c in enumerate([shared, shared, shared, other])]
    wire = to_wire(sent, CommParams())
    assert len(calls) == 2  # the shared global once, the other node's own record once
    for m, w in zip(sent, wire, strict=True):
        back = unpack_content(w.content)[ARRAYS_KEY]
        for name, value in m.content[ARRAYS_KEY].items():
            assert np.array_equal(back[name].numpy(), value.numpy()), name


def test_every_dtype_and_shape_comes_back_exactly_and_records_of_one_array_stay_as_they_are():
    arrays = {
        "w": np.arange(12, dtype=np.float32).reshape(3, 4).T,  # not contiguous
        "scalar": np.array(2.5, dtype=np.float16),
        "codes": np.array([1, 255, 7], dtype=np.uint8),
        "idx": np.array([3, -1], dtype=np.int64),
        "empty": np.zeros((0, 5), dtype=np.float32),
        "flag": np.array([True, False]),
    }
    record = ArrayRecord({k: Array.from_numpy_ndarray(v) for k, v in arrays.items()})  # keeps the 0-d array
    content = RecordDict(
        {ARRAYS_KEY: record, "single": to_record({"m": np.ones(3, np.float32)}),
         METRICS_KEY: MetricRecord({"x": 1.0})}
    )  # fmt: skip
    packed = pack_content(content)
    assert list(packed[ARRAYS_KEY].keys()) == [PACKED] and list(packed["single"].keys()) == ["m"]
    back = unpack_content(packed)
    assert list(back[ARRAYS_KEY].keys()) == list(arrays)
    for name, value in arrays.items():
        got = back[ARRAYS_KEY][name].numpy()
        assert got.dtype == value.dtype and got.shape == value.shape and np.array_equal(got, value), name
    assert dict(back[METRICS_KEY]) == {"x": 1.0} and PACK_KEY not in back
    assert unpack_content(content) is content  # an unpacked message (e.g. an older client's) reads as it is


def packed_with(change):
    content = pack_content(RecordDict({ARRAYS_KEY: to_record({"a": np.ones(4, np.float32), "b": np.zeros(2)})}))
    change(content)
    return content


def set_index(key, value):
    def change(content):
        index = dict(content[PACK_KEY])
        index[key] = value
        content[PACK_KEY] = ConfigRecord(index)

    return change


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (set_index("dtypes:arrays", ["|O", "<f8"]), "declares dtype '|O', not a number type"),
        (set_index("dtypes:arrays", ["<U4", "<f8"]), "not a number type"),
        (set_index("dtypes:arrays", ["nonsense", "<f8"]), "not a number type"),
        (set_index("shapes:arrays", ["5", "2"]), "is shorter than its arrays declare (at 'b')"),  # 20 + 16 > 32
        (set_index("shapes:arrays", ["3", "2"]), "holds 4 bytes more than its arrays declare"),
        (set_index("shapes:arrays", ["-4", "2"]), "not a possible one"),
        (set_index("shapes:arrays", ["x", "2"]), "not a possible one"),
        (set_index("names:arrays", ["a", "a"]), "no consistent list of names"),
        (set_index("names:arrays", ["a"]), "no consistent list of names"),
        (set_index("records", ["arrays", "ghost"]), "records ['ghost'] are listed as packed"),
        (lambda c: c.__setitem__(ARRAYS_KEY, to_record({"a": np.ones(2), "b": np.ones(2)})), "is not one array"),
        (lambda c: c.__setitem__(ARRAYS_KEY, ArrayRecord({PACKED: Array.from_numpy_ndarray(np.ones(8))})), "uint8"),
        (lambda c: c.__setitem__(PACK_KEY, MetricRecord({"records": 1.0})), "not a ConfigRecord"),
    ],
)
def test_a_packed_record_that_does_not_add_up_is_refused_by_name(change, words):
    with pytest.raises(CodecError, match=re.escape(words)):
        unpack_content(packed_with(change))


def test_the_server_rejects_a_reply_whose_pack_does_not_add_up_and_keeps_the_others():
    sent = to_record({"a": np.ones(4, np.float32), "b": np.zeros(2, np.float32)})
    messages = [Message(RecordDict({ARRAYS_KEY: sent}), dst_node_id=n, message_type="train") for n in (1, 2)]
    replies = []
    for m in messages:
        reply = Message(pack_content(RecordDict({ARRAYS_KEY: sent, METRICS_KEY: MetricRecord({"x": 1.0})})), reply_to=m)
        reply.metadata.__dict__["_src_node_id"] = m.metadata.dst_node_id
        replies.append(reply)
    set_index("dtypes:arrays", ["|O", "<f4"])(replies[1].content)
    decoded, rejected, _ = decode_replies(replies, messages, CommParams())
    assert [r.metadata.src_node_id for r in decoded] == [1] and list(decoded[0].content[ARRAYS_KEY].keys()) == [
        "a",
        "b",
    ]
    [why] = rejected
    assert why["node"] == 2 and "not a number type" in why["reason"]
