"""Encoded messages both ways: what the server sends and decodes, what the client decodes and replies.

The encoded form of a content is :mod:`fedllm_app.comm.encoded`'s (each ArrayRecord as its codec's parts,
one ConfigRecord :data:`COMM_KEY` of codecs and shapes), so the server's byte count
(:func:`fedllm_app.server.rounds.traffic`) counts the codec's real bytes.

Directions (docs/communication.md):

- server -> client: each node's arrays (the global adapter, or its rank slice; SCAFFOLD's ``c-server``
  and ``c-client``) cast or quantised with ``comm.downlink`` (:attr:`CommParams.downlink_codec`);
  the server keeps its exact copy and never reads the encoded one. With ``comm.downlink_delta`` a node is sent
  the change against the copy it holds (:mod:`fedllm_app.comm.downlink`).
- client -> server: ``arrays`` is sent as its delta against the global the client received, other
  ArrayRecords (SCAFFOLD's ``c-delta``, already a delta) as they are, with ``comm.codec``. With
  error feedback, what a lossy codec did not send is kept in the node's state (per partition and
  record) and added to the next round's delta. The server adds the decoded delta to the exact
  arrays it sent that node.

Both ways the encoded (or plain) records then travel packed, one Flower array per record
(:mod:`fedllm_app.comm.packing`), and are unpacked first on receipt.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, RecordDict

from fedllm_app.comm import downlink
from fedllm_app.comm.codecs import CodecError, CommParams, decode, encode
from fedllm_app.comm.encoded import COMM_KEY, decode_content, encode_content
from fedllm_app.comm.packing import pack_content, unpack_content
from strategies.aggregation import Arrays
from strategies.fedavg import ARRAYS_KEY
from strategies.records import from_record, to_record

RESIDUAL_KEY = "comm-residual"


# --- client side --------------------------------------------------------------------------------------------


def decode_message(msg: Message, state: Any = None) -> None:
    """Replace an encoded train message's content by its plain arrays, in place, before anything reads it.

    A message of the delta downlink (``comm.downlink_delta``) is applied to the copies kept in the node's
    ``state`` (:func:`fedllm_app.comm.downlink.apply`), which it updates; a :class:`CodecError` when this node
    does not hold the copy the server sent its change against.
    """
    msg.content = unpack_content(msg.content)
    if COMM_KEY not in msg.content:
        return
    plain = decode_content(msg.content)
    if downlink.is_delta(msg.content[COMM_KEY]):
        plain = downlink.apply(plain, msg.content[COMM_KEY], state)
    msg.content = plain


def encode_reply(content: RecordDict, sent: Arrays, params: CommParams, state: Any, pid: int) -> RecordDict:
    """The reply's content as it travels: ``arrays`` as its delta against ``sent`` (the global as this client
    decoded it), every ArrayRecord encoded with ``comm.codec``, error feedback kept in ``state``; packed.
    """
    if params.codec == "none":
        return pack_content(content)
    values = {}
    for key, record in content.items():
        if not isinstance(record, ArrayRecord):
            continue
        arrays = from_record(record)
        if key == ARRAYS_KEY:
            arrays = {k: v.astype(np.float32) - sent[k].astype(np.float32) for k, v in arrays.items()}
        values[key] = with_feedback(arrays, params, state, f"{RESIDUAL_KEY}:{pid}:{key}")
    return pack_content(encode_content(content, params.codec, params, values))


def with_feedback(arrays: Arrays, params: CommParams, state: Any, key: str) -> Arrays:
    """``arrays`` plus the residual kept under ``key``; the new residual (what the codec loses) is kept.

    Returns what to encode. Without error feedback (or a lossless codec) ``arrays`` as they are.
    """
    if not params.feedback:
        return arrays
    kept = state.get(key) if key in state else None
    residual = from_record(kept) if isinstance(kept, ArrayRecord) else {}
    corrected = {k: v + residual[k] if k in residual and residual[k].shape == v.shape else v for k, v in arrays.items()}
    sent = {k: roundtrip(v, params.codec, params) for k, v in corrected.items()}
    state[key] = to_record({k: (corrected[k] - sent[k]).astype(np.float32) for k in corrected})
    return corrected


def roundtrip(x: np.ndarray, codec: str, params: CommParams) -> np.ndarray:
    """``x`` as the reader decodes it after ``codec``."""
    parts = encode(x, codec, block_size=params.block_size, topk_fraction=params.topk_fraction)
    return decode(parts, tuple(x.shape), codec, block_size=params.block_size)


# --- server side --------------------------------------------------------------------------------------------


def to_wire(messages: list[Message], params: CommParams, held: downlink.Held | None = None) -> list[Message]:
    """The messages as they travel: copies with their ArrayRecords encoded with the downlink codec, packed.

    The originals (exact arrays) stay with the server; with ``codec=none`` and no downlink codec their records
    travel as they are, packed. ``held`` (with ``comm.downlink_delta``): the server's record of the nodes'
    copies; each node is sent the change against its copy where known (:class:`fedllm_app.comm.downlink.Held`).
    """
    codec = params.downlink_codec
    done: dict[int, tuple] = {}  # records shared by several messages (the global) are packed once

    def travelling(m: Message) -> RecordDict:
        if held is not None:
            return held.encode(m.content, m.metadata.dst_node_id, params)
        return m.content if codec == "none" else encode_content(m.content, codec, params)

    return [
        Message(
            pack_content(travelling(m), done),
            dst_node_id=m.metadata.dst_node_id,
            message_type=m.metadata.message_type,
            group_id=m.metadata.group_id,
            ttl=m.metadata.ttl,
        )
        for m in messages
    ]


def decode_reply(msg: Message, sent: Arrays, params: CommParams) -> None:
    """Replace an encoded reply's content by the plain arrays it stands for, in place.

    ``arrays`` becomes ``sent`` (the exact arrays the server sent this node) plus the decoded delta, in
    float32. A reply that is not encoded with the run's codec, or does not decode (or unpack), raises a
    :class:`CodecError` naming why.
    """
    msg.content = unpack_content(msg.content)
    if params.codec == "none":
        return
    if COMM_KEY not in msg.content:
        raise CodecError(f"the reply is not encoded, the run's comm.codec is {params.codec!r}")
    shapes = {k: tuple(v.shape) for k, v in sent.items()}
    content = decode_content(msg.content, params.codec, params.block_size, shapes)
    if ARRAYS_KEY not in content or not isinstance(content[ARRAYS_KEY], ArrayRecord):
        raise CodecError(f"the reply carries no encoded '{ARRAYS_KEY}'")
    delta = from_record(content[ARRAYS_KEY])
    content[ARRAYS_KEY] = to_record({k: (sent[k] + delta[k]).astype(np.float32) for k in delta})
    msg.content = content
