"""The server's round loop over a Flower strategy, with one readable log line per round.

Each round: wait for SuperNodes (up to ``node_wait`` seconds; then sample those
connected), send, collect replies until ``timeout``, reject unsound replies
(:mod:`fedllm_app.server.reply_checks`: nothing reads a reply before it), weigh and bound the
sound ones (:mod:`fedllm_app.server.guard`), aggregate if at least ``min_replies`` valid ones
arrived (else keep the global adapter and say so loudly), count the bytes each
client sent and received, log and hand the round to the hooks.

With ``comm.codec`` (:mod:`fedllm_app.comm`) the messages travel encoded: the server encodes copies of
them (its own arrays stay exact), counts the encoded bytes, and decodes each reply before the reply
checks (a reply that does not decode is rejected). With ``comm.budget_mb`` a round that would take the
run past its budget is not started: the run stops there.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedllm_app.comm.budget import Budget, reply_guess
from fedllm_app.comm.codecs import CodecError, CommParams
from fedllm_app.comm.downlink import Held
from fedllm_app.comm.wire import decode_reply, to_wire
from fedllm_app.secure.secagg import SecAggParams
from fedllm_app.server.guard import ReplyGuard, all_finite
from fedllm_app.server.outputs import RunWriter, format_round
from fedllm_app.server.reply_checks import ReplySpec, claimed_partition, shapes_of, split_replies
from fedllm_app.server.secure_round import SecureOutcome, secure_round
from strategies.fedavg import ARRAYS_KEY, METRICS_KEY, PARTITION_KEY

log = logging.getLogger("fedllm")

EvalFn = Callable[[ArrayRecord], dict[str, float]]
RoundHook = Callable[[int, ArrayRecord], None]
RoundEndHook = Callable[[int, ArrayRecord, dict[str, Any]], None]
TOTAL_KEYS = ("bytes_sent_total", "bytes_received_total")
LARGEST_REPLY_KEY = "largest_reply_bytes"  # kept in the totals for the budget's reply estimate


class NodeWaitError(RuntimeError):
    """Too few SuperNodes connected within ``node_wait_timeout``; the message names the numbers and the fix."""


def run_rounds(
    grid: Grid,
    strategy: Any,
    arrays: ArrayRecord,
    num_rounds: int,
    timeout: float,
    writer: RunWriter,
    phase: str,
    evaluate: EvalFn | None = None,
    after_round: RoundHook | None = None,
    metrics_path: str = "metrics.jsonl",
    poll_interval: float = 0.05,
    *,
    min_replies: int = 1,
    node_wait: float | None = None,
    start_round: int = 1,
    totals: dict[str, int] | None = None,
    on_round_end: RoundEndHook | None = None,
    guard: ReplyGuard | None = None,
    secagg: SecAggParams | None = None,
    comm: CommParams | None = None,
    on_budget_stop: RoundHook | None = None,
) -> tuple[ArrayRecord, dict[str, float]]:
    """Train rounds ``start_round..num_rounds``; return the final global arrays and their last evaluation.

    A round with fewer than ``min_replies`` valid replies leaves the global arrays
    unchanged and is logged as a warning (Flower's strategies skip empty rounds
    silently). ``totals`` (cumulative bytes) is updated in place; ``on_round_end``
    runs after the round's metrics line is written (the server saves its state there).
    ``guard`` (weights, update bound, node -> partition book) is kept across calls by the run.
    With ``secagg`` each round runs secure aggregation (:mod:`fedllm_app.server.secure_round`): the server
    sees only masked updates, so neither the reply checks nor the guard judge them one by one.
    ``comm``: the codecs and budget (default: plain arrays, no budget); when the budget stops the run before
    round N, ``on_budget_stop(N - 1, arrays)`` runs (the server saves its checkpoint there).
    """
    guard = guard if guard is not None else ReplyGuard()
    last_eval: dict[str, float] = {}
    totals = totals if totals is not None else dict.fromkeys(TOTAL_KEYS, 0)
    comm = comm if comm is not None else CommParams()
    budget = Budget(comm.budget_mb, int(totals.get(LARGEST_REPLY_KEY, 0)))
    held = Held() if comm.downlink_delta else None  # a fresh server (and a resumed one) knows no node's copy
    for rnd in range(start_round, num_rounds + 1):
        if not privacy_allows(strategy, rnd, phase):
            break
        start, started_at = time.perf_counter(), time.time()
        messages = configure(strategy, rnd, arrays, grid, node_wait, min_replies, phase)
        encode_start = time.perf_counter()
        wire = to_wire(messages, comm, held)
        encode_seconds = time.perf_counter() - encode_start
        down = [content_bytes(m.content) for m in wire]  # counted before sending, as they travel
        guess = [reply_guess(m.content, comm, secagg.bits if secagg else None) for m in messages]
        if reason := budget.stop_reason(rnd, used_bytes(totals), down, guess):
            log.warning("%s round %d: %s", phase, rnd, reason)
            if held is not None:
                held.discard()
            if on_budget_stop is not None:
                on_budget_stop(rnd - 1, arrays)
            break
        secure, decode_seconds = None, 0.0
        if secagg is not None:  # secure aggregation (no codec): the server sees masked updates, unmasks their mean
            secure = secure_round(grid, strategy, rnd, arrays, messages, secagg, send_and_receive, timeout,
                                  poll_interval, min_replies)  # fmt: skip
            replies, kept, rejected, clipped = secure.replies, secure.masked, [], []
            sizes = traffic(secure.sent, replies, totals)
        else:
            replies = send_and_receive(grid, wire, timeout, poll_interval)
            if held is not None:
                held.settle({m.metadata.src_node_id for m in replies if not m.has_error()})
            sizes = traffic(wire, replies, totals, down)
            decoded, undecodable, decode_seconds = decode_replies(replies, messages, comm)
            kept, rejected, clipped = check_replies(strategy, guard, messages, decoded, arrays)
            rejected = undecodable + rejected
        budget.note(sizes["bytes_by_node"])
        totals[LARGEST_REPLY_KEY] = budget.reply_bytes  # saved with the totals: a resumed run's estimate keeps it
        ok = [m for m in kept if not m.has_error()]
        failed = secure.failed if secure is not None else _failed_nodes(messages, replies)
        _log_problems(phase, rnd, rejected, failed, timeout, clipped)
        train_metrics = None
        if secure is not None:
            arrays, train_metrics = _secure_result(secure, arrays, phase, rnd)
        elif len(ok) >= min_replies or is_private(strategy):  # DP releases every round's noised mean
            arrays, train_metrics = _aggregate(strategy, rnd, kept, arrays, phase)
        else:
            log.warning(
                "%s round %d: %d valid replies of %d sampled, fewer than min_replies=%d: "
                "the round is NOT aggregated and the global adapter is unchanged",
                phase, rnd, len(ok), len(messages), min_replies,
            )  # fmt: skip
        record: dict[str, Any] = {
            "phase": phase,
            "strategy": strategy.__class__.__name__,
            "round": rnd,
            "num_rounds": num_rounds,
            "sampled": len(messages),
            "replied": len(ok),
            "failed": len(failed),
            "failed_nodes": failed,
            "rejected": rejected,
            "clipped": clipped,
            "aggregated": secure.arrays is not None
            if secure is not None
            else len(ok) >= min_replies or is_private(strategy),
            "lr": strategy.learning_rate(rnd),
            "train_loss": float(train_metrics["train_loss"])
            if train_metrics and "train_loss" in train_metrics
            else None,
        }
        record.update(secure.record if secure is not None else {})
        record.update(privacy_record(strategy, rnd))
        record.update(sizes)
        record.update(budget.fields(used_bytes(totals)))
        record["codec_seconds"] = encode_seconds + decode_seconds
        record.update(_client_timing(ok))
        record["train_phase_seconds"] = time.perf_counter() - start
        if evaluate is not None:
            eval_start = time.perf_counter()
            last_eval = evaluate(arrays)
            record.update(last_eval)
            record["eval_seconds"] = time.perf_counter() - eval_start
        if after_round is not None:
            after_round(rnd, arrays)
        record["seconds"] = time.perf_counter() - start
        record["started_at"] = started_at
        writer.log_round(record, metrics_path)
        log.info(format_round(record))
        if on_round_end is not None:
            on_round_end(rnd, arrays, record)
    return arrays, last_eval


def used_bytes(totals: dict[str, int]) -> int:
    """The run's bytes so far, both directions."""
    return int(totals.get("bytes_sent_total", 0)) + int(totals.get("bytes_received_total", 0))


