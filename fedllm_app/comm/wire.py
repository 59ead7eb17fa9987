"""Encoded messages: each ArrayRecord of a message replaced by its codec's parts, and read back.

An encoded message's content holds, in place of each ArrayRecord ``K``, an ArrayRecord ``K`` of the
parts (:mod:`fedllm_app.comm.codecs`) named ``<array name>#<part>``, and one ConfigRecord
:data:`COMM_KEY` with the codec, its block size, the encoded records and each array's shape
(``shape:<K>:<array name>``). Everything that travels is in the records, so the server's byte count
(:func:`fedllm_app.server.rounds.traffic`) counts the codec's real bytes.

Directions (docs/communication.md):

- server -> client: each node's arrays (the global adapter, or its rank slice; SCAFFOLD's ``c-server``
  and ``c-client``) cast or quantised with ``comm.downlink`` (:attr:`CommParams.downlink_codec`);
  the server keeps its exact copy and never reads the encoded one.
- client -> server: ``arrays`` is sent as its delta against the global the client received, other
  ArrayRecords (SCAFFOLD's ``c-delta``, already a delta) as they are, with ``comm.codec``. With
  error feedback, what a lossy codec did not send is kept in the node's state (per partition and
  record) and added to the next round's delta. The server adds the decoded delta to the exact
  arrays it sent that node.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from fedllm_app.comm import downlink
from fedllm_app.comm.codecs import CodecError, CommParams, Parts, decode, encode
from strategies.aggregation import Arrays
from strategies.fedavg import ARRAYS_KEY
from strategies.records import from_record, to_record

COMM_KEY = "comm-codec"
SEP = "#"
RESIDUAL_KEY = "comm-residual"
Shapes = dict[str, tuple[int, ...]]


def encode_content(
    content: RecordDict,
    codec: str,
    params: CommParams,
    values: dict[str, Arrays] | None = None,
    codecs: dict[str, str] | None = None,
) -> RecordDict:
    """``content`` with every ArrayRecord encoded with ``codec`` (``values``: arrays to send instead, by record;
    ``codecs``: another codec for some records, named in the metadata as ``codec:<record>``).
    """
    values, codecs = values or {}, codecs or {}
    out, meta = RecordDict(), ConfigRecord({"codec": codec, "block-size": params.block_size})
    records = []
    for key, record in content.items():
        if not isinstance(record, ArrayRecord):
            out[key] = record
            continue
        arrays = values[key] if key in values else from_record(record)
        if codecs.get(key, codec) != codec:
            meta[f"codec:{key}"] = codecs[key]
        out[key] = _encode_arrays(arrays, codecs.get(key, codec), params, key, meta)
        records.append(key)
    meta["records"] = records
    out[COMM_KEY] = meta
    return out


def decode_content(
    content: RecordDict, codec: str | None = None, block_size: int | None = None, shapes: Shapes | None = None
) -> RecordDict:
    """The plain content of an encoded one (a plain one is returned as is); a :class:`CodecError` when it
    does not decode.

    ``codec``/``block_size``: what the reader expects (None: what the message says); ``shapes``: the
    only names and shapes each encoded record may declare (the server's check against what it sent).
    """
    if COMM_KEY not in content:
        return content
    meta = content[COMM_KEY]
    if not isinstance(meta, ConfigRecord):
        raise CodecError(f"'{COMM_KEY}' is a {type(meta).__name__}, not a ConfigRecord")
    got_codec, got_block = meta.get("codec"), meta.get("block-size")
    if codec is not None and got_codec != codec:
        raise CodecError(f"encoded with codec {got_codec!r}, the run's comm.codec is {codec!r}")
    if block_size is not None and got_block != block_size:
        raise CodecError(f"encoded with block size {got_block!r}, the run's comm.block_size is {block_size}")
    listed = list(meta.get("records", []))
    out = RecordDict()
    for key, record in content.items():
        if key == COMM_KEY:
            continue
        if isinstance(record, ArrayRecord) and key not in listed:
            raise CodecError(f"ArrayRecord '{key}' is not encoded with {got_codec!r} like the rest")
        if codec is not None and meta.get(f"codec:{key}", codec) != codec:
            raise CodecError(f"'{key}' is encoded with {meta[f'codec:{key}']!r}, the run's comm.codec is {codec!r}")
        out[key] = _decode_arrays(record, meta, key, shapes) if key in listed else record
    return out


def _encode_arrays(arrays: Arrays, codec: str, params: CommParams, key: str, meta: ConfigRecord) -> ArrayRecord:
    record = ArrayRecord()
    for name, value in arrays.items():
        meta[f"shape:{key}:{name}"] = [int(d) for d in value.shape]
        parts = encode(value, codec, block_size=params.block_size, topk_fraction=params.topk_fraction)
        for part, array in parts.items():
            record[f"{name}{SEP}{part}"] = Array.from_numpy_ndarray(np.ascontiguousarray(array))
    return record


def _decode_arrays(record: Any, meta: ConfigRecord, key: str, shapes: Shapes | None) -> ArrayRecord:
    if not isinstance(record, ArrayRecord):
        raise CodecError(f"'{key}' is a {type(record).__name__}, not an ArrayRecord")
    grouped: dict[str, Parts] = {}
    for full, array in record.items():
        name, _, part = full.rpartition(SEP)
        if not name:
            raise CodecError(f"array '{full}' of '{key}' is not named <array>{SEP}<part>")
        grouped.setdefault(name, {})[part] = array.numpy()  # np.load(allow_pickle=False)
    declared = {name: tuple(meta.get(f"shape:{key}:{name}", [-1])) for name in grouped}
    if shapes is not None and declared != shapes:
        odd = sorted(n for n in set(declared) | set(shapes) if declared.get(n) != shapes.get(n))[:3]
        raise CodecError(f"'{key}' declares arrays or shapes other than those sent, e.g. {odd}")
    if any(d < 0 for shape in declared.values() for d in shape) or any(math.prod(s) > 2**31 for s in declared.values()):
        raise CodecError(f"'{key}' declares no shape, or an impossible one, for some array")
    codec, block = str(meta.get(f"codec:{key}", meta["codec"])), int(meta["block-size"])
    decoded = {name: decode(parts, declared[name], codec, block_size=block) for name, parts in grouped.items()}
    return to_record(decoded)


# --- client side --------------------------------------------------------------------------------------------


def decode_message(msg: Message, state: Any = None) -> None:
    """Replace an encoded train message's content by its plain arrays, in place, before anything reads it.

    A message of the delta downlink (``comm.downlink_delta``) is applied to the copies kept in the node's
    ``state`` (:func:`fedllm_app.comm.downlink.apply`), which it updates; a :class:`CodecError` when this node
    does not hold the copy the server sent its change against.
    """
    if COMM_KEY not in msg.content:
        return
    plain = decode_content(msg.content)
    if downlink.is_delta(msg.content[COMM_KEY]):
        plain = downlink.apply(plain, msg.content[COMM_KEY], state)
    msg.content = plain


def encode_reply(content: RecordDict, sent: Arrays, params: CommParams, state: Any, pid: int) -> RecordDict:
    """The reply's content as it travels: ``arrays`` as its delta against ``sent`` (the global as this client
    decoded it), every ArrayRecord encoded with ``comm.codec``, error feedback kept in ``state``.
    """
    if params.codec == "none":
        return content
    values = {}
    for key, record in content.items():
        if not isinstance(record, ArrayRecord):
            continue
        arrays = from_record(record)
        if key == ARRAYS_KEY:
            arrays = {k: v.astype(np.float32) - sent[k].astype(np.float32) for k, v in arrays.items()}
        values[key] = with_feedback(arrays, params, state, f"{RESIDUAL_KEY}:{pid}:{key}")
    return encode_content(content, params.codec, params, values)


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
    """The messages as they travel: copies with their ArrayRecords encoded with the downlink codec.

    The originals (exact arrays) stay with the server; with ``codec=none`` and no downlink codec they are
    what travels. ``held`` (with ``comm.downlink_delta``): the server's record of the nodes' copies; each node
    is sent the change against its copy where known (:class:`fedllm_app.comm.downlink.Held`).
    """
    codec = params.downlink_codec
    if held is None and codec == "none":
        return messages
    return [
        Message(
            held.encode(m.content, m.metadata.dst_node_id, params)
            if held is not None
            else encode_content(m.content, codec, params),
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
    float32. A reply that is not encoded with the run's codec, or does not decode, raises a
    :class:`CodecError` naming why.
    """
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
