"""One round of secure aggregation (SecAgg+, :mod:`fedllm_app.secure.secagg`) over Flower messages.

The round loop (:func:`fedllm_app.server.rounds.run_rounds`) hands this module the strategy's train
messages. It runs the stages as messages (``query.secagg``: keys, share; ``train.secagg``: the train
message plus the relayed share ciphertexts; ``query.secagg``: unmask), learns only the sum of the
survivors' quantised updates, and hands their **mean** to the strategy's server step
(:meth:`strategies.fedavg.FedAvgLoRA.step_from_mean`; SCAFFOLD: the mean control delta travels masked
beside the adapter delta, and each ``c_i`` stays with its client). With ``privacy.dp=true`` the sum goes to
:meth:`strategies.dp.DPStrategy.step_from_sum` instead: DP's fixed-weight mean, its noise, then the
strategy's step (each client clipped its own update; the server cannot). With ``privacy.noise=distributed``
the noise is the clients' (a share each, added before masking, :mod:`fedllm_app.client.secure`) and the
server adds none. Every survivor weighs the
same: data-size weights would need each client's size, which the server could not check on a masked update.

Fewer survivors than the threshold end the round before any share is asked: the adapter is unchanged,
nothing is revealed, and the error is logged and written in the round's metrics. A malformed reply in any
stage (wrong types, uneven lists, keys that are not 32-byte X25519 keys, ciphertexts for a client outside
the sender's neighbourhood, shares of a client the holder holds none of, unsound metrics) counts as that
client's dropout; any remaining failure while unmasking (e.g. a forged share) fails the round the same loud
way (:class:`SecAggError`), never the run.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedllm_app.comm.packing import pack_content
from fedllm_app.secure import keys as K
from fedllm_app.secure.secagg import (
    SecAggError,
    SecAggParams,
    check_public_key,
    check_survivors,
    dequantize,
    neighbourhoods,
    unmask,
)
from fedllm_app.server.reply_checks import NUMPY_STYPE, metrics_problem
from strategies.dp import DPStrategy
from strategies.fedavg import ARRAYS_KEY, METRICS_KEY, NUM_EXAMPLES_KEY
from strategies.records import from_record, is_integer, to_record
from strategies.scaffold import C_CLIENT_KEY, C_DELTA_KEY, Scaffold

log = logging.getLogger("fedllm")
# What reading a hostile reply may raise: the reply is malformed, and its client counts as dropped.
MALFORMED = (TypeError, ValueError, KeyError, AttributeError, OverflowError, IndexError, EOFError)
Sender = Any  # (grid, messages, timeout, poll_interval) -> replies: rounds.send_and_receive


@dataclass
class SecureOutcome:
    """What one secure round did: the new global arrays (None: not aggregated) and what travelled."""

    arrays: ArrayRecord | None = None
    train_metrics: MetricRecord | None = None
    sent: list[Message] = field(default_factory=list)
    replies: list[Message] = field(default_factory=list)
    masked: list[Message] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    record: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Round:
    """The round's public state on the server: who takes part, their public keys and the graph."""

    rnd: int
    nodes: list[int]
    params: SecAggParams
    graph: list[list[int]]
    threshold: int
    pubs: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # index -> (c_pk, s_pk)
    ciphertexts: dict[int, dict[int, bytes]] = field(default_factory=dict)  # holder -> {src -> ciphertext}

    def message(self, index: int, conf: dict[str, Any]) -> Message:
        record = K.config({K.ROUND: self.rnd, **conf})
        return Message(RecordDict({K.RECORD: record}), dst_node_id=self.nodes[index], message_type=K.QUERY_TYPE)


def secagg_params(cfg: Any) -> SecAggParams | None:
    """``privacy.secagg_*`` as :class:`SecAggParams`, or None when ``privacy.secagg`` is off."""
    p = cfg.get("privacy") or {}
    if not p.get("secagg", False):
        return None
    threshold = p.get("secagg_threshold", 2 / 3)
    return SecAggParams(
        threshold=threshold if isinstance(threshold, int) else float(threshold),
        neighbours=p.get("secagg_neighbours"),
        clip_range=float(p.get("secagg_clip_range", 1.0)),
        bits=int(p.get("secagg_bits", 32)),
    )