def decode_replies(
    replies: list[Message], messages: list[Message], comm: CommParams
) -> tuple[list[Message], list[dict[str, Any]], float]:
    """The replies with their encoded arrays decoded (in place), those that do not decode (as rejections)
    and the seconds it took. A reply's delta is added to the exact arrays the server sent that node.
    """
    start = time.perf_counter()
    sent = {m.metadata.dst_node_id: m.content[ARRAYS_KEY] for m in messages if ARRAYS_KEY in m.content}
    decoded, rejected = [], []
    for msg in replies:
        node = msg.metadata.src_node_id
        if msg.has_error() or node not in sent:  # errors and strangers: the reply checks deal with them
            decoded.append(msg)
            continue
        try:
            decode_reply(msg, {k: v.numpy() for k, v in sent[node].items()}, comm)
        except Exception as err:  # noqa: BLE001 - a reply that does not decode is rejected, never fatal
            why = str(err)[:200] if isinstance(err, CodecError) else f"{type(err).__name__}: {str(err)[:160]}"
            reason = f"the reply does not decode as comm.codec={comm.codec}: {why}"
            rejected.append({"node": node, "partition": claimed_partition(msg), "reason": reason})
            continue
        decoded.append(msg)
    return decoded, rejected, time.perf_counter() - start


