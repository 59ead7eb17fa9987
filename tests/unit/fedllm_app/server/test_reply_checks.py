"""The server's checks on client replies, and the test-only fault injection that produces bad ones."""

import io

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from fedllm_app.client import faults
from fedllm_app.server.reply_checks import (
    REPLY_METRICS,
    PartitionBook,
    ReplySpec,
    reply_problem,
    sent_shapes,
    shapes_of,
    split_replies,
)
from strategies.fedavg import ARRAYS_KEY, DATA_SIZE_KEY, METRICS_KEY, NUM_EXAMPLES_KEY
from strategies.records import to_record
from strategies.scaffold import C_DELTA_KEY
from tests.fakes import changed_metrics

ADAPTER = {
    "m.lora_A.weight": np.ones((2, 4), dtype=np.float32),
    "m.lora_B.weight": np.zeros((4, 2), dtype=np.float32),
}


def good_content(n=10):
    return RecordDict(
        {
            ARRAYS_KEY: to_record(ADAPTER),
            METRICS_KEY: MetricRecord({NUM_EXAMPLES_KEY: n, DATA_SIZE_KEY: 20, "train_loss": 1.0, "partition-id": 0}),
        }
    )


EXPECTED = shapes_of(to_record(ADAPTER))


def test_a_sound_reply_passes():
    assert reply_problem(good_content(), EXPECTED) is None


@pytest.mark.parametrize(
    ("kind", "words"),
    [
        ("names", "array names differ"),
        ("shape", "has shape"),
        ("nan", "NaN or Inf"),
        ("inf", "NaN or Inf"),
        ("zero_examples", "'num-examples' is 0"),
        ("negative_examples", "'num-examples' is -5"),
    ],
)
def test_each_fault_is_caught_with_its_reason(kind, words):
    bad = faults.corrupt(good_content(), kind)
    problem = reply_problem(bad, EXPECTED)
    assert problem is not None and words in problem


def test_nan_in_an_extra_array_record_is_caught():
    content = good_content()
    delta = {k: v.copy() for k, v in ADAPTER.items()}
    delta["m.lora_B.weight"][0, 0] = np.inf
    content[C_DELTA_KEY] = to_record(delta)
    assert "of 'c-delta'" in reply_problem(content, ReplySpec(EXPECTED, (C_DELTA_KEY,)))


def test_missing_arrays_or_examples_are_caught():
    no_arrays = reply_problem(RecordDict({METRICS_KEY: MetricRecord({NUM_EXAMPLES_KEY: 1})}), EXPECTED)
    assert "missing ['arrays']" in no_arrays
    content = RecordDict({ARRAYS_KEY: to_record(ADAPTER), METRICS_KEY: MetricRecord({"train_loss": 1.0})})
    assert "'num-examples' is None" in reply_problem(content, EXPECTED)


def test_split_replies_names_the_node_and_keeps_errors_for_flower():
    sent = [Message(good_content(), dst_node_id=node, message_type="train") for node in (7, 8)]
    good = Message(good_content(), reply_to=sent[0])
    bad = Message(faults.corrupt(good_content(), "nan"), reply_to=sent[1])
    kept, rejected = split_replies([good, bad], EXPECTED)
    assert kept == [good]
    reason = "array 'm.lora_A.weight' contains NaN or Inf"
    assert rejected == [{"node": 8, "partition": 0, "reason": reason}]


def test_fault_entries_parse_and_bad_ones_are_named():
    from fedllm_app.config import ConfigError, parse_faults

    assert parse_faults(["nan-r1-p0", "zero_examples-r2-p1"]) == {(1, 0): "nan", (2, 1): "zero_examples"}
    assert parse_faults(["scale-every-p3"]) == {(0, 3): "scale"}
    with pytest.raises(ConfigError, match="'bogus-r1-p0'"):
        parse_faults(["bogus-r1-p0"])


def test_fault_injection_is_validated_in_the_config():
    from fedllm_app.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="fault_injection entry 'nan-1-0'"):
        load_config({"overrides": "fault_injection=[nan-1-0]"})