def secure_round(
    grid: Grid,
    strategy: Any,
    rnd: int,
    arrays: ArrayRecord,
    messages: list[Message],
    params: SecAggParams,
    send: Sender,
    timeout: float,
    poll_interval: float,
    min_replies: int = 1,
) -> SecureOutcome:
    """Run the stages for the nodes ``messages`` go to; the new global arrays from the survivors' mean."""
    out = SecureOutcome()
    nodes = [m.metadata.dst_node_id for m in messages]
    n = len(nodes)
    try:
        state = _Round(rnd, nodes, params, neighbourhoods(n, params.degree(n), _graph_seed(strategy, rnd)),
                       params.share_threshold(n))  # fmt: skip
        talk = _Talk(grid, send, timeout, poll_interval, out)
        active = _keys_and_shares(state, talk)
        survivors, total = _mask(state, talk, messages, active, arrays, strategy)
        _check_enough(state, active, survivors, min_replies)
        start = time.perf_counter()
        revealed = _reveal(state, talk, survivors, active - survivors)
        mean = _mean(state, total, survivors, active - survivors, revealed, n)
        out.record["secagg_unmask_seconds"] = time.perf_counter() - start
    except SecAggError as err:
        log.error("secure aggregation, round %d: %s; the global adapter is unchanged", rnd, err)
        out.record["secagg_error"] = str(err)
        out.failed = sorted(set(nodes) - {m.metadata.src_node_id for m in out.masked})
        return out
    out.arrays, out.train_metrics = _step(strategy, rnd, arrays, mean, out.masked, state.threshold)
    out.failed = sorted(set(nodes) - {m.metadata.src_node_id for m in out.masked})
    out.record.update({"secagg_survivors": len(survivors), "secagg_dropped": len(active - survivors),
                       "secagg_threshold": state.threshold, "secagg_neighbours": params.degree(n)})  # fmt: skip
    return out


def _graph_seed(strategy: Any, rnd: int) -> int:
    return int(getattr(strategy, "seed", 0)) * 1_000_003 + rnd


@dataclass
class _Talk:
    """Send a stage's messages and keep every message and reply for the round's traffic count."""

    grid: Grid
    send: Sender
    timeout: float
    poll_interval: float
    out: SecureOutcome

    def __call__(self, messages: list[Message]) -> dict[int, Message]:
        """Node -> its sound reply (errors and silence are left out)."""
        replies = self.send(self.grid, messages, self.timeout, self.poll_interval)
        self.out.sent.extend(messages)
        self.out.replies.extend(replies)
        return {r.metadata.src_node_id: r for r in replies if not r.has_error()}


def _keys_and_shares(state: _Round, talk: _Talk) -> set[int]:
    """The keys and share stages; the indices of the clients that completed both."""
    got = talk([state.message(i, {K.STAGE: K.KEYS, K.INDEX: i}) for i in range(len(state.nodes))])
    for i, node in enumerate(state.nodes):
        pubs = _parse(got.get(node), "keys", _public_keys)
        if pubs is not None:
            state.pubs[i] = pubs
    _enough(state, set(state.pubs), "the keys stage")
    share_msgs = []
    for i in sorted(state.pubs):
        peers = [j for j in state.graph[i] if j in state.pubs]
        share_msgs.append(state.message(i, {
            K.STAGE: K.SHARE, K.THRESHOLD: state.threshold, K.PEERS: peers,
            K.PEER_C_PKS: [state.pubs[j][0] for j in peers], K.PEER_S_PKS: [state.pubs[j][1] for j in peers],
        }))  # fmt: skip
    got = talk(share_msgs)
    for i in sorted(state.pubs):
        holders = {i, *(j for j in state.graph[i] if j in state.pubs)}
        sent = _parse(got.get(state.nodes[i]), "share", lambda conf, h=holders: _ciphertexts(conf, h))
        for dst, ct in (sent or {}).items():  # relayed only when the reply addressed exactly its neighbourhood
            state.ciphertexts.setdefault(dst, {})[i] = ct
    active = {i for i in state.pubs if any(i in held for held in state.ciphertexts.values())}
    _enough(state, active, "the share stage")
    return active