def check_replies(
    strategy: Any, guard: ReplyGuard, messages: list[Message], replies: list[Message], arrays: ArrayRecord
) -> tuple[list[Message], list[dict[str, Any]], list[dict[str, Any]]]:
    """The round's replies to aggregate in partition order (errors last), the rejected and the clipped ones."""
    spec = ReplySpec(shapes_of(arrays), tuple(getattr(strategy, "reply_arrays", ())), strategy.num_clients)
    sent_to = {m.metadata.dst_node_id for m in messages}
    guard.book.assign(planned_partitions(strategy, sent_to))
    sent = reply_bases(strategy, messages)
    kept, rejected = split_replies(replies, spec, sent_to, guard.book, {n: shapes_of(a) for n, a in sent.items()})
    # Under DP every update is clipped to privacy.clip_norm; a bound from the other replies' median would make
    # one client's update change how the others are scaled, beyond the sensitivity the noise covers.
    bound = getattr(strategy, "averages", True) and not is_private(strategy)
    kept, refused, clipped = guard.judge(kept, arrays, spec.extra, bound=bound, sent=sent)
    return _in_client_order(kept), rejected + refused, clipped


def reply_bases(strategy: Any, messages: list[Message]) -> dict[int, ArrayRecord]:
    """Node -> the adapter its reply must match in shapes and is measured from: what it was sent, as the
    strategy's ``reply_base`` cuts it where it has one (HetLoRA's frozen tail: the node's own ranks).
    """
    sent = {m.metadata.dst_node_id: m.content[ARRAYS_KEY] for m in messages if ARRAYS_KEY in m.content}
    base = getattr(strategy, "reply_base", None)
    return sent if base is None else {node: base(node, arrays) for node, arrays in sent.items()}


def planned_partitions(strategy: Any, sent_to: set[int]) -> dict[int, int]:
    """Node -> the partition the strategy sent it this round (its partition query's answer), where known."""
    known = getattr(strategy, "partition_of", {})
    return {node: known[node] for node in sent_to if known.get(node) is not None}


def is_private(strategy: Any) -> bool:
    """Whether the strategy runs DP-FedAvg (:mod:`strategies.dp`)."""
    return hasattr(strategy, "privacy_spent")


def privacy_allows(strategy: Any, rnd: int, phase: str) -> bool:
    """False (and says so) when round ``rnd`` would take epsilon past ``privacy.target_epsilon``."""
    if not is_private(strategy) or strategy.may_run(rnd):
        return True
    a = strategy.accounting
    log.warning(
        "%s: stopping before round %d: it would spend epsilon %.3f > privacy.target_epsilon=%s at delta %g "
        "(%s accountant); the run ends after round %d",
        phase, rnd, strategy.privacy_spent(rnd), a.target_epsilon, a.delta, a.accountant, rnd - 1,
    )  # fmt: skip
    return False


