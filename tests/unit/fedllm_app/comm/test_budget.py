"""The budget's estimate of a round: a reply is never assumed smaller than what its arrays take on the uplink."""

import numpy as np
from flwr.app import RecordDict

from fedllm_app.comm.budget import MB, Budget, reply_guess
from fedllm_app.comm.codecs import CommParams
from strategies.records import to_record

ADAPTER = {"a.lora_A.weight": np.zeros((16, 256), np.float32), "a.lora_B.weight": np.zeros((256, 16), np.float32)}


def test_an_fp32_uplink_under_an_fp16_downlink_is_not_estimated_at_the_messages_size():
    message = RecordDict({"arrays": to_record(ADAPTER)})
    fp32 = 4 * sum(a.size for a in ADAPTER.values())
    down = [fp32 // 2] * 2  # two clients sent the global in fp16
    guess = [reply_guess(message, CommParams(codec="none", downlink="fp16"))] * 2
    assert all(g >= fp32 for g in guess)
    budget = Budget(budget_mb=(sum(down) + 2 * fp32) / MB * 0.99)  # below what the round will really move
    assert budget.stop_reason(1, 0, down) is None  # the old estimate (replies as large as the messages) ran it
    assert budget.stop_reason(1, 0, down, guess).startswith("communication budget: round 1 would need about")


def test_scaffold_replies_are_guessed_with_their_control_delta_and_secure_ones_as_field_elements():
    plain = reply_guess(RecordDict({"arrays": to_record(ADAPTER)}), CommParams())
    scaffold = RecordDict({"arrays": to_record(ADAPTER), "c-server": to_record(ADAPTER)})
    assert reply_guess(scaffold, CommParams()) > 2 * 4 * sum(a.size for a in ADAPTER.values())
    wide = reply_guess(RecordDict({"arrays": to_record(ADAPTER)}), CommParams(), field_bits=64)
    assert wide - plain == 4 * sum(a.size for a in ADAPTER.values())  # 8-byte field elements, not 4
