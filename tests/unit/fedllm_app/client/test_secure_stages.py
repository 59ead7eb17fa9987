"""A client's secure-aggregation stages refuse to run out of order: nothing is revealed twice or early."""

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedllm_app.client import secure
from fedllm_app.client.policy import PolicyError
from fedllm_app.client_app import ERRORS, NodeError, app
from fedllm_app.secure import keys as K


def stage(conf):
    msg = Message(RecordDict({K.RECORD: K.config({K.ROUND: 1, **conf})}), dst_node_id=1, message_type=K.QUERY_TYPE)
    msg.metadata.__dict__["_message_id"] = msg.object_id
    return msg


def test_an_unmask_request_before_masking_is_refused_and_reveals_nothing():
    state = RecordDict()
    secure.handle_query(stage({K.STAGE: K.KEYS, K.INDEX: 0}), state)
    with pytest.raises(secure.SecAggStateError, match="stage unmask of round 1 before its mask stage"):
        secure.handle_query(stage({K.STAGE: K.UNMASK, K.DROPPED: [1]}), state)


def test_a_share_stage_of_another_round_is_refused():
    state = RecordDict()
    secure.handle_query(stage({K.STAGE: K.KEYS, K.INDEX: 0}), state)
    other = stage({K.STAGE: K.SHARE, K.THRESHOLD: 2})
    other.content[K.RECORD][K.ROUND] = 2
    with pytest.raises(secure.SecAggStateError, match="stage share of round 2 before its keys stage"):
        secure.handle_query(other, state)


def test_the_client_app_answers_the_keys_stage_with_public_keys_only_and_keeps_the_secrets():
    context = Context(1, 1, {"partition-id": 0}, RecordDict(), {})
    reply = app(stage({K.STAGE: K.KEYS, K.INDEX: 0}), context)
    conf = reply.content[K.RECORD]
    assert sorted(conf.keys()) == [K.C_PK, K.S_PK] and len(conf[K.C_PK]) == 32
    saved = context.state[secure.STATE_KEY]
    assert bytes(saved["s-sk"]) not in (bytes(conf[K.C_PK]), bytes(conf[K.S_PK]))


def test_a_failed_stage_reaches_the_server_as_a_code_only():
    context = Context(1, 1, {"partition-id": 0}, RecordDict(), {})
    with pytest.raises(NodeError) as err:
        app(stage({K.STAGE: K.UNMASK}), context)
    assert str(err.value) == ERRORS[Exception]  # Flower sends str(err): no stage, round or key detail


def test_a_node_that_requires_secure_aggregation_refuses_a_plain_train_message(caplog):
    context = Context(1, 1, {"partition-id": 0, "require-secagg": True}, RecordDict(), {})
    plain = Message(RecordDict({"config": ConfigRecord({"server-round": 1, "lr": 1e-3})}), dst_node_id=1,
                    message_type="train")  # fmt: skip
    plain.metadata.__dict__["_message_id"] = plain.object_id
    with pytest.raises(NodeError) as err:
        app(plain, context)
    assert str(err.value) == ERRORS[PolicyError]
    assert "require-secagg=true and the server sent a plain train message" in caplog.text


def test_a_client_refuses_to_mask_when_the_server_leaves_it_too_few_active_neighbours():
    from fedllm_app.secure.secagg import ClientKeys

    state, peer = RecordDict(), ClientKeys.generate().public()
    secure.handle_query(stage({K.STAGE: K.KEYS, K.INDEX: 0}), state)
    secure.handle_query(stage({K.STAGE: K.SHARE, K.THRESHOLD: 2, K.PEERS: [1], K.PEER_C_PKS: [peer[0]],
                               K.PEER_S_PKS: [peer[1]]}), state)  # fmt: skip
    mask_msg = stage({K.STAGE: K.MASK, K.ACTIVE: [0], K.SIZE: 2, K.BITS: 32, K.CLIP_RANGE: 1.0})
    mask_msg.content[K.SHARES_RECORD] = K.config({K.SRC: [0], K.CIPHERTEXTS: [b"ciphertext"]})
    with pytest.raises(secure.SecAggStateError, match="0 active neighbours, fewer than the threshold 2 - 1"):
        secure.masked_content(mask_msg, RecordDict(), state)  # its update alone would be unmasked by b's shares
