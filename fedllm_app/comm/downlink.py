"""The delta downlink (``comm.downlink_delta=true``): a node is sent the global's change against the copy it
already holds, so top-k, int8 and NF4 compress the server -> client direction as well as the replies.

Per node and per ArrayRecord of the train message (the adapter or the node's rank slice; SCAFFOLD's
``c-server`` and ``c-client``):

- The server keeps the float32 arrays each node holds, *as the node decoded them* (its copy). It records a
  node's new copy only when the node answers the message that carried it: any reply that is not an error
  proves that the node decoded the message (the client decodes before anything else).
- A node whose copy is known, with the same array names and shapes, gets ``encode(global - copy)`` with
  :attr:`CommParams.delta_codec`; its new copy is ``copy + decode(...)``, computed by the same numpy
  operations on both sides.
- Every other node gets the full global with :attr:`CommParams.full_codec`: the first round, a node whose
  last message got no reply or an error reply (it may or may not have decoded it), a resumed server (which
  keeps no copies), a rank slice whose shapes changed.
- Each record's metadata names the fingerprint of the copy its change is against (``base:<record>``) and of
  the copy it yields (``result:<record>``). The client refuses a message whose base it does not hold (state
  lost, a missed message) or whose result it does not reproduce: the round fails on that node, the server
  forgets the node's copy, and its next message is full. So the node's copy never drifts from the server's
  record unnoticed.

What a lossy codec leaves out of one change stays in ``global - copy`` and travels with the next one: the
downlink keeps no error-feedback state of its own. The client trains from its copy and replies its delta
against it, as without the delta downlink.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedllm_app.comm.codecs import CodecError, CommParams
from fedllm_app.comm.encoded import COMM_KEY, decode_content, encode_content
from strategies.aggregation import Arrays
from strategies.records import from_record, to_record

HELD_KEY = "comm-held"  # the node's state: its copy of each record, under comm-held:<record>
BASE, RESULT = "base:", "result:"
Copies = dict[str, Arrays]  # record key -> arrays


def fingerprint(arrays: Arrays) -> str:
    """A 128-bit digest of ``arrays``: their names, shapes and float32 bytes, in name order."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(arrays):
        value = np.ascontiguousarray(arrays[name], dtype=np.float32)
        digest.update(f"{name}:{value.shape};".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def same_shapes(a: Arrays, b: Arrays) -> bool:
    """Whether ``a`` and ``b`` hold the same array names with the same shapes."""
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)


@dataclass
class Held:
    """The server's record of what each node holds: its copies, and those its last message will give it.

    ``copies``: node -> record -> arrays the node holds; ``pending``: node -> the copies of the message
    sent this round, recorded by :meth:`settle` once the node has answered.
    """

    copies: dict[int, Copies] = field(default_factory=dict)
    pending: dict[int, Copies] = field(default_factory=dict)

    def encode(self, content: RecordDict, node: int, params: CommParams) -> RecordDict:
        """The content that travels to ``node``: each record as its change against the node's copy where that is
        known and of the same shapes, else in full; the copies it yields are kept as pending.
        """
        held = self.copies.get(node, {})
        targets = {k: from_record(r) for k, r in content.items() if isinstance(r, ArrayRecord)}
        bases = {k: held[k] for k, t in targets.items() if k in held and same_shapes(held[k], t)}
        values = {k: {n: v - bases[k][n] for n, v in t.items()} if k in bases else t for k, t in targets.items()}
        codecs = {k: params.delta_codec if k in bases else params.full_codec for k in targets}
        out = encode_content(content, params.full_codec, params, values, codecs)
        sent = decode_content(out)  # what the node will decode: its new copy is built from exactly this
        meta = out[COMM_KEY]
        copies = {}
        for key in targets:
            copies[key] = rebuilt(bases.get(key), from_record(sent[key]))
            if key in bases:
                meta[BASE + key] = fingerprint(bases[key])
            meta[RESULT + key] = fingerprint(copies[key])
        self.pending[node] = copies
        return out

    def settle(self, answered: set[int]) -> None:
        """After the round's replies: a node that answered (no error) holds its pending copies; the server
        forgets the copies of a node that did not (its next message is full).
        """
        for node, copies in self.pending.items():
            if node in answered:
                self.copies[node] = copies
            else:
                self.copies.pop(node, None)
        self.pending.clear()

    def discard(self) -> None:
        """The round's messages were not sent (the budget stopped the run): the nodes keep what they held."""
        self.pending.clear()


def rebuilt(base: Arrays | None, decoded: Arrays) -> Arrays:
    """The copy a node holds after a message: ``base + decoded`` for a change, ``decoded`` for a full record."""
    if base is None:
        return {k: v.astype(np.float32) for k, v in decoded.items()}
    return {k: (base[k] + decoded[k]).astype(np.float32) for k in decoded}


def is_delta(meta: ConfigRecord) -> bool:
    """Whether an encoded message's metadata is the delta downlink's (it names the copies it yields)."""
    return any(str(k).startswith(RESULT) for k in meta)


def apply(content: RecordDict, meta: ConfigRecord, state: Any) -> RecordDict:
    """The node's side: ``content`` (decoded records) with each record replaced by the node's new copy, which
    ``state`` keeps; a :class:`CodecError` when the node does not hold the copy a change is against, or its
    new copy is not the one the server recorded.
    """
    if state is None:
        raise CodecError("a delta-downlink message needs the node's state, which holds its copy of the global")
    updates = {}
    for key in meta.get("records", []):
        base = None
        if BASE + key in meta:
            base = node_copy(state, key)
            if base is None or fingerprint(base) != meta[BASE + key]:
                raise CodecError(
                    f"'{key}' is sent as its change against a copy this node does not hold (its state was lost or "
                    f"it missed a message); the server sends the full global in its next round"
                )
        copy = rebuilt(base, from_record(content[key]))
        if fingerprint(copy) != meta[RESULT + key]:
            raise CodecError(f"'{key}' decodes here to another copy than the server recorded; it sends the full "
                             f"global in its next round")  # fmt: skip
        updates[key] = copy
    for key, copy in updates.items():  # the state changes only when every record applied
        state[f"{HELD_KEY}:{key}"] = to_record(copy)
        content[key] = to_record(copy)
    return content


def node_copy(state: Any, key: str) -> Arrays | None:
    """The node's copy of record ``key`` kept in its ``state``, or None."""
    kept = state.get(f"{HELD_KEY}:{key}") if f"{HELD_KEY}:{key}" in state else None
    return from_record(kept) if isinstance(kept, ArrayRecord) else None