def _parse(reply: Message | None, stage: str, read: Any) -> Any:
    """``read(reply's secagg ConfigRecord)``, or None when the reply is missing or malformed (a dropout)."""
    if reply is None:
        return None
    try:
        return read(reply.content[K.RECORD])
    except MALFORMED as err:
        log.warning("node %s sent a malformed %s reply (%s: %s); it counts as dropped",
                    reply.metadata.src_node_id, stage, type(err).__name__, str(err)[:120])  # fmt: skip
        return None


def _blob(value: Any, what: str) -> bytes:
    if not isinstance(value, bytes):
        raise TypeError(f"{what} is a {type(value).__name__}, not bytes")
    return value


def _index(value: Any, what: str) -> int:
    if not is_integer(value):
        raise TypeError(f"{what} is a {type(value).__name__}, not an int")
    return value


def _public_keys(conf: Any) -> tuple[bytes, bytes]:
    """``(c_pk, s_pk)`` of a keys reply: two valid 32-byte X25519 public keys."""
    return (check_public_key(_blob(conf[K.C_PK], K.C_PK)), check_public_key(_blob(conf[K.S_PK], K.S_PK)))


def _pairs(conf: Any, keys: str, values: str) -> list[tuple[int, bytes]]:
    """Two parallel lists of a reply as (index, bytes) pairs: same length, ints and bytes, no index twice."""
    idx, blobs = K.listed(conf, keys), K.listed(conf, values)
    if len(idx) != len(blobs):
        raise ValueError(f"{len(idx)} {keys} but {len(blobs)} {values}")
    pairs = [(_index(i, keys), _blob(b, values)) for i, b in zip(idx, blobs, strict=True)]
    if len({i for i, _ in pairs}) != len(pairs):
        raise ValueError(f"an index appears twice in {keys}")
    return pairs


def _ciphertexts(conf: Any, holders: set[int]) -> dict[int, bytes]:
    """A share reply: one ciphertext for each holder of the sender's neighbourhood (itself included)."""
    sent = dict(_pairs(conf, K.DST, K.CIPHERTEXTS))
    if set(sent) != holders:
        raise ValueError(f"ciphertexts for {sorted(sent)[:8]}, not for its neighbourhood {sorted(holders)[:8]}")
    return sent


def _enough(state: _Round, alive: set[int], stage: str) -> None:
    if len(alive) < state.threshold:
        raise SecAggError(
            f"{len(alive)} of {len(state.nodes)} clients completed {stage}, fewer than the threshold of "
            f"{state.threshold}: nothing was masked or revealed"
        )


def _mask(
    state: _Round, talk: _Talk, messages: list[Message], active: set[int], arrays: ArrayRecord, strategy: Any
) -> tuple[set[int], np.ndarray]:
    """The train stage: every active client trains and replies its masked update; the survivors and the sum."""
    size = _vector_size(arrays, strategy)
    p = state.params
    train, done = [], {}  # the global all nodes are sent is packed once
    for i in sorted(active):
        content = pack_content(RecordDict({k: v for k, v in messages[i].content.items() if k != C_CLIENT_KEY}), done)
        held = state.ciphertexts.get(i, {})
        srcs = sorted(s for s in held if s in active)
        content[K.RECORD] = K.config({
            K.STAGE: K.MASK, K.ROUND: state.rnd, K.ACTIVE: sorted(active), K.SIZE: len(state.nodes),
            K.BITS: p.bits, K.CLIP_RANGE: p.clip_range,
        })  # fmt: skip
        content[K.SHARES_RECORD] = K.config({K.SRC: srcs, K.CIPHERTEXTS: [held[s] for s in srcs]})
        train.append(Message(content, dst_node_id=state.nodes[i], message_type=K.TRAIN_TYPE))
    got = talk(train)
    total = np.zeros(size, dtype=np.uint64)
    survivors = set()
    for i in sorted(active):
        reply = got.get(state.nodes[i])
        vector = _masked_vector(reply, size, p)
        if vector is None:
            continue
        total += vector.astype(np.uint64)  # wraps mod 2^64; reduced mod 2^bits when unmasked
        survivors.add(i)
        talk.out.masked.append(reply)  # type: ignore[arg-type]
    return survivors, total


