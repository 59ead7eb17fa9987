"""A client's side of secure aggregation (:mod:`fedllm_app.secure.secagg`), stage by stage.

The round's secrets (X25519 private keys, self-mask seed, the shares it holds for its neighbours) stay in
the node's ``Context.state`` between the stages of a round and are replaced at the next round's keys
stage. Only public keys, AES-GCM ciphertexts addressed to other clients, the masked update and at most
one share per neighbour and round leave the node. Under SCAFFOLD the client's control variate ``c_i``
lives here too (:data:`C_STATE_KEY`): the server learns only the sum of the control deltas.

Under DP with distributed noise (the train config names ``dp-noise-multiplier``), the client adds its own
Gaussian noise share (std ``z C / sqrt(t - c)``, :func:`strategies.privacy.noise_share_std`, drawn from the
OS's entropy) to its clipped update before quantising and masking it (:func:`add_noise_share`).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from fedllm_app.secure import keys as K
from fedllm_app.secure.secagg import ClientKeys, mask, quantize, reveal, share_secrets
from strategies.dp import CLIP_NORM_KEY, NOISE_COLLUDERS_KEY, NOISE_MULTIPLIER_KEY
from strategies.fedavg import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY
from strategies.privacy import noise_share_range, noise_share_std, secure_rng
from strategies.records import from_record, to_record
from strategies.scaffold import C_CLIENT_KEY, C_DELTA_KEY, C_SERVER_KEY

log = logging.getLogger("fedllm")
STATE_KEY = "secagg"
C_STATE_KEY = "secagg-c-client"


class SecAggStateError(RuntimeError):
    """A stage arrived out of order (another round, twice, or before the one it needs)."""


def handle_query(msg: Message, state: Any) -> RecordDict:
    """The reply to a ``keys``, ``share`` or ``unmask`` stage."""
    conf = msg.content[K.RECORD]
    stage = str(conf[K.STAGE])
    if stage == K.KEYS:
        return _keys(conf, state)
    if stage == K.SHARE:
        return _share(conf, state)
    if stage == K.UNMASK:
        return _unmask(conf, state)
    raise SecAggStateError(f"unknown secure-aggregation stage {stage!r}")


def _mine(conf: ConfigRecord, state: Any, needs: str) -> ConfigRecord:
    """The saved secrets of the round; an error unless the stage ``needs`` was done in the same round."""
    saved = state.get(STATE_KEY)
    if saved is None or int(saved[K.ROUND]) != int(conf[K.ROUND]) or needs not in saved:
        raise SecAggStateError(f"stage {conf[K.STAGE]} of round {conf[K.ROUND]} before its {needs} stage")
    return saved


def _keys(conf: ConfigRecord, state: Any) -> RecordDict:
    keys = ClientKeys.generate()
    state[STATE_KEY] = ConfigRecord(
        {K.ROUND: int(conf[K.ROUND]), K.INDEX: int(conf[K.INDEX]), "c-sk": keys.c_sk, "s-sk": keys.s_sk,
         "b": keys.b, K.KEYS: True}
    )  # fmt: skip
    c_pk, s_pk = keys.public()
    return RecordDict({K.RECORD: K.config({K.C_PK: c_pk, K.S_PK: s_pk})})


def _secrets(saved: ConfigRecord) -> ClientKeys:
    return ClientKeys(bytes(saved["c-sk"]), bytes(saved["s-sk"]), bytes(saved["b"]))


def _share(conf: ConfigRecord, state: Any) -> RecordDict:
    saved = _mine(conf, state, K.KEYS)
    me, keys = int(saved[K.INDEX]), _secrets(saved)
    peers = [int(p) for p in K.listed(conf, K.PEERS)]
    c_pks = dict(zip(peers, [bytes(b) for b in K.listed(conf, K.PEER_C_PKS)], strict=True))
    c_pks[me] = keys.public()[0]
    out = share_secrets(me, keys, c_pks, int(conf[K.THRESHOLD]), K.round_tag(int(conf[K.ROUND])))
    saved[K.PEERS] = peers
    saved[K.THRESHOLD] = int(conf[K.THRESHOLD])
    saved[K.PEER_C_PKS] = [c_pks[p] for p in peers]
    saved[K.PEER_S_PKS] = [bytes(b) for b in K.listed(conf, K.PEER_S_PKS)]
    saved[K.SHARE] = True
    dst = sorted(out)
    return RecordDict({K.RECORD: K.config({K.DST: dst, K.CIPHERTEXTS: [out[d] for d in dst]})})


def training_message(msg: Message, state: Any) -> Message:
    """The train message as the training path reads it; SCAFFOLD's ``c_i`` from this node's state."""
    if C_SERVER_KEY in msg.content:
        c = from_record(msg.content[C_SERVER_KEY])
        kept = state.get(C_STATE_KEY)
        msg.content[C_CLIENT_KEY] = kept if kept is not None else to_record({k: np.zeros_like(v) for k, v in c.items()})
    return msg


def update_vector(msg: Message, content: RecordDict) -> np.ndarray:
    """The flat update: ``trained - global`` in the global adapter's order, then SCAFFOLD's control delta."""
    global_ = from_record(msg.content[ARRAYS_KEY])
    trained = from_record(content[ARRAYS_KEY])
    parts = [(trained[k].astype(np.float64) - global_[k]).ravel() for k in global_]
    if C_DELTA_KEY in content:
        dc = from_record(content[C_DELTA_KEY])
        parts += [dc[k].astype(np.float64).ravel() for k in global_]
    return np.concatenate(parts)


def share_std(train_conf: ConfigRecord, threshold: int) -> float | None:
    """The std of the noise share a client adds under distributed noise (None: the train config asks none)."""
    if NOISE_MULTIPLIER_KEY not in train_conf:
        return None
    z, c = float(train_conf[NOISE_MULTIPLIER_KEY]), float(train_conf[CLIP_NORM_KEY])
    return noise_share_std(z, c, threshold, int(train_conf.get(NOISE_COLLUDERS_KEY, 0)))


def add_noise_share(
    vector: np.ndarray, std: float, clip_norm: float, clip_range: float, rng: np.random.Generator
) -> np.ndarray:
    """``vector`` (the clipped update) plus ``N(0, std^2)`` on every coordinate, refused (ValueError) when the
    quantiser's ``clip_range`` is below ``C + 8 std`` (it would clip the noise off); a coordinate that still
    leaves the range (probability ~1e-15 each) is logged here, on the node.
    """
    need = noise_share_range(clip_norm, std)
    if clip_range < need:
        raise ValueError(
            f"privacy.secagg_clip_range={clip_range:g} would clip this client's noise share (std {std:.4g}; a "
            f"clipped coordinate plus 8 std reaches {need:.4g}); set privacy.secagg_clip_range={need:.4g} or more"
        )
    noised = vector + rng.normal(0.0, std, size=vector.shape)
    if outside := int(np.count_nonzero(np.abs(noised) > clip_range)):
        log.warning("%d noised coordinates left [-%g, %g] and were clipped by the quantiser", outside, clip_range,
                    clip_range)  # fmt: skip
    return noised


def masked_content(msg: Message, content: RecordDict, state: Any, rng: np.random.Generator | None = None) -> RecordDict:
    """The reply of the mask stage: the masked update and the round's metrics, nothing else of the update.

    Under distributed noise the update carries this client's noise share, drawn from ``rng`` (default: a
    generator seeded from the OS's entropy, never the run's seed).
    """
    conf = msg.content[K.RECORD]
    saved = _mine(conf, state, K.SHARE)
    if K.MASK in saved:
        raise SecAggStateError(f"a second mask stage in round {conf[K.ROUND]}")
    held = msg.content[K.SHARES_RECORD]
    saved["held-src"] = [int(s) for s in K.listed(held, K.SRC)]
    saved["held-ct"] = [bytes(c) for c in K.listed(held, K.CIPHERTEXTS)]
    me, keys = int(saved[K.INDEX]), _secrets(saved)
    active = {int(a) for a in K.listed(conf, K.ACTIVE)}
    s_pks = {p: pk for p, pk in _by_index(saved, K.PEERS, K.PEER_S_PKS).items() if p in active}
    if len(s_pks) + 1 < int(saved[K.THRESHOLD]):  # too few pairwise masks: the self mask alone would protect it
        raise SecAggStateError(
            f"round {conf[K.ROUND]}: {len(s_pks)} active neighbours, fewer than the threshold {saved[K.THRESHOLD]} - 1"
        )
    bits, clip, n = int(conf[K.BITS]), float(conf[K.CLIP_RANGE]), int(conf[K.SIZE])
    vector = update_vector(msg, content)
    train_conf = msg.content[CONFIG_KEY]
    std = share_std(train_conf, int(saved[K.THRESHOLD]))
    if std is not None:
        rng = rng if rng is not None else secure_rng()
        vector = add_noise_share(vector, std, float(train_conf[CLIP_NORM_KEY]), clip, rng)
    q = quantize(vector, clip, bits, n, np.random.default_rng())
    masked = mask(q, me, keys, s_pks, K.round_tag(int(conf[K.ROUND])), bits)
    if C_DELTA_KEY in content:  # SCAFFOLD: c_i += delta c_i, here only
        c_i = from_record(msg.content[C_CLIENT_KEY])
        dc = from_record(content[C_DELTA_KEY])
        state[C_STATE_KEY] = to_record({k: c_i[k] + dc[k] for k in c_i})
    saved[K.MASK] = True
    return RecordDict({K.MASKED_RECORD: ArrayRecord({K.MASKED: _as_array(masked)}), METRICS_KEY: content[METRICS_KEY]})


def _as_array(values: np.ndarray) -> Any:
    from flwr.app import Array

    return Array(values)


def _by_index(record: ConfigRecord, indices: str, values: str) -> dict[int, bytes]:
    """``{index: bytes}`` from two parallel lists of a ConfigRecord."""
    return {int(i): bytes(v) for i, v in zip(K.listed(record, indices), K.listed(record, values), strict=True)}


def _unmask(conf: ConfigRecord, state: Any) -> RecordDict:
    saved = _mine(conf, state, K.MASK)
    if "revealed" in saved:
        raise SecAggStateError(f"a second unmask stage in round {conf[K.ROUND]}: each share is revealed once")
    me, keys = int(saved[K.INDEX]), _secrets(saved)
    held = _by_index(saved, "held-src", "held-ct")
    c_pks = _by_index(saved, K.PEERS, K.PEER_C_PKS)
    c_pks[me] = keys.public()[0]
    dropped = {int(d) for d in K.listed(conf, K.DROPPED)}
    unopened: list[int] = []
    out = reveal(me, keys, held, c_pks, dropped, K.round_tag(int(conf[K.ROUND])), unopened)
    saved["revealed"] = True
    src = sorted(out)
    return RecordDict({K.RECORD: K.config({K.SRC: src, K.SHARES: [out[s] for s in src], K.UNOPENED: unopened})})
