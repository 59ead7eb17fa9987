"""Error feedback on the client (``comm.codec`` lossy): kept for federated rounds, never for a local-only round
(whose delta is the client's whole drift, so a residual would be counted again every round) nor under DP (the
residual would push the encoded update past the clip norm)."""

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedllm_app.client_app import encoded
from fedllm_app.config import load_config
from strategies.fedavg import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY
from strategies.records import to_record


def residuals_after_one_reply(mode: str, extra: str = "") -> list[str]:
    cfg = load_config({"overrides": f"comm.codec=topk comm.topk_fraction=0.25 {extra}"})
    sent = {"w": np.zeros(40, np.float32)}
    msg = Message(RecordDict({ARRAYS_KEY: to_record(sent), CONFIG_KEY: ConfigRecord({"mode": mode})}),
                  dst_node_id=1, message_type="train")  # fmt: skip
    trained = {"w": np.linspace(-1, 1, 40, dtype=np.float32)}
    content = RecordDict({ARRAYS_KEY: to_record(trained), METRICS_KEY: MetricRecord({"num-examples": 1})})
    context = Context(1, 1, {"partition-id": 0}, RecordDict(), {})
    encoded(content, msg, cfg, context, pid=0)
    return [k for k in context.state.keys() if k.startswith("comm-residual")]


def test_a_federated_round_keeps_what_top_k_did_not_send():
    assert residuals_after_one_reply("federated") == ["comm-residual:0:arrays"]


def test_a_local_only_round_keeps_no_residual_to_count_again():
    assert residuals_after_one_reply("local") == []


def test_a_dp_round_keeps_no_residual_that_would_pass_the_clip_norm():
    assert residuals_after_one_reply("federated", "privacy.dp=true baseline=none") == []
