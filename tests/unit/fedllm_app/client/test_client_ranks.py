"""A client of its own LoRA rank, through the ClientApp's code path: the rank it tells the server, the adapter it
trains (the global's first ranks, at the global's scaling), and the bad ranks it refuses.
"""

import re

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from peft.tuners.lora import LoraLayer

from fedllm_app.client_app import app
from fedllm_app.comm.packing import unpack_content
from fedllm_app.config import load_config
from fedllm_app.model import get_adapter, get_model, set_adapter, with_client_rank
from strategies.fedavg import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY
from strategies.hetero import RANK_KEY, RANK_QUERY
from strategies.hetero_rank import pad_rank, rank_of, slice_rank
from strategies.records import from_record, to_record

HET = "lora_aggregation=hetlora model.lora.r=8 model.lora.alpha=16 model.lora.client_ranks=[2,4]"


def context(overrides, **node_config):
    return Context(
        run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={"overrides": overrides}
    )


def ask_rank(ctx):
    query = Message(RecordDict({CONFIG_KEY: ConfigRecord({})}), dst_node_id=1, message_type=RANK_QUERY)
    return int(app(query, ctx).content[METRICS_KEY][RANK_KEY])


def test_a_node_says_its_node_config_rank_else_its_client_ranks_entry_else_r():
    assert ask_rank(context(HET, **{"partition-id": 1, "lora-rank": 8})) == 8
    assert ask_rank(context(HET, **{"partition-id": 1})) == 4
    assert ask_rank(context(HET, **{"partition-id": 2})) == 2  # client_ranks[2 % 2]
    assert ask_rank(context("model.lora.r=8", **{"partition-id": 0})) == 8
    assert ask_rank(context("model.lora.r=8", **{"partition-id": 0, "lora-rank": "8"})) == 8  # homogeneous, same r


@pytest.mark.parametrize(
    ("overrides", "rank", "pattern"),
    [
        (HET, 16, r"lora-rank=16 must be an integer in 1..model.lora.r=8"),
        (HET, "big", r"lora-rank='big' must be an integer"),
        ("model.lora.r=8", 4, r"lora-rank=4 but lora_aggregation=homogeneous.*lora_aggregation=hetlora"),
    ],
)
def test_a_bad_node_rank_fails_naming_it_and_the_fix_on_the_node_and_a_code_to_the_server(
    overrides, rank, pattern, caplog
):
    with pytest.raises(Exception, match=r"^E_CONFIG") as raised:
        ask_rank(context(overrides, **{"partition-id": 0, "lora-rank": rank}))
    assert str(rank) not in str(raised.value)  # the details stay on the node
    assert re.search(pattern, caplog.text)


@pytest.mark.slow
def test_a_client_trains_the_first_ranks_of_the_global_at_the_globals_scaling():
    overrides = HET + " training.max_steps=2 training.batch_size=2 num_clients=2 sample_clients=2"
    cfg = load_config({"overrides": overrides})
    server, _ = get_model(cfg.model, cfg.seed)
    global_ = get_adapter(server)
    sent = slice_rank(global_, 2)
    msg = Message(
        RecordDict({ARRAYS_KEY: to_record(sent), CONFIG_KEY: ConfigRecord({"server-round": 1, "lr": 5e-3})}),
        dst_node_id=1,
        message_type="train",
    )
    reply = app(msg, context(overrides, **{"partition-id": 0}))
    trained = from_record(unpack_content(reply.content)[ARRAYS_KEY])
    assert rank_of(trained) == 2 and any(not np.allclose(trained[k], sent[k]) for k in sent)
    client, tokenizer = get_model(with_client_rank(cfg, 2).model, cfg.seed)
    scalings = {m.scaling["default"] for m in client.modules() if isinstance(m, LoraLayer)}
    assert scalings == {16 / 8}  # alpha / r_max, not alpha / 2
    # So the client's adapter, zero-padded to r_max in the server's model, is the same model.
    ids = torch.tensor([tokenizer("a federated sentence").input_ids])
    with torch.no_grad():
        own = client(input_ids=ids).logits
        set_adapter(server, pad_rank(trained, 8))
        padded = server(input_ids=ids).logits
        set_adapter(server, global_)
    torch.testing.assert_close(own, padded, rtol=1e-5, atol=1e-5)
