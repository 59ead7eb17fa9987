"""The client clips its update (with SCAFFOLD's control delta) to the norm the server's DP round names."""

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict

from fedllm_app.client.round import dp_clip
from strategies.dp import CLIP_NORM_KEY, WITHIN_CLIP_KEY
from strategies.fedavg import CONFIG_KEY
from strategies.records import from_record, to_record
from strategies.scaffold import C_DELTA_KEY

GLOBAL = {"a": np.zeros(2, dtype=np.float32), "b": np.ones(1, dtype=np.float32)}


def train_message(config):
    return Message(RecordDict({CONFIG_KEY: ConfigRecord(config)}), dst_node_id=1, message_type="train")


def test_an_update_above_the_clip_norm_is_scaled_onto_it_with_the_control_delta():
    trained = {"a": np.array([3.0, 0.0], dtype=np.float32), "b": np.ones(1, dtype=np.float32)}  # delta (3, 0 | 0)
    extras = {C_DELTA_KEY: to_record({"a": np.array([0.0, 4.0], dtype=np.float32), "b": np.zeros(1, np.float32)})}
    new, clipped, within = dp_clip(train_message({CLIP_NORM_KEY: 1.0}), GLOBAL, trained, extras)
    np.testing.assert_allclose(new["a"], [0.6, 0.0], rtol=1e-6)
    np.testing.assert_allclose(new["b"], [1.0])
    np.testing.assert_allclose(from_record(clipped[C_DELTA_KEY])["a"], [0.0, 0.8], rtol=1e-6)
    assert within == {WITHIN_CLIP_KEY: 0.0} and new["a"].dtype == np.float32


def test_an_update_within_the_norm_travels_unchanged_and_says_so():
    trained = {"a": np.array([0.1, 0.0], dtype=np.float32), "b": np.ones(1, dtype=np.float32)}
    new, _, within = dp_clip(train_message({CLIP_NORM_KEY: 1.0}), GLOBAL, trained, {})
    np.testing.assert_allclose(new["a"], trained["a"])
    assert within == {WITHIN_CLIP_KEY: 1.0}


def test_without_dp_the_reply_is_untouched():
    trained = {"a": np.array([30.0, 0.0], dtype=np.float32), "b": np.ones(1, dtype=np.float32)}
    new, extras, within = dp_clip(train_message({"lr": 0.1}), GLOBAL, trained, {})
    assert new is trained and extras == {} and within == {}
