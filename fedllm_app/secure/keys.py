"""The Flower message keys of secure aggregation, shared by the server's driver and the client's handlers.

Stages ``keys``, ``share`` and ``unmask`` travel as ``query.secagg`` messages, ``mask`` as a
``train.secagg`` message (the train message: global adapter, round config, plus what SecAgg adds).
"""

from __future__ import annotations

from typing import Any

from flwr.app import ConfigRecord

QUERY_TYPE = "query.secagg"
TRAIN_TYPE = "train.secagg"
RECORD = "secagg"  # the ConfigRecord of every secagg message and reply
SHARES_RECORD = "secagg-shares"  # the ciphertexts relayed to a client with its train message
MASKED_RECORD = "secagg-masked"  # the ArrayRecord of a masked reply
MASKED = "masked"  # its one array
STAGE, ROUND, INDEX = "stage", "server-round", "index"
KEYS, SHARE, MASK, UNMASK = "keys", "share", "mask", "unmask"
C_PK, S_PK = "c-pk", "s-pk"
PEERS, PEER_C_PKS, PEER_S_PKS = "peers", "peer-c-pks", "peer-s-pks"
THRESHOLD, SIZE, ACTIVE, DROPPED = "threshold", "size", "active", "dropped"
DST, SRC, CIPHERTEXTS, SHARES = "dst", "src", "ciphertexts", "shares"
UNOPENED = "unopened"  # senders whose share ciphertext a holder could not open (reported, skipped)
CLIP_RANGE, BITS = "clip-range", "bits"


def round_tag(server_round: int) -> bytes:
    """Bound into every key and ciphertext of a round, so nothing of one round opens in another."""
    return b"fedllm-secagg-round-" + str(server_round).encode()


def config(values: dict[str, Any]) -> ConfigRecord:
    """A ConfigRecord of ``values`` without its empty lists (Flower cannot count an empty list's bytes)."""
    return ConfigRecord({k: v for k, v in values.items() if not (isinstance(v, list) and not v)})


def listed(conf: ConfigRecord, key: str) -> list[Any]:
    """The list under ``key`` (empty when :func:`config` left it out)."""
    return list(conf[key]) if key in conf else []