def _masked_vector(reply: Message | None, size: int, p: SecAggParams) -> np.ndarray | None:
    """The reply's masked vector if it is one (right length and type, sound metrics); else None."""
    if reply is None:
        return None
    try:
        problem, vector = _masked_problem(reply, size, p)
    except MALFORMED as err:
        problem, vector = f"an unreadable masked reply ({type(err).__name__}: {str(err)[:120]})", None
    if problem is not None:
        log.warning("node %s sent %s; it counts as dropped", reply.metadata.src_node_id, problem)
        return None
    return vector


def _masked_problem(reply: Message, size: int, p: SecAggParams) -> tuple[str | None, np.ndarray | None]:
    content = reply.content
    if set(content.keys()) != {K.MASKED_RECORD, METRICS_KEY}:
        return f"records {sorted(content.keys())[:4]}, not {sorted([K.MASKED_RECORD, METRICS_KEY])}", None
    record, metrics = content[K.MASKED_RECORD], content[METRICS_KEY]
    if not isinstance(record, ArrayRecord) or not isinstance(metrics, MetricRecord) or K.MASKED not in record:
        return "a masked reply without its masked ArrayRecord and MetricRecord", None
    if problem := metrics_problem(metrics, None):
        return f"unsound metrics: {problem}", None
    if record[K.MASKED].stype != NUMPY_STYPE:
        return f"a masked array of serialization {record[K.MASKED].stype!r}, not {NUMPY_STYPE!r}", None
    vector = record[K.MASKED].numpy()  # np.load(allow_pickle=False): pickles and garbage raise
    if vector.shape != (size,) or vector.dtype != np.dtype(p.dtype()):
        return f"a masked vector of {vector.shape} {vector.dtype}, not ({size},) {np.dtype(p.dtype())}", None
    return None, vector


def _vector_size(arrays: ArrayRecord, strategy: Any) -> int:
    size = sum(int(a.numpy().size) for a in arrays.values())
    return 2 * size if isinstance(strategy, Scaffold) else size


def _check_enough(state: _Round, active: set[int], survivors: set[int], min_replies: int) -> None:
    check_survivors(survivors, active, state.graph, state.threshold)
    if len(survivors) < min_replies:
        raise SecAggError(f"{len(survivors)} masked updates arrived, fewer than min_replies={min_replies}")


def _reveal(state: _Round, talk: _Talk, survivors: set[int], dropped: set[int]) -> dict[int, dict[int, bytes]]:
    """The unmask stage: each survivor's shares (``b`` of survivors, ``s`` of the dropped): src -> {holder -> share}."""
    msgs = [
        state.message(i, {K.STAGE: K.UNMASK, K.DROPPED: sorted(dropped & {i, *state.graph[i]})})
        for i in sorted(survivors)
    ]
    got = talk(msgs)
    revealed: dict[int, dict[int, bytes]] = {}
    for holder in sorted(survivors):
        held = set(state.ciphertexts.get(holder, {})) & (survivors | dropped)
        shares = _parse(got.get(state.nodes[holder]), "unmask", lambda conf, h=held: _shares(conf, h))
        for src, share in (shares or {}).items():
            revealed.setdefault(src, {})[holder] = share
        _report_unopened(got.get(state.nodes[holder]), holder)
    return revealed


