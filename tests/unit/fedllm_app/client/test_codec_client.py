"""fedllm's ClientApp with comm.codec: it accepts the run's comm settings, decodes the encoded train message,
trains, and replies with its encoded delta, keeping the error-feedback residual in the node's state."""

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, RecordDict

from fedllm_app.client_app import _train
from fedllm_app.comm.codecs import CommParams
from fedllm_app.comm.packing import unpack_content
from fedllm_app.comm.wire import COMM_KEY, RESIDUAL_KEY, decode_reply, to_wire
from fedllm_app.config import load_config
from fedllm_app.model import get_adapter, get_model
from fedllm_app.server.run import build_strategy
from strategies.fedavg import ARRAYS_KEY
from strategies.records import from_record, to_record
from strategies.scaffold import C_DELTA_KEY

pytestmark = pytest.mark.slow  # trains the tiny model one step


class Grid:
    def get_node_ids(self):
        return [1, 2]

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.app import Message, MetricRecord

        return [Message(RecordDict({"metrics": MetricRecord({"partition-id": i})}), reply_to=m)
                for i, m in enumerate(messages)]  # fmt: skip


def test_a_node_trains_from_an_int8_message_and_replies_its_encoded_delta():
    overrides = "strategy=scaffold num_clients=2 sample_clients=2 training.max_steps=1 comm.codec=int8"
    cfg = load_config({"overrides": overrides})
    model, _ = get_model(cfg.model, cfg.seed)
    global_ = get_adapter(model)
    comm = CommParams(codec="int8")
    messages = list(build_strategy(cfg).configure_train(1, to_record(global_), ConfigRecord(), Grid()))
    wire = to_wire(messages, comm)
    assert wire[0].content[COMM_KEY]["codec"] == "int8"
    node_config = {"partition-id": 0, "num-partitions": 2}  # a deployed node's policy: run keys are checked
    context = Context(
        run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={"overrides": overrides}
    )
    reply = _train(wire[0], context)
    assert reply.content[COMM_KEY]["codec"] == "int8"
    encoded = unpack_content(reply.content)  # it travels packed; the codec's parts inside
    assert {a.dtype for a in encoded[ARRAYS_KEY].values()} == {"uint8", "float32"}  # codes and absmax
    assert {f"{RESIDUAL_KEY}:0:{ARRAYS_KEY}", f"{RESIDUAL_KEY}:0:{C_DELTA_KEY}"} <= set(context.state.keys())
    decode_reply(reply, global_, comm)
    trained = from_record(reply.content[ARRAYS_KEY])
    assert set(trained) == set(global_) and all(v.dtype == np.float32 for v in trained.values())
    assert any(not np.allclose(trained[k], global_[k]) for k in trained if "lora_B" in k)  # it trained