def privacy_record(strategy: Any, rnd: int) -> dict[str, Any]:
    """The round's DP metrics: epsilon spent so far (at ``delta``), the clip norm, the noise std, clipped shares."""
    if not is_private(strategy):
        return {}
    return {"epsilon": strategy.privacy_spent(rnd), "delta": strategy.accounting.delta, **strategy.dp_metrics}


def _aggregate(
    strategy: Any, rnd: int, kept: list[Message], arrays: ArrayRecord, phase: str
) -> tuple[ArrayRecord, Any]:
    """The strategy's new global arrays (the old ones if it returns none or a non-finite aggregate)."""
    new_arrays, train_metrics = strategy.aggregate_train(rnd, kept)
    if new_arrays is not None and not all_finite(new_arrays):
        log.error("%s round %d: the aggregate is not finite; the global adapter is unchanged", phase, rnd)
        return arrays, train_metrics
    return (new_arrays if new_arrays is not None else arrays), train_metrics


def _secure_result(secure: SecureOutcome, arrays: ArrayRecord, phase: str, rnd: int) -> tuple[ArrayRecord, Any]:
    """The secure round's new global arrays (the old ones if it failed or its aggregate is not finite)."""
    if secure.arrays is None:
        return arrays, secure.train_metrics
    if not all_finite(secure.arrays):
        log.error("%s round %d: the aggregate is not finite; the global adapter is unchanged", phase, rnd)
        return arrays, secure.train_metrics
    return secure.arrays, secure.train_metrics


def configure(
    strategy: Any, rnd: int, arrays: ArrayRecord, grid: Grid, node_wait: float | None, min_replies: int, phase: str
) -> list[Message]:
    """The strategy's train messages; with ``node_wait``, never block longer than that for nodes.

    Flower's sampler waits forever for ``min_available_nodes``. If fewer are connected
    after ``node_wait`` seconds (e.g. a SuperNode dropped out), the round samples from
    those connected, as long as there are at least ``min_replies``; otherwise it fails
    with a :class:`NodeWaitError`.
    """
    if node_wait is None:
        return list(strategy.configure_train(rnd, arrays, ConfigRecord(), grid))
    wanted = max(strategy.min_available_nodes, strategy.min_train_nodes)
    available = wait_for_nodes(grid, wanted, node_wait)
    if available < min_replies:
        raise NodeWaitError(
            f"{phase} round {rnd}: {available} SuperNodes connected after waiting node_wait_timeout={node_wait} s, "
            f"fewer than min_replies={min_replies}; start the missing SuperNodes or raise node_wait_timeout"
        )
    if available >= wanted:
        return list(strategy.configure_train(rnd, arrays, ConfigRecord(), grid))
    log.warning(
        "%s round %d: only %d of %d SuperNodes connected after %.0f s; sampling from those",
        phase, rnd, available, wanted, node_wait,
    )  # fmt: skip
    with _sampling_at_most(strategy, available):
        return list(strategy.configure_train(rnd, arrays, ConfigRecord(), grid))


def wait_for_nodes(grid: Grid, wanted: int, wait_seconds: float, interval: float = 0.2) -> int:
    """Wait up to ``wait_seconds`` for ``wanted`` connected nodes; return how many are connected.

    The one node-wait loop: at the run's start (:func:`fedllm_app.server.run.check_nodes`) and before each round.
    """
    deadline = time.monotonic() + wait_seconds
    while (count := len(list(grid.get_node_ids()))) < wanted and time.monotonic() < deadline:
        time.sleep(interval)
    return count


@contextmanager
def _sampling_at_most(strategy: Any, available: int) -> Iterator[None]:
    saved = strategy.min_available_nodes, strategy.min_train_nodes
    strategy.min_available_nodes = min(saved[0], available)
    strategy.min_train_nodes = min(saved[1], available)
    try:
        yield
    finally:
        strategy.min_available_nodes, strategy.min_train_nodes = saved


def send_and_receive(grid: Grid, messages: list[Message], timeout: float, poll_interval: float) -> list[Message]:
    """Flower's ``Grid.send_and_receive`` with a configurable poll interval.

    Flower's own polls every 0.1 s in simulation and every 3 s in deployment, which
    adds up to that much idle time to every round.
    """
    pending = set(grid.push_messages(messages))
    deadline = time.monotonic() + timeout
    replies: list[Message] = []
    while pending:
        got = list(grid.pull_messages(pending))
        replies.extend(got)
        pending.difference_update(m.metadata.reply_to_message_id for m in got)
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(poll_interval)
    return replies


