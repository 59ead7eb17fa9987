"""The run's communication budget (``comm.budget_mb``): megabytes (2**20 bytes, the leaderboard's unit) counted both
ways on the message bytes.

Before each round the server estimates what the round will cost: the downlink exactly (the encoded
messages are built before they are sent) plus, per sampled client, the largest reply seen so far
(before any reply: the size of the message it is sent). A round that would take the run past its
budget is not started: the run stops there, after its last round's checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedllm_app.comm.codecs import CommParams, encoded_bytes

MB = 2**20  # bytes: the FlowerTune leaderboard's tracker counts MB as 1024**2 bytes (its 200,000 MB budget)


@dataclass
class Budget:
    """The budget in MB (None: none) and the largest reply seen, in bytes."""

    budget_mb: float | None = None
    reply_bytes: int = 0

    def note(self, bytes_by_node: dict[str, dict[str, int]]) -> None:
        """Remember the largest reply of a round (``traffic``'s per-node counts)."""
        self.reply_bytes = max([self.reply_bytes, *(int(e["received"]) for e in bytes_by_node.values())])

    def estimate(self, message_bytes: list[int], reply_guess: list[int] | None = None) -> int:
        """Bytes of a round whose messages carry ``message_bytes``: those, plus one reply per message, as large as
        the largest reply seen so far or the message's own guess (``reply_guess``: what its arrays take under the
        uplink codec), whichever is larger, so an uplink larger than the downlink never passes the budget.
        """
        guesses = reply_guess if reply_guess is not None else message_bytes
        return sum(message_bytes) + sum(max(self.reply_bytes, guess) for guess in guesses)

    def stop_reason(
        self, rnd: int, used_bytes: int, message_bytes: list[int], reply_guess: list[int] | None = None
    ) -> str | None:
        """Why round ``rnd`` must not start (one line), or None when it fits (or there is no budget)."""
        if self.budget_mb is None:
            return None
        need = self.estimate(message_bytes, reply_guess)
        if used_bytes + need <= self.budget_mb * MB:
            return None
        return (
            f"communication budget: round {rnd} would need about {need / MB:.2f} MB more, and {used_bytes / MB:.2f} "
            f"of comm.budget_mb={self.budget_mb:g} MB are used; the run stops before it, its last checkpoint "
            f"is round {rnd - 1}"
        )

    def fields(self, used_bytes: int) -> dict[str, float | None]:
        """The running total for the round's record (metrics.jsonl and the round line)."""
        return {"comm_mb_used": used_bytes / MB, "comm_budget_mb": self.budget_mb}


# Room for a reply's metrics and npy headers beyond its arrays' payload: per array, and per reply.
ARRAY_OVERHEAD, REPLY_OVERHEAD = 512, 8 * 1024


def reply_guess(content: Any, comm: CommParams, field_bits: int | None = None) -> int:
    """An upper estimate of the bytes of the reply to a train message with ``content``: its adapter (``arrays``)
    under the uplink codec, or as field elements of ``field_bits`` under secure aggregation, once more for
    SCAFFOLD's control delta when the message carries control variates, plus headers and metrics.
    """
    sizes = [int(a.numpy().size) for a in content["arrays"].values()]
    if field_bits is not None:
        payload = sum(sizes) * (8 if field_bits > 32 else 4)
    else:
        payload = sum(encoded_bytes(n, comm.codec, block_size=comm.block_size, topk_fraction=comm.topk_fraction)
                      for n in sizes)  # fmt: skip
    records = 2 if sum(1 for _ in content.array_records) > 1 else 1  # SCAFFOLD: c-delta beside the adapter
    return records * (payload + ARRAY_OVERHEAD * len(sizes)) + REPLY_OVERHEAD
