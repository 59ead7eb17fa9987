"""Encoded contents: each ArrayRecord of a message replaced by its codec's parts, and read back.

An encoded content holds, in place of each ArrayRecord ``K``, an ArrayRecord ``K`` of the parts
(:mod:`fedllm_app.comm.codecs`) named ``<array name>#<part>``, and one ConfigRecord :data:`COMM_KEY` with
the codec, its block size, the encoded records, each array's shape (``shape:<K>:<array name>``) and, for a
record encoded with another codec than the rest, that codec (``codec:<K>``). Everything that travels is in
the records. Which arrays are encoded, and against what, is :mod:`fedllm_app.comm.wire`'s and
:mod:`fedllm_app.comm.downlink`'s.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedllm_app.comm.codecs import CodecError, CommParams, Parts, decode, encode
from strategies.aggregation import Arrays
from strategies.records import from_record, to_record

COMM_KEY = "comm-codec"
SEP = "#"
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
