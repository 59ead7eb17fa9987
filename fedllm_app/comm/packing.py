"""A message's arrays travel as one Flower array per record, not one array each.

Flower 1.42 moves a message as its object tree and then every object by its own request: each array of a
record (and its chunk) is one or two requests, pushed by the sender and pulled by the receiver, and each hop
of a round (ServerApp -> SuperLink -> SuperNode -> ClientApp, and back) pays them. The tiny default's adapter
has 28 arrays, about 60 objects a message; on a 2-core machine the SuperLink handled them at 25-50 a second,
so each hop took about 5 s against 2.2 s of training (docs/benchmarks.md, "Where the round start goes").

:func:`pack_content` replaces every ArrayRecord of two arrays or more by a record of one ``uint8`` array, the
arrays' bytes one after the other, and writes their names, dtypes and shapes to one ConfigRecord
:data:`PACK_KEY`; :func:`unpack_content` restores them and refuses (:class:`CodecError`) anything that does not
add up: an unknown or non-numeric dtype, a shape that does not match the bytes, a record missing or extra. The
bytes are the same data; only Flower's per-array framing goes (the run's byte counts count what travels).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedllm_app.comm.codecs import CodecError

PACK_KEY = "comm-pack"
PACKED = "packed"
KINDS = "fiub"  # float, signed and unsigned int, bool: what adapters and codec parts are made of


def pack_content(content: RecordDict, done: dict[int, tuple[ArrayRecord, tuple]] | None = None) -> RecordDict:
    """``content`` with each ArrayRecord of two or more arrays packed into one array (others kept as they are).

    ``done``: records already packed in the caller's batch, by ``id`` (each kept there with its packing, so no
    other record can take its ``id`` while ``done`` lives); messages that share one record (the global every
    sampled node is sent) pack it once.
    """
    out, index, packed = RecordDict(), ConfigRecord(), []
    for key, record in content.items():
        if not isinstance(record, ArrayRecord) or len(record) < 2:
            out[key] = record
            continue
        if done is not None and id(record) in done:
            _, packing = done[id(record)]
        else:
            packing = _packed(record)
            if done is not None:
                done[id(record)] = (record, packing)
        out[key], names, dtypes, shapes = packing
        index[f"names:{key}"], index[f"dtypes:{key}"], index[f"shapes:{key}"] = names, dtypes, shapes
        packed.append(key)
    if not packed:
        return content
    index["records"] = packed
    out[PACK_KEY] = index
    return out


def _packed(record: ArrayRecord) -> tuple[ArrayRecord, list[str], list[str], list[str]]:
    """The record as one uint8 array, and its arrays' names, dtypes and shapes."""
    arrays = [np.require(array.numpy(), requirements="C") for array in record.values()]  # keeps 0-d as 0-d
    blob = np.concatenate([a.reshape(-1).view(np.uint8) for a in arrays])
    return (
        ArrayRecord({PACKED: Array.from_numpy_ndarray(blob)}),
        list(record.keys()),
        [a.dtype.str for a in arrays],
        [",".join(str(d) for d in a.shape) for a in arrays],
    )


def unpack_content(content: RecordDict) -> RecordDict:
    """The content with its packed records restored (one without :data:`PACK_KEY` is returned as is)."""
    if PACK_KEY not in content:
        return content
    index = content[PACK_KEY]
    if not isinstance(index, ConfigRecord):
        raise CodecError(f"'{PACK_KEY}' is a {type(index).__name__}, not a ConfigRecord")
    listed = [str(k) for k in index.get("records", [])]
    if missing := [k for k in listed if k not in content]:
        raise CodecError(f"records {missing} are listed as packed but not in the message")
    out = RecordDict()
    for key, record in content.items():
        if key != PACK_KEY:
            out[key] = _unpacked(record, index, key) if key in listed else record
    return out


def _unpacked(record: Any, index: ConfigRecord, key: str) -> ArrayRecord:
    if not isinstance(record, ArrayRecord) or list(record.keys()) != [PACKED]:
        raise CodecError(f"packed record '{key}' is not one array named '{PACKED}'")
    blob = record[PACKED].numpy()  # np.load(allow_pickle=False)
    if blob.dtype != np.uint8 or blob.ndim != 1:
        raise CodecError(f"packed record '{key}' is {blob.dtype} of shape {blob.shape}, not a 1-D uint8 array")
    names, dtypes, shapes = (list(index.get(f"{part}:{key}", [])) for part in ("names", "dtypes", "shapes"))
    if not names or not len(names) == len(dtypes) == len(shapes) or len(set(names)) != len(names):
        raise CodecError(f"packed record '{key}' has no consistent list of names, dtypes and shapes")
    arrays, offset = {}, 0
    for name, dtype, shape in zip(names, dtypes, shapes, strict=True):
        kind, dims = _dtype(dtype, key, name), _shape(shape, key, name)
        size = math.prod(dims) * kind.itemsize
        if offset + size > blob.size:
            raise CodecError(f"packed record '{key}' is shorter than its arrays declare (at '{name}')")
        arrays[name] = Array.from_numpy_ndarray(blob[offset : offset + size].view(kind).reshape(dims).copy())
        offset += size
    if offset != blob.size:
        raise CodecError(f"packed record '{key}' holds {blob.size - offset} bytes more than its arrays declare")
    return ArrayRecord(arrays)


def _dtype(text: Any, key: str, name: str) -> np.dtype:
    try:
        kind = np.dtype(str(text))
    except TypeError:
        kind = None
    if kind is None or kind.kind not in KINDS or kind.itemsize > 8:
        raise CodecError(f"array '{name}' of packed record '{key}' declares dtype {text!r}, not a number type")
    return kind


def _shape(text: Any, key: str, name: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in str(text).split(",")) if str(text) else ()
    except ValueError:
        dims = (-1,)
    if any(d < 0 for d in dims) or math.prod(dims) > 2**31:
        raise CodecError(f"array '{name}' of packed record '{key}' declares shape {text!r}, not a possible one")
    return dims
