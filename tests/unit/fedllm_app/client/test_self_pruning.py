"""HetLoRA's rank self-pruning on a real client: through the ClientApp, a tiny model trains with the tail
regulariser, prunes, and replies with the shapes it was sent; the next round it trains the rank it kept."""

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedllm_app.client_app import app
from fedllm_app.comm.packing import unpack_content
from fedllm_app.config import load_config
from fedllm_app.model import get_adapter, get_model, with_client_rank
from fedllm_app.server.reply_checks import reply_problem
from strategies.fedavg import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY
from strategies.hetero import RANK_KEY
from strategies.hetero_rank import A_SUFFIX, B_SUFFIX, rank_of, slice_rank, tail_norm
from strategies.records import from_record, to_record

OVERRIDES = (
    "lora_aggregation=hetlora model.lora.r=8 model.lora.alpha=16 model.lora.client_ranks=[4] "
    "hetlora_prune.enabled=true hetlora_prune.decay=0.5 hetlora_prune.weight=100.0 "
    "training.max_steps=2 training.batch_size=2 num_clients=2 sample_clients=2"
)


def train(sent, ctx, server_round):
    config = ConfigRecord({"server-round": server_round, "lr": 1e-2})
    msg = Message(RecordDict({ARRAYS_KEY: to_record(sent), CONFIG_KEY: config}), dst_node_id=1, message_type="train")
    return unpack_content(app(msg, ctx).content)  # as the server reads it


@pytest.mark.slow
def test_a_pruning_client_drops_its_rank_and_replies_with_the_shapes_it_was_sent():
    cfg = load_config({"overrides": OVERRIDES})
    server, _ = get_model(cfg.model, cfg.seed)
    rng = np.random.default_rng(0)
    global_ = {  # a global whose B is no longer LoRA's zero start, so the tail has a size to shrink
        k: (rng.normal(scale=0.05, size=v.shape).astype(np.float32) if k.endswith(B_SUFFIX) else v)
        for k, v in get_adapter(server).items()
    }
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(),
                  run_config={"overrides": OVERRIDES})  # fmt: skip
    sent = slice_rank(global_, 4)  # the node's declared rank: client_ranks=[4]
    reply = train(sent, ctx, 1)
    trained = from_record(reply[ARRAYS_KEY])
    assert reply[METRICS_KEY][RANK_KEY] == 2  # floor(0.5 * 4): the tail shrank under the regulariser
    assert reply_problem(reply, {k: v.shape for k, v in sent.items()}) is None  # the shapes it was sent
    assert tail_norm(trained, 2) == 0.0 and tail_norm(sent, 2) > 0  # the pruned ranks are zero
    assert any(not np.allclose(trained[k][:2], sent[k][:2]) for k in sent if k.endswith(A_SUFFIX))  # it trained

    kept = slice_rank(trained, 2)  # what the server sends the node from now on
    reply = train(kept, ctx, 2)
    again = from_record(reply[ARRAYS_KEY])
    assert rank_of(again) == 2 and reply[METRICS_KEY][RANK_KEY] in (1, 2)
    assert reply_problem(reply, {k: v.shape for k, v in kept.items()}) is None
    model, _ = get_model(with_client_rank(cfg, 4).model, cfg.seed)  # the node's model keeps its declared rank 4
    held = get_adapter(model)  # its ranks 2-3 stayed zero: one base model per node, however far it prunes
    assert rank_of(held) == 4 and tail_norm(held, 2) == 0.0
    assert not any(v[2:].any() if k.endswith(A_SUFFIX) else v[:, 2:].any() for k, v in held.items())
