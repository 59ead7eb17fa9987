"""The delta downlink on hand-made arrays: a node that holds a known copy gets the global's change against it,
its copy stays bit for bit the server's record of it over many rounds, and a node whose copy is unknown or
other than the server's gets (or asks for, by failing) the full global."""

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from fedllm_app.comm.codecs import CodecError, CommParams
from fedllm_app.comm.downlink import BASE, HELD_KEY, RESULT, Held, fingerprint
from fedllm_app.comm.wire import COMM_KEY, decode_message
from fedllm_app.config import ConfigError, load_config
from fedllm_app.server.rounds import content_bytes
from strategies.records import from_record, to_record
from strategies.scaffold import C_CLIENT_KEY, C_SERVER_KEY

GLOBAL = {"a": np.linspace(-1, 1, 512, dtype=np.float32).reshape(16, 32), "b": np.zeros((8, 32), np.float32)}


def _content(arrays, **more):
    return RecordDict({"arrays": to_record(arrays), **{k: to_record(v) for k, v in more.items()}})


def _message(content, node=1):
    return Message(content, dst_node_id=node, message_type="train")


def _step(arrays, rnd):
    """The next global: every value moved a little, a few moved a lot (what top-k should send first)."""
    rng = np.random.default_rng(rnd)
    out = {}
    for k, v in arrays.items():
        change = rng.standard_normal(v.shape).astype(np.float32) * 1e-3
        change.reshape(-1)[rng.choice(v.size, 4, replace=False)] += 0.5
        out[k] = (v + change).astype(np.float32)
    return out


def _node_receives(held, arrays, node, params, state):
    """The server encodes ``arrays`` for ``node``; the node decodes into ``state``; returns the wire content."""
    wire = held.encode(_content(arrays), node, params)
    msg = _message(wire, node)
    decode_message(msg, state)
    return wire, from_record(msg.content["arrays"])


def test_the_first_message_is_full_and_the_next_ones_are_changes_against_the_nodes_copy():
    params, held, state = CommParams(codec="int8", downlink_delta=True), Held(), {}
    first, _ = _node_receives(held, GLOBAL, 1, params, state)
    meta = first[COMM_KEY]
    assert RESULT + "arrays" in meta and BASE + "arrays" not in meta and meta["codec"] == "int8"
    held.settle({1})
    second, copy = _node_receives(held, _step(GLOBAL, 1), 1, params, state)
    assert second[COMM_KEY][BASE + "arrays"] == first[COMM_KEY][RESULT + "arrays"]
    # int8 of a change of about 0.5 at most (error <= 0.0071 x 0.51): closer than int8 of the global (x 1.0)
    np.testing.assert_allclose(copy["a"], _step(GLOBAL, 1)["a"], atol=0.004)


@pytest.mark.parametrize("codec", ["int8", "nf4", "topk", "fp16"])
def test_over_many_rounds_the_nodes_copy_is_bit_for_bit_the_servers_record_and_converges(codec):
    params, held = CommParams(codec=codec, topk_fraction=0.05, downlink_delta=True), Held()
    states, arrays = {1: RecordDict(), 2: RecordDict()}, GLOBAL  # as Flower keeps a node's state
    for rnd in range(1, 9):
        arrays = _step(arrays, rnd)
        for node in (1, 2):
            _node_receives(held, arrays, node, params, states[node])
        held.settle({1, 2})
        for node in (1, 2):
            kept = from_record(states[node][f"{HELD_KEY}:arrays"])
            for k in arrays:
                np.testing.assert_array_equal(kept[k], held.copies[node]["arrays"][k])
    # what a lossy change leaves out goes with the next one: the copy does not drift away from the global
    gap = max(float(np.abs(held.copies[1]["arrays"][k] - arrays[k]).max()) for k in arrays)
    assert gap < {"int8": 0.01, "nf4": 0.1, "topk": 0.6, "fp16": 1e-3}[codec]


def test_topk_sends_its_fraction_of_the_change_and_the_full_global_in_fp16():
    params, held, state = CommParams(codec="topk", topk_fraction=0.01, downlink_delta=True), Held(), {}
    big = {"a": np.random.default_rng(0).standard_normal((128, 512)).astype(np.float32)}
    first, _ = _node_receives(held, big, 1, params, state)
    assert first[COMM_KEY]["codec"] == "fp16" and "a#values" in first["arrays"]
    held.settle({1})
    second, _ = _node_receives(held, _step(big, 1), 1, params, state)
    assert second[COMM_KEY]["codec:arrays"] == "topk"
    assert second["arrays"]["a#indices"].numpy().size == 656  # ceil(1% of 65,536)
    # 1% of the values at 8 bytes (index and value) against 2 bytes each in fp16: 4%, and headers
    assert content_bytes(second) < 0.05 * content_bytes(first)


