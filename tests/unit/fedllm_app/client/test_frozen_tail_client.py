"""HetLoRA's frozen tail on a real client: through the ClientApp, a tiny model of the global's rank loads the
whole global, trains only the ranks the server names, holds the others exactly, and replies with its own ranks."""

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedllm_app.client_app import app
from fedllm_app.comm.packing import unpack_content
from fedllm_app.config import load_config
from fedllm_app.model import get_adapter, get_model
from fedllm_app.server.reply_checks import reply_problem
from strategies.fedavg import ARRAYS_KEY, CONFIG_KEY
from strategies.hetero import TRAIN_RANK_KEY
from strategies.hetero_rank import A_SUFFIX, B_SUFFIX, rank_of, slice_rank
from strategies.records import from_record, to_record

OVERRIDES = (
    "lora_aggregation=hetlora hetlora_tail=frozen model.lora.r=8 model.lora.alpha=16 model.lora.client_ranks=[4] "
    "training.max_steps=2 training.batch_size=2 num_clients=2 sample_clients=2"
)


def tail(arrays, rank):
    return {k: v[rank:] if k.endswith(A_SUFFIX) else v[:, rank:] for k, v in arrays.items()}


@pytest.mark.slow
def test_a_frozen_tail_client_trains_its_first_ranks_holds_the_rest_and_replies_with_its_own_ranks():
    cfg = load_config({"overrides": OVERRIDES})
    server, _ = get_model(cfg.model, cfg.seed)
    rng = np.random.default_rng(0)
    global_ = {  # a global whose B is no longer zero, so every rank has a gradient
        k: (rng.normal(scale=0.05, size=v.shape).astype(np.float32) if k.endswith(B_SUFFIX) else v)
        for k, v in get_adapter(server).items()
    }
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(),
                  run_config={"overrides": OVERRIDES})  # fmt: skip
    config = ConfigRecord({"server-round": 1, "lr": 1e-2, TRAIN_RANK_KEY: 4})
    msg = Message(RecordDict({ARRAYS_KEY: to_record(global_), CONFIG_KEY: config}), dst_node_id=1, message_type="train")
    reply = unpack_content(app(msg, ctx).content)  # as the server reads it
    trained = from_record(reply[ARRAYS_KEY])
    own = slice_rank(global_, 4)
    assert rank_of(trained) == 4 and reply_problem(reply, {k: v.shape for k, v in own.items()}) is None
    assert any(not np.allclose(trained[k], own[k]) for k in own if k.endswith(A_SUFFIX))  # it trained
    model, _ = get_model(cfg.model, cfg.seed)  # the client's model has the global's rank 8
    held = get_adapter(model)
    assert rank_of(held) == 8
    for k, v in tail(global_, 4).items():  # ranks 4-7: exactly the global's, though they had gradients
        np.testing.assert_array_equal(tail(held, 4)[k], v)