def test_each_reply_must_match_what_its_own_node_was_sent():
    """Clients of different LoRA ranks: nodes 7 and 9 were sent rank 1, node 8 the global's rank 2."""
    rank_1 = {"m.lora_A.weight": np.ones((1, 4), dtype=np.float32), "m.lora_B.weight": np.zeros((4, 1), np.float32)}
    sent = [
        Message(RecordDict({ARRAYS_KEY: to_record(rank_1)}), dst_node_id=7, message_type="train"),
        Message(good_content(), dst_node_id=8, message_type="train"),
        Message(RecordDict({ARRAYS_KEY: to_record(rank_1)}), dst_node_id=9, message_type="train"),
    ]
    own_rank = Message(RecordDict({**good_content(), ARRAYS_KEY: to_record(rank_1)}), reply_to=sent[0])
    global_rank = Message(good_content(), reply_to=sent[1])
    wrong_rank = Message(good_content(), reply_to=sent[2])  # node 9 was sent rank 1 too
    kept, rejected = split_replies([own_rank, global_rank, wrong_rank], EXPECTED, by_node=sent_shapes(sent))
    assert kept == [own_rank, global_rank]
    assert rejected[0]["reason"] == "array 'm.lora_A.weight' has shape (2, 4), the adapter it was sent has (1, 4)"


def test_the_attacks_send_a_scaled_or_flipped_update():
    global_ = {k: np.full_like(v, 0.5) for k, v in ADAPTER.items()}  # the adapter moved A by +0.5, B by -0.5
    scaled = faults.corrupt(good_content(), "scale", global_)[ARRAYS_KEY]
    flipped = faults.corrupt(good_content(), "signflip", global_)[ARRAYS_KEY]
    np.testing.assert_allclose(scaled["m.lora_A.weight"].numpy(), 0.5 + faults.SCALE * 0.5)
    np.testing.assert_allclose(flipped["m.lora_A.weight"].numpy(), 0.0)
    np.testing.assert_allclose(flipped["m.lora_B.weight"].numpy(), 1.0)
    assert reply_problem(faults.corrupt(good_content(), "scale", global_), EXPECTED) is None  # sound-looking


def with_metrics(changes):
    """A sound reply whose metrics are changed (a value of None removes the key)."""
    return changed_metrics(good_content(), changes)


def with_array(array, name="m.lora_A.weight"):
    content = good_content()
    arrays = dict(content[ARRAYS_KEY])
    arrays[name] = array
    content[ARRAYS_KEY] = ArrayRecord(arrays)
    return content


def npy(values):
    buf = io.BytesIO()
    np.save(buf, values, allow_pickle=False)
    return buf.getvalue()