def test_a_node_that_did_not_answer_gets_the_full_global_and_one_left_out_of_a_round_gets_a_change():
    params, held, states = CommParams(codec="int8", downlink_delta=True), Held(), {1: {}, 2: {}}
    for node in (1, 2):
        _node_receives(held, GLOBAL, node, params, states[node])
    held.settle({1, 2})
    arrays = _step(GLOBAL, 1)
    _node_receives(held, arrays, 1, params, states[1])  # node 1 is sampled but its reply never comes
    held.settle(set())
    assert 1 not in held.copies and 2 in held.copies  # node 2 was not sampled: its copy is still known
    arrays = _step(arrays, 2)
    wire1, _ = _node_receives(held, arrays, 1, params, states[1])
    wire2, copy2 = _node_receives(held, arrays, 2, params, states[2])
    assert BASE + "arrays" not in wire1[COMM_KEY]  # full
    assert BASE + "arrays" in wire2[COMM_KEY]  # a change against its round-1 copy, two rounds' worth
    np.testing.assert_allclose(copy2["a"], arrays["a"], atol=0.01)


def test_a_node_that_lost_its_copy_refuses_the_change_and_its_next_message_is_full():
    params, held, state = CommParams(codec="int8", downlink_delta=True), Held(), {}
    _node_receives(held, GLOBAL, 1, params, state)
    held.settle({1})
    wire = held.encode(_content(_step(GLOBAL, 1)), 1, params)
    with pytest.raises(CodecError, match="against a copy this node does not hold"):
        decode_message(_message(wire), {})  # a restarted node: empty state
    held.settle(set())  # its reply was an error
    again = held.encode(_content(_step(GLOBAL, 1)), 1, params)
    assert BASE + "arrays" not in again[COMM_KEY]
    decode_message(_message(again), {})


def test_a_change_that_decodes_to_another_copy_than_the_servers_is_refused():
    params, held, state = CommParams(codec="fp16", downlink_delta=True), Held(), {}
    _node_receives(held, GLOBAL, 1, params, state)
    held.settle({1})
    wire = held.encode(_content(_step(GLOBAL, 1)), 1, params)
    wire[COMM_KEY] = ConfigRecord({**wire[COMM_KEY], RESULT + "arrays": fingerprint({"x": np.zeros(1)})})
    before = from_record(state[f"{HELD_KEY}:arrays"])
    with pytest.raises(CodecError, match="another copy than the server recorded"):
        decode_message(_message(wire), state)
    np.testing.assert_array_equal(from_record(state[f"{HELD_KEY}:arrays"])["a"], before["a"])  # state untouched


def test_scaffolds_control_arrays_travel_as_changes_too_and_a_rank_change_is_sent_in_full():
    params, held, state = CommParams(codec="int8", downlink_delta=True), Held(), {}
    controls = {
        C_SERVER_KEY: {"a": np.full((16, 32), 0.1, np.float32)},
        C_CLIENT_KEY: {"a": np.zeros((16, 32), np.float32)},
    }
    msg = _message(held.encode(_content(GLOBAL, **controls), 1, params))
    decode_message(msg, state)
    held.settle({1})
    smaller = {"a": GLOBAL["a"][:8], "b": GLOBAL["b"]}  # a rank slice of another shape
    moved = {C_SERVER_KEY: {"a": np.full((16, 32), 0.2, np.float32)}, C_CLIENT_KEY: controls[C_CLIENT_KEY]}
    wire = held.encode(_content(smaller, **moved), 1, params)
    meta = wire[COMM_KEY]
    assert BASE + C_SERVER_KEY in meta and BASE + C_CLIENT_KEY in meta and BASE + "arrays" not in meta
    msg = _message(wire)
    decode_message(msg, state)
    np.testing.assert_allclose(from_record(msg.content[C_SERVER_KEY])["a"], 0.2, atol=1e-3)
    assert from_record(msg.content["arrays"])["a"].shape == (8, 32)


def test_the_budget_stop_keeps_what_the_nodes_held():
    params, held, state = CommParams(codec="int8", downlink_delta=True), Held(), {}
    _node_receives(held, GLOBAL, 1, params, state)
    held.settle({1})
    held.encode(_content(_step(GLOBAL, 1)), 1, params)
    held.discard()  # never sent
    assert fingerprint(held.copies[1]["arrays"]) == fingerprint(from_record(state[f"{HELD_KEY}:arrays"]))


def test_a_downlink_delta_that_is_not_a_boolean_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match="comm.downlink_delta='maybe' must be true or false"):
        load_config({"overrides": "comm.downlink_delta=maybe"})