def _report_unopened(reply: Message | None, holder: int) -> None:
    """Log the senders whose share ciphertexts a holder could not open (a forged or corrupt ciphertext)."""
    try:
        unopened = K.listed(reply.content[K.RECORD], K.UNOPENED) if reply is not None else []
    except MALFORMED:
        return
    if unopened:
        log.warning("client %d could not open the share ciphertexts of clients %s; they were skipped",
                    holder, [u for u in unopened[:8] if isinstance(u, int)])  # fmt: skip


def _shares(conf: Any, held: set[int]) -> dict[int, bytes]:
    """An unmask reply: shares only of clients whose ciphertexts the server relayed to this holder."""
    shares = dict(_pairs(conf, K.SRC, K.SHARES))
    if not set(shares) <= held:
        raise ValueError(f"shares of {sorted(set(shares) - held)[:8]}, whose shares it was never sent")
    return shares


def _mean(
    state: _Round,
    total: np.ndarray,
    survivors: set[int],
    dropped: set[int],
    revealed: dict[int, dict[int, bytes]],
    n: int,
) -> np.ndarray:
    """The survivors' mean update (float) from the sum of their masked vectors."""
    p = state.params
    s_pks = {i: pk[1] for i, pk in state.pubs.items()}
    try:
        q_sum = unmask(total, survivors, dropped, revealed, s_pks, state.graph, state.threshold,
                       K.round_tag(state.rnd), p.bits)  # fmt: skip
    except MALFORMED as err:  # e.g. a forged share: Shamir or X25519 refuses what it rebuilt
        raise SecAggError(f"unmasking failed on the revealed shares ({type(err).__name__}: {str(err)[:160]})") from err
    return dequantize(q_sum, p.clip_range, p.bits, n, len(survivors)) / len(survivors)


def unflatten(vector: np.ndarray, like: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Arrays shaped (and typed) as ``like``, in its order, from the front of ``vector``."""
    out, pos = {}, 0
    for k, v in like.items():
        out[k] = vector[pos : pos + v.size].reshape(v.shape).astype(v.dtype)
        pos += v.size
    return out


def _step(
    strategy: Any, rnd: int, arrays: ArrayRecord, mean: np.ndarray, masked: list[Message], threshold: int
) -> tuple[ArrayRecord | None, MetricRecord]:
    """The strategy's server step on the survivors' mean update (:meth:`~strategies.fedavg.FedAvgLoRA.step_from_mean`,
    as DP's noised mean takes it); under DP the sum goes through DP's fixed-weight mean and noise first (under
    distributed noise the clients' shares, sized by the round's ``threshold``, are in the sum already).
    """
    global_ = from_record(arrays)
    size = sum(v.size for v in global_.values())
    delta = unflatten(mean, global_)
    metrics = MetricRecord({
        NUM_EXAMPLES_KEY: int(sum(int(m.content[METRICS_KEY].get(NUM_EXAMPLES_KEY, 0)) for m in masked)),
        "train_loss": float(np.mean([float(m.content[METRICS_KEY].get("train_loss", 0.0)) for m in masked])),
    })  # fmt: skip
    if isinstance(strategy, DPStrategy):  # the sum's fixed-weight mean, noised, then the strategy's step
        n = len(masked)
        total = {ARRAYS_KEY: {k: v.astype(np.float64) * n for k, v in delta.items()}}
        if isinstance(strategy, Scaffold):
            total[C_DELTA_KEY] = {k: v.astype(np.float64) * n for k, v in unflatten(mean[size:], global_).items()}
        return strategy.step_from_sum(total, masked, threshold), metrics
    parts = {ARRAYS_KEY: delta}
    if isinstance(strategy, Scaffold):  # the mean control delta travelled masked beside the adapter's
        parts[C_DELTA_KEY] = unflatten(mean[size:], global_)
    new = strategy.step_from_mean(global_, parts, len(masked), {})  # each c_i stays with its client
    return to_record({k: np.asarray(new[k]).astype(v.dtype) for k, v in global_.items()}), metrics