def test_a_reply_with_every_metric_a_client_reports_is_sound():
    every = {
        "train_seconds": 1.5,
        "optimizer_seconds": 0.5,
        "peak_rss_mb": 900.0,
        "process_age_seconds": 30.0,
        "model_load_seconds": 2.0,
        "setup_seconds": 0.1,
        "dp-within-clip": 1.0,
        "lora-rank": 2,
    }
    assert reply_problem(with_metrics(every), EXPECTED) is None


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (
            lambda: RecordDict({METRICS_KEY: good_content()[METRICS_KEY]}),
            "records differ from ['arrays', 'metrics']: missing ['arrays'], unexpected []",
        ),
        (
            lambda: RecordDict({ARRAYS_KEY: to_record(ADAPTER), METRICS_KEY: to_record(ADAPTER)}),
            "'metrics' is a ArrayRecord, not a MetricRecord",
        ),
        (
            lambda: RecordDict(
                {**good_content(), ARRAYS_KEY: to_record({"m.lora_A.weight": ADAPTER["m.lora_A.weight"]})}
            ),
            "array names differ from the adapter it was sent: missing ['m.lora_B.weight'], unexpected []",
        ),
        (
            lambda: with_array(
                Array(dtype="float32", shape=(2, 4), stype="torch", data=npy(np.ones((2, 4), np.float32)))
            ),
            "array 'm.lora_A.weight' has serialization 'torch', not 'numpy.ndarray'",
        ),
        (
            lambda: with_array(Array(np.ones((2, 4), dtype=np.float64))),
            "array 'm.lora_A.weight' has dtype float64, not float32",
        ),
        (
            lambda: with_array(
                Array(dtype="float32", shape=(2, 4), stype="numpy.ndarray", data=npy(np.ones(8, np.float32)))
            ),
            "array 'm.lora_A.weight' holds float32 (8,) data, not the declared float32 (2, 4)",
        ),
        (
            lambda: with_array(Array(np.full((2, 4), np.inf, dtype=np.float32))),
            "array 'm.lora_A.weight' contains NaN or Inf",
        ),
        (
            lambda: with_metrics({"bogus": 1.0}),
            "unexpected metrics ['bogus']; a reply holds only " + str(sorted(REPLY_METRICS)),
        ),
        (lambda: with_metrics({"data-size": None}), "'data-size' is None; the reply must report it"),
        (lambda: with_metrics({"partition-id": None}), "'partition-id' is None; the reply must report it"),
        (lambda: with_metrics({"train_loss": None}), "'train_loss' is None; the reply must report it"),
        (lambda: with_metrics({"num-examples": 2.5}), "'num-examples' is 2.5; it must be an integer"),
        (lambda: with_metrics({"train_loss": float("inf")}), "'train_loss' is inf; it must be a finite number"),
        (lambda: with_metrics({"data-size": 0}), "'data-size' is 0; it must be a positive integer"),
        (lambda: with_metrics({"partition-id": -1}), "'partition-id' is -1; it must be >= 0"),
        (
            lambda: with_metrics({"lora-rank": 3}),
            "'lora-rank' is 3; a client can only keep or prune the ranks it was sent, 1..2",
        ),
        (
            lambda: with_metrics({"lora-rank": 0}),
            "'lora-rank' is 0; a client can only keep or prune the ranks it was sent, 1..2",
        ),
    ],
)
def test_each_unsound_reply_is_rejected_with_its_whole_reason(content, reason):
    assert reply_problem(content(), EXPECTED) == reason


@pytest.mark.parametrize(("pid", "reason"), [(0, None), (3, None), (4, "'partition-id' is 4; it must be in [0, 4)")])
def test_a_partition_id_must_lie_below_the_number_of_partitions(pid, reason):
    assert reply_problem(with_metrics({"partition-id": pid}), ReplySpec(EXPECTED, num_partitions=4)) == reason


@pytest.mark.parametrize("rank", [1, 2])
def test_a_client_may_keep_or_prune_to_any_rank_it_was_sent(rank):
    assert reply_problem(with_metrics({"lora-rank": rank}), EXPECTED) is None


def test_a_free_partition_claimed_by_several_nodes_in_one_round_is_contested():
    book = PartitionBook({1: 0})
    claims = {2: 1, 3: 1, 4: 0, 5: 0, 6: 2, 7: None}  # 0 is held (not contested); 2 is claimed once
    assert book.contested(claims) == {1}
    assert book.problem(2, 1, {1}) == "'partition-id' 1 is claimed by several nodes this round, and none holds it yet"


def test_a_node_keeps_its_partition_and_cannot_take_another_nodes():
    book = PartitionBook({1: 0})
    assert book.problem(1, 0) is None
    assert book.problem(6, 2) is None  # a free partition
    assert book.problem(1, 2) == "'partition-id' is 2, but this node trains partition 0"
    assert book.problem(4, 0) == "'partition-id' 0 belongs to node 1"


def test_the_round_plan_rebinds_nodes_and_partitions_claimed_before():
    book = PartitionBook({1: 0, 2: 1})
    book.assign({3: 0, 2: 5})
    assert book.by_node == {2: 5, 3: 0}