def content_bytes(content: RecordDict) -> int:
    """Payload bytes of a message's content: every array, metric and config value it carries."""
    return sum(record.count_bytes() for record in content.values())


def traffic(
    messages: list[Message], replies: list[Message], totals: dict[str, int], sent_bytes: list[int] | None = None
) -> dict[str, Any]:
    """Bytes sent to and received from each node this round, the round's sums and the running totals.

    ``sent_bytes``: each message's bytes, counted before it was sent (default: counted now).

    Counts the records' payload (what :meth:`ArrayRecord.count_bytes` and friends report),
    not the framing added by Flower's protocol, HTTP or TLS. Rejected replies count as received.
    """
    per_node: dict[str, dict[str, Any]] = {}
    for i, msg in enumerate(messages):
        entry = per_node.setdefault(str(msg.metadata.dst_node_id), {"partition": None, "sent": 0, "received": 0})
        entry["sent"] += sent_bytes[i] if sent_bytes is not None else content_bytes(msg.content)
    for msg in replies:
        if msg.has_error():
            continue
        entry = per_node.setdefault(str(msg.metadata.src_node_id), {"partition": None, "sent": 0, "received": 0})
        try:
            entry["received"] += content_bytes(msg.content)
        except Exception:  # noqa: BLE001 - a malformed reply is rejected elsewhere; count what can be counted
            pass
        pid = claimed_partition(msg)
        entry["partition"] = pid if pid is not None else entry["partition"]  # secure aggregation's stages: none
    sent = sum(e["sent"] for e in per_node.values())
    received = sum(e["received"] for e in per_node.values())
    totals["bytes_sent_total"] = totals.get("bytes_sent_total", 0) + sent
    totals["bytes_received_total"] = totals.get("bytes_received_total", 0) + received
    running = {k: totals[k] for k in TOTAL_KEYS}
    return {"bytes_sent": sent, "bytes_received": received, "bytes_by_node": per_node, **running}


def _failed_nodes(messages: list[Message], replies: list[Message]) -> list[int]:
    """Sampled nodes that replied with an error or not at all."""
    answered = {m.metadata.src_node_id for m in replies if not m.has_error()}
    return sorted({m.metadata.dst_node_id for m in messages} - answered)


def _log_problems(
    phase: str, rnd: int, rejected: list[dict[str, Any]], failed: list[int], timeout: float, clipped: list[Any]
) -> None:
    for r in clipped:
        log.warning("%s round %d: node %s (partition %s): %s", phase, rnd, r["node"], r["partition"], r["reason"])
    for r in rejected:
        log.warning(
            "%s round %d: rejected the update of node %s (partition %s): %s",
            phase, rnd, r["node"], r["partition"], r["reason"],
        )  # fmt: skip
    if failed:
        log.warning(
            "%s round %d: nodes %s failed (an error, or no reply within round_timeout=%s s)",
            phase, rnd, failed, timeout,
        )  # fmt: skip


def _in_client_order(replies: list[Message]) -> list[Message]:
    """Validated replies sorted by the client's partition id (errors last), so the floating-point sums of
    the aggregation do not depend on the order in which clients finished.
    """

    def key(m: Message) -> tuple[int, int]:
        if m.has_error():
            return (1, m.metadata.src_node_id)
        return (0, int(m.content[METRICS_KEY][PARTITION_KEY]))

    return sorted(replies, key=key)


def _client_timing(replies: list[Any]) -> dict[str, float]:
    """Sums over the clients of their reported seconds (train call, optimizer steps, process start-up
    before the call, base-model load, set-up before the first step) and their peak RSS.
    """
    sums = {
        "client_train_seconds": "train_seconds",
        "client_optimizer_seconds": "optimizer_seconds",
        "client_startup_seconds": "process_age_seconds",
        "client_model_load_seconds": "model_load_seconds",
        "client_setup_seconds": "setup_seconds",
    }
    out = dict.fromkeys([*sums, "client_peak_rss_mb"], 0.0)
    for m in replies:
        metrics = m.content[METRICS_KEY]
        for key, reported in sums.items():
            out[key] += float(metrics.get(reported, 0.0))
        out["client_peak_rss_mb"] = max(out["client_peak_rss_mb"], float(metrics.get("peak_rss_mb", 0.0)))
    return out