def test_two_nodes_claiming_one_free_partition_in_a_round_are_both_rejected_and_neither_is_bound():
    sent = [Message(good_content(), dst_node_id=node, message_type="train") for node in (7, 8, 9)]
    claims = [Message(changed_metrics(good_content(), {"partition-id": pid}), reply_to=m) for m, pid in
              zip(sent, (1, 1, 2), strict=True)]  # fmt: skip
    book = PartitionBook({})
    kept, rejected = split_replies(claims, EXPECTED, sent_to={7, 8, 9}, book=book)
    assert kept == [claims[2]]
    reason = "'partition-id' 1 is claimed by several nodes this round, and none holds it yet"
    assert rejected == [{"node": n, "partition": 1, "reason": reason} for n in (7, 8)]
    assert book.by_node == {9: 2}


class Unreadable(RecordDict):
    """A reply whose records cannot even be listed, with a 200-character reason."""

    def keys(self):
        raise RuntimeError("x" * 200)


def test_a_reply_that_breaks_the_reader_is_rejected_with_the_first_120_characters_of_the_error():
    assert reply_problem(Unreadable(), EXPECTED) == "unreadable reply (RuntimeError: " + "x" * 120 + ")"


def test_at_most_three_unexpected_records_arrays_or_metrics_are_named():
    extra = RecordDict({**good_content(), **{k: ConfigRecord({"v": 1}) for k in "abcd"}})
    assert (
        reply_problem(extra, EXPECTED)
        == "records differ from ['arrays', 'metrics']: missing [], unexpected ['a', 'b', 'c']"
    )
    four = {f"m{i}.lora_A.weight": (2, 4) for i in range(4)}
    assert reply_problem(good_content(), four) == (
        "array names differ from the adapter it was sent: missing ['m0.lora_A.weight', 'm1.lora_A.weight', "
        "'m2.lora_A.weight'], unexpected ['m.lora_A.weight', 'm.lora_B.weight']"
    )
    wide = to_record({f"n{i}": np.zeros(1, np.float32) for i in range(4)})
    assert reply_problem(RecordDict({**good_content(), ARRAYS_KEY: wide}), {"m": (1,)}) == (
        "array names differ from the adapter it was sent: missing ['m'], unexpected ['n0', 'n1', 'n2']"
    )
    assert reply_problem(with_metrics({k: 1.0 for k in ("a", "b", "c", "d")}), EXPECTED) == (
        "unexpected metrics ['a', 'b', 'c']; a reply holds only " + str(sorted(REPLY_METRICS))
    )


def test_an_error_reply_is_kept_for_flower_and_binds_no_partition():
    sent = [Message(good_content(), dst_node_id=node, message_type="train") for node in (7, 8)]
    failed = Message(Error(code=0, reason="out of memory"), reply_to=sent[0])
    good = Message(good_content(), reply_to=sent[1])
    book = PartitionBook({})
    assert split_replies([failed, good], EXPECTED, sent_to={7, 8}, book=book) == ([failed, good], [])
    assert book.by_node == {8: 0}


def test_a_reply_from_a_node_sent_nothing_is_rejected_and_contests_no_partition():
    sent = Message(good_content(), dst_node_id=7, message_type="train")
    stranger = Message(good_content(), reply_to=Message(RecordDict(), dst_node_id=99, message_type="train"))
    own = Message(good_content(), reply_to=sent)  # both claim the free partition 0
    book = PartitionBook({})
    kept, rejected = split_replies([stranger, own], EXPECTED, sent_to={7}, book=book)
    assert kept == [own]
    assert rejected == [{"node": 99, "partition": 0, "reason": "the server sent this node no message this round"}]
    assert book.by_node == {7: 0}


def test_a_rejected_node_is_named_with_the_partition_it_holds_not_the_one_it_claims():
    sent = Message(good_content(), dst_node_id=7, message_type="train")
    claim = Message(changed_metrics(good_content(), {"partition-id": 5}), reply_to=sent)
    book = PartitionBook({7: 3})
    assert split_replies([claim], EXPECTED, sent_to={7}, book=book) == (
        [],
        [{"node": 7, "partition": 3, "reason": "'partition-id' is 5, but this node trains partition 3"}],
    )
    assert book.by_node == {7: 3}
